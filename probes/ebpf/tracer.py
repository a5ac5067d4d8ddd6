"""One BPF object for a trace of a process tree: the ``traced`` set, shared by every event probe.

A :class:`TraceSession` concatenates ``proc.bpf.c`` (which owns the ``traced`` map, tgid → parent
tgid, kept current from ``sched:sched_process_{fork,exit}``) with the sources of the probes that
take part (``files.bpf.c``, ``syscalls.bpf.c`` ...), compiles them once with bcc, seeds ``traced``
with the target pids (and, when children are followed, their existing descendants found from
``/proc/*/stat``), and polls every perf buffer. Events of one poll are sorted by their kernel
timestamp before they are handed on, so a chdir is seen before the relative open that follows it
even when the two ran on different CPUs.

Each probe is a :class:`StreamingProbe`: ``start(ctx, pids, follow_children)`` (its own session),
``drain()`` and ``stop()``; :func:`start_together` runs several in one session (one compile).
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import struct
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ...agent.errors import from_oserror
from ..base import Context, Probe
from ..procfs.pids import descendants, read_parents as parent_map  # noqa: F401  (exported)
from . import loader

log = logging.getLogger(__name__)

MAX_PROCS = 32768
PAGE_CNT = 64  # perf buffer pages per CPU


def tracepoint_exists(category: str, event: str, sys_root: str = "/sys") -> bool:
    """Whether ``category:event`` exists (tracefs under ``sys_root``), as bcc's BPF.tracepoint_exists."""
    for base in ("kernel/tracing/events", "kernel/debug/tracing/events"):
        if os.path.isdir(os.path.join(sys_root, base, category, event)):
            return True
    return False


def tracepoint_has_field(category: str, event: str, name: str, sys_root: str = "/sys") -> bool:
    """Whether the tracepoint's format lists a field called ``name`` (feature detection)."""
    for base in ("kernel/tracing/events", "kernel/debug/tracing/events"):
        try:
            with open(os.path.join(sys_root, base, category, event, "format"), encoding="utf-8") as fh:
                text = fh.read()
        except OSError:
            continue
        return any(line.strip().startswith("field:") and line.split(";")[0].split()[-1] == name
                   for line in text.splitlines())
    return False


# ------------------------------------------------------------------------- /proc helpers
def parse_stat_ppid(text: str) -> Optional[int]:
    """The ppid (4th field) of a ``/proc/PID/stat`` line; None when malformed."""
    end = text.rfind(")")
    if end < 0:
        return None
    fields = text[end + 1:].split()
    if len(fields) < 2:
        return None
    try:
        return int(fields[1])
    except ValueError:
        return None


def read_ppid(proc_root: str, pid: int) -> int:
    """The parent pid of ``pid``; raises Vanished/Denied."""
    path = os.path.join(proc_root, str(pid), "stat")
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError as err:
        raise from_oserror(err, path) from err
    ppid = parse_stat_ppid(text)
    return 0 if ppid is None else ppid



def read_link(path: str) -> str:
    """readlink, translating OSError (Vanished/Denied)."""
    try:
        return os.readlink(path)
    except OSError as err:
        raise from_oserror(err, path) from err


def cstr(raw: bytes) -> str:
    """A NUL-terminated C string from a fixed buffer, decoded leniently."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


# ------------------------------------------------------------------------------- probes
class StreamingProbe(Probe):
    """An event probe that runs inside a :class:`TraceSession`."""

    needs = ("root", "bpf", "tracepoints")
    lifecycle = False  # wants fork/exec/exit events from proc.bpf.c
    owns_proc_events = False  # the probe whose lost-event count takes proc_events' losses

    def __init__(self) -> None:
        self.lost_events = 0
        self.session: Optional[TraceSession] = None
        self._own_session = False

    # --- what a session asks of its probes
    def sources(self, ctx: Context) -> List[Tuple[str, Dict[str, object]]]:
        """(``.bpf.c`` name, placeholder values) to append after proc.bpf.c."""
        return []

    def attach(self, session: "TraceSession") -> None:
        """Open perf buffers, remember tables; called once the object is loaded."""

    def on_proc_event(self, ev: "ProcEvent") -> None:
        """A fork/exec/exit/argv event of the traced tree (only when ``lifecycle``)."""

    def on_seed(self, pid: int, ppid: int) -> None:
        """``pid`` was put in the traced set by userspace (a target or an existing descendant)."""

    def collect_drain(self) -> list:
        return []

    def hand_attached(self) -> List[Tuple[str, str]]:
        """(function, bcc program type) to load for attaching by hand in ``attach`` (kprobes)."""
        return []

    # --- the streaming-probe interface
    def check(self, ctx: Context) -> Optional[str]:
        return check_bpf(ctx)

    def start(self, ctx: Context, pids: Sequence[int], follow_children: bool = True) -> None:
        """Attach to ``pids`` (and, when following children, all they fork), in a session of its own."""
        session = TraceSession(ctx, [self], follow_children=follow_children)
        session.start(pids)
        self._own_session = True

    def drain(self) -> list:
        """What was learned since the last drain (polls the perf buffers first)."""
        if self.session is None:
            return []
        self.session.poll(0)
        return self.collect_drain()

    def stop(self) -> list:
        """A last drain, then detach; returns that last drain's observations."""
        out = self.drain()
        if self.session is not None and self._own_session:
            self.session.close()
        self.session = None
        return out


def check_bpf(ctx: Context) -> Optional[str]:
    """Why bcc tracepoint probes cannot run here, or None."""
    if not ctx.privileged:
        return "needs root (CAP_BPF and CAP_PERFMON)"
    if importlib.util.find_spec("bcc") is None:  # compiled in a child: never imported here
        return "bcc is not installed (Debian: python3-bpfcc)"
    if not tracepoint_exists("sched", "sched_process_exec", ctx.roots.sys):
        return "tracepoints unavailable (no tracefs sched events)"
    if not tracepoint_exists("raw_syscalls", "sys_enter", ctx.roots.sys) or not tracepoint_exists(
            "syscalls", "sys_enter_openat", ctx.roots.sys):
        return "syscall tracepoints unavailable (kernel without CONFIG_FTRACE_SYSCALLS)"
    return None


# ------------------------------------------------------------------------ proc events
PROC_FORK, PROC_EXEC, PROC_EXIT, PROC_ARGV = 1, 2, 3, 4
PF_HAS_CODE, PF_THREAD_UNKNOWN, PF_ARGV_TRUNC = 1, 2, 4
ARGV_MAX = 20
ARG_LEN = 128
_PROC_HEADER = 56


class _ProcHeader(ctypes.Structure):
    _fields_ = [("ts", ctypes.c_uint64), ("kind", ctypes.c_uint32), ("pid", ctypes.c_uint32),
                ("ppid", ctypes.c_uint32), ("tid", ctypes.c_uint32), ("code", ctypes.c_int32),
                ("flags", ctypes.c_uint32), ("argc", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("comm", ctypes.c_char * 16)]


class ProcEvent:
    """One decoded proc.bpf.c event (wall-clock ``time``)."""

    __slots__ = ("ts", "time", "kind", "pid", "ppid", "tid", "code", "flags", "comm", "path", "argv")

    def __init__(self, raw: bytes, wall_offset: float):
        if len(raw) < _PROC_HEADER:
            raise ValueError("short proc event")
        h = _ProcHeader.from_buffer_copy(raw[:_PROC_HEADER])
        self.ts, self.kind, self.pid, self.ppid, self.tid = h.ts, h.kind, h.pid, h.ppid, h.tid
        self.time = h.ts / 1e9 + wall_offset
        self.code, self.flags = h.code, h.flags
        self.comm = cstr(h.comm)
        data = raw[_PROC_HEADER:]
        self.path = cstr(data) if self.kind == PROC_EXEC else ""
        self.argv: List[str] = []
        if self.kind == PROC_ARGV:
            argc = min(h.argc, ARGV_MAX)
            self.argv = [cstr(data[i * ARG_LEN:(i + 1) * ARG_LEN]) for i in range(argc)]


# ---------------------------------------------------------------------------- session
class TraceSession:
    """One compiled BPF object shared by several streaming probes over one trace window."""

    def __init__(self, ctx: Context, probes: Sequence[StreamingProbe], follow_children: bool = True,
                 load: Optional[Callable[[str], object]] = None):
        self.ctx = ctx
        self.load = load or loader.load
        self.probes = list(probes)
        self.follow_children = follow_children
        self.bpf = None
        self.compile_seconds = 0.0
        self.seeded: Dict[int, int] = {}
        self._pending: List[Tuple[int, Callable, object]] = []
        # bpf_ktime_get_ns is CLOCK_MONOTONIC: the offset turns it into Unix time.
        self.wall_offset = time.time() - time.monotonic()
        self.proc_lost = 0

    def source_text(self) -> str:
        sys_root = self.ctx.roots.sys
        lifecycle = any(p.lifecycle for p in self.probes)
        values: Dict[str, object] = dict(
            FOLLOW_CHILDREN=int(self.follow_children),
            PROC_EVENTS=int(lifecycle),
            HAVE_FORK_TP=int(tracepoint_exists("syscalls", "sys_enter_fork", sys_root)
                             and tracepoint_exists("syscalls", "sys_enter_vfork", sys_root)),
            HAVE_CLONE3_TP=int(tracepoint_exists("syscalls", "sys_enter_clone3", sys_root)),
            HAVE_EXECVEAT_TP=int(tracepoint_exists("syscalls", "sys_enter_execveat", sys_root)),
            ARGV_MAX=ARGV_MAX, ARG_LEN=ARG_LEN, MAX_PROCS=MAX_PROCS,
            GROUP_DEAD=("args->group_dead" if tracepoint_has_field(
                "sched", "sched_process_exit", "group_dead", sys_root) else "tid == tgid"),
        )
        parts = [loader.source("proc")]
        for probe in self.probes:
            for name, vals in probe.sources(self.ctx):
                parts.append(loader.source(name))
                clash = set(vals) & set(values)
                if clash:
                    raise ValueError(f"bpf placeholders defined twice: {sorted(clash)}")
                values.update(vals)
        return loader.render("\n".join(parts), **values)

    def start(self, pids: Sequence[int]) -> None:
        """Compile, attach, seed ``traced``; raises ProbeUnavailable when the object will not load."""
        text = self.source_text()
        functions = [fn for probe in self.probes for fn in probe.hand_attached()]
        t0 = time.monotonic()
        self.bpf = self.load(text, functions=functions) if functions else self.load(text)
        self.compile_seconds = time.monotonic() - t0
        log.info("bpf object loaded probes=%s seconds=%.3f",
                 ",".join(p.name for p in self.probes), self.compile_seconds)
        try:
            for probe in self.probes:
                probe.session = self
            if any(p.lifecycle for p in self.probes):
                self.open_buffer("proc_events", self._on_proc_raw, self._on_proc_lost)
            for probe in self.probes:
                probe.attach(self)
            self.add_pids(pids)
        except BaseException:
            for probe in self.probes:
                probe.session = None
            self.close()
            raise

    def add_pids(self, pids: Sequence[int]) -> None:
        """Seed ``traced`` with pids (and their live descendants when following children)."""
        proc = self.ctx.roots.proc
        for pid in pids:
            self._seed(pid, self._ppid(pid))
        if self.follow_children:
            parents = parent_map(proc)
            for pid in descendants(parents, pids):
                self._seed(pid, parents.get(pid, 0))

    def _ppid(self, pid: int) -> int:
        try:
            return read_ppid(self.ctx.roots.proc, pid)
        except Exception:
            self.ctx.gaps.add("vanished", f"pid {pid}", "gone before the trace attached")
            return 0

    def _seed(self, pid: int, ppid: int) -> None:
        self.bpf[b"traced"][ctypes.c_uint32(pid)] = ctypes.c_uint32(ppid)
        self.seeded[pid] = ppid
        for probe in self.probes:
            probe.on_seed(pid, ppid)

    def traced_pids(self) -> Dict[int, int]:
        """The kernel's current traced set (tgid → parent tgid)."""
        return {k.value: v.value for k, v in self.bpf[b"traced"].items()}

    def open_buffer(self, name: str, handler: Callable[[bytes], Tuple[int, Callable, object]],
                    on_lost: Callable[[int], None], page_cnt: int = PAGE_CNT) -> None:
        """Open a perf buffer; ``handler(raw)`` returns (ts, dispatch, event) or None."""
        def callback(cpu, data, size):
            raw = data if isinstance(data, bytes) else ctypes.string_at(data, size)
            try:
                item = handler(raw)
            except ValueError:
                return
            if item is not None:
                self._pending.append(item)

        def lost(count):
            on_lost(int(count))

        self.bpf[name.encode()].open_perf_buffer(callback, page_cnt=page_cnt, lost_cb=lost)

    def poll(self, timeout_ms: int = 0) -> int:
        """Read every perf buffer, then dispatch the events in kernel-time order; returns how many."""
        if self.bpf is None:
            return 0
        self.bpf.perf_buffer_poll(timeout=timeout_ms)
        pending, self._pending = self._pending, []
        pending.sort(key=lambda item: item[0])
        for _, dispatch, event in pending:
            dispatch(event)
        return len(pending)

    def _on_proc_raw(self, raw: bytes):
        ev = ProcEvent(raw, self.wall_offset)
        return ev.ts, self._dispatch_proc, ev

    def _dispatch_proc(self, ev: ProcEvent) -> None:
        for probe in self.probes:
            if probe.lifecycle:
                probe.on_proc_event(ev)

    def _on_proc_lost(self, count: int) -> None:
        self.proc_lost += count
        takers = [p for p in self.probes if p.lifecycle]
        takers.sort(key=lambda p: not p.owns_proc_events)  # the proc probe owns these events
        if takers:
            takers[0].lost_events += count

    def close(self) -> None:
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            finally:
                self.bpf = None


def start_together(ctx: Context, probes: Sequence[StreamingProbe], pids: Sequence[int],
                   follow_children: bool = True) -> TraceSession:
    """Start several probes in one session (one compile); stop with ``close_together``."""
    session = TraceSession(ctx, probes, follow_children=follow_children)
    session.start(pids)
    return session


def map_items(table) -> list:
    """Every (key, value) of a BPF hash: one BPF_MAP_LOOKUP_BATCH call where the kernel has it (5.6+),
    else bcc's key-by-key walk (two syscalls per entry: what made a full map cost a drain)."""
    try:
        return list(table.items_lookup_batch())
    except Exception:  # older kernel or bcc: no batch ops for this map
        return list(table.items())


def forget_in_table(table, pids, field: str = "tgid") -> int:
    """Delete a BPF hash's entries whose key's ``field`` is one of ``pids`` (processes that are gone).

    The daemon calls this so maps keyed by process do not fill with the dead; returns how many went.
    """
    if table is None or not pids:
        return 0
    # by bytes, deleted in one batch: no ctypes struct per entry of a map of every process
    fmt = "<" + {1: "B", 2: "H", 4: "I", 8: "Q"}[getattr(table.Key, field).size]
    off = getattr(table.Key, field).offset
    gone = [k for k, _ in table.raw_items() if struct.unpack_from(fmt, k, off)[0] in pids]
    return table.raw.delete_many(gone)


def close_together(session: TraceSession) -> None:
    """Last drain of nothing: just detach. Call each probe's ``drain()`` before this."""
    for probe in session.probes:
        probe.session = None
    session.close()


__all__ = ["TraceSession", "StreamingProbe", "start_together", "close_together", "ProcEvent",
           "check_bpf", "tracepoint_exists", "tracepoint_has_field", "parse_stat_ppid",
           "descendants", "parent_map"]
