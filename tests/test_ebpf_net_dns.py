"""The eBPF net and dns probes: pure parsers (tables) and one live traced run as root.

The live run starts a helper process held on a pipe until both probes are attached; it then resolves a
name from /etc/hosts, connects over loopback (twice), to a closed port, to a server inside a network
namespace the test creates (veth, a 10.199.x.y/30), to a unix socket, sends a UDP datagram, accepts on
three listeners (one opened before tracing began), and forks a child that connects too. An untraced
process does the same connect and lookup at the same time and must not appear.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from asbuilt.probes.base import Context
from asbuilt.probes.ebpf import dns as dnsmod
from asbuilt.probes.ebpf import net as netmod
from asbuilt.probes.procfs.maps import parse_maps

NAME = "asbuilt-db.test"
DB_ADDR = "127.0.0.77"
CACHE_NAME, CACHE_ADDR = "asbuilt-cache.test", "127.0.0.78"  # resolved with gethostbyname


def _subnet():
    """A /30 of this run's own, 10.199.{180-239}.{4-252}/30: other live tests use 10.199.N.0/30, maybe at
    the same time."""
    pid = os.getpid()
    third, base = 180 + pid % 60, 4 + (pid // 60) % 63 * 4
    return f"10.199.{third}.{base + 1}", f"10.199.{third}.{base + 2}"


NS_HOST, NS_PEER = _subnet()
NS_PORT = 7777


# ------------------------------------------------------------------------------ pure parsers
TCP_HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout "
              "inode\n")
TCP_LISTEN_V4 = ("   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 "
                 "12345 1 0000000000000000 100 0 0 10 0\n")
TCP_ESTAB_V4 = ("   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 "
                "23456 1 0000000000000000 20 4 30 10 -1\n")
TCP_LISTEN_V6 = ("   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A "
                 "00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0\n")


@pytest.mark.parametrize("text,family,expected", [
    ("", socket.AF_INET, []),
    (TCP_HEADER, socket.AF_INET, []),
    (TCP_HEADER + TCP_LISTEN_V4, socket.AF_INET,
     [netmod.Listener(inode=12345, family=socket.AF_INET, address="127.0.0.1", port=8080)]),
    (TCP_HEADER + TCP_ESTAB_V4, socket.AF_INET, []),
    (TCP_HEADER + TCP_LISTEN_V6, socket.AF_INET6,
     [netmod.Listener(inode=777, family=socket.AF_INET6, address="::1", port=80)]),
    (TCP_HEADER + TCP_LISTEN_V4[:40], socket.AF_INET, []),  # truncated row
    (TCP_HEADER + TCP_LISTEN_V4.replace("0100007F", "01007F"), socket.AF_INET, []),  # bad address
    (TCP_HEADER + TCP_LISTEN_V4.replace("12345", "x"), socket.AF_INET, []),  # bad inode
    (TCP_HEADER + "garbage\n" + TCP_LISTEN_V4, socket.AF_INET,
     [netmod.Listener(inode=12345, family=socket.AF_INET, address="127.0.0.1", port=8080)]),
])
def test_parse_proc_net_tcp(text, family, expected):
    assert netmod.parse_proc_net_tcp(text, family) == expected


UNIX_HEADER = "Num       RefCount Protocol Flags    Type St Inode Path\n"


@pytest.mark.parametrize("text,expected", [
    ("", []),
    (UNIX_HEADER, []),
    (UNIX_HEADER + "0000000000000000: 00000002 00000000 00010000 0001 01 4242 /run/app.sock\n",
     [netmod.Listener(inode=4242, family=socket.AF_UNIX, address="/run/app.sock")]),
    (UNIX_HEADER + "0000000000000000: 00000002 00000000 00010000 0001 01 4243 @abstract name\n",
     [netmod.Listener(inode=4243, family=socket.AF_UNIX, address="@abstract name")]),
    (UNIX_HEADER + "0000000000000000: 00000003 00000000 00000000 0001 03 4244 /run/app.sock\n", []),  # connected
    (UNIX_HEADER + "0000000000000000: 00000002 00000000 00010000 0001 01 4245\n", []),  # unnamed
    (UNIX_HEADER + "0000000000000000: 00000002 00000000 zz 0001 01 4246 /x\n", []),  # malformed flags
])
def test_parse_proc_net_unix(text, expected):
    assert netmod.parse_proc_net_unix(text) == expected


MAPS = """\
55d0c0a00000-55d0c0a28000 r--p 00000000 fe:01 1311 /usr/bin/python3.11
7f1c2a000000-7f1c2a028000 r--p 00000000 fe:01 2222 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2a028000-7f1c2a19d000 r-xp 00028000 fe:01 2222 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2b000000-7f1c2b010000 r--p 00000000 fe:01 3333 /usr/lib/x86_64-linux-gnu/libcrypt.so.1
7f1c2c000000-7f1c2c010000 r--p 00000000 fe:01 4444 /usr/lib/x86_64-linux-gnu/libc.so.6.bak
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
"""


@pytest.mark.parametrize("text,paths", [
    ("", []),
    (MAPS, ["/usr/lib/x86_64-linux-gnu/libc.so.6"]),
    ("7f00-7f10 r-xp 00000000 08:01 9 /lib/ld-musl-x86_64.so.1\n", ["/lib/ld-musl-x86_64.so.1"]),
    ("7f00-7f10 r-xp 00000000 08:01 9 /lib/libc-2.17.so (deleted)\n", ["/lib/libc-2.17.so"]),
    ("7f00-7f10 r-xp 00001000 08:01 9 /lib/libc.so.6\n", []),  # no offset-0 mapping
    ("7f00-7f10 r-xp 00000000 08:01 9 /usr/bin/static-app\n", []),
])
def test_libc_mappings(text, paths):
    assert [e.path for e in dnsmod.libc_mappings(parse_maps(text))] == paths


# ------------------------------------------------------------------------------------ live run
HELPER = r"""
import ctypes, json, os, socket, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
def say(*words):
    print(*words, flush=True)

# A listener opened before tracing starts: the probe must learn it from /proc.
pre = socket.socket(); pre.bind(("127.0.0.1", 0)); pre.listen(8)
say("PRE", pre.getsockname()[1])
sys.stdin.readline()  # the probes are attached

info = socket.getaddrinfo(cfg["name"], cfg["db_port"], socket.AF_INET, socket.SOCK_STREAM)
addr = info[0][4][0]
libc.gethostbyname.restype = ctypes.c_void_p
assert libc.gethostbyname(cfg["cache_name"].encode())
try:
    socket.getaddrinfo("not-a-number", 80, flags=socket.AI_NUMERICHOST)
except socket.gaierror:
    pass
for _ in range(2):
    socket.create_connection((addr, cfg["db_port"])).close()
try:
    socket.create_connection(("127.0.0.66", cfg["closed_port"]))
except ConnectionRefusedError:
    pass
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.sendto(b"ping", ("127.0.0.99", cfg["udp_port"]))
socket.create_connection((cfg["ns_addr"], cfg["ns_port"]), timeout=5).close()
ux = socket.socket(socket.AF_UNIX); ux.connect(cfg["unix_path"]); ux.close()

a = socket.socket(); a.bind(("127.0.0.1", 0)); a.listen(8)              # port 0: resolved from /proc
b = socket.socket(); b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
b.bind(("127.0.0.1", cfg["b_port"])); b.listen(8)                         # known port: in-kernel
try:
    socket.socket().bind((addr, cfg["db_port"]))                          # the test's server has it
except OSError:
    pass
say("LISTEN", a.getsockname()[1])
conn, peer = a.accept()                       # Python passes a sockaddr
for sock in (b, b, pre):                      # NULL sockaddr: the peer comes from inet_sock_set_state
    fd = libc.accept(sock.fileno(), None, None)
    assert fd >= 0, ctypes.get_errno()
    os.close(fd)
child = os.fork()
if child == 0:
    socket.create_connection((addr, cfg["db_port"])).close()
    os._exit(0)
os.waitpid(child, 0)
say("DONE", child)
sys.stdin.readline()
"""

UNTRACED = r"""
import socket, sys
socket.getaddrinfo(sys.argv[1], 1, socket.AF_INET, socket.SOCK_STREAM)
socket.create_connection((sys.argv[2], int(sys.argv[3]))).close()
"""

NS_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)
print("READY", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""


def _free_port(kind=socket.SOCK_STREAM, host="127.0.0.1"):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _run(*argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)


@pytest.fixture(scope="module")
def hosts_entry():
    """Two test names in /etc/hosts, restored byte for byte afterwards (in place: it may be a mount).

    Should another test have edited the file meanwhile, only our lines are taken out, so neither
    restore undoes the other's.
    """
    with open("/etc/hosts", "rb") as fh:
        original = fh.read()
    added = ("" if original.endswith(b"\n") or not original else "\n").encode() \
        + f"{DB_ADDR} {NAME}\n{CACHE_ADDR} {CACHE_NAME}\n".encode()
    try:
        with open("/etc/hosts", "ab") as fh:
            fh.write(added)
        yield
    finally:
        with open("/etc/hosts", "r+b") as fh:
            now = fh.read()
            if now == original + added:
                restored = original
            else:
                ours = {line for line in added.splitlines() if line}
                restored = b"".join(line for line in now.splitlines(keepends=True)
                                    if line.rstrip(b"\n") not in ours)
            fh.seek(0)
            fh.write(restored)
            fh.truncate()


@pytest.fixture(scope="module")
def netns_server():
    """A TCP server on NS_PEER:7777 inside a namespace joined to the host by a veth /30."""
    tag = os.getpid() % 100000
    ns, host_if, peer_if = f"asbnd{tag}", f"asbnd{tag}h", f"asbnd{tag}p"
    server = None
    try:
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        _run("ip", "link", "set", peer_if, "netns", ns)
        _run("ip", "addr", "add", f"{NS_HOST}/30", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{NS_PEER}/30", "dev", peer_if)
        _run("ip", "netns", "exec", ns, "ip", "link", "set", peer_if, "up")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", NS_SERVER, NS_PEER,
                                  str(NS_PORT)], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "READY"
        yield NS_PEER, NS_PORT
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "link", "del", host_if], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


class _TcpServer:
    """Accepts and closes connections on (host, port) until closed."""

    def __init__(self, host):
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@pytest.fixture(scope="module")
def run(hosts_entry, netns_server, tmp_path_factory):
    """Trace the helper with both probes; return everything the assertions need."""
    db = _TcpServer(DB_ADDR)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.99", 0))
    unix_path = str(tmp_path_factory.mktemp("unix") / "app.sock")
    ux = socket.socket(socket.AF_UNIX)
    ux.bind(unix_path)
    ux.listen(4)
    cfg = {"name": NAME, "cache_name": CACHE_NAME, "db_port": db.port,
           "closed_port": _free_port(host="127.0.0.66"),
           "udp_port": udp.getsockname()[1], "ns_addr": netns_server[0], "ns_port": netns_server[1],
           "unix_path": unix_path, "b_port": _free_port()}
    helper = subprocess.Popen([sys.executable, "-c", HELPER, json.dumps(cfg)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    net, dns = netmod.NetProbe(), dnsmod.DnsProbe()
    ctx = Context()
    clients = []
    out = {"cfg": cfg, "helper": helper.pid, "net": {}, "dns": {}, "ctx": ctx}
    try:
        pre_port = int(helper.stdout.readline().split()[1])
        for probe in (net, dns):
            assert probe.check(ctx) is None
        began = time.monotonic()
        net.start(ctx, [helper.pid], follow_children=True)
        dns.start(ctx, [helper.pid], follow_children=True)
        out["start_seconds"] = time.monotonic() - began
        helper.stdin.write("go\n")
        helper.stdin.flush()
        untraced = subprocess.run([sys.executable, "-c", UNTRACED, NAME, DB_ADDR, str(db.port)], timeout=30)
        assert untraced.returncode == 0
        words = helper.stdout.readline().split()
        assert words[0] == "LISTEN", words
        a_port = int(words[1])
        for source, port in (("127.0.0.88", a_port), ("127.0.0.89", cfg["b_port"]),
                             ("127.0.0.89", cfg["b_port"]), ("127.0.0.90", pre_port)):
            c = socket.socket()
            c.bind((source, 0))
            c.connect(("127.0.0.1", port))
            clients.append(c)
        words = helper.stdout.readline().split()
        assert words[0] == "DONE", words
        out.update(a_port=a_port, pre_port=pre_port, child=int(words[1]))
        for c in clients:
            c.close()
        # Drain until the closes have reached inet_sock_set_state (bounded): each drain returns what
        # changed, so keep the latest observation per fact.
        deadline = time.monotonic() + 5
        while True:
            for probe, key in ((net, "net"), (dns, "dns")):
                for obs in probe.drain():
                    out[key][tuple(v for k, v in vars(obs).items()
                                   if k not in ("count", "closed", "duration_seconds", "last_seen",
                                                "first_seen", "addresses"))] = obs
            closes = sum(o.closed for o in out["net"].values() if o.pid == helper.pid)
            if closes >= 5 or time.monotonic() > deadline:  # 2 to the db, 1 to the namespace, 2 into b
                break
            time.sleep(0.1)
        out["drain_wait"] = round(5 - (deadline - time.monotonic()), 2)
        out["net"] = list(out["net"].values())
        out["dns"] = list(out["dns"].values())
        out["lost"] = net.lost_events + dns.lost_events
        out["compile"] = (net.compile_seconds, dns.compile_seconds, dns.attach_seconds)
        out["libcs"] = list(dns.attached)
        print(f"\nnet compile+attach {net.compile_seconds:.2f}s; dns compile {dns.compile_seconds:.2f}s, "
              f"uprobe attach {dns.attach_seconds:.2f}s; start total {out['start_seconds']:.2f}s")
        yield out
    finally:
        net.stop()
        dns.stop()
        helper.kill()
        helper.wait()
        for c in clients:
            c.close()
        db.close()
        udp.close()
        ux.close()


def _find(obs, **want):
    return [o for o in obs if all(getattr(o, k) == v for k, v in want.items())]


def test_outbound_tcp_peer_counted_once_per_connect(run):
    (o,) = _find(run["net"], pid=run["helper"], direction="outbound", peer_addr=DB_ADDR,
                 peer_port=run["cfg"]["db_port"])
    assert (o.proto, o.family, o.count, o.error, o.closed) == ("tcp", "inet", 2, "", 2)
    assert o.duration_seconds > 0 and o.first_seen <= o.last_seen
    assert abs(o.first_seen - time.time()) < 60


def test_child_followed(run):
    (o,) = _find(run["net"], pid=run["child"], direction="outbound", peer_addr=DB_ADDR)
    assert (o.proto, o.peer_port, o.count) == ("tcp", run["cfg"]["db_port"], 1)


def test_connection_refused_errno(run):
    (o,) = _find(run["net"], pid=run["helper"], peer_port=run["cfg"]["closed_port"])
    assert (o.direction, o.proto, o.peer_addr, o.error, o.count) == ("outbound", "tcp", "127.0.0.66",
                                                                    "ECONNREFUSED", 1)


def test_udp_destination(run):
    (o,) = _find(run["net"], pid=run["helper"], proto="udp", peer_addr="127.0.0.99")
    assert (o.direction, o.peer_port, o.count) == ("outbound", run["cfg"]["udp_port"], 1)


def test_peer_in_network_namespace(run):
    (o,) = _find(run["net"], pid=run["helper"], peer_addr=NS_PEER)
    assert (o.direction, o.proto, o.peer_port, o.count, o.error) == ("outbound", "tcp", NS_PORT, 1, "")


def test_unix_peer(run):
    (o,) = _find(run["net"], pid=run["helper"], proto="unix", peer_addr=run["cfg"]["unix_path"])
    assert (o.direction, o.family, o.count, o.error) == ("outbound", "unix", 1, "")
    # glibc's resolver first tries nscd's socket: absent here, so a failed unix connect.
    nscd = [o for o in _find(run["net"], pid=run["helper"], proto="unix") if "nscd" in o.peer_addr]
    assert all(o.error in ("ENOENT", "ECONNREFUSED") for o in nscd), nscd


def test_inbound_peers(run):
    helper = run["helper"]
    (a,) = _find(run["net"], pid=helper, direction="inbound", peer_addr="127.0.0.88")
    assert (a.proto, a.local_port, a.count) == ("tcp", run["a_port"], 1)  # accept with a sockaddr
    (b,) = _find(run["net"], pid=helper, direction="inbound", peer_addr="127.0.0.89")
    assert (b.proto, b.local_port, b.count) == ("tcp", run["cfg"]["b_port"], 2)  # NULL accept, in kernel
    assert b.closed == 2
    (pre,) = _find(run["net"], pid=helper, direction="inbound", peer_addr="127.0.0.90")
    assert (pre.proto, pre.local_port, pre.count) == ("tcp", run["pre_port"], 1)  # listener seeded from /proc


def test_listen_and_bind(run):
    helper = run["helper"]
    listens = {(o.local_addr, o.local_port, o.proto) for o in _find(run["net"], pid=helper, direction="listen")}
    assert listens == {("127.0.0.1", run["a_port"], "tcp"), ("127.0.0.1", run["cfg"]["b_port"], "tcp")}
    binds = {(o.local_addr, o.local_port) for o in _find(run["net"], pid=helper, direction="bind")}
    assert ("127.0.0.1", run["cfg"]["b_port"]) in binds and ("127.0.0.1", 0) in binds
    (busy,) = _find(run["net"], pid=helper, direction="bind", error="EADDRINUSE")
    assert (busy.local_addr, busy.local_port, busy.count) == (DB_ADDR, run["cfg"]["db_port"], 1)


def test_dns_name_and_answer(run):
    (o,) = _find(run["dns"], pid=run["helper"], name=NAME)
    assert (o.addresses, o.result, o.error, o.count) == ([DB_ADDR], 0, "", 1)
    (bad,) = _find(run["dns"], pid=run["helper"], name="not-a-number")
    assert (bad.addresses, bad.error) == ([], "EAI_NONAME")
    (cache,) = _find(run["dns"], pid=run["helper"], name=CACHE_NAME)  # gethostbyname
    assert (cache.addresses, cache.result, cache.count) == ([CACHE_ADDR], 0, 1)
    assert run["libcs"], "no libc probed"


def test_only_traced_processes_and_nothing_lost(run):
    traced = {run["helper"], run["child"]}
    assert {o.pid for o in run["net"]} <= traced
    assert {o.pid for o in run["dns"]} <= traced
    assert run["lost"] == 0
    assert not [g for g in run["ctx"].coverage.gaps if "pid" in g.subject], run["ctx"].coverage.gaps


def test_compile_and_attach_time(run):
    assert run["start_seconds"] < 30, run["compile"]
