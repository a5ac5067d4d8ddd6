"""Sockets from the kernel's NETLINK_SOCK_DIAG: TCP/UDP over IPv4/IPv6, and unix sockets.

A minimal client on the stdlib ``socket`` and ``struct`` modules (pyroute2 parses each message in
pure Python objects and is too slow for hosts with tens of thousands of sockets). One dump request
per (family, protocol) with ``SOCK_DIAG_BY_FAMILY`` and ``NLM_F_DUMP``; the multi-part reply is read
into one large reusable buffer until ``NLMSG_DONE``.

Kernel documentation and the structures read here (all uapi, ABI-stable):

- ``man 7 sock_diag`` -- the protocol, request and reply layout, with an example client.
- ``linux/inet_diag.h`` -- ``struct inet_diag_req_v2`` (56 bytes), ``struct inet_diag_msg``
  (72 bytes) with ``struct inet_diag_sockid`` (ports big-endian, addresses in network order),
  attributes ``INET_DIAG_INFO`` (2) and ``INET_DIAG_CGROUP_ID`` (21).
- ``linux/tcp.h`` -- ``struct tcp_info`` carried in ``INET_DIAG_INFO`` for TCP:
  ``tcpi_bytes_acked`` at offset 120, ``tcpi_bytes_received`` at 128 (Linux 4.1+),
  ``tcpi_bytes_sent`` at 200 (4.19+). Older kernels send a shorter struct, so every field is read
  only when the attribute is long enough; otherwise it stays None.
- ``linux/unix_diag.h`` -- ``struct unix_diag_req`` (24 bytes), ``struct unix_diag_msg``
  (16 bytes), attributes ``UNIX_DIAG_NAME`` (0), ``UNIX_DIAG_VFS`` (1), ``UNIX_DIAG_PEER`` (2),
  ``UNIX_DIAG_UID`` (7, Linux 5.3+).

Rendering: TCP states by their kernel names (``LISTEN``, ``ESTABLISHED``, ``TIME_WAIT`` ...); an
unconnected UDP or unix socket (kernel state ``TCP_CLOSE``) is ``UNCONN`` as ``ss`` shows it. An
IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, a dual-stack socket talking IPv4) is rendered as the
plain IPv4 address, the socket's ``family`` staying ``inet6``. Abstract unix names are ``@name``
(embedded NULs also shown as ``@``, like ``ss``). TIME_WAIT and SYN_RECV entries are not full
sockets: their ``inode`` and ``uid`` are 0.

The pure parsers :func:`parse_inet_messages` and :func:`parse_unix_messages` take the bytes of
one or more netlink messages and never raise on malformed input: a message that is too short or
whose length runs past the buffer is skipped and counted in ``Batch.skipped``. A kernel that
cannot dump a protocol (no ``udp_diag``: ``ENOENT``/``EINVAL``) yields what the other dumps found
plus a note.
"""
from __future__ import annotations

import errno as _errno
import itertools
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple, Union

from ...agent.errors import AsbuiltError, ProbeUnavailable, from_oserror

log = logging.getLogger(__name__)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLM_F_DUMP_INTR = 0x10

INET_DIAG_INFO, INET_DIAG_CGROUP_ID = 2, 21
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_UID = 0, 1, 2, 7
UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER, UDIAG_SHOW_UID = 0x1, 0x2, 0x4, 0x40
ALL_STATES = 0xFFFFFFFF
NOCOOKIE = 0xFFFFFFFF

# struct tcp_info offsets (linux/tcp.h).
TCPI_BYTES_ACKED, TCPI_BYTES_RECEIVED, TCPI_BYTES_SENT = 120, 128, 200

RECV_BUFFER_BYTES = 1 << 20  # one recvmsg; the kernel fills at most ~32 KiB per dump chunk
SOCKET_RCVBUF_BYTES = 1 << 20
RECV_TIMEOUT_SECONDS = 10.0

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_INET_REQ = struct.Struct("=BBBBI" "HH16s16sI8s")  # inet_diag_req_v2 (ports/addresses raw)
_UNIX_REQ = struct.Struct("=BBHIIIII")  # unix_diag_req
# inet_diag_msg: family, state, timer, retrans; sockid: sport, dport (big-endian) src, dst, if,
# cookie[2]; expires, rqueue, wqueue, uid, inode.
_INET_HEAD = struct.Struct("=BBBB")
_INET_PORTS = struct.Struct("!HH")
_INET_REST = struct.Struct("=16s16sIII" "IIIII")
_INET_MSG_BYTES = 72
_UNIX_MSG = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie[2]
_UNIX_MSG_BYTES = 16
_RTA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_U64 = struct.Struct("=Q")
_U32X2 = struct.Struct("=II")
_U64X2 = struct.Struct("=QQ")

TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING", 12: "NEW_SYN_RECV", 13: "BOUND_INACTIVE"}
UDP_STATES = {1: "ESTABLISHED", 7: "UNCONN"}
UNIX_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 7: "UNCONN", 10: "LISTEN"}
UNIX_TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "dgram",
              socket.SOCK_SEQPACKET: "seqpacket"}
PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}
FAMILIES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}

# (family, protocol) pairs dumped by dump_inet, in order.
INET_DUMPS = ((socket.AF_INET, socket.IPPROTO_TCP), (socket.AF_INET6, socket.IPPROTO_TCP),
              (socket.AF_INET, socket.IPPROTO_UDP), (socket.AF_INET6, socket.IPPROTO_UDP))

_seq = itertools.count(1)


@dataclass
class InetSocket:
    """One TCP or UDP socket (or TIME_WAIT / SYN_RECV mini-socket, whose inode and uid are 0)."""

    family: str  # inet, inet6
    proto: str  # tcp, udp
    state: str  # LISTEN, ESTABLISHED, TIME_WAIT ... ; UNCONN for unconnected UDP
    local_address: str
    local_port: int
    remote_address: str
    remote_port: int
    inode: int
    uid: int
    interface: int = 0  # bound device index (SO_BINDTODEVICE), 0 none
    cookie: int = 0  # the kernel's socket cookie (as bpf_get_socket_cookie)
    rqueue: int = 0  # LISTEN: accept backlog; else bytes not yet read
    wqueue: int = 0  # LISTEN: backlog limit; else bytes not yet sent/acked
    bytes_acked: Optional[int] = None  # TCP, tcp_info (4.1+): bytes we sent that the peer acked
    bytes_received: Optional[int] = None  # TCP, tcp_info (4.1+)
    bytes_sent: Optional[int] = None  # TCP, tcp_info (4.19+), including retransmissions
    cgroup_id: Optional[int] = None  # cgroup v2 id of the owner (INET_DIAG_CGROUP_ID, 5.7+)


@dataclass
class UnixSocket:
    """One unix-domain socket."""

    inode: int
    type: str  # stream, dgram, seqpacket
    state: str  # LISTEN, ESTABLISHED, UNCONN, SYN_SENT
    path: str = ""  # bound name: a filesystem path, "@name" for abstract, "" unbound
    peer_inode: int = 0  # the connected peer's inode, 0 none
    vfs_inode: int = 0  # inode of the socket file on disk (path sockets), 0 none
    vfs_dev: int = 0
    uid: Optional[int] = None  # owner (UNIX_DIAG_UID, 5.3+)
    cookie: int = 0


@dataclass
class Batch:
    """What one parse of a receive buffer found."""

    sockets: List[Any] = field(default_factory=list)
    done: bool = False  # NLMSG_DONE seen: the dump is complete
    error: int = 0  # positive errno from an NLMSG_ERROR (or a failed NLMSG_DONE), 0 none
    skipped: int = 0  # malformed or truncated messages skipped
    stale: int = 0  # messages of another request (sequence number not the one asked for)
    interrupted: bool = False  # NLM_F_DUMP_INTR: the set changed during the dump


# ---------------------------------------------------------------------------------- parsing
_ADDR_CACHE: dict = {}
_ADDR_CACHE_MAX = 8192
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def ip_text(family: int, raw: bytes) -> str:
    """:func:`format_address` for AF_INET/AF_INET6, "" for any other family (eBPF probes' addresses)."""
    if family not in (socket.AF_INET, socket.AF_INET6):
        return ""
    return format_address(family, raw)


def format_address(family: int, raw: bytes) -> str:
    """Render a sockid address (16 bytes, network order) of ``family``; cached."""
    key = (family, raw)
    text = _ADDR_CACHE.get(key)
    if text is not None:
        return text
    if family == socket.AF_INET:
        text = socket.inet_ntop(socket.AF_INET, raw[:4])
    elif raw[:12] == _V4_MAPPED:
        text = socket.inet_ntop(socket.AF_INET, raw[12:16])
    else:
        text = socket.inet_ntop(socket.AF_INET6, raw[:16])
    if len(_ADDR_CACHE) >= _ADDR_CACHE_MAX:
        _ADDR_CACHE.clear()
    _ADDR_CACHE[key] = text
    return text


def _frames(buf: bytes, batch: Batch, seq: Optional[int]):
    """Yield (type, payload start, message end) per netlink message; count bad framing.

    With ``seq`` given, messages with another sequence number (left over from an earlier, aborted
    dump on the same socket) are passed over and counted in ``batch.stale``.
    """
    size = len(buf)
    off = 0
    while off < size:
        if size - off < 16:
            batch.skipped += 1  # a truncated header
            return
        length, mtype, flags, mseq, _pid = _NLMSGHDR.unpack_from(buf, off)
        if length < 16 or off + length > size:
            batch.skipped += 1  # framing lost: nothing after this can be trusted
            return
        if seq is not None and mseq != seq:
            batch.stale += 1
            off += (length + 3) & ~3
            continue
        if flags & NLM_F_DUMP_INTR:
            batch.interrupted = True
        if mtype == NLMSG_DONE:
            batch.done = True
            if length >= 20:
                (code,) = _I32.unpack_from(buf, off + 16)
                if code < 0:
                    batch.error = -code
            return
        if mtype == NLMSG_ERROR:
            if length >= 20:
                (code,) = _I32.unpack_from(buf, off + 16)
                if code < 0:
                    batch.error = -code
                    return
                # code 0 is an ACK: nothing to report
            else:
                batch.skipped += 1
                batch.error = _errno.EBADMSG
                return
        else:
            yield mtype, off + 16, off + length
        off += (length + 3) & ~3


def parse_inet_messages(buf: bytes, proto: int = socket.IPPROTO_TCP,
                        seq: Optional[int] = None) -> Batch:
    """Parse ``inet_diag_msg`` replies (SOCK_DIAG_BY_FAMILY) into :class:`InetSocket` objects.

    The reply does not carry its protocol; ``proto`` (what was asked for) names it and its states.
    ``seq``: only messages answering that request (see :func:`_frames`).
    Pure: never raises on malformed input; bad messages are skipped and counted.
    """
    batch = Batch()
    pname = PROTOCOLS.get(proto) or str(proto)
    states = UDP_STATES if proto == socket.IPPROTO_UDP else TCP_STATES
    out = batch.sockets
    head_unpack, ports_unpack, rest_unpack = (_INET_HEAD.unpack_from, _INET_PORTS.unpack_from,
                                              _INET_REST.unpack_from)
    rta_unpack = _RTA.unpack_from
    families, cache = FAMILIES, _ADDR_CACHE
    for mtype, start, end in _frames(buf, batch, seq):
        if mtype != SOCK_DIAG_BY_FAMILY or end - start < _INET_MSG_BYTES:
            batch.skipped += 1
            continue
        family, state, _timer, _retrans = head_unpack(buf, start)
        fname = families.get(family)
        if fname is None:
            batch.skipped += 1
            continue
        sport, dport = ports_unpack(buf, start + 4)
        (src, dst, ifindex, cookie0, cookie1,
         _expires, rqueue, wqueue, uid, inode) = rest_unpack(buf, start + 8)
        local = cache.get((family, src)) or format_address(family, src)
        remote = cache.get((family, dst)) or format_address(family, dst)
        sname = states.get(state) or TCP_STATES.get(state) or f"UNKNOWN({state})"
        sock = InetSocket(fname, pname, sname, local, sport, remote, dport, inode, uid, ifindex,
                          cookie0 | (cookie1 << 32), rqueue, wqueue)
        # attributes
        a = start + _INET_MSG_BYTES
        while a + 4 <= end:
            alen, atype = rta_unpack(buf, a)
            if alen < 4 or a + alen > end:
                batch.skipped += 1  # counted, the socket is kept
                break
            atype &= 0x3FFF  # NLA_F_NESTED / NLA_F_NET_BYTEORDER
            if atype == INET_DIAG_INFO:
                plen = alen - 4
                if plen >= TCPI_BYTES_RECEIVED + 8:
                    sock.bytes_acked, sock.bytes_received = _U64X2.unpack_from(
                        buf, a + 4 + TCPI_BYTES_ACKED)
                elif plen >= TCPI_BYTES_ACKED + 8:
                    (sock.bytes_acked,) = _U64.unpack_from(buf, a + 4 + TCPI_BYTES_ACKED)
                if plen >= TCPI_BYTES_SENT + 8:
                    (sock.bytes_sent,) = _U64.unpack_from(buf, a + 4 + TCPI_BYTES_SENT)
            elif atype == INET_DIAG_CGROUP_ID and alen >= 12:
                (sock.cgroup_id,) = _U64.unpack_from(buf, a + 4)
            a += (alen + 3) & ~3
        out.append(sock)
    return batch


def _unix_name(raw: bytes) -> str:
    if not raw:
        return ""
    if raw[0] == 0:  # abstract: every byte is part of the name
        return "@" + raw[1:].decode("utf-8", "backslashreplace").replace("\0", "@")
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def parse_unix_messages(buf: bytes, seq: Optional[int] = None) -> Batch:
    """Parse ``unix_diag_msg`` replies into :class:`UnixSocket` objects.

    Pure: never raises on malformed input; bad messages are skipped and counted.
    """
    batch = Batch()
    out = batch.sockets
    msg_unpack, rta_unpack, u32_unpack = _UNIX_MSG.unpack_from, _RTA.unpack_from, _U32.unpack_from
    for mtype, start, end in _frames(buf, batch, seq):
        if mtype != SOCK_DIAG_BY_FAMILY or end - start < _UNIX_MSG_BYTES:
            batch.skipped += 1
            continue
        family, stype, state, _pad, ino, cookie0, cookie1 = msg_unpack(buf, start)
        if family != socket.AF_UNIX:
            batch.skipped += 1
            continue
        sock = UnixSocket(ino, UNIX_TYPES.get(stype) or f"type{stype}",
                          UNIX_STATES.get(state) or f"UNKNOWN({state})",
                          cookie=cookie0 | (cookie1 << 32))
        a = start + _UNIX_MSG_BYTES
        while a + 4 <= end:
            alen, atype = rta_unpack(buf, a)
            if alen < 4 or a + alen > end:
                batch.skipped += 1
                break
            atype &= 0x3FFF
            if atype == UNIX_DIAG_NAME:
                sock.path = _unix_name(bytes(buf[a + 4:a + alen]))
            elif atype == UNIX_DIAG_PEER and alen >= 8:
                (sock.peer_inode,) = u32_unpack(buf, a + 4)
            elif atype == UNIX_DIAG_VFS and alen >= 12:
                sock.vfs_inode, sock.vfs_dev = _U32X2.unpack_from(buf, a + 4)
            elif atype == UNIX_DIAG_UID and alen >= 8:
                (sock.uid,) = u32_unpack(buf, a + 4)
            a += (alen + 3) & ~3
        out.append(sock)
    return batch


# ---------------------------------------------------------------------------------- requests
def inet_request(family: int, proto: int, seq: int = 0) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request (``inet_diag_req_v2``) for every state of one pair."""
    ext = (1 << (INET_DIAG_INFO - 1)) if proto == socket.IPPROTO_TCP else 0
    body = _INET_REQ.pack(family, proto, ext, 0, ALL_STATES, 0, 0, b"", b"", 0,
                          struct.pack("=II", NOCOOKIE, NOCOOKIE))
    return _NLMSGHDR.pack(16 + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                          seq, 0) + body


def unix_request(seq: int = 0, show: int = UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER
                 | UDIAG_SHOW_UID) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request (``unix_diag_req``) for every unix socket."""
    body = _UNIX_REQ.pack(socket.AF_UNIX, 0, 0, ALL_STATES, 0, show, NOCOOKIE, NOCOOKIE)
    return _NLMSGHDR.pack(16 + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                          seq, 0) + body


# ---------------------------------------------------------------------------------- I/O
def open_socket() -> socket.socket:
    """A NETLINK_SOCK_DIAG socket, bound, with a large receive buffer.

    The socket stays bound to the network namespace of the thread that created it.
    """
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             NETLINK_SOCK_DIAG)
    except OSError as err:
        if err.errno in (_errno.EPROTONOSUPPORT, _errno.EAFNOSUPPORT):
            raise ProbeUnavailable("netlink sock_diag is not available in this kernel") from err
        raise from_oserror(err, "netlink sock_diag socket") from err
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_RCVBUF_BYTES)
        sock.bind((0, 0))
        sock.settimeout(RECV_TIMEOUT_SECONDS)
    except OSError as err:
        sock.close()
        raise from_oserror(err, "netlink sock_diag socket") from err
    return sock


def _dump(sock: socket.socket, request: bytes, parse: Callable[[bytes, int], Batch],
          what: str, notes: Optional[List[str]]) -> list:
    """Send one dump request and read every part of the reply; errors of the dump become notes."""
    try:
        sock.sendall(request)
    except OSError as err:
        raise from_oserror(err, f"sock_diag {what} request") from err
    (seq,) = _U32.unpack_from(request, 8)
    buf = bytearray(RECV_BUFFER_BYTES)
    view = memoryview(buf)
    sockets: list = []
    skipped = 0
    interrupted = False
    while True:
        try:
            nbytes, _anc, flags, _addr = sock.recvmsg_into([view])
        except socket.timeout as err:
            raise AsbuiltError(f"sock_diag {what}: no reply from the kernel") from err
        except OSError as err:
            if err.errno == _errno.ENOBUFS:  # reply overran the socket buffer: partial dump
                _note(notes, f"sock_diag {what}: receive buffer overrun, dump incomplete")
                break
            raise from_oserror(err, f"sock_diag {what} reply") from err
        if nbytes == 0:
            _note(notes, f"sock_diag {what}: empty reply, dump incomplete")
            break
        if flags & socket.MSG_TRUNC:
            _note(notes, f"sock_diag {what}: reply larger than the receive buffer, part lost")
        batch = parse(bytes(view[:nbytes]), seq)
        sockets.extend(batch.sockets)
        skipped += batch.skipped
        interrupted = interrupted or batch.interrupted
        if batch.error:
            name = _errno.errorcode.get(batch.error, str(batch.error))
            _note(notes, f"sock_diag {what}: kernel refused the dump ({name}: "
                         f"{os.strerror(batch.error)})")
            break
        if batch.done:
            break
    if skipped:
        _note(notes, f"sock_diag {what}: {skipped} malformed message(s) skipped")
    if interrupted:
        _note(notes, f"sock_diag {what}: sockets changed during the dump (NLM_F_DUMP_INTR)")
    return sockets


def _note(notes: Optional[List[str]], text: str) -> None:
    log.info("%s", text)
    if notes is not None:
        notes.append(text)


def dump_inet(sock: Optional[socket.socket] = None, notes: Optional[List[str]] = None,
              dumps: Tuple[Tuple[int, int], ...] = INET_DUMPS) -> List[InetSocket]:
    """Every TCP and UDP socket (IPv4 and IPv6, all states) of ``sock``'s network namespace.

    ``sock`` is a socket from :func:`open_socket` (made here, in the caller's namespace, when None).
    A protocol the kernel cannot dump (no ``udp_diag``: ENOENT) adds a line to ``notes`` instead
    of failing the others. ``dumps`` lists the (family, protocol) pairs asked for.
    """
    own = sock is None
    if own:
        sock = open_socket()
    try:
        out: List[InetSocket] = []
        for family, proto in dumps:
            what = f"{PROTOCOLS.get(proto, proto)}/{FAMILIES.get(family, family)}"
            out.extend(_dump(sock, inet_request(family, proto, next(_seq)),
                             lambda b, s, p=proto: parse_inet_messages(b, p, s), what, notes))
        return out
    finally:
        if own:
            sock.close()


def dump_unix(sock: Optional[socket.socket] = None,
              notes: Optional[List[str]] = None) -> List[UnixSocket]:
    """Every unix-domain socket of ``sock``'s network namespace (see :func:`dump_inet`)."""
    own = sock is None
    if own:
        sock = open_socket()
    try:
        return _dump(sock, unix_request(next(_seq)), parse_unix_messages, "unix", notes)
    finally:
        if own:
            sock.close()


def dump_all(netns: Union[None, int, str] = None,
             notes: Optional[List[str]] = None) -> Tuple[List[InetSocket], List[UnixSocket]]:
    """(inet sockets, unix sockets) of the caller's network namespace, or of ``netns``.

    ``netns`` is a namespace file path (``/proc/PID/ns/net``, ``/run/netns/NAME``) or an open fd
    of one; only the netlink socket is created inside it (in a short-lived thread), the dump itself
    runs here. Raises Vanished when the namespace is gone, Denied without the privilege.
    """
    if netns is None:
        sock = open_socket()
    else:
        from .netns import in_netns
        sock = in_netns(netns, open_socket)
    try:
        return dump_inet(sock, notes), dump_unix(sock, notes)
    finally:
        sock.close()
