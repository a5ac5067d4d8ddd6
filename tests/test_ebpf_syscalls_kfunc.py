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
from asbuilt.probes.ebpf.syscalls import SyscallsProbe, parse_table, syscall_name, totals_by_pid


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
