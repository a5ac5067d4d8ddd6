"""The compile child and the bcc-free BPF object: real programs, real maps, real perf rings."""
import ctypes
import os
import subprocess
import sys

import pytest

from asbuilt.agent.errors import ProbeUnavailable
from asbuilt.probes.ebpf import bpfsys, loader
from asbuilt.probes.ebpf.bpfobject import ChildError, compile_object

PROGRAM = r"""
struct ev { u32 pid; u32 n; char comm[16]; };
BPF_HASH(seen, u32, u64, 64);
BPF_PERCPU_ARRAY(calls, u64, 1);
BPF_PERF_OUTPUT(events);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    u32 pid = bpf_get_current_pid_tgid() >> 32;
    if (pid != TARGET) return 0;
    u64 zero = 0, *count = seen.lookup_or_try_init(&pid, &zero);
    if (count) __sync_fetch_and_add(count, 1);
    int idx = 0;
    u64 *c = calls.lookup(&idx);
    if (c) *c += 1;
    struct ev e = {.pid = pid, .n = count ? (u32)*count : 0};
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    events.perf_submit(args, &e, sizeof(e));
    return 0;
}
"""


@pytest.fixture
def obj():
    o = compile_object(PROGRAM.replace("TARGET", str(os.getpid())))
    yield o
    o.cleanup()


def test_maps_rings_and_tracepoint_without_bcc_in_this_process(obj):
    got = []
    obj[b"events"].open_perf_buffer(lambda cpu, data, size: got.append(obj[b"events"].event(data)),
                                    page_cnt=8)
    for _ in range(3):
        os.getppid()
    obj.perf_buffer_poll(timeout=100)
    assert [e.n for e in got] == [1, 2, 3]
    assert all(e.pid == os.getpid() for e in got)
    seen = obj[b"seen"]
    assert seen[seen.Key(os.getpid())].value == 3
    assert [(k.value, v.value) for k, v in seen.items()] == [(os.getpid(), 3)]
    assert [(k.value, v.value) for k, v in seen.items_lookup_batch()] == [(os.getpid(), 3)]
    assert sum(obj[b"calls"][ctypes.c_int(0)]) == 3  # per-CPU slots, summed
    seen[seen.Key(7)] = seen.Leaf(42)
    assert seen[seen.Key(7)].value == 42
    del seen[seen.Key(7)]
    with pytest.raises(KeyError):
        seen[seen.Key(7)]
    with pytest.raises(KeyError):
        del seen[seen.Key(7)]
    assert "bcc" not in sys.modules
    with open("/proc/self/maps", encoding="utf-8") as fh:
        maps = fh.read()
    assert "libLLVM" not in maps and "libbcc" not in maps and "libclang" not in maps


def test_cleanup_detaches(obj):
    seen = obj[b"seen"]
    os.getppid()
    raw = bpfsys.RawMap(os.dup(seen.raw.fd))  # a second handle outlives the object
    obj.cleanup()
    before = raw.lookup(bytes(ctypes.c_uint32(os.getpid())))
    os.getppid()
    assert raw.lookup(bytes(ctypes.c_uint32(os.getpid()))) == before  # the program is gone
    os.close(raw.fd)


def test_compile_error_is_one_line():
    with pytest.raises(ChildError) as err:
        compile_object("int broken(void *ctx) { return undefined_thing; }")
    assert "\n" not in str(err.value) and str(err.value)
    with pytest.raises(ProbeUnavailable, match="eBPF program failed to load"):
        loader.load("this is not C")


def test_prefetch_is_picked_up_by_load():
    text = "int f(void *ctx) { return 0; }"
    loader.prefetch(text, functions=[("f", "KPROBE")])
    assert len(loader._prefetched) == 1
    o = loader.load(text, functions=[("f", "KPROBE")])
    assert not loader._prefetched and "f" in o.progs
    o.cleanup()
    loader.prefetch(text)
    loader.discard_prefetched()
    assert not loader._prefetched


def test_elf_symbol_offset_matches_nm():
    libc = "/usr/lib/x86_64-linux-gnu/libc.so.6"
    out = subprocess.run(["nm", "-D", "--defined-only", libc], capture_output=True, text=True).stdout
    value = next(int(line.split()[0], 16) for line in out.splitlines()
                 if line.split()[-1] in ("getaddrinfo@@GLIBC_2.2.5", "getaddrinfo"))
    offset = bpfsys.elf_symbol_offset(libc, "getaddrinfo")
    assert 0 < offset <= value  # the file offset of the code (vaddr minus the segment's delta)
    with pytest.raises(LookupError):
        bpfsys.elf_symbol_offset(libc, "no_such_function_here")
    with pytest.raises(ValueError):
        bpfsys._symbol_offset(b"not an elf file at all" * 4, "x")


@pytest.mark.parametrize("text,want", [("0-3,5\n", [0, 1, 2, 3, 5]), ("0", [0]), ("", []), ("x-y,2", [2])])
def test_cpu_list(text, want):
    assert bpfsys.cpu_list(text) == want


@pytest.mark.parametrize("release,code", [("6.18.44-fc-v657", 0x06122C), ("4.14.355-1.amzn2", 0x040EFF),
                                          ("5.10", 0x050A00), ("garbage", 0)])
def test_kernel_version_code(release, code):
    assert bpfsys.kernel_version_code(release) == code


def test_btf_func_id_live_and_malformed():
    assert bpfsys.btf_func_id("/sys/kernel/btf/vmlinux", "vfs_read") > 0
    with pytest.raises(LookupError):
        bpfsys.btf_func_id("/sys/kernel/btf/vmlinux", "no_such_kernel_function_here")
    for bad in (b"", b"\x9f\xeb" + b"\0" * 4, b"not btf at all, clearly" * 3):
        with pytest.raises((ValueError, LookupError)):
            bpfsys._btf_func_id(bad, "vfs_read")


def test_delete_many_batches_and_skips_missing(obj):
    seen = obj[b"seen"]
    for pid in range(100, 140):
        seen[seen.Key(pid)] = seen.Leaf(pid)
    keys = [bytes(ctypes.c_uint32(p)) for p in (100, 101, 999, 102)] + \
        [bytes(ctypes.c_uint32(p)) for p in range(103, 140)]
    assert seen.raw.delete_many(keys) == 40  # 999 was never there
    assert seen.items() == []


def test_ring_wraps_and_reports_losses(obj):
    got, lost = [], []
    events = obj[b"events"]
    events.open_perf_buffer(lambda cpu, data, size: got.append(events.event(data).n), page_cnt=1,
                            lost_cb=lost.append)
    for _ in range(5):  # 5 x 60 records of ~48 bytes through a 4 KiB ring: it wraps
        for _ in range(60):
            os.getppid()
        obj.perf_buffer_poll(timeout=0)
    assert got == list(range(1, 301)) and not lost
    for _ in range(400):  # more than the ring holds before a read: the kernel counts the loss
        os.getppid()
    obj.perf_buffer_poll(timeout=0)
    for extra in range(1, 51):  # the kernel writes its LOST record with the next record that fits
        os.getppid()            # on that CPU's ring
        obj.perf_buffer_poll(timeout=0)
        if lost:
            break
    assert sum(lost) > 0 and len(got) + sum(lost) == 700 + extra
