"""trace.proc and trace.files: pure helpers table-driven, then a live trace of a real process tree."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from asbuilt.probes.base import Context
from asbuilt.probes.ebpf import tracer
from asbuilt.probes.ebpf.files import FileObservation, FilesProbe, errno_name, join_path, open_mode
from asbuilt.probes.ebpf.proc import ExecObservation, ExitObservation, ForkObservation, ProcProbe, \
    parse_cmdline
from asbuilt.probes.ebpf.tracer import ProcEvent, descendants, parse_stat_ppid, start_together


# ------------------------------------------------------------------------------ pure
@pytest.mark.parametrize("flags,mode", [
    (0, "r"), (0o1, "w"), (0o2, "rw"), (0o1 | 0o100 | 0o2000, "wac"), (0o1 | 0o100 | 0o1000, "wct"),
    (0o2 | 0o100, "rwc"), (0o10000000, "p"), (0o200000, "r"),
])
def test_open_mode(flags, mode):
    assert open_mode(flags) == mode


@pytest.mark.parametrize("err,name", [(0, ""), (2, "ENOENT"), (13, "EACCES"), (9999, "E9999")])
def test_errno_name(err, name):
    assert errno_name(err) == name


@pytest.mark.parametrize("base,path,out", [
    ("/srv/app", "conf/a.ini", "/srv/app/conf/a.ini"),
    ("/srv/app", "../b", "/srv/b"),
    ("/srv/app", "./c", "/srv/app/c"),
    (None, "rel", None),
    ("", "rel", None),
    ("not-absolute", "rel", None),
    (None, "/etc/passwd", "/etc/passwd"),
    (None, "/etc//./hosts", "/etc/hosts"),
])
def test_join_path(base, path, out):
    assert join_path(base, path) == out


@pytest.mark.parametrize("text,ppid", [
    ("1234 (bash) S 1 1234 1234 0 -1", 1),
    ("99 (a) b) c) R 42 99 99", 42),
    ("", None), ("1234 (bash", None), ("1 (x) S", None), ("1 (x) S notanumber", None),
])
def test_parse_stat_ppid(text, ppid):
    assert parse_stat_ppid(text) == ppid


def test_descendants():
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 11, 20: 1, 30: 20}
    assert descendants(parents, [10]) == [11, 12, 13]
    assert descendants(parents, [99]) == []
    assert descendants({}, [1]) == []


@pytest.mark.parametrize("raw,argv", [
    (b"", []), (b"cat\0/etc/hosts\0", ["cat", "/etc/hosts"]), (b"a\0\0b\0", ["a", "", "b"]),
    (b"no-terminator", ["no-terminator"]),
])
def test_parse_cmdline(raw, argv):
    assert parse_cmdline(raw) == argv


def test_proc_event_rejects_short_record():
    with pytest.raises(ValueError):
        ProcEvent(b"\0" * 10, 0.0)


# ------------------------------------------------------------------------------ live
HELPER = textwrap.dedent("""
    import os, sys, time
    work, go = sys.argv[1], sys.argv[2]
    def wait_go():
        deadline = time.time() + 20
        while not os.path.exists(go):
            if time.time() > deadline:
                os._exit(3)
            time.sleep(0.01)
    early = os.fork()  # a descendant that exists before the trace attaches
    if early == 0:
        wait_go()
        with open(os.path.join(work, "early.txt")) as f:
            f.read()
        os._exit(0)
    wait_go()
    os.chdir(work)
    with open("app.conf") as f:           # relative, after chdir
        f.read()
    with open("app.log", "a") as f:        # append (creates it)
        f.write("started\\n")
    try:
        open("missing.conf")
    except FileNotFoundError:
        pass
    child = os.fork()
    if child == 0:
        os.execv("/bin/cat", ["cat", os.path.join(work, "data.txt")])
    os.waitpid(child, 0)
    os.waitpid(early, 0)
    sys.exit(7)
""")

OUTSIDER = textwrap.dedent("""
    import os, sys, time
    path, go = sys.argv[1], sys.argv[2]
    deadline = time.time() + 20
    while not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.01)
    end = time.time() + 1.0
    while time.time() < end:
        with open(path) as f:
            f.read()
        time.sleep(0.005)
""")


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "app.conf").write_text("listen=8080\n")
    (tmp_path / "data.txt").write_text("payload\n")
    (tmp_path / "early.txt").write_text("early\n")
    (tmp_path / "outsider.txt").write_text("not traced\n")
    return tmp_path


def _spawn(script, *args):
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill(*procs):
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _run_traced(workdir, follow_children=True):
    go = workdir / "go"
    helper = _spawn(HELPER, workdir, go)
    outsider = _spawn(OUTSIDER, workdir / "outsider.txt", go)
    ctx = Context()
    proc, files = ProcProbe(), FilesProbe()
    try:
        time.sleep(0.2)  # the helper has forked its early child
        t0 = time.monotonic()
        session = start_together(ctx, [proc, files], [helper.pid], follow_children=follow_children)
        started = time.monotonic() - t0
        go.write_text("")
        helper.wait(timeout=20)
        outsider.wait(timeout=20)
        time.sleep(0.1)
        proc_obs, file_obs = proc.drain(), files.drain()
        tracer.close_together(session)
        return ctx, helper, outsider, proc_obs, file_obs, files, started, session
    finally:
        _kill(helper, outsider)


def test_live_tree_traced(workdir):
    ctx, helper, outsider, proc_obs, file_obs, files, started, session = _run_traced(workdir)
    work = str(workdir)
    assert started < 5.0, f"probes took {started:.2f}s to attach"
    assert session.compile_seconds > 0

    by = {}
    for o in file_obs:
        assert isinstance(o, FileObservation)
        by[(o.pid, o.path, o.error)] = o
    pid = helper.pid
    conf = by[(pid, f"{work}/app.conf", "")]
    assert conf.mode == "r" and conf.count >= 1 and conf.resolved
    log = by[(pid, f"{work}/app.log", "")]
    assert log.mode == "wac"
    missing = by[(pid, f"{work}/missing.conf", "ENOENT")]
    assert missing.mode == "r"
    assert missing.first_seen <= missing.last_seen

    execs = [o for o in proc_obs if isinstance(o, ExecObservation)]
    cat = [e for e in execs if e.path == "/bin/cat"]
    assert len(cat) == 1, execs
    cat = cat[0]
    assert cat.ppid == pid
    assert cat.argv == ["cat", f"{work}/data.txt"] and cat.argv_source == "kernel"
    assert (cat.pid, f"{work}/data.txt", "") in by and by[(cat.pid, f"{work}/data.txt", "")].mode == "r"
    assert by[(cat.pid, "/bin/cat", "")].mode == "x"

    forks = [o for o in proc_obs if isinstance(o, ForkObservation)]
    assert any(f.pid == cat.pid and f.ppid == pid for f in forks)
    exits = {o.pid: o for o in proc_obs if isinstance(o, ExitObservation)}
    assert exits[pid].exit_code == 7
    assert exits[cat.pid].exit_code == 0

    # the descendant that existed before attaching was seeded from /proc
    early = [o for o in file_obs if o.path == f"{work}/early.txt"]
    assert early and early[0].pid != pid

    # a process outside the traced tree never shows up
    assert all(o.pid != outsider.pid for o in file_obs + proc_obs)
    assert not any("outsider.txt" in o.path for o in file_obs)
    assert files.lost_events == 0
    assert not [g for g in ctx.coverage.gaps if g.kind != "vanished"]


def test_live_counts_repeated_opens(tmp_path):
    """The kernel sends a path once; repeats only bump its counter, read at drain."""
    target = tmp_path / "hot.txt"
    target.write_text("x")
    go = tmp_path / "go"
    script = textwrap.dedent("""
        import os, sys, time
        path, go = sys.argv[1], sys.argv[2]
        deadline = time.time() + 20
        while not os.path.exists(go) and time.time() < deadline:
            time.sleep(0.01)
        for _ in range(500):
            os.close(os.open(path, os.O_RDONLY))
    """)
    helper = _spawn(script, target, go)
    files = FilesProbe()
    try:
        files.start(Context(), [helper.pid], follow_children=False)
        go.write_text("")
        helper.wait(timeout=20)
        obs = [o for o in files.drain() if o.path == str(target)]
        assert len(obs) == 1 and obs[0].count == 500 and files.events >= 1
        assert files.drain() == []  # nothing new since
    finally:
        files.stop()
        _kill(helper)


def test_live_no_children_when_not_following(workdir):
    ctx, helper, outsider, proc_obs, file_obs, *_ = _run_traced(workdir, follow_children=False)
    assert {o.pid for o in file_obs} == {helper.pid}
    assert not [o for o in proc_obs if isinstance(o, (ExecObservation, ForkObservation))]
