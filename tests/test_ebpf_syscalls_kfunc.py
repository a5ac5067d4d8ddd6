"""trace.syscalls (live) and trace.kfunc (real failure here; success path against a labelled fake)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from asbuilt.agent.errors import ProbeUnavailable
from asbuilt.probes.base import Context
from asbuilt.probes.ebpf.kfunc import (KfuncObservation, KfuncProbe, check_fentry, check_kprobes,
                                       parse_lockdown, programs)
from asbuilt.probes.ebpf.syscalls import (SyscallsProbe, parse_table, raw_tracepoint_supported, syscall_name,
                                          totals_by_pid)


# ------------------------------------------------------------------------------ pure
@pytest.mark.parametrize("nr,machine,name", [
    (0, "x86_64", "read"), (1, "x86_64", "write"), (56, "x86_64", "clone"), (59, "x86_64", "execve"),
    (257, "x86_64", "openat"), (435, "x86_64", "clone3"), (437, "x86_64", "openat2"),
    (56, "aarch64", "openat"), (220, "aarch64", "clone"), (221, "aarch64", "execve"),
    (64, "aarch64", "write"), (435, "arm64", "clone3"), (9999, "x86_64", "syscall_9999"),
    (1, "mips", "syscall_1"),
])
def test_syscall_name(nr, machine, name):
    assert syscall_name(nr, machine) == name


@pytest.mark.parametrize("text,table", [
    ("", {}), ("0:read 1:write", {0: "read", 1: "write"}), ("0:read junk 2: x:y 3:ok", {0: "read", 3: "ok"}),
])
def test_parse_table(text, table):
    assert parse_table(text) == table


@pytest.mark.parametrize("text,mode", [
    ("none [integrity] confidentiality\n", "integrity"), ("[none] integrity confidentiality", "none"),
    ("", ""), ("none integrity", ""),
])
def test_parse_lockdown(text, mode):
    assert parse_lockdown(text) == mode


def test_programs_rejects_bad_names():
    assert "KFUNC_PROBE(vfs_read)" in programs(["vfs_read"], "fentry")
    assert "int kfunc_count_1(struct pt_regs *ctx)" in programs(["a", "b"], "kprobe")
    with pytest.raises(ValueError):
        programs(["vfs_read); evil("], "kprobe")


# ------------------------------------------------------------------------------ live syscalls
WORKER = textwrap.dedent("""
    import os, sys, time
    go, rounds = sys.argv[1], int(sys.argv[2])
    deadline = time.time() + 20
    while not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.01)
    fd = os.open("/dev/null", os.O_WRONLY)
    for _ in range(rounds):
        os.write(fd, b"x")
    os.close(fd)
    pid = os.fork()
    if pid == 0:
        os.execv("/bin/true", ["true"])
    os.waitpid(pid, 0)
    time.sleep(float(sys.argv[3]))
""")


def _spawn(*args):
    return subprocess.Popen([sys.executable, "-c", WORKER, *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_live_syscall_counts(tmp_path):
    go = tmp_path / "go"
    worker = _spawn(go, 200, 0.5)
    outsider = _spawn(go, 300, 0)
    probe = SyscallsProbe()
    try:
        t0 = time.monotonic()
        probe.start(Context(), [worker.pid], follow_children=True)
        assert time.monotonic() - t0 < 5.0
        go.write_text("")
        outsider.wait(timeout=20)
        time.sleep(0.3)  # the worker has done its work and sleeps
        first = probe.drain()
        worker.wait(timeout=20)
        second = probe.drain()
    finally:
        probe.stop()
        for proc in (worker, outsider):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
    totals = totals_by_pid(first)
    assert outsider.pid not in totals
    mine = totals[worker.pid]
    assert 200 <= mine["write"] < 400
    assert mine.get("openat", 0) >= 1
    assert mine.get("clone", 0) + mine.get("clone3", 0) >= 1
    children = [pid for pid in totals if pid != worker.pid]
    assert len(children) == 1
    assert totals[children[0]].get("execve", 0) == 1
    assert totals[children[0]].get("exit_group", 0) == 1
    # second drain: only what happened since (the worker's exit), never the writes again
    again = totals_by_pid(second).get(worker.pid, {})
    assert again.get("write", 0) == 0 and again.get("exit_group", 0) == 1
    assert probe.lost_events == 0


HOT_WORKER = textwrap.dedent("""
    import os, sys, time
    go, out, seconds, child_writes = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    deadline = time.time() + 20
    while not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.01)
    fd = os.open("/dev/null", os.O_WRONLY)
    os.uname()  # rare syscalls, each once: must stay in the set
    os.getcwd()
    n, end = 0, time.time() + seconds
    while time.time() < end:  # write becomes hot within a drain or two
        for _ in range(1000):
            os.write(fd, b"x")
        n += 1000
    pid = os.fork()
    if pid == 0:  # a new process whose first write comes after write is hot
        for _ in range(child_writes):
            os.write(fd, b"y")
        os.sched_yield()  # not hot: counted exactly
        os._exit(0)
    os.waitpid(pid, 0)
    with open(out, "w") as fh:
        fh.write(str(n))
    time.sleep(0.8)
""")


def _hot_run(tmp_path, exact, seconds=2.0, child_writes=20000):
    go, out = tmp_path / "go", tmp_path / "count"
    worker = subprocess.Popen([sys.executable, "-c", HOT_WORKER, str(go), str(out), str(seconds), str(child_writes)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = SyscallsProbe(exact=exact)
    observations = []
    try:
        probe.start(Context(), [worker.pid], follow_children=True)
        go.write_text("")
        end = time.monotonic() + 30
        while worker.poll() is None and time.monotonic() < end:
            time.sleep(0.5)  # as asbuilt trace drains
            observations += probe.drain()
        observations += probe.stop()
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait(timeout=10)
    return worker, int(out.read_text()), probe, observations


def test_raw_tracepoint_detected_here():
    # kernel 6.18: BPF_PROG_TYPE_RAW_TRACEPOINT loads and opens on sys_enter
    assert raw_tracepoint_supported("sys_enter") is True
    assert raw_tracepoint_supported("no_such_tracepoint_asbuilt") is False


def test_live_hot_syscall_sampled_set_complete(tmp_path):
    worker, writes, probe, observations = _hot_run(tmp_path, exact=False)
    assert probe.mode == "raw_tracepoint+sampled"
    totals = totals_by_pid(observations)
    mine = totals[worker.pid]
    write_nr = next(o.nr for o in observations if o.name == "write")
    assert write_nr in probe.ever_hot and "write" in probe.note()
    assert any(o.sampled and o.name == "write" for o in observations)
    # the set: rare syscalls made once before and after write went hot are all there
    for name in ("uname", "getcwd", "openat", "wait4", "exit_group"):
        assert mine.get(name, 0) >= 1, name
    assert mine.get("clone", 0) + mine.get("clone3", 0) >= 1
    # counts of the hot syscall: an estimate, close to the exact count the worker kept
    assert writes > 50000
    assert 0.8 * writes <= mine["write"] <= 1.25 * writes + 2000, (mine["write"], writes)
    # the child's first write came after write was hot: seen, in the right order of magnitude
    children = [pid for pid in totals if pid != worker.pid]
    assert len(children) == 1
    theirs = totals[children[0]]
    assert 20000 / 3 <= theirs.get("write", 0) <= 20000 * 3, theirs
    assert theirs.get("sched_yield") == 1 and theirs.get("exit_group") == 1
    assert probe.lost_events == 0


def test_live_exact_mode_counts_every_call(tmp_path):
    worker, writes, probe, observations = _hot_run(tmp_path, exact=True, seconds=1.0, child_writes=3000)
    assert probe.mode == "raw_tracepoint" and not probe.ever_hot
    assert not any(o.sampled for o in observations)
    totals = totals_by_pid(observations)
    # exact: the worker's loop writes, and one more: the file it reports the count in
    assert totals[worker.pid]["write"] == writes + 1
    child = [pid for pid in totals if pid != worker.pid][0]
    assert totals[child]["write"] == 3000
    assert "every call counted" in probe.note()


def test_live_tracepoint_form_still_works(tmp_path):
    go = tmp_path / "go"
    worker = _spawn(go, 300, 0.3)
    probe = SyscallsProbe(attach="tracepoint")
    try:
        probe.start(Context(), [worker.pid], follow_children=False)
        go.write_text("")
        worker.wait(timeout=20)
        observations = probe.stop()
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait(timeout=10)
    assert probe.mode == "tracepoint+sampled"
    assert 300 <= totals_by_pid(observations)[worker.pid]["write"] < 500


# ------------------------------------------------------------------------------ kfunc, for real
def test_kfunc_real_failure_is_one_line():
    for reason, prefix in ((check_kprobes(), "kprobes unavailable: "), (check_fentry(), "fentry unavailable: ")):
        # this machine cannot run either (see the preamble); the check must say why, in one line
        assert reason is not None and reason.startswith(prefix) and "\n" not in reason
    probe = KfuncProbe()
    reason = probe.check(Context())
    assert reason and "kprobes unavailable" in reason and "fentry unavailable" in reason
    with pytest.raises(ProbeUnavailable):
        probe.start(Context(), [1])


# ------------------------------------------------------------------------------ kfunc, FAKE bcc
class _FakeValue:
    def __init__(self, value):
        self.value = value


class _FakeKey:
    def __init__(self, tgid, idx):
        self.tgid, self.idx = tgid, idx


class FakeBPF:
    """FAKE bcc BPF object: this machine cannot attach kprobes or fentry, so the success path of
    KfuncProbe is exercised against this stand-in. It records what it was asked to do."""

    kfunc_ok = False
    instances: list = []

    def __init__(self, text):
        self.text = text.decode() if isinstance(text, bytes) else text
        self.kprobes = []
        self.tables = {b"traced": {}, b"kfunc_counts": {}}
        FakeBPF.instances.append(self)

    @classmethod
    def support_kfunc(cls):
        return cls.kfunc_ok

    def attach_kprobe(self, event, fn_name):
        self.kprobes.append((event.decode(), fn_name.decode()))

    def detach_kprobe(self, event):
        pass

    def perf_buffer_poll(self, timeout=0):
        pass

    def cleanup(self):
        pass

    def __getitem__(self, name):
        table = self.tables[name]
        if name == b"traced":
            return _FakeTraced(table)
        return _FakeCounts(table)


class _FakeTraced:
    def __init__(self, store):
        self.store = store

    def __setitem__(self, key, value):
        self.store[key.value] = value.value

    def items(self):
        return [(_FakeValue(k), _FakeValue(v)) for k, v in self.store.items()]


class _FakeCounts:
    def __init__(self, store):
        self.store = store

    def items(self):
        return [(_FakeKey(*k), v) for k, v in self.store.items()]


@pytest.fixture
def fake_bpf():
    FakeBPF.instances = []
    FakeBPF.kfunc_ok = False
    yield FakeBPF
    FakeBPF.instances = []


def test_kfunc_kprobe_success_path_with_fake_bcc(fake_bpf):
    probe = KfuncProbe(functions=["vfs_read", "tcp_sendmsg"], bpf_cls=fake_bpf)
    assert probe.check(Context()) is None and probe.mode == "kprobe"
    probe.start(Context(), [4242], follow_children=True)
    bpf = fake_bpf.instances[-1]
    assert "int kfunc_count_1(struct pt_regs *ctx)" in bpf.text and "BPF_HASH(traced" in bpf.text
    assert bpf.kprobes == [("vfs_read", "kfunc_count_0"), ("tcp_sendmsg", "kfunc_count_1")]
    assert bpf.tables[b"traced"][4242] >= 0
    bpf.tables[b"kfunc_counts"][(4242, 0)] = [3, 4]  # per-CPU values
    bpf.tables[b"kfunc_counts"][(4242, 1)] = [1, 0]
    assert probe.drain() == [KfuncObservation(4242, "tcp_sendmsg", 1), KfuncObservation(4242, "vfs_read", 7)]
    bpf.tables[b"kfunc_counts"][(4242, 0)] = [5, 4]
    assert probe.drain() == [KfuncObservation(4242, "vfs_read", 2)]
    probe.stop()


def test_kfunc_fentry_preferred_with_fake_bcc(fake_bpf):
    fake_bpf.kfunc_ok = True
    probe = KfuncProbe(functions=["vfs_write"], bpf_cls=fake_bpf)
    assert probe.check(Context()) is None and probe.mode == "fentry"
    probe.start(Context(), [4242])
    bpf = fake_bpf.instances[-1]
    assert "KFUNC_PROBE(vfs_write) { return kfunc_count(0); }" in bpf.text and bpf.kprobes == []
    probe.stop()
