"""Pure tables for probes/capture/protocols.py and the capture filter builder: real protocol bytes in,
protocol and details out; empty, truncated and malformed input included."""
from __future__ import annotations

import ssl
import struct

import pytest

from asbuilt.probes.capture import protocols as P
from asbuilt.probes.capture.sniffer import compile_program, filter_expression, normalise_ports


def client_hello(server_hostname="api.asbuilt.test", alpn=("h2", "http/1.1")) -> bytes:
    """A real ClientHello from Python's ssl, through memory BIOs (no network)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def server_hello(version=0x0304, alpn=b"h2") -> bytes:
    ext = b""
    if version == 0x0304:
        ext += struct.pack("!HHH", 43, 2, 0x0304)
    if alpn:
        body = bytes([len(alpn)]) + alpn
        ext += struct.pack("!HHH", 16, len(body) + 2, len(body)) + body
    hello = struct.pack("!H", 0x0303) + b"\x11" * 32 + b"\x00" + b"\x13\x01" + b"\x00" + \
        struct.pack("!H", len(ext)) + ext
    hs = b"\x02" + len(hello).to_bytes(3, "big") + hello
    return b"\x16\x03\x03" + struct.pack("!H", len(hs)) + hs


def pg_startup(**params) -> bytes:
    body = struct.pack("!I", 196608) + b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                                 for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


MYSQL_GREETING = bytes.fromhex("4a0000000a") + b"8.0.36-0ubuntu0.22.04.1\0" + bytes(range(1, 30))
MARIADB_GREETING = bytes.fromhex("5a0000000a") + b"5.5.5-10.11.6-MariaDB-0+deb12u1\0" + bytes(20)


def dns_message(qname: str, qtype: int = 1, answers=(), response=False) -> bytes:
    """A DNS message with compression pointers to the question name (as real resolvers send)."""
    flags = 0x8180 if response else 0x0100
    out = struct.pack("!HHHHHH", 0x1234, flags, 1, len(answers), 0, 0)
    out += b"".join(bytes([len(l)]) + l.encode() for l in qname.split(".")) + b"\0"
    out += struct.pack("!HH", qtype, 1)
    offsets = {qname: 12}
    for name, rtype, rdata in answers:
        if name in offsets:
            out += struct.pack("!H", 0xC000 | offsets[name])
        else:
            offsets[name] = len(out)
            out += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
        if rtype == 5:
            rdata = b"".join(bytes([len(l)]) + l.encode() for l in rdata.split(".")) + b"\0"
        out += struct.pack("!HHIH", rtype, 1, 300, len(rdata)) + rdata
    return out


HTTP_REQ = (b"GET /api/v1/users/12345/orders/9f86d081884c7d65?token=secret HTTP/1.1\r\n"
            b"Host: api.example.test\r\nUser-Agent: python-requests/2.31.0\r\nAccept: */*\r\n\r\n")
HTTP_RESP = b"HTTP/1.1 404 Not Found\r\nServer: nginx/1.22.1\r\nContent-Length: 0\r\n\r\n"


# (id, proto, client bytes, server bytes, server port, protocol, details that must be present)
IDENTIFY = [
    ("empty-tcp", "tcp", b"", b"", 80, "", {}),
    ("empty-udp", "udp", b"", b"", 53, "", {}),
    ("http", "tcp", HTTP_REQ, HTTP_RESP, 8080, "http",
     {"method": "GET", "host": "api.example.test", "path": "/api/v1/users/{id}/orders/{id}",
      "user_agent": "python-requests", "status": "404", "server": "nginx"}),
    ("http-request-only", "tcp", b"POST /v2/items/550e8400-e29b-41d4-a716-446655440000 HTTP/1.0\r\n"
     b"User-Agent: curl/8.1.2\r\n\r\n", b"", 80, "http",
     {"method": "POST", "path": "/v2/items/{id}", "user_agent": "curl"}),
    ("http-go", "tcp", b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: Go-http-client/1.1\r\n\r\n", b"", 80,
     "http", {"user_agent": "Go-http-client", "path": "/"}),
    ("http-response-only", "tcp", b"", HTTP_RESP, 80, "http", {"status": "404"}),
    ("http-truncated-headers", "tcp", b"GET /a/b HTTP/1.1\r\nHost: exa", b"", 80, "http",
     {"method": "GET", "path": "/a/b"}),
    ("http-proxy-absolute", "tcp", b"GET http://h.test/x/77?q HTTP/1.1\r\n\r\n", b"", 3128, "http",
     {"path": "/x/{id}"}),
    ("http-connect", "tcp", b"CONNECT db.test:443 HTTP/1.1\r\nHost: db.test:443\r\n\r\n", b"", 3128, "http",
     {"method": "CONNECT", "authority": "db.test:443"}),
    ("http2-preface", "tcp", P.HTTP2_PREFACE + b"\x00\x00\x12\x04", b"", 80, "http2", {}),
    ("tls", "tcp", client_hello(), server_hello(), 443, "tls",
     {"sni": "api.asbuilt.test", "alpn": "h2,http/1.1", "version": "TLS 1.3", "alpn_selected": "h2"}),
    ("tls-client-only", "tcp", client_hello("db.internal.test", ("postgresql",)), b"", 5432, "tls",
     {"sni": "db.internal.test", "alpn": "postgresql", "record_version": "TLS 1.0",
      "handshake_version": "TLS 1.2"}),
    ("tls-truncated", "tcp", client_hello()[:120], b"", 443, "tls", {"handshake_version": "TLS 1.2"}),
    ("tls12-server", "tcp", b"", server_hello(0x0303, b""), 443, "tls", {"version": "TLS 1.2"}),
    ("postgres", "tcp", pg_startup(user="app", database="orders", application_name="psql"), b"R", 5432,
     "postgresql", {"user": "app", "database": "orders", "protocol_version": "3.0"}),
    ("postgres-ssl", "tcp", struct.pack("!II", 8, P.PG_SSL_REQUEST), b"S", 5432, "postgresql",
     {"ssl_request": "true", "ssl_accepted": "true"}),
    ("postgres-ssl-refused", "tcp", struct.pack("!II", 8, P.PG_SSL_REQUEST) + pg_startup(user="u"), b"N",
     5432, "postgresql", {"ssl_request": "true", "ssl_accepted": "false", "user": "u"}),
    ("postgres-truncated", "tcp", pg_startup(user="app", database="orders")[:20], b"", 5432, "postgresql",
     {"user": "app"}),
    ("mysql", "tcp", b"", MYSQL_GREETING, 3306, "mysql",
     {"protocol_version": "10", "server_version": "8.0.36-0ubuntu0.22.04.1", "flavor": "mysql"}),
    ("mariadb", "tcp", b"", MARIADB_GREETING, 3306, "mysql", {"flavor": "mariadb"}),
    ("redis", "tcp", b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n", 6379, "redis", {"command": "PING"}),
    ("redis-set", "tcp", b"*3\r\n$3\r\nset\r\n$1\r\nk\r\n$1\r\nv\r\n", b"", 7000, "redis", {"command": "SET"}),
    ("redis-inline", "tcp", b"get foo\r\n", b"$-1\r\n", 6379, "redis", {"command": "GET"}),
    ("memcached", "tcp", b"get foo\r\n", b"END\r\n", 11211, "memcached", {"command": "get"}),
    ("memcached-set", "tcp", b"set k 0 0 1\r\nx\r\n", b"STORED\r\n", 11211, "memcached", {"command": "set"}),
    ("ssh", "tcp", b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n", b"SSH-2.0-OpenSSH_9.2p1\r\n", 22, "ssh",
     {"banner": "SSH-2.0-OpenSSH_9.2p1"}),
    ("smtp", "tcp", b"", b"220 mail.test ESMTP Postfix (Debian/GNU)\r\n", 25, "smtp",
     {"banner": "220 mail.test ESMTP Postfix (Debian/GNU)"}),
    ("ftp", "tcp", b"", b"220 (vsFTPd 3.0.3)\r\n", 21, "ftp", {"banner": "220 (vsFTPd 3.0.3)"}),
    ("unknown-binary", "tcp", b"\x00\x01\x02\x03\xff\xfe\xfd\xfc\xfb", b"", 9999, "unknown-tcp",
     {"first_bytes": "00010203fffefdfc", "printable": "0.00", "from": "client"}),
    ("unknown-text", "tcp", b"", b"hello there\n", 9999, "unknown-tcp",
     {"first_bytes": "68656c6c6f207468", "printable": "1.00", "from": "server"}),
    ("malformed-http", "tcp", b"GET\r\n\r\n", b"", 80, "unknown-tcp", {}),
    ("malformed-tls", "tcp", b"\x16\x03\x01\x00", b"", 443, "unknown-tcp", {}),
    ("malformed-pg", "tcp", struct.pack("!II", 100000, 196608), b"", 5432, "unknown-tcp", {}),
    ("dns-query", "udp", dns_message("example.test"), b"", 53, "dns",
     {"query": "example.test", "qtype": "A", "message": "query"}),
    ("dns-answer", "udp", dns_message("example.test"),
     dns_message("example.test", answers=[("example.test", 1, bytes([10, 0, 0, 7]))], response=True), 53,
     "dns", {"query": "example.test", "message": "response", "rcode": "NOERROR"}),
    ("dns-malformed", "udp", b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3f", b"", 53, "unknown-udp",
     {"from": "client"}),
    ("udp-unknown", "udp", b"\x01\x02hello", b"", 4789, "unknown-udp", {"first_bytes": "010268656c6c6f"}),
]


@pytest.mark.parametrize("case", IDENTIFY, ids=[c[0] for c in IDENTIFY])
def test_identify(case):
    _, proto, client, server, port, protocol, details = case
    got = P.identify(proto, client, server, port)
    assert got.protocol == protocol
    for key, value in details.items():
        assert got.details.get(key) == value, (key, got.details)


def test_http_never_keeps_query_or_ids():
    got = P.identify("tcp", HTTP_REQ, b"", 80)
    text = repr(got.details)
    assert "secret" not in text and "12345" not in text and "token" not in text


@pytest.mark.parametrize("target,template", [
    ("/", "/"), ("/users/42", "/users/{id}"), ("/a/B/c?x=1#f", "/a/B/c"),
    ("/f/550E8400-E29B-41D4-A716-446655440000/x", "/f/{id}/x"), ("/h/deadbeef12", "/h/{id}"),
    ("/h/deadbeef", "/h/deadbeef"),  # letters only: a word, not an id
    ("/v1/abc123", "/v1/abc123"),  # short, not all hex
    ("*", "*"), ("http://host/p/9", "/p/{id}"), ("http://host", "/"),
])
def test_path_template(target, template):
    assert P.path_template(target) == template


@pytest.mark.parametrize("ua,family", [
    ("curl/7.88.1", "curl"), ("python-requests/2.31.0", "python-requests"), ("Go-http-client/1.1", "Go-http-client"),
    ("Mozilla/5.0 (X11; Linux x86_64)", "Mozilla"), ("Python-urllib/3.11", "Python-urllib"), ("", ""),
    ("  (weird)", ""),
])
def test_product(ua, family):
    assert P.product(ua) == family


def test_dns_cname_chain_and_aaaa():
    msg = dns_message("www.shop.test", answers=[
        ("www.shop.test", 5, "edge.cdn.test"),
        ("edge.cdn.test", 1, bytes([192, 0, 2, 10])),
        ("edge.cdn.test", 28, bytes.fromhex("20010db8000000000000000000000001")),
    ], response=True)
    details, records = P.parse_dns(msg)
    assert details["query"] == "www.shop.test"
    first = records[0]
    assert first.name == "www.shop.test" and first.cnames == ["edge.cdn.test"]
    assert first.addresses == ["192.0.2.10", "2001:db8::1"]
    assert any(r.name == "edge.cdn.test" for r in records)


@pytest.mark.parametrize("data", [
    b"", b"\x00" * 11, b"\x12\x34\x81\x80\x00\x00\x00\x00\x00\x00\x00\x00",  # no question
    b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",  # pointer loop
    b"\x12\x34\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00\x05ab",  # label past the end
])
def test_dns_malformed(data):
    assert P.parse_dns(data) is None


def test_dns_truncated_answer_keeps_question():
    msg = dns_message("t.test", answers=[("t.test", 1, bytes([10, 1, 2, 3]))], response=True)
    details, records = P.parse_dns(msg[:-3])
    assert details["query"] == "t.test" and records == []


@pytest.mark.parametrize("data", [b"", b"\x16", b"\x16\x03\x01\x00\x05\x01\x00", b"\x17\x03\x03\x00\x10" + bytes(16)])
def test_tls_malformed(data):
    assert P.parse_tls_client_hello(data) is None


def test_tls_client_hello_split_across_records():
    hello = client_hello()
    hs = hello[5:]
    split = b"\x16\x03\x01" + struct.pack("!H", 40) + hs[:40] + \
        b"\x16\x03\x01" + struct.pack("!H", len(hs) - 40) + hs[40:]
    assert P.parse_tls_client_hello(split)["sni"] == "api.asbuilt.test"


@pytest.mark.parametrize("data,expected", [
    (b"", {}), (b"x" * 8, {"first_bytes": "7878787878787878", "printable": "1.00"}),
    (b"\x00a", {"first_bytes": "0061", "printable": "0.50"}),
])
def test_fingerprint(data, expected):
    got = P.fingerprint(data)
    for k, v in expected.items():
        assert got[k] == v


# --------------------------------------------------------------------------------- filter builder
@pytest.mark.parametrize("ports,expr", [
    ([], ""),
    ([("tcp", 5432)], "tcp port 5432"),
    ([("udp", 53), ("TCP", 80), ("tcp", 80)], "tcp port 80 or udp port 53"),
])
def test_filter_expression(ports, expr):
    assert filter_expression(ports) == expr


@pytest.mark.parametrize("ports", [[("icmp", 1)], [("tcp", 0)], [("tcp", 70000)], [("tcp", "80")]])
def test_bad_ports(ports):
    with pytest.raises(ValueError):
        normalise_ports(ports)


def test_compile_program_snaplen_and_loopback_prefix():
    assert compile_program("", 2048) == [(0x06, 0, 0, 0)]
    prog = compile_program("tcp port 80", 512, loopback_ifindex=1)
    assert prog[1] == (0x15, 0, 3, 4) and prog[3] == (0x15, 0, 1, 1) and prog[4] == (0x06, 0, 0, 0)
    rets = {k for code, _, _, k in prog if code == 0x06}
    assert rets == {0, 512}
    with pytest.raises(ValueError):
        compile_program("tcp port banana", 512)


# ------------------------------------------------------------- flow table (packets fed directly, no socket)
from asbuilt.probes.capture.sniffer import CaptureLimits, Sniffer  # noqa: E402


def feed(sniffer, *packets):
    for pkt in packets:
        raw = bytes(pkt)
        buf = bytearray(raw)
        sniffer._packet(buf, len(raw), 1000.0)


def tcp(src, sport, dst, dport, flags="PA", payload=b""):
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    return ip / TCP(sport=sport, dport=dport, flags=flags) / payload


def test_flow_direction_budget_and_peer():
    s = Sniffer(CaptureLimits(packets_per_flow=2), listening=[("tcp", 8080)])
    s.ports = {("tcp", 8080)}
    c, srv = "10.199.0.2", "10.199.0.1"
    feed(s, tcp(c, 40000, srv, 8080, "S"), tcp(srv, 8080, c, 40000, "SA"),
         tcp(c, 40000, srv, 8080, payload=b"GET /a/1 HTTP/1.1\r\nHost: h\r\n\r\n"),
         tcp(srv, 8080, c, 40000, payload=b"HTTP/1.1 204 No Content\r\n\r\n"),
         tcp(c, 40000, srv, 8080, payload=b"more"))  # flow settled: ignored
    (peer,) = s.drain().peers
    assert (peer.direction, peer.address, peer.port, peer.local_port) == ("inbound", c, 0, 8080)
    assert peer.protocol == "http" and peer.details["status"] == "204" and peer.details["path"] == "/a/{id}"
    assert s.stats["packets_seen"] == 5 and s.stats["packets_kept"] == 2 and s.stats["packets_ignored"] == 1
    assert s._buffered == 0  # settled flows hold no payload
    assert s.drain().peers == []  # nothing new


def test_flow_outbound_without_syn_and_per_flow_cap():
    s = Sniffer(CaptureLimits(packets_per_flow=2))
    s.ports = {("tcp", 45000)}  # our ephemeral port: we are the client of 5432
    feed(s, *[tcp("::1", 5432, "::1", 45000, payload=b"\x00\x01junk") for _ in range(5)])
    (peer,) = s.drain().peers
    assert (peer.direction, peer.address, peer.port, peer.family) == ("outbound", "::1", 5432, "inet6")
    assert peer.protocol == "unknown-tcp" and peer.details["from"] == "server"
    assert s.stats["packets_kept"] == 2 and s.stats["packets_ignored"] == 3


def test_flow_lru_and_buffer_bounds():
    s = Sniffer(CaptureLimits(max_flows=3, max_buffered_bytes=100, packets_per_flow=4), listening=[("tcp", 9)])
    s.ports = {("tcp", 9)}
    feed(s, *[tcp("127.0.0.1", 30000 + i, "127.0.0.1", 9, payload=b"\x01" * 60) for i in range(10)])
    assert len(s._flows) == 3 and s.stats["flows"] == 10 and s.stats["flows_evicted"] == 7
    assert 0 <= s._buffered <= 100
    assert s.stats["payload_bytes_dropped"] > 0


@pytest.mark.parametrize("raw", [
    b"", b"\x45" + b"\x00" * 10,  # short
    b"\x75" + b"\x00" * 40,  # IP version 7
    bytes.fromhex("45000028000020400640") + bytes(30),  # later IPv4 fragment (offset != 0)
])
def test_flow_malformed_packets_counted(raw):
    s = Sniffer()
    s._packet(bytearray(raw) + bytearray(64), len(raw), 0.0)
    assert s.stats["packets_seen"] == 1
    assert s.stats["packets_malformed"] + s.stats["packets_ignored"] == 1
    assert not s._flows


# ------------------------------------------------------- a port leaves the filter once its protocol is known
def udp(src, sport, dst, dport, payload):
    from scapy.layers.inet import IP, UDP
    return IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload


DNS_ANSWER = bytes.fromhex("beef81800001000100000000") + b"\x02db\x04test\x00" + bytes.fromhex("00010001") + \
    bytes.fromhex("c00c000100010000003c0004") + bytes([10, 0, 0, 9])


def test_port_settled_when_identified_with_both_directions():
    s = Sniffer(listening=[("tcp", 8080)])
    s.ports = {("tcp", 8080), ("udp", 53)}
    c, srv = "10.199.0.2", "10.199.0.1"
    feed(s, tcp(c, 40000, srv, 8080, payload=b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"))
    assert s.resolved == {} and not s._dirty  # known, but the answer may add the status: keep watching
    feed(s, tcp(srv, 8080, c, 40000, payload=b"HTTP/1.1 200 OK\r\n\r\n"))
    assert s.resolved == {("tcp", 8080): "http"} and s._dirty
    assert s.stats["ports_identified"] == 1 and s.timeline[-1][1] == "tcp/8080 http"
    feed(s, udp("10.199.0.53", 53, c, 41000, DNS_ANSWER))  # DNS: names keep coming, never settled
    assert ("udp", 53) not in s.resolved and "db.test" in s._names


def test_port_given_up_after_unknown_flows_and_dns_settled_when_asked():
    s = Sniffer(CaptureLimits(unknown_flows_per_port=3, keep_dns=False), listening=[("tcp", 9000)])
    s.ports = {("tcp", 9000), ("udp", 53)}
    for i in range(2):
        feed(s, tcp("10.0.0.2", 30000 + i, "10.0.0.1", 9000, payload=b"\x01\x02\x03"),
             tcp("10.0.0.1", 9000, "10.0.0.2", 30000 + i, payload=b"\x09\x08"))
    assert s.resolved == {}
    feed(s, tcp("10.0.0.2", 30009, "10.0.0.1", 9000, payload=b"\x01\x02\x03"),
         tcp("10.0.0.1", 9000, "10.0.0.2", 30009, payload=b"\x09\x08"))
    assert s.resolved == {("tcp", 9000): "unknown-tcp"} and s.stats["ports_unknown"] == 1
    query = DNS_ANSWER[:2] + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + DNS_ANSWER[12:24]
    feed(s, udp("10.0.0.2", 41000, "10.0.0.53", 53, query), udp("10.0.0.53", 53, "10.0.0.2", 41000, DNS_ANSWER))
    assert s.resolved[("udp", 53)] == "dns"


def test_watch_all_along_when_not_narrowing():
    s = Sniffer(CaptureLimits(narrow=False), listening=[("tcp", 8080)])
    s.ports = {("tcp", 8080)}
    feed(s, tcp("10.0.0.2", 40000, "10.0.0.1", 8080, payload=b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"),
         tcp("10.0.0.1", 8080, "10.0.0.2", 40000, payload=b"HTTP/1.1 200 OK\r\n\r\n"))
    assert s.resolved == {} and not s._dirty
