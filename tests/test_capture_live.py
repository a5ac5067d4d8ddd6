"""Live capture tests, as root: real servers and clients on loopback and across a veth pair into a network
namespace the test creates; the capture probe must name each protocol for the right peer, see nothing on
ports it was not given, count drops under a flood with bounded memory, and write a readable pcap."""
from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

from asbuilt.probes.base import Context
from asbuilt.probes.capture import CaptureLimits, CaptureProbe



# ------------------------------------------------------------------------------------ helpers
class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def http_server(address="127.0.0.1"):
    srv = http.server.ThreadingHTTPServer((address, 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


@contextlib.contextmanager
def capture(ports, listening=None, pcap_path=None, limits=None):
    probe = CaptureProbe(limits)
    assert probe.check(Context()) is None
    probe.start(Context(), ports, pcap_path=pcap_path, listening=listening)
    try:
        yield probe
    finally:
        began = time.monotonic()
        probe.stop()
        assert time.monotonic() - began < 1.0, "stop() must be prompt"


def get(url, agent="asbuilt-live-test/1.0"):
    req = urllib.request.Request(url, headers={"User-Agent": agent})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.read()


def wait_peer(probe, pred, timeout=5.0):
    """Drain until a peer matching ``pred`` shows up; returns it (the last version of it)."""
    deadline = time.monotonic() + timeout
    found = {}
    while time.monotonic() < deadline:
        for peer in probe.drain().peers:
            found[(peer.direction, peer.proto, peer.address, peer.port, peer.local_port)] = peer
        hits = [p for p in found.values() if pred(p)]
        if hits:
            return hits[0]
        time.sleep(0.05)
    raise AssertionError(f"no matching peer; saw {list(found.values())}")


def wait_until(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def free_port(kind=socket.SOCK_STREAM, address="127.0.0.1"):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


# -------------------------------------------------------------------------------------- HTTP
def test_http_inbound_other_ports_unseen_set_ports_and_pcap(tmp_path):
    pcap = tmp_path / "cap.pcap"
    with http_server() as watched, http_server() as other:
        with capture([("tcp", watched)], listening=[("tcp", watched)], pcap_path=str(pcap)) as probe:
            get(f"http://127.0.0.1:{other}/not/watched/1")
            time.sleep(0.3)
            assert probe.stats["packets_seen"] == 0, "traffic on another port reached the capture"
            get(f"http://127.0.0.1:{watched}/items/12345/detail?secret=x")
            peer = wait_peer(probe, lambda p: p.protocol == "http" and "status" in p.details)
            assert (peer.direction, peer.address, peer.port, peer.local_port, peer.proto) == \
                ("inbound", "127.0.0.1", 0, watched, "tcp")
            assert peer.details["method"] == "GET"
            assert peer.details["path"] == "/items/{id}/detail"
            assert peer.details["host"] == f"127.0.0.1:{watched}"
            assert peer.details["user_agent"] == "asbuilt-live-test"
            assert peer.details["status"] == "200"
            assert "secret" not in repr(peer.details)
            seen = probe.stats["packets_seen"]
            assert seen > 0
            # the only port is identified: the socket closes, later requests are not copied to Python
            wait_until(lambda: probe.mode == "closed")
            assert probe.sniffer._sock is None and probe.sniffer.resolved == {("tcp", watched): "http"}
            get(f"http://127.0.0.1:{watched}/after/close")
            time.sleep(0.2)
            assert probe.stats["packets_seen"] == seen
            # a new port appears: the socket reopens for it alone
            probe.set_ports([("tcp", watched), ("tcp", other)], listening=[("tcp", watched), ("tcp", other)])
            assert probe.mode == "full" and probe.sniffer.expression == f"tcp port {other}"
            get(f"http://127.0.0.1:{other}/now/watched")
            peer = wait_peer(probe, lambda p: p.local_port == other and p.protocol == "http")
            assert peer.details["path"] == "/now/watched"
            wait_until(lambda: probe.mode == "closed")
            assert probe.stats["socket_opens"] == 2 and probe.stats["socket_closes"] == 2
            assert probe.stats["ports_identified"] == 2 and probe.stats["ports_open"] == 0
            summary = probe.summary
            assert "2 port(s) identified" in summary and f"tcp/{other} http" in summary, summary
            assert probe.lost_events == 0 and probe.error is None
            kept = probe.stats["packets_kept"]
    assert oct(pcap.stat().st_mode & 0o777) == "0o600"
    from scapy.all import rdpcap  # noqa: loads the layers so raw-IP packets decode
    packets = rdpcap(str(pcap))
    assert len(packets) == kept > 0
    assert any(b"GET /items/12345/detail" in bytes(p) for p in packets)
    tshark = shutil.which("tshark")
    assert tshark, "tshark not installed (apt-get install -y tshark)"
    out = subprocess.run([tshark, "-r", str(pcap), "-Y", "http.request"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert "GET /items/12345/detail" in out.stdout


def test_http_ipv6_outbound():
    srv_cls = type("V6", (http.server.ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    srv = srv_cls(("::1", 0), _Handler)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with capture([("tcp", port)], listening=[]) as probe:
            get(f"http://[::1]:{port}/v6/0af3c9e1d2", agent="Go-http-client/1.1")
            peer = wait_peer(probe, lambda p: p.protocol == "http" and "status" in p.details)
            assert (peer.direction, peer.address, peer.port, peer.family) == ("outbound", "::1", port, "inet6")
            assert peer.details["path"] == "/v6/{id}" and peer.details["user_agent"] == "Go-http-client"
    finally:
        srv.shutdown()
        srv.server_close()


# --------------------------------------------------------------------------------------- TLS
def test_tls_sni(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=api.asbuilt.test",
                    "-addext", "subjectAltName=DNS:api.asbuilt.test"], check=True, capture_output=True)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(str(cert), str(key))
    sctx.set_alpn_protocols(["http/1.1"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with sctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(100)
            tls.sendall(b"pong")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with capture([("tcp", port)], listening=[]) as probe:
            cctx = ssl.create_default_context(cafile=str(cert))
            cctx.set_alpn_protocols(["h2", "http/1.1"])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with cctx.wrap_socket(raw, server_hostname="api.asbuilt.test") as tls:
                    tls.sendall(b"ping")
                    assert tls.recv(100) == b"pong"
            peer = wait_peer(probe, lambda p: p.protocol == "tls" and "version" in p.details)
            assert (peer.direction, peer.address, peer.port) == ("outbound", "127.0.0.1", port)
            assert peer.details["sni"] == "api.asbuilt.test"
            assert peer.details["alpn"] == "h2,http/1.1"
            assert "alpn_selected" not in peer.details  # TLS 1.3 sends it encrypted (EncryptedExtensions)
            assert peer.details["version"] == "TLS 1.3"
    finally:
        thread.join(timeout=5)
        listener.close()


# ------------------------------------------------------------------------------------- Redis
@pytest.fixture(scope="session")
def redis_server_bin():
    path = shutil.which("redis-server")
    if not path:
        subprocess.run(["apt-get", "install", "-y", "redis-server"], check=True, capture_output=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), timeout=300)
        path = shutil.which("redis-server")
    assert path
    return path


def test_redis(redis_server_bin, tmp_path):
    port = free_port()
    proc = subprocess.Popen([redis_server_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--daemonize", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        with capture([("tcp", port)], listening=[("tcp", port)]) as probe:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"*1\r\n$4\r\nPING\r\n")
                assert s.recv(100) == b"+PONG\r\n"
                s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
                assert s.recv(100) == b"+OK\r\n"
            peer = wait_peer(probe, lambda p: p.protocol == "redis")
            assert (peer.direction, peer.address, peer.local_port) == ("inbound", "127.0.0.1", port)
            assert peer.details["command"] == "PING"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------- PostgreSQL
def test_postgresql_startup():
    bindir = "/usr/lib/postgresql/15/bin"
    if not os.path.exists(os.path.join(bindir, "initdb")):
        subprocess.run(["apt-get", "install", "-y", "postgresql"], check=True, capture_output=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), timeout=600)
    base = tempfile.mkdtemp(prefix="asbuilt-pg-")  # pytest's tmp_path is root-only: postgres cannot enter it
    os.chmod(base, 0o755)
    shutil.chown(base, "postgres")
    data = os.path.join(base, "data")
    port = free_port()
    run = ["runuser", "-u", "postgres", "--"]
    try:
        subprocess.run(run + [f"{bindir}/initdb", "-D", data, "--auth=trust", "-U", "postgres"],
                       check=True, capture_output=True, timeout=60)
        opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c shared_buffers=8MB"
        subprocess.run(run + [f"{bindir}/pg_ctl", "-D", data, "-o", opts, "-w", "-t", "30", "-l",
                              os.path.join(base, "log"), "start"], check=True, capture_output=True, timeout=60)
        with capture([("tcp", port)], listening=[("tcp", port)]) as probe:
            out = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres",
                                  "-Atc", "select 1"], capture_output=True, text=True, timeout=30,
                                 env=dict(os.environ, PGSSLMODE="prefer", PGAPPNAME="asbuilt-test"))
            assert out.stdout.strip() == "1", out.stderr
            peer = wait_peer(probe, lambda p: p.protocol == "postgresql" and "user" in p.details)
            assert (peer.direction, peer.address, peer.local_port) == ("inbound", "127.0.0.1", port)
            assert peer.details["user"] == "postgres" and peer.details["database"] == "postgres"
            assert peer.details["ssl_request"] == "true" and peer.details["ssl_accepted"] == "false"
            assert peer.details["application_name"] == "asbuilt-test"
    finally:
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            subprocess.run(run + [f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------------------- DNS
def _dns_exchange(client: socket.socket, server: socket.socket, qid: int, name: bytes, address: str) -> None:
    """``client`` asks ``server`` (a UDP socket bound on port 53) for the A record of ``name``;
    the server answers it with ``address``."""
    qname = b"".join(bytes([len(label)]) + label for label in name.split(b".")) + b"\0"
    query = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)
    client.sendto(query, server.getsockname())
    server.settimeout(5)
    data, addr = server.recvfrom(512)
    answer = struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + data[12:] + \
        struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(address)
    server.sendto(answer, addr)


def test_dns_query_and_answer():
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.77", 53))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with capture([("udp", 53)], listening=[]) as probe:
            _dns_exchange(client, server, 0xBEEF, b"db.asbuilt.test", "10.199.0.9")
            client.settimeout(5)
            client.recvfrom(512)
            peer = wait_peer(probe, lambda p: p.protocol == "dns" and p.details.get("message") == "response")
            assert (peer.direction, peer.address, peer.port, peer.proto) == ("outbound", "127.0.0.77", 53, "udp")
            assert peer.details["query"] == "db.asbuilt.test"
            names = {n.name: n for n in probe.drain().names}
            if "db.asbuilt.test" not in names:  # already drained with the peer: ask the sniffer's table
                names = {k: v[0] for k, v in probe.sniffer._names.items()}
            assert names["db.asbuilt.test"].addresses == ["10.199.0.9"]
    finally:
        server.close()
        client.close()


# ----------------------------------------------------------------------------- veth + netns
@pytest.fixture
def netns():
    tag = f"{os.getpid() % 250 + 1}"
    ns, host_if, ns_if = f"asb-cap-{tag}", f"asbc{tag}h", f"asbc{tag}n"
    host_ip, ns_ip = f"10.199.{tag}.1", f"10.199.{tag}.2"
    cmds = [["ip", "netns", "add", ns],
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
            ["ip", "link", "set", ns_if, "netns", ns],
            ["ip", "addr", "add", f"{host_ip}/30", "dev", host_if],
            ["ip", "link", "set", host_if, "up"],
            ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if],
            ["ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up"],
            ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]]
    try:
        for cmd in cmds:
            subprocess.run(cmd, check=True, capture_output=True, timeout=10)
        yield ns, host_ip, ns_ip
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def test_http_across_veth_from_namespace(netns):
    ns, host_ip, ns_ip = netns
    with http_server(host_ip) as port:
        with capture([("tcp", port)], listening=[("tcp", port)]) as probe:
            code = ("import urllib.request as u; r = u.Request('http://%s:%d/orders/77', "
                    "headers={'User-Agent': 'curl/8.0'}); print(u.urlopen(r, timeout=5).read())" % (host_ip, port))
            out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True,
                                 text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            peer = wait_peer(probe, lambda p: p.protocol == "http" and "status" in p.details)
            assert (peer.direction, peer.address, peer.local_port) == ("inbound", ns_ip, port)
            assert peer.details["path"] == "/orders/{id}" and peer.details["user_agent"] == "curl"


# ------------------------------------------------------------------------------------- flood
FLOOD = r"""
import socket, sys, time
port, seconds, nsocks = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(nsocks)]
payload = b"\x00flood" * 8
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    for s in socks:
        s.sendto(payload, ("127.0.0.1", port))
        n += 1
print(n)
"""


def test_flood_drops_counted_and_memory_bounded():
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the traced server overflows too: fine
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    # narrow=False: an unrecognised flood would otherwise be given up as unknown-udp after a few flows
    limits = CaptureLimits(max_flows=64, packets_per_second=3000, rcvbuf_bytes=64 * 1024, narrow=False)
    try:
        with capture([("udp", port)], listening=[("udp", port)], limits=limits) as probe:
            cpu0, wall0 = time.process_time(), time.monotonic()
            out = subprocess.run([sys.executable, "-c", FLOOD, str(port), "2.0", "200"], capture_output=True,
                                 text=True, timeout=30)
            cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
            sent = int(out.stdout)
            time.sleep(0.3)
            probe.drain()
            stats = probe.stats
            print(f"flood: sent={sent} stats={stats} capture_cpu={cpu:.1%}")
            assert stats["kernel_drops"] + stats["budget_drops"] > 0
            assert probe.lost_events == stats["kernel_drops"] + stats["budget_drops"]
            assert stats["budget_pauses"] > 0
            assert len(probe.sniffer._flows) <= limits.max_flows
            assert stats["flows_evicted"] > 0
            assert stats["packets_seen"] <= limits.packets_per_second * 4  # ~2.3 s of budget
            (peer,) = [p for p in probe.drain().peers] or [probe.sniffer._peers[k].obs for k in probe.sniffer._peers]
            assert peer.protocol == "unknown-udp" and peer.details["first_bytes"] == (b"\x00flood" * 2)[:8].hex()
            assert cpu < 0.5, f"capture used {cpu:.0%} of a core"
    finally:
        sink.close()


def test_unknown_flood_given_up_then_only_dns_inbound():
    """Flows no parser knows settle their port as unknown after a few; only UDP/53 stays, inbound-only."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    limits = CaptureLimits(unknown_flows_per_port=3)
    try:
        with capture([("udp", port), ("udp", 53)], listening=[("udp", port)], limits=limits) as probe:
            assert probe.mode == "full"
            out = subprocess.run([sys.executable, "-c", FLOOD, str(port), "1.0", "50"], capture_output=True,
                                 text=True, timeout=30)
            assert int(out.stdout) > 0
            wait_until(lambda: probe.mode == "inbound")
            assert probe.sniffer.resolved == {("udp", port): "unknown-udp"}
            assert probe.sniffer.expression == "udp port 53"
            assert probe.stats["ports_unknown"] == 1 and probe.stats["packets_seen"] < 1000
            peer = wait_peer(probe, lambda p: p.local_port == port)
            assert peer.protocol == "unknown-udp"
            # DNS answers still arrive: they are inbound
            seen = probe.stats["packets_seen"]
            server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            server.bind(("127.0.0.78", 53))
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                _dns_exchange(client, server, 7, b"late.asbuilt.test", "10.199.0.10")
                wait_until(lambda: "late.asbuilt.test" in probe.sniffer._names)
            finally:
                server.close()
                client.close()
            assert probe.sniffer._names["late.asbuilt.test"][0].addresses == ["10.199.0.10"]
            assert probe.stats["packets_seen"] - seen == 2  # loopback: query and answer, each once
            assert probe.mode == "inbound" and probe.error is None
    finally:
        sink.close()


def test_idle_port_leaves_full_tap_and_is_still_learned_on_loopback():
    """A port with no traffic for full_tap_seconds moves to the inbound-only socket; loopback flows are
    still seen whole there (each packet once), so it is identified and the socket then closes."""
    limits = CaptureLimits(full_tap_seconds=0.3)
    with http_server() as port:
        with capture([("tcp", port)], listening=[("tcp", port)], limits=limits) as probe:
            assert probe.mode == "full"
            wait_until(lambda: probe.mode == "inbound")
            assert probe.sniffer.expression == f"tcp port {port}"
            get(f"http://127.0.0.1:{port}/late/1")
            peer = wait_peer(probe, lambda p: p.protocol == "http" and "status" in p.details)
            assert peer.local_port == port and peer.details["path"] == "/late/{id}"
            wait_until(lambda: probe.mode == "closed")
            assert probe.stats["full_tap_ms"] < 2000 and probe.stats["mode_changes"] >= 1
            assert "inbound" in probe.summary and f"tcp/{port} http" in probe.summary
            assert probe.error is None
