"""Live, as root: `asbuilt scan` finds real processes, their files, sockets, peers and packages."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from asbuilt.agent.scan import scan
from asbuilt.agent.store import load_profile
from asbuilt.probes.base import Context

PY = "/usr/bin/python3"  # Debian's interpreter: owned by a package, like a real service's

SERVER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0)); s.listen(8)
    print(s.getsockname()[1], flush=True)
    conn, _ = s.accept()
    conn.sendall(b"x" * 5000)
    time.sleep(600)
""")

CLIENT = textwrap.dedent("""
    import socket, sys, time
    c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    got = 0
    while got < 5000:
        got += len(c.recv(65536))
    c.sendall(b"y" * 3000)
    print("ok", flush=True)
    time.sleep(600)
""")

LOGGER = textwrap.dedent("""
    import sys, time
    conf = open(sys.argv[1]); log = open(sys.argv[2], "a"); log.write("started\\n"); log.flush()
    print("ok", flush=True)
    time.sleep(600)
""")


def _start(args, **kw):
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, **kw)
    line = p.stdout.readline().strip()
    assert line, f"{args} did not start"
    return p, line


@pytest.fixture
def world(tmp_path):
    procs = []
    ns = "asb-scan-" + uuid.uuid4().hex[:6]
    try:
        server, port = _start([PY, "-c", SERVER])
        procs.append(server)
        client, _ = _start([PY, "-c", CLIENT, port, "--db-password", "hunter2"])
        procs.append(client)
        conf = tmp_path / "app.conf"
        conf.write_text("key=value\n")
        logdir = tmp_path / "log"
        logdir.mkdir()
        logger, _ = _start([PY, "-c", LOGGER, str(conf), str(logdir / "app.log")],
                           env=dict(os.environ, API_TOKEN="s3cr3t-token", LANG="C.UTF-8"))
        procs.append(logger)
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        nsproc, nsport = _start(["ip", "netns", "exec", ns, PY, "-c", SERVER])
        procs.append(nsproc)
        yield dict(server=server, port=int(port), client=client, logger=logger, conf=str(conf),
                   log=str(logdir / "app.log"), nsproc=nsproc, nsport=int(nsport), ns=ns)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


def _proc(profile, pid):
    (p,) = [p for p in profile.processes if p.pid == pid]
    return p


def test_scan_finds_real_processes(world):
    ctx = Context()
    profile = scan(ctx)
    assert profile.host.hostname == socket.gethostname()
    assert {r.name for r in profile.coverage.probes} >= {"host", "processes", "sockets", "packages"}
    assert all(r.status == "ok" for r in profile.coverage.probes), profile.coverage.probes

    server = _proc(profile, world["server"].pid)
    assert server.exe == os.path.realpath(PY)
    assert server.exe_package and server.exe_package.startswith("python3")
    assert any(s.state == "LISTEN" and s.local_port == world["port"] and s.local_address == "127.0.0.1"
               for s in server.sockets)
    (inbound,) = [p for p in server.peers if p.direction == "inbound"]
    assert (inbound.address, inbound.local_port, inbound.proto) == ("127.0.0.1", world["port"], "tcp")
    assert inbound.bytes_sent >= 5000 and inbound.bytes_received >= 3000
    libc = [lib for lib in server.libraries if "libc.so" in lib.path]
    assert libc and libc[0].package == "libc6" and libc[0].owned is True and libc[0].modified is False

    client = _proc(profile, world["client"].pid)
    (out,) = [p for p in client.peers if p.direction == "outbound"]
    assert (out.address, out.port) == ("127.0.0.1", world["port"])
    assert out.bytes_sent >= 3000 and out.bytes_received >= 5000
    assert "hunter2" not in json.dumps(client.cmdline)
    assert "--db-password" in client.cmdline

    logger = _proc(profile, world["logger"].pid)
    files = {f.path: f for f in logger.files}
    assert files[world["conf"]].kind == "config" and files[world["conf"]].mode == "r"
    assert files[world["log"]].kind == "log" and "a" in files[world["log"]].mode
    assert files[world["log"]].owned is False and files[world["log"]].package is None
    assert "API_TOKEN" in logger.env_names and "API_TOKEN" not in logger.env
    assert logger.env.get("LANG") == "C.UTF-8"

    nsproc = _proc(profile, world["nsproc"].pid)
    assert nsproc.netns and nsproc.netns != server.netns
    assert any(s.state == "LISTEN" and s.local_port == world["nsport"] and s.netns == nsproc.netns
               for s in nsproc.sockets)
    (ns,) = [n for n in profile.host.netns if n.inode == nsproc.netns]
    assert ns.name == world["ns"] and nsproc.pid in ns.pids

    pkgs = {p.name: p for p in profile.packages}
    assert pkgs["libc6"].version and pkgs["libc6"].install_time and pkgs["libc6"].origin
    assert server.identity in pkgs["libc6"].used_by


def test_identity_survives_restart(world):
    """A restarted process (new pid, new start time) keeps its identity."""
    a = scan(Context(), pids=[world["logger"].pid]).processes[0]
    again, _ = _start([PY, "-c", LOGGER, world["conf"], world["log"]])
    try:
        b = scan(Context(), pids=[again.pid]).processes[0]
    finally:
        again.kill()
        again.wait()
    assert a.pid != b.pid and a.identity == b.identity


def test_vanished_and_missing_pids_are_gaps():
    short = subprocess.Popen(["sleep", "0.05"])
    time.sleep(0.3)
    short.wait()
    ctx = Context()
    profile = scan(ctx, pids=[short.pid, 1])
    assert short.pid not in {p.pid for p in profile.processes}
    assert any(g.kind == "vanished" and g.subject == f"pid {short.pid}" for g in profile.coverage.gaps)


def test_no_package_database_is_a_gap(tmp_path):
    """A root filesystem with neither dpkg nor rpm: the scan goes on and says so."""
    from asbuilt.probes.base import Roots

    ctx = Context(roots=Roots(rootfs=str(tmp_path)))
    profile = scan(ctx, pids=[os.getppid()])
    assert any(g.kind == "absent" and g.subject == "packages" for g in profile.coverage.gaps)
    assert profile.packages == []


def test_cli_scan_show_doctor(world, tmp_path):
    cli = [sys.executable, "-m", "asbuilt.agent.cli"]
    out = tmp_path / "host.msgpack"
    r = subprocess.run(cli + ["scan", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    profile = load_profile(str(out))
    assert world["server"].pid in {p.pid for p in profile.processes}
    r = subprocess.run(cli + ["show", str(out)], capture_output=True, text=True)
    assert r.returncode == 0
    for heading in ("Listeners", "Processes", "Dependencies", "Packages in use", "Coverage"):
        assert heading in r.stdout
    assert str(world["port"]) in r.stdout and "hunter2" not in r.stdout
    r = subprocess.run(cli + ["doctor", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["features"]["bpf"]["ok"] and doc["features"]["tracepoints"]["ok"]
    assert doc["features"]["kprobes"]["ok"] is False and doc["features"]["kprobes"]["detail"]
    verdicts = {p["name"]: p["verdict"] for p in doc["probes"]}
    assert verdicts["files"] == "run" and verdicts["kfunc"] == "off"


# ------------------------------------------------------------------ the forked procfs worker
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "debian12")


def _fixture_scan(tmp_path, **options) -> dict:
    """The captured debian12 tree scanned with ``options``, as a dict without run-to-run times."""
    import glob
    import shutil

    from asbuilt.agent.model import to_dict
    from asbuilt.probes.base import Roots

    root = str(tmp_path / "debian12")
    if not os.path.isdir(root):
        shutil.copytree(FIXTURE, root, symlinks=True)
        for path in glob.glob(os.path.join(root, "var/lib/dpkg/info/*.list")):
            os.utime(path, (1690000000.0, 1690000000.0))
    ctx = Context(roots=Roots(proc=os.path.join(root, "proc"), sys=os.path.join(root, "sys"), rootfs=root),
                  now=1700000000.0, privileged=True, options=dict(options))
    d = to_dict(scan(ctx))
    for key in ("generated_at", "started_at", "duration_seconds"):
        d.pop(key, None)
    for run in d.get("coverage", {}).get("probes", []):
        run.pop("duration_seconds", None)
    return d


def test_forked_worker_gives_the_same_profile(tmp_path, monkeypatch):
    import asbuilt.agent.scan as scanmod

    alone = _fixture_scan(tmp_path, workers=1)
    seen = []
    real_fork = scanmod._fork_worker
    monkeypatch.setattr(scanmod, "MIN_FORK_PIDS", 1)
    monkeypatch.setattr(scanmod, "_fork_worker", lambda *a: seen.append(a[1]) or real_fork(*a))
    shared = _fixture_scan(tmp_path)
    assert seen and seen[0], "the worker was forked and given pids"
    assert shared == alone
    assert [p["pid"] for p in shared["processes"]] == sorted(p["pid"] for p in shared["processes"])


def test_failed_worker_is_replaced_by_reading_its_share(tmp_path, monkeypatch):
    import asbuilt.agent.scan as scanmod

    alone = _fixture_scan(tmp_path, workers=1)
    parent, real_read = os.getpid(), scanmod._read_one

    def dies_in_the_worker(*args):
        if os.getpid() != parent:
            os._exit(7)  # the worker dies without a word: the parent reads its pids itself
        return real_read(*args)

    monkeypatch.setattr(scanmod, "MIN_FORK_PIDS", 1)
    monkeypatch.setattr(scanmod, "_read_one", dies_in_the_worker)
    assert _fixture_scan(tmp_path) == alone


def test_live_scan_with_worker_sees_every_process_and_leaves_no_child():
    import asbuilt.agent.scan as scanmod

    n = scanmod.MIN_FORK_PIDS + 20
    procs = [subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
             for _ in range(n)]
    try:
        ctx = Context()
        probe = scanmod.ProcessProbe(build=lambda info: scanmod.build_process(info, {}, {}, 0.0, 100))
        got = probe.collect(ctx)
        assert probe.workers == 2
        pids = [proc.pid for proc, _ in got]
        assert pids == sorted(pids) and {p.pid for p in procs} <= set(pids)
        # vanished pids are gaps, not tracebacks, whichever side read them
        assert all(g.kind in ("vanished", "denied", "unreadable") for g in ctx.coverage.gaps)
        with open(f"/proc/self/task/{os.getpid()}/children") as fh:  # the worker was reaped
            assert {int(c) for c in fh.read().split()} == {p.pid for p in procs}
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_cli_scan_package_cache_gives_the_same_packages(tmp_path):
    """The CLI keeps dpkg's answers in its cache dir (0700, file 0600); a scan that uses them says
    the same of the same process as one that does not."""
    cli = [sys.executable, "-m", "asbuilt.agent.cli"]
    cache = tmp_path / "cache"
    env = dict(os.environ, ASBUILT_CACHE_DIR=str(cache))
    pid = str(os.getpid())

    def packages_of(out, extra_env):
        r = subprocess.run(cli + ["scan", "--pid", pid, "-o", str(out)], capture_output=True, text=True,
                           env=extra_env)
        assert r.returncode == 0, r.stderr
        prof = load_profile(str(out))
        (proc,) = prof.processes
        refs = sorted((f.path, f.package, f.owned, f.modified) for f in proc.libraries + proc.files)
        pkgs = sorted((p.name, p.version, p.origin, p.install_time) for p in prof.packages)
        return proc.exe_package, refs, pkgs

    plain = packages_of(tmp_path / "a.msgpack", dict(os.environ, ASBUILT_CACHE_DIR="off"))
    assert not cache.exists()
    cold = packages_of(tmp_path / "b.msgpack", env)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cache / "dpkg-index.msgpack").st_mode) == 0o600
    warm = packages_of(tmp_path / "c.msgpack", env)
    assert plain == cold == warm and plain[2], "python's packages were found"


def test_build_process_memo_changes_nothing():
    import asbuilt.agent.scan as scanmod
    from asbuilt.agent.model import to_dict
    from asbuilt.probes.procfs.process import read_process

    infos = []
    for pid in (os.getpid(), os.getppid(), 1, os.getpid()):  # the same process twice: memo hits
        infos.append(read_process("/proc", pid))
    memo: dict = {}
    alone = [scanmod.build_process(i, {}, {}, 0.0, 100) for i in infos]
    shared = [scanmod.build_process(i, {}, {}, 0.0, 100, memo) for i in infos]
    assert [to_dict(p) for p in alone] == [to_dict(p) for p in shared]
    assert shared[0].cmdline is not shared[3].cmdline and shared[0].env_names is not shared[3].env_names
