"""Capture the first packets of each flow on a process's own ports, on every interface, via AF_PACKET.

One ``AF_PACKET``/``SOCK_DGRAM`` socket bound to no interface sees every interface of this network
namespace with the link header already removed, so one filter compiled for raw IP (``DLT_RAW``) fits
loopback, Ethernet, veth, tun and WireGuard alike. The kernel filter is classic BPF compiled by
libpcap through scapy (``scapy.arch.common.compile_filter(expr, linktype=DLT_RAW)``, which opens a
*dead* pcap handle: no interface, no scapy socket) from the ports the caller gives
(``tcp port 5432 or udp port 53 …``), then:

* prefixed with four instructions that drop loopback's ``PACKET_OUTGOING`` copy (every loopback
  packet is seen twice otherwise; libpcap does the same in userspace),
* its accept value patched to the snap length, so only the first ``snaplen`` bytes are copied,
* attached with ``SO_ATTACH_FILTER``; a new program replaces the old one atomically.

Out of the way once the evidence is in. Each watched port is a *target* until the protocol on it is
known: a flow on it identified with both directions seen, or ``unknown_flows_per_port`` flows judged
without a known protocol (their fingerprints are kept as ``unknown-tcp/udp``). Identified targets leave
the filter, so their later traffic is not copied to Python any more, and the socket's *mode* follows
what is left: ``full`` (``ETH_P_ALL``, every interface, both directions) while a port other than DNS
is open and was added less than ``full_tap_seconds`` ago; ``inbound`` (the same socket with
``PACKET_IGNORE_OUTGOING``) for UDP/53, since DNS answers arrive inbound and carry their question, and
for ports still unknown after ``full_tap_seconds`` (an idle port must not keep the costly tap open:
loopback traffic is still seen whole, a NIC's only in the direction towards this host); ``closed``
when nothing is left.
Why: an ``ETH_P_ALL`` tap makes the kernel ``skb_clone()`` every transmitted packet of the host in
``dev_queue_xmit_nit`` *before* the socket filter runs (about 0.5 µs a packet here, ~3 % of a loopback
redis); with ``PACKET_IGNORE_OUTGOING`` the transmit path skips the socket and only the receive path
runs the filter, which costs a fraction of that and sees every loopback packet once. A port that
:meth:`Sniffer.set_ports` adds later (the trace learns new listeners and peers) reopens the full tap
for just that port; :meth:`Sniffer.rearm` forgets what was identified (for a long-running daemon).
Without ``PACKET_IGNORE_OUTGOING`` (kernels before 4.20) the DNS-only socket stays a full tap.
``stats`` and :attr:`Sniffer.timeline` say what was identified when, and when the socket changed mode.

So unrelated traffic never reaches Python. We do not use scapy's ``L2ListenSocket``/``sniff``: they
build a scapy object per packet, far too slow for a server under load; headers are parsed here with
``struct``. Per flow (5-tuple) only the first ``packets_per_flow`` payload packets of each direction
are kept; their bytes (up to ``bytes_per_direction``, and ``max_buffered_bytes`` over all unfinished
flows) feed :func:`protocols.identify` and are dropped as soon as the protocol is settled (both
directions seen) or the budget is spent; later packets of the flow are counted as ignored. Flows live
in an LRU table of at most ``max_flows`` entries; peers and DNS names are capped too. A per-second
packet budget bounds the CPU (about 3 µs of Python per packet here, recv included): when it runs out
the loop sleeps until the next second and the kernel drops what overflows the socket buffer.
``PACKET_STATISTICS`` (tp_packets, tp_drops; reset by each read) gives those drops, split into
``budget_drops`` (while paused) and ``kernel_drops`` (otherwise); both are lost events.

Direction: the client of a flow is the sender of its SYN; without one (flows older than the capture,
UDP), the side on a listening port, else the higher (ephemeral) port. A flow whose server port is
one of ``listening`` is inbound (peer = client address + our port), else outbound (peer = server
address + port). Without ``listening``, a server port in ``ports`` whose client port is not counts
as ours.

Kernel documentation: Documentation/networking/packet_mmap.rst, Documentation/networking/filter.rst.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Set, Tuple

from ...agent.errors import AsbuiltError, ProbeUnavailable, WriteError, from_oserror
from . import protocols

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_ATTACH_FILTER = 26
BPF_MAXINSNS = 4096
SKF_AD_OFF = -0x1000
SKF_AD_PKTTYPE, SKF_AD_IFINDEX = 4, 8
PACKET_OUTGOING = 4
PACKET_IGNORE_OUTGOING = 23  # Linux 4.20+
LINKTYPE_RAW = 101  # pcap file link type for raw IPv4/IPv6 packets
MAX_PORTS = 512
PROTO_TCP, PROTO_UDP = 6, 17
DNS_PORTS = frozenset({("udp", 53), ("udp", 5353), ("udp", 5355)})  # watched all along: names keep coming
MAX_TIMELINE = 32
MAX_RESOLVED = 4 * 512  # identified ports remembered, those still watched first
_IPV6_EXT = (0, 43, 60, 51)  # hop-by-hop, routing, destination options, AH (fragment handled apart)

Port = Tuple[str, int]  # ("tcp", 5432)


@dataclass
class CaptureLimits:
    """Bounds on what the capture keeps and costs, whatever the traffic."""

    packets_per_flow: int = 4  # payload packets kept per direction of a flow
    bytes_per_direction: int = 4096  # payload bytes kept per direction for identification
    max_flows: int = 4096  # flows tracked (LRU)
    max_peers: int = 4096
    max_names: int = 2048
    packets_per_second: int = 20000  # packets read per second before the loop pauses
    snaplen: int = 2048  # bytes of each packet copied by the kernel
    rcvbuf_bytes: int = 1 << 20  # socket receive buffer: what queues while paused
    max_buffered_bytes: int = 4 << 20  # payload held across all unfinished flows
    narrow: bool = True  # drop a port from the filter once its protocol is known (False: watch all along)
    unknown_flows_per_port: int = 4  # flows judged without a known protocol before a port is given up
    full_tap_seconds: float = 15.0  # then a port still unknown is watched on the inbound-only socket
    keep_dns: bool = True  # UDP/53 (5353, 5355) watched all along (False: settled like any port)


@dataclass
class PeerObservation:
    """The protocol a peer speaks; maps onto ``agent.model.Peer`` (no volumes: those come from sockets)."""

    address: str
    port: int  # remote port (outbound); 0 for inbound (the client's port is ephemeral)
    proto: str  # tcp, udp
    family: str  # inet, inet6
    direction: str  # outbound, inbound
    local_port: int = 0  # our listening port (inbound)
    protocol: str = ""
    details: Dict[str, str] = field(default_factory=dict)
    flows: int = 0  # flows seen (not connections counted by the kernel)
    first_seen: float = 0.0
    last_seen: float = 0.0


@dataclass
class NameObservation:
    """A DNS name answered in captured UDP/53 traffic, with the addresses it resolved to."""

    name: str
    addresses: List[str] = field(default_factory=list)
    cnames: List[str] = field(default_factory=list)
    count: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0


@dataclass
class CaptureObservations:
    peers: List[PeerObservation] = field(default_factory=list)
    names: List[NameObservation] = field(default_factory=list)


# ------------------------------------------------------------------------------------- filter
def normalise_ports(ports: Iterable[Port]) -> Set[Port]:
    """Validated ``{("tcp", 80), ("udp", 53)}``; raises ValueError on anything else."""
    out = set()
    for proto, port in ports:
        proto = str(proto).lower()
        if proto not in ("tcp", "udp") or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"not a (tcp|udp, port) pair: {(proto, port)!r}")
        out.add((proto, port))
    return out


def filter_expression(ports: Iterable[Port]) -> str:
    """The libpcap expression for ``ports`` (``tcp port 80 or udp port 53``); "" when empty."""
    by_proto: Dict[str, List[int]] = {"tcp": [], "udp": []}
    for proto, port in sorted(normalise_ports(ports)):
        by_proto[proto].append(port)
    terms = []
    for proto, nums in by_proto.items():
        terms.extend(f"{proto} port {n}" for n in nums)
    return " or ".join(terms)


Insn = Tuple[int, int, int, int]  # code, jt, jf, k


def compile_program(expression: str, snaplen: int, loopback_ifindex: int = 0) -> List[Insn]:
    """Classic BPF for ``expression`` (raw IP), accept length ``snaplen``; drop-all when empty.

    With ``loopback_ifindex``, four leading instructions drop loopback's outgoing copy of each packet.
    Raises ProbeUnavailable when libpcap is missing, ValueError when it rejects the expression.
    """
    if not expression:
        return [(0x06, 0, 0, 0)]  # ret #0
    try:
        from scapy.arch.common import compile_filter, free_filter  # optional import
        from scapy.data import DLT_RAW
        from scapy.error import Scapy_Exception
    except (ImportError, OSError) as err:
        raise ProbeUnavailable(f"scapy/libpcap not importable: {err}") from err
    try:
        prog = compile_filter(expression, linktype=DLT_RAW)
    except ImportError as err:
        raise ProbeUnavailable("libpcap is not available (Debian: libpcap0.8)") from err
    except Scapy_Exception as err:
        raise ValueError(str(err)) from err
    try:
        insns = []
        for i in range(prog.bf_len):
            ins = prog.bf_insns[i]
            k = ins.k & 0xFFFFFFFF
            if ins.code == 0x06 and k:  # BPF_RET|BPF_K accepting: copy only the snap length
                k = snaplen
            insns.append((ins.code, ins.jt, ins.jf, k))
    finally:
        free_filter(prog)
    if loopback_ifindex:
        ad = SKF_AD_OFF & 0xFFFFFFFF
        insns = [(0x20, 0, 0, ad + SKF_AD_PKTTYPE),  # ld [pkttype]
                 (0x15, 0, 3, PACKET_OUTGOING),  # jeq #OUTGOING, next, program
                 (0x20, 0, 0, ad + SKF_AD_IFINDEX),  # ld [ifindex]
                 (0x15, 0, 1, loopback_ifindex),  # jeq #lo, drop, program
                 (0x06, 0, 0, 0)] + insns  # ret #0
    if len(insns) > BPF_MAXINSNS:
        raise ValueError(f"filter needs {len(insns)} BPF instructions (kernel maximum {BPF_MAXINSNS})")
    return insns


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def attach_program(sock: socket.socket, insns: List[Insn]) -> None:
    """``SO_ATTACH_FILTER``: replaces any filter already on the socket, atomically."""
    array = (_SockFilter * len(insns))(*[_SockFilter(*i) for i in insns])
    prog = _SockFprog(len(insns), ctypes.cast(array, ctypes.POINTER(_SockFilter)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(prog))


def read_packet_statistics(sock: socket.socket) -> Tuple[int, int]:
    """(packets, drops) since the previous read (the kernel resets them); packets include drops."""
    raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
    packets, drops = struct.unpack("II", raw[:8])
    return packets, drops


# -------------------------------------------------------------------------------------- flows
class _Flow:
    __slots__ = ("client", "server_port", "peer_key", "kept", "data", "done", "proto", "target", "judged")

    def __init__(self, proto: str, client: Tuple[bytes, int], server_port: int, peer_key: tuple,
                 target: Optional[Port] = None):
        self.proto = proto
        self.client = client
        self.server_port = server_port
        self.peer_key = peer_key
        self.kept = [0, 0]  # payload packets kept: client→server, server→client
        self.data: Optional[List[bytearray]] = [bytearray(), bytearray()]
        self.done = False
        self.target = target  # the watched port this flow is evidence for
        self.judged = False  # already counted towards its target's verdict


@dataclass
class _Peer:
    obs: PeerObservation
    changed: bool = True


def _name_thread(name: bytes) -> None:
    """The kernel's name of the calling thread (``/proc/PID/task/TID/comm``), so its CPU can be measured."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


class Sniffer:
    """The capture loop: ``start(ports)``, ``set_ports(ports)``, ``drain()``, ``stop()`` (prompt)."""

    THREAD_NAME = "asbuilt-capture"

    def __init__(self, limits: Optional[CaptureLimits] = None, listening: Optional[Iterable[Port]] = None,
                 pcap_path: Optional[str] = None):
        self.limits = limits or CaptureLimits()
        self.listening: Optional[Set[Port]] = normalise_ports(listening) if listening is not None else None
        self.pcap_path = pcap_path
        self.ports: Set[Port] = set()
        self.expression = ""
        self.mode = "closed"  # full, inbound, closed: see the module docstring
        self.stats = {"packets_seen": 0, "packets_kept": 0, "packets_ignored": 0, "packets_malformed": 0,
                      "payload_bytes_dropped": 0, "flows": 0, "flows_evicted": 0, "peers_dropped": 0,
                      "names_dropped": 0,
                      "budget_pauses": 0, "budget_drops": 0, "kernel_drops": 0, "kernel_packets": 0,
                      "filter_instructions": 0,
                      "ports_identified": 0, "ports_unknown": 0, "ports_open": 0,
                      "socket_opens": 0, "socket_closes": 0, "mode_changes": 0, "full_tap_ms": 0}
        self.resolved: Dict[Port, str] = {}  # port -> protocol learned ("unknown-tcp" when given up)
        self.timeline: "collections.deque[Tuple[float, str]]" = collections.deque(maxlen=MAX_TIMELINE)
        self._unknown_flows: Dict[Port, int] = {}
        self._since: Dict[Port, float] = {}  # when each watched port was added (monotonic)
        self._deadline: Optional[float] = None  # when the next port leaves the full tap
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # flow/peer/name tables and stats
        self._sock_lock = threading.RLock()  # the socket: opened, re-filtered, read and closed under it
        self._flows: "collections.OrderedDict[tuple, _Flow]" = collections.OrderedDict()
        self._peers: Dict[tuple, _Peer] = {}
        self._names: Dict[str, Tuple[NameObservation, bool]] = {}
        self._pcap = None
        self._buffered = 0  # payload bytes held by unfinished flows
        self._lo_index = 0
        self._error: Optional[str] = None
        self._dirty = False  # a port was resolved: the filter should narrow
        self._t0 = time.monotonic()
        self._full_since: Optional[float] = None
        self._ignore_outgoing_ok = True
        self._permanent = DNS_PORTS if self.limits.keep_dns else frozenset()

    # ----------------------------------------------------------------------------- lifecycle
    def start(self, ports: Iterable[Port]) -> None:
        """Open the socket, attach the filter, start the capture thread. Raises ProbeUnavailable/WriteError."""
        self._t0 = time.monotonic()
        try:
            self._lo_index = socket.if_nametoindex("lo")
        except OSError:
            self._lo_index = 0
        with self._sock_lock:
            self._open_socket()  # even with nothing to watch yet: says now whether AF_PACKET works here
            try:
                self.set_ports(ports)
                if self.pcap_path:
                    self._pcap = _open_pcap(self.pcap_path)
            except BaseException:
                self._close_socket(account=False)
                raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
        self._thread.start()

    def set_ports(self, ports: Iterable[Port]) -> None:
        """Watch ``ports`` from now on; those already identified stay out of the filter. Raises ValueError."""
        wanted = normalise_ports(ports)
        if len(wanted) > MAX_PORTS:
            raise ValueError(f"{len(wanted)} ports: at most {MAX_PORTS} can be filtered")
        now = time.monotonic()
        with self._lock:
            self.ports = wanted
            for port in wanted:
                self._since.setdefault(port, now)
            for port in [p for p in self._since if p not in wanted]:
                del self._since[port]
            if len(self.resolved) > MAX_RESOLVED:  # bounded: forget ports no longer watched
                for port in [p for p in self.resolved if p not in wanted]:
                    del self.resolved[port]
                    self._unknown_flows.pop(port, None)
        self._apply()

    def rearm(self, ports: Optional[Iterable[Port]] = None) -> None:
        """Forget what was identified on ``ports`` (all when None): they are watched again until known."""
        with self._lock:
            forget = set(self.resolved) if ports is None else normalise_ports(ports)
            now = time.monotonic()
            for port in forget:
                self.resolved.pop(port, None)
                self._unknown_flows.pop(port, None)
                if port in self._since:
                    self._since[port] = now
            self._note(f"rearmed {len(forget)} port(s)")
        self._apply()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        with self._sock_lock:
            self._close_socket(account=True, why="")
        if self._pcap is not None:
            try:
                self._pcap.close()
            except OSError as err:
                log.warning("probe=capture pcap close failed: %s", err)
            self._pcap = None

    # ------------------------------------------------------------------------ socket and filter
    def _open_socket(self) -> None:
        """A fresh ETH_P_ALL socket that has queued nothing yet (drop-all filter until _apply). Sock lock held."""
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        except OSError as err:
            raise ProbeUnavailable(f"AF_PACKET socket: {err.strerror}") from err
        try:
            attach_program(sock, [(0x06, 0, 0, 0)])  # nothing queues before the real filter is on
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.limits.rcvbuf_bytes)
            sock.setblocking(False)
            self._drain_socket(sock)
            read_packet_statistics(sock)  # reset the counters
        except OSError as err:
            sock.close()
            raise from_oserror(err, "capture socket") from err
        self._sock, self.mode = sock, "open"
        self.stats["socket_opens"] += 1

    def _close_socket(self, account: bool = True, why: str = "closed") -> None:
        """Sock lock held."""
        sock = self._sock
        if sock is None:
            return
        if account:
            try:
                self._account_drops(paused=False)
            except OSError:
                pass
        self._leave_full()
        self._sock = None
        sock.close()
        self.stats["socket_closes"] += 1
        if why:
            self._note(f"socket {why}")
        self.mode = "closed"

    def _leave_full(self) -> None:
        if self._full_since is not None:
            self.stats["full_tap_ms"] += int((time.monotonic() - self._full_since) * 1000)
            self._full_since = None

    def _apply(self) -> None:
        """Fit the socket to the ports still open: full tap while a port is new and unknown, inbound-only
        for DNS and for ports past ``full_tap_seconds``, closed when nothing is left. Raises ValueError."""
        with self._sock_lock:
            now = time.monotonic()
            with self._lock:
                self._dirty = False
                ports = set(self.ports)
                active = ports - set(self.resolved) if self.limits.narrow else ports
                self.stats["ports_open"] = len(active)
                ends = [self._since.get(p, now) + self.limits.full_tap_seconds for p in active - self._permanent]
            if self.limits.narrow:
                ends = [t for t in ends if t > now]
            self._deadline = min(ends) if ends and self.limits.narrow else None
            mode = "full" if ends else ("inbound" if active else "closed")
            if not self.limits.narrow and active - self._permanent:
                mode = "full"
            expression = filter_expression(active)
            if mode == self.mode and expression == self.expression:
                return
            if mode == "closed":
                self._close_socket(why="closed: every watched port identified" if ports else "closed: no ports")
                self.expression = ""
                self.stats["filter_instructions"] = 0
                return
            insns = compile_program(expression, self.limits.snaplen, self._lo_index)
            reopened = self._sock is None
            if reopened:
                self._open_socket()
            assert self._sock is not None
            try:
                attach_program(self._sock, insns)
                if mode == "inbound" and not self._ignore_outgoing_ok:
                    mode = "full"
                elif self.mode in ("inbound", "full") or mode == "inbound":
                    try:
                        self._sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1 if mode == "inbound" else 0)
                    except OSError:  # before Linux 4.20: the DNS-only socket stays a full tap
                        self._ignore_outgoing_ok = False
                        mode = "full"
            except OSError as err:
                raise from_oserror(err, "attach capture filter") from err
            if mode != self.mode:
                if mode == "full" and self._full_since is None:
                    self._full_since = time.monotonic()
                elif mode != "full":
                    self._leave_full()
                if self.mode in ("inbound", "full"):
                    self.stats["mode_changes"] += 1
                self._note(f"socket {'reopened, ' if reopened and self.stats['socket_opens'] > 1 else ''}"
                           f"{mode}: {expression}")
            self.mode, self.expression = mode, expression
            with self._lock:
                self.stats["filter_instructions"] = len(insns)
        self._wake.set()
        log.debug("probe=capture mode=%s ports=%d filter=%r", mode, len(active), expression)

    def _note(self, what: str) -> None:
        self.timeline.append((round(time.monotonic() - self._t0, 3), what))  # a deque: the latest kept

    def _resolve(self, port: Port, protocol: str) -> None:
        """``port`` needs no more evidence (lock held): the loop narrows the filter after this batch."""
        if port in self.resolved:
            return
        self.resolved[port] = protocol
        self.stats["ports_unknown" if protocol.startswith("unknown") else "ports_identified"] += 1
        self._note(f"{port[0]}/{port[1]} {protocol}")
        self._dirty = True

    def summary(self) -> str:
        """One line for coverage: what was identified when, when the socket changed mode, what was kept."""
        with self._lock:
            events = "; ".join(f"+{t:.2f}s {what}" for t, what in list(self.timeline)[-12:])
            st = dict(self.stats)
            mode = self.mode
        full = st["full_tap_ms"] + (int((time.monotonic() - self._full_since) * 1000) if self._full_since else 0)
        return (f"{st['ports_identified']} port(s) identified, {st['ports_unknown']} unknown, "
                f"{st['ports_open']} still watched (socket {mode}); full tap open {full / 1000:.2f}s; "
                f"{st['packets_kept']} packets kept of {st['packets_seen']} read, "
                f"{st['kernel_drops'] + st['budget_drops']} dropped" + (f"; {events}" if events else ""))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def error(self) -> Optional[str]:
        """Why the capture thread stopped early, or None."""
        return self._error

    @property
    def lost_events(self) -> int:
        return self.stats["kernel_drops"] + self.stats["budget_drops"]

    def drain(self) -> CaptureObservations:
        """Peers and names that are new or changed since the previous drain (copies)."""
        out = CaptureObservations()
        with self._lock:
            for entry in self._peers.values():
                if entry.changed:
                    entry.changed = False
                    o = entry.obs
                    out.peers.append(PeerObservation(
                        address=o.address, port=o.port, proto=o.proto, family=o.family, direction=o.direction,
                        local_port=o.local_port, protocol=o.protocol, details=dict(o.details), flows=o.flows,
                        first_seen=o.first_seen, last_seen=o.last_seen))
            for name, (obs, changed) in list(self._names.items()):
                if changed:
                    self._names[name] = (obs, False)
                    out.names.append(NameObservation(name=obs.name, addresses=list(obs.addresses),
                                                     cnames=list(obs.cnames), count=obs.count,
                                                     first_seen=obs.first_seen, last_seen=obs.last_seen))
        return out

    # ---------------------------------------------------------------------------- the loop
    @staticmethod
    def _drain_socket(sock: socket.socket) -> None:
        while True:
            try:
                sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return

    def _account_drops(self, paused: bool) -> None:
        with self._sock_lock:
            if self._sock is None:
                return
            packets, drops = read_packet_statistics(self._sock)
        with self._lock:
            self.stats["kernel_packets"] += packets
            self.stats["budget_drops" if paused else "kernel_drops"] += drops

    def _run(self) -> None:
        _name_thread(self.THREAD_NAME.encode())
        snaplen = self.limits.snaplen
        buf = bytearray(snaplen)
        budget = self.limits.packets_per_second
        window_end = time.monotonic() + 1.0
        used = 0
        last_stats = time.monotonic()
        polled: Optional[socket.socket] = None
        poller = select.poll()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= window_end:
                    window_end, used = now + 1.0, 0
                if now - last_stats >= 1.0:
                    self._account_drops(paused=False)
                    last_stats = now
                if used >= budget:
                    self.stats["budget_pauses"] += 1
                    self._account_drops(paused=False)
                    self._stop.wait(max(0.0, window_end - time.monotonic()))
                    self._account_drops(paused=True)
                    continue
                sock = self._sock
                if sock is None:  # every port identified: sleep until set_ports/rearm opens it again
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                if sock is not polled:
                    poller = select.poll()
                    poller.register(sock.fileno(), select.POLLIN)
                    polled = sock
                if self._deadline is not None and now >= self._deadline:
                    self._dirty = True
                if not self._dirty and not poller.poll(200):
                    continue
                wall = time.time()
                with self._sock_lock:
                    if self._sock is not sock:  # closed or replaced meanwhile
                        continue
                    with self._lock:
                        for _ in range(min(256, budget - used)):
                            try:
                                n = sock.recv_into(buf, snaplen)
                            except (BlockingIOError, InterruptedError):
                                break
                            used += 1
                            self._packet(buf, n, wall)
                if self._dirty or (self._deadline is not None and time.monotonic() >= self._deadline):
                    try:
                        self._apply()
                    except (ValueError, AsbuiltError) as err:  # keep capturing with the wider filter
                        log.warning("probe=capture narrowing failed reason=%s", err)
        except OSError as err:
            self._error = str(from_oserror(err, "capture socket"))
            log.warning("probe=capture status=error reason=%s", self._error)
        except Exception as err:  # keep the host's traced service unaffected: record, never crash
            self._error = f"{type(err).__name__}: {err}"
            log.warning("probe=capture status=error reason=%s", self._error, exc_info=True)

    # -------------------------------------------------------------------- packet handling
    def _packet(self, buf: bytearray, n: int, wall: float) -> None:
        """Parse one raw IP packet (``buf[:n]``); called with the lock held."""
        stats = self.stats
        stats["packets_seen"] += 1
        if n < 20:
            stats["packets_malformed"] += 1
            return
        version = buf[0] >> 4
        if version == 4:
            ihl = (buf[0] & 0x0F) * 4
            if struct.unpack_from("!H", buf, 6)[0] & 0x1FFF:  # a later fragment: no ports
                stats["packets_ignored"] += 1
                return
            nh, end = buf[9], min(n, struct.unpack_from("!H", buf, 2)[0])
            src, dst, l4, family = bytes(buf[12:16]), bytes(buf[16:20]), ihl, socket.AF_INET
        elif version == 6 and n >= 40:
            nh, end = buf[6], min(n, 40 + struct.unpack_from("!H", buf, 4)[0])
            src, dst, l4, family = bytes(buf[8:24]), bytes(buf[24:40]), 40, socket.AF_INET6
            while nh in _IPV6_EXT or nh == 44:
                if l4 + 8 > n:
                    stats["packets_malformed"] += 1
                    return
                if nh == 44:
                    if struct.unpack_from("!H", buf, l4 + 2)[0] & 0xFFF8:
                        stats["packets_ignored"] += 1
                        return
                    nh, l4 = buf[l4], l4 + 8
                else:
                    step = (buf[l4 + 1] + 2) * 4 if nh == 51 else (buf[l4 + 1] + 1) * 8
                    nh, l4 = buf[l4], l4 + step
        else:
            stats["packets_malformed"] += 1
            return
        if nh == PROTO_TCP:
            if l4 + 20 > n:
                stats["packets_malformed"] += 1
                return
            sport, dport = struct.unpack_from("!HH", buf, l4)
            flags = buf[l4 + 13]
            start, proto = l4 + ((buf[l4 + 12] >> 4) * 4), "tcp"
        elif nh == PROTO_UDP:
            if l4 + 8 > n:
                stats["packets_malformed"] += 1
                return
            sport, dport = struct.unpack_from("!HH", buf, l4)
            flags, start, proto = 0, l4 + 8, "udp"
        else:
            stats["packets_ignored"] += 1
            return
        a, b = (src, sport), (dst, dport)
        key = (proto, a, b) if a <= b else (proto, b, a)
        flow = self._flows.get(key)
        if flow is None:
            flow = self._new_flow(key, proto, family, a, b, flags, wall)
            if flow is None:
                return
        else:
            self._flows.move_to_end(key)
        if flow.done or start >= end:
            if start < end:
                stats["packets_ignored"] += 1
            return
        d = 0 if a == flow.client else 1
        if flow.kept[d] >= self.limits.packets_per_flow:
            stats["packets_ignored"] += 1
            return
        assert flow.data is not None
        flow.kept[d] += 1
        take = min(end - start, self.limits.bytes_per_direction - len(flow.data[d]),
                   self.limits.max_buffered_bytes - self._buffered)
        if take > 0:
            flow.data[d] += buf[start:start + take]
            self._buffered += take
        if take < end - start:
            stats["payload_bytes_dropped"] += end - start - max(take, 0)
        stats["packets_kept"] += 1
        if self._pcap is not None:
            self._write_pcap(bytes(buf[:n]), wall)
        got = self._identify(flow, wall)
        settled = got is not None and got.settled
        per_flow = self.limits.packets_per_flow
        if (settled and flow.kept[0] and flow.kept[1]) or (flow.kept[0] >= per_flow and flow.kept[1] >= per_flow):
            self._finish(flow)  # evidence complete: the payload is dropped
        if flow.target is not None and not flow.judged:
            self._judge(flow, got)

    def _judge(self, flow: _Flow, got: Optional[protocols.Identification]) -> None:
        """Does this flow settle its port: known with both directions seen, or one more unknown verdict."""
        target = flow.target
        assert target is not None
        if target in self.resolved or target in self._permanent or not self.limits.narrow:
            flow.judged = True
            return
        if got is not None and got.known:
            if flow.done:
                flow.judged = True
                self._resolve(target, got.protocol)
            return
        if flow.done or (flow.kept[0] and flow.kept[1]) or max(flow.kept) >= self.limits.packets_per_flow:
            flow.judged = True  # an exchange (or a one-way burst) that no parser recognises
            count = self._unknown_flows.get(target, 0) + 1
            self._unknown_flows[target] = count
            if count >= max(1, self.limits.unknown_flows_per_port):
                self._resolve(target, got.protocol if got is not None and got.protocol else f"unknown-{target[0]}")

    def _finish(self, flow: _Flow) -> None:
        if flow.data is not None:
            self._buffered -= len(flow.data[0]) + len(flow.data[1])
        flow.done, flow.data = True, None

    def _new_flow(self, key: tuple, proto: str, family: int, a: Tuple[bytes, int], b: Tuple[bytes, int],
                  flags: int, wall: float) -> Optional[_Flow]:
        ports, listening = self.ports, self.listening
        # who is the client: the SYN's sender; else a listener's port; else the higher (ephemeral) port
        if proto == "tcp" and flags & 0x02:
            client, server = (b, a) if flags & 0x10 else (a, b)
        elif listening is not None and ((proto, a[1]) in listening) != ((proto, b[1]) in listening):
            client, server = (b, a) if (proto, a[1]) in listening else (a, b)
        else:
            client, server = (a, b) if a[1] > b[1] else (b, a)
        if listening is not None:
            inbound = (proto, server[1]) in listening
        else:
            inbound = (proto, server[1]) in ports and (proto, client[1]) not in ports
        if inbound:
            peer_key = ("inbound", proto, client[0], server[1])
        else:
            peer_key = ("outbound", proto, server[0], server[1])
        if peer_key not in self._peers:
            if len(self._peers) >= self.limits.max_peers:
                self.stats["peers_dropped"] += 1
                return None
            addr = socket.inet_ntop(family, peer_key[2])
            self._peers[peer_key] = _Peer(PeerObservation(
                address=addr, port=0 if inbound else server[1], proto=proto,
                family="inet" if family == socket.AF_INET else "inet6",
                direction="inbound" if inbound else "outbound", local_port=server[1] if inbound else 0,
                first_seen=wall, last_seen=wall))
        peer = self._peers[peer_key]
        peer.obs.flows += 1
        peer.obs.last_seen = wall
        target = (proto, server[1]) if (proto, server[1]) in ports else (
            (proto, client[1]) if (proto, client[1]) in ports else None)
        flow = _Flow(proto, client, server[1], peer_key, target)
        self._flows[key] = flow
        self.stats["flows"] += 1
        if len(self._flows) > self.limits.max_flows:
            _, evicted = self._flows.popitem(last=False)
            self._finish(evicted)
            self.stats["flows_evicted"] += 1
        return flow

    def _identify(self, flow: _Flow, wall: float) -> Optional[protocols.Identification]:
        """Update the flow's peer from its evidence so far; what was identified (``settled``: no more needed)."""
        assert flow.data is not None
        got = protocols.identify(flow.proto, bytes(flow.data[0]), bytes(flow.data[1]), flow.server_port)
        if not got.protocol:
            return None
        entry = self._peers.get(flow.peer_key)
        if entry is not None:
            obs = entry.obs
            obs.last_seen = wall
            if got.known or not obs.protocol or not _known(obs.protocol):
                if got.protocol != obs.protocol:
                    obs.protocol, obs.details = got.protocol, {}
                for k, v in got.details.items():
                    if obs.details.get(k) != v and (k in obs.details or len(obs.details) < 16):
                        obs.details[k] = v[:protocols.MAX_VALUE]
                        entry.changed = True
                entry.changed = True
        for rec in got.dns:
            self._add_name(rec, wall)
        return got

    def _add_name(self, rec: protocols.DnsRecord, wall: float) -> None:
        current = self._names.get(rec.name)
        if current is None:
            if len(self._names) >= self.limits.max_names:
                self.stats["names_dropped"] += 1
                return
            obs = NameObservation(name=rec.name, first_seen=wall)
        else:
            obs = current[0]
        for addr in rec.addresses:
            if addr not in obs.addresses and len(obs.addresses) < 32:
                obs.addresses.append(addr)
        for cname in rec.cnames:
            if cname not in obs.cnames and len(obs.cnames) < 8:
                obs.cnames.append(cname)
        obs.count += 1
        obs.last_seen = wall
        self._names[rec.name] = (obs, True)

    def _write_pcap(self, packet: bytes, wall: float) -> None:
        try:
            self._pcap.write_packet(packet, sec=int(wall), usec=int((wall % 1) * 1e6))
        except (OSError, ValueError) as err:
            log.warning("probe=capture pcap write failed, pcap closed: %s", err)
            try:
                self._pcap.close()
            except (OSError, ValueError):
                pass
            self._pcap = None


def _known(protocol: str) -> bool:
    return not protocol.startswith("unknown")


def _open_pcap(path: str):
    """A scapy RawPcapWriter on ``path`` created owner-only (0600), raw-IP link type. Raises WriteError."""
    try:
        from scapy.utils import RawPcapWriter  # optional import
    except ImportError as err:
        raise ProbeUnavailable("scapy is not installed") from err
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
        os.fchmod(fd, 0o600)
        fh = os.fdopen(fd, "wb")
    except OSError as err:
        raise WriteError(f"pcap {path}: {err.strerror}") from err
    writer = RawPcapWriter(fh, linktype=LINKTYPE_RAW, sync=False)
    writer.write_header(None)  # write_packet() does not: a run that keeps nothing still gives a valid file
    return writer
