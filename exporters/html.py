"""``export --format html``: one self-contained HTML report of the selected processes.

Host summary, processes, listeners, peers (names, protocols), files by class, packages, the
dependency graph (inline SVG drawn by Graphviz ``dot``) and coverage (probes and gaps). No external
resource: CSS is inline, the graph is inline SVG, nothing is fetched. Every value from the profile
is escaped with ``html.escape``. Long sections are capped (``MAX_ROWS``) with a count of the rest.
"""
from __future__ import annotations

import datetime
import html
import logging
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..agent.errors import AsbuiltError
from ..agent.model import FILE_CLASSES, FileRef, Process, Profile
from .artifact import Artifact
from .graph import clean, endpoint, listening, process_label, svg as graph_svg
from .packages import native_arch, plural, wanted_packages

log = logging.getLogger(__name__)

MAX_ROWS = 300  # per table; the rest is counted

CSS = """
:root { --fg:#0f172a; --muted:#475569; --line:#e2e8f0; --head:#f1f5f9; --accent:#1e40af; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: #fff; }
header { background: var(--accent); color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; opacity: .9; }
main { padding: 8px 28px 40px; max-width: 1600px; }
nav { margin: 12px 0; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
h2 { margin: 28px 0 8px; font-size: 18px; border-bottom: 2px solid var(--line); padding-bottom: 4px; }
h3 { margin: 18px 0 6px; font-size: 15px; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 12px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12.5px; word-break: break-all; }
.muted { color: var(--muted); }
.tag { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 12px; background: #e0e7ff; }
.bad { background: #fee2e2; } .ok { background: #dcfce7; } .warn { background: #fef3c7; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 18px; margin: 6px 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
.graph { overflow: auto; border: 1px solid var(--line); padding: 8px; }
.graph svg { max-width: 100%; height: auto; }
"""


def e(value) -> str:
    """Escaped text of any value (None -> empty)."""
    if value is None:
        return ""
    return html.escape(clean(str(value)), quote=True)


def _bytes(n: Optional[int]) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024.0
    return str(n)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "\u2026"


def _when(ts: float) -> str:
    if not ts:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], total: Optional[int] = None,
           numeric: Sequence[int] = ()) -> str:
    """A table of already-escaped cells, capped at MAX_ROWS rows."""
    out = ["<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    n = 0
    for row in rows:
        n += 1
        if n > MAX_ROWS:
            continue
        out.append("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    total = n if total is None else total
    if total > MAX_ROWS:
        out.append(f'<p class="muted">{total - MAX_ROWS} more rows not shown.</p>')
    if not n:
        return '<p class="muted">None.</p>'
    return "".join(out)


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{e(title)}</h2>{body}</section>'


def _who(p: Process) -> str:
    host = f'<span class="muted">@{e(p.host)}</span> ' if p.host else ""
    return f"{host}{e(process_label(p))} <span class=\"muted\">pid {p.pid}</span>"


# ------------------------------------------------------------------------------ sections
def _host(profile: Profile, processes: List[Process]) -> str:
    hosts = profile.hosts if profile.mode == "fleet" and profile.hosts else [profile.host]
    run = [("Profile mode", profile.mode), ("Generated", _when(profile.generated_at)),
           ("Window", f"{profile.duration_seconds:.1f} s" if profile.duration_seconds else ""),
           ("asbuilt", profile.tool_version),
           ("Processes in this report", f"{len(processes)} of {len(profile.processes)}")]

    def facts(rows: List[Tuple[str, str]]) -> str:
        return '<dl class="facts">' + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in rows if v) + "</dl>"

    parts = []
    for h in hosts:
        rows = [("Hostname", h.hostname), ("OS", h.os.pretty_name or h.os.name),
                ("Kernel", " ".join(x for x in (h.kernel.release, h.kernel.machine) if x)),
                ("CPU", f"{h.cpu.model} ({h.cpu.logical_count} logical)" if h.cpu.logical_count else h.cpu.model),
                ("Memory", _bytes(h.memory.total_bytes) if h.memory.total_bytes else ""),
                ("Virtualization", h.virtualization),
                ("Addresses", ", ".join(f"{a.address}/{a.prefixlen}" for n in h.nics for a in n.addresses
                                        if n.kind != "loopback")),
                ("Default gateway", ", ".join(h.default_gateways)),
                ("DNS servers", ", ".join(h.dns.nameservers))]
        if len(hosts) == 1:
            parts.append(facts(rows + run))
        else:
            parts.append(f"<h3>{e(h.hostname or 'host')}</h3>" + facts(rows))
    if len(hosts) > 1:
        parts.append("<h3>Profile</h3>" + facts(run))
    return "".join(parts)


def _processes(processes: List[Process]) -> str:
    def row(p: Process) -> List[str]:
        where = p.systemd_unit or (f"{p.container_runtime}:{p.container_id[:12]}" if p.container_id else "")
        return [str(p.pid), e(p.host), e(process_label(p)), f'<span class="mono">{e(p.exe)}</span>',
                f'<span class="mono">{e(_cut(" ".join(p.cmdline), 160))}</span>', e(p.user), e(where),
                e(p.exe_package or ""), f"{p.cpu_seconds:.1f}", e(_bytes(p.rss_bytes)),
                str(len(listening(p))), str(len(p.peers)), str(len(p.files))]

    headers = ["PID", "Host", "Process", "Executable", "Command line", "User", "Unit / container", "Package",
               "CPU s", "RSS", "Listeners", "Peers", "Files"]
    rows = [row(p) for p in sorted(processes, key=lambda p: (p.host, not (p.peers or listening(p)),
                                                              process_label(p), p.pid))]
    if not any(p.host for p in processes):
        headers.pop(1)
        rows = [r[:1] + r[2:] for r in rows]
    n = len(headers)
    return _table(headers, rows, numeric=(0, n - 5, n - 4, n - 3, n - 2, n - 1))


def _listeners(processes: List[Process]) -> str:
    rows = []
    for p in processes:
        for s in listening(p):
            clients = [x for x in p.peers if x.direction == "inbound" and x.local_port == s.local_port]
            protocols = sorted({x.protocol for x in clients if x.protocol})
            rows.append((s.proto, s.local_port, s.local_address, [
                e(s.proto), f'<span class="mono">{e(endpoint(s.local_address, s.local_port))}</span>', _who(p),
                e(", ".join(protocols)), str(len({x.address for x in clients})),
                str(sum(x.connections for x in clients))]))
    rows.sort(key=lambda r: r[:3])
    return _table(["Proto", "Address", "Process", "Protocols seen", "Clients", "Connections"],
                  [r[3] for r in rows], numeric=(4, 5))


def _peers(processes: List[Process]) -> str:
    rows = []
    for p in processes:
        for x in p.peers:
            rows.append((x.direction != "inbound", -x.connections, [
                _who(p), e(x.direction or "?"),
                f'<span class="mono">{e(endpoint(x.address, x.port) if x.direction != "inbound" else x.address)}</span>',
                e(", ".join(x.names)), e("/".join(v for v in (x.proto, x.protocol) if v)),
                e(", ".join(f"{k}={v}" for k, v in sorted(x.details.items()))),
                str(x.local_port or ""), str(x.connections), e(_bytes(x.bytes_sent)), e(_bytes(x.bytes_received)),
                e(f"{x.host} {x.process}".strip() or "")]))
    rows.sort(key=lambda r: (r[0], r[1]))
    headers = ["Process", "Direction", "Peer", "Names", "Protocol", "Details", "Our port", "Connections",
               "Sent", "Received"]
    fleet = any(x.host for p in processes for x in p.peers)
    body = [r[2] if fleet else r[2][:-1] for r in rows]
    return _table(headers + (["Fleet process"] if fleet else []), body, numeric=(6, 7, 8, 9))


def _files(processes: List[Process]) -> str:
    by_path: Dict[Tuple[str, str], List[Tuple[Process, FileRef]]] = {}
    for p in processes:
        for ref in list(p.files) + list(p.libraries) + list(p.mapped_files):
            by_path.setdefault((ref.kind, ref.path), []).append((p, ref))
    if not by_path:
        return '<p class="muted">No file is recorded for these processes.</p>'
    order = {k: i for i, k in enumerate(FILE_CLASSES)}
    kinds = sorted({k for k, _ in by_path}, key=lambda k: (order.get(k, 99), k))
    counts = ", ".join(f"{k}: {sum(1 for kk, _ in by_path if kk == k)}" for k in kinds)
    parts = [f'<p class="muted">{e(counts)}</p>']
    for kind in kinds:
        rows = []
        for (k, path), refs in sorted(by_path.items()):
            if k != kind:
                continue
            modes = "".join(c for c in "rwactxp" if any(c in (r.mode or "") for _, r in refs))
            ref = refs[0][1]
            owner = (e(ref.package) if ref.package else
                     '<span class="tag warn">no package</span>' if ref.owned is False else
                     '<span class="muted">unknown</span>')
            rows.append([f'<span class="mono">{e(path)}</span>', e(modes), owner,
                         e("yes" if ref.modified else ""), e(", ".join(sorted({process_label(p) for p, _ in refs}))),
                         str(sum(r.count for _, r in refs) or "")])
        parts.append(f"<h3>{e(kind)} ({len(rows)})</h3>")
        parts.append(_table(["Path", "Mode", "Package", "Modified", "Used by", "Opens"], rows, numeric=(5,)))
    return "".join(parts)


def _packages(profile: Profile, processes: List[Process]) -> str:
    native = native_arch(profile)
    rows = []
    for w in wanted_packages(profile, processes):
        origin = (f'<span class="tag bad">LOCAL</span> {e(w.origin)}' if w.local else
                  e(w.origin) if w.origin else '<span class="muted">unknown</span>')
        rows.append([f'<span class="mono">{e(w.spec(native))}</span>', e(w.name), e(w.version), e(w.architecture),
                     e(w.manager), origin, e(", ".join(w.users))])
    note = ('<p class="muted">LOCAL: no repository known to the source host offers this version.</p>'
            if rows else "")
    return _table(["Install as", "Name", "Version", "Arch", "Manager", "Origin", "Used by"], rows) + note


def _coverage(profile: Profile) -> str:
    cov = profile.coverage
    status = {"ok": "ok", "error": "bad", "unavailable": "warn", "skipped": "warn"}
    probes = [[e(r.name), f'<span class="tag {status.get(r.status, "")}">{e(r.status)}</span>', e(r.mode),
               f"{r.duration_seconds:.3f}" if r.duration_seconds else "", str(r.items or ""),
               str(r.lost_events or ""), e(r.reason)] for r in cov.probes]
    out = [f'<p>Privileged: {e("yes" if cov.privileged else "no")}'
           + (f" &middot; mode {e(cov.mode)}" if cov.mode else "") + "</p>",
           "<h3>Probes</h3>",
           _table(["Probe", "Status", "Mode", "Seconds", "Items", "Lost events", "Reason"], probes,
                  numeric=(3, 4, 5))]
    gaps = [[e(g.kind), e(g.subject), e(g.detail)] for g in cov.gaps]
    out.append(f"<h3>Gaps ({len(cov.gaps) + cov.gaps_dropped})</h3>")
    out.append(_table(["Kind", "Subject", "Detail"], gaps))
    if cov.gaps_dropped:
        out.append(f'<p class="muted">{cov.gaps_dropped} more gaps past the profile\'s cap were counted, not kept.</p>')
    return "".join(out)


_XML_HEAD = re.compile(r"^\s*(<\?xml[^>]*\?>\s*)?(<!DOCTYPE[^>]*>\s*)?", re.S)


def _graph(profile: Profile, processes: List[Process]) -> str:
    try:
        doc = graph_svg(profile, processes) or ""
    except AsbuiltError as err:
        log.warning("html graph unavailable reason=%s", err)
        return f'<p class="muted">Graph not drawn: {e(err)}</p>'
    return f'<div class="graph">{_XML_HEAD.sub("", doc, count=1)}</div>'


def render_html(profile: Profile, processes: List[Process]) -> str:
    hosts = sorted({p.host for p in processes if p.host})
    name = (f"fleet of {len(profile.hosts)} hosts" if profile.mode == "fleet"
            else profile.host.hostname or "host")
    subtitle = (f"{plural(len(processes), 'process', 'processes')} \u00b7 {profile.mode} profile \u00b7 generated "
                f"{_when(profile.generated_at) or 'at an unknown time'}")
    if hosts:
        subtitle += f" \u00b7 hosts: {', '.join(hosts)}"
    sections = [("host", "Host" if profile.mode != "fleet" else "Hosts", _host(profile, processes)),
                ("processes", "Processes", _processes(processes)),
                ("graph", "Dependency graph", _graph(profile, processes)),
                ("listeners", "Listeners", _listeners(processes)),
                ("peers", "Peers", _peers(processes)),
                ("files", "Files by class", _files(processes)),
                ("packages", "Packages", _packages(profile, processes)),
                ("coverage", "Coverage and gaps", _coverage(profile))]
    nav = "".join(f'<a href="#{a}">{e(t)}</a>' for a, t, _ in sections)
    body = "".join(_section(a, t, b) for a, t, b in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{e('asbuilt report: ' + name)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{e('As-built: ' + name)}</h1><p>{e(subtitle)}</p></header>"
            f"<main><nav>{nav}</nav>{body}</main></body></html>\n")


def export(profile: Profile, processes: List[Process], output: str = "") -> List[Artifact]:
    name = os.path.basename(output) if output.endswith((".html", ".htm")) else "report.html"
    return [Artifact(name, render_html(profile, processes).encode("utf-8"))]
