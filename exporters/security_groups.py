"""``asbuilt export --format security-groups``: AWS security-group rules from the traffic a profile saw.

Ingress comes from the selected processes' listeners (TCP sockets in ``LISTEN``, unconnected UDP
sockets off the ephemeral range, and any port an inbound peer reached) and the clients seen on
them: a client inside one of the host's NIC subnets (``Host.nics[].addresses[].subnet``) allows that
subnet, any other client its own address (/32, /128). A listener bound to loopback only
(127.0.0.0/8, ::1) is not reachable from the network and gets no rule, only a comment; an exposed
listener without a network client gets a rule for a documentation range (192.0.2.0/24 or another
that is not one of the host's subnets; 2001:db8::/32), which matches no real client, and a
description saying no client was observed: the port is visible in the draft without being opened.
Egress comes from outbound peers: the address (/32, /128) with its DNS names and protocol in the
description.

AWS allows 60 inbound and 60 outbound rules per group by default, counted per IP version, one per
CIDR. Rules are deduplicated and adjacent networks collapsed; past 60, the port with the most
networks is widened step by step (/24, /16, /8, /0 for IPv4; /64, /48, /32, /0 for IPv6) and, when
every port is down to one network, the closest ports of a protocol are merged into a range. One
group always results (no splitting: an instance takes only 5 groups by default), and every widened
rule says how many addresses were observed behind it.

Three artifacts: ``security-groups.tf`` (Terraform, AWS provider >= 5: ``aws_security_group`` plus
one ``aws_vpc_security_group_ingress_rule``/``egress_rule`` per CIDR, ``var.vpc_id``), and
``ingress.json``/``egress.json``, each a complete input for ``aws ec2
authorize-security-group-ingress|egress --cli-input-json file://… --group-id sg-…``. Terraform
removes the allow-all egress rule AWS adds to a new group; with the AWS CLI revoke it yourself.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from ..agent.model import Host, Process, Profile
from .artifact import Artifact

log = logging.getLogger(__name__)

Net = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Addr = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

MAX_RULES = 60  # AWS default quota: inbound, and outbound, rules per group, per IP version
EPHEMERAL = range(32768, 61000)  # Linux's default ip_local_port_range: where UDP clients bind
# Documentation ranges (RFC 5737, RFC 3849, RFC 9637) that match no real client; the first one
# that overlaps none of the host's own subnets is used (some labs number their NICs from them).
PLACEHOLDERS = {4: ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"), 6: ("2001:db8::/32", "3fff::/20")}
WIDEN = {4: (24, 16, 8, 0), 6: (64, 48, 32, 0)}
GROUP_ID = "sg-REPLACE-WITH-YOUR-GROUP-ID"  # fails loudly if --group-id is forgotten
PROTOCOLS = ("tcp", "udp")
_DESC_BAD = re.compile(r"[^a-zA-Z0-9. _\-:/()#,@\[\]+=&;{}!$*]")  # AWS's allowed description characters


@dataclass
class Rule:
    proto: str
    from_port: int
    to_port: int
    network: Net
    processes: Set[str] = field(default_factory=set)
    notes: Set[str] = field(default_factory=set)  # DNS names, protocols, "NIC subnet eth0"
    addresses: Set[str] = field(default_factory=set)  # observed addresses behind the rule
    placeholder: bool = False
    widened: bool = False

    @property
    def family(self) -> int:
        return self.network.version

    @property
    def ports(self) -> Tuple[str, int, int]:
        return (self.proto, self.from_port, self.to_port)

    def sort_key(self) -> tuple:
        return (self.proto, self.from_port, self.to_port, self.family, int(self.network.network_address),
                self.network.prefixlen)


@dataclass
class Plan:
    """What the export found: the rules, and what it deliberately left out (for the comments)."""

    ingress: List[Rule] = field(default_factory=list)
    egress: List[Rule] = field(default_factory=list)
    loopback_listeners: List[str] = field(default_factory=list)
    udp_clients: List[str] = field(default_factory=list)
    loopback_peers: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    aggregated: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------- addresses
def parse_address(text: str) -> Optional[Addr]:
    """An IP address from a profile's rendering (``[::1]``, ``fe80::1%eth0``, v4-mapped); None if not one."""
    text = (text or "").strip().strip("[]").split("%", 1)[0]
    if not text or text == "*":
        return None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def host_subnets(host: Host) -> List[Tuple[Net, str]]:
    """The host's NIC subnets a client may sit in (not loopback, not link-local), most specific first."""
    out: List[Tuple[Net, str]] = []
    for nic in host.nics:
        if nic.kind == "loopback":
            continue
        for a in nic.addresses:
            try:
                net = ipaddress.ip_network(a.subnet or f"{a.address}/{a.prefixlen}", strict=False)
            except ValueError:
                continue
            if net.is_loopback or net.is_link_local or net.prefixlen == 0:
                continue
            if all(net != n for n, _ in out):
                out.append((net, nic.name))
    out.sort(key=lambda item: -item[0].prefixlen)
    return out


def placeholder(family: int, subnets: Sequence[Tuple[Net, str]]) -> Net:
    """A documentation range of ``family`` that overlaps none of ``subnets``."""
    nets = [ipaddress.ip_network(n) for n in PLACEHOLDERS[family]]
    for net in nets:
        if not any(net.overlaps(s) for s, _ in subnets if s.version == family):
            return net
    return nets[-1]


def _host_of(profile: Profile, proc: Process) -> Host:
    if proc.host:
        for h in profile.hosts:
            if h.hostname == proc.host:
                return h
    return profile.host


def _label(proc: Process) -> str:
    return proc.name or proc.exe.rsplit("/", 1)[-1] or f"pid {proc.pid}"


# ---------------------------------------------------------------------------------- plan
def _listeners(proc: Process, inbound_ports: Set[Tuple[str, int]], plan: Plan) -> Dict[Tuple[str, int], Set[str]]:
    found: Dict[Tuple[str, int], Set[str]] = {}
    for s in proc.sockets:
        if s.proto not in PROTOCOLS or not s.local_port:
            continue
        if s.proto == "tcp" and s.state != "LISTEN":
            continue
        if s.proto == "udp":
            if s.remote_port or s.state not in ("UNCONN", ""):
                continue
            if s.local_port in EPHEMERAL and ("udp", s.local_port) not in inbound_ports:
                plan.udp_clients.append(f"udp {s.local_address or '*'}:{s.local_port} ({_label(proc)})")
                continue
        found.setdefault((s.proto, s.local_port), set()).add(s.local_address)
    for key in inbound_ports - set(found):
        found[key] = {""}  # a client reached it, but its socket was not seen: bound address unknown
    return found


def _exposed_families(binds: Iterable[str]) -> List[int]:
    """IP versions a listener is reachable on from the network; [] when loopback only."""
    fams: Set[int] = set()
    for text in binds:
        addr = parse_address(text)
        if addr is None:
            fams.add(4)
        elif addr.is_unspecified:
            fams.update((4, 6) if addr.version == 6 else (4,))  # "::" is dual-stack by default
        elif not addr.is_loopback:
            fams.add(addr.version)
    return sorted(fams)


def plan_rules(profile: Profile, processes: Sequence[Process]) -> Plan:
    """Ingress and egress rules for ``processes``, deduplicated and within AWS's per-group quota."""
    plan = Plan()
    ingress: Dict[tuple, Rule] = {}
    egress: Dict[tuple, Rule] = {}

    def add(table: Dict[tuple, Rule], rule: Rule, proc: Process, note: str = "", address: str = "") -> None:
        key = rule.ports + (rule.network, rule.placeholder)
        have = table.setdefault(key, rule)
        have.processes.add(_label(proc))
        if note:
            have.notes.add(note)
        if address:
            have.addresses.add(address)

    for proc in processes:
        subnets = host_subnets(_host_of(profile, proc))
        inbound = [p for p in proc.peers if p.direction == "inbound" and p.proto in PROTOCOLS]
        inbound_ports = {(p.proto, p.local_port) for p in inbound if p.local_port}
        for (proto, port), binds in sorted(_listeners(proc, inbound_ports, plan).items()):
            families = _exposed_families(binds)
            if not families:
                shown = ",".join(sorted(b or "*" for b in binds))
                plan.loopback_listeners.append(f"{proto} {shown} port {port} ({_label(proc)})")
                continue
            clients = 0
            for peer in inbound:
                if (peer.proto, peer.local_port) != (proto, port):
                    continue
                addr = parse_address(peer.address)
                if addr is None or addr.is_loopback or addr.is_unspecified:
                    continue
                inside = [(net, nic) for net, nic in subnets if addr in net]
                net, note = (inside[0][0], f"NIC subnet {inside[0][1]}") if inside else \
                    (ipaddress.ip_network(addr), "")
                rule = Rule(proto, port, port, net)
                add(ingress, rule, proc, note, str(addr))
                if peer.protocol:
                    ingress[rule.ports + (net, False)].notes.add(peer.protocol)
                clients += 1
            if not clients:
                for fam in families:
                    add(ingress, Rule(proto, port, port, placeholder(fam, subnets), placeholder=True), proc)

        for peer in proc.peers:
            if peer.direction != "outbound" or peer.proto not in PROTOCOLS:
                continue
            addr = parse_address(peer.address)
            if addr is None or not peer.port or addr.is_unspecified:
                plan.skipped.append(f"{peer.proto} {peer.address or '?'} port {peer.port} ({_label(proc)})")
                continue
            if addr.is_loopback:
                plan.loopback_peers.append(f"{peer.proto} {addr} port {peer.port} ({_label(proc)})")
                continue
            rule = Rule(peer.proto, peer.port, peer.port, ipaddress.ip_network(addr))
            add(egress, rule, proc, address=str(addr))
            have = egress[rule.ports + (rule.network, False)]
            have.notes.update(n for n in peer.names if n)
            for extra in (peer.protocol, peer.details.get("sni", ""), peer.host and f"fleet host {peer.host}"):
                if extra:
                    have.notes.add(extra)

    for direction, table in (("ingress", ingress), ("egress", egress)):
        rules: List[Rule] = []
        for fam in (4, 6):
            rules += reduce_rules([r for r in table.values() if r.family == fam], plan, f"{direction} IPv{fam}")
        rules.sort(key=Rule.sort_key)
        setattr(plan, direction, rules)
    for name in ("loopback_listeners", "udp_clients", "loopback_peers", "skipped"):
        setattr(plan, name, sorted(set(getattr(plan, name))))
    return plan


# ------------------------------------------------------------------------------ reduction
def _merge(rules: Sequence[Rule], network: Net, from_port: int, to_port: int) -> Rule:
    out = Rule(rules[0].proto, from_port, to_port, network)
    for r in rules:
        out.processes |= r.processes
        out.notes |= r.notes
        out.addresses |= r.addresses
        out.widened = out.widened or r.widened
    out.placeholder = all(r.placeholder for r in rules)
    return out


def _collapse(rules: Sequence[Rule]) -> List[Rule]:
    """Rules of one (proto, ports): networks collapsed (dedup, contained, adjacent), attributes merged."""
    by_ports: Dict[tuple, List[Rule]] = {}
    for r in rules:
        by_ports.setdefault(r.ports, []).append(r)
    out: List[Rule] = []
    for ports, group in by_ports.items():
        real = [r for r in group if not r.placeholder]
        fake = [r for r in group if r.placeholder]
        if real and fake:
            group = real  # a real client on the port: the placeholder has nothing left to say
        elif fake:
            out.append(_merge(fake, fake[0].network, ports[1], ports[2]))
            continue
        for net in ipaddress.collapse_addresses(r.network for r in group):
            inside = [r for r in group if r.network.subnet_of(net)]
            out.append(_merge(inside, net, ports[1], ports[2]))
    return out


def _supernet(a: Net, b: Net) -> Net:
    net = a if a.prefixlen <= b.prefixlen else b
    while not (a.subnet_of(net) and b.subnet_of(net)):
        net = net.supernet()
    return net


def reduce_rules(rules: List[Rule], plan: Plan, what: str) -> List[Rule]:
    """At most MAX_RULES rules of one IP version: widen the busiest port, then merge port ranges."""
    rules = _collapse(rules)
    observed = len(rules)
    while len(rules) > MAX_RULES:
        by_ports: Dict[tuple, List[Rule]] = {}
        for r in rules:
            by_ports.setdefault(r.ports, []).append(r)
        ports, group = max(by_ports.items(), key=lambda kv: (len(kv[1]), kv[0]))
        rest = [r for r in rules if r.ports != ports]
        if len(group) > 1:
            deepest = max(r.network.prefixlen for r in group)
            level = next(l for l in WIDEN[group[0].family] if l < deepest)
            for r in group:
                if r.network.prefixlen > level:
                    r.network, r.widened = r.network.supernet(new_prefix=level), True
            rules = rest + _collapse(group)
            continue
        # every port has one network left: merge the two closest port ranges of one protocol
        best = None
        ordered = sorted(rules, key=lambda r: (r.proto, r.from_port, r.to_port))
        for a, b in zip(ordered, ordered[1:]):
            if a.proto == b.proto:
                gap = (a.placeholder != b.placeholder, b.from_port - a.to_port)  # keep placeholders apart
                if best is None or gap < best[0]:
                    best = (gap, a, b)
        if best is None:  # cannot happen: two protocols at most
            break
        _, a, b = best
        merged = _merge([a, b], _supernet(a.network, b.network), min(a.from_port, b.from_port),
                        max(a.to_port, b.to_port))
        merged.widened = True
        rules = [r for r in rules if r is not a and r is not b] + [merged]
    if len(rules) < observed:
        plan.aggregated.append(f"{what}: {observed} rules aggregated into {len(rules)} "
                               f"(AWS allows {MAX_RULES} per group)")
        log.info("security-groups aggregated=%s rules_before=%d rules_after=%d", what, observed, len(rules))
    return rules


# ----------------------------------------------------------------------------- rendering
def description(rule: Rule, direction: str) -> str:
    """A rule's description in AWS's allowed characters, at most 255 of them."""
    who = ", ".join(sorted(rule.processes)[:3]) + (" +more" if len(rule.processes) > 3 else "")
    port = f"{rule.proto}/{rule.from_port}" + (f"-{rule.to_port}" if rule.to_port != rule.from_port else "")
    if rule.placeholder:
        text = f"{who} {port}: no client observed; replace this documentation range with the network of its clients"
    else:
        notes = sorted(rule.notes)
        text = f"{who} {port}" + (": " + ", ".join(notes[:4]) + (" +more" if len(notes) > 4 else "") if notes else "")
        n = len(rule.addresses)
        if rule.widened:
            text += f"; aggregated from {n} observed address{'es' if n != 1 else ''}"
        elif rule.network.num_addresses > 1:
            text += f"; {n} {'client' if direction == 'ingress' else 'peer'}{'s' if n != 1 else ''} observed"
    return _DESC_BAD.sub("_", text)[:255]


def _group_name(profile: Profile, processes: Sequence[Process]) -> str:
    names = sorted({_label(p) for p in processes})
    base = "asbuilt-" + (profile.host.hostname or "host") + ("-" + names[0] if len(names) == 1 else "")
    return _DESC_BAD.sub("_", base)[:255]


def _group_description(profile: Profile, processes: Sequence[Process]) -> str:
    names = sorted({_label(p) for p in processes})
    when = time.strftime("%Y-%m-%d", time.gmtime(profile.generated_at)) if profile.generated_at else "unknown date"
    text = (f"asbuilt draft: traffic of {', '.join(names[:5])}{' +more' if len(names) > 5 else ''} "
            f"observed on {profile.host.hostname or 'the host'} ({profile.mode} profile, {when})")
    return _DESC_BAD.sub("_", text)[:255]


def _permissions(rules: Sequence[Rule], direction: str) -> List[dict]:
    perms: Dict[tuple, dict] = {}
    for r in rules:
        perm = perms.setdefault(r.ports, {"IpProtocol": r.proto, "FromPort": r.from_port, "ToPort": r.to_port})
        if r.family == 4:
            perm.setdefault("IpRanges", []).append({"CidrIp": str(r.network), "Description": description(r, direction)})
        else:
            perm.setdefault("Ipv6Ranges", []).append({"CidrIpv6": str(r.network),
                                                      "Description": description(r, direction)})
    return list(perms.values())


def render_cli_input(plan: Plan, direction: str) -> bytes:
    """The ``--cli-input-json`` of AuthorizeSecurityGroupIngress/Egress for one direction."""
    rules = plan.ingress if direction == "ingress" else plan.egress
    data = {"GroupId": GROUP_ID, "IpPermissions": _permissions(rules, direction)}
    return (json.dumps(data, indent=2) + "\n").encode()


def _hcl(text: str) -> str:
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "$${").replace("%{", "%%{")
    return '"' + re.sub(r"[\x00-\x1f\x7f]", " ", text) + '"'


def _comment(text: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)


def _resource_name(direction: str, rule: Rule, used: Set[str]) -> str:
    net = "placeholder" if rule.placeholder else re.sub(r"[^0-9a-zA-Z]+", "_", str(rule.network)).strip("_")
    ports = str(rule.from_port) + (f"_{rule.to_port}" if rule.to_port != rule.from_port else "")
    base = f"{'in' if direction == 'ingress' else 'out'}_{rule.proto}_{ports}_{'v6_' if rule.family == 6 else ''}{net}"
    name, n = base, 2
    while name in used:
        name, n = f"{base}_{n}", n + 1
    used.add(name)
    return name


def render_terraform(profile: Profile, processes: Sequence[Process], plan: Plan) -> bytes:
    names = sorted({_label(p) for p in processes})
    out = [
        "# Security group drafted by `asbuilt export --format security-groups` from what the profile observed:",
        f"#   processes: {_comment(', '.join(names[:10]))}{' and more' if len(names) > 10 else ''}",
        f"#   host: {_comment(profile.host.hostname or '?')}, {profile.mode} profile"
        + (f", {profile.duration_seconds:g} s window" if profile.duration_seconds else ""),
        "# It allows what was seen, nothing more: review it (traffic the window missed is not here).",
        "# Requires the AWS provider >= 5 (aws_vpc_security_group_*_rule). Terraform removes the",
        "# allow-all egress rule AWS adds to a new group, so egress is limited to the rules below.",
        f"# Rules: {len(plan.ingress)} ingress, {len(plan.egress)} egress "
        f"(AWS default quota: {MAX_RULES} each, per IP version).",
    ]

    def section(title: str, items: List[str]) -> None:
        if items:
            out.append("#")
            out.append(f"# {title}:")
            out.extend(f"#   {_comment(i)}" for i in items[:50])
            if len(items) > 50:
                out.append(f"#   ... and {len(items) - 50} more")

    section("Not exposed, listening on loopback only (no rule)", plan.loopback_listeners)
    section("UDP client sockets on ephemeral ports (no rule)", plan.udp_clients)
    section("Loopback peers (no rule: traffic stays on the host)", plan.loopback_peers)
    section("Peers without a usable address or port (no rule)", plan.skipped)
    section("Aggregated", plan.aggregated)
    placeholders = {r.family: r.network for r in plan.ingress if r.placeholder}
    out += ["", 'variable "vpc_id" {', '  description = "The VPC to create the security group in"',
            "  type        = string", "}"]
    why = "Clients of listeners no network client was seen on: the default is a documentation range that matches nobody"
    for fam in sorted(placeholders):
        out += ["", f'variable "unobserved_clients_ipv{fam}" {{', f"  description = {_hcl(why)}",
                "  type        = string", f"  default     = {_hcl(str(placeholders[fam]))}", "}"]
    out += ["", 'resource "aws_security_group" "asbuilt" {',
            f"  name        = {_hcl(_group_name(profile, processes))}",
            f"  description = {_hcl(_group_description(profile, processes))}",
            "  vpc_id      = var.vpc_id",
            "  tags = {",
            f"    Name = {_hcl(_group_name(profile, processes))}",
            "  }", "}"]
    used: Set[str] = set()
    for direction, rules in (("ingress", plan.ingress), ("egress", plan.egress)):
        for r in rules:
            cidr_key = "cidr_ipv4" if r.family == 4 else "cidr_ipv6"
            cidr = f"var.unobserved_clients_ipv{r.family}" if r.placeholder else _hcl(str(r.network))
            out += ["", f'resource "aws_vpc_security_group_{direction}_rule" "{_resource_name(direction, r, used)}" {{',
                    "  security_group_id = aws_security_group.asbuilt.id",
                    f"  description       = {_hcl(description(r, direction))}",
                    f"  ip_protocol       = {_hcl(r.proto)}",
                    f"  from_port         = {r.from_port}",
                    f"  to_port           = {r.to_port}",
                    f"  {cidr_key:<17} = {cidr}", "}"]
    out += ["", 'output "security_group_id" {', "  value = aws_security_group.asbuilt.id", "}", ""]
    return "\n".join(out).encode()


def export(profile: Profile, processes: List[Process], output: str = "") -> List[Artifact]:
    """``security-groups.tf``, ``ingress.json`` and ``egress.json`` for the selected processes."""
    plan = plan_rules(profile, processes)
    return [Artifact("security-groups.tf", render_terraform(profile, processes, plan)),
            Artifact("ingress.json", render_cli_input(plan, "ingress")),
            Artifact("egress.json", render_cli_input(plan, "egress"))]
