"""The Prometheus exporter: real profiles scraped over HTTP(S), checked by promtool and by a real Prometheus.

Profiles: the session's real scan and trace (``real_profiles``), a synthetic 1,000-process host, and
hand-built ones for edge cases (secrets in the command line and environment, broken data, odd label
values). Every scrape goes over a real socket to a real :class:`MetricsServer`; its text is parsed
with client_python's parser and checked with ``promtool check metrics``.
"""
from __future__ import annotations

import base64
import gzip
import json
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families

from asbuilt.agent import __version__
from asbuilt.agent.errors import UsageError
from asbuilt.agent.model import (Coverage, DnsName, Exec, FileRef, Gap, Package, Peer, Process, ProbeRun,
                                 Profile, Socket)
from asbuilt.agent.store import load_profile
from asbuilt.exporters.prometheus import (CAPPED_FAMILIES, DEFAULT_PORT, MAX_LABEL_LENGTH, MetricsServer,
                                          ProfileCollector, StaticSource, hash_password, parse_listen,
                                          verify_password)

PROMTOOL = "/usr/bin/promtool"
PROMETHEUS = "/usr/bin/prometheus"


# ------------------------------------------------------------------------------ helpers
class Source:
    """What the daemon hands the collector: snapshot() and stats()."""

    def __init__(self, profile: Optional[Profile], stats: Optional[dict] = None):
        self.profile = profile
        self._stats = stats if stats is not None else {}

    def snapshot(self):
        return self.profile

    def stats(self):
        return self._stats


@contextmanager
def serving(collector, **kw):
    server = MetricsServer("127.0.0.1:0", collector, **kw)
    try:
        yield server
    finally:
        server.close()


def scrape(server, path="/metrics", headers=None, context=None, method="GET", timeout=10):
    """(status, headers, body bytes) of one request, 4xx/5xx included."""
    scheme = "https" if context is not None else "http"
    req = urllib.request.Request(f"{scheme}://127.0.0.1:{server.port}{path}", headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def promtool(text: bytes) -> None:
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()[:3000]


def samples(text: bytes) -> List[Tuple[str, Dict[str, str], float]]:
    return [(s.name, s.labels, s.value)
            for fam in text_string_to_metric_families(text.decode("utf-8")) for s in fam.samples]


def named(rows, metric, **labels):
    return [(l, v) for n, l, v in rows if n == metric and all(l.get(k) == str(w) for k, w in labels.items())]


def capped_count(rows) -> int:
    return sum(1 for n, _, _ in rows if n in CAPPED_FAMILIES)


def synthetic(n_procs=1000, peers=10, files=30, listeners=2) -> Profile:
    """A busy host: n_procs services, each with listeners, outbound and inbound peers, files and names."""
    procs = []
    for i in range(n_procs):
        unit = f"svc{i % 97}.service" if i % 3 else ""
        exe = f"/opt/app{i}/bin/server"
        socks = [Socket(proto="tcp", family="inet", state="LISTEN", local_address="0.0.0.0",
                        local_port=10000 + i * 2 + k) for k in range(listeners - 1)]
        socks.append(Socket(proto="udp", family="inet", state="UNCONN", local_address="0.0.0.0", local_port=20000 + i))
        socks.append(Socket(proto="udp", family="inet", state="UNCONN", local_address="0.0.0.0", local_port=45000 + i))
        prs = []
        for k in range(peers):
            if k % 4 == 3:
                prs.append(Peer(address=f"10.1.{i % 250}.{k}", port=0, proto="tcp", family="inet", direction="inbound",
                                local_port=10000 + i * 2, protocol="http", connections=5 + k,
                                bytes_sent=1000 * k, bytes_received=100 * k, learned="capture"))
            else:
                prs.append(Peer(address=f"10.2.{k}.{i % 250}", port=5432 if k % 2 else 443, proto="tcp", family="inet",
                                direction="outbound", names=[f"db{k}-{i}.example.internal"] if k % 2 else [],
                                protocol="postgresql" if k % 2 else "tls", connections=k + 1,
                                bytes_sent=(i * 31 + k) * 10, bytes_received=(i * 17 + k) * 20))
        fls = [FileRef(path=f"/opt/app{i}/data/f{k}", kind=("config", "log", "data", "library", "other")[k % 5],
                       mode="r") for k in range(files)]
        dns = [DnsName(name=f"db{k}-{i}.example.internal", addresses=[f"10.2.{k}.{i % 250}"], count=k + 1)
               for k in range(1, peers, 2)]
        procs.append(Process(pid=1000 + i, ppid=1, identity=f"{unit or '-'}:{exe}:{i:08x}", name=f"server{i}", exe=exe,
                             cmdline=[exe, "--port", str(10000 + i * 2)], user="app", uid=1000, systemd_unit=unit,
                             sockets=socks, peers=prs, files=fls, dns=dns))
    procs.append(Process(pid=2, name="kthreadd", kernel_thread=True, identity="-:[kthreadd]:00000000"))
    packages = [Package(name=f"pkg{i}", version="1.0-1", manager="dpkg", origin="Debian:bookworm/main",
                        used_by=[procs[i].identity] if i < n_procs else []) for i in range(n_procs + 200)]
    coverage = Coverage(probes=[ProbeRun(name="processes", status="ok", duration_seconds=0.5, items=n_procs),
                                ProbeRun(name="net", status="ok", mode="ebpf", lost_events=7),
                                ProbeRun(name="kfunc", status="unavailable", reason="no kprobes")],
                        gaps=[Gap(kind="vanished", subject="pid 9"), Gap(kind="denied", subject="/root/x")],
                        gaps_dropped=3)
    return Profile(mode="run", generated_at=time.time(), processes=procs, packages=packages, coverage=coverage)


@pytest.fixture(scope="module")
def big():
    return synthetic()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return str(cert), str(key)


# ------------------------------------------------------------------------------ real profiles
def test_trace_profile_scraped_has_the_server(real_profiles):
    profile = load_profile(real_profiles["trace"])
    port = real_profiles["port"]
    with serving(ProfileCollector(Source(profile), max_series=2000)) as server:
        status, headers, body = scrape(server)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    promtool(body)
    rows = samples(body)
    (listener,) = named(rows, "asbuilt_listener_info", port=port, proto="tcp")
    proc = listener[0]["process"]
    assert proc.endswith(("python3", "python3.11")) or proc.endswith(".service")
    inbound = named(rows, "asbuilt_dependency_connections_total", direction="inbound", port=port, process=proc)
    assert inbound and sum(v for _, v in inbound) >= 1, inbound
    assert any(l["protocol"] == "http" for l, _ in inbound), inbound
    assert all(l["peer"] == "127.0.0.1" for l, _ in inbound)
    # our process is described, its files counted by class (app.log written), its packages listed
    server_proc = [p for p in profile.processes if p.pid == real_profiles["server_pid"]][0]
    assert named(rows, "asbuilt_process_info", process=proc, user=server_proc.user)
    files = {l["class"]: v for l, v in named(rows, "asbuilt_process_files", process=proc)}
    assert files.get("log", 0) >= 1 and files.get("library", 0) >= 1, files
    assert real_profiles["workdir"] not in body.decode()  # counts, never paths
    pkgs = {l["name"] for l, _ in named(rows, "asbuilt_package_info")}
    assert pkgs == {p.name for p in profile.packages if p.used_by}
    probes = {r.name: r for r in profile.coverage.probes}
    up = {l["probe"]: v for l, v in named(rows, "asbuilt_probe_up")}
    assert up == {name: (1.0 if r.status == "ok" else 0.0) for name, r in probes.items()}
    assert named(rows, "asbuilt_build_info", version=__version__) == [({"version": __version__}, 1.0)]
    assert all(v == 0 for _, v in named(rows, "asbuilt_metrics_collect_errors_total"))


def test_scan_profile_scraped_and_valid(real_profiles):
    profile = load_profile(real_profiles["scan"])
    with serving(ProfileCollector(Source(profile), max_series=100_000)) as server:
        status, _, body = scrape(server)
    assert status == 200
    promtool(body)
    rows = samples(body)
    port = real_profiles["port"]
    assert named(rows, "asbuilt_listener_info", port=port, proto="tcp")  # the app listened during the scan
    want = sum(1 for p in profile.processes if not p.kernel_thread)
    assert sum(v for _, v in named(rows, "asbuilt_processes")) == want
    assert len(named(rows, "asbuilt_process_info")) <= want
    assert all(v == 0 for _, v in named(rows, "asbuilt_metrics_collect_errors_total"))
    assert all(v == 0 for _, v in named(rows, "asbuilt_metrics_series_dropped_total"))
    for _, labels, _ in rows:  # no cmdline, no file path but an exe
        for key, value in labels.items():
            assert len(value) <= MAX_LABEL_LENGTH
            if value.startswith("/") and key not in ("exe", "process"):
                pytest.fail(f"path in label {key}={value}")


# ------------------------------------------------------------------------------ scale and cap
def test_thousand_process_scrape_is_fast_and_valid(big):
    collector = ProfileCollector(Source(big, {"scans_total": 3}), max_series=100_000)  # nothing capped: worst case
    with serving(collector) as server:
        scrape(server)  # warm the label cache as a running daemon would have
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            status, _, body = scrape(server)
            times.append(time.perf_counter() - t0)
            assert status == 200
        t0 = time.perf_counter()
        status, headers, zipped = scrape(server, headers={"Accept-Encoding": "gzip"})
        gz_time = time.perf_counter() - t0
    assert max(times) < 1.0 and gz_time < 1.0, (times, gz_time)
    assert headers["Content-Encoding"] == "gzip" and len(zipped) < len(body) / 4
    assert gzip.decompress(zipped).count(b"\n") == body.count(b"\n")
    promtool(body)
    rows = samples(body)
    assert len(named(rows, "asbuilt_listener_info")) == 2000  # 1 tcp + 1 udp service port each; ephemeral udp not
    assert not named(rows, "asbuilt_listener_info", port=45000)
    # 6 outbound peers + 1 inbound key per process (inbound aggregated by client address and our port)
    conns = named(rows, "asbuilt_dependency_connections_total")
    assert len(conns) == 1000 * 10 and len(named(rows, "asbuilt_dependency_bytes_total")) == 1000 * 20
    inbound = named(rows, "asbuilt_dependency_connections_total", direction="inbound", port=10000)
    assert {l["peer"] for l, _ in inbound} == {"10.1.0.3", "10.1.0.7"} and inbound[0][0]["protocol"] == "http"
    assert named(rows, "asbuilt_dependency_bytes_total", peer="db1-0.example.internal", flow="received", port=5432)
    by_label = {(p.systemd_unit or p.exe, f.kind) for p in big.processes for f in p.files}  # unit shared
    assert len(named(rows, "asbuilt_process_files")) == len(by_label)
    assert sum(v for _, v in named(rows, "asbuilt_process_files")) == 1000 * 30
    assert len(named(rows, "asbuilt_package_info")) == 1000
    assert named(rows, "asbuilt_packages", manager="dpkg")[0][1] == 1200
    assert len(named(rows, "asbuilt_dns_resolutions_total")) == 1000 * 5
    assert all(v == 0 for _, v in named(rows, "asbuilt_metrics_series_dropped_total"))


def test_cap_keeps_the_priority_and_counts_what_it_drops(big):
    collector = ProfileCollector(Source(big), max_series=50)
    with serving(collector) as server:
        rows1 = samples(scrape(server)[2])
        rows2 = samples(scrape(server)[2])
        collector.max_series = 2500  # SIGHUP at run time
        rows3 = samples(scrape(server)[2])
    assert capped_count(rows1) <= 50 and capped_count(rows2) <= 50
    assert sum(v for _, v in named(rows1, "asbuilt_metrics_series")) == capped_count(rows1) == 50
    assert len(named(rows1, "asbuilt_listener_info")) == 50  # listeners come first
    assert named(rows1, "asbuilt_metrics_series_limit")[0][1] == 50
    total1 = sum(v for _, v in named(rows1, "asbuilt_metrics_series_dropped_total"))
    total2 = sum(v for _, v in named(rows2, "asbuilt_metrics_series_dropped_total"))
    assert total1 > 0 and total2 == 2 * total1  # cumulative across scrapes
    # per-probe and daemon families are never capped
    assert len(named(rows1, "asbuilt_probe_up")) == 3 and named(rows1, "asbuilt_build_info")
    # 2000 listeners, then the biggest dependencies (3 series each) while they fit
    assert capped_count(rows3) <= 2500 and len(named(rows3, "asbuilt_listener_info")) == 2000
    totals: Dict[tuple, float] = {}
    for labels, value in named(rows3, "asbuilt_dependency_bytes_total"):
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "flow"))
        totals[key] = totals.get(key, 0) + value
    assert len(totals) == 500 // 3 == len(named(rows3, "asbuilt_dependency_connections_total"))
    everything = sorted((p.bytes_sent + p.bytes_received for pr in big.processes for p in pr.peers), reverse=True)
    assert sorted(totals.values(), reverse=True) == everything[:len(totals)]  # the biggest ones
    with pytest.raises(UsageError):
        collector.max_series = -1


def test_cap_order_is_by_bytes_then_connections():
    procs = [Process(pid=1, identity="a", exe="/usr/bin/a",
                     peers=[Peer(address=f"192.0.2.{k}", port=80, proto="tcp", direction="outbound",
                                 connections=k, bytes_sent=k * 100, bytes_received=0) for k in range(1, 6)]
                     + [Peer(address="192.0.2.99", port=81, proto="tcp", direction="outbound", connections=50)])]
    collector = ProfileCollector(Source(Profile(processes=procs)), max_series=7)
    rows = samples(_render(collector))
    kept = {l["peer"] for l, _ in named(rows, "asbuilt_dependency_connections_total")}
    # 3 series each while they fit; a one-series dependency (no byte counts) still fits the last slot
    assert kept == {"192.0.2.5", "192.0.2.4", "192.0.2.99"}
    assert named(rows, "asbuilt_metrics_series_dropped_total", family="asbuilt_dependency_bytes_total")[0][1] == 6
    collector.max_series = 16
    rows = samples(_render(collector))
    kept = {l["peer"] for l, _ in named(rows, "asbuilt_dependency_connections_total")}
    assert kept == {"192.0.2.5", "192.0.2.4", "192.0.2.3", "192.0.2.2", "192.0.2.1", "192.0.2.99"}


def _render(collector) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return generate_latest(reg)


# ------------------------------------------------------------------------------ secrets and labels
def test_no_secret_reaches_a_scrape():
    secret = "hunter2"
    proc = Process(pid=10, identity=f"app.service:/usr/bin/app:{secret}", name="app", exe="/usr/bin/app",
                   cmdline=["/usr/bin/app", "--password", secret, f"--token={secret}"], user="app",
                   systemd_unit="app.service", env_names=["DB_PASSWORD", "PATH"],
                   env={"DB_PASSWORD": secret, "PATH": "/usr/bin"}, cwd=f"/srv/{secret}",
                   files=[FileRef(path=f"/etc/app/{secret}.conf", kind="config", mode="r")],
                   failed_opens=[FileRef(path=f"/etc/{secret}", kind="config", error="ENOENT")],
                   sockets=[Socket(proto="tcp", state="LISTEN", local_address="0.0.0.0", local_port=8443),
                            Socket(proto="unix", state="LISTEN", path=f"/run/{secret}.sock")],
                   peers=[Peer(address="198.51.100.7", port=443, proto="tcp", direction="outbound", protocol="http",
                               details={"authorization": f"Bearer {secret}", "path": f"/login?pw={secret}"},
                               connections=2, bytes_sent=10, bytes_received=20),
                          Peer(address=f"/run/{secret}.sock", proto="unix", direction="outbound", connections=1)],
                   execs=[Exec(pid=11, path="/bin/sh", argv=["sh", "-c", f"echo {secret}"])])
    profile = Profile(processes=[proc], coverage=Coverage(
        probes=[ProbeRun(name="capture", status="error", reason=f"failed with {secret}")],
        gaps=[Gap(kind="denied", subject=f"/root/{secret}", detail=secret)]))
    with serving(ProfileCollector(Source(profile))) as server:
        bodies = [scrape(server)[2], gzip.decompress(scrape(server, headers={"Accept-Encoding": "gzip"})[2]),
                  scrape(server, headers={"Accept": "application/openmetrics-text; version=1.0.0"})[2]]
    for body in bodies:
        assert secret.encode() not in body
        assert b"/etc/app" not in body and b"/run/" not in body and b"/srv/" not in body
        assert b"/usr/bin/app" in body  # the executable is fine
    promtool(bodies[0])
    rows = samples(bodies[0])
    (info,) = named(rows, "asbuilt_process_info")
    assert info[0]["process"] == "app.service" and len(info[0]["identity"]) == 12
    assert named(rows, "asbuilt_process_files", process="app.service", **{"class": "config"})[0][1] == 1
    assert named(rows, "asbuilt_probe_up", probe="capture")[0][1] == 0


def test_label_values_are_sanitised():
    long_a = "/opt/" + "a" * 400 + "/x"
    long_b = "/opt/" + "a" * 400 + "/y"
    bad = "/opt/caf\udce9/bin\nserver"  # a non-UTF-8 byte kept as surrogateescape, and a newline
    procs = [Process(pid=i + 1, identity=f"id{i}", exe=exe, user="u\"q\\",
                     sockets=[Socket(proto="tcp", state="LISTEN", local_address="::", local_port=80 + i)])
             for i, exe in enumerate((long_a, long_b, bad))]
    procs.append(Process(pid=9, identity="dup", exe="/usr/sbin/dup", dns=[DnsName(name="Example.COM.", count=2),
                                                                            DnsName(name="example.com", count=0)]))
    body = _render(ProfileCollector(Source(Profile(processes=procs))))
    body.decode("utf-8")  # strict
    promtool(body)
    rows = samples(body)
    exes = [l["exe"] for l, _ in named(rows, "asbuilt_process_info")]
    assert len(set(exes)) == 4 and all(len(e) <= MAX_LABEL_LENGTH for e in exes)
    assert "/opt/caf\ufffd/bin?server" in exes
    assert named(rows, "asbuilt_dns_resolutions_total", name="example.com")[0][1] == 3  # one name, counts added
    assert named(rows, "asbuilt_process_info", exe="/usr/sbin/dup")[0][0]["user"] == ""


# ------------------------------------------------------------------------------ isolation
class Broken:
    def __getattr__(self, name):
        raise RuntimeError("broken peer")


def test_a_failing_section_is_isolated(caplog):
    good = Process(pid=1, identity="ok", exe="/usr/bin/ok",
                   sockets=[Socket(proto="tcp", state="LISTEN", local_address="0.0.0.0", local_port=7000)],
                   peers=[Broken()])  # the dependencies section will raise
    profile = Profile(processes=[good], coverage=Coverage(probes=[ProbeRun(name="net", status="ok")]))

    class FlakyStats(Source):
        def stats(self):
            raise OSError("stats went away")

    collector = ProfileCollector(FlakyStats(profile))
    with serving(collector) as server:
        with caplog.at_level("DEBUG", logger="asbuilt.exporters.prometheus"):
            status, _, body = scrape(server)
            status2, _, body2 = scrape(server)
    assert status == status2 == 200
    promtool(body2)
    rows = samples(body2)
    assert named(rows, "asbuilt_metrics_collect_errors_total", section="dependencies")[0][1] == 2
    assert named(rows, "asbuilt_metrics_collect_errors_total", section="daemon")[0][1] == 2
    assert named(rows, "asbuilt_listener_info", port=7000)  # the other sections still there
    assert named(rows, "asbuilt_probe_up", probe="net") and not named(rows, "asbuilt_dependency_connections_total")
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("\n" not in r.getMessage() for r in warnings)  # one line each, once
    assert any("section=dependencies" in r.getMessage() for r in warnings)

    class NoProfile(Source):
        def snapshot(self):
            raise ValueError("no profile yet")

    rows = samples(_render(ProfileCollector(NoProfile(None))))
    assert named(rows, "asbuilt_metrics_collect_errors_total", section="snapshot")[0][1] == 1
    assert named(rows, "asbuilt_build_info")
    rows = samples(_render(ProfileCollector(Source(None))))  # the daemon's first scan not done: not an error
    assert all(v == 0 for _, v in named(rows, "asbuilt_metrics_collect_errors_total"))


def test_daemon_stats_become_counters_and_gauges():
    stats = {"scans_total": 12, "scan_duration_seconds": 1.25, "snapshots_written_total": 4,
             "snapshot_errors_total": {"ENOSPC": 3, "EROFS": 1}, "last_snapshot_timestamp_seconds": 1.7e9,
             "events_total": 123456, "lost_events_total": 7, "start_time_seconds": 1.69e9,
             "config_reloads_total": 2, "processes_watched": 321}
    body = _render(ProfileCollector(Source(Profile(), stats)))
    promtool(body)
    text = body.decode()
    for line in ("# TYPE asbuilt_daemon_scans_total counter", "asbuilt_daemon_scans_total 12.0",
                 "asbuilt_daemon_scan_duration_seconds 1.25", "asbuilt_daemon_snapshots_written_total 4.0",
                 'asbuilt_daemon_snapshot_errors_total{reason="ENOSPC"} 3.0',
                 "asbuilt_daemon_events_total 123456.0", "asbuilt_daemon_lost_events_total 7.0",
                 "asbuilt_daemon_config_reloads_total 2.0", "# TYPE asbuilt_daemon_processes_watched gauge",
                 "asbuilt_daemon_processes_watched 321.0", "asbuilt_daemon_start_time_seconds 1.69e+09",
                 "asbuilt_daemon_last_snapshot_timestamp_seconds 1.7e+09"):
        assert line in text, line


# ------------------------------------------------------------------------------ server
def test_server_paths_methods_formats_and_close():
    collector = ProfileCollector(Source(synthetic(5)))
    server = MetricsServer("127.0.0.1:0", collector)
    try:
        status, headers, body = scrape(server, "/")
        assert status == 200 and b'href="/metrics"' in body and headers["Content-Type"].startswith("text/html")
        assert scrape(server, "/nope")[0] == 404
        assert scrape(server, "/metrics?x=1")[0] == 200
        status, headers, body = scrape(server, method="HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000
        assert scrape(server, method="POST")[0] == 501
        status, headers, body = scrape(server, headers={
            "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3"})
        assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n")
        fams = {f.name: f for f in om_parse(body.decode())}
        assert fams["asbuilt_listener"].type == "info" and fams["asbuilt_dependency_connections"].type == "counter"
        port = server.port
    finally:
        t0 = time.monotonic()
        server.close()
        assert time.monotonic() - t0 < 1.0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    again = MetricsServer(f"127.0.0.1:{port}", collector)  # the port is free again
    again.close()


def test_bind_errors_are_one_line_usage_errors():
    collector = ProfileCollector(Source(None))
    with serving(collector) as server:
        with pytest.raises(UsageError, match=r"^cannot serve metrics on 127\.0\.0\.1:\d+: address already in use$"):
            MetricsServer(f"127.0.0.1:{server.port}", collector)
    with pytest.raises(UsageError, match="no such address on this host"):
        MetricsServer("192.0.2.1:0", collector)  # TEST-NET-1: not ours, nothing is sent
    # EACCES: a privileged port for an unprivileged user (runs the real module as nobody)
    code = ("from asbuilt.exporters.prometheus import MetricsServer, ProfileCollector, StaticSource\n"
            "from asbuilt.agent.errors import AsbuiltError\n"
            "try:\n    MetricsServer('127.0.0.1:81', ProfileCollector(StaticSource(None)))\n"
            "except AsbuiltError as e:\n    print(e)\n")
    r = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert r.stdout.strip() == "cannot serve metrics on 127.0.0.1:81: permission denied", r.stdout + r.stderr


@pytest.mark.parametrize("text,want", [
    ("127.0.0.1:9977", ("127.0.0.1", 9977)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    (":9977", ("0.0.0.0", 9977)),
    ("[::1]:9977", ("::1", 9977)),
    ("[::]:80", ("::", 80)),
    ("localhost:9977", ("localhost", 9977)),
    ("metrics.example.internal:10", ("metrics.example.internal", 10)),
    (f"127.0.0.1:{DEFAULT_PORT}", ("127.0.0.1", DEFAULT_PORT)),
])
def test_parse_listen(text, want):
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["off", "", "9977", "127.0.0.1", "127.0.0.1:", "127.0.0.1:65536",
                                  "127.0.0.1:99999999", "::1:9977", "[::1]9977", "[127.0.0.1]:80", "[::1]:x",
                                  "host name:80", "a:b:80", "http://127.0.0.1:80", "[zz]:80", "-bad-:80"])
def test_parse_listen_rejects(text):
    with pytest.raises(UsageError):
        parse_listen(text)


def test_ipv6_loopback():
    with MetricsServer("[::1]:0", ProfileCollector(Source(None))) as server:
        with urllib.request.urlopen(f"http://[::1]:{server.port}/metrics", timeout=10) as resp:
            assert resp.status == 200 and b"asbuilt_build_info" in resp.read()
        assert server.url == f"http://[::1]:{server.port}/metrics"


def test_slow_clients_do_not_block_scrapes(certs):
    collector = ProfileCollector(Source(synthetic(20)))
    cert, key = certs
    for tls in (False, True):
        kw = {"tls_cert": cert, "tls_key": key} if tls else {}
        ctx = ssl.create_default_context(cafile=cert) if tls else None
        with serving(collector, **kw) as server:
            stuck = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
            stuck[0].sendall(b"GET /metr")  # half a request line, then silence
            stuck[1].sendall(b"\x16\x03\x01")  # a TLS record header and nothing more
            try:
                t0 = time.monotonic()
                status, _, body = scrape(server, context=ctx, timeout=5)
                assert status == 200 and b"asbuilt_listener_info" in body
                assert time.monotonic() - t0 < 2.0
            finally:
                for s in stuck:
                    s.close()


def test_too_many_connections_are_refused_not_queued():
    collector = ProfileCollector(Source(None))
    with serving(collector) as server:
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(server.max_connections)]
        try:
            time.sleep(0.3)
            extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            try:
                assert extra.recv(100) == b""  # closed at once
            except ConnectionResetError:
                pass  # closed with our request unread: a reset, also at once
            extra.close()
        finally:
            for s in held:
                s.close()
        time.sleep(0.3)
        assert scrape(server)[0] == 200  # slots come back


# ------------------------------------------------------------------------------ TLS and auth
def test_tls(certs):
    cert, key = certs
    with serving(ProfileCollector(Source(synthetic(3))), tls_cert=cert, tls_key=key) as server:
        ctx = ssl.create_default_context(cafile=cert)
        status, _, body = scrape(server, context=ctx)
        assert status == 200 and b"asbuilt_listener_info" in body
        promtool(body)
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        # TLS 1.1 offered by a client that allows it (openssl at security level 0): the server refuses
        r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-tls1_1",
                            "-cipher", "DEFAULT@SECLEVEL=0"], input="", capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "alert protocol version" in r.stderr + r.stdout
        r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-tls1_2", "-CAfile", cert],
                           input="", capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "Verify return code: 0 (ok)" in r.stdout
        with pytest.raises(urllib.error.URLError):  # an untrusted certificate is refused by the client
            scrape(server, context=ssl.create_default_context())
        # plain HTTP to the TLS port gets no metrics
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            try:
                assert b"asbuilt_" not in raw.recv(65536)
            except ConnectionResetError:
                pass
    with pytest.raises(UsageError, match="no such file"):
        MetricsServer("127.0.0.1:0", ProfileCollector(Source(None)), tls_cert="/nonexistent.pem", tls_key=key)
    with pytest.raises(UsageError, match="cannot load certificate"):
        MetricsServer("127.0.0.1:0", ProfileCollector(Source(None)), tls_cert=key, tls_key=key)
    with pytest.raises(UsageError, match="go together"):
        MetricsServer("127.0.0.1:0", ProfileCollector(Source(None)), tls_cert=cert)


def test_basic_auth():
    stored = hash_password("s3cret pass")
    algo, iterations, salt, digest = stored.split("$")
    assert algo == "pbkdf2_sha256" and iterations == "600000" and salt and len(base64.b64decode(digest)) == 32
    assert stored != hash_password("s3cret pass")  # salted
    assert verify_password("s3cret pass", stored) and not verify_password("s3cret pasS", stored)

    def auth(user, pw):
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()}

    with serving(ProfileCollector(Source(synthetic(2))), basic_auth_user="prom",
                 basic_auth_password_hash=stored) as server:
        status, headers, body = scrape(server)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic realm=") and b"asbuilt_" not in body
        assert scrape(server, headers=auth("prom", "wrong"))[0] == 401
        assert scrape(server, headers=auth("other", "s3cret pass"))[0] == 401
        assert scrape(server, headers={"Authorization": "Basic !!notbase64"})[0] == 401
        assert scrape(server, headers={"Authorization": "Bearer abc"})[0] == 401
        assert scrape(server, "/", headers={})[0] == 401
        status, _, body = scrape(server, headers=auth("prom", "s3cret pass"))
        assert status == 200 and b"asbuilt_listener_info" in body
        t0 = time.monotonic()
        for _ in range(5):  # a verified header is remembered: no PBKDF2 per scrape
            assert scrape(server, headers=auth("prom", "s3cret pass"))[0] == 200
        assert time.monotonic() - t0 < 1.0
    for bad in ("plain", "pbkdf2_sha256$x$salt$abc", "md5$1$s$aGVsbG8=", "pbkdf2_sha256$1000$salt$!!"):
        with pytest.raises(UsageError):
            MetricsServer("127.0.0.1:0", ProfileCollector(Source(None)), basic_auth_user="u",
                          basic_auth_password_hash=bad)
    with pytest.raises(UsageError, match="go together"):
        MetricsServer("127.0.0.1:0", ProfileCollector(Source(None)), basic_auth_user="u")


# ------------------------------------------------------------------------------ the real consumer
def test_real_prometheus_scrapes_over_tls_with_auth(tmp_path, certs, real_profiles):
    """A real Prometheus server scrapes the exporter (TLS + basic auth) and answers queries on it."""
    cert, key = certs
    stored = hash_password("prom-pass", iterations=100_000)
    profile = load_profile(real_profiles["trace"])
    with serving(ProfileCollector(Source(profile, {"scans_total": 5})), tls_cert=cert, tls_key=key,
                 basic_auth_user="prom", basic_auth_password_hash=stored) as server:
        (tmp_path / "prometheus.yml").write_text(textwrap.dedent(f"""\
            global:
              scrape_interval: 1s
              scrape_timeout: 1s
            scrape_configs:
              - job_name: asbuilt
                scheme: https
                tls_config:
                  ca_file: {cert}
                basic_auth:
                  username: prom
                  password: prom-pass
                static_configs:
                  - targets: ["127.0.0.1:{server.port}"]
            """))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            web_port = s.getsockname()[1]
        prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{web_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            api = f"http://127.0.0.1:{web_port}/api/v1/query?query="
            result = []
            deadline = time.monotonic() + 60
            query = f'asbuilt_listener_info{{port="{real_profiles["port"]}"}}'
            while time.monotonic() < deadline and not result:
                time.sleep(1)
                try:
                    with urllib.request.urlopen(api + urllib.request.quote(query), timeout=5) as resp:
                        result = json.load(resp)["data"]["result"]
                except (OSError, ValueError, KeyError):
                    continue
            assert result, "Prometheus never stored the listener series"
            with urllib.request.urlopen(api + urllib.request.quote('up{job="asbuilt"}'), timeout=5) as resp:
                (up,) = json.load(resp)["data"]["result"]
            assert up["value"][1] == "1"
            with urllib.request.urlopen(api + urllib.request.quote("asbuilt_daemon_scans_total"), timeout=5) as resp:
                assert json.load(resp)["data"]["result"][0]["value"][1] == "5"
        finally:
            prom.terminate()
            try:
                prom.wait(timeout=20)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()


def test_static_source_and_textfile_render():
    from asbuilt.exporters.prometheus import render_text

    body = render_text(synthetic(4), max_series=10)
    promtool(body)
    rows = samples(body)
    assert capped_count(rows) <= 10 and StaticSource(None).snapshot() is None


def test_fast_text_renderer_matches_client_python(big, real_profiles):
    """The server's text path skips client_python's objects; what it writes must parse to the same samples."""
    odd = Process(pid=5, identity="odd", exe='/opt/we"ird\\path/bin', user="ü\u00e9ser", systemd_unit="x y.service",
                  sockets=[Socket(proto="udp", state="UNCONN", local_address="::", local_port=53)])
    volatile = ("asbuilt_metrics_collect_duration_seconds", "asbuilt_metrics_series_dropped_total")
    for profile in (big, load_profile(real_profiles["scan"]), Profile(processes=[odd])):
        collector = ProfileCollector(Source(profile, {"scans_total": 1, "scan_duration_seconds": 0.25}),
                                     max_series=3000)
        fast, slow = samples(collector.render_text()), samples(_render(collector))
        norm = [sorted((n, tuple(sorted(l.items())), v) for n, l, v in rows if n not in volatile)
                for rows in (fast, slow)]
        assert norm[0] == norm[1] and len(norm[0]) > 20
    promtool(ProfileCollector(Source(Profile(processes=[odd]))).render_text())
