"""Terminal renderings: the profile summary (``show``, ``scan``, ``trace``) and the doctor table.

Everything here reads the model; nothing is computed that the profile does not already hold.
"""
from __future__ import annotations

import collections
import datetime
import json
from typing import Dict, Iterable, List, TextIO, Tuple

from ..agent.model import Process, Profile


def _console(out: TextIO):
    from rich.console import Console

    isatty = hasattr(out, "isatty") and out.isatty()
    return Console(file=out, width=None if isatty else 160, highlight=False, soft_wrap=False,
                   force_terminal=isatty, no_color=not isatty)


def _table(title: str, *columns: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left", title_style="bold", show_edge=False, pad_edge=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    return table


def _bytes(n) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)


def _when(ts) -> str:
    if not ts:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _where(p: Process) -> str:
    if p.container_id:
        return f"{p.container_runtime or 'container'}:{p.container_id[:12]}"
    return p.systemd_unit


def listeners(profile: Profile) -> List[Tuple[Process, object]]:
    rows = []
    for proc in profile.processes:
        for s in proc.sockets:
            if s.state == "LISTEN" or (s.proto == "udp" and not s.remote_port and s.local_port):
                rows.append((proc, s))
    rows.sort(key=lambda r: (r[1].proto, r[1].local_port, r[1].local_address))
    return rows


def matters(proc: Process) -> bool:
    """A process worth a line by default: it listens, talks to peers, or is a unit/container main."""
    return bool(proc.peers or any(s.state == "LISTEN" for s in proc.sockets) or proc.container_id
                or (proc.systemd_unit.endswith(".service") and proc.ppid <= 1) or proc.execs)


def one_line(profile: Profile) -> str:
    n_listen = len(listeners(profile))
    n_peers = sum(len(p.peers) for p in profile.processes)
    gaps = len(profile.coverage.gaps) + profile.coverage.gaps_dropped
    return (f"{profile.host.hostname or '?'}: {len(profile.processes)} processes, {n_listen} listeners, "
            f"{n_peers} peers, {len(profile.packages)} packages in use, {gaps} gaps")


def render(profile: Profile, out: TextIO, everything: bool = False) -> None:
    console = _console(out)
    h = profile.host
    console.print(f"[bold]{h.hostname or '?'}[/bold]  {h.os.pretty_name or h.os.id}  kernel {h.kernel.release}"
                  f"  {h.cpu.logical_count}×{h.cpu.model or 'cpu'}  {_bytes(h.memory.total_bytes)} RAM"
                  f"{'  ' + h.virtualization if h.virtualization else ''}  booted {_when(h.boot_time)}"
                  f"  ({profile.mode} at {_when(profile.generated_at)})")

    t = _table("Network interfaces", "name", "kind", "driver", "mac", "mtu", "state", "addresses")
    for nic in h.nics:
        t.add_row(nic.name, nic.kind, nic.driver, nic.mac, str(nic.mtu or ""), nic.state,
                  " ".join(f"{a.address}/{a.prefixlen}" for a in nic.addresses))
    console.print(t)
    gws = ", ".join(h.default_gateways) or "none"
    console.print(f"default gateway: {gws}   DNS: {', '.join(h.dns.nameservers) or 'none'}"
                  f"{'  search ' + ' '.join(h.dns.search) if h.dns.search else ''}")
    t = _table("Filesystems", "mountpoint", "device", "type", "size", "used")
    for m in h.mounts:
        if m.size_bytes:
            t.add_row(m.mountpoint, m.device, m.fstype, _bytes(m.size_bytes), _bytes(m.used_bytes))
    console.print(t)

    t = _table("Listeners", "proto", "address", "port", "process", "pid", "unit/container", "package")
    for proc, s in listeners(profile):
        t.add_row(s.proto + ("6" if s.family == "inet6" else ""), s.local_address, str(s.local_port),
                  proc.name, str(proc.pid), _where(proc), proc.exe_package or "")
    console.print(t)

    procs = [p for p in profile.processes if everything or matters(p)]
    t = _table(f"Processes ({len(procs)} of {len(profile.processes)}{'' if everything else '; --all for every one'})",
               "pid", "ppid", "name", "user", "unit/container", "exe (package)", "libs", "files by class", "listen", "peers")
    for p in sorted(procs, key=lambda p: p.pid):
        classes = collections.Counter(f.kind for f in p.files)
        listen = sorted({s.local_port for s in p.sockets if s.state == "LISTEN"})
        t.add_row(str(p.pid), str(p.ppid), p.name, p.user, _where(p),
                  f"{p.exe} ({p.exe_package or 'no package'})" if p.exe else "",
                  str(len(p.libraries)), " ".join(f"{k}:{v}" for k, v in sorted(classes.items())),
                  " ".join(map(str, listen)), str(len(p.peers)))
    console.print(t)

    t = _table("Dependencies (peers)", "process", "direction", "peer", "port", "proto", "protocol", "conns",
               "sent", "received", "learned")
    for p in sorted(procs, key=lambda p: p.pid):
        for peer in p.peers:
            name = ", ".join(peer.names) or peer.address
            if peer.names:
                name += f" ({peer.address})"
            t.add_row(f"{p.name}[{p.pid}]", peer.direction, name,
                      str(peer.local_port if peer.direction == "inbound" else peer.port), peer.proto,
                      peer.protocol, str(peer.connections or ""), _bytes(peer.bytes_sent),
                      _bytes(peer.bytes_received), peer.learned)
    console.print(t)

    t = _table("Files of interest (config, logs, data; no package = migrate by hand)",
               "process", "class", "mode", "path", "package", "learned")
    for p in sorted(procs, key=lambda p: p.pid):
        for f in p.files + p.failed_opens:
            if f.kind in ("config", "log", "data") or f.error:
                pkg = f.package or ("no package" if f.owned is False else "")
                if f.modified:
                    pkg += " (modified)"
                t.add_row(f"{p.name}[{p.pid}]", f.kind, f.error or f.mode, f.path, pkg, f.learned)
    console.print(t)

    t = _table("Packages in use", "package", "version", "origin", "installed", "modified files", "used by")
    for pkg in sorted(profile.packages, key=lambda k: k.name):
        t.add_row(pkg.name, pkg.version, pkg.origin, _when(pkg.install_time),
                  str(len(pkg.modified_files) or ""), str(len(pkg.used_by)))
    console.print(t)

    cov = profile.coverage
    t = _table("Coverage", "probe", "status", "mode", "items", "seconds", "lost", "reason")
    for run in cov.probes:
        t.add_row(run.name, run.status, run.mode, str(run.items), f"{run.duration_seconds:.3f}",
                  str(run.lost_events or ""), run.reason)
    console.print(t)
    kinds = collections.Counter(g.kind for g in cov.gaps)
    if kinds or cov.gaps_dropped:
        console.print("gaps: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
                      + (f", {cov.gaps_dropped} more not kept" if cov.gaps_dropped else ""))


def render_doctor(features: Dict[str, object], plan: Iterable, out: TextIO, as_json: bool = False) -> None:
    rows = list(plan)
    if as_json:
        data = {"features": {k: {"ok": f.ok, "detail": f.detail} for k, f in features.items()},
                "probes": [{"name": s.name, "kind": s.kind, "verdict": v, "why": why} for s, v, why in rows]}
        out.write(json.dumps(data, indent=1) + "\n")
        return
    console = _console(out)
    t = _table("Host support", "feature", "ok", "detail")
    for name, feat in features.items():
        t.add_row(name, "yes" if feat.ok else "NO", feat.detail)
    console.print(t)
    t = _table("Probes on this host", "probe", "kind", "will", "what it reads", "why")
    for spec, verdict, why in rows:
        t.add_row(spec.name, spec.kind, verdict, spec.description, why)
    console.print(t)
