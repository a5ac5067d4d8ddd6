"""collect_host on this machine, as root: real procfs, sysfs, statvfs and rtnetlink.

The test interface is a veth pair (``asbtest0``/``asbtest1``, the peer enslaved to a bridge
``asbtestbr0``): this kernel has no ``dummy`` driver. It carries 10.123.45.6/24, is only
configured (no traffic is sent) and is always deleted.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from asbuilt.probes.base import Context, Roots
from asbuilt.probes.host import collect_host
from asbuilt.probes.host.passwd import read_group, read_passwd
from asbuilt.probes.netlink.rtnetlink import read_procfs_fallback, read_rtnetlink

pytestmark = pytest.mark.live

IF, PEER, BRIDGE = "asbtest0", "asbtest1", "asbtestbr0"


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=10)


def _cleanup() -> None:
    _ip("link", "del", IF, check=False)  # deletes the peer too
    _ip("link", "del", BRIDGE, check=False)


@pytest.fixture
def test_interface():
    _cleanup()
    try:
        _ip("link", "add", IF, "type", "veth", "peer", "name", PEER)
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("link", "set", PEER, "master", BRIDGE)
        _ip("addr", "add", "10.123.45.6/24", "dev", IF)
        for name in (BRIDGE, PEER, IF):
            _ip("link", "set", name, "up")
        yield IF
    finally:
        _cleanup()


def _nic(host, name):
    matches = [n for n in host.nics if n.name == name]
    assert len(matches) == 1, [n.name for n in host.nics]
    return matches[0]


def test_collect_host_live(test_interface):
    ctx = Context()
    assert ctx.roots.live
    host = collect_host(ctx)
    assert [g for g in ctx.coverage.gaps if g.subject in ("rtnetlink", "network")] == []

    assert host.hostname and host.hostname == os.uname().nodename
    assert host.os.id == "debian" and host.os.version_id
    assert host.kernel.release == os.uname().release and host.kernel.machine == os.uname().machine
    assert host.cpu.logical_count == os.cpu_count() and host.cpu.model
    assert host.memory.total_bytes > 0 and 0 < host.memory.available_bytes <= host.memory.total_bytes
    assert host.boot_time > 1e9
    root = [m for m in host.mounts if m.mountpoint == "/"]
    assert root and root[0].size_bytes and root[0].size_bytes > 0 and root[0].used_bytes is not None
    assert not any(m.fstype in ("proc", "sysfs", "cgroup2") for m in host.mounts)
    assert host.disks and any(d.kind != "partition" and d.size_bytes > 0 for d in host.disks)
    assert any(d.subsystem == "pci" for d in host.devices)

    lo = _nic(host, "lo")
    assert lo.kind == "loopback" and lo.index == 1
    v4 = [a for a in lo.addresses if a.address == "127.0.0.1"]
    assert v4 and v4[0].prefixlen == 8 and v4[0].subnet == "127.0.0.0/8" and v4[0].family == "inet"

    nic = _nic(host, IF)
    assert nic.kind == "veth" and nic.index > 0 and nic.mac and nic.mtu == 1500
    assert nic.state in ("up", "unknown")
    addr = [a for a in nic.addresses if a.family == "inet"]
    assert [(a.address, a.prefixlen, a.subnet, a.scope) for a in addr] == \
        [("10.123.45.6", 24, "10.123.45.0/24", "global")]
    routes = [r for r in host.routes if r.dst == "10.123.45.0/24"]
    assert routes and routes[0].dev == IF and routes[0].table == "main" and routes[0].protocol == "kernel"
    assert not any(r.table == "local" for r in host.routes)

    peer, bridge = _nic(host, PEER), _nic(host, BRIDGE)
    assert peer.master == BRIDGE and bridge.kind == "bridge"


def test_interface_is_gone_after_cleanup():
    assert not os.path.exists(f"/sys/class/net/{IF}")
    host = collect_host(Context())
    assert IF not in [n.name for n in host.nics]


def test_procfs_fallback_live_agrees_with_rtnetlink(test_interface):
    gaps = []
    fallback = read_procfs_fallback("/proc", lambda *g: gaps.append(g))
    netlink = read_rtnetlink()
    assert gaps == []
    assert [r for r in fallback.routes if r.dst == "10.123.45.0/24" and r.dev == IF]
    v4_main = sorted((r.dst, r.gateway, r.dev) for r in netlink.routes if r.family == "inet" and r.table == "main")
    assert sorted((r.dst, r.gateway, r.dev) for r in fallback.routes if r.family == "inet") == v4_main
    assert any(a.address == "::1" for a in fallback.addresses.get("lo", []))


def test_live_mode_falls_back_when_roots_are_not_live():
    # the live procfs and sysfs, given by another spelling, count as a captured tree
    ctx = Context(roots=Roots(proc="/proc/", sys="/sys/", rootfs="/"))
    host = collect_host(ctx)
    assert [g.subject for g in ctx.coverage.gaps] == ["rtnetlink"]
    assert host.kernel.machine == "" and all(m.size_bytes is None for m in host.mounts)
    assert _nic(host, "lo").kind == "loopback" and host.routes


def test_passwd_and_group_live():
    users, groups = read_passwd("/"), read_group("/")
    assert users[0] == "root" and groups[0] == "root"
    assert users.get(os.getuid()) == "root"


def test_rtnetlink_stdlib_client_equals_pyroute2(test_interface):
    """The plain-socket reader and pyroute2 see the same links, addresses and routes, including
    a bridge master, an IPv6 address, an ECMP route and a blackhole route in another table."""
    from asbuilt.probes.netlink.rtnetlink import read_rtnetlink_pyroute2

    _ip("-6", "addr", "add", "fd12:3456::6/64", "dev", IF, "nodad")
    _ip("route", "add", "10.123.46.0/24", "nexthop", "via", "10.123.45.1", "dev", IF,
        "nexthop", "via", "10.123.45.2", "dev", IF)
    _ip("route", "add", "blackhole", "10.123.47.0/24", "table", "123")
    try:
        ours, theirs = read_rtnetlink(), read_rtnetlink_pyroute2()
        assert ours == theirs
        ecmp = [(r.gateway, r.dev) for r in ours.routes if r.dst == "10.123.46.0/24"]
        assert ecmp == [("10.123.45.1", IF), ("10.123.45.2", IF)]
        assert [r.table for r in ours.routes if r.dst == "blackhole 10.123.47.0/24"] == ["123"]
        peer = [n for n in ours.links if n.name == PEER]
        assert peer and peer[0].master == BRIDGE
        nic = [n for n in ours.links if n.name == IF][0]
        assert ("fd12:3456::6", 64, "inet6") in [(a.address, a.prefixlen, a.family) for a in nic.addresses]
    finally:
        _ip("route", "del", "blackhole", "10.123.47.0/24", "table", "123", check=False)
