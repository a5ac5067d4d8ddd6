"""Host facts: distribution, kernel, CPU, memory, mounts, disks, NICs, routes, DNS, devices.

:func:`collect_host` calls each reader in turn; each part is guarded, so one that fails records a
gap (``absent``, ``denied``, ``unreadable``, ``unsupported``) and leaves its field empty while the
others carry on. Readers take the roots from the context (procfs, sysfs, root filesystem); only on
the live host are ``os.uname()``, ``statvfs`` and rtnetlink consulted, so a captured tree gives the
same answer on any machine.

NICs are merged from two sources: sysfs (driver, speed, kind guess, MAC, MTU, state, master) and
rtnetlink (index, exact ``IFLA_INFO_KIND``, addresses). Without rtnetlink the addresses come from
the procfs fallback (IPv6 only) and a gap says which mode ran.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, TypeVar

from ...agent.errors import AsbuiltError, Denied, ProbeUnavailable, Vanished
from ...agent.model import Device, Disk, Host, Nic
from ..base import Context
from ..netlink import rtnetlink
from ..procfs import cpuinfo, meminfo, mountinfo, proc_stat
from ..sysfs import block, net, pci
from . import dmi, hostname, kernel, os_release, resolv_conf

log = logging.getLogger(__name__)
T = TypeVar("T")


def _guarded(ctx: Context, subject: str, fn: Callable[[], T], default: T) -> T:
    """Run one part; an expected failure becomes a gap and ``default``, never a traceback."""
    try:
        return fn()
    except Vanished as err:
        ctx.gaps.add("absent", subject, str(err))
    except Denied as err:
        ctx.gaps.add("denied", subject, str(err))
    except ProbeUnavailable as err:
        ctx.gaps.add("unsupported", subject, str(err))
    except AsbuiltError as err:
        ctx.gaps.add("unreadable", subject, str(err))
    except Exception as err:  # a parser bug on odd input must not cost the rest of the host
        log.warning("part=%s status=error reason=%s: %s", subject, type(err).__name__, err,
                    exc_info=log.isEnabledFor(logging.DEBUG))
        ctx.gaps.add("unreadable", subject, f"{type(err).__name__}: {err}")
    return default


def read_network(ctx: Context) -> rtnetlink.NetState:
    """rtnetlink on the live host; else (or when it fails) the procfs fallback, with a gap saying so."""
    fallback = ("fell back to procfs: routes from /proc/net/route and /proc/net/ipv6_route, "
                "IPv6 addresses from /proc/net/if_inet6 (no IPv4 addresses), links from sysfs")
    if ctx.roots.live:
        try:
            return rtnetlink.read_rtnetlink()
        except AsbuiltError as err:
            ctx.gaps.add("unsupported", "rtnetlink", f"{err}; {fallback}")
    else:
        ctx.gaps.add("unsupported", "rtnetlink", f"roots are not the live host's; {fallback}")
    return rtnetlink.read_procfs_fallback(ctx.roots.proc, ctx.gaps.add)


def merge_nics(sysfs_nics: List[Nic], state: rtnetlink.NetState) -> List[Nic]:
    """One Nic per interface: sysfs facts, completed by rtnetlink's (pure)."""
    by_name: Dict[str, Nic] = {n.name: n for n in sysfs_nics}
    out = list(sysfs_nics)
    for link in state.links:
        nic = by_name.get(link.name)
        if nic is None:  # seen by netlink only (sysfs of another namespace, or raced)
            by_name[link.name] = link
            out.append(link)
            continue
        nic.index = link.index or nic.index
        nic.mac = nic.mac or link.mac
        nic.mtu = nic.mtu or link.mtu
        nic.state = nic.state or link.state
        nic.master = nic.master or link.master
        if link.kind:  # IFLA_INFO_KIND is exact where sysfs only guesses
            nic.kind = link.kind
        nic.addresses = list(link.addresses)
    for name, addresses in state.addresses.items():
        nic = by_name.get(name)
        if nic is not None:
            nic.addresses.extend(addresses)
    for nic in out:
        nic.addresses.sort(key=lambda a: 0 if a.family == "inet" else 1)  # stable: kernel order within
    return sorted(out, key=lambda n: (n.index or 1 << 30, n.name))


def devices_of(disks: List[Disk], nics: List[Nic], pci_devices: List[Device]) -> List[Device]:
    """Hardware-backed devices with their drivers: PCI functions, disks and NICs that have one (pure)."""
    out = list(pci_devices)
    out.extend(Device(subsystem="block", name=d.name, driver=d.driver, vendor=d.vendor, device=d.model)
               for d in disks if d.driver and d.kind != "partition")
    out.extend(Device(subsystem="net", name=n.name, driver=n.driver) for n in nics if n.driver)
    return out


def collect_host(ctx: Context) -> Host:
    """Every host fact readable under ``ctx.roots``; never raises for expected conditions."""
    roots = ctx.roots
    host = Host()
    host.hostname = _guarded(ctx, "hostname", lambda: hostname.read_hostname(roots.proc), "")
    host.machine_id = _guarded(ctx, "machine-id", lambda: hostname.read_machine_id(roots.rootfs), "")
    host.os = _guarded(ctx, "os-release",
                       lambda: os_release.parse_os_release(os_release.read_os_release(roots.rootfs)),
                       host.os)
    host.kernel = _guarded(ctx, "kernel", lambda: kernel.read_kernel(roots.proc, roots.live), host.kernel)
    host.boot_time = _guarded(ctx, "boot time", lambda: proc_stat.read_boot_time(roots.proc), 0.0)
    host.cpu = _guarded(ctx, "cpuinfo", lambda: cpuinfo.parse_cpuinfo(cpuinfo.read_cpuinfo(roots.proc)),
                        host.cpu)
    host.memory = _guarded(ctx, "meminfo",
                           lambda: meminfo.parse_meminfo(meminfo.read_meminfo(roots.proc)), host.memory)
    host.mounts = _guarded(ctx, "mountinfo", lambda: mountinfo.to_mounts(
        mountinfo.parse_mountinfo(mountinfo.read_mountinfo(roots.proc))), [])
    if roots.live and host.mounts:
        _guarded(ctx, "mount sizes", lambda: mountinfo.fill_sizes(host.mounts, ctx.gaps.add), None)
    host.disks = _guarded(ctx, "block devices", lambda: block.read_disks(roots.sys), [])
    host.dns = _guarded(ctx, "resolv.conf",
                        lambda: resolv_conf.parse_resolv_conf(resolv_conf.read_resolv_conf(roots.rootfs)),
                        host.dns)
    host.virtualization = _guarded(ctx, "dmi", lambda: dmi.guess_virtualization(dmi.read_dmi(roots.sys)), "")

    sysfs_nics = _guarded(ctx, "network interfaces", lambda: net.read_nics(roots.sys), [])
    state: Optional[rtnetlink.NetState] = _guarded(ctx, "network", lambda: read_network(ctx), None)
    if state is None:
        state = rtnetlink.NetState()
    host.nics = merge_nics(sysfs_nics, state)
    host.routes = state.routes
    host.default_gateways = rtnetlink.default_gateways(state.routes)

    pci_devices = _guarded(ctx, "pci devices", lambda: pci.read_pci_devices(roots.sys), [])
    host.devices = devices_of(host.disks, host.nics, pci_devices)
    return host
