"""``export --format graph``: the dependency graph of the selected processes, as Mermaid and Graphviz.

Nodes are the processes (labelled by systemd unit or executable name, and host in a fleet
profile), their listeners, the peers they connect to (DNS name when known, else address:port, with
the protocol spoken) and the clients that connect to them (aggregated by address). Edges go
process -> peer (outbound: proto/protocol and connections) and client -> listener -> process
(inbound). In a fleet profile (``asbuilt merge``) each host is a cluster, a peer resolved to a
fleet process (``Peer.host``/``Peer.process``) is an edge between the two process nodes, and
peers outside the fleet are grouped in an "outside the fleet" cluster.

A process with many peers stays readable: past ``MAX_PEERS`` per process and direction the rest
fold into one "+N more" node. Processes without listeners or peers fold into one node per host.

Artifacts: ``graph.mmd`` and ``graph.dot``; with ``-o X.svg`` or ``-o X.png`` the graph is
rendered by Graphviz's ``dot`` and only that file is returned; ``-o X.dot``/``X.mmd`` gives that
text alone.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from ..agent.errors import AsbuiltError
from ..agent.model import Peer, Process, Profile, Socket
from .artifact import Artifact

log = logging.getLogger(__name__)

MAX_PEERS = 30  # per process and direction; the rest become one "+N more" node
MAX_PROCESSES = 150  # process nodes per host before "+N more processes"
RENDER_TIMEOUT_SECONDS = 120
MERMAID_MAX_TEXT = 50000  # mermaid's default maxTextSize: larger diagrams are refused unless configured
OUTSIDE = "\x00outside"  # cluster key of peers outside the fleet
RENDERED = {".svg": "svg", ".png": "png"}

# node kind -> (Graphviz attributes, Mermaid shape open/close, Mermaid class style)
STYLES = {
    "process": ('shape=box, style="rounded,filled,bold", fillcolor="#dbeafe", color="#1e40af"',
                ('["', '"]'), "fill:#dbeafe,stroke:#1e40af,stroke-width:2px,color:#0f172a"),
    "listener": ('shape=box, style="filled", fillcolor="#fef3c7", color="#b45309"',
                 ('(["', '"])'), "fill:#fef3c7,stroke:#b45309,color:#0f172a"),
    "peer": ('shape=ellipse, style="filled", fillcolor="#f3f4f6", color="#4b5563"',
             ('("', '")'), "fill:#f3f4f6,stroke:#4b5563,color:#0f172a"),
    "client": ('shape=ellipse, style="filled", fillcolor="#dcfce7", color="#15803d"',
               ('("', '")'), "fill:#dcfce7,stroke:#15803d,color:#0f172a"),
    "more": ('shape=note, style="filled", fillcolor="#fee2e2", color="#b91c1c"',
             ('{{"', '"}}'), "fill:#fee2e2,stroke:#b91c1c,color:#0f172a"),
}


# ------------------------------------------------------------------------------- labels
def process_label(p: Process) -> str:
    """How a process is named to a person: its service unit, else its executable's basename."""
    unit = p.systemd_unit
    if unit and unit.endswith(".service") and not unit.startswith("user@"):
        return unit
    return os.path.basename(p.exe) or p.name or f"pid {p.pid}"


def endpoint(address: str, port: int) -> str:
    """``address:port``, IPv6 addresses in brackets."""
    if ":" in address:
        address = f"[{address}]"
    return f"{address}:{port}" if port else address


def clean(text: str) -> str:
    """Printable, encodable text on one line: undecodable bytes (surrogate escapes) and control
    characters become U+FFFD, tabs and newlines a space, so every renderer gets valid UTF-8."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (from a JSON escape)
        raw = text.encode("utf-8", "replace")
    text = raw.decode("utf-8", "replace")
    return re.sub(r"[\x00-\x1f\x7f]", "\ufffd", re.sub(r"[\t\n\r]", " ", text))


def dot_quote(text: str) -> str:
    """A Graphviz double-quoted string whose label shows ``text`` as is: backslash escapes and
    HTML entities (which Graphviz decodes in any label) are neutralised."""
    text = clean(text).replace("&", "&amp;").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


_MERMAID_SAFE = re.compile(r"[^\"#<>&`|\[\]{}();%\\]")


def mermaid_text(text: str) -> str:
    """Text for inside a quoted Mermaid label: characters Mermaid or HTML would read become
    ``#code;`` entity codes (Mermaid's own escape), everything else (unicode too) stays. A
    backslash is followed by a zero-width space, else ``\\n`` would still break the line."""
    out = "".join(c if _MERMAID_SAFE.match(c) else f"#{ord(c)};" for c in clean(text))
    return out.replace("#92;", "#92;\u200b")  # Mermaid reads a decoded backslash-n as a line break


# -------------------------------------------------------------------------------- model
@dataclass
class Node:
    id: str
    kind: str  # process, listener, peer, client, more
    lines: List[str]
    cluster: str = ""  # host name, OUTSIDE, or "" (no cluster)


@dataclass
class Edge:
    src: str
    dst: str
    label: str = ""
    style: str = "solid"  # solid, dashed (listener to its process)


@dataclass
class Graph:
    title: str = ""
    fleet: bool = False
    nodes: Dict[tuple, Node] = field(default_factory=dict)  # key -> node, in insertion order
    edges: Dict[tuple, Edge] = field(default_factory=dict)  # (src, dst, kind) -> edge
    _counts: Dict[tuple, List[int]] = field(default_factory=dict)  # edge key -> [connections, peers]

    def node(self, key: tuple, kind: str, lines: List[str], cluster: str = "") -> Node:
        got = self.nodes.get(key)
        if got is None:
            got = self.nodes[key] = Node(f"n{len(self.nodes) + 1}", kind, lines, cluster)
        return got

    def edge(self, src: Node, dst: Node, what: str, connections: int = 0, style: str = "solid") -> None:
        """One edge per (src, dst, what); connections add up over the peers folded into it."""
        key = (src.id, dst.id, what)
        counts = self._counts.setdefault(key, [0, 0])
        counts[0] += connections
        counts[1] += 1
        label = what
        if counts[0]:
            label += f" \u00b7 {counts[0]} conn" + ("s" if counts[0] != 1 else "")
        self.edges[key] = Edge(src.id, dst.id, label, style)

    def clusters(self) -> List[str]:
        seen: List[str] = []
        for n in self.nodes.values():
            if n.cluster and n.cluster not in seen:
                seen.append(n.cluster)
        return sorted(seen, key=lambda c: (c == OUTSIDE, c))


def listening(proc: Process) -> List[Socket]:
    return [s for s in proc.sockets
            if s.local_port and (s.state == "LISTEN" or (s.proto == "udp" and not s.remote_port))]


def _wire(peer: Peer) -> str:
    """``tcp/http`` (proto/protocol) for an edge label."""
    return "/".join(x for x in (peer.proto or "tcp", peer.protocol) if x)


def _weight(peer: Peer) -> tuple:
    return (-(peer.connections or 0), -((peer.bytes_sent or 0) + (peer.bytes_received or 0)),
            peer.address, peer.port)


def build(profile: Profile, processes: List[Process], max_peers: int = MAX_PEERS) -> Graph:
    """The graph of ``processes`` (a selection from ``profile``)."""
    fleet = profile.mode == "fleet" or any(p.host for p in processes)
    host = profile.host.hostname
    g = Graph(fleet=fleet, title=(f"asbuilt fleet: {len(profile.hosts)} hosts" if fleet
                                  else f"asbuilt: {host or 'host'}"))
    everyone = {(p.host, p.identity): p for p in profile.processes if p.identity}

    def pkey(p: Process) -> tuple:
        return ("process", p.host, p.identity or f"pid:{p.pid}")

    def pnode(p: Process) -> Node:
        lines = [process_label(p)]
        if p.host:
            lines.append(p.host)
        return g.node(pkey(p), "process", lines, p.host if fleet else "")

    def outside(cluster_host: str) -> str:
        if not fleet:
            return ""
        return cluster_host or OUTSIDE

    active = [p for p in processes if p.peers or listening(p)]
    busy = {id(p) for p in active}
    quiet = [p for p in processes if id(p) not in busy]
    shown = active or quiet
    per_host: Dict[str, int] = {}
    hidden: Dict[str, int] = {}
    for p in sorted(shown, key=lambda p: (p.host, process_label(p), p.pid)):
        n = per_host.get(p.host, 0)
        if n >= MAX_PROCESSES and pkey(p) not in g.nodes:
            hidden[p.host] = hidden.get(p.host, 0) + 1
            continue
        if pkey(p) not in g.nodes:
            per_host[p.host] = n + 1
        pnode(p)
    if active and quiet:
        for h in sorted({p.host for p in quiet}):
            count = sum(1 for p in quiet if p.host == h)
            g.node(("quiet", h), "more", [f"{count} other process" + ("es" if count != 1 else ""),
                                          "no listener, no peer"],
                   h if fleet else "")
    for h, count in sorted(hidden.items()):
        g.node(("hidden", h), "more", [f"+{count} more processes"], h if fleet else "")

    # processes of one identity share a node (xN); nodes of one name in one cluster show a pid
    members: Dict[str, List[Process]] = {}
    for p in shown:
        if pkey(p) in g.nodes:
            members.setdefault(g.nodes[pkey(p)].id, []).append(p)
    named: Dict[tuple, List[Node]] = {}
    for n in g.nodes.values():
        if n.id in members:
            named.setdefault((n.cluster, n.lines[0]), []).append(n)
    for same in named.values():
        for n in same:
            procs = members[n.id]
            if len(same) > 1:
                n.lines.append(f"pid {min(p.pid for p in procs)}")
            if len(procs) > 1:
                n.lines.append(f"\u00d7{len(procs)} processes")
    selected = {pkey(p) for p in shown}
    for p in shown:
        if pkey(p) not in g.nodes:
            continue
        me = g.nodes[pkey(p)]
        # listeners: one node per (proto, port), the addresses it is bound to on a second line
        ports: Dict[Tuple[str, int], List[str]] = {}
        for s in listening(p):
            addrs = ports.setdefault((s.proto or "tcp", s.local_port), [])
            if s.local_address and s.local_address not in addrs:
                addrs.append(s.local_address)

        def listener(proto: str, port: int) -> Node:
            addrs = ports.get((proto, port), [])
            lines = [f"{proto} :{port}"]
            shown_addrs = [a for a in addrs if a not in ("0.0.0.0", "::")] or addrs
            if shown_addrs:
                lines.append(", ".join(shown_addrs[:4]) + (" \u2026" if len(shown_addrs) > 4 else ""))
            node = g.node(("listener",) + pkey(p) + (proto, port), "listener", lines, me.cluster)
            g.edge(node, me, "", style="dashed")
            return node

        for proto, port in sorted(ports):
            listener(proto, port)

        outbound = sorted((x for x in p.peers if x.direction != "inbound"), key=_weight)
        inbound = [x for x in p.peers if x.direction == "inbound"]
        for peer in outbound[:max_peers]:
            target = everyone.get((peer.host, peer.process)) if (fleet and peer.process) else None
            if target is not None:
                g.edge(me, pnode(target), f"{_wire(peer)} :{peer.port}", peer.connections)
                continue
            cluster = outside(peer.host) if fleet else ""
            lines = [endpoint(peer.names[0], peer.port) if peer.names else endpoint(peer.address, peer.port)]
            if peer.names:
                lines.append(peer.address)
            if peer.protocol:
                lines.append(peer.protocol)
            node = g.node(("peer", cluster, peer.proto, peer.address, peer.port), "peer", lines, cluster)
            g.edge(me, node, _wire(peer), peer.connections)
        rest = outbound[max_peers:]
        if rest:
            conns = sum(x.connections for x in rest)
            node = g.node(("more-out",) + pkey(p), "more", [f"+{len(rest)} more peers"],
                          outside("") if fleet else "")
            g.edge(me, node, f"{len(rest)} peers", conns)

        # inbound: clients aggregated by address (and listener port)
        clients: Dict[tuple, List[Peer]] = {}
        for peer in inbound:
            clients.setdefault((peer.host, peer.process, peer.address), []).append(peer)
        ranked = sorted(clients.items(), key=lambda kv: (-sum(x.connections for x in kv[1]), kv[0]))
        for (chost, cproc, address), peers in ranked[:max_peers]:
            names = sorted({n for x in peers for n in x.names})
            source = everyone.get((chost, cproc)) if (fleet and cproc) else None
            if source is not None and pkey(source) in selected and _has_outbound(source, p):
                continue  # drawn from the client's side, process to process
            for peer in peers:
                port = peer.local_port
                if source is not None:
                    g.edge(pnode(source), me, f"{_wire(peer)} :{port}" if port else _wire(peer),
                           peer.connections)
                    continue
                cluster = outside(chost) if fleet else ""
                lines = ([names[0], address] if names else [address]) + ["client"]
                cnode = g.node(("client", cluster, address), "client", lines, cluster)
                dst = listener(peer.proto or "tcp", port) if port else me
                g.edge(cnode, dst, peer.protocol or peer.proto or "tcp", peer.connections)
        rest_in = ranked[max_peers:]
        if rest_in:
            conns = sum(x.connections for _, peers in rest_in for x in peers)
            node = g.node(("more-in",) + pkey(p), "more", [f"+{len(rest_in)} more clients"],
                          outside("") if fleet else "")
            ports_in = {(x.proto or "tcp", x.local_port) for _, peers in rest_in for x in peers}
            proto, port = next(iter(ports_in)) if len(ports_in) == 1 else ("", 0)
            g.edge(node, listener(proto, port) if port else me, f"{len(rest_in)} clients", conns)
    return g


def _has_outbound(src: Process, dst: Process) -> bool:
    return any(x.direction != "inbound" and x.process == dst.identity and x.host == dst.host
               for x in src.peers)


# ------------------------------------------------------------------------------ render
def _cluster_label(key: str) -> str:
    return "outside the fleet" if key == OUTSIDE else key


def to_dot(g: Graph) -> str:
    out = ["digraph asbuilt {",
           f"  graph [rankdir=LR, fontname=\"Helvetica\", fontsize=12, labelloc=t, label={dot_quote(g.title)}, "
           "nodesep=0.25, ranksep=0.6];",
           '  node [fontname="Helvetica", fontsize=10];',
           '  edge [fontname="Helvetica", fontsize=9, color="#475569"];']

    def node_line(n: Node, indent: str) -> str:
        label = "\\n".join(dot_quote(line)[1:-1] for line in n.lines)
        return f'{indent}{n.id} [label="{label}", {STYLES[n.kind][0]}];'

    by_cluster: Dict[str, List[Node]] = {}
    for n in g.nodes.values():
        by_cluster.setdefault(n.cluster, []).append(n)
    for i, key in enumerate(g.clusters()):
        style = 'style="rounded,dashed"; color="#94a3b8"' if key == OUTSIDE else 'style="rounded"; color="#1e40af"'
        out.append(f"  subgraph cluster_{i} {{")
        out.append(f"    label={dot_quote(_cluster_label(key))}; {style};")
        out.extend(node_line(n, "    ") for n in by_cluster[key])
        out.append("  }")
    out.extend(node_line(n, "  ") for n in by_cluster.get("", []))
    for e in g.edges.values():
        attrs = [f"label={dot_quote(e.label)}"] if e.label else []
        if e.style == "dashed":
            attrs += ["style=dashed", "arrowhead=none"]
        out.append(f"  {e.src} -> {e.dst} [{', '.join(attrs)}];")
    out.append("}")
    return "\n".join(out) + "\n"


def to_mermaid(g: Graph) -> str:
    out = [f"%% {mermaid_text(g.title)}", "flowchart LR"]

    def node_line(n: Node, indent: str) -> str:
        open_, close = STYLES[n.kind][1]
        return f"{indent}{n.id}{open_}{'<br/>'.join(mermaid_text(x) for x in n.lines)}{close}"

    by_cluster: Dict[str, List[Node]] = {}
    for n in g.nodes.values():
        by_cluster.setdefault(n.cluster, []).append(n)
    for i, key in enumerate(g.clusters()):
        out.append(f'  subgraph c{i}["{mermaid_text(_cluster_label(key))}"]')
        out.extend(node_line(n, "    ") for n in by_cluster[key])
        out.append("  end")
    out.extend(node_line(n, "  ") for n in by_cluster.get("", []))
    for e in g.edges.values():
        arrow = "-.-" if e.style == "dashed" else "-->"
        label = f'|"{mermaid_text(e.label)}"|' if e.label else ""
        out.append(f"  {e.src} {arrow}{label} {e.dst}")
    for kind, (_, _, css) in STYLES.items():
        ids = [n.id for n in g.nodes.values() if n.kind == kind]
        if ids:
            out.append(f"  classDef {kind} {css}")
            out.append(f"  class {','.join(ids)} {kind}")
    text = "\n".join(out) + "\n"
    if len(text) > MERMAID_MAX_TEXT:
        out.insert(1, f"%% {len(text)} characters: past Mermaid's default maxTextSize ({MERMAID_MAX_TEXT}); "
                      "raise it in the renderer's config, or use graph.dot / --process to draw less")
        text = "\n".join(out) + "\n"
    return text


def render(dot_text: str, fmt: str) -> bytes:
    """Run Graphviz ``dot -T<fmt>`` on ``dot_text``; AsbuiltError (one line) when it cannot."""
    exe = shutil.which("dot")
    if exe is None:
        raise AsbuiltError("graph: Graphviz 'dot' not found (apt-get install graphviz)")
    try:
        r = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode("utf-8"), capture_output=True,
                           timeout=RENDER_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as err:
        raise AsbuiltError(f"graph: dot took longer than {RENDER_TIMEOUT_SECONDS} s") from err
    except OSError as err:
        raise AsbuiltError(f"graph: cannot run dot: {err.strerror or err}") from err
    if r.returncode != 0 or not r.stdout:
        msg = r.stderr.decode("utf-8", "replace").strip().splitlines()
        raise AsbuiltError(f"graph: dot -T{fmt} failed: {msg[0] if msg else 'exit %d' % r.returncode}")
    return r.stdout


def export(profile: Profile, processes: List[Process], output: str = "") -> List[Artifact]:
    g = build(profile, processes)
    log.info("graph nodes=%d edges=%d fleet=%s", len(g.nodes), len(g.edges), g.fleet)
    suffix = os.path.splitext(output)[1].lower()
    if suffix in RENDERED:
        fmt = RENDERED[suffix]
        return [Artifact(os.path.basename(output), render(to_dot(g), fmt), binary=fmt == "png")]
    dot = Artifact("graph.dot", to_dot(g).encode("utf-8"))
    mmd = Artifact("graph.mmd", to_mermaid(g).encode("utf-8"))
    if suffix in (".dot", ".gv"):
        return [dot]
    if suffix == ".mmd":
        return [mmd]
    return [mmd, dot]


def svg(profile: Profile, processes: List[Process]) -> str:
    """The graph as an SVG document (for the HTML report)."""
    return render(to_dot(build(profile, processes)), "svg").decode("utf-8", "replace")
