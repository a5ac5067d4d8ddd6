"""``asbuilt merge``: many hosts' profiles into one fleet profile (``mode`` ``"fleet"``), the dependency map.

What the fleet profile holds:

* ``hosts``: every merged :class:`Host`. Two inputs with the same hostname are both kept: the later
  one is renamed ``<hostname>@<machine-id[:8]>`` when the machine ids differ, else
  ``<hostname>@<file name>`` (else ``@<input number>``), and a ``duplicate-host`` gap says so.
* ``host``: a synthetic Host named ``fleet``; its OS and kernel are set when every host agrees
  (exporters that read ``profile.host.os`` then still work), else left empty.
* ``processes``: every host's processes, each with ``Process.host`` set to its (possibly renamed)
  hostname, in input order.
* Peers are resolved to the fleet: an outbound peer whose address is one of a fleet host's
  addresses (its NICs', its network namespaces' NICs', and its listeners' specific bind addresses;
  IPv4-mapped IPv6 counts as IPv4) and whose port and proto match a listener there (bound to the
  wildcard ``0.0.0.0``/``::`` or to that address) gets ``Peer.host`` and ``Peer.process`` (the
  listening process's identity). Loopback peers resolve only within their own host; an address
  that belongs to the peer's own host resolves there first (every Docker host has 172.17.0.1); an
  address held by several other hosts is ambiguous and stays unresolved. A peer known only by name
  (no IP address) resolves when a name is a fleet hostname or starts with ``<hostname>.``. DNS names
  are kept as they are. A peer whose address (or name) is a fleet host's but where no listener
  matches (not seen listening, or bound to another address) gets that host and ``process ""``.
  An inbound peer gets the client's host, and the client process when one of that host's processes
  has an outbound peer to this listener. Peers that reach no fleet host keep ``host ""``: outside
  the fleet (see :func:`outside_fleet`); that is information, not a gap.
* ``packages``: merged by (manager, name, version, architecture), ``hosts`` and ``used_by`` unioned.
* ``coverage``: each host's probe runs with names prefixed ``<hostname>:`` and its gaps with
  subjects prefixed the same way; ``gaps_dropped`` summed; ``privileged`` only if every input was.

A fleet profile given as input is flattened (its hosts, processes and packages are taken as they
are, renamed if they collide) and every peer is resolved afresh against the whole new fleet.
"""
from __future__ import annotations

import copy
import ipaddress
import logging
import os
import time
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

from . import __version__
from .errors import UsageError
from .model import Coverage, Gap, Host, Package, Peer, Process, Profile

log = logging.getLogger(__name__)

FLEET = "fleet"
WILDCARDS = frozenset(("", "*", "0.0.0.0", "::", "::0"))


class OutsidePeer(NamedTuple):
    """A dependency outside the fleet: what the fleet's processes reach that no fleet host serves."""

    target: str  # first DNS name, else the address
    port: int
    proto: str
    clients: Tuple[Tuple[str, str], ...]  # (host, process identity) pairs, sorted


def _norm_addr(addr: str) -> str:
    """An address in canonical form: IPv4-mapped IPv6 as IPv4, IPv6 compressed; names unchanged."""
    if not addr:
        return ""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return addr
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


def _is_ip(addr: str) -> bool:
    try:
        ipaddress.ip_address(addr.split("%", 1)[0])
        return True
    except ValueError:
        return False


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _family(addr: str) -> int:
    try:
        return ipaddress.ip_address(addr).version
    except ValueError:
        return 0


# ------------------------------------------------------------------------------ flattening
class _Input(NamedTuple):
    host: Host
    processes: List[Process]
    packages: List[Package]
    coverage: Coverage
    source: str
    fleet: bool


def _inputs(profiles: Sequence[Profile], sources: Sequence[str]) -> List[_Input]:
    """Every host of every profile, with its processes and packages (deep copies)."""
    out = []
    for i, prof in enumerate(profiles):
        src = sources[i] if i < len(sources) and sources[i] else f"input {i + 1}"
        prof = copy.deepcopy(prof)
        if prof.mode == FLEET:
            for host in prof.hosts:
                name = host.hostname
                out.append(_Input(host, [p for p in prof.processes if p.host == name],
                                  [_only_host(pkg, name) for pkg in prof.packages if name in pkg.hosts],
                                  _host_coverage(prof.coverage, name), src, True))
        else:
            name = prof.host.hostname
            for p in prof.processes:
                p.host = name
            for pkg in prof.packages:
                pkg.hosts = [name]
            out.append(_Input(prof.host, prof.processes, prof.packages, prof.coverage, src, False))
    return out


def _only_host(pkg: Package, name: str) -> Package:
    pkg = copy.copy(pkg)
    pkg.hosts = [name]
    return pkg


def _host_coverage(cov: Coverage, name: str) -> Coverage:
    """The part of a fleet profile's coverage that belongs to one host, prefixes removed."""
    prefix = name + ":"
    probes = [copy.copy(r) for r in cov.probes if r.name.startswith(prefix)]
    for r in probes:
        r.name = r.name[len(prefix):]
    gaps = []
    for g in cov.gaps:
        if g.subject.startswith(prefix):
            g = copy.copy(g)
            g.subject = g.subject[len(prefix):].lstrip()
            gaps.append(g)
    return Coverage(probes=probes, gaps=gaps, privileged=cov.privileged, mode=cov.mode)


def _fleet_gaps(cov: Coverage, names: Set[str]) -> List[Gap]:
    """A fleet input's fleet-wide gaps (duplicate-host ...): the ones not prefixed by a host."""
    return [g for g in cov.gaps if not any(g.subject.startswith(n + ":") for n in names)]


def _rename(inp: _Input, new: str) -> None:
    old = inp.host.hostname
    inp.host.hostname = new
    for p in inp.processes:
        p.host = new
    for pkg in inp.packages:
        pkg.hosts = [new if h == old else h for h in pkg.hosts]


def _disambiguate(inputs: List[_Input]) -> List[Gap]:
    gaps = []
    first: Dict[str, _Input] = {}
    taken = {inp.host.hostname for inp in inputs}
    for n, inp in enumerate(inputs, 1):
        name = inp.host.hostname
        if name not in first:
            first[name] = inp
            continue
        other = first[name]
        mid = inp.host.machine_id
        if mid and mid != other.host.machine_id:
            candidates = [f"{name}@{mid[:8]}"]
        else:
            candidates = []
        candidates += [f"{name}@{os.path.basename(inp.source)}", f"{name}@{n}"]
        new = next((c for c in candidates if c not in taken), f"{name}@{n}.{len(taken)}")
        taken.add(new)
        _rename(inp, new)
        gaps.append(Gap(kind="duplicate-host", subject=name or "(no hostname)",
                        detail=f"{other.source} and {inp.source} both name host {name!r}; "
                               f"the second is kept as {new!r}"))
        log.info("duplicate host hostname=%s kept_as=%s source=%s", name, new, inp.source)
    return gaps


# ------------------------------------------------------------------------------- resolving
class _Listener(NamedTuple):
    host: str
    address: str  # normalised local address ("" for a wildcard)
    family: int  # 4, 6, or 0 for a wildcard of unknown family
    dual: bool  # "::" also takes IPv4
    identity: str
    netns: int


class _Index:
    def __init__(self, inputs: List[_Input]):
        self.addresses: Dict[str, Set[str]] = {}  # address -> hostnames holding it
        self.listeners: Dict[Tuple[str, int], List[_Listener]] = {}  # (proto, port) -> listeners
        self.hostnames: Dict[str, str] = {}  # lower-case hostname -> hostname
        self.outbound: Dict[Tuple[str, str, int, str], Set[str]] = {}  # (host, addr, port, proto) -> ids
        for inp in inputs:
            host = inp.host.hostname
            self.hostnames[host.lower()] = host
            nics = list(inp.host.nics) + [nic for ns in inp.host.netns for nic in ns.nics]
            for nic in nics:
                for a in nic.addresses:
                    addr = _norm_addr(a.address)
                    if addr and not _is_loopback(addr):
                        self.addresses.setdefault(addr, set()).add(host)
            for p in inp.processes:
                for s in p.sockets:
                    if not s.local_port or s.proto not in ("tcp", "tcp6", "udp", "udp6"):
                        continue
                    if s.proto.startswith("tcp") and s.state != "LISTEN":
                        continue
                    if s.proto.startswith("udp") and s.remote_port:
                        continue
                    raw = s.local_address
                    wildcard = raw in WILDCARDS
                    addr = "" if wildcard else _norm_addr(raw)
                    if addr and not _is_loopback(addr):
                        self.addresses.setdefault(addr, set()).add(host)
                    fam = _family(addr) if addr else (6 if ":" in raw else 4 if raw else 0)
                    self.listeners.setdefault((s.proto[:3], s.local_port), []).append(
                        _Listener(host, addr, fam, raw in ("::", "::0") or raw in ("", "*"), p.identity,
                                  s.netns or p.netns))
                for peer in p.peers:
                    if peer.direction != "inbound":
                        self.outbound.setdefault((host, _norm_addr(peer.address), peer.port, peer.proto),
                                                 set()).add(p.identity)
        for rows in self.listeners.values():
            rows.sort(key=lambda r: (r.host, r.address, r.identity))

    def _listening(self, host: str, proto: str, port: int, addr: str, netns: int = 0) -> str:
        """The identity of the process on ``host`` listening on proto/port that ``addr`` reaches."""
        fam = _family(addr)
        exact, wild = [], []
        for r in self.listeners.get((proto, port), ()):
            if r.host != host:
                continue
            if netns and r.netns and r.netns != netns and _is_loopback(addr):
                continue  # loopback stays inside a network namespace
            if not addr:  # reached by name: any listener but a loopback-only one
                if not _is_loopback(r.address):
                    (exact if r.address else wild).append(r.identity)
            elif r.address and r.address == addr:
                exact.append(r.identity)
            elif not r.address and (r.family in (0, fam) or (r.dual and fam == 4)):
                wild.append(r.identity)
        found = exact or wild
        return found[0] if found else ""

    def resolve(self, peer: Peer, proc: Process) -> Tuple[str, str]:
        """(host, process identity) of the fleet listener an outbound peer reaches; ("", "") if none."""
        own = proc.host
        proto = (peer.proto or "tcp")[:3]
        addr = _norm_addr(peer.address)
        if addr and _is_ip(addr):
            if _is_loopback(addr):
                hosts = [own]
            elif own in self.addresses.get(addr, ()):
                hosts = [own]
            else:
                hosts = sorted(self.addresses.get(addr, ()))
                if len(hosts) > 1:
                    log.info("ambiguous peer address=%s hosts=%s", addr, ",".join(hosts))
                    return "", ""
            for host in hosts:
                ident = self._listening(host, proto, peer.port, addr, proc.netns)
                if ident:
                    return host, ident
            return (hosts[0], "") if len(hosts) == 1 else ("", "")
        for name in peer.names + ([peer.address] if addr else []):
            host = self._host_by_name(name)
            if host:
                return host, self._listening(host, proto, peer.port, "", 0)
        return "", ""

    def _host_by_name(self, name: str) -> str:
        name = name.lower().rstrip(".")
        if name in self.hostnames:
            return self.hostnames[name]
        first = name.split(".", 1)[0]
        host = self.hostnames.get(first)
        return host if host and "." not in host else ""

    def resolve_client(self, peer: Peer, proc: Process, our_addresses: Set[str]) -> Tuple[str, str]:
        """(host, client identity) for an inbound peer: the fleet host the client runs on."""
        addr = _norm_addr(peer.address)
        if not addr:
            return "", ""
        if _is_loopback(addr) or proc.host in self.addresses.get(addr, ()):
            hosts = [proc.host]
        else:
            hosts = sorted(self.addresses.get(addr, ()))
            if len(hosts) != 1:
                return "", ""
        host = hosts[0]
        targets = (our_addresses | {"127.0.0.1", "::1"}) if host == proc.host else our_addresses
        ids: Set[str] = set()
        for target in targets:
            ids |= self.outbound.get((host, target, peer.local_port, peer.proto), set())
        return host, (min(ids) if ids else "")


def _resolve(inputs: List[_Input], index: _Index) -> Tuple[int, int]:
    resolved = unresolved = 0
    host_addrs: Dict[str, Set[str]] = {}
    for addr, hosts in index.addresses.items():
        for h in hosts:
            host_addrs.setdefault(h, set()).add(addr)
    for inp in inputs:
        ours = host_addrs.get(inp.host.hostname, set())
        for p in inp.processes:
            for peer in p.peers:
                if peer.direction == "inbound":
                    peer.host, peer.process = index.resolve_client(peer, p, ours)
                else:
                    peer.host, peer.process = index.resolve(peer, p)
                    if peer.host:
                        resolved += 1
                    else:
                        unresolved += 1
    return resolved, unresolved


# --------------------------------------------------------------------------------- merging
def _merge_packages(inputs: Iterable[_Input]) -> List[Package]:
    merged: Dict[tuple, Package] = {}
    for inp in inputs:
        for pkg in inp.packages:
            key = (pkg.manager, pkg.name, pkg.version, pkg.architecture)
            have = merged.get(key)
            if have is None:
                merged[key] = have = copy.copy(pkg)
                have.hosts, have.used_by, have.modified_files = [], [], []
            if have.install_time is None:
                have.install_time = pkg.install_time
            have.origin = have.origin or pkg.origin
            have.source = have.source or pkg.source
            have.hosts = sorted(set(have.hosts) | set(pkg.hosts))
            have.used_by = sorted(set(have.used_by) | set(pkg.used_by))
            have.modified_files = sorted(set(have.modified_files) | set(pkg.modified_files))
    return [merged[k] for k in sorted(merged)]


def _merge_coverage(inputs: List[_Input], fleet_gaps: List[Gap]) -> Coverage:
    cov = Coverage(mode=FLEET, privileged=bool(inputs) and all(i.coverage.privileged for i in inputs))
    for inp in inputs:
        name = inp.host.hostname
        for run in inp.coverage.probes:
            run = copy.copy(run)
            run.name = f"{name}:{run.name}"
            cov.probes.append(run)
        for gap in inp.coverage.gaps:
            cov.gaps.append(Gap(kind=gap.kind, subject=f"{name}: {gap.subject}", detail=gap.detail))
        cov.gaps_dropped += inp.coverage.gaps_dropped
    cov.gaps.extend(fleet_gaps)
    return cov


def _common_host(hosts: List[Host]) -> Host:
    host = Host(hostname=FLEET)
    if hosts and all(h.os == hosts[0].os for h in hosts):
        host.os = copy.deepcopy(hosts[0].os)
    if hosts and all(h.kernel == hosts[0].kernel for h in hosts):
        host.kernel = copy.deepcopy(hosts[0].kernel)
    return host


def merge_profiles(profiles: Sequence[Profile], sources: Optional[Sequence[str]] = None) -> Profile:
    """One fleet profile from many hosts' (or fleets') profiles; the inputs are not modified."""
    if not profiles:
        raise UsageError("merge needs at least one profile")
    sources = list(sources or [])
    fleet_gaps: List[Gap] = []
    for prof in profiles:
        if prof.mode == FLEET:
            fleet_gaps += copy.deepcopy(_fleet_gaps(prof.coverage, {h.hostname for h in prof.hosts}))
    inputs = _inputs(profiles, sources)
    fleet_gaps += _disambiguate(inputs)
    index = _Index(inputs)
    resolved, unresolved = _resolve(inputs, index)
    started = [p.started_at for p in profiles if p.started_at]
    fleet = Profile(
        tool_version=__version__, mode=FLEET, generated_at=time.time(),
        started_at=min(started) if started else 0.0,
        host=_common_host([i.host for i in inputs]),
        processes=[p for inp in inputs for p in inp.processes],
        packages=_merge_packages(inputs),
        coverage=_merge_coverage(inputs, fleet_gaps),
        hosts=[inp.host for inp in inputs])
    log.info("merged hosts=%d processes=%d peers_resolved=%d peers_outside=%d", len(fleet.hosts),
             len(fleet.processes), resolved, unresolved)
    return fleet


def outside_fleet(fleet: Profile) -> List[OutsidePeer]:
    """Outbound peers that resolved to no fleet host (``Peer.host == ""``; loopback ones excepted: they
    are on their own host), grouped by (first name or address, port, proto), with the fleet
    processes that reach them as sorted (host, identity) pairs."""
    groups: Dict[Tuple[str, int, str], Set[Tuple[str, str]]] = {}
    for p in fleet.processes:
        for peer in p.peers:
            if peer.direction == "inbound" or peer.host or _is_loopback(_norm_addr(peer.address)):
                continue
            target = peer.names[0] if peer.names else peer.address
            groups.setdefault((target, peer.port, peer.proto), set()).add((p.host, p.identity))
    return [OutsidePeer(t, port, proto, tuple(sorted(clients)))
            for (t, port, proto), clients in sorted(groups.items())]


__all__ = ["merge_profiles", "outside_fleet", "OutsidePeer", "FLEET"]
