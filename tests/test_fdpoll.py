"""fd polling: parser tables, a captured-style procfs tree (injected root), and live processes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from asbuilt.agent.errors import Vanished
from asbuilt.probes import fdpoll as fp
from asbuilt.probes.base import Context, Roots

# ------------------------------------------------------------------------------ parser tables
TARGET_CASES = [
    ("path", "/etc/app.conf", ("file", "/etc/app.conf", False)),
    ("deleted path", "/tmp/x (deleted)", ("file", "/tmp/x", True)),
    ("device", "/dev/null", ("file", "/dev/null", False)),
    ("socket", "socket:[12345]", ("socket", 12345, False)),
    ("socket, bad inode", "socket:[abc]", ("other", "socket:[abc]", False)),
    ("pipe", "pipe:[77]", ("pipe", "pipe:[77]", False)),
    ("anon inode", "anon_inode:[eventpoll]", ("anon", "anon_inode:[eventpoll]", False)),
    ("anon inode, old form", "anon_inode:inotify", ("anon", "anon_inode:inotify", False)),
    ("memfd", "/memfd:shm (deleted)", ("memfd", "/memfd:shm (deleted)", True)),
    ("namespace", "net:[4026531840]", ("other", "net:[4026531840]", False)),
    ("empty", "", ("other", "", False)),
]


@pytest.mark.parametrize("name,link,expected", TARGET_CASES, ids=[c[0] for c in TARGET_CASES])
def test_parse_fd_target(name, link, expected):
    assert fp.parse_fd_target(link) == expected


FDINFO_CASES = [
    ("regular", "pos:\t0\nflags:\t0100002\nmnt_id:\t25\nino:\t1234\n", 0o100002),
    ("append", "pos:\t10\nflags:\t02102001\nmnt_id:\t25\n", 0o2102001),
    ("empty", "", None),
    ("no flags line", "pos:\t0\nmnt_id:\t25\n", None),
    ("malformed flags", "pos:\t0\nflags:\t09x\n", None),
    ("truncated", "pos:\t0\nfla", None),
]


@pytest.mark.parametrize("name,text,flags", FDINFO_CASES, ids=[c[0] for c in FDINFO_CASES])
def test_parse_fdinfo_flags(name, text, flags):
    assert fp.parse_fdinfo_flags(text) == flags


MODE_CASES = [
    ("unknown", None, ""),
    ("O_RDONLY", 0o100000, "r"),
    ("O_WRONLY", 0o1, "w"),
    ("O_RDWR", 0o2, "rw"),
    ("O_WRONLY|O_APPEND", 0o2001, "wa"),
    ("O_RDWR|O_APPEND", 0o2002, "rwa"),
    ("O_PATH", 0o10000000, ""),
]


@pytest.mark.parametrize("name,flags,mode", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_mode_from_flags(name, flags, mode):
    assert fp.mode_from_flags(flags) == mode


@pytest.mark.parametrize("old,new,merged", [("", "r", "r"), ("r", "w", "rw"), ("wa", "r", "rwa"),
                                            ("rw", "", "rw"), ("", "", "")])
def test_merge_modes(old, new, merged):
    assert fp.merge_modes(old, new) == merged


# ------------------------------------------------------------------- injected procfs root
def _fake_proc(root, pid: int, fds: dict, flags: dict, exe="/usr/sbin/app", cwd="/srv"):
    base = root / str(pid)
    (base / "fd").mkdir(parents=True)
    (base / "fdinfo").mkdir()
    for fd, target in fds.items():
        os.symlink(target, base / "fd" / str(fd))
        if fd in flags:
            (base / "fdinfo" / str(fd)).write_text(f"pos:\t0\nflags:\t{flags[fd]:o}\nmnt_id:\t1\n")
    os.symlink(exe, base / "exe")
    os.symlink(cwd, base / "cwd")
    (base / "stat").write_text(f"{pid} (app) S 1 {pid} {pid} 0 -1\n")


def test_injected_root_records_files_sockets_and_process(tmp_path):
    _fake_proc(tmp_path, 4242, {0: "/dev/null", 3: "/etc/app.conf", 4: "/var/log/app.log",
                                5: "socket:[999]", 6: "pipe:[5]", 7: "/var/lib/app/db (deleted)"},
               {0: 0o2, 3: 0o100000, 4: 0o102001, 7: 0o100002})
    ctx = Context(roots=Roots(proc=str(tmp_path), sys=str(tmp_path), rootfs=str(tmp_path)))
    probe = fp.FdPollProbe()
    probe.start(ctx, [4242], follow_children=True, background=False)  # polls once
    obs = probe.drain()
    files = {o.path: o for o in obs if isinstance(o, fp.FdFile)}
    assert files["/etc/app.conf"].mode == "r"
    assert files["/var/log/app.log"].mode == "wa"
    assert files["/dev/null"].mode == "rw"
    assert files["/var/lib/app/db"].deleted and files["/var/lib/app/db"].mode == "rw"
    assert files["pipe:[5]"].kind == "pipe"
    assert [o.inode for o in obs if isinstance(o, fp.FdSocket)] == [999]
    (proc,) = [o for o in obs if isinstance(o, fp.FdProcess)]
    assert (proc.pid, proc.exe, proc.cwd) == (4242, "/usr/sbin/app", "/srv")
    # a second poll: nothing new to drain, last_seen moves on
    time.sleep(0.01)
    probe.poll_once()
    assert probe.drain() == []
    conf = [r for r in probe.records() if isinstance(r, fp.FdFile) and r.path == "/etc/app.conf"][0]
    assert conf.last_seen > conf.first_seen
    # the fd is reused for another open of the same file for writing: the mode grows, once
    os.remove(tmp_path / "4242" / "fd" / "3")
    os.symlink("/etc/app.conf", tmp_path / "4242" / "fd" / "8")
    (tmp_path / "4242" / "fdinfo" / "8").write_text("flags:\t01\n")
    probe.poll_once()
    (changed,) = probe.drain()
    assert (changed.path, changed.mode) == ("/etc/app.conf", "rw")
    assert ctx.coverage.gaps == []


def test_per_pid_cap_counts_what_was_dropped(tmp_path):
    _fake_proc(tmp_path, 7, {i: f"/data/f{i}" for i in range(10)}, {})
    ctx = Context(roots=Roots(proc=str(tmp_path)))
    probe = fp.FdPollProbe(max_per_pid=4, max_pids=1)
    probe.start(ctx, [7, 8, 9], follow_children=False, background=False)
    probe.poll_once()  # the same fds again are not counted twice
    assert len(probe.records()) == 4 + 1  # four files + the process record
    assert probe.dropped == 6 + 2  # six files, two pids
    assert probe.probe_run().lost_events == 8


def test_read_fd_table_of_a_missing_pid_is_vanished(tmp_path):
    with pytest.raises(Vanished):
        fp.read_fd_table(str(tmp_path), 123)


# ------------------------------------------------------------------------------------- live
CHILD = textwrap.dedent("""
    import os, socket, sys, time
    conf, log, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    c = open(conf)                      # read, kept open
    time.sleep(0.3)
    l = open(log, "a")                  # append
    s = socket.create_connection(("127.0.0.1", port))
    print(os.fstat(s.fileno()).st_ino, flush=True)
    sys.stdin.read()
""")


def test_live_files_modes_and_socket(tmp_path):
    conf, logf = tmp_path / "app.conf", tmp_path / "app.log"
    conf.write_text("key = value\n")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    ctx = Context()
    probe = fp.FdPollProbe()
    assert probe.check(ctx) is None
    child = None
    try:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(conf), str(logf), str(srv.getsockname()[1])],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        probe.start(ctx, [child.pid])
        inode = int(child.stdout.readline())
        t0 = time.monotonic()
        obs = []
        while time.monotonic() - t0 < 1.0:
            obs.extend(probe.drain())
            files = {o.path: o for o in obs if isinstance(o, fp.FdFile)}
            sockets = {o.inode for o in obs if isinstance(o, fp.FdSocket)}
            if str(logf) in files and inode in sockets:
                break
            time.sleep(0.02)
    finally:
        if child is not None:
            child.kill()
            child.wait()
        t = time.monotonic()
        probe.stop()
        stop_seconds = time.monotonic() - t
        srv.close()
    assert files[str(conf)].mode == "r"
    assert files[str(logf)].mode == "wa"
    assert files[str(conf)].first_seen < files[str(logf)].first_seen  # seen in different polls
    assert inode in sockets
    (proc,) = [o for o in obs if isinstance(o, fp.FdProcess)]
    assert proc.exe == os.path.realpath(sys.executable) and proc.cwd == os.getcwd()
    assert stop_seconds < 0.5
    run = probe.probe_run()
    assert (run.name, run.status, run.mode) == ("fdpoll", "ok", "fallback-polling")
    assert "between polls" in run.reason


def test_live_children_found_by_rescan(tmp_path):
    target = tmp_path / "child.dat"
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
            f"\"import sys, time; f = open({str(target)!r}, 'w'); print('x', flush=True); sys.stdin.read()\"], "
            "stdin=sys.stdin, stdout=sys.stdout); p.wait()")
    probe = fp.FdPollProbe(interval=0.05, rescan_seconds=0.1)
    parent = None
    try:
        parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        probe.start(Context(), [parent.pid], follow_children=True)
        parent.stdout.readline()
        deadline = time.monotonic() + 2.0
        found = []
        while time.monotonic() < deadline and not found:
            found = [o for o in probe.drain() if isinstance(o, fp.FdFile) and o.path == str(target)]
            time.sleep(0.05)
    finally:
        if parent is not None:
            parent.stdin.close()
            parent.wait(timeout=10)
        probe.stop()
    assert found and found[0].mode == "w" and found[0].pid != parent.pid


def test_live_processes_exiting_mid_poll_do_not_raise():
    ctx = Context()
    probe = fp.FdPollProbe(interval=0.01)
    procs = []
    try:
        procs = [subprocess.Popen(["/bin/sleep", f"0.{i:02d}"]) for i in range(1, 30, 2)]
        gone = subprocess.Popen(["/bin/true"])
        gone.wait()  # reaped before the first poll: a gap
        probe.start(ctx, [p.pid for p in procs] + [gone.pid], follow_children=False)
        for p in procs:
            p.wait(timeout=10)
        time.sleep(0.05)
        for _ in range(5):
            probe.poll_once()  # synchronous polls of all-dead pids too
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        probe.stop()
    assert probe.error == ""
    assert probe.vanished == len(procs) + 1
    assert any(g.kind == "vanished" and g.subject == f"pid {gone.pid}" for g in ctx.coverage.gaps)
    assert not any(g.subject == f"pid {procs[-1].pid}" for g in ctx.coverage.gaps)  # polled, then exited
    assert probe._active == set()


def test_unprivileged_check_gives_a_reason():
    res = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os
        os.setgid(65534); os.setuid(65534)
        from asbuilt.probes.base import Context
        from asbuilt.probes.fdpoll import FdPollProbe
        print(FdPollProbe().check(Context()))
    """)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "root" in res.stdout
