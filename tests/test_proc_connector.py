"""Proc connector: parser tables on constructed bytes, and live runs against real process trees."""
from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from asbuilt.probes import proc_connector as pc
from asbuilt.probes.base import Context


# ------------------------------------------------------------------ message builders (tests only)
def nlmsg(payload: bytes, mtype: int = pc.NLMSG_DONE) -> bytes:
    msg = struct.pack("=IHHII", 16 + len(payload), mtype, 0, 0, 0) + payload
    return msg + b"\0" * (-len(msg) % 4)


def cn(data: bytes, idx: int = 1, val: int = 1, seq: int = 0, ack: int = 0, dlen=None) -> bytes:
    return struct.pack("=IIIIHH", idx, val, seq, ack, len(data) if dlen is None else dlen, 0) + data


def ev(what: int, body: bytes, cpu: int = 1, ts: int = 123456789) -> bytes:
    return struct.pack("=IIQ", what, cpu, ts) + body


def msg(what: int, body: bytes, **kw) -> bytes:
    return nlmsg(cn(ev(what, body), **kw))


FORK = msg(pc.PROC_EVENT_FORK, struct.pack("=iiii", 10, 10, 11, 11))
EXEC = msg(pc.PROC_EVENT_EXEC, struct.pack("=ii", 11, 11))
EXIT = msg(pc.PROC_EVENT_EXIT, struct.pack("=iiIIii", 11, 11, 3 << 8, 17, 10, 10))


# ------------------------------------------------------------------------------ parser tables
PARSE_CASES = [
    ("empty", b"", [], (0, 0, 0)),
    ("fork", FORK, [pc.ForkEvent(1, 123456789, 10, 10, 11, 11)], (1, 0, 0)),
    ("thread fork", msg(pc.PROC_EVENT_FORK, struct.pack("=iiii", 1, 1, 12, 10)),
     [pc.ForkEvent(1, 123456789, 1, 1, 12, 10)], (1, 0, 0)),
    ("exec", EXEC, [pc.ExecEvent(1, 123456789, 11, 11)], (1, 0, 0)),
    ("uid", msg(pc.PROC_EVENT_UID, struct.pack("=iiII", 5, 5, 0, 1000)),
     [pc.UidEvent(1, 123456789, 5, 5, 0, 1000)], (1, 0, 0)),
    ("gid", msg(pc.PROC_EVENT_GID, struct.pack("=iiII", 5, 5, 100, 100)),
     [pc.GidEvent(1, 123456789, 5, 5, 100, 100)], (1, 0, 0)),
    ("comm", msg(pc.PROC_EVENT_COMM, struct.pack("=ii16s", 5, 6, b"worker")),
     [pc.CommEvent(1, 123456789, 5, 6, "worker")], (1, 0, 0)),
    ("comm 16 bytes, no NUL", msg(pc.PROC_EVENT_COMM, struct.pack("=ii16s", 5, 5, b"abcdefghijklmnop")),
     [pc.CommEvent(1, 123456789, 5, 5, "abcdefghijklmnop")], (1, 0, 0)),
    ("exit", EXIT, [pc.ExitEvent(1, 123456789, 11, 11, 3 << 8, 17, 10, 10)], (1, 0, 0)),
    ("exit, old kernel layout (no parent)", msg(pc.PROC_EVENT_EXIT, struct.pack("=iiII", 7, 7, 9, 17)),
     [pc.ExitEvent(1, 123456789, 7, 7, 9, 17, 0, 0)], (1, 0, 0)),
    ("ack", msg(pc.PROC_EVENT_NONE, struct.pack("=I", 0), seq=5, ack=8),
     [pc.AckEvent(1, 123456789, 0, 5, 8)], (1, 0, 0)),
    ("sid", msg(pc.PROC_EVENT_SID, struct.pack("=ii", 4, 4)),
     [pc.OtherEvent(1, 123456789, pc.PROC_EVENT_SID, 4, 4)], (1, 0, 0)),
    ("coredump", msg(pc.PROC_EVENT_COREDUMP, struct.pack("=iiii", 4, 4, 1, 1)),
     [pc.OtherEvent(1, 123456789, pc.PROC_EVENT_COREDUMP, 4, 4)], (1, 0, 0)),
    ("unknown kind, empty body", msg(0x400, b""), [pc.OtherEvent(1, 123456789, 0x400, 0, 0)], (1, 0, 0)),
    ("three in one datagram", FORK + EXEC + EXIT,
     [pc.ForkEvent(1, 123456789, 10, 10, 11, 11), pc.ExecEvent(1, 123456789, 11, 11),
      pc.ExitEvent(1, 123456789, 11, 11, 3 << 8, 17, 10, 10)], (3, 0, 0)),
    # malformed: skipped and counted, never a traceback
    ("nlmsghdr truncated", FORK[:10], [], (0, 1, 0)),
    ("nlmsg_len past the end", FORK[:-4], [], (0, 1, 0)),
    ("nlmsg_len below header", struct.pack("=IHHII", 8, 3, 0, 0, 0), [], (0, 1, 0)),
    ("valid then trailing junk", FORK + b"\x01\x02", [pc.ForkEvent(1, 123456789, 10, 10, 11, 11)], (1, 1, 0)),
    ("cn_msg truncated", nlmsg(b"\x01\0\0\0\x01\0\0\0"), [], (1, 1, 0)),
    ("cn len past the payload", nlmsg(cn(ev(pc.PROC_EVENT_EXEC, struct.pack("=ii", 1, 1)), dlen=200)),
     [], (1, 1, 0)),
    ("proc_event header truncated", nlmsg(cn(b"\x02\0\0\0\0\0\0\0")), [], (1, 1, 0)),
    ("fork body truncated, next still parsed",
     nlmsg(cn(ev(pc.PROC_EVENT_FORK, struct.pack("=ii", 1, 1)))) + EXEC,
     [pc.ExecEvent(1, 123456789, 11, 11)], (2, 1, 0)),
    ("exit body truncated", msg(pc.PROC_EVENT_EXIT, struct.pack("=ii", 1, 1)), [], (1, 1, 0)),
    ("comm body truncated", msg(pc.PROC_EVENT_COMM, struct.pack("=ii", 1, 1) + b"ab"), [], (1, 1, 0)),
    ("ack body missing", msg(pc.PROC_EVENT_NONE, b""), [], (1, 1, 0)),
    # not ours: ignored, not malformed
    ("other connector user", nlmsg(cn(ev(pc.PROC_EVENT_EXEC, struct.pack("=ii", 1, 1)), idx=7, val=1)),
     [], (1, 0, 1)),
    ("netlink error message", nlmsg(struct.pack("=i", -1) + b"\0" * 16, mtype=pc.NLMSG_ERROR), [], (0, 0, 1)),
    ("noop then exec", nlmsg(b"", mtype=pc.NLMSG_NOOP) + EXEC, [pc.ExecEvent(1, 123456789, 11, 11)], (1, 0, 1)),
]


@pytest.mark.parametrize("name,buf,expected,counts", PARSE_CASES, ids=[c[0] for c in PARSE_CASES])
def test_parse_events(name, buf, expected, counts):
    stats = pc.ParseStats()
    assert pc.parse_events(buf, stats) == expected
    assert (stats.messages, stats.malformed, stats.ignored) == counts


def test_parse_events_without_stats_and_from_bytearray():
    assert pc.parse_events(bytearray(FORK + EXEC)) == [pc.ForkEvent(1, 123456789, 10, 10, 11, 11),
                                                      pc.ExecEvent(1, 123456789, 11, 11)]


def test_parse_events_never_raises_on_garbage():
    rnd = random.Random(1234)
    good = FORK + EXEC + EXIT
    for _ in range(3000):
        if rnd.random() < 0.5:
            buf = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 120)))
        else:  # flip bytes of a valid datagram, or cut it
            raw = bytearray(good)
            for _ in range(rnd.randrange(1, 6)):
                raw[rnd.randrange(len(raw))] = rnd.getrandbits(8)
            buf = bytes(raw[: rnd.randrange(0, len(raw) + 1)])
        stats = pc.ParseStats()
        events = pc.parse_events(buf, stats)
        assert isinstance(events, list)
        assert all(isinstance(e, pc.Event) for e in events)


EXIT_STATUS_CASES = [
    ("exit 0", 0, 0, None),
    ("exit 3", 3 << 8, 3, None),
    ("exit 255", 255 << 8, 255, None),
    ("SIGKILL", 9, None, 9),
    ("SIGSEGV with core", 0x80 | 11, None, 11),
]


@pytest.mark.parametrize("name,raw,code,sig", EXIT_STATUS_CASES, ids=[c[0] for c in EXIT_STATUS_CASES])
def test_exit_status_decoding(name, raw, code, sig):
    e = pc.ExitEvent(0, 0, 1, 1, raw, 17)
    assert (e.code, e.signal) == (code, sig)


def test_mcast_message_layout():
    raw = pc.build_mcast_message(pc.PROC_CN_MCAST_LISTEN, seq=7, ack=9, port=42)
    assert len(raw) == 16 + 20 + 4
    assert struct.unpack_from("=IHHII", raw, 0) == (40, pc.NLMSG_DONE, 0, 7, 42)
    assert struct.unpack_from("=IIIIHH", raw, 16) == (1, 1, 7, 9, 4, 0)
    assert struct.unpack_from("=I", raw, 36) == (pc.PROC_CN_MCAST_LISTEN,)


STAT_CASES = [
    ("plain", "123 (bash) S 45 123 123 0 -1", 45),
    ("comm with spaces and parens", "9 (a) (b c)) R 1 9 9 0", 1),
    ("kernel thread", "2 (kthreadd) S 0 0 0 0", 0),
]


@pytest.mark.parametrize("name,text,ppid", STAT_CASES, ids=[c[0] for c in STAT_CASES])
def test_parse_stat_ppid(name, text, ppid):
    assert pc.parse_stat_ppid(text) == ppid


@pytest.mark.parametrize("text", ["", "123 (bash", "123 (bash) S", "123 (bash) S x"])
def test_parse_stat_ppid_malformed(text):
    with pytest.raises(ValueError):
        pc.parse_stat_ppid(text)


@pytest.mark.parametrize("raw,argv", [
    (b"", []), (b"\0", [""]), (b"/bin/sleep\x000.1\0", ["/bin/sleep", "0.1"]),
    (b"nginx: master process", ["nginx: master process"]), (b"a\0\0b\0", ["a", "", "b"]),
    (b"\xff\0", ["\udcff"]),
])
def test_parse_cmdline(raw, argv):
    assert pc.parse_cmdline(raw) == argv


def test_descendants():
    """The traced tree the connector seeds: roots plus descendants (probes/procfs/pids.py)."""
    from asbuilt.probes.procfs.pids import descendants

    def tree(ppids, roots):
        return set(roots) | set(descendants(ppids, roots))

    ppids = {1: 0, 10: 1, 11: 10, 12: 11, 13: 10, 20: 1, 21: 20}
    assert tree(ppids, [10]) == {10, 11, 12, 13}
    assert tree(ppids, [21]) == {21}
    assert tree(ppids, [99]) == {99}
    assert tree({5: 6, 6: 5}, [5]) == {5, 6}  # a cycle (pid reuse mid-scan) terminates


def test_to_execs_attaches_exit_codes():
    obs = [pc.ProcFork(5, 1, 1.0), pc.ProcExec(5, 1, "/usr/bin/true", ["true"], 1.1),
           pc.ProcExit(5, 1, 0, None, 1.2),
           pc.ProcExec(6, 1, "", [], 1.3, comm="sh", complete=False), pc.ProcExit(6, 1, None, 9, 1.4),
           pc.ProcExit(7, 1, 1, None, 1.5)]
    execs = pc.to_execs(obs)
    assert [(e.pid, e.path, e.argv, e.exit_code) for e in execs] == [
        (5, "/usr/bin/true", ["true"], 0), (6, "sh", [], -9)]


# ------------------------------------------------------------------------------------- live
def _drain_until(probe, done, timeout=5.0):
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out.extend(probe.drain())
        if done(out):
            break
        time.sleep(0.02)
    return out


def _stop_timed(probe) -> float:
    t = time.monotonic()
    probe.stop()
    return time.monotonic() - t


def _kill(*procs):
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


SCRIPT = "read x; /bin/true; /bin/sleep 0.1; sh -c 'exit 3'; sh -c 'kill -9 $$'; exit 0"


def test_check_ok_as_root():
    assert pc.ProcConnectorProbe().check(Context()) is None


def test_live_tree_follow_children():
    ctx = Context()
    probe = pc.ProcConnectorProbe()
    bash = other = None
    try:
        bash = subprocess.Popen(["bash", "-c", SCRIPT], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
        probe.start(ctx, [bash.pid], follow_children=True)
        assert bash.pid in probe.traced()
        other = subprocess.Popen(["/bin/sleep", "0.1"])  # unrelated, started at the same time
        bash.stdin.write(b"go\n")
        bash.stdin.close()
        assert bash.wait(timeout=10) == 0
        other.wait(timeout=10)
        obs = _drain_until(probe, lambda o: any(isinstance(x, pc.ProcExit) and x.pid == bash.pid for x in o))
    finally:
        _kill(bash, other)
        elapsed = _stop_timed(probe)
    assert elapsed < 0.5
    pids = {o.pid for o in obs}
    assert other.pid not in pids, "an unrelated process must not be reported"
    assert all(o.pid == bash.pid or o.ppid == bash.pid for o in obs)
    forks = [o.pid for o in obs if isinstance(o, pc.ProcFork) and o.ppid == bash.pid]
    assert len(forks) == 4
    t_pid, s_pid, e_pid, k_pid = forks
    execs = {o.pid: o for o in obs if isinstance(o, pc.ProcExec)}
    exits = {o.pid: o for o in obs if isinstance(o, pc.ProcExit)}
    # /bin/true may be gone before its /proc entry is read: then it is marked, and a gap recorded
    t = execs[t_pid]
    if t.complete:
        assert (os.path.basename(t.path), t.argv) == ("true", ["/bin/true"])
    else:
        assert t.path == "" and t.comm in ("", "true")
        assert any(g.subject == f"pid {t_pid}" for g in ctx.coverage.gaps)
    s = execs[s_pid]
    assert s.complete and s.path == os.path.realpath("/bin/sleep") and s.argv == ["/bin/sleep", "0.1"]
    assert s.ppid == bash.pid
    assert abs(s.time - time.time()) < 10
    assert e_pid in execs and k_pid in execs
    assert (exits[t_pid].exit_code, exits[s_pid].exit_code) == (0, 0)
    assert (exits[e_pid].exit_code, exits[e_pid].signal) == (3, None)
    assert (exits[k_pid].exit_code, exits[k_pid].signal) == (None, 9)
    assert exits[bash.pid].exit_code == 0
    assert exits[s_pid].time >= s.time + 0.05  # it slept 0.1 s
    assert not (probe.traced() & {t_pid, s_pid, e_pid, k_pid, bash.pid})  # exited pids leave the set
    run = probe.probe_run()
    assert (run.name, run.status, run.mode, run.lost_events) == ("proc_connector", "ok", "proc-connector", 0)
    assert run.items >= 13


def test_live_no_follow_reports_only_the_target():
    probe = pc.ProcConnectorProbe()
    bash = None
    try:
        bash = subprocess.Popen(["bash", "-c", "read x; /bin/true; sh -c 'exit 4'; exec /bin/sleep 0.05"],
                                stdin=subprocess.PIPE)
        probe.start(Context(), [bash.pid], follow_children=False)
        bash.stdin.write(b"go\n")
        bash.stdin.close()
        bash.wait(timeout=10)
        obs = _drain_until(probe, lambda o: any(isinstance(x, pc.ProcExit) for x in o))
    finally:
        _kill(bash)
        probe.stop()
    assert {o.pid for o in obs} == {bash.pid}
    assert not any(isinstance(o, pc.ProcFork) for o in obs)
    execs = [o for o in obs if isinstance(o, pc.ProcExec)]
    assert execs and execs[-1].argv == ["/bin/sleep", "0.05"]  # the target's own exec is seen
    assert [o.exit_code for o in obs if isinstance(o, pc.ProcExit)] == [0]


def test_live_existing_descendants_are_traced():
    probe = pc.ProcConnectorProbe()
    bash = None
    try:
        bash = subprocess.Popen(["bash", "-c", "/bin/sleep 30 & echo $!; read x; kill $!; wait"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        child = int(bash.stdout.readline())
        probe.start(Context(), [bash.pid], follow_children=True)
        assert {bash.pid, child} <= probe.traced()
        bash.stdin.write(b"go\n")
        bash.stdin.close()
        bash.wait(timeout=10)
        obs = _drain_until(probe, lambda o: {x.pid for x in o if isinstance(x, pc.ProcExit)} >= {child, bash.pid})
    finally:
        _kill(bash)
        probe.stop()
    exits = {o.pid: o for o in obs if isinstance(o, pc.ProcExit)}
    assert exits[child].signal == 15 and exits[child].ppid == bash.pid


def test_stop_is_prompt_when_idle_and_idempotent():
    probe = pc.ProcConnectorProbe()
    probe.start(Context(), [os.getpid()], follow_children=False)
    time.sleep(0.3)
    assert _stop_timed(probe) < 0.5
    probe.stop()
    assert isinstance(probe.drain(), list)  # drain after stop never raises


def _run_python(code: str, *prefix: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH="")
    return subprocess.run(list(prefix) + [sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=30, env=env)


def test_unprivileged_check_gives_a_reason():
    # (kernels since 6.6 let unprivileged sockets subscribe; reading other users' /proc/PID/exe
    # still needs root, so the probe asks for it either way)
    res = _run_python("""
        import os
        os.setgid(65534); os.setuid(65534)
        from asbuilt.probes.base import Context
        from asbuilt.probes.proc_connector import ProcConnectorProbe
        print(ProcConnectorProbe().check(Context()))
    """)
    assert res.returncode == 0, res.stderr
    assert "root" in res.stdout


def test_other_pid_namespace_gets_no_subscription():
    res = _run_python("""
        from asbuilt.probes.base import Context
        from asbuilt.probes.proc_connector import ProcConnectorProbe
        print(ProcConnectorProbe().check(Context()))
    """, "unshare", "--pid", "--fork", "--mount-proc")
    assert res.returncode == 0, res.stderr
    assert "acknowledge" in res.stdout
