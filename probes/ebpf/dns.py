"""Names the traced processes resolve through the C library, with the addresses they got, via uprobes.

uprobe + uretprobe on ``getaddrinfo``, ``gethostbyname`` and ``gethostbyname2`` of every C library the
traced processes map (found in ``/proc/PID/maps``; a container's libc is attached through
``/proc/PID/root``, a deleted one through ``/proc/PID/map_files``). The probes sit on the library file
for every process and filter by the traced set in the kernel, so children forked later are covered.
See ``dns.bpf.c`` for the user-memory layouts read (``struct addrinfo``, ``struct hostent``).

Not covered, recorded as gaps: static binaries and runtimes with their own resolver (Go's pure
resolver): no libc to probe; names come later from the UDP/53 capture. ``gethostbyname_r`` and
``getaddrinfo_a`` are not probed.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Set, Tuple

from ...agent.errors import AsbuiltError, Vanished
from ..netlink.sock_diag import ip_text
from ..base import Context, Probe
from ..features import check_bcc, check_uprobes, tracepoint_exists
from ..procfs.maps import MapEntry, read_maps
from . import loader
from ..procfs.pids import process_tree

log = logging.getLogger(__name__)

MAX_ENTRIES = 16384
# getaddrinfo's return codes (glibc <netdb.h>), for a readable ``error``.
EAI_NAMES = {-1: "EAI_BADFLAGS", -2: "EAI_NONAME", -3: "EAI_AGAIN", -4: "EAI_FAIL", -6: "EAI_FAMILY",
             -7: "EAI_SOCKTYPE", -8: "EAI_SERVICE", -10: "EAI_MEMORY", -11: "EAI_SYSTEM",
             -5: "EAI_NODATA", -9: "EAI_ADDRFAMILY"}
# (symbol, entry function, return function)
SYMBOLS = (("getaddrinfo", "dns_getaddrinfo_enter", "dns_getaddrinfo_return"),
           ("gethostbyname", "dns_gethostbyname_enter", "dns_gethostbyname_return"),
           ("gethostbyname2", "dns_gethostbyname_enter", "dns_gethostbyname_return"))
_UPROBE_FUNCTIONS = sorted({(fn, "KPROBE") for _, enter, ret in SYMBOLS for fn in (enter, ret)})
_LIBC = re.compile(r"^(libc\.so(\.\d+)*|libc-[\d.]+\.so|ld-musl-[^/]*\.so(\.\d+)*)$")


@dataclass
class DnsObservation:
    """One name one process resolved (per result code), with totals since the probe started."""

    pid: int
    name: str
    addresses: List[str] = field(default_factory=list)  # the latest answer, in the order libc gave it
    result: int = 0  # getaddrinfo's return (0 ok, EAI_* < 0); gethostbyname: 0 found, 1 not found
    error: str = ""  # EAI_* name of a failed getaddrinfo, "HOST_NOT_FOUND" for gethostbyname
    count: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0


@dataclass(frozen=True)
class Libc:
    """A C library a traced process maps, and where this host can open it."""

    pid: int
    path: str  # as mapped, inside the process's mount namespace
    open_path: str  # /proc/PID/root/<path>, or /proc/PID/map_files/<range> when deleted


def libc_mappings(entries: Iterable[MapEntry]) -> List[MapEntry]:
    """The file-offset-0 mappings of a C library (glibc ``libc.so.6``, musl ``ld-musl-*.so.1``)."""
    out, seen = [], set()
    for entry in entries:
        base = os.path.basename(entry.path)
        if entry.offset == 0 and _LIBC.match(base) and entry.path not in seen:
            seen.add(entry.path)
            out.append(entry)
    return out


def find_libcs(proc_root: str, pid: int) -> List[Libc]:
    """The C libraries ``pid`` maps, with a path this (host) process can open. Raises Vanished/Denied."""
    out = []
    for entry in libc_mappings(read_maps(proc_root, pid)):
        if entry.deleted:
            open_path = os.path.join(proc_root, str(pid), "map_files", f"{entry.start:x}-{entry.end:x}")
        else:
            open_path = os.path.join(proc_root, str(pid), "root", entry.path.lstrip("/"))
        out.append(Libc(pid=pid, path=entry.path, open_path=open_path))
    return out


class DnsProbe(Probe):
    """Streaming probe: ``start(ctx, pids, follow_children)``, ``drain()`` on an interval, ``stop()``."""

    name = "dns"
    description = "names resolved via libc getaddrinfo/gethostbyname and their answers (uprobes)"
    default = True
    needs = ("root", "bcc", "bpf", "uprobes", "tracepoints")
    cost = "low"

    def __init__(self) -> None:
        self.bpf = None
        self.lost_events = 0
        self.compile_seconds = 0.0
        self.attach_seconds = 0.0
        self.new_facts = 0
        self.attached: List[str] = []  # library paths probed
        self._clock_offset = 0.0
        self._reported: Dict[tuple, Tuple[int, tuple]] = {}
        self._dropped_seen = 0

    def check(self, ctx: Context) -> Optional[str]:
        if not ctx.privileged:
            return "needs root (bpf, uprobes)"
        for feature in (check_bcc(), check_uprobes(ctx.roots.sys)):
            if not feature.ok:
                return feature.detail
        missing = [e for e in ("sched_process_fork", "sched_process_exit")
                   if not tracepoint_exists("sched", e, ctx.roots.sys)]
        if missing:
            return "missing tracepoints: " + ", ".join("sched:" + e for e in missing)
        return None

    def program(self, follow_children: bool = True) -> str:
        return loader.render(loader.source("dns"), FOLLOW_CHILDREN=int(bool(follow_children)),
                             MAX_ENTRIES=MAX_ENTRIES)

    def prefetch(self, follow_children: bool = True) -> None:
        """Start compiling now (in a child, on another core) for the start() that follows."""
        loader.prefetch(self.program(follow_children), functions=_UPROBE_FUNCTIONS)

    def start(self, ctx: Context, pids: Iterable[int], follow_children: bool = True) -> None:
        """Compile, seed the traced set, attach to each distinct libc the tree maps; gaps for the rest."""
        began = time.monotonic()
        self.bpf = loader.load(self.program(follow_children), functions=_UPROBE_FUNCTIONS)
        self.compile_seconds = time.monotonic() - began
        self._clock_offset = time.time() - time.monotonic()
        self._ctx = ctx
        traced = self.bpf[b"dns_traced"]
        tree = sorted(process_tree(ctx.roots.proc, pids, follow_children))
        for pid in tree:
            traced[traced.Key(pid)] = traced.Leaf(1)
        began = time.monotonic()
        self._attach_all(ctx, tree)
        self.attach_seconds = time.monotonic() - began
        self.bpf[b"dns_events"].open_perf_buffer(self._on_event, page_cnt=16, lost_cb=self._on_lost)
        log.info("probe=dns compile_seconds=%.3f attach_seconds=%.3f libraries=%d",
                 self.compile_seconds, self.attach_seconds, len(self.attached))

    def _attach_all(self, ctx: Context, tree: List[int]) -> None:
        assert self.bpf is not None
        seen: Set[Tuple[int, int]] = self.__dict__.setdefault("_libs_seen", set())  # across add_pids
        for pid in tree:
            try:
                libcs = find_libcs(ctx.roots.proc, pid)
            except AsbuiltError as err:
                ctx.gaps.add("vanished" if isinstance(err, Vanished) else "unreadable", f"pid {pid}",
                             f"dns: maps not readable: {err}")
                continue
            if not libcs:
                ctx.gaps.add("unsupported", f"pid {pid}", "dns: no C library mapped (static binary or "
                             "own resolver): names come from the UDP/53 capture")
                continue
            for lib in libcs:
                try:
                    st = os.stat(lib.open_path)
                except OSError as err:
                    ctx.gaps.add("unreadable", f"pid {pid}", f"dns: {lib.path}: {err.strerror}")
                    continue
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                self._attach(ctx, pid, lib)

    def _attach(self, ctx: Context, pid: int, lib: Libc) -> None:
        assert self.bpf is not None
        done = []
        for sym, enter, ret in SYMBOLS:
            try:
                path = lib.open_path.encode()
                self.bpf.attach_uprobe(name=path, sym=sym.encode(), fn_name=enter.encode(), pid=-1)
                self.bpf.attach_uretprobe(name=path, sym=sym.encode(), fn_name=ret.encode(), pid=-1)
                done.append(sym)
            except Exception as err:  # bcc raises bare Exception when a symbol or attach fails
                ctx.gaps.add("unsupported", f"pid {pid}", f"dns: {lib.path}: {sym} not probed: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}")
        if done:
            self.attached.append(lib.path)

    def stop(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    def add_pids(self, pids: Iterable[int]) -> None:
        """Watch more processes (and their children); attach to any new C library they map."""
        if self.bpf is None:
            return
        traced = self.bpf[b"dns_traced"]
        tree = sorted(process_tree(self._ctx.roots.proc, pids, True))
        for pid in tree:
            traced[traced.Key(pid)] = traced.Leaf(1)
        self._attach_all(self._ctx, tree)

    def forget(self, pids) -> None:
        """Drop the kernel's and our per-name state of processes that are gone (the daemon)."""
        from .tracer import forget_in_table

        gone = set(pids)
        if self.bpf is None or not gone:
            return
        forget_in_table(self.bpf[b"dns_stats"], gone)
        self._reported = {k: v for k, v in self._reported.items() if k[0] not in gone}

    def drain(self) -> List[DnsObservation]:
        """The names that are new or changed since the previous drain, with totals since start()."""
        if self.bpf is None:
            return []
        self.bpf.perf_buffer_poll(timeout=0)
        counters = self.bpf[b"dns_counters"]
        dropped = sum(int(counters[counters.Key(i)].value) for i in range(2))
        self.lost_events += dropped - self._dropped_seen
        self._dropped_seen = dropped
        out: List[DnsObservation] = []
        from .tracer import map_items

        for key, stat in map_items(self.bpf[b"dns_stats"]):
            obs = self._observation(key, stat)
            ident = (obs.pid, obs.name, obs.result)
            state = (obs.count, tuple(obs.addresses))
            if self._reported.get(ident) == state:
                continue
            self._reported[ident] = state
            out.append(obs)
        return out

    def _on_lost(self, count: int) -> None:
        self.lost_events += int(count)

    def _on_event(self, cpu: int, data, size: int) -> None:
        self.new_facts += 1

    def _wall(self, ktime_ns: int) -> float:
        return round(ktime_ns / 1e9 + self._clock_offset, 6) if ktime_ns else 0.0

    def _observation(self, key, stat) -> DnsObservation:
        addresses: List[str] = []
        for i in range(min(int(stat.naddrs), len(stat.family))):
            text = ip_text(int(stat.family[i]), bytes(stat.addr)[i * 16:(i + 1) * 16])
            if text and text not in addresses:
                addresses.append(text)
        result = int(key.result)
        error = "" if result == 0 else "HOST_NOT_FOUND" if result == 1 else EAI_NAMES.get(result, str(result))
        return DnsObservation(
            pid=int(key.tgid), name=bytes(key.name).split(b"\0", 1)[0].decode("utf-8", "replace"),
            addresses=addresses, result=result, error=error, count=int(stat.count),
            first_seen=self._wall(int(stat.first_ns)), last_seen=self._wall(int(stat.last_ns)))
