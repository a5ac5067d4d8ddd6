"""Exec, fork and exit of a traced process tree (``sched:sched_process_{fork,exec,exit}``).

The kernel side is ``proc.bpf.c``; argv is read from the old process's user memory at
``syscalls:sys_enter_execve`` (up to 20 arguments of 127 bytes, as bcc's execsnoop) and paired
with the exec by thread id; when that is missing it is read from ``/proc/PID/cmdline`` (see
proc(5)) on arrival, and a process gone by then is recorded as a gap. Exit codes come from
``syscalls:sys_enter_exit_group``; a process killed by a signal has none.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional

from ...agent.errors import AsbuiltError, from_oserror
from ..base import Context
from .tracer import (PF_ARGV_TRUNC, PF_HAS_CODE, PF_THREAD_UNKNOWN, PROC_ARGV, PROC_EXEC,
                     PROC_EXIT, PROC_FORK, ProcEvent, StreamingProbe)

PENDING_ARGV_MAX = 4096


@dataclass
class ExecObservation:
    pid: int
    ppid: int
    path: str  # the filename exec'd, as the kernel resolved it (sched_process_exec)
    argv: List[str] = field(default_factory=list)
    argv_source: str = ""  # "kernel" (execve arguments), "proc" (/proc/PID/cmdline), "" unknown
    argv_truncated: bool = False
    comm: str = ""
    time: float = 0.0


@dataclass
class ForkObservation:
    pid: int  # the new process
    ppid: int
    time: float = 0.0


@dataclass
class ExitObservation:
    pid: int
    ppid: int
    exit_code: Optional[int] = None  # None: no exit_group seen (signal, or exited before attach)
    comm: str = ""
    time: float = 0.0


def parse_cmdline(raw: bytes) -> List[str]:
    """``/proc/PID/cmdline`` (NUL-separated) into argv."""
    if not raw:
        return []
    parts = raw.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def read_cmdline(proc_root: str, pid: int) -> List[str]:
    path = os.path.join(proc_root, str(pid), "cmdline")
    try:
        with open(path, "rb") as fh:
            return parse_cmdline(fh.read())
    except OSError as err:
        raise from_oserror(err, path) from err


class ProcProbe(StreamingProbe):
    """Exec/fork/exit events of the traced tree."""

    name = "exec"
    owns_proc_events = True
    description = "processes the traced tree starts (exec, fork) and their exit codes"
    default = True
    cost = "low"
    lifecycle = True

    def __init__(self) -> None:
        super().__init__()
        self.ctx: Optional[Context] = None
        self._out: list = []
        self._argv: "OrderedDict[int, ProcEvent]" = OrderedDict()

    def attach(self, session) -> None:
        self.ctx = session.ctx

    def on_proc_event(self, ev: ProcEvent) -> None:
        if ev.kind == PROC_ARGV:
            self._argv[ev.tid] = ev
            self._argv.move_to_end(ev.tid)
            while len(self._argv) > PENDING_ARGV_MAX:
                self._argv.popitem(last=False)
        elif ev.kind == PROC_EXEC:
            self._out.append(self._exec(ev))
        elif ev.kind == PROC_FORK:
            if ev.flags & PF_THREAD_UNKNOWN and self._is_thread(ev.ppid, ev.pid):
                return
            self._out.append(ForkObservation(pid=ev.pid, ppid=ev.ppid, time=ev.time))
        elif ev.kind == PROC_EXIT:
            code = ev.code if ev.flags & PF_HAS_CODE else None
            self._out.append(ExitObservation(pid=ev.pid, ppid=ev.ppid, exit_code=code, comm=ev.comm,
                                             time=ev.time))

    def _is_thread(self, tgid: int, tid: int) -> bool:
        return os.path.exists(os.path.join(self.ctx.roots.proc, str(tgid), "task", str(tid)))

    def _exec(self, ev: ProcEvent) -> ExecObservation:
        obs = ExecObservation(pid=ev.pid, ppid=ev.ppid, path=ev.path, comm=ev.comm, time=ev.time)
        pending = self._argv.pop(ev.tid, None) or self._argv.pop(ev.pid, None)
        if pending is not None and pending.ts <= ev.ts:
            obs.argv, obs.argv_source = pending.argv, "kernel"
            obs.argv_truncated = bool(pending.flags & PF_ARGV_TRUNC)
            # an argument longer than the kernel's slot: /proc has it whole, if still there
            if any(len(a.encode("utf-8", "surrogateescape")) >= 127 for a in obs.argv):
                obs.argv_truncated = True
            return obs
        try:
            obs.argv, obs.argv_source = read_cmdline(self.ctx.roots.proc, ev.pid), "proc"
        except AsbuiltError as err:
            self.ctx.gaps.add("vanished", f"pid {ev.pid}", f"argv of exec {ev.path}: {err}")
        return obs

    def collect_drain(self) -> list:
        out, self._out = self._out, []
        return out
