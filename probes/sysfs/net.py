"""Network interfaces from ``/sys/class/net/*`` (Documentation/ABI/testing/sysfs-class-net).

Per interface: ``address`` (MAC), ``mtu``, ``operstate``, ``speed`` (Mb/s; EINVAL or -1 when the
link has none), ``ifindex``/``iflink``, ``type`` (ARPHRD_*), ``uevent`` (``DEVTYPE=``), the
``device/driver`` link (driver of a hardware NIC), the ``master`` link (bridge or bond it is enslaved
to) and the presence of ``bridge/``, ``bonding/`` and ``tun_flags``. The kind is a best guess from
those; rtnetlink's ``IFLA_INFO_KIND`` (when it can be asked) is exact and wins in the merge.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from ...agent.model import Nic
from . import link_name, list_dir, read_attr, read_int

ARPHRD_LOOPBACK = 772
ARPHRD_NONE = 65534
# ARPHRD_* of tunnel devices that carry no DEVTYPE.
_TUNNEL_TYPES = {768: "ipip", 769: "ip6tnl", 776: "sit", 778: "gre", 823: "ip6gre"}
# uevent DEVTYPE values and the kind they name.
_DEVTYPE_KINDS = {"bridge": "bridge", "bond": "bond", "vlan": "vlan", "wireguard": "wireguard",
                  "wlan": "wireless", "macsec": "macsec", "vxlan": "vxlan", "geneve": "geneve",
                  "team": "team", "ppp": "ppp", "dsa": "dsa", "gadget": "usb-gadget"}


def parse_uevent(text: str) -> Dict[str, str]:
    """``KEY=value`` lines of a sysfs ``uevent`` file; lines without ``=`` are ignored."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def classify(arphrd: Optional[int], devtype: str, has_device: bool, has_bridge: bool,
             has_bonding: bool, has_tun_flags: bool, ifindex: Optional[int],
             iflink: Optional[int]) -> str:
    """The kind of an interface from its sysfs facts (pure; see the module docstring)."""
    if arphrd == ARPHRD_LOOPBACK:
        return "loopback"
    if has_bridge:
        return "bridge"
    if has_bonding:
        return "bond"
    if devtype:
        return _DEVTYPE_KINDS.get(devtype, devtype)
    if has_tun_flags:
        return "tun"
    if arphrd in _TUNNEL_TYPES:
        return _TUNNEL_TYPES[arphrd]
    if has_device:
        return "physical"
    if arphrd == ARPHRD_NONE:
        return "tun"
    if ifindex is not None and iflink is not None and iflink not in (0, ifindex):
        return "veth"  # a virtual Ethernet with a peer link; macvlan/ipvlan look alike (netlink tells)
    return "virtual"


def read_nic(sys_root: str, name: str) -> Nic:
    """One interface's sysfs facts as a Nic (no addresses: those come from rtnetlink)."""
    base = os.path.join(sys_root, "class", "net", name)
    has_device = os.path.lexists(os.path.join(base, "device"))
    uevent = parse_uevent(read_attr(os.path.join(base, "uevent")) or "")
    ifindex = read_int(os.path.join(base, "ifindex"))
    iflink = read_int(os.path.join(base, "iflink"))
    speed = read_int(os.path.join(base, "speed"))
    nic = Nic(name=name, index=ifindex or 0,
              mac=read_attr(os.path.join(base, "address")) or "",
              mtu=read_int(os.path.join(base, "mtu")) or 0,
              state=read_attr(os.path.join(base, "operstate")) or "",
              driver=link_name(os.path.join(base, "device", "driver")) if has_device else "",
              speed_mbps=speed if speed is not None and speed > 0 else None,
              master=link_name(os.path.join(base, "master")))
    nic.kind = classify(read_int(os.path.join(base, "type")), uevent.get("DEVTYPE", ""), has_device,
                        os.path.isdir(os.path.join(base, "bridge")),
                        os.path.isdir(os.path.join(base, "bonding")),
                        os.path.exists(os.path.join(base, "tun_flags")), ifindex, iflink)
    return nic


def read_nics(sys_root: str) -> List[Nic]:
    """Every interface under ``<sys_root>/class/net``, ordered by ifindex then name."""
    nics = [read_nic(sys_root, name)
            for name in list_dir(os.path.join(sys_root, "class", "net"), "sysfs class/net")
            if name != "bonding_masters"]
    return sorted(nics, key=lambda n: (n.index or 1 << 30, n.name))
