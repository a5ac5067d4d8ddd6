"""``asbuilt diff OLD NEW``: what the NEW profile lacks or adds compared with the OLD one.

For migration checks (old host vs new container) and drift (yesterday vs today). Only lasting facts
are compared, each under a key that means the same thing on two hosts; volatile values (pids, start
times, byte and event counts, cpu, rss, first/last seen, pipe and anon fds, netns inodes) never are.

Sections, in this order, each a sorted list of :class:`Change` (``removed``, ``added``, ``changed``):

* **host** — OS release (``os``), kernel release (``kernel``), architecture: changes only (the
  hostname is shown in the header, not compared: two hosts always differ there).
* **processes** — matched by ``Process.identity`` (stable across restarts and hosts); processes of
  one identity (workers) are one entry. Left-overs are then paired by executable + normalised
  arguments (``agent.identity.normalise_argv``, argv[0] dropped), so a service that moved from a
  systemd unit into a container is one ``changed`` process (its identity) rather than a removal and
  an addition. The user a process runs as is compared too. In a fleet profile the key includes the
  process's host.
* **listeners** — host-wide, keyed by (proto, port): the bind addresses (``0.0.0.0`` → ``127.0.0.1``
  is a change) and the processes that listen. TCP ``LISTEN`` sockets, and unconnected UDP sockets
  bound outside the default ephemeral range (32768–60999: those are clients' sockets).
* **peers** — per matched process, keyed by (direction, address or first DNS name, port, proto) for
  outbound peers and by (client address, our ``local_port``, proto) for inbound ones, so clients'
  ephemeral ports never matter. The application protocol is compared when both profiles know it.
* **files** — per matched process, config/data/log files keyed by (path, class); the path goes
  through ``normalise_arg`` (temporary directories, dates, pids); the access (read ``r``, write
  ``w``, both ``rw``) is compared.
* **libraries** — per matched process, library paths (the text rendering summarises long lists).
* **packages** — keyed by name; version (and architecture) changes are ``changed`` with old → new.

Peers, files and libraries of a process that is only in one profile are not listed one by one: the
process's own ``removed``/``added`` line stands for them (with their counts).

``process`` (a ``--process`` selector, see ``agent.select``) restricts processes, listeners, peers,
files and libraries to the selected processes, and packages to those the selected processes use; a
selector that matches nothing in one profile is fine there (the process is then missing), one that
matches nothing in either is a UsageError. Host basics are always compared.
"""
from __future__ import annotations

import datetime
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Set, TextIO, Tuple

from .errors import UsageError
from .identity import normalise_arg, normalise_argv
from .model import Process, Profile
from .select import select_processes

log = logging.getLogger(__name__)

SECTIONS = ("host", "processes", "listeners", "peers", "files", "libraries", "packages")
REMOVED, ADDED, CHANGED = "removed", "added", "changed"
_SIGN = {REMOVED: "-", ADDED: "+", CHANGED: "~"}
_ORDER = {REMOVED: 0, ADDED: 1, CHANGED: 2}
FILE_KINDS = ("config", "data", "log")
EPHEMERAL_PORTS = (32768, 60999)  # Linux's default net.ipv4.ip_local_port_range
LIBRARY_LINES = 8  # per process and sign in the text rendering; the rest are counted


@dataclass
class Change:
    """One difference. ``old``/``new`` hold the item's facts (removed/added) or, for ``changed``,
    only the fields that differ."""

    section: str
    change: str  # removed, added, changed
    item: str  # the readable key, e.g. "tcp 8080", "outbound tcp db.internal:5432"
    process: str = ""  # the (old) identity of the process it belongs to; "" for host-wide items
    key: Dict[str, Any] = field(default_factory=dict)
    old: Dict[str, Any] = field(default_factory=dict)
    new: Dict[str, Any] = field(default_factory=dict)

    def sort_key(self) -> tuple:
        return (self.process, self.item, _ORDER[self.change])

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"change": self.change, "item": self.item, "key": self.key}
        if self.process:
            out["process"] = self.process
        if self.old:
            out["old"] = self.old
        if self.new:
            out["new"] = self.new
        return out

    def text(self) -> str:
        line = f"{_SIGN[self.change]} {self.item}"
        if self.change == CHANGED:
            line += ": " + ", ".join(f"{k} {_show(self.old.get(k))} -> {_show(self.new.get(k))}"
                                     for k in sorted(set(self.old) | set(self.new)))
        return line


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return "(none)" if value in (None, "") else str(value)


@dataclass
class DiffResult:
    old: Dict[str, Any] = field(default_factory=dict)  # hostname, mode, generated_at of each side
    new: Dict[str, Any] = field(default_factory=dict)
    process: Optional[str] = None
    sections: Dict[str, List[Change]] = field(default_factory=lambda: {s: [] for s in SECTIONS})

    @property
    def changes(self) -> List[Change]:
        return [c for s in SECTIONS for c in self.sections[s]]

    @property
    def empty(self) -> bool:
        return not any(self.sections.values())

    def counts(self) -> Dict[str, int]:
        counts = {REMOVED: 0, ADDED: 0, CHANGED: 0}
        for c in self.changes:
            counts[c.change] += 1
        return counts

    def to_dict(self) -> Dict[str, Any]:
        return {"old": self.old, "new": self.new, "process": self.process, "empty": self.empty,
                "summary": self.counts(),
                "sections": {s: [c.to_dict() for c in self.sections[s]] for s in SECTIONS}}


# ----------------------------------------------------------------------------------- keys
def _fallback_key(p: Process) -> Optional[tuple]:
    if not p.exe:
        return None
    exe = p.exe[:-len(" (deleted)")] if p.exe.endswith(" (deleted)") else p.exe
    return (p.host, exe, tuple(normalise_argv(p.cmdline)[1:]))


def _process_key(p: Process) -> str:
    ident = p.identity or "-:%s:%s" % (p.exe or "?", " ".join(normalise_argv(p.cmdline)))
    return f"{p.host}/{ident}" if p.host else ident


def _group(procs: Iterable[Process]) -> Dict[str, List[Process]]:
    groups: Dict[str, List[Process]] = {}
    for p in procs:
        groups.setdefault(_process_key(p), []).append(p)
    return groups


def _match(old: Dict[str, List[Process]], new: Dict[str, List[Process]]) -> Dict[str, str]:
    """new key -> old key for every new process group that has a counterpart."""
    pairs = {k: k for k in new if k in old}
    rest_old: Dict[tuple, List[str]] = {}
    for k in sorted(set(old) - set(pairs)):
        fk = _fallback_key(old[k][0])
        if fk is not None:
            rest_old.setdefault(fk, []).append(k)
    for k in sorted(set(new) - set(pairs)):
        fk = _fallback_key(new[k][0])
        if fk is not None and rest_old.get(fk):
            pairs[k] = rest_old[fk].pop(0)
    return pairs


def _select(profile: Profile, selector: Optional[str]) -> Tuple[List[Process], Optional[UsageError]]:
    try:
        return select_processes(profile, selector), None
    except UsageError as err:  # malformed selectors fail on both sides, and are raised then
        return [], err


def _listeners(procs: Iterable[Process], canon) -> Dict[tuple, Dict[str, Set[str]]]:
    out: Dict[tuple, Dict[str, Set[str]]] = {}
    for p in procs:
        for s in p.sockets:
            if s.proto in ("tcp", "tcp6"):
                if s.state != "LISTEN":
                    continue
            elif s.proto in ("udp", "udp6"):
                if s.remote_port or not s.local_port or (
                        EPHEMERAL_PORTS[0] <= s.local_port <= EPHEMERAL_PORTS[1]):
                    continue
            else:
                continue
            entry = out.setdefault((p.host, s.proto.rstrip("6"), s.local_port),
                                   {"addresses": set(), "processes": set()})
            entry["addresses"].add(s.local_address or "*")
            entry["processes"].add(canon(p))
    return out


def _address(addr: str) -> str:
    """IPv4-mapped IPv6 (``::ffff:10.0.0.5``) as IPv4, IPv6 compressed; anything else unchanged."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


def _peers(procs: List[Process]) -> Dict[tuple, Dict[str, Any]]:
    out: Dict[tuple, Dict[str, Any]] = {}
    for p in procs:
        for peer in p.peers:
            if peer.direction == "inbound":
                key = ("inbound", _address(peer.address), peer.local_port, peer.proto)
            else:
                target = min(peer.names) if peer.names else _address(peer.address)
                key = (peer.direction or "outbound", target, peer.port, peer.proto)
            entry = out.setdefault(key, {"protocols": set(), "addresses": set()})
            if peer.protocol:
                entry["protocols"].add(peer.protocol)
            entry["addresses"].add(peer.address)
    return out


def _access(mode: str) -> str:
    written = bool(set(mode or "") & set("wac"))
    read = "r" in (mode or "") or not written
    return ("r" if read else "") + ("w" if written else "")


def _files(procs: List[Process]) -> Dict[tuple, str]:
    out: Dict[tuple, Set[str]] = {}
    for p in procs:
        for f in p.files:
            if f.kind in FILE_KINDS and f.path:
                out.setdefault((normalise_arg(f.path), f.kind), set()).update(_access(f.mode))
    return {k: "".join(c for c in "rw" if c in v) for k, v in out.items()}


def _libraries(procs: List[Process]) -> Set[str]:
    return {normalise_arg(f.path) for p in procs for f in p.libraries if f.path}


def _packages(profile: Profile, used: Optional[Set[str]]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for pkg in profile.packages:
        if used is not None and not used.intersection(pkg.used_by):
            continue
        entry = out.setdefault(pkg.name, {"versions": set(), "architectures": set(), "manager": pkg.manager})
        entry["versions"].add(pkg.version)
        if pkg.architecture:
            entry["architectures"].add(pkg.architecture)
    return out


def _host_facts(profile: Profile) -> Dict[str, str]:
    h = profile.host
    os_name = h.os.pretty_name or " ".join(x for x in (h.os.id, h.os.version_id) if x)
    return {"os": os_name, "kernel": h.kernel.release, "architecture": h.kernel.machine}


def _meta(profile: Profile) -> Dict[str, Any]:
    return {"hostname": profile.host.hostname, "mode": profile.mode, "generated_at": profile.generated_at}


# ---------------------------------------------------------------------------------- diffing
def _compare(section: str, old: Dict[Any, Any], new: Dict[Any, Any], describe, fields,
             process: str = "") -> List[Change]:
    """Changes between two keyed maps; ``describe(key, value) -> (item, key dict, facts dict)``;
    ``fields(old_value, new_value) -> (old dict, new dict)`` of what differs."""
    changes = []
    for key in old.keys() - new.keys():
        item, kd, facts = describe(key, old[key])
        changes.append(Change(section, REMOVED, item, process, kd, old=facts))
    for key in new.keys() - old.keys():
        item, kd, facts = describe(key, new[key])
        changes.append(Change(section, ADDED, item, process, kd, new=facts))
    for key in old.keys() & new.keys():
        o, n = fields(old[key], new[key])
        if o or n:
            item, kd, _ = describe(key, old[key])
            changes.append(Change(section, CHANGED, item, process, kd, old=o, new=n))
    return changes


def _no_fields(_a, _b):
    return {}, {}



def diff_profiles(old: Profile, new: Profile, process: Optional[str] = None) -> DiffResult:
    """Compare two profiles (see the module docstring); deterministic, sorted."""
    result = DiffResult(old=_meta(old), new=_meta(new), process=process)
    sec = result.sections

    # host basics
    ho, hn = _host_facts(old), _host_facts(new)
    for name in ("os", "kernel", "architecture"):
        if ho[name] != hn[name]:
            sec["host"].append(Change("host", CHANGED, name, "", {"fact": name},
                                      old={name: ho[name]}, new={name: hn[name]}))

    # processes
    procs_old, err_old = _select(old, process)
    procs_new, err_new = _select(new, process)
    if err_old and err_new:
        raise err_new
    g_old, g_new = _group(procs_old), _group(procs_new)
    pairs = _match(g_old, g_new)  # new key -> old key
    matched_new = set(pairs)
    matched_old = set(pairs.values())

    def summary(procs: List[Process]) -> Dict[str, Any]:
        p = procs[0]
        facts: Dict[str, Any] = {"exe": p.exe, "user": p.user}
        if p.host:
            facts["host"] = p.host
        listen = sorted({f"{s.proto}/{s.local_port}" for q in procs for s in q.sockets if s.state == "LISTEN"})
        if listen:
            facts["listens"] = listen
        for name, n in (("peers", sum(len(q.peers) for q in procs)),
                        ("files", sum(1 for q in procs for f in q.files if f.kind in FILE_KINDS))):
            if n:
                facts[name] = n
        return facts

    for k in sorted(set(g_old) - matched_old):
        sec["processes"].append(Change("processes", REMOVED, k, "", {"identity": k}, old=summary(g_old[k])))
    for k in sorted(set(g_new) - matched_new):
        sec["processes"].append(Change("processes", ADDED, k, "", {"identity": k}, new=summary(g_new[k])))
    for kn, ko in sorted(pairs.items(), key=lambda kv: kv[1]):
        o: Dict[str, Any] = {}
        n: Dict[str, Any] = {}
        if kn != ko:
            o["identity"], n["identity"] = ko, kn
        users_o = sorted({p.user for p in g_old[ko]})
        users_n = sorted({p.user for p in g_new[kn]})
        if users_o != users_n:
            o["user"], n["user"] = users_o, users_n
        if o:
            sec["processes"].append(Change("processes", CHANGED, ko, "", {"identity": ko}, old=o, new=n))

    # listeners (host-wide, by proto and port; processes named by their old key)
    canon_new = lambda p: pairs.get(_process_key(p), _process_key(p))  # noqa: E731
    l_old = _listeners(procs_old, _process_key)
    l_new = _listeners(procs_new, canon_new)

    def describe_listener(key, value):
        host, proto, port = key
        item = f"{host + ' ' if host else ''}{proto} {port}"
        facts = {"addresses": sorted(value["addresses"]), "processes": sorted(value["processes"])}
        kd = {"proto": proto, "port": port}
        if host:
            kd["host"] = host
        return item, kd, facts

    def listener_fields(a, b):
        o, n = {}, {}
        for name in ("addresses", "processes"):
            if a[name] != b[name]:
                o[name], n[name] = sorted(a[name]), sorted(b[name])
        return o, n

    sec["listeners"] = _compare("listeners", l_old, l_new, describe_listener, listener_fields)

    # per matched process: peers, files, libraries
    def describe_peer(key, value):
        direction, target, port, proto = key
        if direction == "inbound":
            item = f"inbound {proto} {target} -> :{port}"
            kd = {"direction": direction, "address": target, "local_port": port, "proto": proto}
        else:
            host_port = f"[{target}]:{port}" if ":" in target else f"{target}:{port}"
            item = f"{direction} {proto} {host_port}"
            kd = {"direction": direction, "target": target, "port": port, "proto": proto}
        facts = {"addresses": sorted(value["addresses"])}
        if value["protocols"]:
            facts["protocols"] = sorted(value["protocols"])
        return item, kd, facts

    def peer_fields(a, b):
        if a["protocols"] and b["protocols"] and a["protocols"] != b["protocols"]:
            return {"protocols": sorted(a["protocols"])}, {"protocols": sorted(b["protocols"])}
        return {}, {}

    def describe_file(key, value):
        path, kind = key
        return f"{kind} {path}", {"path": path, "kind": kind}, {"access": value}

    def file_fields(a, b):
        return ({"access": a}, {"access": b}) if a != b else ({}, {})

    def describe_library(key, _value):
        return key, {"path": key}, {}

    for kn, ko in pairs.items():
        po, pn = g_old[ko], g_new[kn]
        sec["peers"] += _compare("peers", _peers(po), _peers(pn), describe_peer, peer_fields, ko)
        sec["files"] += _compare("files", _files(po), _files(pn), describe_file, file_fields, ko)
        lo, ln = _libraries(po), _libraries(pn)
        sec["libraries"] += _compare("libraries", dict.fromkeys(lo), dict.fromkeys(ln), describe_library,
                                     _no_fields, ko)

    # packages
    used_o = used_n = None
    if process:
        used_o = {p.identity for p in procs_old}
        used_n = {p.identity for p in procs_new}

    def describe_package(key, value):
        facts = {"version": sorted(value["versions"])}
        if value["architectures"]:
            facts["architecture"] = sorted(value["architectures"])
        if value["manager"]:
            facts["manager"] = value["manager"]
        return key, {"name": key}, facts

    def package_fields(a, b):
        o, n = {}, {}
        if a["versions"] != b["versions"]:
            o["version"], n["version"] = sorted(a["versions"]), sorted(b["versions"])
        if a["architectures"] and b["architectures"] and a["architectures"] != b["architectures"]:
            o["architecture"], n["architecture"] = sorted(a["architectures"]), sorted(b["architectures"])
        return o, n

    sec["packages"] = _compare("packages", _packages(old, used_o), _packages(new, used_n), describe_package,
                               package_fields)

    for name in SECTIONS:
        sec[name].sort(key=Change.sort_key)
    log.debug("diff done old=%s new=%s changes=%d", result.old.get("hostname"), result.new.get("hostname"),
              len(result.changes))
    return result


# --------------------------------------------------------------------------------- rendering
def _when(ts: Any) -> str:
    if not ts:
        return "?"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _facts_suffix(c: Change) -> str:
    facts = c.old if c.change == REMOVED else c.new
    if c.section == "listeners":
        return f"  bind {_show(facts.get('addresses'))}  ({_show(facts.get('processes'))})"
    if c.section == "packages":
        return f" {_show(facts.get('version'))}"
    if c.section == "files":
        return f"  ({facts.get('access', '')})"
    if c.section == "peers" and facts.get("protocols"):
        return f"  ({_show(facts['protocols'])})"
    if c.section == "processes":
        parts = [f"user {facts['user']}"] if facts.get("user") else []
        if facts.get("listens"):
            parts.append("listens " + " ".join(facts["listens"]))
        parts += [f"{facts[k]} {k}" for k in ("peers", "files") if facts.get(k)]
        return f"  ({', '.join(parts)})" if parts else ""
    return ""


def _line(c: Change) -> str:
    return c.text() if c.change == CHANGED else c.text() + _facts_suffix(c)


def render_diff(result: DiffResult, out: TextIO) -> None:
    """The text rendering: a header, one block per section that has changes, and a summary line."""
    for sign, side in (("---", result.old), ("+++", result.new)):
        out.write(f"{sign} {side.get('hostname') or '?'} ({side.get('mode') or '?'}, "
                  f"{_when(side.get('generated_at'))})\n")
    if result.process:
        out.write(f"processes: {result.process}\n")
    for name in SECTIONS:
        changes = result.sections[name]
        if not changes:
            continue
        out.write(f"\n{name}:\n")
        if name in ("peers", "files", "libraries"):
            current = None
            shown: Dict[str, int] = {}
            hidden: Dict[str, int] = {}

            def flush():
                for change in (REMOVED, ADDED):
                    if hidden.get(change):
                        out.write(f"    {_SIGN[change]} ... and {hidden[change]} more {name}\n")

            for c in changes:
                if c.process != current:
                    flush()
                    current, shown, hidden = c.process, {}, {}
                    out.write(f"  {c.process}\n")
                if name == "libraries" and shown.get(c.change, 0) >= LIBRARY_LINES:
                    hidden[c.change] = hidden.get(c.change, 0) + 1
                    continue
                shown[c.change] = shown.get(c.change, 0) + 1
                out.write(f"    {_line(c)}\n")
            flush()
        else:
            for c in changes:
                out.write(f"  {_line(c)}\n")
    counts = result.counts()
    out.write("\n" + (f"{counts[REMOVED]} removed, {counts[ADDED]} added, {counts[CHANGED]} changed"
                      if not result.empty else "no differences") + "\n")


__all__ = ["Change", "DiffResult", "diff_profiles", "render_diff", "SECTIONS"]
