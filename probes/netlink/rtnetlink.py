"""Links, addresses and routes of the reader's network namespace via rtnetlink (rtnetlink(7)).

Asked with a minimal client on the stdlib ``socket`` and ``struct`` modules (three dump requests on
one ``NETLINK_ROUTE`` socket, as :mod:`.sock_diag` does for sockets): importing pyroute2 alone
costs ~60-100 ms, more than the whole network part of a host scan. :func:`read_rtnetlink_pyroute2`
asks the same through pyroute2's ``IPRoute`` (imported inside it) and gives the same result; the
live tests hold the two to that. RTM_GETLINK gives each link's index, name, MAC, MTU, operstate,
master and ``IFLA_INFO_KIND`` (veth, bridge, ifb ...); RTM_GETADDR the IPv4/IPv6 addresses, each
with the subnet it implies; RTM_GETROUTE the routes of every table except ``local`` (255), whose
entries (one per own address, broadcasts, multicast) are noise that the addresses already say.
Only unicast-ish route types are kept (unicast, blackhole, unreachable, prohibit, throw).

Structures (uapi, ABI-stable): ``linux/netlink.h`` (``nlmsghdr``, ``nlattr``),
``linux/rtnetlink.h`` (``rtmsg``, ``rtattr``, ``rtnexthop``, ``RTA_*``), ``linux/if_link.h``
(``ifinfomsg``, ``IFLA_*``), ``linux/if_addr.h`` (``ifaddrmsg``, ``IFA_*``). The pure parser
:func:`parse_rtnetlink_messages` never raises on malformed input: a message or attribute that is
too short or runs past its container is skipped.

Fallback when netlink fails (or the roots are a captured tree): routes from
``/proc/net/route`` (IPv4, main table only) and ``/proc/net/ipv6_route`` (all tables, local entries
dropped), IPv6 addresses from ``/proc/net/if_inet6``; IPv4 addresses have no procfs file and stay
unknown. Links then come from sysfs alone. The caller records which mode ran.
"""
from __future__ import annotations

import errno as _errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ...agent.errors import AsbuiltError, ProbeUnavailable, from_oserror
from ...agent.model import Address, Nic, Route

MODE_NETLINK = "rtnetlink"
MODE_PROCFS = "procfs"

RT_TABLE_LOCAL = 255
TABLE_NAMES = {0: "unspec", 253: "default", 254: "main", 255: "local"}
PROTOCOL_NAMES = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 8: "gated",
                  9: "ra", 10: "mrt", 11: "zebra", 12: "bird", 13: "dnrouted", 14: "xorp",
                  15: "ntk", 16: "dhcp", 42: "babel", 186: "bgp", 187: "isis", 188: "ospf",
                  189: "rip", 192: "eigrp"}
SCOPE_NAMES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
# rtm_type values kept; local(2), broadcast(3), anycast(4), multicast(5), nat(10) are not.
_ROUTE_TYPES = {1: "", 6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw"}

# /proc/net/route and ipv6_route flags (include/uapi/linux/route.h, ipv6_route.h).
RTF_UP, RTF_GATEWAY, RTF_HOST, RTF_REJECT = 0x1, 0x2, 0x4, 0x200
RTF_LOCAL = 0x80000000


@dataclass
class NetState:
    """What the network part of the host scan learned, and how."""

    mode: str = ""
    links: List[Nic] = field(default_factory=list)  # rtnetlink links, with addresses
    addresses: Dict[str, List[Address]] = field(default_factory=dict)  # fallback: by device name
    routes: List[Route] = field(default_factory=list)


def make_address(address: str, prefixlen: int, scope: str = "") -> Address:
    """An Address with its family and implied subnet (``10.0.1.7/24`` -> ``10.0.1.0/24``)."""
    iface = ipaddress.ip_interface(f"{address}/{prefixlen}")
    return Address(address=str(iface.ip), prefixlen=prefixlen,
                   family="inet" if iface.version == 4 else "inet6",
                   subnet=str(iface.network), scope=scope)


def default_gateways(routes: List[Route]) -> List[str]:
    """Gateways of the default routes, IPv4 first, each once (pure)."""
    out: List[str] = []
    for family in ("inet", "inet6"):
        for route in routes:
            if route.family == family and route.dst == "default" and route.gateway \
                    and route.gateway not in out:
                out.append(route.gateway)
    return out


# ------------------------------------------------------------------------------ rtnetlink
def _scope(value: int) -> str:
    return SCOPE_NAMES.get(value, str(value))


def _table(value: int) -> str:
    return TABLE_NAMES.get(value, str(value))


def _link_kind(msg) -> str:
    info = msg.get_attr("IFLA_LINKINFO")
    if info is None:
        return ""
    return info.get_attr("IFLA_INFO_KIND") or ""


def _route_from_msg(msg, names: Dict[int, str]) -> List[Route]:
    rtype = msg["type"]
    table = msg.get_attr("RTA_TABLE") or msg["table"]
    if rtype not in _ROUTE_TYPES or table == RT_TABLE_LOCAL:
        return []
    family = "inet" if msg["family"] == socket.AF_INET else "inet6"
    dst = msg.get_attr("RTA_DST")
    dst_text = f"{dst}/{msg['dst_len']}" if dst else "default" if msg["dst_len"] == 0 else ""
    if _ROUTE_TYPES[rtype]:
        dst_text = f"{_ROUTE_TYPES[rtype]} {dst_text}"
    base = Route(family=family, dst=dst_text, table=_table(table),
                 protocol=PROTOCOL_NAMES.get(msg["proto"], str(msg["proto"])),
                 scope=_scope(msg["scope"]), metric=msg.get_attr("RTA_PRIORITY"),
                 prefsrc=msg.get_attr("RTA_PREFSRC") or "")
    hops = msg.get_attr("RTA_MULTIPATH")
    if not hops:
        base.gateway = msg.get_attr("RTA_GATEWAY") or ""
        base.dev = names.get(msg.get_attr("RTA_OIF") or 0, "")
        return [base]
    out = []
    for hop in hops:  # ECMP: one Route per next hop
        route = Route(**vars(base))
        route.gateway = hop.get_attr("RTA_GATEWAY") or ""
        route.dev = names.get(hop["oif"], "")
        out.append(route)
    return out


def read_rtnetlink_pyroute2() -> NetState:
    """What :func:`read_rtnetlink` reads, asked through pyroute2 (the reference it is tested against)."""
    try:
        from pyroute2 import IPRoute  # optional import, inside the probe only
    except ImportError as err:
        raise ProbeUnavailable("pyroute2 is not installed") from err
    state = NetState(mode=MODE_NETLINK)
    try:
        with IPRoute() as ipr:
            link_msgs = list(ipr.get_links())
            addr_msgs = list(ipr.get_addr())
            route_msgs = [m for fam in (socket.AF_INET, socket.AF_INET6)
                          for m in ipr.route("dump", family=fam)]
    except OSError as err:
        raise from_oserror(err, "rtnetlink dump") from err
    except Exception as err:  # pyroute2 raises its own NetlinkError/NetlinkDumpInterrupted
        raise AsbuiltError(f"rtnetlink dump: {type(err).__name__}: {err}") from err
    names = {m["index"]: m.get_attr("IFLA_IFNAME") or "" for m in link_msgs}
    by_index: Dict[int, Nic] = {}
    for m in link_msgs:
        operstate = m.get_attr("IFLA_OPERSTATE") or ""
        nic = Nic(name=names[m["index"]], index=m["index"], mac=m.get_attr("IFLA_ADDRESS") or "",
                  mtu=m.get_attr("IFLA_MTU") or 0, state=str(operstate).lower(), kind=_link_kind(m),
                  master=names.get(m.get_attr("IFLA_MASTER") or 0, ""))
        by_index[nic.index] = nic
        state.links.append(nic)
    for m in addr_msgs:
        nic = by_index.get(m["index"])
        address = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
        if nic is None or not address:
            continue
        nic.addresses.append(make_address(address, m["prefixlen"], _scope(m["scope"])))
    for m in route_msgs:
        state.routes.extend(_route_from_msg(m, names))
    return state


# ------------------------------------------------------------------- stdlib rtnetlink client
NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR, RTM_NEWROUTE, RTM_GETROUTE = 16, 18, 20, 22, 24, 26
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_OPERSTATE, IFLA_LINKINFO = 1, 3, 4, 10, 16, 18
IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS = 29, 1 << 3
IFLA_INFO_KIND = 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_MULTIPATH, RTA_TABLE = 1, 4, 5, 6, 7, 9, 15
OPERSTATES = ("UNKNOWN", "NOTPRESENT", "DOWN", "LOWERLAYERDOWN", "TESTING", "DORMANT", "UP")
DUMP_ATTEMPTS = 3  # a dump the kernel marks interrupted (NLM_F_DUMP_INTR) is asked again
RECV_BUFFER_BYTES = 1 << 20
RECV_TIMEOUT_SECONDS = 10.0

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLATTR = struct.Struct("=HH")  # len, type
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTNEXTHOP = struct.Struct("=HBBi")  # len, flags, hops, ifindex
_U32 = struct.Struct("=I")


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attributes(data: bytes, start: int, end: int) -> Dict[int, bytes]:
    """type -> payload of the netlink attributes in ``data[start:end]``; the first of a type wins
    (as pyroute2's get_attr); a truncated attribute ends the list (pure, never raises)."""
    out: Dict[int, bytes] = {}
    end = min(end, len(data))
    while start + 4 <= end:
        length, kind = _NLATTR.unpack_from(data, start)
        if length < 4 or start + length > end:
            break
        out.setdefault(kind & NLA_TYPE_MASK, data[start + 4:start + length])
        start += _align(length)
    return out


def _asciiz(value: Optional[bytes]) -> str:
    return value.split(b"\0", 1)[0].decode("utf-8", "replace") if value else ""


def _u32(value: Optional[bytes]) -> Optional[int]:
    return _U32.unpack_from(value)[0] if value is not None and len(value) >= 4 else None


def _ip(family: int, value: Optional[bytes]) -> Optional[str]:
    size = 4 if family == socket.AF_INET else 16 if family == socket.AF_INET6 else 0
    if not value or not size or len(value) < size:
        return None
    return socket.inet_ntop(family, value[:size])


def parse_rtnetlink_messages(data: bytes, seq: int = 0) -> Tuple[List[bytes], bool, int, bool]:
    """Split one netlink reply into messages (pure, never raises).

    Returns ``(messages, done, error, interrupted)``: the data messages, each whole (header
    included; ``seq`` 0 takes any sequence number), ``done`` at ``NLMSG_DONE`` or an error, ``error`` the errno of an ``NLMSG_ERROR`` (0 if none), ``interrupted`` when a message
    carries ``NLM_F_DUMP_INTR``.
    """
    out: List[bytes] = []
    done, error, interrupted = False, 0, False
    pos, end = 0, len(data)
    while pos + _NLMSGHDR.size <= end:
        length, kind, flags, mseq, _pid = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > end:
            break  # truncated: nothing after it can be trusted
        if seq and mseq != seq:
            pos += _align(length)
            continue
        interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
        if kind == NLMSG_DONE:
            done = True
            break
        if kind == NLMSG_ERROR:
            code = struct.unpack_from("=i", data, pos + 16)[0] if length >= 20 else -1
            error, done = -code, True
            break
        out.append(data[pos:pos + length])
        pos += _align(length)
    return out, done, error, interrupted


def parse_link(msg: bytes) -> Optional[Tuple[Nic, int]]:
    """(Nic, index of its master or 0) from one RTM_NEWLINK message (header included); the
    master's name is filled in by the caller, who knows every link. None when too short (pure)."""
    base = _NLMSGHDR.size
    if len(msg) < base + _IFINFOMSG.size:
        return None
    _family, _type, index, _flags, _change = _IFINFOMSG.unpack_from(msg, base)
    attrs = _attributes(msg, base + _IFINFOMSG.size, len(msg))
    mac = attrs.get(IFLA_ADDRESS)
    state = attrs.get(IFLA_OPERSTATE)
    operstate = OPERSTATES[state[0]] if state and state[0] < len(OPERSTATES) else ""
    kind = ""
    info = attrs.get(IFLA_LINKINFO)
    if info:
        kind = _asciiz(_attributes(info, 0, len(info)).get(IFLA_INFO_KIND))
    nic = Nic(name=_asciiz(attrs.get(IFLA_IFNAME)), index=index,
              mac=":".join(f"{b:02x}" for b in mac) if mac else "",
              mtu=_u32(attrs.get(IFLA_MTU)) or 0, state=operstate.lower(), kind=kind)
    return nic, _u32(attrs.get(IFLA_MASTER)) or 0


def parse_addr(msg: bytes) -> Optional[Tuple[int, Address]]:
    """(link index, Address) from one RTM_NEWADDR message; None when it has no address (pure)."""
    base = _NLMSGHDR.size
    if len(msg) < base + _IFADDRMSG.size:
        return None
    family, prefixlen, _flags, scope, index = _IFADDRMSG.unpack_from(msg, base)
    attrs = _attributes(msg, base + _IFADDRMSG.size, len(msg))
    address = _ip(family, attrs.get(IFA_LOCAL)) or _ip(family, attrs.get(IFA_ADDRESS))
    if not address:
        return None
    try:
        return index, make_address(address, prefixlen, _scope(scope))
    except ValueError:
        return None


def parse_route(msg: bytes, names: Dict[int, str]) -> List[Route]:
    """The Routes of one RTM_NEWROUTE message (one per next hop; none for the local table or a
    type not kept), as :func:`read_rtnetlink_pyroute2` renders them (pure)."""
    base = _NLMSGHDR.size
    if len(msg) < base + _RTMSG.size:
        return []
    family, dst_len, _src_len, _tos, table, proto, scope, rtype, _flags = _RTMSG.unpack_from(msg, base)
    attrs = _attributes(msg, base + _RTMSG.size, len(msg))
    table = _u32(attrs.get(RTA_TABLE)) or table
    if rtype not in _ROUTE_TYPES or table == RT_TABLE_LOCAL or family not in (socket.AF_INET, socket.AF_INET6):
        return []
    dst = _ip(family, attrs.get(RTA_DST))
    dst_text = f"{dst}/{dst_len}" if dst else "default" if dst_len == 0 else ""
    if _ROUTE_TYPES[rtype]:
        dst_text = f"{_ROUTE_TYPES[rtype]} {dst_text}"
    base_route = Route(family="inet" if family == socket.AF_INET else "inet6", dst=dst_text,
                       table=_table(table), protocol=PROTOCOL_NAMES.get(proto, str(proto)),
                       scope=_scope(scope), metric=_u32(attrs.get(RTA_PRIORITY)),
                       prefsrc=_ip(family, attrs.get(RTA_PREFSRC)) or "")
    hops = attrs.get(RTA_MULTIPATH)
    if not hops:
        base_route.gateway = _ip(family, attrs.get(RTA_GATEWAY)) or ""
        base_route.dev = names.get(_u32(attrs.get(RTA_OIF)) or 0, "")
        return [base_route]
    out = []
    pos = 0
    while pos + _RTNEXTHOP.size <= len(hops):  # ECMP: one Route per next hop
        length, _hflags, _hops, ifindex = _RTNEXTHOP.unpack_from(hops, pos)
        if length < _RTNEXTHOP.size or pos + length > len(hops):
            break
        hop_attrs = _attributes(hops, pos + _RTNEXTHOP.size, pos + length)
        route = Route(**vars(base_route))
        route.gateway = _ip(family, hop_attrs.get(RTA_GATEWAY)) or ""
        route.dev = names.get(ifindex, "")
        out.append(route)
        pos += _align(length)
    return out


def _request(kind: int, seq: int, body: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def _dump(sock: socket.socket, kind: int, body: bytes, seq: int, what: str) -> List[bytes]:
    """Every RTM_NEW* message of one dump (asked again when the kernel says it was interrupted)."""
    buf = bytearray(RECV_BUFFER_BYTES)
    for attempt in range(DUMP_ATTEMPTS):
        try:
            sock.sendall(_request(kind, seq + attempt, body))
        except OSError as err:
            raise from_oserror(err, f"rtnetlink {what} request") from err
        msgs: List[bytes] = []
        interrupted = False
        while True:
            try:
                nbytes = sock.recv_into(buf)
            except socket.timeout as err:
                raise AsbuiltError(f"rtnetlink {what}: no reply from the kernel") from err
            except OSError as err:
                raise from_oserror(err, f"rtnetlink {what} reply") from err
            if nbytes == 0:
                raise AsbuiltError(f"rtnetlink {what}: empty reply")
            got, done, error, intr = parse_rtnetlink_messages(bytes(buf[:nbytes]), seq + attempt)
            msgs.extend(got)
            interrupted = interrupted or intr
            if error:
                raise AsbuiltError(f"rtnetlink {what}: kernel refused the dump ({os.strerror(error)})")
            if done:
                break
        if not interrupted:
            return msgs
    raise AsbuiltError(f"rtnetlink {what}: dump interrupted {DUMP_ATTEMPTS} times (NLM_F_DUMP_INTR)")


def read_rtnetlink() -> NetState:
    """Links, addresses and routes of this network namespace (see module docstring)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    except (OSError, AttributeError) as err:
        if isinstance(err, AttributeError) or err.errno in (_errno.EPROTONOSUPPORT, _errno.EAFNOSUPPORT):
            raise ProbeUnavailable("netlink route sockets are not available here") from err
        raise from_oserror(err, "rtnetlink socket") from err
    try:
        try:
            sock.bind((0, 0))
            sock.settimeout(RECV_TIMEOUT_SECONDS)
        except OSError as err:
            raise from_oserror(err, "rtnetlink socket") from err
        ext_mask = _NLATTR.pack(8, IFLA_EXT_MASK) + _U32.pack(RTEXT_FILTER_SKIP_STATS)
        link_msgs = _dump(sock, RTM_GETLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + ext_mask,
                          100, "links")
        addr_msgs = _dump(sock, RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0), 200, "addresses")
        route_msgs = [m for n, fam in enumerate((socket.AF_INET, socket.AF_INET6))
                      for m in _dump(sock, RTM_GETROUTE, _RTMSG.pack(fam, 0, 0, 0, 0, 0, 0, 0, 0),
                                     300 + 10 * n, "routes")]
    finally:
        sock.close()
    state = NetState(mode=MODE_NETLINK)
    links = [got for got in (parse_link(m) for m in link_msgs if _msg_type(m) == RTM_NEWLINK) if got]
    names = {nic.index: nic.name for nic, _ in links}
    by_index: Dict[int, Nic] = {}
    for nic, master in links:
        nic.master = names.get(master, "")
        by_index[nic.index] = nic
        state.links.append(nic)
    for m in addr_msgs:
        got = parse_addr(m) if _msg_type(m) == RTM_NEWADDR else None
        nic = by_index.get(got[0]) if got else None
        if nic is not None:
            nic.addresses.append(got[1])
    for m in route_msgs:
        if _msg_type(m) == RTM_NEWROUTE:
            state.routes.extend(parse_route(m, names))
    return state


def _msg_type(msg: bytes) -> int:
    return _NLMSGHDR.unpack_from(msg, 0)[1]


# ------------------------------------------------------------------------- procfs fallback
def _hex_ipv4(text: str) -> str:
    """``0102A8C0`` (host byte order, little-endian on x86) -> ``192.168.2.1``."""
    return socket.inet_ntoa(struct.pack("=I", int(text, 16)))


def _hex_ipv6(text: str) -> str:
    return str(ipaddress.IPv6Address(bytes.fromhex(text)))


def _prefix_of_mask(mask: int) -> Optional[int]:
    bits = bin(mask).count("1")
    return bits if mask == ((1 << 32) - 1) ^ ((1 << (32 - bits)) - 1) else None


def parse_proc_net_route(text: str) -> List[Route]:
    """IPv4 routes of the main table from ``/proc/net/route`` (pure).

    Columns: Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT; addresses and
    masks are the network-order value printed as a host-order hex number, so they are decoded in
    this machine's byte order (a tree captured on a machine of the other endianness would not be).
    Malformed lines (and the header) are skipped.
    """
    out: List[Route] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 8 or words[0] == "Iface":
            continue
        try:
            dst, gateway = _hex_ipv4(words[1]), _hex_ipv4(words[2])
            flags, metric = int(words[3], 16), int(words[6])
            prefix = _prefix_of_mask(int.from_bytes(struct.pack("=I", int(words[7], 16)), "big"))
        except (ValueError, struct.error, OSError):
            continue
        if prefix is None or not flags & RTF_UP:
            continue
        dst_text = "default" if prefix == 0 else f"{dst}/{prefix}"
        if flags & RTF_REJECT:
            dst_text = f"unreachable {dst_text}"
        out.append(Route(family="inet", dst=dst_text, dev=words[0] if words[0] != "*" else "",
                         gateway=gateway if flags & RTF_GATEWAY else "", table="main",
                         scope="global" if flags & RTF_GATEWAY else "link", metric=metric))
    return out


def parse_proc_net_ipv6_route(text: str) -> List[Route]:
    """IPv6 routes from ``/proc/net/ipv6_route`` without local-table noise (pure).

    Columns: dst dst_len src src_len next_hop metric refcnt use flags dev (hex). Dropped: routes
    flagged RTF_LOCAL (own addresses), the kernel's ``ip6_null_entry`` (reject, metric 0xffffffff
    on lo) and multicast (ff00::/8) destinations. The file does not say the table: "" here.
    """
    out: List[Route] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 10 or len(words[0]) != 32 or len(words[4]) != 32:
            continue
        try:
            dst = ipaddress.IPv6Address(bytes.fromhex(words[0]))
            dst_len, nexthop = int(words[1], 16), _hex_ipv6(words[4])
            metric, flags = int(words[5], 16), int(words[8], 16)
        except ValueError:
            continue
        dev = words[9]
        if flags & RTF_LOCAL or dst.is_multicast or not flags & RTF_UP or dst_len > 128:
            continue
        if flags & RTF_REJECT and metric == 0xFFFFFFFF:
            continue
        dst_text = "default" if dst_len == 0 else f"{dst}/{dst_len}"
        if flags & RTF_REJECT:
            dst_text = f"unreachable {dst_text}"
        out.append(Route(family="inet6", dst=dst_text, dev=dev,
                         gateway=nexthop if flags & RTF_GATEWAY else "", metric=metric,
                         scope="global" if flags & RTF_GATEWAY else "link" if dst_len else "global"))
    return out


_IF_INET6_SCOPES = {0x00: "global", 0x10: "host", 0x20: "link", 0x40: "site"}


def parse_if_inet6(text: str) -> Dict[str, List[Address]]:
    """IPv6 addresses by device from ``/proc/net/if_inet6`` (pure).

    Columns: address ifindex prefixlen scope flags devname (hex).
    """
    out: Dict[str, List[Address]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 6 or len(words[0]) != 32:
            continue
        try:
            address = _hex_ipv6(words[0])
            prefixlen, scope = int(words[2], 16), int(words[3], 16)
            addr = make_address(address, prefixlen, _IF_INET6_SCOPES.get(scope, str(scope)))
        except ValueError:
            continue
        out.setdefault(words[5], []).append(addr)
    return out


def _read(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("ascii", "replace")
    except OSError as err:
        raise from_oserror(err, path) from err


def read_procfs_fallback(proc_root: str, on_problem=None) -> NetState:
    """Routes and IPv6 addresses from ``<proc_root>/net/*`` (see module docstring).

    A missing file (IPv6 disabled) leaves its part empty and is told to ``on_problem(kind, subject,
    detail)`` when given.
    """
    state = NetState(mode=MODE_PROCFS)
    parts = (("route", lambda t: state.routes.extend(parse_proc_net_route(t))),
             ("ipv6_route", lambda t: state.routes.extend(parse_proc_net_ipv6_route(t))),
             ("if_inet6", lambda t: state.addresses.update(parse_if_inet6(t))))
    for name, use in parts:
        path = os.path.join(proc_root, "net", name)
        try:
            use(_read(path))
        except AsbuiltError as err:
            if on_problem:
                on_problem("absent", path, str(err))
    return state
