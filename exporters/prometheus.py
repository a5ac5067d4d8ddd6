"""Prometheus exporter of the daemon: a scrape-time collector over the rolling profile, and its HTTP server.

:class:`ProfileCollector` follows client_python's custom-collector pattern: nothing is kept in
module-level metrics; every scrape reads ``source.snapshot()`` (the current :class:`Profile`, read
only) and ``source.stats()`` (the daemon's counters) and yields metric families computed from them.

Families (names ``asbuilt_<area>_<name>_<unit>``; ``_total`` on counters):

* always: ``asbuilt_build_info``, the daemon's counters and gauges (``asbuilt_daemon_*``), per probe
  ``asbuilt_probe_up{probe,mode}``, ``asbuilt_probe_status{probe,status}``,
  ``asbuilt_probe_duration_seconds``, ``asbuilt_probe_items``, ``asbuilt_probe_lost_events_total``,
  coverage gaps by kind, profile facts and package counts, and the collector's own
  ``asbuilt_metrics_*`` (series emitted and dropped, the limit, collect errors by section, duration);
* capped (at most ``max_series`` series in one scrape, given out in this order): listeners
  (``asbuilt_listener_info``), dependencies (``asbuilt_dependency_connections_total`` and
  ``asbuilt_dependency_bytes_total{flow=sent|received}``, biggest first), processes
  (``asbuilt_processes{unit}``, ``asbuilt_process_info``), files by class
  (``asbuilt_process_files``), DNS names (``asbuilt_dns_resolutions_total``) and packages in use
  (``asbuilt_package_info``). What the cap leaves out is counted, cumulatively, in
  ``asbuilt_metrics_series_dropped_total{family}``.

Labels never carry a command line, an environment value, a peer's captured details, a gap's subject
or any path but an executable's. The ``process`` label that joins the families is the systemd
service (``nginx.service``) when the process runs in one, else its executable, else ``[comm]``.
Dependencies are TCP/UDP peers; an inbound peer's ``port`` is our listener's port (the client's
ephemeral port never becomes a label) and its ``peer`` is the client's name or address. Label values
are valid UTF-8, printable, and at most :data:`MAX_LABEL_LENGTH` characters (longer ones end in
``~`` and a hash, so two never collide).

Each section is computed in its own ``try``: a failing one logs one line, counts in
``asbuilt_metrics_collect_errors_total{section}``, and the scrape still succeeds without it.

:class:`MetricsServer` serves ``GET /metrics`` (and ``/`` with a pointer; 404 otherwise) from a
private :class:`CollectorRegistry` on a threading HTTP server, each connection in its own thread
with a socket timeout and a cap on concurrent connections, so a slow or broken client never holds up
another scrape. Optional TLS (1.2 minimum; the handshake happens in the connection's thread) and
HTTP basic auth against a salted PBKDF2-SHA256 hash from :func:`hash_password`; gzip when the client
accepts it.

The default listen address is ``127.0.0.1:``:data:`DEFAULT_PORT`. Prometheus's "default port
allocations" register has handed out every port from 9100 to 9999 since 2023 (new exporters get ports
from 10000 up, e.g. 10019 in 2024), so 9977 belongs to another exporter; it is also Gloo Edge's xDS
port. 10977 keeps the same last digits, lies well above the register's allocations seen so far, below
Linux's ephemeral range, and is no well-known service's port (it should be registered on the wiki).
"""
from __future__ import annotations

import base64
import binascii
import errno
import gc
import gzip
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import socket
import socketserver
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                    InfoMetricFamily)
from prometheus_client.exposition import choose_encoder

from ..agent import __version__
from ..agent.errors import AsbuiltError, UsageError
from ..agent.model import FILE_CLASSES, Process, Profile

log = logging.getLogger(__name__)

DEFAULT_PORT = 10977
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_MAX_SERIES = 2000
MAX_LABEL_LENGTH = 200
PBKDF2_ITERATIONS = 600_000
CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"

# Linux's default ip_local_port_range: a UDP socket bound there with no peer is a client's, not a service.
_EPHEMERAL_LOW, _EPHEMERAL_HIGH = 32768, 60999
_MAX_REASONS = 32  # distinct snapshot error reasons / gap kinds / probes kept as label values
_FILE_CLASSES = frozenset(FILE_CLASSES)

# Sections, each computed in its own try: what asbuilt_metrics_collect_errors_total counts by.
SECTIONS = ("daemon", "snapshot", "profile", "probes", "listeners", "dependencies", "processes", "files",
            "dns", "packages")
# Capped families in priority order (per-probe, daemon and summary families are never capped).
CAPPED_FAMILIES = ("asbuilt_listener_info", "asbuilt_dependency_connections_total", "asbuilt_dependency_bytes_total",
                   "asbuilt_processes", "asbuilt_process_info", "asbuilt_process_files",
                   "asbuilt_dns_resolutions_total", "asbuilt_package_info")

# family name -> (kind, help, label names); kind is counter, gauge or info. Names as exposed.
_FAMILIES: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "asbuilt_listener_info": (
        "info", "A listening TCP socket or bound UDP socket of a profiled process.",
        ("process", "proto", "address", "port")),
    "asbuilt_dependency_connections_total": (
        "counter", "Connections between a profiled process and a peer (inbound: to our listener's port).",
        ("process", "peer", "port", "proto", "protocol", "direction")),
    "asbuilt_dependency_bytes_total": (
        "counter", "Bytes exchanged with a peer, by flow (sent or received by the process).",
        ("process", "peer", "port", "proto", "protocol", "direction", "flow")),
    "asbuilt_processes": (
        "gauge", "Profiled processes (kernel threads excluded) by systemd unit (\"\" for none).",
        ("unit",)),
    "asbuilt_process_info": (
        "info", "A profiled process: identity is a short hash of its stable identity.",
        ("identity", "process", "exe", "unit", "container", "user")),
    "asbuilt_process_files": (
        "gauge", "Distinct files a process uses (open, mapped or traced), by class.", ("process", "class")),
    "asbuilt_dns_resolutions_total": (
        "counter", "Names a process resolved (at least 1 for a name seen once).", ("process", "name")),
    "asbuilt_package_info": (
        "info", "A package that provides files used by a profiled process.",
        ("name", "version", "manager", "origin")),
}


# ----------------------------------------------------------------------------------- listen
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def parse_listen(text: str) -> Tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (all IPv4 addresses) -> (host, port); else UsageError.

    Port 0 asks the kernel for a free port. ``off`` is not an address: the caller handles it.
    """
    value = (text or "").strip()
    bad = UsageError(f"metrics listen address {text!r} is not HOST:PORT, [IPV6]:PORT or off")
    if value.startswith("["):
        m = re.match(r"^\[([^\]]+)\]:(\d{1,5})$", value)
        if not m:
            raise bad
        host = m.group(1)
        try:
            if ipaddress.ip_address(host.split("%", 1)[0]).version != 6:
                raise bad
        except ValueError:
            raise bad from None
    else:
        m = re.match(r"^([^:\[\]\s]*):(\d{1,5})$", value)
        if not m:
            raise bad
        host = m.group(1) or "0.0.0.0"
        if not _HOSTNAME.match(host):
            raise bad
    port = int(m.group(2))
    if port > 65535:
        raise UsageError(f"metrics listen address {text!r}: port {port} is out of range (0-65535)")
    return host, port


# ----------------------------------------------------------------------------------- passwords
def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS, salt: Optional[str] = None) -> str:
    """A salted PBKDF2-SHA256 hash: ``pbkdf2_sha256$ITERATIONS$SALT$HASH`` (HASH base64), as Django writes."""
    if iterations < 1:
        raise UsageError("password hash: iterations must be positive")
    salt = salt or secrets.token_urlsafe(16)
    if "$" in salt:
        raise UsageError("password hash: the salt may not contain '$'")
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt.encode("utf-8"), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(digest).decode('ascii')}"


def _parse_hash(stored: str) -> Tuple[int, bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 4 or parts[0] != "pbkdf2_sha256" or not parts[1].isdigit() or not parts[2]:
        raise UsageError("metrics basic_auth_password_hash is not a pbkdf2_sha256$ITERATIONS$SALT$HASH string")
    try:
        digest = base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        raise UsageError("metrics basic_auth_password_hash: the hash part is not base64") from None
    iterations = int(parts[1])
    if iterations < 1 or len(digest) != 32:
        raise UsageError("metrics basic_auth_password_hash: bad iteration count or hash length")
    return iterations, parts[2].encode("utf-8"), digest


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a :func:`hash_password` string (constant-time compare)."""
    iterations, salt, digest = _parse_hash(stored)
    got = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8", "surrogateescape"), salt, iterations)
    return hmac.compare_digest(got, digest)


# ----------------------------------------------------------------------------------- labels
_label_cache: Dict[Any, str] = {}
_CACHE_MAX = 100_000


def _clean(value: Any) -> str:
    """A label value: valid UTF-8, printable, at most MAX_LABEL_LENGTH characters (cached)."""
    if value is None:
        return ""
    got = _label_cache.get(value)
    if got is not None:
        return got
    s = value if isinstance(value, str) else str(value)
    if not (s.isascii() and s.isprintable()):
        try:
            raw = s.encode("utf-8", "surrogateescape")  # bytes the profile kept as \udcXX
        except UnicodeEncodeError:
            raw = s.encode("utf-8", "replace")
        s = raw.decode("utf-8", "replace")
        s = "".join(c if c.isprintable() else "?" for c in s)
    if len(s) > MAX_LABEL_LENGTH:
        s = s[:MAX_LABEL_LENGTH - 9] + "~" + hashlib.sha256(s.encode("utf-8")).hexdigest()[:8]
    if len(_label_cache) >= _CACHE_MAX:
        _label_cache.clear()
    _label_cache[value] = s
    return s


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def process_label(proc: Process) -> str:
    """The ``process`` label: the systemd service it runs in, else its executable, else ``[comm]``."""
    unit = proc.systemd_unit
    if unit.endswith(".service"):
        return _clean(unit)
    if proc.exe:
        return _clean(proc.exe[:-10] if proc.exe.endswith(" (deleted)") else proc.exe)
    return _clean(f"[{proc.name or '?'}]")


def _dns_name(name: str) -> str:
    return _clean(name.strip().rstrip(".").lower())


# A unit: the samples that stand or fall together under the cap: (family, label values, value).
Sample = Tuple[str, Tuple[str, ...], float]
Unit = Tuple[Sample, ...]


# ----------------------------------------------------------------------------------- collector
class ProfileCollector:
    """Yields metric families from ``source.snapshot()`` and ``source.stats()`` at each scrape.

    ``max_series`` (settable at run time) caps the series of the profile-derived families listed in
    :data:`CAPPED_FAMILIES`; per-probe, daemon and summary families are always emitted.
    """

    def __init__(self, source: Any, max_series: int = DEFAULT_MAX_SERIES):
        self.source = source
        self.max_series = max_series
        self._lock = threading.Lock()
        self._dropped: Dict[str, int] = {name: 0 for name in CAPPED_FAMILIES}
        self._errors: Dict[str, int] = {name: 0 for name in SECTIONS}
        self._logged: set = set()

    @property
    def max_series(self) -> int:
        return self._max_series

    @max_series.setter
    def max_series(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(f"metrics max_series: {value!r} is not a whole number >= 0")
        self._max_series = value

    def describe(self) -> List[Any]:
        return []  # registering never runs a collection

    # -- isolation
    def _section(self, name: str, fn: Callable, *args) -> Any:
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - one section never fails the scrape
            with self._lock:
                self._errors[name] = self._errors.get(name, 0) + 1
                first = (name, type(err).__name__) not in self._logged
                self._logged.add((name, type(err).__name__))
            level = logging.WARNING if first else logging.DEBUG
            log.log(level, "metrics section failed section=%s error=%s: %s", name, type(err).__name__,
                    str(err).splitlines()[0][:200] if str(err) else "")
            return None

    # -- collect
    def collect(self) -> Iterator[Any]:
        """client_python families (the registry's and OpenMetrics' path)."""
        for fam in self.gather():
            yield fam.to_client()

    def render_text(self) -> bytes:
        """This scrape in text format 0.0.4, without building client_python objects (the fast path)."""
        return render_families(self.gather())

    def gather(self) -> List[Family]:
        """Every family of one scrape, computed section by section.

        The cyclic GC is paused meanwhile (as during a scan): the scrape allocates many small
        tuples next to a large profile, and collections would walk the profile again and again.
        """
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._gather()
        finally:
            if was_enabled:
                gc.enable()

    def _gather(self) -> List[Family]:
        started = time.monotonic()
        limit = self._max_series
        out: List[Family] = []
        out.append(_info("asbuilt_build_info", "The asbuilt version serving these metrics.",
                         ("version",), [((__version__,), 1)]))
        stats = self._section("daemon", self._stats)
        if stats:
            out.extend(self._section("daemon", _daemon_families, stats) or [])
        profile = self._section("snapshot", self._snapshot)
        tiers: List[Tuple[str, List[Unit]]] = []
        if profile is not None:
            out.extend(self._section("profile", _profile_families, profile) or [])
            out.extend(self._section("probes", _probe_families, profile) or [])
            prepared = self._section("processes", _prepare, profile)
            if prepared is not None:
                procs, labels = prepared
                for name, fn in (("listeners", _listener_units), ("dependencies", _dependency_units),
                                 ("processes", _process_units), ("files", _file_units), ("dns", _dns_units)):
                    tiers.append((name, self._section(name, fn, procs, labels) or []))
            tiers.append(("packages", self._section("packages", _package_units, profile) or []))
        emitted, dropped = _apply_cap(tiers, limit)
        out.extend(_capped_families(emitted))
        per_family = {name: 0 for name in CAPPED_FAMILIES}
        for family, _, _ in emitted:
            per_family[family] += 1
        with self._lock:
            for family, n in dropped.items():
                self._dropped[family] = self._dropped.get(family, 0) + n
            dropped_total = dict(self._dropped)
            errors = dict(self._errors)
        out.append(_gauge("asbuilt_metrics_series", "Series of the capped (profile-derived) families in this scrape.",
                          ("family",), [((f,), n) for f, n in per_family.items()]))
        out.append(_gauge("asbuilt_metrics_series_limit", "The cap on series of the capped families (max_series).",
                          (), [((), limit)]))
        out.append(_counter("asbuilt_metrics_series_dropped_total",
                            "Series the cap left out, summed over scrapes, by family.",
                            ("family",), [((f,), n) for f, n in dropped_total.items()]))
        out.append(_counter("asbuilt_metrics_collect_errors_total",
                            "Collection sections that failed (the scrape went on without them).",
                            ("section",), [((s,), n) for s, n in errors.items()]))
        out.append(_gauge("asbuilt_metrics_collect_duration_seconds",
                          "Time this collection took before rendering.", (), [((), time.monotonic() - started)]))
        return out

    def _stats(self) -> Optional[Dict[str, Any]]:
        fn = getattr(self.source, "stats", None)
        return fn() if fn is not None else None

    def _snapshot(self) -> Optional[Profile]:
        return self.source.snapshot()


# ----------------------------------------------------------------------------------- sections
def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return value


def _daemon_families(stats: Dict[str, Any]) -> List[Any]:
    out = []
    counters = (("scans_total", "asbuilt_daemon_scans_total", "Full scans the daemon ran."),
                ("snapshots_written_total", "asbuilt_daemon_snapshots_written_total", "Profile snapshots written."),
                ("events_total", "asbuilt_daemon_events_total", "Probe events folded into the rolling profile."),
                ("lost_events_total", "asbuilt_daemon_lost_events_total", "Probe events lost (buffers full)."),
                ("config_reloads_total", "asbuilt_daemon_config_reloads_total", "Configuration reloads (SIGHUP)."))
    for key, name, doc in counters:
        if key in stats:
            out.append(_counter(name, doc, (), [((), _num(stats[key]))]))
    gauges = (("scan_duration_seconds", "asbuilt_daemon_scan_duration_seconds", "Duration of the last full scan."),
              ("last_snapshot_timestamp_seconds", "asbuilt_daemon_last_snapshot_timestamp_seconds",
               "Unix time of the last snapshot written."),
              ("start_time_seconds", "asbuilt_daemon_start_time_seconds", "Unix time the daemon started."),
              ("processes_watched", "asbuilt_daemon_processes_watched", "Processes the daemon watches now."))
    for key, name, doc in gauges:
        if key in stats:
            out.append(_gauge(name, doc, (), [((), _num(stats[key]))]))
    errors = stats.get("snapshot_errors_total")
    if isinstance(errors, dict):
        rows: Dict[str, float] = {}
        for reason, n in sorted(errors.items(), key=lambda kv: str(kv[0])):
            label = _clean(reason) if len(rows) < _MAX_REASONS else "other"
            rows[label] = rows.get(label, 0) + _num(n)
        out.append(_counter("asbuilt_daemon_snapshot_errors_total", "Snapshot writes that failed, by reason.",
                            ("reason",), [((r,), n) for r, n in rows.items()]))
    return out


def _profile_families(profile: Profile) -> List[Any]:
    procs = profile.processes
    kernel = sum(1 for p in procs if p.kernel_thread)
    out = [
        _info("asbuilt_profile_info", "The profile being served.", ("mode", "tool_version"),
              [((_clean(profile.mode), _clean(profile.tool_version)), 1)]),
        _gauge("asbuilt_profile_generated_timestamp_seconds", "Unix time the profile was generated.", (),
               [((), profile.generated_at)]),
        _gauge("asbuilt_profile_processes", "Processes in the profile (kernel threads apart).", ("kind",),
               [(("process",), len(procs) - kernel), (("kernel_thread",), kernel)]),
    ]
    gaps: Dict[str, int] = {}
    for gap in profile.coverage.gaps:
        kind = _clean(gap.kind) if (gap.kind in gaps or len(gaps) < _MAX_REASONS) else "other"
        gaps[kind] = gaps.get(kind, 0) + 1
    out.append(_gauge("asbuilt_coverage_gaps", "What the profile could not see (recorded gaps), by kind.",
                      ("kind",), sorted(((k,), n) for k, n in gaps.items())))
    out.append(_gauge("asbuilt_coverage_gaps_dropped", "Gaps past the profile's cap: counted, not recorded.", (),
                      [((), profile.coverage.gaps_dropped)]))
    managers: Dict[str, List[int]] = {}
    for pkg in profile.packages:
        row = managers.setdefault(_clean(pkg.manager), [0, 0])
        row[0] += 1
        row[1] += 1 if pkg.used_by else 0
    out.append(_gauge("asbuilt_packages", "Packages the profile records, by package manager.", ("manager",),
                      sorted(((m,), r[0]) for m, r in managers.items())))
    out.append(_gauge("asbuilt_packages_in_use", "Packages providing files to a profiled process, by manager.",
                      ("manager",), sorted(((m,), r[1]) for m, r in managers.items())))
    return out


def _probe_families(profile: Profile) -> List[Any]:
    last: Dict[str, Any] = {}
    lost: Dict[str, float] = {}
    for run in profile.coverage.probes:
        name = _clean(run.name)
        if name not in last and len(last) >= 4 * _MAX_REASONS:
            continue
        last[name] = run
        lost[name] = lost.get(name, 0) + run.lost_events
    names = sorted(last)
    return [
        _gauge("asbuilt_probe_up", "Whether the probe's last run succeeded (1) or not (0), with the mode it ran in.",
               ("probe", "mode"), [((n, _clean(last[n].mode)), 1 if last[n].status == "ok" else 0) for n in names]),
        _gauge("asbuilt_probe_status", "The probe's last status (ok, skipped, unavailable, error).",
               ("probe", "status"), [((n, _clean(last[n].status or "unknown")), 1) for n in names]),
        _gauge("asbuilt_probe_duration_seconds", "Duration of the probe's last run.", ("probe",),
               [((n,), last[n].duration_seconds) for n in names]),
        _gauge("asbuilt_probe_items", "Items the probe's last run produced.", ("probe",),
               [((n,), last[n].items) for n in names]),
        _counter("asbuilt_probe_lost_events_total", "Events the probe lost.", ("probe",),
                 [((n,), lost[n]) for n in names]),
    ]


def _prepare(profile: Profile) -> Tuple[List[Process], List[str]]:
    """The processes the per-process sections read (kernel threads apart) and their ``process`` labels."""
    procs = [p for p in profile.processes if not p.kernel_thread]
    return procs, [process_label(p) for p in procs]


def _listener_units(procs: List[Process], labels: List[str]) -> List[Unit]:
    seen = {}
    for proc, plabel in zip(procs, labels):
        for s in proc.sockets:
            if s.proto == "tcp":
                if s.state != "LISTEN":
                    continue
            elif s.proto == "udp":
                if s.remote_port or not s.local_port or _EPHEMERAL_LOW <= s.local_port <= _EPHEMERAL_HIGH:
                    continue
            else:
                continue
            key = (plabel, s.proto, _clean(s.local_address), str(s.local_port))
            seen[key] = None
    rows = sorted(seen, key=lambda k: (k[1], int(k[3]), k[2], k[0]))
    return [(("asbuilt_listener_info", k, 1),) for k in rows]


def _dependency_units(procs: List[Process], labels: List[str]) -> List[Unit]:
    agg: Dict[tuple, list] = {}
    for proc, plabel in zip(procs, labels):
        for p in proc.peers:
            if p.proto not in ("tcp", "udp"):
                continue  # unix peers are paths
            inbound = p.direction == "inbound"
            peer = _dns_name(p.names[0]) if p.names else _clean(p.address)
            port = p.local_port if inbound else p.port
            key = (plabel, peer, str(port), p.proto, _clean(p.protocol), _clean(p.direction or "unknown"))
            row = agg.get(key)
            if row is None:
                row = agg[key] = [0, 0, 0, False]
            row[0] += p.connections
            if p.bytes_sent is not None or p.bytes_received is not None:
                row[1] += p.bytes_sent or 0
                row[2] += p.bytes_received or 0
                row[3] = True
    ordered = sorted(agg.items(), key=lambda kv: (-(kv[1][1] + kv[1][2]), -kv[1][0], kv[0]))
    units: List[Unit] = []
    for key, (conns, sent, received, has_bytes) in ordered:
        if has_bytes:
            units.append((("asbuilt_dependency_connections_total", key, conns),
                          ("asbuilt_dependency_bytes_total", key + ("sent",), sent),
                          ("asbuilt_dependency_bytes_total", key + ("received",), received)))
        else:
            units.append((("asbuilt_dependency_connections_total", key, conns),))
    return units


def _process_units(procs: List[Process], labels: List[str]) -> List[Unit]:
    by_unit: Dict[str, int] = {}
    info = {}
    for proc, plabel in zip(procs, labels):
        unit = _clean(proc.systemd_unit)
        by_unit[unit] = by_unit.get(unit, 0) + 1
        ident = _short_hash(proc.identity or f"{proc.exe}\0{proc.name}")
        key = (ident, plabel, _clean(proc.exe), unit, _clean(proc.container_id[:12]), _clean(proc.user))
        info[key] = None
    units: List[Unit] = [(("asbuilt_processes", (u,), n),)
                         for u, n in sorted(by_unit.items(), key=lambda kv: (-kv[1], kv[0]))]
    units.extend((("asbuilt_process_info", k, 1),) for k in sorted(info, key=lambda k: (k[1], k[0])))
    return units


def _file_units(procs: List[Process], labels: List[str]) -> List[Unit]:
    paths: Dict[Tuple[str, str], set] = {}
    for proc, plabel in zip(procs, labels):
        for group in (proc.files, proc.libraries, proc.mapped_files):
            for f in group:
                kind = f.kind if f.kind in _FILE_CLASSES else "other"
                bucket = paths.get((plabel, kind))
                if bucket is None:
                    bucket = paths[(plabel, kind)] = set()
                bucket.add(f.path)
    return [(("asbuilt_process_files", key, len(paths[key])),) for key in sorted(paths)]


def _dns_units(procs: List[Process], labels: List[str]) -> List[Unit]:
    counts: Dict[Tuple[str, str], int] = {}
    for proc, plabel in zip(procs, labels):
        for d in proc.dns:
            if not d.name:
                continue
            key = (plabel, _dns_name(d.name))
            counts[key] = counts.get(key, 0) + max(d.count, 1)
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [(("asbuilt_dns_resolutions_total", k, n),) for k, n in ordered]


def _package_units(profile: Profile) -> List[Unit]:
    rows = {(_clean(p.name), _clean(p.version), _clean(p.manager), _clean(p.origin)): None
            for p in profile.packages if p.used_by}
    return [(("asbuilt_package_info", k, 1),) for k in sorted(rows)]


def _apply_cap(tiers: List[Tuple[str, List[Unit]]], limit: int) -> Tuple[List[Sample], Dict[str, int]]:
    """Give out at most ``limit`` series, tier by tier and unit by unit; count what does not fit."""
    emitted: List[Sample] = []
    dropped: Dict[str, int] = {}
    room = limit
    for _, units in tiers:
        for unit in units:
            if len(unit) <= room:
                emitted.extend(unit)
                room -= len(unit)
            else:
                for family, _, _ in unit:
                    dropped[family] = dropped.get(family, 0) + 1
    return emitted, dropped


def _capped_families(samples: List[Sample]) -> List[Family]:
    grouped: Dict[str, List[Tuple[Tuple[str, ...], float]]] = {name: [] for name in CAPPED_FAMILIES}
    for family, labels, value in samples:
        grouped[family].append((labels, value))
    return [Family(name, _FAMILIES[name][0], _FAMILIES[name][1], _FAMILIES[name][2], grouped[name])
            for name in CAPPED_FAMILIES]


# ----------------------------------------------------------------------------------- families
class Family:
    """One metric family as computed: rendered to client_python objects or straight to text."""

    __slots__ = ("name", "kind", "doc", "labelnames", "rows")

    def __init__(self, name: str, kind: str, doc: str, labelnames: Iterable[str],
                 rows: Iterable[Tuple[Tuple[str, ...], float]]):
        self.name, self.kind, self.doc = name, kind, doc  # name as exposed (with _total / _info)
        self.labelnames = tuple(labelnames)
        self.rows = rows if isinstance(rows, list) else list(rows)

    def to_client(self) -> Any:
        names = list(self.labelnames)
        if self.kind == "counter":
            fam = CounterMetricFamily(self.name, self.doc, labels=names)  # strips _total; samples get it back
        elif self.kind == "info":
            fam = InfoMetricFamily(self.name[:-5], self.doc, labels=names)
            for values, _ in self.rows:
                fam.add_metric(list(values), {})
            return fam
        else:
            fam = GaugeMetricFamily(self.name, self.doc, labels=names)
        for values, value in self.rows:
            fam.add_metric(list(values), value)
        return fam


def _gauge(name: str, doc: str, labels: Iterable[str], rows: Iterable[Tuple[Tuple[str, ...], float]]) -> Family:
    return Family(name, "gauge", doc, labels, rows)


def _counter(name: str, doc: str, labels: Iterable[str], rows: Iterable[Tuple[Tuple[str, ...], float]]) -> Family:
    return Family(name, "counter", doc, labels, rows)


def _info(name: str, doc: str, labels: Iterable[str], rows: Iterable[Tuple[Tuple[str, ...], float]]) -> Family:
    return Family(name, "info", doc, labels, rows)


_escaped: Dict[str, str] = {}


def _value_text(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_families(families: Iterable[Family]) -> bytes:
    """Text exposition format 0.0.4, as client_python's generate_latest writes it, ~10x faster."""
    out: List[str] = []
    append = out.append
    esc = _escaped
    for fam in families:
        doc = fam.doc.replace("\\", "\\\\").replace("\n", "\\n")
        append(f"# HELP {fam.name} {doc}\n# TYPE {fam.name} {'gauge' if fam.kind == 'info' else fam.kind}\n")
        if fam.labelnames:
            fmt = fam.name + "{" + ",".join(f'{n}="%s"' for n in fam.labelnames) + "} %s\n"
        else:
            fmt = fam.name + " %s\n"
        for values, value in fam.rows:
            args = []
            for v in values:
                e = esc.get(v)
                if e is None:
                    e = v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
                    if len(esc) >= _CACHE_MAX:
                        esc.clear()
                    esc[v] = e
                args.append(e)
            args.append(_value_text(value))
            append(fmt % tuple(args))
    return "".join(out).encode("utf-8")


# ----------------------------------------------------------------------------------- server
class StaticSource:
    """A source over a fixed profile (and optional stats): for ``export`` and tests."""

    def __init__(self, profile: Optional[Profile], stats: Optional[Dict[str, Any]] = None):
        self.profile = profile
        self._stats = stats

    def snapshot(self) -> Optional[Profile]:
        return self.profile

    def stats(self) -> Optional[Dict[str, Any]]:
        return self._stats


def render_text(profile: Profile, max_series: int = DEFAULT_MAX_SERIES) -> bytes:
    """The exposition text of a saved profile (e.g. for node_exporter's textfile collector)."""
    return ProfileCollector(StaticSource(profile), max_series=max_series).render_text()


_INDEX = (b"<!doctype html><html><head><title>asbuilt</title></head><body><h1>asbuilt</h1>"
          b"<p>Prometheus metrics of this host's as-built profile: <a href=\"/metrics\">/metrics</a></p>"
          b"</body></html>\n")


class _Handler(BaseHTTPRequestHandler):
    server_version = "asbuilt"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection: a scraper never holds a thread idle
    timeout = 10.0  # seconds a client may stall on any read or write

    def log_message(self, fmt: str, *args: Any) -> None:  # the daemon never prints
        log.debug("metrics http client=%s %s", self.client_address[0] if self.client_address else "?", fmt % args)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        srv: MetricsServer = self.server.owner  # type: ignore[attr-defined]
        if not srv.authorized(self.headers.get("Authorization", "")):
            self._reply(401, b"401 unauthorized\n", "text/plain; charset=utf-8", head,
                        [("WWW-Authenticate", 'Basic realm="asbuilt", charset="UTF-8"')])
            return
        path = urlsplit(self.path).path
        if path == "/metrics":
            try:
                body, ctype = srv.render(self.headers.get("Accept", ""))
            except Exception as err:  # noqa: BLE001 - a broken scrape answers 500, never kills the server
                log.warning("metrics scrape failed error=%s: %s", type(err).__name__, err)
                self._reply(500, b"500 metrics collection failed\n", "text/plain; charset=utf-8", head)
                return
            extra = []
            if "gzip" in self.headers.get("Accept-Encoding", "").lower():
                body = gzip.compress(body, compresslevel=5)
                extra.append(("Content-Encoding", "gzip"))
            self._reply(200, body, ctype, head, extra)
        elif path in ("/", ""):
            self._reply(200, _INDEX, "text/html; charset=utf-8", head)
        else:
            self._reply(404, b"404 not found: metrics are at /metrics\n", "text/plain; charset=utf-8", head)

    def _reply(self, code: int, body: bytes, ctype: str, head: bool,
               extra: Iterable[Tuple[str, str]] = ()) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: Tuple[str, int], family: int, owner: "MetricsServer"):
        self.address_family = family
        self.owner = owner
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] in ("::", "::0"):
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # [::] also takes IPv4
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: no reverse DNS lookup of the host
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.owner._slots.acquire(blocking=False):
            log.debug("metrics http too many connections client=%s", client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.owner._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            ctx = self.owner._tls
            if ctx is not None:
                request.settimeout(_Handler.timeout)
                try:
                    request = ctx.wrap_socket(request, server_side=True)  # the handshake, in this thread
                except (OSError, ssl.SSLError) as err:
                    log.debug("metrics tls handshake failed client=%s error=%s", client_address[0], err)
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            self.owner._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics http connection error client=%s", client_address[0] if client_address else "?")


class MetricsServer:
    """Serves ``collector`` over HTTP(S) at ``listen`` from a daemon thread, until :meth:`close`.

    Raises UsageError (one line) for a bad address, a port it cannot bind, unreadable TLS files or a
    malformed password hash.
    """

    max_connections = 32

    def __init__(self, listen: str, collector: Any, tls_cert: str = "", tls_key: str = "",
                 basic_auth_user: str = "", basic_auth_password_hash: str = ""):
        host, port = parse_listen(listen)
        self.listen = listen
        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._tls = _tls_context(tls_cert, tls_key) if (tls_cert or tls_key) else None
        if bool(basic_auth_user) != bool(basic_auth_password_hash):
            raise UsageError("metrics basic_auth_user and basic_auth_password_hash go together")
        self._user = basic_auth_user
        self._hash = basic_auth_password_hash
        if self._hash:
            _parse_hash(self._hash)
        self._auth_key = secrets.token_bytes(32)
        self._auth_ok: Dict[bytes, None] = {}  # HMACs of Authorization headers already verified
        self._auth_lock = threading.Lock()  # one PBKDF2 at a time: a flood of bad passwords uses one core
        family, address = _resolve(host, port, listen)
        try:
            self._server = _Server(address, family, self)
        except OSError as err:
            raise _bind_error(err, listen) from err
        self.port: int = self._server.server_address[1]
        self.host = host
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="asbuilt-metrics", daemon=True)
        self._thread.start()
        log.info("metrics serving listen=%s port=%d tls=%s auth=%s", listen, self.port, self._tls is not None,
                 bool(self._user))

    def render(self, accept: str) -> Tuple[bytes, str]:
        """(body, content type) for a scrape: OpenMetrics when asked for, else text 0.0.4."""
        encoder, ctype = choose_encoder(accept)
        if ctype.startswith("application/openmetrics-text"):
            return encoder(self.registry), ctype
        if isinstance(self.collector, ProfileCollector):
            return self.collector.render_text(), CONTENT_TYPE_TEXT  # the registry holds only it
        from prometheus_client.exposition import generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_TEXT

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self._tls else 'http'}://{host}:{self.port}/metrics"

    def authorized(self, header: str) -> bool:
        if not self._user:
            return True
        if not header[:6].lower() == "basic ":
            return False
        mac = hmac.new(self._auth_key, header.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        if mac in self._auth_ok:
            return True
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            return False
        with self._auth_lock:
            good = verify_password(password, self._hash)  # even for a wrong user: no timing tells
            good = hmac.compare_digest(user.encode("utf-8"), self._user.encode("utf-8")) and good
            if good:
                if len(self._auth_ok) >= 16:
                    self._auth_ok.clear()
                self._auth_ok[mac] = None
        return good

    def close(self) -> None:
        """Stop serving (within the poll interval) and release the port; in-flight requests are abandoned."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=1.0)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _tls_context(cert: str, key: str) -> ssl.SSLContext:
    if not cert or not key:
        raise UsageError("metrics tls_cert and tls_key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as err:
        raise UsageError(f"metrics TLS: {err.filename or cert}: no such file") from err
    except PermissionError as err:
        raise UsageError(f"metrics TLS: {err.filename or cert}: permission denied") from err
    except (ssl.SSLError, OSError) as err:
        raise UsageError(f"metrics TLS: cannot load certificate {cert} with key {key}: "
                         f"{getattr(err, 'reason', None) or err.strerror or err}") from err
    return ctx


def _resolve(host: str, port: int, listen: str) -> Tuple[int, Tuple[Any, ...]]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UsageError(f"metrics listen {listen}: cannot resolve {host}: {err.strerror}") from err
    infos.sort(key=lambda i: i[0] != socket.AF_INET)  # prefer IPv4 for names that have both
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _bind_error(err: OSError, listen: str) -> AsbuiltError:
    reason = {errno.EADDRINUSE: "address already in use", errno.EACCES: "permission denied",
              errno.EADDRNOTAVAIL: "no such address on this host"}.get(err.errno or 0, err.strerror or str(err))
    return UsageError(f"cannot serve metrics on {listen}: {reason}")
