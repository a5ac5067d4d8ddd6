"""Live tests of the procfs readers as root, against real processes this test starts (and kills)."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from asbuilt.agent.errors import Vanished
from asbuilt.probes.procfs import fd as fdmod
from asbuilt.probes.procfs.cgroup import read_cgroup
from asbuilt.probes.procfs.links import parse_ns_inode, read_exe
from asbuilt.probes.procfs.pids import list_pids
from asbuilt.probes.procfs.process import read_process
from asbuilt.probes.procfs.stat import read_stat

pytestmark = pytest.mark.live
PROC = "/proc"

CHILD = r"""
import os, socket, sys, time
os.chdir(sys.argv[1])
log = open("app.log", "a")
log.write("started\n"); log.flush()
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.bind(("127.0.0.1", 0)); srv.listen(8)
extra = [os.open("/dev/null", os.O_RDONLY) for _ in range(int(sys.argv[2]))]
print(os.fstat(srv.fileno()).st_ino, log.fileno(), srv.getsockname()[1], flush=True)
time.sleep(120)
"""


def _start(tmp_path, extra_fds=0):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ASBUILT_TEST_VAR": "a=b c", "LANG": "C.UTF-8"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(extra_fds)], env=env,
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().split()
    assert line, "child did not start"
    return proc, int(line[0]), int(line[1])


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


@pytest.fixture
def child(tmp_path):
    proc, sock_inode, log_fd = _start(tmp_path)
    try:
        yield proc, sock_inode, log_fd, tmp_path
    finally:
        _stop(proc)


def test_read_process_finds_everything(child):
    proc, sock_inode, log_fd, tmp = child
    assert proc.pid in list_pids(PROC)
    info = read_process(PROC, proc.pid)
    assert info.denied == [] and info.missing == []
    assert info.exe == os.path.realpath(sys.executable) and not info.exe_deleted
    assert info.cmdline[:2] == [sys.executable, "-c"] and info.cmdline[-2:] == [str(tmp), "0"]
    assert info.cwd == str(tmp) and info.root == "/"
    assert info.environ["ASBUILT_TEST_VAR"] == "a=b c"
    assert info.stat.ppid == os.getpid() and info.status.ppid == os.getpid()
    assert info.status.uid == 0 and info.status.threads == 1 and info.status.rss_bytes > 0
    assert info.stat.starttime_ticks > 0 and not info.kernel_thread and info.name.startswith("python")
    assert info.netns == parse_ns_inode(os.readlink("/proc/self/ns/net")) != 0

    by_fd = {e.fd: e for e in info.fds}
    log = by_fd[log_fd]
    assert log.kind == fdmod.PATH and log.path == str(tmp / "app.log")
    assert log.flags is not None and fdmod.is_append(log.flags) and fdmod.can_write(log.flags)
    assert fdmod.mode(log.flags) == "wa" and log.pos == len("started\n")
    sockets = [e for e in info.fds if e.kind == fdmod.SOCKET]
    assert [e.inode for e in sockets] == [sock_inode]
    assert sockets[0].flags is None  # fdinfo is only read for regular files
    direct = fdmod.read_fdinfo(PROC, proc.pid, log_fd)
    assert direct.flags == log.flags and direct.mnt_id > 0

    assert any(os.path.basename(lib.path) == "libc.so.6" for lib in info.libraries)
    assert any(f.path == info.exe for f in info.mapped_files)
    assert not any(lib.path in ("[heap]", "[stack]", "[vdso]") for lib in info.libraries + info.mapped_files)
    assert info.cgroup.startswith("/") and info.cgroup == read_cgroup(PROC, os.getpid())
    limits = {lim.name: lim for lim in info.limits}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert limits["Max open files"] == (("Max open files", str(soft), str(hard), "files"))
    assert len(info.limits) >= 16


def test_parts_can_be_left_out(child):
    proc = child[0]
    info = read_process(PROC, proc.pid, with_maps=False, with_fds=False, with_environ=False)
    assert info.fds == [] and info.libraries == [] and info.environ == {} and info.exe


def test_kernel_thread():
    kthreads = []
    for pid in list_pids(PROC):
        try:
            if read_stat(PROC, pid).kernel_thread:
                kthreads.append(pid)
        except Vanished:
            continue
    assert kthreads
    info = read_process(PROC, kthreads[0])
    assert info.kernel_thread and info.exe == "" and info.cmdline == [] and info.fds == []
    assert info.denied == [] and info.missing == [] and info.status.rss_bytes is None


def test_deleted_executable(tmp_path):
    copy = tmp_path / "mysleep"
    shutil.copy2("/usr/bin/sleep", copy)
    proc = subprocess.Popen([str(copy), "60"])
    try:
        for _ in range(500):  # until the exec has happened and sleep is sleeping (maps complete)
            if read_exe(PROC, proc.pid).path == str(copy) and read_stat(PROC, proc.pid).state == "S":
                break
            time.sleep(0.01)
        copy.unlink()
        info = read_process(PROC, proc.pid)
        assert info.exe == str(copy) and info.exe_deleted
        assert any(f.path == str(copy) and f.deleted for f in info.mapped_files)
    finally:
        _stop(proc)


def test_reaped_process_vanishes(tmp_path):
    proc, _, _ = _start(tmp_path)
    pid = proc.pid
    _stop(proc)
    with pytest.raises(Vanished):
        read_process(PROC, pid)


def test_process_exiting_mid_scan_vanishes(tmp_path):
    proc, _, _ = _start(tmp_path, extra_fds=12000)  # 12,000 regular-file fds: a long fd phase
    try:
        started = time.monotonic()
        read_process(PROC, proc.pid)
        full = time.monotonic() - started
        delay = full / 4
        assert delay > 0.01, f"a full read took only {full:.3f}s: no window to kill in"
        outcome = {}

        def scan():
            outcome["start"] = time.monotonic()
            try:
                outcome["info"] = read_process(PROC, proc.pid)
            except Vanished as err:
                outcome["vanished"] = err
            outcome["end"] = time.monotonic()

        thread = threading.Thread(target=scan)
        thread.start()
        time.sleep(delay)
        killed = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait()  # reaped: /proc/PID is gone
        thread.join(30)
        assert "vanished" in outcome, "read_process returned a process that had exited"
        assert outcome["start"] < killed < outcome["end"]
    finally:
        _stop(proc)


def _fake_proc(root, pid, starttime):
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    (root / str(pid) / "stat").write_text(f"{pid} (fake) S 1 {pid} {pid} 0 -1 4194304 0 0 0 0 5 6 0 0 20 0 1 0 "
                                          f"{starttime} 1000 10 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n")


def test_pid_reuse_during_read_vanishes(tmp_path):
    """A captured-style tree whose cmdline is a FIFO: while read_process waits on it, the pid is
    "reused" (stat rewritten with another starttime), so the final re-check must raise Vanished."""
    pid = 4242
    _fake_proc(tmp_path, pid, 100)
    fifo = tmp_path / str(pid) / "cmdline"
    os.mkfifo(fifo)

    def reuse():
        fd = os.open(fifo, os.O_WRONLY)  # returns once read_process opened the cmdline
        _fake_proc(tmp_path, pid, 200)
        os.write(fd, b"prog\0")
        os.close(fd)

    writer = threading.Thread(target=reuse)
    writer.start()
    try:
        with pytest.raises(Vanished):
            read_process(str(tmp_path), pid)
    finally:
        writer.join(10)


def test_parts_gone_while_process_lives_are_missing(tmp_path):
    pid = 4243
    _fake_proc(tmp_path, pid, 100)
    (tmp_path / str(pid) / "cmdline").write_bytes(b"prog\0-x\0")
    info = read_process(str(tmp_path), pid)
    assert info.cmdline == ["prog", "-x"] and info.name == "fake" and info.denied == []
    assert info.missing == ["status", "exe", "cwd", "root", "netns", "environ", "cgroup", "limits", "maps",
                            "fds"]


NOBODY = r"""
import json, os, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
from asbuilt.probes.procfs.process import read_process
info = read_process("/proc", int(sys.argv[1]))
print(json.dumps({"denied": info.denied, "missing": info.missing, "name": info.name, "uid": info.status.uid,
                  "cmdline": info.cmdline, "environ": info.environ, "cgroup": info.cgroup,
                  "limits": len(info.limits)}))
"""


def test_non_root_read_of_root_process_records_denied():
    out = subprocess.run([sys.executable, "-c", NOBODY, str(os.getpid())], capture_output=True, text=True,
                         timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert "environ" in got["denied"] and got["environ"] == {}
    assert set(got["denied"]) >= {"environ", "exe", "cwd", "root", "netns", "maps", "fds"}
    assert got["missing"] == []
    # what is world-readable was still read: the scan went on
    assert got["uid"] == 0 and got["cmdline"] and got["cgroup"].startswith("/") and got["limits"] >= 16


MODES_CHILD = r"""
import os, sys, time
d = sys.argv[1]
fds = {"r": os.open(d + "/r", os.O_RDONLY), "w": os.open(d + "/w", os.O_WRONLY),
       "rw": os.open(d + "/rw", os.O_RDWR), "wa": os.open(d + "/wa", os.O_WRONLY | os.O_APPEND),
       "rwa": os.open(d + "/rwa", os.O_RDWR | os.O_APPEND), "path": os.open(d + "/path", os.O_PATH)}
print(" ".join(f"{k}={v}" for k, v in fds.items()), flush=True)
time.sleep(60)
"""


def test_access_modes_from_fd_link_bits_match_fdinfo(tmp_path):
    """Read-only descriptors take their mode from the fd link's permission bits (no fdinfo read);
    the others from fdinfo: every mode comes out as fdinfo's flags say."""
    for name in ("r", "w", "rw", "wa", "rwa", "path"):
        (tmp_path / name).write_text("x\n")
    proc = subprocess.Popen([sys.executable, "-c", MODES_CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        fds = dict((k, int(v)) for k, v in (kv.split("=") for kv in proc.stdout.readline().split()))
        info = read_process(PROC, proc.pid)
        by_fd = {e.fd: e for e in info.fds}
        for name, fd in fds.items():
            want = fdmod.read_fdinfo(PROC, proc.pid, fd).flags
            got = by_fd[fd].flags
            assert fdmod.mode(got) == fdmod.mode(want), name
            if name != "path":
                assert fdmod.mode(got) == name
        assert by_fd[fds["r"]].pos is None  # taken from the link's mode: fdinfo not read
        assert by_fd[fds["wa"]].pos == 0 and by_fd[fds["path"]].flags == fdmod.read_fdinfo(PROC, proc.pid, fds["path"]).flags
    finally:
        _stop(proc)
