"""Which application protocol a flow speaks, from the first payload bytes of each of its directions.

Pure functions over bytes: :func:`identify` takes what the client sent first and what the server sent
first (a few packets each, concatenated, possibly truncated) and returns an :class:`Identification`:
a protocol name and a few identifying facts. No payload is kept beyond those facts: HTTP paths are
reduced to templates (numeric, UUID and hex segments become ``{id}``, the query string is dropped),
User-Agent and Server headers to their product name, banners to their first line.

Recognised: HTTP/1.x (and the HTTP/2 prior-knowledge preface), TLS (ClientHello SNI, versions, ALPN;
ServerHello's negotiated version and ALPN), PostgreSQL (StartupMessage user/database, SSLRequest,
GSSENCRequest, CancelRequest), MySQL/MariaDB (server greeting), Redis (RESP), memcached (text
protocol), DNS (RFC 1035 messages: questions and A/AAAA/CNAME answers), SSH/SMTP/FTP banners;
anything else is ``unknown-tcp``/``unknown-udp`` with a short fingerprint.

References: RFC 9112 (HTTP/1.1), RFC 8446 (TLS 1.3) §4.1.2/§4.2, PostgreSQL "Frontend/Backend
Protocol" message formats, MySQL "Protocol::HandshakeV10", Redis RESP, memcached protocol.txt,
RFC 1035 §4.1, RFC 4253 §4.2 (SSH identification string), RFC 5321 §4.2 (SMTP replies).
"""
from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

MAX_VALUE = 200  # longest detail value kept
MAX_DNS_ANSWERS = 32

HTTP_METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
                b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"REPORT")
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
TLS_VERSIONS = {0x0300: "SSL 3.0", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1", 0x0303: "TLS 1.2", 0x0304: "TLS 1.3"}
PG_SSL_REQUEST, PG_GSSENC_REQUEST, PG_CANCEL_REQUEST = 80877103, 80877104, 80877102
MEMCACHED_COMMANDS = frozenset((
    b"get", b"gets", b"gat", b"gats", b"set", b"add", b"replace", b"append", b"prepend", b"cas", b"delete",
    b"incr", b"decr", b"touch", b"stats", b"version", b"flush_all", b"verbosity", b"quit", b"mg", b"ms",
    b"md", b"ma", b"mn", b"me", b"lru_crawler", b"slabs", b"watch", b"shutdown", b"cache_memlimit"))
MEMCACHED_REPLIES = (b"VALUE ", b"END\r\n", b"STORED\r\n", b"NOT_STORED\r\n", b"EXISTS\r\n", b"NOT_FOUND\r\n",
                     b"DELETED\r\n", b"TOUCHED\r\n", b"VERSION ", b"STAT ", b"OK\r\n", b"HD", b"EN\r\n", b"VA ")
DNS_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
             64: "SVCB", 65: "HTTPS", 255: "ANY"}
DNS_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}

_ID_SEGMENT = re.compile(
    r"^(\d+|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|"
    r"(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{8,})$")
_TOKEN = re.compile(rb"^[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_PRODUCT = re.compile(r"^[A-Za-z0-9._+-]{1,40}")


@dataclass
class DnsRecord:
    """A name and the addresses an answer gave it (CNAME targets' addresses attributed to the name asked)."""

    name: str
    addresses: List[str] = field(default_factory=list)
    cnames: List[str] = field(default_factory=list)


@dataclass
class Identification:
    protocol: str = ""  # http, http2, tls, postgresql, mysql, redis, memcached, dns, ssh, smtp, ftp, unknown-*
    details: Dict[str, str] = field(default_factory=dict)
    dns: List[DnsRecord] = field(default_factory=list)

    @property
    def known(self) -> bool:
        return bool(self.protocol) and not self.protocol.startswith("unknown")

    @property
    def settled(self) -> bool:
        """Known, and later packets would add nothing (a refused SSLRequest still awaits the startup)."""
        if not self.known:
            return False
        if self.protocol == "postgresql" and "user" not in self.details and "ssl_accepted" in self.details:
            return self.details["ssl_accepted"] == "true"
        return True


# ------------------------------------------------------------------------------------- helpers
def _text(raw: bytes, limit: int = MAX_VALUE) -> str:
    """Printable ASCII of ``raw``, other bytes replaced by '?', at most ``limit`` characters."""
    return "".join(chr(b) if 32 <= b < 127 else "?" for b in raw[:limit])


def _first_line(data: bytes) -> Optional[bytes]:
    end = data.find(b"\n")
    if end < 0:
        return None
    return data[:end].rstrip(b"\r")


def printable_ratio(data: bytes) -> float:
    if not data:
        return 0.0
    good = sum(1 for b in data if 32 <= b < 127 or b in (9, 10, 13))
    return good / len(data)


def fingerprint(data: bytes) -> Dict[str, str]:
    """First up-to-8 bytes as hex and the printable ratio of the first 64: what an unknown flow looks like."""
    return {"first_bytes": data[:8].hex(), "printable": f"{printable_ratio(data[:64]):.2f}"}


def product(value: str) -> str:
    """The product name of a User-Agent/Server header: ``curl/8.1`` → ``curl``; ``Mozilla/5.0 (…)`` → ``Mozilla``."""
    m = _PRODUCT.match(value.strip())
    if not m:
        return ""
    return m.group(0).split("/", 1)[0]


def path_template(target: str) -> str:
    """``/users/42/orders/9f86d081884c7d65?x=1`` → ``/users/{id}/orders/{id}``; absolute-form → its path."""
    if "://" in target:  # absolute-form (proxies): keep only the path
        rest = target.split("://", 1)[1]
        target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
    target = target.split("?", 1)[0].split("#", 1)[0]
    if not target.startswith("/"):
        return _text(target.encode("latin-1", "replace"), 100)
    segments = ["{id}" if _ID_SEGMENT.match(seg) else seg for seg in target.split("/")]
    return _text("/".join(segments).encode("latin-1", "replace"))


def _headers(block: bytes) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for line in block.split(b"\n")[1:]:
        line = line.rstrip(b"\r")
        if not line:
            break
        name, sep, value = line.partition(b":")
        if sep:
            out.setdefault(name.strip().lower().decode("latin-1"), value.strip().decode("latin-1"))
    return out


# ---------------------------------------------------------------------------------------- HTTP
def parse_http_request(data: bytes) -> Optional[Dict[str, str]]:
    """Method, Host, path template and User-Agent product of an HTTP/1.x request, or None."""
    line = _first_line(data) if b"\n" in data[:8192] else None
    if line is None:
        # a request line cut short still names the method when it ends in " HTTP/1." territory
        line = data[:8192]
        if b" HTTP/1." not in line:
            return None
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] not in HTTP_METHODS or not parts[2].startswith(b"HTTP/1."):
        return None
    out = {"method": parts[0].decode(), "version": parts[2].decode("latin-1")[:8]}
    target = parts[1].decode("latin-1")
    if parts[0] == b"CONNECT":
        out["authority"] = _text(parts[1], 100)
    else:
        out["path"] = path_template(target)
    headers = _headers(data[:8192])
    if "host" in headers:
        out["host"] = _text(headers["host"].encode("latin-1"), 100)
    if "user-agent" in headers:
        out["user_agent"] = product(headers["user-agent"])
    return out


def parse_http_response(data: bytes) -> Optional[Dict[str, str]]:
    """Status and Server product of an HTTP/1.x response, or None."""
    if not data.startswith(b"HTTP/1."):
        return None
    line = _first_line(data[:8192]) or data[:64]
    parts = line.split(b" ", 2)
    if len(parts) < 2 or len(parts[1]) != 3 or not parts[1].isdigit():
        return None
    out = {"status": parts[1].decode()}
    server = _headers(data[:8192]).get("server")
    if server:
        out["server"] = product(server)
    return out


# ----------------------------------------------------------------------------------------- TLS
def _tls_handshake(data: bytes) -> Optional[Tuple[int, int, bytes]]:
    """(record version, handshake type, handshake body) of the first TLS handshake record, or None."""
    if len(data) < 6 or data[0] != 0x16 or data[1] != 3 or data[2] > 4:
        return None
    record_version = struct.unpack_from("!H", data, 1)[0]
    # the handshake may span records: join the fragments of consecutive handshake records
    body, off = bytearray(), 0
    while off + 5 <= len(data) and data[off] == 0x16:
        length = struct.unpack_from("!H", data, off + 3)[0]
        body += data[off + 5:off + 5 + length]
        off += 5 + length
    if len(body) < 4:
        return None
    hs_len = int.from_bytes(body[1:4], "big")
    return record_version, body[0], bytes(body[4:4 + hs_len])


def _tls_extensions(body: bytes, off: int) -> Dict[int, bytes]:
    out: Dict[int, bytes] = {}
    if off + 2 > len(body):
        return out
    end = min(len(body), off + 2 + struct.unpack_from("!H", body, off)[0])
    off += 2
    while off + 4 <= end:
        etype, elen = struct.unpack_from("!HH", body, off)
        out.setdefault(etype, body[off + 4:off + 4 + elen])  # may be truncated at the snap length
        off += 4 + elen
    return out


def _grease(v: int) -> bool:
    return (v & 0x0F0F) == 0x0A0A and (v >> 8) == (v & 0xFF)


def _version_name(v: int) -> str:
    return TLS_VERSIONS.get(v, f"0x{v:04x}")


def _alpn(ext: bytes) -> List[str]:
    out, off = [], 2
    while off < len(ext):
        n = ext[off]
        name = ext[off + 1:off + 1 + n]
        if len(name) < n:
            break
        out.append(_text(name, 40))
        off += 1 + n
    return out


def parse_tls_client_hello(data: bytes) -> Optional[Dict[str, str]]:
    """SNI, record/handshake versions, offered versions and ALPN of a ClientHello, or None."""
    hs = _tls_handshake(data)
    if hs is None or hs[1] != 1:
        return None
    record_version, _, body = hs
    out = {"handshake": "client_hello", "record_version": _version_name(record_version)}
    if len(body) < 2:
        return out
    out["handshake_version"] = _version_name(struct.unpack_from("!H", body, 0)[0])
    off = 34
    if off >= len(body):
        return out
    off += 1 + body[off]  # session id
    if off + 2 > len(body):
        return out
    off += 2 + struct.unpack_from("!H", body, off)[0]  # cipher suites
    if off >= len(body):
        return out
    off += 1 + body[off]  # compression methods
    ext = _tls_extensions(body, off)
    sni = ext.get(0)
    if sni and len(sni) >= 5 and sni[2] == 0:
        n = struct.unpack_from("!H", sni, 3)[0]
        name = sni[5:5 + n]
        if len(name) == n:
            out["sni"] = _text(name).lower()
    if 16 in ext:
        out["alpn"] = ",".join(_alpn(ext[16]))
    sv = ext.get(43)
    if sv:
        versions = [struct.unpack_from("!H", sv, i)[0] for i in range(1, min(len(sv), 1 + sv[0]) - 1, 2)]
        versions = [v for v in versions if not _grease(v)]
        if versions:
            out["versions"] = ",".join(_version_name(v) for v in versions)
    return out


def parse_tls_server_hello(data: bytes) -> Optional[Dict[str, str]]:
    """The negotiated version and ALPN of a ServerHello, or None (TLS 1.3 sends ALPN encrypted: absent)."""
    hs = _tls_handshake(data)
    if hs is None or hs[1] != 2:
        return None
    _, _, body = hs
    out = {"handshake": "server_hello"}
    if len(body) < 2:
        return out
    version = struct.unpack_from("!H", body, 0)[0]
    off = 34
    if off < len(body):
        off += 1 + body[off] + 2 + 1  # session id, cipher suite, compression method
        ext = _tls_extensions(body, off)
        if len(ext.get(43, b"")) == 2:
            version = struct.unpack_from("!H", ext[43], 0)[0]
        if 16 in ext:
            out["alpn_selected"] = ",".join(_alpn(ext[16]))
    out["version"] = _version_name(version)
    return out


# -------------------------------------------------------------------------------- PostgreSQL
def parse_postgres_startup(data: bytes) -> Optional[Dict[str, str]]:
    """User and database of a StartupMessage (v3), or the SSL/GSSENC/Cancel request, or None."""
    if len(data) < 8:
        return None
    length, code = struct.unpack_from("!II", data, 0)
    if code == PG_SSL_REQUEST and length == 8:
        out = {"ssl_request": "true"}
        rest = data[8:]  # after a refused SSLRequest ('N'), the startup message follows
        more = parse_postgres_startup(rest) if rest else None
        if more:
            out.update(more)
        return out
    if code == PG_GSSENC_REQUEST and length == 8:
        return {"gssenc_request": "true"}
    if code == PG_CANCEL_REQUEST and length == 16:
        return {"cancel_request": "true"}
    if code >> 16 != 3 or length < 9 or length > 10000:
        return None
    out = {"protocol_version": f"{code >> 16}.{code & 0xFFFF}"}
    fields = data[8:length].split(b"\0")
    if length > len(data):  # truncated: drop the partial last field
        fields = fields[:-1]
    params = {}
    for i in range(0, len(fields) - 1, 2):
        if not fields[i]:
            break
        params[fields[i].decode("latin-1")] = fields[i + 1]
    for key in ("user", "database", "application_name", "replication"):
        if key in params:
            out[key] = _text(params[key], 100)
    if "user" not in out and len(fields) < 2:
        return None
    return out


# ------------------------------------------------------------------------------------- MySQL
def parse_mysql_greeting(data: bytes) -> Optional[Dict[str, str]]:
    """Protocol and server version of a MySQL/MariaDB HandshakeV10 greeting, or None."""
    if len(data) < 6 or data[3] != 0 or data[4] not in (9, 10):
        return None
    length = int.from_bytes(data[0:3], "little")
    if length < 2 or length > 1024:
        return None
    end = data.find(b"\0", 5, 5 + 128)
    if end < 0:
        return None
    version = data[5:end]
    if not version or printable_ratio(version) < 1.0 or not version[:1].isdigit():
        return None
    out = {"protocol_version": str(data[4]), "server_version": _text(version, 100)}
    out["flavor"] = "mariadb" if b"mariadb" in version.lower() else "mysql"
    return out


# ------------------------------------------------------------------------------ Redis / memcached
def parse_resp_command(data: bytes) -> Optional[Dict[str, str]]:
    """The first command of a RESP request (``*2\\r\\n$3\\r\\nGET\\r\\n…``), or None."""
    if not data.startswith(b"*"):
        return None
    lines = data.split(b"\r\n", 3)
    if len(lines) < 3 or not lines[0][1:].isdigit() or not lines[1].startswith(b"$") \
            or not lines[1][1:].isdigit():
        return None
    name = lines[2][:int(lines[1][1:])]
    if not name or not _TOKEN.match(name):
        return None
    return {"command": _text(name, 40).upper()}


def _resp_reply(data: bytes) -> bool:
    return data[:1] in (b"+", b"-", b":", b"$", b"*", b"%", b"_", b">", b"#", b",", b"|", b"~") \
        and b"\r\n" in data[:512]


def parse_memcached_command(data: bytes) -> Optional[Dict[str, str]]:
    """The first command of a memcached text-protocol request, or None."""
    line = _first_line(data[:2048])
    if not line:
        return None
    word = line.split(b" ", 1)[0]
    if word not in MEMCACHED_COMMANDS:
        return None
    return {"command": word.decode()}


# ---------------------------------------------------------------------------------------- DNS
def _dns_name(msg: bytes, off: int) -> Tuple[str, int]:
    """Decode a (possibly compressed) name at ``off``; returns (name, offset after it). Raises ValueError."""
    labels: List[str] = []
    end = -1
    jumps = 0
    while True:
        if off >= len(msg):
            raise ValueError("name runs past the message")
        n = msg[off]
        if n & 0xC0 == 0xC0:
            if off + 1 >= len(msg) or jumps > 32:
                raise ValueError("bad compression pointer")
            if end < 0:
                end = off + 2
            off = ((n & 0x3F) << 8) | msg[off + 1]
            jumps += 1
            continue
        if n & 0xC0:
            raise ValueError("bad label type")
        off += 1
        if n == 0:
            break
        if off + n > len(msg):
            raise ValueError("label runs past the message")
        labels.append(_text(msg[off:off + n], 63))
        off += n
    name = ".".join(labels).lower()
    if len(name) > 253:
        raise ValueError("name too long")
    return name or ".", (end if end >= 0 else off)


def parse_dns(msg: bytes) -> Optional[Tuple[Dict[str, str], List[DnsRecord]]]:
    """Question and A/AAAA/CNAME answers of a DNS message; None when it is not one."""
    if len(msg) < 12:
        return None
    _id, flags, qd, an, _ns, _ar = struct.unpack_from("!HHHHHH", msg, 0)
    if (flags >> 11) & 0xF not in (0, 1, 2, 4, 5) or qd == 0 or qd > 4:  # opcode; at least one question
        return None
    try:
        off = 12
        qname, off = _dns_name(msg, off)
        if off + 4 > len(msg):
            return None
        qtype = struct.unpack_from("!H", msg, off)[0]
        off += 4
        for _ in range(qd - 1):
            _, off = _dns_name(msg, off)
            off += 4
        response = bool(flags & 0x8000)
        details = {"query": qname, "qtype": DNS_TYPES.get(qtype, str(qtype)),
                   "message": "response" if response else "query"}
        if not response:
            return details, []
        details["rcode"] = DNS_RCODES.get(flags & 0xF, str(flags & 0xF))
        cname_of: Dict[str, str] = {}
        addrs: Dict[str, List[str]] = {}
        for _ in range(min(an, MAX_DNS_ANSWERS)):
            name, off = _dns_name(msg, off)
            if off + 10 > len(msg):
                break
            rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", msg, off)
            off += 10
            rdata = msg[off:off + rdlen]
            if len(rdata) < rdlen:
                break
            if rtype == 1 and rdlen == 4:
                addrs.setdefault(name, []).append(str(ipaddress.IPv4Address(rdata)))
            elif rtype == 28 and rdlen == 16:
                addrs.setdefault(name, []).append(str(ipaddress.IPv6Address(rdata)))
            elif rtype == 5:
                cname_of[name], _ = _dns_name(msg, off)
            off += rdlen
    except (ValueError, struct.error):
        return None
    records = []
    if response and (addrs or cname_of):
        # follow the CNAME chain from the question to the addresses at its end
        chain, name = [], qname
        while name in cname_of and len(chain) < 16:
            name = cname_of[name]
            chain.append(name)
        found = list(addrs.get(name, []))
        records.append(DnsRecord(name=qname, addresses=found, cnames=chain))
        for other, values in addrs.items():
            if other != qname:
                records.append(DnsRecord(name=other, addresses=list(values)))
    return details, records


# ----------------------------------------------------------------------------------- banners
def parse_banner(data: bytes) -> Optional[Tuple[str, Dict[str, str]]]:
    """(protocol, {"banner": first line}) for SSH identification strings and 220 greetings, else None."""
    line = _first_line(data[:1024])
    if line is None:
        return None
    if line.startswith(b"SSH-") and printable_ratio(line) == 1.0:
        return "ssh", {"banner": _text(line)}
    if line[:4] in (b"220 ", b"220-") and printable_ratio(line) == 1.0:
        upper = line.upper()
        proto = "ftp" if b"FTP" in upper else "smtp" if b"SMTP" in upper or b"MAIL" in upper else ""
        return proto or "smtp-or-ftp", {"banner": _text(line)}
    return None


# ------------------------------------------------------------------------------------ identify
def identify(proto: str, client: bytes, server: bytes, server_port: int = 0) -> Identification:
    """What protocol a flow speaks, from the first bytes the client sent and the first the server sent.

    ``proto`` is ``tcp`` or ``udp``; ``server_port`` breaks ties between look-alikes (Redis inline vs
    memcached, SMTP vs FTP). Either side may be empty or truncated.
    """
    if proto == "udp":
        return _identify_udp(client, server, server_port)
    if not client and not server:
        return Identification()
    got = _identify_tcp(client, server, server_port)
    if got is not None:
        return got
    sample, side = (client, "client") if client else (server, "server")
    details = fingerprint(sample)
    details["from"] = side
    return Identification("unknown-tcp", details)


def _identify_udp(client: bytes, server: bytes, server_port: int) -> Identification:
    if server_port in (53, 5353, 5355) or not (client or server):
        details: Dict[str, str] = {}
        records: List[DnsRecord] = []
        for data in (client, server):
            parsed = parse_dns(data) if data else None
            if parsed:
                details.update(parsed[0])
                records.extend(parsed[1])
        if details:
            return Identification("dns", details, records)
    if not client and not server:
        return Identification()
    sample, side = (client, "client") if client else (server, "server")
    details = fingerprint(sample)
    details["from"] = side
    return Identification("unknown-udp", details)


def _identify_tcp(client: bytes, server: bytes, server_port: int) -> Optional[Identification]:
    # TLS
    hello = parse_tls_client_hello(client) if client else None
    shello = parse_tls_server_hello(server) if server else None
    if hello or shello:
        details = dict(hello or {})
        details.pop("handshake", None)
        if shello:
            details["version"] = shello["version"]
            if "alpn_selected" in shello:
                details["alpn_selected"] = shello["alpn_selected"]
        return Identification("tls", details)
    # HTTP
    if client.startswith(HTTP2_PREFACE[:min(len(client), len(HTTP2_PREFACE))]) and len(client) >= 16:
        return Identification("http2", {"mode": "prior-knowledge"})
    req = parse_http_request(client) if client else None
    resp = parse_http_response(server) if server else None
    if req or resp:
        details = dict(req or {})
        details.update(resp or {})
        return Identification("http", details)
    # banners: SSH either side, SMTP/FTP from the server
    for data in (server, client):
        banner = parse_banner(data) if data else None
        if banner and (banner[0] == "ssh" or data is server):
            name, details = banner
            if name == "smtp-or-ftp":
                name = "ftp" if server_port in (21, 990) else "smtp"
            return Identification(name, details)
    # PostgreSQL
    pg = parse_postgres_startup(client) if client else None
    if pg:
        if server[:1] in (b"S", b"N") and "ssl_request" in pg:
            pg["ssl_accepted"] = "true" if server[:1] == b"S" else "false"
        return Identification("postgresql", pg)
    # MySQL / MariaDB: the server speaks first
    my = parse_mysql_greeting(server) if server else None
    if my:
        return Identification("mysql", my)
    # Redis (RESP arrays; inline commands only on Redis's port or with a RESP reply)
    resp_cmd = parse_resp_command(client) if client else None
    if resp_cmd:
        return Identification("redis", resp_cmd)
    mc = parse_memcached_command(client) if client else None
    if mc or (server and server.startswith(MEMCACHED_REPLIES)):
        redis_inline = server_port == 6379 or (server and _resp_reply(server) and
                                               not server.startswith(MEMCACHED_REPLIES))
        if redis_inline:
            line = _first_line(client[:2048]) or b""
            word = line.split(b" ", 1)[0]
            return Identification("redis", {"command": _text(word, 40).upper()} if word else {})
        return Identification("memcached", mc or {})
    if client and server_port == 6379 and _resp_reply(server or b""):
        word = (_first_line(client[:2048]) or b"").split(b" ", 1)[0]
        if _TOKEN.match(word or b"?"):
            return Identification("redis", {"command": _text(word, 40).upper()})
    return None
