#!/usr/bin/env python3
"""Attach do-nothing eBPF programs ("return 0") where asbuilt's probes attach, to measure what the kernel's
tracepoint dispatch alone costs on this host: the floor under any probe attached there.

    floor_probe.py tp-enter     one program on syscalls:sys_enter_openat. Any syscall tracepoint puts every
                                task on the host on the syscall slow path: the cost of tracing syscalls at all.
    floor_probe.py raw-enter    one raw tracepoint program on sys_enter: the mechanism the issue names for
                                in-kernel syscall counting (raw_syscalls:sys_enter), with nothing counted.
    floor_probe.py raw-both     raw tracepoint programs on sys_enter and sys_exit: the cheapest attachment that
                                sees every syscall's number and its result (what counting syscalls and keeping
                                failed opens need at the least: one callback per tracepoint).
    floor_probe.py probe-set    programs on every syscall tracepoint the default probes of `asbuilt trace` use
                                (read from probes/ebpf/*.bpf.c) plus raw sys_enter: the attachment floor of the
                                default probe set.

Prints "floor_probe: attached N programs (MODE)" on stderr once attached, then holds them until SIGINT/SIGTERM.
Used by trace_bench.py's floor rows; needs root. Plain bpf(2) and perf_event_open(2) (asbuilt's bpfsys), no bcc.
"""
from __future__ import annotations

import os
import re
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
try:
    from asbuilt.probes.ebpf import bpfsys  # installed package (the venv)
except ImportError:  # pragma: no cover - run from a checkout without the venv
    from probes.ebpf import bpfsys  # type: ignore

PROG_TYPE_TRACEPOINT, PROG_TYPE_RAW_TRACEPOINT = 5, 17
PERF_TYPE_TRACEPOINT = 2
EVENTS = "/sys/kernel/tracing/events"
DEFAULT_SOURCES = ("proc.bpf.c", "files.bpf.c", "net.bpf.c")  # syscalls.bpf.c is the raw sys_enter one
TP = re.compile(r"^TRACEPOINT_PROBE\(syscalls,\s*(\w+)\)", re.M)


def syscall_tracepoints() -> list:
    names = []
    for src in DEFAULT_SOURCES:
        with open(os.path.join(REPO, "probes", "ebpf", src), encoding="utf-8") as fh:
            names += [n for n in TP.findall(fh.read()) if n not in names]
    return names


def attach_tracepoint(prog: int, name: str) -> int:
    with open(os.path.join(EVENTS, "syscalls", name, "id"), encoding="ascii") as fh:
        tp_id = int(fh.read())
    attr = bpfsys.PerfAttr(type=PERF_TYPE_TRACEPOINT, config=tp_id, sample_period=1, wakeup=1)
    fd = bpfsys.perf_event_open(attr, -1, 0)
    bpfsys._ioctl(fd, bpfsys.PERF_EVENT_IOC_SET_BPF, prog)
    bpfsys._ioctl(fd, bpfsys.PERF_EVENT_IOC_ENABLE)
    return fd


def main(argv: list) -> int:
    mode = argv[1] if len(argv) > 1 else ""
    if mode not in ("tp-enter", "raw-enter", "raw-both", "probe-set"):
        sys.stderr.write("usage: floor_probe.py tp-enter|raw-enter|raw-both|probe-set\n")
        return 2
    held = []
    try:
        if mode in ("tp-enter", "probe-set"):
            prog = bpfsys.prog_load(PROG_TYPE_TRACEPOINT)
            held.append(prog)
            names = ["sys_enter_openat"] if mode == "tp-enter" else syscall_tracepoints()
            for name in names:
                if os.path.exists(os.path.join(EVENTS, "syscalls", name)):
                    held.append(attach_tracepoint(prog, name))
        if mode in ("raw-enter", "raw-both", "probe-set"):
            prog = bpfsys.prog_load(PROG_TYPE_RAW_TRACEPOINT)
            held += [prog, bpfsys.raw_tracepoint_open(prog, "sys_enter")]
            if mode == "raw-both":
                held.append(bpfsys.raw_tracepoint_open(prog, "sys_exit"))
    except OSError as err:
        sys.stderr.write(f"floor_probe: cannot attach ({mode}): {err}\n")
        return 1
    attached = len(held) - (2 if mode == "probe-set" else 1)
    sys.stderr.write(f"floor_probe: attached {attached} programs ({mode})\n")
    sys.stderr.flush()
    for sig in (signal.SIGINT, signal.SIGTERM):  # explicitly: a background job may inherit SIGINT ignored
        signal.signal(sig, lambda *_: sys.exit(0))
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
