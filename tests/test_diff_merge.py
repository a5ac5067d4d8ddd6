"""``asbuilt diff`` and ``asbuilt merge`` on real profiles (a real scan and trace of this host, plus a second
real scan taken here after starting new listeners) and on hand-built edge cases (IPv6, network
namespaces, 500 peers, no packages, duplicate hostnames, fleets of fleets, bad input)."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import re
import subprocess
import sys
import time

import pytest

from asbuilt.agent.diff import SECTIONS, diff_profiles, render_diff
from asbuilt.agent.fleet import merge_profiles, outside_fleet
from asbuilt.agent.model import (Address, FileRef, Host, Kernel, NetNamespace, Nic, OsRelease, Package, Peer,
                                 Process, Profile, Socket)
from asbuilt.agent.store import load_profile
from asbuilt.exporters.files import write_profile

PY = "/usr/bin/python3"
SIGN = {"removed": "-", "added": "+", "changed": "~"}

# Listens (no traffic is ever sent to it) on 127.0.0.1:0 and 0.0.0.0:0 and prints both ports.
LISTENER = r"""
import socket, time
a = socket.socket(); a.bind(("127.0.0.1", 0)); a.listen()
b = socket.socket(); b.bind(("0.0.0.0", 0)); b.listen()
print(a.getsockname()[1], b.getsockname()[1], flush=True)
time.sleep(120)
"""


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "asbuilt.agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def text_of(result) -> str:
    import io

    buf = io.StringIO()
    render_diff(result, buf)
    return buf.getvalue()


def assert_same_facts(doc: dict, text: str) -> None:
    """The JSON and the text rendering of one diff say the same thing."""
    lines = [ln.strip() for ln in text.splitlines()]
    for section in SECTIONS:
        for ch in doc["sections"][section]:
            if section == "libraries":
                continue  # summarised in text
            prefix = f"{SIGN[ch['change']]} {ch['item']}"
            assert any(ln.startswith(prefix) for ln in lines), (prefix, text)
            if ch["change"] == "changed":
                for name, old in ch["old"].items():
                    old_s = ",".join(map(str, old)) if isinstance(old, list) else str(old)
                    assert any(ln.startswith(prefix) and old_s in ln for ln in lines), (name, old_s, text)
    s = doc["summary"]
    last = lines[-1]
    if doc["empty"]:
        assert last == "no differences"
    else:
        assert last == f"{s['removed']} removed, {s['added']} added, {s['changed']} changed"


def changes(doc: dict, section: str, change: str = ""):
    return [c for c in doc["sections"][section] if not change or c["change"] == change]


# ------------------------------------------------------------------------- real profiles
@pytest.fixture(scope="module")
def second_scan(real_profiles, tmp_path_factory):
    """A real scan taken after starting a process that listens on 127.0.0.1:P1 and 0.0.0.0:P2."""
    base = tmp_path_factory.mktemp("diff")
    proc = subprocess.Popen([PY, "-u", "-c", LISTENER], stdout=subprocess.PIPE, text=True)
    try:
        lo_port, any_port = map(int, proc.stdout.readline().split())
        path = base / "scan2.msgpack"
        r = cli("scan", "-o", str(path), "-q")
        assert r.returncode == 0, r.stderr
    finally:
        proc.kill()
        proc.wait()
    return {"path": str(path), "lo_port": lo_port, "any_port": any_port, "pid": proc.pid, "base": base}


def test_diff_scan_with_itself_is_empty(real_profiles):
    r = cli("diff", real_profiles["scan"], real_profiles["scan"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().splitlines()[-1] == "no differences"
    r = cli("diff", "--json", real_profiles["trace"], real_profiles["trace"])
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["empty"] is True and all(doc["sections"][s] == [] for s in SECTIONS)
    assert doc["summary"] == {"removed": 0, "added": 0, "changed": 0}


def test_diff_finds_a_new_real_listener(real_profiles, second_scan):
    old, new = real_profiles["scan"], second_scan["path"]
    r = cli("diff", old, new)
    assert r.returncode == 1, r.stderr
    text = r.stdout
    lo, anyp = second_scan["lo_port"], second_scan["any_port"]
    assert re.search(rf"^  \+ tcp {lo}  bind 127\.0\.0\.1 ", text, re.M), text
    assert re.search(rf"^  \+ tcp {anyp}  bind 0\.0\.0\.0 ", text, re.M), text

    rj = cli("diff", "--json", old, new)
    assert rj.returncode == 1, rj.stderr
    doc = json.loads(rj.stdout)
    added = {c["key"]["port"]: c for c in changes(doc, "listeners", "added")}
    assert added[lo]["new"]["addresses"] == ["127.0.0.1"]
    assert added[anyp]["new"]["addresses"] == ["0.0.0.0"]
    listener = next(p for p in load_profile(new).processes if p.pid == second_scan["pid"])
    assert added[lo]["new"]["processes"] == [listener.identity]
    # the listening process itself is new (the fixture's server is gone, so its listener is removed)
    assert any(c["item"] == listener.identity for c in changes(doc, "processes", "added"))
    assert any(c["key"]["port"] == real_profiles["port"] for c in changes(doc, "listeners", "removed"))
    assert_same_facts(doc, text)
    # deterministic: the same bytes twice
    assert cli("diff", "--json", old, new).stdout == rj.stdout


def test_diff_narrowed_to_a_process(real_profiles, second_scan):
    new = load_profile(second_scan["path"])
    listener = next(p for p in new.processes if p.pid == second_scan["pid"])
    r = cli("diff", "--json", "--process", f"pid:{second_scan['pid']}", real_profiles["scan"], second_scan["path"])
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    # only that process (missing from the old scan: not an error) and its two listeners
    assert [c["item"] for c in doc["sections"]["processes"]] == [listener.identity]
    assert sorted(c["key"]["port"] for c in doc["sections"]["listeners"]) == sorted(
        [second_scan["lo_port"], second_scan["any_port"]])
    assert doc["process"] == f"pid:{second_scan['pid']}"


def test_diff_package_version_change(real_profiles, tmp_path):
    old = load_profile(real_profiles["scan"])
    assert old.packages, "the real scan knows the packages in use"
    new = copy.deepcopy(old)
    pkg = new.packages[0]
    before = pkg.version
    pkg.version = before + "+asbuilt1"
    gone = new.packages.pop()
    new.packages.append(Package(name="asbuilt-test-pkg", version="1.0", architecture="all", manager="dpkg"))
    path = tmp_path / "new.json"
    write_profile(new, str(path))
    r = cli("diff", real_profiles["scan"], str(path))
    assert r.returncode == 1, r.stderr
    assert f"  ~ {pkg.name}: version {before} -> {before}+asbuilt1\n" in r.stdout
    assert f"  - {gone.name} {gone.version}\n" in r.stdout
    assert "  + asbuilt-test-pkg 1.0\n" in r.stdout
    assert r.stdout.rstrip().endswith("1 removed, 1 added, 1 changed")
    doc = json.loads(cli("diff", "--json", real_profiles["scan"], str(path)).stdout)
    (ch,) = changes(doc, "packages", "changed")
    assert ch["item"] == pkg.name and ch["old"] == {"version": [before]} and ch["new"] == {
        "version": [before + "+asbuilt1"]}
    assert_same_facts(doc, r.stdout)


def test_diff_ignores_ephemeral_client_ports_and_volatile_fields(real_profiles, tmp_path):
    old = load_profile(real_profiles["trace"])
    server = next(p for p in old.processes if p.pid == real_profiles["server_pid"])
    inbound = [p for p in server.peers if p.direction == "inbound"]
    assert inbound, "the real trace saw the client's connections"
    new = copy.deepcopy(old)
    rnd = random.Random(7)
    for proc in new.processes:
        proc.pid += 1000
        proc.ppid += 1000
        proc.start_time += 3600
        proc.cpu_seconds += 5
        proc.rss_bytes *= 2
        proc.fd_count += 3
        proc.syscalls = {k: v * 2 for k, v in proc.syscalls.items()}
        for peer in proc.peers:
            if peer.direction == "inbound":
                peer.port = rnd.randint(32768, 60999)  # the client's ephemeral port
            peer.connections += 10
            peer.bytes_sent = (peer.bytes_sent or 0) + 100
            peer.first_seen += 60
            peer.last_seen += 60
        for f in proc.files:
            f.count += 5
            f.last_seen += 60
        proc.peers += [dataclasses.replace(p, port=rnd.randint(32768, 60999))
                       for p in proc.peers if p.direction == "inbound"]
        rnd.shuffle(proc.peers)
    new.processes.reverse()
    path = tmp_path / "new.msgpack"
    write_profile(new, str(path))
    r = cli("diff", real_profiles["trace"], str(path))
    assert r.returncode == 0, r.stdout
    assert r.stdout.rstrip().endswith("no differences")

    # a new client address, though, is a difference
    new2 = copy.deepcopy(new)
    srv = next(p for p in new2.processes if p.identity == server.identity)
    srv.peers.append(Peer(address="127.0.0.9", port=40000, proto="tcp", direction="inbound",
                          local_port=real_profiles["port"]))
    res = diff_profiles(old, new2)
    assert [c.item for c in res.sections["peers"]] == [f"inbound tcp 127.0.0.9 -> :{real_profiles['port']}"]
    assert res.sections["peers"][0].process == server.identity
    # the same client seen as an IPv4-mapped IPv6 address is the same peer
    for peer in srv.peers:
        if peer.address == "127.0.0.1":
            peer.address = "::ffff:127.0.0.1"
    assert [c.item for c in diff_profiles(old, new2).changes] == [
        f"inbound tcp 127.0.0.9 -> :{real_profiles['port']}"]


def test_diff_process_selector_on_the_trace(real_profiles, tmp_path):
    old = load_profile(real_profiles["trace"])
    server = next(p for p in old.processes if p.pid == real_profiles["server_pid"])
    new = copy.deepcopy(old)
    srv = next(p for p in new.processes if p.identity == server.identity)
    srv.files.append(FileRef(path="/etc/app/extra.conf", kind="config", mode="r"))
    new.processes.append(Process(pid=4242, name="nginx", exe="/usr/sbin/nginx", cmdline=["nginx"],
                                 identity="nginx.service:/usr/sbin/nginx:00000000", systemd_unit="nginx.service",
                                 sockets=[Socket(proto="tcp", state="LISTEN", local_address="0.0.0.0",
                                                 local_port=80)]))
    path = tmp_path / "new.json"
    write_profile(new, str(path))
    everything = json.loads(cli("diff", "--json", real_profiles["trace"], str(path)).stdout)
    assert [c["item"] for c in everything["sections"]["files"]] == ["config /etc/app/extra.conf"]
    assert [c["key"]["port"] for c in everything["sections"]["listeners"]] == [80]

    r = cli("diff", "--json", "-p", "nginx", real_profiles["trace"], str(path))
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert [c["item"] for c in doc["sections"]["processes"]] == ["nginx.service:/usr/sbin/nginx:00000000"]
    assert doc["sections"]["files"] == [] and [c["key"]["port"] for c in doc["sections"]["listeners"]] == [80]

    r = cli("diff", "--json", "-p", f"identity:{server.identity}", real_profiles["trace"], str(path))
    doc = json.loads(r.stdout)
    assert doc["sections"]["processes"] == [] and doc["sections"]["listeners"] == []
    assert [c["item"] for c in doc["sections"]["files"]] == ["config /etc/app/extra.conf"]

    for bad in ("name:no-such-process-anywhere", "bogus:x"):
        r = cli("diff", "-p", bad, real_profiles["trace"], str(path))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("asbuilt: "), r.stderr


# ------------------------------------------------------------------------- merge, real
def first_address(host: Host) -> str:
    for nic in host.nics:
        for a in nic.addresses:
            if a.family == "inet" and not a.address.startswith("127."):
                return a.address
    return ""


def test_merge_real_hosts(second_scan, tmp_path):
    a = load_profile(second_scan["path"])
    a_addr = first_address(a.host)
    if not a_addr:  # a host without a routable address: give its profile one (documentation range)
        a.host.nics.append(Nic(name="eth9", addresses=[Address(address="192.0.2.77", prefixlen=24,
                                                               family="inet")]))
        a_addr = "192.0.2.77"
        write_profile(a, str(tmp_path / "a.msgpack"))
        a_path = str(tmp_path / "a.msgpack")
    else:
        a_path = second_scan["path"]
    listener = next(p for p in a.processes if p.pid == second_scan["pid"])
    b = copy.deepcopy(a)
    b.host.hostname, b.host.machine_id = "host-b", "b" * 32
    for nic in b.host.nics:
        nic.addresses = [x for x in nic.addresses if x.address in ("127.0.0.1", "::1")]
    b.host.nics.append(Nic(name="ens5", addresses=[Address(address="198.51.100.20", prefixlen=24, family="inet")]))
    client = b.processes[0]
    client.peers = [
        Peer(address=a_addr, port=second_scan["any_port"], proto="tcp", direction="outbound"),
        Peer(address="::ffff:" + a_addr, port=second_scan["any_port"], proto="tcp", direction="outbound"),
        Peer(address=a_addr, port=second_scan["lo_port"], proto="tcp", direction="outbound"),  # bound to lo
        Peer(address="203.0.113.9", port=443, proto="tcp", direction="outbound"),
        Peer(address="127.0.0.1", port=second_scan["lo_port"], proto="tcp", direction="outbound"),
    ]
    b_path = str(tmp_path / "b.json")
    write_profile(b, b_path)
    fleet_path = str(tmp_path / "fleet.msgpack")
    r = cli("merge", a_path, b_path, "-o", fleet_path)
    assert r.returncode == 0, r.stderr
    assert "2 hosts" in r.stderr
    fleet = load_profile(fleet_path)
    assert fleet.mode == "fleet" and fleet.host.hostname == "fleet"
    assert [h.hostname for h in fleet.hosts] == [a.host.hostname, "host-b"]
    assert {p.host for p in fleet.processes} == {a.host.hostname, "host-b"}
    assert len(fleet.processes) == 2 * len(a.processes)
    fclient = next(p for p in fleet.processes if p.host == "host-b" and p.pid == client.pid)
    got = [(p.address, p.port, p.host, p.process) for p in fclient.peers]
    assert got == [
        (a_addr, second_scan["any_port"], a.host.hostname, listener.identity),
        ("::ffff:" + a_addr, second_scan["any_port"], a.host.hostname, listener.identity),
        (a_addr, second_scan["lo_port"], a.host.hostname, ""),  # 127.0.0.1-bound: host A, no listener
        ("203.0.113.9", 443, "", ""),
        ("127.0.0.1", second_scan["lo_port"], "host-b", listener.identity),  # loopback: host-b's own copy
    ]
    outside = outside_fleet(fleet)
    ext = next(o for o in outside if o.target == "203.0.113.9")
    assert (ext.port, ext.proto) == (443, "tcp")
    assert ext.clients == (("host-b", client.identity),)
    assert all(o.target != "127.0.0.1" for o in outside)
    # packages: the same packages on both hosts, merged once with both hostnames
    assert fleet.packages and len(fleet.packages) == len(a.packages)
    for pkg in fleet.packages:
        assert pkg.hosts == sorted([a.host.hostname, "host-b"])
        orig = next(x for x in a.packages if x.name == pkg.name and x.version == pkg.version)
        assert set(orig.used_by) <= set(pkg.used_by)
    # coverage per host, prefixed
    assert {r.name.split(":", 1)[0] for r in fleet.coverage.probes} == {a.host.hostname, "host-b"}
    assert fleet.coverage.mode == "fleet"

    # the same host twice: both kept, told apart, and a duplicate-host gap
    dup_path = str(tmp_path / "dup.json")
    r = cli("merge", a_path, a_path, "-o", dup_path)
    assert r.returncode == 0, r.stderr
    dup = load_profile(dup_path)
    names = [h.hostname for h in dup.hosts]
    assert len(names) == 2 and len(set(names)) == 2 and names[0] == a.host.hostname
    assert [g.subject for g in dup.coverage.gaps if g.kind == "duplicate-host"] == [a.host.hostname]

    # a fleet merged with one more host: flattened, peers resolved afresh across all three
    c = copy.deepcopy(b)
    c.host.hostname, c.host.machine_id = "host-c", "c" * 32
    c.host.nics[-1].addresses = [Address(address="198.51.100.30", prefixlen=24, family="inet")]
    for p in c.processes:
        p.peers = []
    c.processes[1].peers = [Peer(address="198.51.100.20", port=second_scan["any_port"], proto="tcp",
                                 direction="outbound")]
    c_path = str(tmp_path / "c.msgpack")
    write_profile(c, c_path)
    big_path = str(tmp_path / "fleet3.json")
    r = cli("merge", fleet_path, c_path, "-o", big_path)
    assert r.returncode == 0, r.stderr
    big = load_profile(big_path)
    assert [h.hostname for h in big.hosts] == [a.host.hostname, "host-b", "host-c"]
    cpeer = next(p for p in big.processes if p.host == "host-c" and p.pid == c.processes[1].pid).peers[0]
    assert (cpeer.host, cpeer.process) == ("host-b", listener.identity)
    assert sorted(h for pkg in big.packages for h in pkg.hosts) == sorted(
        [a.host.hostname, "host-b", "host-c"] * len(big.packages))
    assert not [g for g in big.coverage.gaps if g.kind == "duplicate-host"]
    # and diff understands fleets: host-c is what the bigger fleet adds
    res = diff_profiles(fleet, big)
    assert res.sections["processes"] and all(c.change == "added" and c.item.startswith("host-c/")
                                             for c in res.sections["processes"])


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("content", [
    b"this is not a profile\n",
    json.dumps({"kind": "asbuilt-profile", "schema_version": 99}).encode(),
    json.dumps({"kind": "something-else", "schema_version": 1}).encode(),
    "truncated",
    b"",
])
def test_bad_input_is_one_line(real_profiles, tmp_path, content):
    bad = tmp_path / "bad.bin"
    if content == "truncated":
        raw = open(real_profiles["scan"], "rb").read()
        content = raw[: len(raw) // 2]
    bad.write_bytes(content)
    for args in (["diff", real_profiles["scan"], str(bad)], ["diff", "--json", str(bad), real_profiles["scan"]],
                 ["merge", real_profiles["scan"], str(bad), "-o", str(tmp_path / "f.json")]):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("asbuilt: "), r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "f.json").exists()
    r = cli("diff", str(tmp_path / "missing.json"), real_profiles["scan"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1


# ------------------------------------------------------------------------ hand-built edges
def host(name, *addrs, machine_id="", netns=()):
    return Host(hostname=name, machine_id=machine_id, os=OsRelease(id="debian", version_id="12",
                                                                     pretty_name="Debian GNU/Linux 12"),
                kernel=Kernel(release="6.1.0-18-amd64", machine="x86_64"),
                nics=[Nic(name="lo", addresses=[Address(address="127.0.0.1", prefixlen=8, family="inet"),
                                                Address(address="::1", prefixlen=128, family="inet6")]),
                      Nic(name="eth0", addresses=[Address(address=a, family="inet6" if ":" in a else "inet")
                                                  for a in addrs])],
                netns=list(netns))


def listen(proto, address, port, netns=0):
    return Socket(proto=proto, family="inet6" if ":" in address else "inet", state="LISTEN" if proto == "tcp" else
                  "UNCONN", local_address=address, local_port=port, netns=netns)


def proc(pid, name, identity=None, **kw):
    exe = kw.pop("exe", f"/usr/sbin/{name}")
    return Process(pid=pid, name=name, exe=exe, cmdline=[name], user=kw.pop("user", "root"),
                   identity=identity or f"{name}.service:{exe}:{pid:08x}", **kw)


def test_merge_ipv6_and_netns_and_names():
    db = proc(10, "postgres", sockets=[listen("tcp", "::", 5432)])
    cache = proc(11, "redis", sockets=[listen("tcp", "::1", 6379), listen("tcp", "2001:db8::10", 6380)])
    inner = proc(12, "app", netns=4026532999, sockets=[listen("tcp", "0.0.0.0", 8080, netns=4026532999)])
    local = proc(13, "worker", peers=[Peer(address="::1", port=6379, proto="tcp", direction="outbound")])
    x = Profile(host=host("x", "2001:db8::10", "192.0.2.10",
                          netns=[NetNamespace(inode=4026532999, name="app", nics=[Nic(name="veth0", addresses=[
                              Address(address="10.200.0.2", prefixlen=24, family="inet")])])]),
                processes=[db, cache, inner, local])
    client = proc(20, "api", peers=[
        Peer(address="2001:db8::10", port=5432, proto="tcp", direction="outbound", names=["db.example"]),
        Peer(address="192.0.2.10", port=5432, proto="tcp", direction="outbound"),  # "::" is dual-stack
        Peer(address="::1", port=6379, proto="tcp", direction="outbound"),  # y's own loopback: nothing there
        Peer(address="2001:db8::10", port=6380, proto="tcp", direction="outbound"),
        Peer(address="2001:db8::10", port=6379, proto="tcp", direction="outbound"),  # ::1-only listener
        Peer(address="10.200.0.2", port=8080, proto="tcp", direction="outbound"),  # x's netns
        Peer(address="", port=5432, proto="tcp", direction="outbound", names=["x.corp.example"]),
        Peer(address="2001:db8:ffff::1", port=443, proto="tcp", direction="outbound", names=["api.example"]),
    ])
    y = Profile(host=host("y", "2001:db8::20"), processes=[client])
    db.peers = [Peer(address="2001:db8::20", port=51234, proto="tcp", direction="inbound", local_port=5432)]
    fleet = merge_profiles([x, y], sources=["x.json", "y.json"])
    assert x.processes[0].host == "" and x.host.hostname == "x"  # inputs untouched
    res = {(p.address, p.port): (p.host, p.process) for p in fleet.processes[-1].peers}
    assert res[("2001:db8::10", 5432)] == ("x", db.identity)
    assert res[("192.0.2.10", 5432)] == ("x", db.identity)
    assert res[("::1", 6379)] == ("y", "")  # loopback: y's own, where nothing listens
    assert res[("2001:db8::10", 6380)] == ("x", cache.identity)
    assert res[("2001:db8::10", 6379)] == ("x", "")  # x, but its 6379 listens on ::1 only
    assert res[("10.200.0.2", 8080)] == ("x", inner.identity)
    assert res[("", 5432)] == ("x", db.identity)
    assert res[("2001:db8:ffff::1", 443)] == ("", "")
    fx = {p.pid: p for p in fleet.processes if p.host == "x"}
    assert (fx[13].peers[0].host, fx[13].peers[0].process) == ("x", cache.identity)
    # the inbound peer names its client's host and process
    assert (fx[10].peers[0].host, fx[10].peers[0].process) == ("y", client.identity)
    assert [(o.target, o.port) for o in outside_fleet(fleet)] == [("api.example", 443)]
    assert fleet.packages == [] and fleet.host.os.id == "debian"


def test_merge_shared_private_address_prefers_own_host_and_is_ambiguous_elsewhere():
    def docker_host(name, pid):
        return Profile(host=host(name, f"192.0.2.{pid}", "172.17.0.1"), processes=[
            proc(pid, "registry", sockets=[listen("tcp", "172.17.0.1", 5000)]),
            proc(pid + 1, "builder", peers=[Peer(address="172.17.0.1", port=5000, proto="tcp",
                                                 direction="outbound")])])
    third = Profile(host=host("c", "192.0.2.30"), processes=[proc(40, "curl", peers=[
        Peer(address="172.17.0.1", port=5000, proto="tcp", direction="outbound")])])
    fleet = merge_profiles([docker_host("a", 10), docker_host("b", 20), third])
    got = {(p.host, p.name): (p.peers[0].host, p.peers[0].process) for p in fleet.processes if p.peers}
    assert got[("a", "builder")] == ("a", fleet.processes[0].identity)
    assert got[("b", "builder")] == ("b", fleet.processes[2].identity)
    assert got[("c", "curl")] == ("", "")


def test_merge_duplicate_hostnames_by_machine_id_and_name():
    a = Profile(host=host("web", "192.0.2.1", machine_id="1" * 32), packages=[
        Package(name="nginx", version="1.22", manager="dpkg", used_by=["a"])])
    b = Profile(host=host("web", "192.0.2.2", machine_id="2" * 32), packages=[
        Package(name="nginx", version="1.22", manager="dpkg", used_by=["b"]),
        Package(name="nginx-extra", version="1", manager="dpkg")])
    c = Profile(host=host("web", "192.0.2.3", machine_id="1" * 32))
    fleet = merge_profiles([a, b, c], sources=["/x/a.msgpack", "/x/b.msgpack", "/x/c.msgpack"])
    assert [h.hostname for h in fleet.hosts] == ["web", "web@22222222", "web@c.msgpack"]
    gaps = [g for g in fleet.coverage.gaps if g.kind == "duplicate-host"]
    assert len(gaps) == 2 and all(g.subject == "web" for g in gaps)
    nginx = next(p for p in fleet.packages if p.name == "nginx")
    assert nginx.hosts == ["web", "web@22222222"] and nginx.used_by == ["a", "b"]
    # merging the fleet into another fleet keeps names and gaps, and adds nothing twice
    again = merge_profiles([fleet, Profile(host=host("db", "192.0.2.9"))], sources=["f", "db"])
    assert [h.hostname for h in again.hosts] == ["web", "web@22222222", "web@c.msgpack", "db"]
    assert len([g for g in again.coverage.gaps if g.kind == "duplicate-host"]) == 2
    assert next(p for p in again.packages if p.name == "nginx").hosts == ["web", "web@22222222"]


def test_diff_hand_built_changes():
    old = Profile(host=host("old", "192.0.2.1"), processes=[
        proc(1, "nginx", exe="/usr/sbin/nginx", user="root",
             sockets=[listen("tcp", "0.0.0.0", 80), listen("udp", "0.0.0.0", 53), listen("udp", "0.0.0.0", 45000)],
             files=[FileRef(path="/etc/nginx/nginx.conf", kind="config", mode="r"),
                    FileRef(path="/var/log/nginx/access.log", kind="log", mode="a"),
                    FileRef(path="/tmp/tmpab12cd34/cache.db", kind="data", mode="rw"),
                    FileRef(path="pipe:[123]", kind="pipe", mode="r")],
             libraries=[FileRef(path=f"/usr/lib/libx{i}.so.1", kind="library") for i in range(12)],
             peers=[Peer(address="10.0.0.5", port=5432, proto="tcp", direction="outbound", names=["db.internal"],
                         protocol="postgresql"),
                    Peer(address="2001:db8::5", port=443, proto="tcp", direction="outbound", protocol="tls")]),
        proc(2, "cron")])
    new = Profile(host=host("new", "192.0.2.2"), processes=[
        proc(101, "nginx", identity="docker.io/library/nginx:/usr/sbin/nginx:abcdef01", exe="/usr/sbin/nginx",
             user="www-data", container_id="c" * 64,
             sockets=[listen("tcp", "127.0.0.1", 80), listen("udp", "0.0.0.0", 53), listen("udp", "0.0.0.0", 51000)],
             files=[FileRef(path="/etc/nginx/nginx.conf", kind="config", mode="rw"),
                    FileRef(path="/var/log/nginx/access.log", kind="log", mode="wa"),
                    FileRef(path="/tmp/tmpzz98yy76/cache.db", kind="data", mode="rw")],
             libraries=[FileRef(path=f"/usr/lib/libx{i}.so.2", kind="library") for i in range(12)],
             peers=[Peer(address="10.9.9.9", port=5432, proto="tcp", direction="outbound", names=["db.internal"],
                         protocol="postgresql"),
                    Peer(address="2001:db8::5", port=443, proto="tcp", direction="outbound", protocol="http")])])
    new.host.kernel.release = "6.18.0"
    res = diff_profiles(old, new)
    doc = res.to_dict()
    text = text_of(res)
    assert_same_facts(doc, text)
    nginx_old = old.processes[0].identity
    assert [(c.change, c.item, c.old, c.new) for c in res.sections["host"]] == [
        ("changed", "kernel", {"kernel": "6.1.0-18-amd64"}, {"kernel": "6.18.0"})]
    procs = [(c.change, c.item) for c in res.sections["processes"]]
    assert procs == [("removed", old.processes[1].identity), ("changed", nginx_old)]
    changed = res.sections["processes"][1]
    assert changed.old == {"identity": nginx_old, "user": ["root"]}
    assert changed.new == {"identity": "docker.io/library/nginx:/usr/sbin/nginx:abcdef01", "user": ["www-data"]}
    # tcp 80 bind address changed; udp 53 the same; udp client sockets in the ephemeral range are not listeners
    assert [(c.change, c.item, c.old, c.new) for c in res.sections["listeners"]] == [
        ("changed", "tcp 80", {"addresses": ["0.0.0.0"]}, {"addresses": ["127.0.0.1"]})]
    # the database moved address but kept its name: the same peer; tls -> http is a change
    assert [(c.change, c.item) for c in res.sections["peers"]] == [("changed", "outbound tcp [2001:db8::5]:443")]
    assert [(c.change, c.item, c.old, c.new) for c in res.sections["files"]] == [
        ("changed", "config /etc/nginx/nginx.conf", {"access": "r"}, {"access": "rw"})]
    assert len(res.sections["libraries"]) == 24 and all(c.process == nginx_old for c in res.sections["libraries"])
    assert "    - ... and 4 more libraries\n" in text and "    + ... and 4 more libraries\n" in text
    assert "  ~ tcp 80: addresses 0.0.0.0 -> 127.0.0.1\n" in text
    assert text.rstrip().endswith("13 removed, 12 added, 5 changed")
    assert doc["summary"] == {"removed": 13, "added": 12, "changed": 5}
    assert json.loads(json.dumps(doc)) == doc


def test_diff_and_merge_without_packages():
    a = Profile(host=host("a", "192.0.2.1"), processes=[proc(1, "svc")])
    b = copy.deepcopy(a)
    b.processes[0].pid = 99
    res = diff_profiles(a, b)
    assert res.empty and text_of(res).rstrip().endswith("no differences")
    assert merge_profiles([a, b]).packages == []


def test_diff_500_peers_is_fast():
    rnd = random.Random(1)

    def build(client_ports):
        peers = [Peer(address=f"10.{i // 250}.{i % 250}.1", port=5432 + i % 7, proto="tcp", direction="outbound",
                      connections=rnd.randint(1, 99)) for i in range(250)]
        peers += [Peer(address=f"2001:db8::{i:x}", port=port, proto="tcp", direction="inbound", local_port=8080)
                  for i, port in enumerate(client_ports)]
        return Profile(host=host("h", "192.0.2.1"), processes=[proc(1, "app", peers=peers,
                                                                      sockets=[listen("tcp", "::", 8080)])])

    old = build([rnd.randint(32768, 60999) for _ in range(250)])
    new = build([rnd.randint(32768, 60999) for _ in range(250)])
    assert len(new.processes[0].peers) == 500
    del new.processes[0].peers[3]
    t0 = time.monotonic()
    res = diff_profiles(old, new)
    text_of(res)
    res.to_dict()
    assert time.monotonic() - t0 < 1.0
    assert [(c.change, c.item) for c in res.changes] == [("removed", "outbound tcp 10.0.3.1:5435")]
    t0 = time.monotonic()
    merge_profiles([old, new], sources=["a", "b"])
    assert time.monotonic() - t0 < 2.0


def test_cli_diff_merge_round_trip_files(tmp_path):
    a = Profile(host=host("a", "192.0.2.1"), processes=[proc(1, "svc", sockets=[listen("tcp", "0.0.0.0", 9000)])],
                packages=[Package(name="svc", version="1.0", manager="dpkg", used_by=["x"])])
    b = Profile(host=host("b", "192.0.2.2"), processes=[proc(2, "cli", peers=[
        Peer(address="192.0.2.1", port=9000, proto="tcp", direction="outbound")])])
    pa, pb, out = tmp_path / "a.json", tmp_path / "b.msgpack", tmp_path / "fleet.json"
    write_profile(a, str(pa))
    write_profile(b, str(pb))
    r = cli("merge", str(pa), str(pb), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\n") == 1 and "2 hosts" in r.stderr
    assert oct(os.stat(out).st_mode & 0o777) == "0o600"
    fleet = load_profile(str(out))
    assert fleet.mode == "fleet"
    peer = next(p for p in fleet.processes if p.host == "b").peers[0]
    assert (peer.host, peer.process) == ("a", a.processes[0].identity)
    assert fleet.packages[0].hosts == ["a"]
