"""The scan on a captured tree: ``tests/fixtures/debian12`` (host + four captured processes + a
minimal dpkg database) against its golden file, explicit checks of the facts that matter, and
gaps for a malformed or vanished process.

Regenerate the golden file with
``ASBUILT_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_scan_fixture.py -k golden``.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

from asbuilt.agent.model import to_dict
from asbuilt.agent.redact import REDACTED, env_allowed
from asbuilt.agent.scan import scan
from asbuilt.probes.base import Context, Roots

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "debian12")
GOLDEN = os.path.join(FIXTURE, "expected_scan.json")

# The captured processes (see tests/fixtures/debian12/README.md).
WEB, DOCKER, NGINX, CHILD = 21155, 21156, 21157, 21159
DOCKER_ID = "07e0f3706ec12c92605d1b3b21c714cfc117f25bdae6a512d2166b64904636eb"
NOW = 1700000000.0
LIST_MTIME = 1690000000.0  # install_time comes from info/*.list mtimes, which git does not keep


def _tree(dst: str) -> str:
    """A copy of the fixture with deterministic mtimes on the dpkg lists."""
    root = os.path.join(dst, "debian12")
    shutil.copytree(FIXTURE, root, symlinks=True)
    for path in glob.glob(os.path.join(root, "var/lib/dpkg/info/*.list")):
        os.utime(path, (LIST_MTIME, LIST_MTIME))
    return root


def _scan(root: str, **options):
    ctx = Context(roots=Roots(proc=os.path.join(root, "proc"), sys=os.path.join(root, "sys"), rootfs=root),
                  now=NOW, privileged=True, options=dict(options))
    return scan(ctx)


def normalise(d: dict) -> dict:
    """Drop what changes from run to run: wall-clock times and durations."""
    for key in ("generated_at", "started_at", "duration_seconds"):
        d.pop(key, None)
    for run in d.get("coverage", {}).get("probes", []):
        run.pop("duration_seconds", None)
    return d


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return _tree(str(tmp_path_factory.mktemp("scanfix")))


@pytest.fixture(scope="module")
def profile(tree):
    return _scan(tree)


def _proc(profile, pid):
    (p,) = [p for p in profile.processes if p.pid == pid]
    return p


def _file(proc, path):
    (f,) = [f for f in proc.files + proc.mapped_files + proc.libraries if f.path == path]
    return f


# --------------------------------------------------------------------------------- golden
def test_golden(profile):
    got = normalise(to_dict(profile))
    if os.environ.get("ASBUILT_REGEN_GOLDEN") == "1":
        with open(GOLDEN, "w") as fh:
            json.dump(got, fh, indent=1, sort_keys=True)
            fh.write("\n")
    with open(GOLDEN) as fh:
        want = json.load(fh)
    assert json.loads(json.dumps(got)) == want


def test_golden_does_not_depend_on_where_the_tree_is(tmp_path, profile):
    other = _scan(_tree(str(tmp_path)))
    assert normalise(to_dict(other)) == normalise(to_dict(profile))


# ------------------------------------------------------------------------- explicit facts
def test_all_captured_processes_and_their_tree(profile):
    assert [p.pid for p in profile.processes] == [WEB, DOCKER, NGINX, CHILD]
    parents = {p.pid: p.ppid for p in profile.processes}
    assert parents[CHILD] == WEB
    assert parents[WEB] == parents[DOCKER] == parents[NGINX] == 1  # reparented to init


def test_password_redacted_in_cmdline(profile):
    web = _proc(profile, WEB)
    assert web.cmdline == ["/usr/bin/python3", "/opt/webapp/server.py", "--config", "/opt/webapp/app.conf",
                           "--db-password", REDACTED]
    assert "hunter2" not in json.dumps(to_dict(profile))


def test_identity_user_and_exe(profile):
    web = _proc(profile, WEB)
    assert web.exe == "/usr/bin/python3.11"
    assert web.name == "python3"
    assert (web.uid, web.user, web.gid, web.group) == (65534, "nobody", 65534, "nogroup")
    assert web.cwd == "/opt/webapp"
    assert web.identity.startswith("session-N.scope:/usr/bin/python3.11:")
    assert _proc(profile, CHILD).exe == "/usr/bin/sleep"


def test_container_and_unit_derived_from_cgroup(profile):
    docker = _proc(profile, DOCKER)
    assert docker.cgroup == f"/system.slice/docker-{DOCKER_ID}.scope"
    assert (docker.container_id, docker.container_runtime) == (DOCKER_ID, "docker")
    assert docker.systemd_unit == ""  # the container's own scope is not its unit
    assert docker.identity.startswith(DOCKER_ID[:12] + ":/usr/bin/python3.11:")
    nginx = _proc(profile, NGINX)
    assert nginx.systemd_unit == "nginx.service"
    assert (nginx.container_id, nginx.container_runtime) == ("", "")
    assert nginx.identity.startswith("nginx.service:/usr/bin/tail:")
    # v2 line and hybrid v1 lines (name=systemd, memory ...) place web and child alike
    assert _proc(profile, WEB).systemd_unit == _proc(profile, CHILD).systemd_unit == "session-3.scope"


def test_files_classified_with_modes(profile):
    web = _proc(profile, WEB)
    got = {f.path: (f.kind, f.mode, f.deleted) for f in web.files}
    assert got == {
        "/opt/webapp/app.conf": ("config", "r", False),
        "/var/log/webapp/access.log": ("log", "wa", False),
        "/var/lib/webapp/state.db": ("data", "rw", False),
        "/tmp/webapp-upload.tmp": ("deleted", "w", True),
    }  # /dev/null (stdio), the pipe and the socket are not file dependencies
    assert web.fd_count == 8
    tail = _proc(profile, NGINX)
    assert [(f.path, f.kind, f.mode) for f in tail.files] == [("/var/log/webapp/access.log", "log", "r")]
    assert _proc(profile, CHILD).files == []


def test_packages_resolve(profile):
    web = _proc(profile, WEB)
    assert web.exe_package == "python3.11-minimal"
    # merged /usr: the process maps /usr/lib/..., dpkg lists /lib/... and /bin/sleep
    assert _file(web, "/usr/lib/x86_64-linux-gnu/libc.so.6").package == "libc6"
    assert _file(web, "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2").package == "libc6"
    assert _file(web, "/usr/lib/x86_64-linux-gnu/libz.so.1.2.13").package == "zlib1g"
    assert all(lib.owned and lib.package for p in profile.processes for lib in p.libraries)
    assert _proc(profile, CHILD).exe_package == "coreutils"
    assert _file(_proc(profile, DOCKER), "/usr/lib/x86_64-linux-gnu/libssl.so.3").package == "libssl3"
    pkgs = {p.name: p for p in profile.packages}
    libc = pkgs["libc6"]
    assert (libc.version, libc.architecture, libc.manager, libc.source) == ("2.36-9+deb12u14", "amd64", "dpkg", "glibc")
    assert libc.install_time == LIST_MTIME
    assert libc.origin == "unknown"  # no apt lists in the fixture
    assert sorted(libc.used_by) == sorted(p.identity for p in profile.processes)
    assert pkgs["coreutils"].used_by == sorted({_proc(profile, CHILD).identity, _proc(profile, NGINX).identity})


def test_own_files_are_unowned(profile):
    web = _proc(profile, WEB)
    log = _file(web, "/var/log/webapp/access.log")
    assert (log.owned, log.package, log.modified) == (False, None, None)
    assert _file(web, "/opt/webapp/app.conf").owned is False


def test_env_values_only_for_allow_listed_names(profile):
    web = _proc(profile, WEB)
    assert "SECRET_TOKEN" in web.env_names and "DATABASE_URL" in web.env_names
    assert web.env == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                       "LC_ALL": "C.UTF-8", "TZ": "UTC", "HOME": "/nonexistent", "USER": "nobody"}
    for p in profile.processes:
        assert set(p.env) <= set(p.env_names)
        assert all(env_allowed(name) for name in p.env)
    docker = _proc(profile, DOCKER)
    assert "AWS_SECRET_ACCESS_KEY" in docker.env_names and "AWS_SECRET_ACCESS_KEY" not in docker.env
    assert _proc(profile, NGINX).env["INVOCATION_ID"] == "0123456789abcdef0123456789abcdef"


def test_sockets_probe_unavailable_with_reason(profile):
    runs = {r.name: r for r in profile.coverage.probes}
    assert runs["sockets"].status == "unavailable"
    assert runs["sockets"].reason == "captured tree: sockets need the live kernel"
    assert (runs["host"].status, runs["processes"].status, runs["packages"].status) == ("ok", "ok", "ok")
    assert runs["processes"].items == 4
    assert all(p.sockets == [] and p.peers == [] for p in profile.processes)
    assert [g.subject for g in profile.coverage.gaps] == ["rtnetlink"]


def test_network_namespaces(profile):
    by_ns = {ns.inode: ns.pids for ns in profile.host.netns}
    assert by_ns[_proc(profile, DOCKER).netns] == [DOCKER]
    assert _proc(profile, DOCKER).netns != _proc(profile, WEB).netns


def test_start_time_from_boot_time_and_ticks(profile):
    child, web = _proc(profile, CHILD), _proc(profile, WEB)
    assert profile.host.boot_time > 0
    assert child.start_time >= web.start_time > profile.host.boot_time


# -------------------------------------------------------------------------------- gaps
def test_malformed_and_missing_stat_are_gaps_and_the_rest_completes(tmp_path):
    root = _tree(str(tmp_path))
    with open(os.path.join(root, "proc", str(DOCKER), "stat"), "w") as fh:
        fh.write("21156 (python3) S 1 2\n")  # truncated
    os.unlink(os.path.join(root, "proc", str(NGINX), "stat"))  # as if it exited mid-scan
    profile = _scan(root)
    assert [p.pid for p in profile.processes] == [WEB, CHILD]
    gaps = {(g.kind, g.subject): g.detail for g in profile.coverage.gaps}
    assert "malformed" in gaps[("unreadable", f"pid {DOCKER}")]
    assert gaps[("vanished", f"pid {NGINX}")] == "exited during the scan"
    runs = {r.name: r for r in profile.coverage.probes}
    assert runs["processes"].status == "ok" and runs["processes"].items == 2
    assert runs["packages"].status == "ok"
    web = _proc(profile, WEB)
    assert web.exe_package == "python3.11-minimal"
    assert _file(web, "/var/log/webapp/access.log").mode == "wa"
    assert {p.name for p in profile.packages} >= {"libc6", "python3.11-minimal", "coreutils"}
    assert "libssl3" not in {p.name for p in profile.packages}  # only the gone docker process used it


def test_missing_part_is_a_gap_and_the_process_is_kept(tmp_path):
    root = _tree(str(tmp_path))
    os.unlink(os.path.join(root, "proc", str(WEB), "environ"))
    os.unlink(os.path.join(root, "proc", str(WEB), "maps"))
    profile = _scan(root)
    web = _proc(profile, WEB)
    assert web.env_names == [] and web.libraries == [] and web.mapped_files == []
    assert len(web.files) == 4 and web.exe_package == "python3.11-minimal"
    gaps = [(g.kind, g.subject, g.detail) for g in profile.coverage.gaps if g.subject == f"pid {WEB}"]
    assert sorted(gaps) == [("unreadable", f"pid {WEB}", "environ"), ("unreadable", f"pid {WEB}", "maps")]


def test_pids_filter_records_absent_pid(tree):
    ctx = Context(roots=Roots(proc=os.path.join(tree, "proc"), sys=os.path.join(tree, "sys"), rootfs=tree),
                  now=NOW, privileged=True)
    profile = scan(ctx, pids=[WEB, 999999])
    assert [p.pid for p in profile.processes] == [WEB]
    assert ("vanished", "pid 999999") in {(g.kind, g.subject) for g in profile.coverage.gaps}


def test_without_package_database(tmp_path):
    root = _tree(str(tmp_path))
    shutil.rmtree(os.path.join(root, "var", "lib", "dpkg"))
    profile = _scan(root)
    assert profile.packages == []
    web = _proc(profile, WEB)
    assert web.exe_package is None
    assert all(f.owned is None for f in web.files + web.libraries)  # unknown, not "unowned"
    assert ("absent", "packages") in {(g.kind, g.subject) for g in profile.coverage.gaps}
