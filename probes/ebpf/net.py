"""Whom the traced processes talk to: connect/accept/bind/listen/sendto and the TCP lifecycle, via eBPF.

Attach points (all stable interfaces, see ``net.bpf.c``): ``syscalls:sys_{enter,exit}_connect``,
``sys_{enter,exit}_accept{,4}``, ``sys_{enter,exit}_bind``, ``sys_enter_listen``, ``sys_enter_sendto``,
``sys_enter_sendmsg``, ``sock:inet_sock_set_state`` (Documentation/trace/events.rst), and
``sched:sched_process_{fork,exit}`` to follow children. Facts are deduplicated in the kernel: each new
(pid, direction, family, proto, address, port, errno) is sent once, and every occurrence is counted in a
map that :meth:`NetProbe.drain` reads.

To attribute inbound connections to servers that were already listening when tracing started, the
probe seeds its listener table from ``/proc/PID/fd`` and ``/proc/PID/net/{tcp,tcp6,unix}``
(Documentation/networking/proc_net_tcp.rst). TCP byte counts are not here: they come from sock_diag.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from ...agent.errors import AsbuiltError, Vanished, from_oserror
from ..netlink.sock_diag import ip_text
from ..procfs.pids import process_tree
from ..base import Context, Probe
from ..features import check_bcc, tracepoint_exists
from ..procfs.fd import read_fds
from . import loader

log = logging.getLogger(__name__)

OUTBOUND, INBOUND, LISTEN, BIND = "outbound", "inbound", "listen", "bind"
_DIRECTIONS = {1: OUTBOUND, 2: INBOUND, 3: LISTEN, 4: BIND}
_PROTOS = {0: "", 1: "tcp", 2: "udp", 3: "unix"}
_FAMILIES = {socket.AF_UNIX: "unix", socket.AF_INET: "inet", socket.AF_INET6: "inet6"}

TRACEPOINTS = (
    ("syscalls", "sys_enter_connect"), ("syscalls", "sys_exit_connect"),
    ("syscalls", "sys_enter_accept4"), ("syscalls", "sys_exit_accept4"),
    ("syscalls", "sys_enter_accept"), ("syscalls", "sys_exit_accept"),
    ("syscalls", "sys_enter_bind"), ("syscalls", "sys_exit_bind"),
    ("syscalls", "sys_enter_listen"), ("syscalls", "sys_enter_sendto"), ("syscalls", "sys_enter_sendmsg"),
    ("sock", "inet_sock_set_state"), ("sched", "sched_process_fork"), ("sched", "sched_process_exit"),
)

MAX_ENTRIES = 65536  # distinct facts kept in the kernel; past it, occurrences are counted as lost
TCP_LISTEN = 0x0A  # st column of /proc/net/tcp
UNIX_ACCEPTCON = 0x10000  # Flags column of /proc/net/unix: a listening socket


@dataclass
class NetObservation:
    """One deduplicated network fact of one process, with totals since the probe started."""

    pid: int
    direction: str  # outbound, inbound, listen, bind
    proto: str  # tcp, udp, unix; "" when the kernel side could not tell (a failed inet connect before SYN)
    family: str  # inet, inet6, unix
    local_addr: str = ""  # listen/bind: our address; unix: our path (listen/bind/inbound)
    local_port: int = 0  # listen/bind: our port; inbound: the listener's port
    peer_addr: str = ""  # outbound: whom we called (unix: its path); inbound: who called us
    peer_port: int = 0  # outbound only (an inbound peer's port is ephemeral)
    count: int = 0  # connects/accepts/datagrams/binds/listens seen
    error: str = ""  # errno name of a failed connect/bind, e.g. ECONNREFUSED
    first_seen: float = 0.0  # Unix seconds
    last_seen: float = 0.0
    closed: int = 0  # TCP connections of this fact seen closing
    duration_seconds: float = 0.0  # their summed lifetime


@dataclass(frozen=True)
class Listener:
    """A listening socket found in /proc/PID/net/{tcp,tcp6,unix}."""

    inode: int
    family: int  # socket.AF_INET, AF_INET6, AF_UNIX
    address: str = ""  # inet: the local address; unix: the path
    port: int = 0


# ------------------------------------------------------------------------- /proc/PID/net parsers
def _hex_address(text: str) -> str:
    """``0100007F`` / 32 hex digits (each 32-bit word in host order) to an address string."""
    raw = bytes.fromhex(text)
    if len(raw) not in (4, 16):
        raise ValueError(f"address of {len(raw)} bytes")
    words = b"".join((raw[i:i + 4][::-1] if sys.byteorder == "little" else raw[i:i + 4])
                     for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def parse_proc_net_tcp(text: str, family: int = socket.AF_INET) -> List[Listener]:
    """The LISTEN rows of ``/proc/net/tcp`` or ``tcp6`` text; malformed rows are skipped."""
    out: List[Listener] = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10:
            continue
        try:
            state = int(parts[3], 16)
            if state != TCP_LISTEN:
                continue
            addr, _, port = parts[1].partition(":")
            out.append(Listener(inode=int(parts[9]), family=family, address=_hex_address(addr),
                                port=int(port, 16)))
        except ValueError:
            continue
    return out


def parse_proc_net_unix(text: str) -> List[Listener]:
    """The listening, named rows of ``/proc/net/unix`` text (abstract names start with ``@``)."""
    out: List[Listener] = []
    for line in text.splitlines()[1:]:
        parts = line.split(None, 7)
        if len(parts) < 8:
            continue
        try:
            flags, inode = int(parts[3], 16), int(parts[6])
        except ValueError:
            continue
        if flags & UNIX_ACCEPTCON:
            out.append(Listener(inode=inode, family=socket.AF_UNIX, address=parts[7].strip()))
    return out


def read_listeners(proc_root: str, pid: int) -> Dict[int, Listener]:
    """Listening sockets in ``pid``'s network namespace, by socket inode."""
    out: Dict[int, Listener] = {}
    for name, parse in (("tcp", lambda t: parse_proc_net_tcp(t, socket.AF_INET)),
                        ("tcp6", lambda t: parse_proc_net_tcp(t, socket.AF_INET6)),
                        ("unix", parse_proc_net_unix)):
        path = os.path.join(proc_root, str(pid), "net", name)
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except FileNotFoundError:
            continue  # no IPv6 in this kernel, or the process is gone: the caller's fd read says which
        except OSError as err:
            raise from_oserror(err, path) from err
        for row in parse(text):
            out[row.inode] = row
    return out


# ------------------------------------------------------------------------------- traced tree


def _errno_name(value: int) -> str:
    return errno.errorcode.get(value, str(value)) if value else ""


class NetProbe(Probe):
    """Streaming probe: ``start(ctx, pids, follow_children)``, ``drain()`` on an interval, ``stop()``."""

    name = "net"
    description = "connect/accept/bind/listen/sendto and TCP lifecycle of the traced tree (eBPF)"
    default = True
    needs = ("root", "bcc", "bpf", "tracepoints")
    cost = "low"

    def __init__(self) -> None:
        self.bpf = None
        self.lost_events = 0
        self.compile_seconds = 0.0
        self.new_facts = 0
        self._ctx: Optional[Context] = None
        self._clock_offset = 0.0  # wall time minus CLOCK_MONOTONIC (bpf_ktime_get_ns)
        self._reported: Dict[tuple, Tuple[int, int]] = {}
        self._resolved: Dict[Tuple[int, int], Optional[Listener]] = {}
        self._dropped_seen = 0

    # -------------------------------------------------------------------------------- lifecycle
    def check(self, ctx: Context) -> Optional[str]:
        if not ctx.privileged:
            return "needs root (bpf, tracepoints)"
        bcc = check_bcc()
        if not bcc.ok:
            return bcc.detail
        missing = [f"{c}:{e}" for c, e in TRACEPOINTS if not tracepoint_exists(c, e, ctx.roots.sys)]
        if missing:
            return "missing tracepoints: " + ", ".join(missing)
        return None

    def program(self, follow_children: bool = True) -> str:
        return loader.render(loader.source("net"), FOLLOW_CHILDREN=int(bool(follow_children)),
                             MAX_ENTRIES=MAX_ENTRIES)

    def prefetch(self, follow_children: bool = True) -> None:
        """Start compiling now (in a child, on another core) for the start() that follows."""
        loader.prefetch(self.program(follow_children))

    def start(self, ctx: Context, pids: Iterable[int], follow_children: bool = True) -> None:
        """Compile, seed the traced set and known listeners, attach. Raises ProbeUnavailable."""
        self._ctx = ctx
        text = self.program(follow_children)
        began = time.monotonic()
        self.bpf = loader.load(text)  # compiles and attaches every TRACEPOINT_PROBE
        self.compile_seconds = time.monotonic() - began
        self._clock_offset = time.time() - time.monotonic()
        traced = self.bpf[b"net_traced"]
        for pid in sorted(process_tree(ctx.roots.proc, pids, follow_children)):
            traced[traced.Key(pid)] = traced.Leaf(1)
            self._seed_listeners(pid)
        self.bpf[b"net_events"].open_perf_buffer(self._on_event, page_cnt=64, lost_cb=self._on_lost)
        log.info("probe=net compile_attach_seconds=%.3f", self.compile_seconds)

    def stop(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    def drain(self) -> List[NetObservation]:
        """The facts that are new or changed since the previous drain, with totals since start().

        Kernel keys that turn out to be one fact (an inbound peer first seen before its listener's port
        was resolved) are merged here.
        """
        if self.bpf is None:
            return []
        self.bpf.perf_buffer_poll(timeout=0)
        counters = self.bpf[b"net_counters"]
        dropped = sum(int(counters[counters.Key(i)].value) for i in range(2))
        self.lost_events += dropped - self._dropped_seen
        self._dropped_seen = dropped
        merged: Dict[tuple, NetObservation] = {}
        from .tracer import map_items

        for key, stat in map_items(self.bpf[b"net_stats"]):
            obs = self._observation(key, stat)
            if obs is None:
                continue
            ident = (obs.pid, obs.direction, obs.proto, obs.family, obs.local_addr, obs.local_port,
                     obs.peer_addr, obs.peer_port, obs.error)
            have = merged.get(ident)
            if have is None:
                merged[ident] = obs
                continue
            have.count += obs.count
            have.closed += obs.closed
            have.duration_seconds = round(have.duration_seconds + obs.duration_seconds, 6)
            have.first_seen = min(have.first_seen, obs.first_seen)
            have.last_seen = max(have.last_seen, obs.last_seen)
        out: List[NetObservation] = []
        for ident, obs in merged.items():
            state = (obs.count, obs.closed)
            if self._reported.get(ident) != state:
                self._reported[ident] = state
                out.append(obs)
        return out

    def add_pids(self, pids: Iterable[int]) -> None:
        """Watch more processes (and their children) from now on."""
        if self.bpf is None:
            return
        traced = self.bpf[b"net_traced"]
        for pid in sorted(process_tree(self._ctx.roots.proc, pids, True)):
            traced[traced.Key(pid)] = traced.Leaf(1)
            self._seed_listeners(pid)

    def forget(self, pids) -> None:
        """Drop the kernel's and our per-fact state of processes that are gone (the daemon)."""
        from .tracer import forget_in_table

        gone = set(pids)
        if self.bpf is None or not gone:
            return
        forget_in_table(self.bpf[b"net_stats"], gone)
        forget_in_table(self.bpf[b"net_fd"], gone)
        self._reported = {k: v for k, v in self._reported.items() if k[0] not in gone}

    # -------------------------------------------------------------------------------- internals
    def _on_lost(self, count: int) -> None:
        self.lost_events += int(count)

    def _on_event(self, cpu: int, data, size: int) -> None:
        self.new_facts += 1
        event = self.bpf[b"net_events"].event(data)
        if event.fd:  # a listener whose port the kernel side does not know: teach it now
            self._resolve_listen(int(event.tgid), int(event.fd) - 1)

    def _seed_listeners(self, pid: int) -> None:
        """Teach the kernel side the sockets ``pid`` already listens on (port -> owner, fd -> address)."""
        assert self._ctx is not None
        try:
            fds = read_fds(self._ctx.roots.proc, pid)
            listeners = read_listeners(self._ctx.roots.proc, pid)
        except AsbuiltError as err:
            kind = "vanished" if isinstance(err, Vanished) else "unreadable"
            self._ctx.gaps.add(kind, f"pid {pid}", f"net: listeners not seeded: {err}")
            return
        for entry in fds:
            row = listeners.get(entry.inode) if entry.kind == "socket" else None
            if row is not None:
                self._teach(pid, entry.fd, row)

    def _teach(self, pid: int, fd: int, row: Listener) -> None:
        assert self.bpf is not None
        fd_table = self.bpf[b"net_fd"]
        leaf = fd_table.Leaf()
        leaf.tgid, leaf.family, leaf.port = pid, row.family, row.port
        if row.family == socket.AF_UNIX:
            leaf.path = row.address.encode()[:107]
        else:
            packed = ipaddress.ip_address(row.address).packed
            for i, byte in enumerate(packed):
                leaf.addr[i] = byte
            ports = self.bpf[b"net_listen_ports"]
            ports[ports.Key(row.port)] = ports.Leaf(pid)
        key = fd_table.Key()
        key.tgid, key.fd = pid, fd
        fd_table[key] = leaf

    def _resolve_listen(self, pid: int, fd: int) -> Optional[Listener]:
        if (pid, fd) in self._resolved:
            return self._resolved[(pid, fd)]
        assert self._ctx is not None
        found = None
        try:
            inode = next((e.inode for e in read_fds(self._ctx.roots.proc, pid)
                          if e.fd == fd and e.kind == "socket"), 0)
            found = read_listeners(self._ctx.roots.proc, pid).get(inode) if inode else None
        except AsbuiltError:
            found = None  # gone already: the listen fact stays without an address
        if found is not None:
            self._teach(pid, fd, found)
        self._resolved[(pid, fd)] = found
        return found

    def _wall(self, ktime_ns: int) -> float:
        return round(ktime_ns / 1e9 + self._clock_offset, 6) if ktime_ns else 0.0

    def _observation(self, key, stat) -> Optional[NetObservation]:
        family = int(key.family)
        direction = _DIRECTIONS.get(int(key.direction), "")
        obs = NetObservation(
            pid=int(key.tgid), direction=direction, proto=_PROTOS.get(int(key.proto), ""),
            family=_FAMILIES.get(family, ""), count=int(stat.count), error=_errno_name(int(key.error)),
            first_seen=self._wall(int(stat.first_ns)), last_seen=self._wall(int(stat.last_ns)),
            closed=int(stat.closed), duration_seconds=round(int(stat.duration_ns) / 1e9, 6))
        path = bytes(key.path).split(b"\0", 1)[0].decode("utf-8", "replace")
        where = path if family == socket.AF_UNIX else ip_text(family, bytes(key.addr))
        listener = self._resolve_listen(int(key.tgid), int(key.fd) - 1) if key.fd else None
        if direction == OUTBOUND:
            obs.peer_addr, obs.peer_port = where, int(key.port)
        elif direction == INBOUND:
            if family == socket.AF_UNIX:
                obs.local_addr = path  # a unix client is unnamed: the fact is our listener's path
            else:
                obs.peer_addr, obs.local_port = where, int(key.lport) or (listener.port if listener else 0)
        elif direction == LISTEN and key.fd:
            if listener is not None:
                obs.family = _FAMILIES.get(listener.family, "")
                obs.proto = "unix" if listener.family == socket.AF_UNIX else "tcp"
                obs.local_addr, obs.local_port = listener.address, listener.port
        elif direction in (LISTEN, BIND):
            obs.local_addr, obs.local_port = where, int(key.port)
        else:
            return None
        return obs
