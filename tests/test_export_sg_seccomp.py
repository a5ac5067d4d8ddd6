"""`asbuilt export --format security-groups|seccomp`, checked by the artifacts' real consumers.

Security groups: the AWS CLI inputs are validated offline against botocore's own EC2 input models
(AuthorizeSecurityGroupIngress/Egress), the Terraform file is parsed with python-hcl2 (Terraform is
in neither Debian nor PyPI), on the shared real trace profile, on a live trace of a server whose
clients and backend sit in a network namespace the test creates (IPv4 and IPv6 over a veth pair),
and on hand-built edge cases (IPv6 peers, 500 peers, loopback-only and client-less listeners).

Seccomp: a small program is traced from its very first instruction (a launcher waits on stdin
until the probes are attached, then execs it), the profile is exported through the CLI, and the
program is run again under that profile: with libseccomp's Python binding in a child that loads the
filter and execs the program (it completes with the same output; a syscall it never made, mkdir or
socket, gets EPERM; taking one observed syscall away breaks it), and under runc, the runtime Docker
and Kubernetes use, with no-new-privileges on and off.
"""
from __future__ import annotations

import inspect
import ipaddress
import json
import os
import random
import re
import subprocess
import sys
import textwrap
import uuid

import botocore.session
import botocore.validate
import hcl2
import pytest
import seccomp

from asbuilt.agent.model import (Address, Host, Kernel, Nic, Peer, Process, Profile, ProbeRun, Socket,
                                 Coverage)
from asbuilt.agent.errors import UsageError
from asbuilt.agent.store import load_profile
from asbuilt.exporters import seccomp as sc
from asbuilt.exporters import security_groups as sg
from asbuilt.exporters.files import write_profile
from conftest import ECHO_SERVER

PY = "/usr/bin/python3"
AWS_DESC = re.compile(r"^[a-zA-Z0-9. _\-:/()#,@\[\]+=&;{}!$*]{0,255}$")


def cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "asbuilt.agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------ consumers
_EC2 = botocore.session.get_session().get_service_model("ec2")


def validate_cli_input(data: dict, operation: str) -> None:
    """botocore's own validation of an --cli-input-json document: no errors allowed."""
    report = botocore.validate.ParamValidator().validate(data, _EC2.operation_model(operation).input_shape)
    assert not report.has_errors(), report.generate_report()
    for perm in data["IpPermissions"]:
        for r in perm.get("IpRanges", []) + perm.get("Ipv6Ranges", []):
            assert AWS_DESC.match(r["Description"]), r["Description"]


def _unquote(v):
    if isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] == '"':
        return v[1:-1]
    if isinstance(v, dict):
        return {_unquote(k): _unquote(x) for k, x in v.items() if k != "__is_block__"}
    if isinstance(v, list):
        return [_unquote(x) for x in v]
    return v


def parse_tf(text: str):
    """(variables, [(type, name, attrs)]) from the .tf, parsed by python-hcl2."""
    doc = _unquote(hcl2.loads(text))
    variables = {k: v for block in doc.get("variable", []) for k, v in block.items()}
    resources = [(rtype, name, attrs) for block in doc.get("resource", [])
                 for rtype, named in block.items() for name, attrs in named.items()]
    return variables, resources


def tf_rules(resources, direction):
    return [a for t, _, a in resources if t == f"aws_vpc_security_group_{direction}_rule"]


def check_sg_artifacts(files: dict):
    """Every artifact through its consumer; returns (variables, resources, ingress, egress)."""
    assert set(files) == {"security-groups.tf", "ingress.json", "egress.json"}
    ingress, egress = json.loads(files["ingress.json"]), json.loads(files["egress.json"])
    validate_cli_input(ingress, "AuthorizeSecurityGroupIngress")
    validate_cli_input(egress, "AuthorizeSecurityGroupEgress")
    variables, resources = parse_tf(files["security-groups.tf"].decode())
    assert "vpc_id" in variables
    groups = [a for t, _, a in resources if t == "aws_security_group"]
    assert len(groups) == 1 and groups[0]["vpc_id"] == "${var.vpc_id}"
    assert AWS_DESC.match(groups[0]["name"]) and AWS_DESC.match(groups[0]["description"])
    for direction, doc in (("ingress", ingress), ("egress", egress)):
        rules = tf_rules(resources, direction)
        for r in rules:
            assert r["security_group_id"] == "${aws_security_group.asbuilt.id}"
            assert AWS_DESC.match(r["description"]) and r["ip_protocol"] in ("tcp", "udp")
            assert 0 <= r["from_port"] <= r["to_port"] <= 65535
        # the Terraform rules and the CLI input say the same thing
        json_count = sum(len(p.get("IpRanges", [])) + len(p.get("Ipv6Ranges", [])) for p in doc["IpPermissions"])
        assert json_count == len(rules)
    return variables, resources, ingress, egress


def json_rules(doc):
    """{(proto, from, to, cidr): description} of an AuthorizeSecurityGroup* input."""
    out = {}
    for p in doc["IpPermissions"]:
        for r in p.get("IpRanges", []):
            out[(p["IpProtocol"], p["FromPort"], p["ToPort"], r["CidrIp"])] = r["Description"]
        for r in p.get("Ipv6Ranges", []):
            out[(p["IpProtocol"], p["FromPort"], p["ToPort"], r["CidrIpv6"])] = r["Description"]
    return out


def export_sg(profile, processes=None):
    arts = sg.export(profile, processes if processes is not None else profile.processes)
    return {a.name: a.data for a in arts}


def test_validator_catches_a_malformed_input():
    """The consumer check is not a rubber stamp: botocore rejects what AWS would."""
    bad = {"GroupId": "sg-1", "IpPermissions": [{"IpProtocol": "tcp", "FromPort": "80", "Cidr": "1.2.3.4/32"}]}
    report = botocore.validate.ParamValidator().validate(
        bad, _EC2.operation_model("AuthorizeSecurityGroupIngress").input_shape)
    assert report.has_errors() and "Cidr" in report.generate_report()


# ------------------------------------------------------------ security groups: real
def test_sg_real_trace_profile_cli(real_profiles, tmp_path):
    """The shared real trace: an HTTP server on 127.0.0.1 whose clients are local: nothing to open."""
    out = tmp_path / "sg"
    r = cli("export", "--format", "security-groups", real_profiles["trace"], "--process",
            f"pid:{real_profiles['server_pid']}", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "wrote 3 files" in r.stderr
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in out.iterdir())
    variables, resources, ingress, egress = check_sg_artifacts(files)
    port = real_profiles["port"]
    tf = files["security-groups.tf"].decode()
    assert re.search(rf"#   tcp 127\.0\.0\.1 port {port} \(python3", tf), tf
    assert not any(r["from_port"] == port for r in tf_rules(resources, "ingress"))
    assert all(p["FromPort"] != port for p in ingress["IpPermissions"])

    r = cli("export", "--format", "security-groups", real_profiles["trace"])  # no -o: printed with headers
    assert r.returncode == 0, r.stderr
    assert "# ==> security-groups.tf <==" in r.stdout and "# ==> egress.json <==" in r.stdout


APP = textwrap.dedent("""
    import socket, sys, threading
    backend = (sys.argv[1], int(sys.argv[2]))
    srv = socket.socket(socket.AF_INET6)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)   # dual-stack on ::
    srv.bind(("::", 0)); srv.listen(16)
    print(srv.getsockname()[1], flush=True)
    held = []
    def serve():
        while True:
            c, _ = srv.accept(); held.append(c); c.sendall(b"hi")
    threading.Thread(target=serve, daemon=True).start()
    sys.stdin.readline()                       # go: the probes are attached
    b = socket.create_connection(backend); b.sendall(b"ping"); b.recv(16); held.append(b)
    print("done", flush=True)
    sys.stdin.readline()
""")

CLIENT = textwrap.dedent("""
    import socket, sys, time
    conns = []
    for addr in sys.argv[2:]:
        for _ in range(2):
            c = socket.create_connection((addr, int(sys.argv[1])), timeout=5); c.recv(2); conns.append(c)
    print("connected", flush=True)
    sys.stdin.readline()
""")


@pytest.fixture
def netns_pair():
    """A namespace reached over a veth pair with an IPv4 /30 and an IPv6 /64 of our own."""
    ns = "asb-sg-" + uuid.uuid4().hex[:6]
    veth = "asbs" + uuid.uuid4().hex[:6]
    net4 = ipaddress.ip_network(f"10.198.{random.randint(2, 250)}.{4 * random.randint(0, 62)}/30")
    net6 = ipaddress.ip_network(f"fd42:{random.randint(1, 0xffff):x}:{random.randint(1, 0xffff):x}::/64")
    mine4, theirs4 = str(net4[1]), str(net4[2])
    mine6, theirs6 = str(net6[1]), str(net6[2])
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p"], check=True)
        subprocess.run(["ip", "link", "set", veth + "p", "netns", ns], check=True)
        subprocess.run(["ip", "addr", "add", f"{mine4}/30", "dev", veth], check=True)
        subprocess.run(["ip", "-6", "addr", "add", f"{mine6}/64", "dev", veth, "nodad"], check=True)
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
        for cmd in (["ip", "addr", "add", f"{theirs4}/30", "dev", veth + "p"],
                    ["ip", "-6", "addr", "add", f"{theirs6}/64", "dev", veth + "p", "nodad"],
                    ["ip", "link", "set", veth + "p", "up"], ["ip", "link", "set", "lo", "up"]):
            subprocess.run(["ip", "netns", "exec", ns] + cmd, check=True)
        yield dict(ns=ns, net4=net4, net6=net6, mine4=mine4, theirs4=theirs4, mine6=mine6, theirs6=theirs6)
    finally:
        subprocess.run(["ip", "link", "del", veth], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


def start_tracer(pid, out, duration):
    """`asbuilt trace` on pid; returns (tracer, stderr lines up to 'attached')."""
    tracer = subprocess.Popen([sys.executable, "-m", "asbuilt.agent.cli", "trace", "--pid", str(pid),
                               "--duration", duration, "-o", str(out), "-q", "--progress", "--no-capture"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in tracer.stderr:
        lines.append(line)
        if "attached in" in line:
            break
    assert any("attached in" in l for l in lines), "".join(lines)
    return tracer, lines


def finish_tracer(tracer, lines):
    rest = tracer.stderr.read()
    tracer.wait(timeout=120)
    assert tracer.returncode == 0, "".join(lines) + rest
    assert "Traceback" not in rest, rest


def test_sg_live_trace_network_clients_and_backend(tmp_path, netns_pair):
    """A real server with clients in a namespace (IPv4 and IPv6) and a backend there: traced, exported."""
    n = netns_pair
    procs = []
    try:
        backend = subprocess.Popen(["ip", "netns", "exec", n["ns"], PY, "-c", ECHO_SERVER, n["theirs4"]],
                                   stdout=subprocess.PIPE, text=True)
        procs.append(backend)
        backend_port = int(backend.stdout.readline())
        app = subprocess.Popen([PY, "-c", APP, n["theirs4"], str(backend_port)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        procs.append(app)
        port = int(app.stdout.readline())
        out = tmp_path / "trace.json"
        tracer, lines = start_tracer(app.pid, out, "12s")
        try:
            app.stdin.write("go\n")
            app.stdin.flush()
            client = subprocess.Popen(["ip", "netns", "exec", n["ns"], PY, "-c", CLIENT, str(port), n["mine4"],
                                       n["mine6"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(client)
            assert client.stdout.readline().strip() == "connected"
            assert app.stdout.readline().strip() == "done"
        finally:
            finish_tracer(tracer, lines)
    finally:
        for p in procs:
            p.kill()
            p.wait()

    profile = load_profile(str(out))
    sgdir = tmp_path / "sg"
    r = cli("export", "--format", "security-groups", str(out), "--process", f"pid:{app.pid}", "-o", str(sgdir))
    assert r.returncode == 0, r.stderr
    files = {p.name: p.read_bytes() for p in sgdir.iterdir()}
    variables, resources, ingress, egress = check_sg_artifacts(files)

    # clients inside the host's veth subnets: the subnet, not each address
    assert str(n["net4"]) in {a.subnet for nic in profile.host.nics for a in nic.addresses}
    rules_in = json_rules(ingress)
    assert ("tcp", port, port, str(n["net4"])) in rules_in, rules_in
    assert ("tcp", port, port, str(n["net6"])) in rules_in, rules_in
    assert "NIC subnet" in rules_in[("tcp", port, port, str(n["net4"]))]
    tf_in = {(r["from_port"], r.get("cidr_ipv4") or r.get("cidr_ipv6")) for r in tf_rules(resources, "ingress")}
    assert (port, str(n["net4"])) in tf_in and (port, str(n["net6"])) in tf_in
    assert any(r.get("cidr_ipv6") == str(n["net6"]) for r in tf_rules(resources, "ingress"))

    # the backend: its address /32 on its port
    rules_out = json_rules(egress)
    assert ("tcp", backend_port, backend_port, f"{n['theirs4']}/32") in rules_out, rules_out
    tf_out = {(r["from_port"], r.get("cidr_ipv4")) for r in tf_rules(resources, "egress")}
    assert (backend_port, f"{n['theirs4']}/32") in tf_out


# ------------------------------------------------------- security groups: edge cases
def _host():
    return Host(hostname="web1", kernel=Kernel(machine="x86_64"), nics=[
        Nic(name="lo", kind="loopback", addresses=[Address("127.0.0.1", 8, "inet", "127.0.0.0/8"),
                                                    Address("::1", 128, "inet6", "::1/128")]),
        Nic(name="eth0", kind="physical", addresses=[
            Address("10.0.1.5", 24, "inet", "10.0.1.0/24"),
            Address("2001:db8:1::5", 64, "inet6", "2001:db8:1::/64"),
            Address("fe80::1", 64, "inet6", "fe80::/64")])])


def test_sg_ipv6_peers():
    proc = Process(pid=10, name="nginx", sockets=[
        Socket(proto="tcp", family="inet6", state="LISTEN", local_address="::", local_port=443)], peers=[
        Peer(address="2001:db8:1::9", proto="tcp", direction="inbound", local_port=443, protocol="tls"),
        Peer(address="2606:4700::6810:85e5", proto="tcp", direction="inbound", local_port=443),
        Peer(address="::ffff:10.0.1.7", proto="tcp", direction="inbound", local_port=443),  # v4-mapped
        Peer(address="fe80::99%eth0", proto="tcp", direction="inbound", local_port=443),  # link-local, zoned
        Peer(address="2a00:1450:4001:82b::200e", port=443, proto="tcp", direction="outbound",
             names=["api.example.com"], protocol="tls"),
        Peer(address="::1", port=6379, proto="tcp", direction="outbound", protocol="redis"),
    ])
    files = export_sg(Profile(mode="trace", host=_host(), processes=[proc]))
    variables, resources, ingress, egress = check_sg_artifacts(files)
    rules_in = json_rules(ingress)
    assert set(rules_in) == {("tcp", 443, 443, "2001:db8:1::/64"), ("tcp", 443, 443, "2606:4700::6810:85e5/128"),
                             ("tcp", 443, 443, "10.0.1.0/24"), ("tcp", 443, 443, "fe80::99/128")}
    perm = ingress["IpPermissions"][0]
    assert {r["CidrIpv6"] for r in perm["Ipv6Ranges"]} >= {"2001:db8:1::/64", "2606:4700::6810:85e5/128"}
    assert [r["CidrIp"] for r in perm["IpRanges"]] == ["10.0.1.0/24"]
    (out,) = egress["IpPermissions"]
    assert out["Ipv6Ranges"][0]["CidrIpv6"] == "2a00:1450:4001:82b::200e/128"
    assert "api.example.com" in out["Ipv6Ranges"][0]["Description"]
    v6 = [r for r in tf_rules(resources, "egress") if "cidr_ipv6" in r]
    assert len(v6) == 1 and "cidr_ipv4" not in v6[0]
    assert "tcp ::1 port 6379 (nginx)" in files["security-groups.tf"].decode()  # loopback peer: comment only


def test_sg_loopback_only_and_clientless_listeners():
    proc = Process(pid=11, name="app", sockets=[
        Socket(proto="tcp", family="inet", state="LISTEN", local_address="127.0.0.1", local_port=8080),
        Socket(proto="tcp", family="inet6", state="LISTEN", local_address="::1", local_port=8080),
        Socket(proto="tcp", family="inet", state="LISTEN", local_address="0.0.0.0", local_port=9100),
        Socket(proto="udp", family="inet", state="UNCONN", local_address="0.0.0.0", local_port=514),
        Socket(proto="udp", family="inet", state="UNCONN", local_address="0.0.0.0", local_port=45123),
        Socket(proto="tcp", family="inet", state="ESTABLISHED", local_address="10.0.1.5", local_port=9100,
               remote_address="127.0.0.1", remote_port=50000),
    ], peers=[Peer(address="127.0.0.1", proto="tcp", direction="inbound", local_port=8080),
              Peer(address="127.0.0.1", proto="tcp", direction="inbound", local_port=9100)])
    profile = Profile(mode="trace", host=_host(), processes=[proc])
    files = export_sg(profile)
    variables, resources, ingress, egress = check_sg_artifacts(files)
    tf = files["security-groups.tf"].decode()
    assert "#   tcp 127.0.0.1,::1 port 8080 (app)" in tf  # not exposed: a comment, no rule
    assert "#   udp 0.0.0.0:45123 (app)" in tf  # an ephemeral UDP client socket is no listener
    rules_in = json_rules(ingress)
    assert {k[1] for k in rules_in} == {9100, 514}
    # exposed, no network client seen (a local one does not count): a documentation range, said so
    for (proto, port, _, cidr), desc in rules_in.items():
        assert cidr == "192.0.2.0/24" and "no client observed" in desc
    assert variables["unobserved_clients_ipv4"]["default"] == "192.0.2.0/24"
    for r in tf_rules(resources, "ingress"):
        assert r["cidr_ipv4"] == "${var.unobserved_clients_ipv4}" and "no client observed" in r["description"]
    assert egress["IpPermissions"] == []

    # a host numbered from 192.0.2.0/24 itself (this VM is) gets another documentation range
    profile.host.nics[1].addresses.append(Address("192.0.2.2", 24, "inet", "192.0.2.0/24"))
    rules_in = json_rules(json.loads(export_sg(profile)["ingress.json"]))
    assert {k[3] for k in rules_in} == {"198.51.100.0/24"}


def test_sg_500_peers_stay_within_the_rule_quota():
    rnd = random.Random(500)
    peers, public = [], []
    for i in range(500):  # scattered public servers on three ports
        addr = str(ipaddress.IPv4Address(rnd.randrange(0x0B000000, 0xDF000000)))
        port = rnd.choice([80, 443, 8443])
        public.append((addr, port))
        peers.append(Peer(address=addr, port=port, proto="tcp", direction="outbound", names=[f"svc{i}.example"]))
    clients = [f"100.64.{i // 200}.{i % 200 + 1}" for i in range(500)]  # consecutive client addresses
    peers += [Peer(address=a, proto="tcp", direction="inbound", local_port=443) for a in clients]
    v6 = [(f"2001:db8:{i:x}::1", 7000 + 3 * i) for i in range(120)]  # many ports, one address each
    peers += [Peer(address=a, port=p, proto="udp", direction="outbound") for a, p in v6]
    peers += [Peer(address="10.0.1.20", port=5432, proto="tcp", direction="outbound", names=["db"])] * 3  # dups
    proc = Process(pid=12, name="crawler", peers=peers, sockets=[
        Socket(proto="tcp", family="inet", state="LISTEN", local_address="0.0.0.0", local_port=443)])
    profile = Profile(mode="trace", host=_host(), processes=[proc])
    files = export_sg(profile)
    variables, resources, ingress, egress = check_sg_artifacts(files)
    plan = sg.plan_rules(profile, [proc])
    for rules in (plan.ingress, plan.egress):
        for fam in (4, 6):
            assert len([r for r in rules if r.family == fam]) <= sg.MAX_RULES
    assert len(tf_rules(resources, "egress")) <= 2 * sg.MAX_RULES

    def covered(doc, proto, addr, port):
        a = ipaddress.ip_address(addr)
        return any(p["IpProtocol"] == proto and p["FromPort"] <= port <= p["ToPort"]
                   and any(a in ipaddress.ip_network(r.get("CidrIp") or r.get("CidrIpv6"))
                           for r in p.get("IpRanges", []) + p.get("Ipv6Ranges", []))
                   for p in doc["IpPermissions"])

    # nothing observed is left out by the aggregation
    assert all(covered(egress, "tcp", a, p) for a, p in public)
    assert all(covered(egress, "udp", a, p) for a, p in v6)
    assert covered(egress, "tcp", "10.0.1.20", 5432)
    assert all(covered(ingress, "tcp", a, 443) for a in clients)
    # consecutive clients collapse exactly (no widening); the 500 scattered ones are widened and say so
    assert all(not r.widened for r in plan.ingress) and len(plan.ingress) < 40
    widened = [r for r in plan.egress if r.widened]
    assert widened and all("aggregated from" in sg.description(r, "egress") for r in widened)
    assert sum(len(r.addresses) for r in plan.egress if r.proto == "tcp" and r.from_port in (80, 443, 8443)) == 500
    assert json_rules(egress)[("tcp", 5432, 5432, "10.0.1.20/32")].startswith("crawler tcp/5432: db")
    tf = files["security-groups.tf"].decode()
    assert "# Aggregated:" in tf and "egress IPv4" in tf and "egress IPv6" in tf


def test_sg_descriptions_are_aws_safe_and_hcl_safe():
    proc = Process(pid=13, name='we"ird${x}\n', peers=[
        Peer(address="10.0.9.9", port=443, proto="tcp", direction="outbound", names=["é.example", "a'b\"c"],
             details={"sni": "${jndi:x}"})])
    files = export_sg(Profile(mode="trace", host=_host(), processes=[proc]))
    variables, resources, ingress, egress = check_sg_artifacts(files)
    (rule,) = tf_rules(resources, "egress")
    assert rule["cidr_ipv4"] == "10.0.9.9/32" and rule["from_port"] == 443


# ------------------------------------------------------------------------ seccomp
def test_seccomp_real_trace_profile(real_profiles, tmp_path):
    out = tmp_path / "seccomp.json"
    r = cli("export", "--format", "seccomp", real_profiles["trace"], "--process", f"pid:{real_profiles['server_pid']}",
            "-o", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["defaultAction"] == "SCMP_ACT_ERRNO" and doc["defaultErrnoRet"] == 1
    machine = os.uname().machine
    assert doc["architectures"] == list(sc.ARCHITECTURES[machine])
    assert set(doc) == {"defaultAction", "defaultErrnoRet", "architectures", "syscalls"}  # no unknown keys
    profile = load_profile(real_profiles["trace"])
    (server,) = [p for p in profile.processes if p.pid == real_profiles["server_pid"]]
    observed = doc["syscalls"][0]
    assert observed["names"] == sorted(server.syscalls) and observed["action"] == "SCMP_ACT_ALLOW"
    assert "accept4" in observed["names"] or "accept" in observed["names"]
    assert observed["comment"].startswith("observed")
    allowed = [n for g in doc["syscalls"] for n in g["names"]]
    assert len(allowed) == len(set(allowed))  # groups are disjoint
    assert {"execve", "exit_group", "rt_sigreturn", "futex"} <= set(allowed)
    for g in doc["syscalls"]:
        assert set(g) == {"names", "action", "comment"} and g["action"] == "SCMP_ACT_ALLOW"
    # libseccomp knows every name on this machine and compiles the filter
    f = build_filter(doc)
    with open(tmp_path / "filter.bpf", "wb") as fh:
        f.export_bpf(fh)
    assert (tmp_path / "filter.bpf").stat().st_size > 8 * len(allowed)

    r = cli("export", "--format", "seccomp", real_profiles["trace"])  # one artifact: printed as is
    assert r.returncode == 0 and json.loads(r.stdout) == doc


def test_seccomp_without_syscalls_is_one_line(real_profiles, tmp_path):
    r = cli("export", "--format", "seccomp", real_profiles["scan"], "-o", str(tmp_path / "x.json"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "asbuilt: no syscalls observed: trace the process with eBPF first\n"
    assert not (tmp_path / "x.json").exists()
    path = tmp_path / "fallback.json"
    write_profile(Profile(mode="trace", processes=[Process(pid=5, name="x")]), str(path))
    r = cli("export", "--format", "seccomp", str(path))
    assert r.returncode == 2 and r.stderr == "asbuilt: no syscalls observed: trace the process with eBPF first\n"


def test_seccomp_architectures_and_unnamed_syscalls():
    procs = [Process(pid=1, name="a", syscalls={"read": 3, "syscall_999": 1, "write": 1}),
             Process(pid=2, name="b")]
    for machine, arches in (("aarch64", ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]),
                            ("x86_64", ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])):
        profile = Profile(mode="trace", host=Host(kernel=Kernel(machine=machine)), processes=procs,
                          coverage=Coverage(probes=[ProbeRun(name="syscalls", status="ok", lost_events=4)]))
        doc = json.loads(sc.export(profile, procs)[0].data)
        assert doc["architectures"] == arches
        first = doc["syscalls"][0]
        assert first["names"] == ["read", "write"]
        assert "syscall_999" in first["comment"] and "lost 4 events" in first["comment"]
        assert "1 process (b) selected without syscall counts" in first["comment"]
    doc = json.loads(sc.export(Profile(host=Host(kernel=Kernel(machine="mips"))), procs)[0].data)
    assert "architectures" not in doc  # unknown machine: the runtime's native one
    with pytest.raises(UsageError, match="no named syscalls observed"):
        sc.export(Profile(), [Process(pid=3, syscalls={"syscall_999": 2})])


# --------------------------------------------------- seccomp: the program under its filter
LAUNCH = "import os, sys; os.read(0, 3); os.execv(sys.argv[1], sys.argv[1:])"

PROGRAM = textwrap.dedent("""
    import errno, os, socket, sys, time
    path, rounds = sys.argv[1], int(sys.argv[2])
    for i in range(rounds):                    # read a file, write to stdout, in a loop
        with open(path) as fh:
            data = fh.read()
        sys.stdout.write(f"{i} {len(data)}\\n")
        sys.stdout.flush()
        time.sleep(0.01)
    print("done", flush=True)
    if "--then-forbidden" in sys.argv:         # never taken while traced
        for what, call in (("mkdir", lambda: os.mkdir(path + ".dir")), ("socket", lambda: socket.socket())):
            try:
                call()
                print(what, "allowed", flush=True)
            except OSError as err:
                print(what, errno.errorcode[err.errno], flush=True)
""")

LOADER = textwrap.dedent("""
    import json, os, sys, seccomp
    sys.path.insert(0, sys.argv[1])
    from filterlib import build_filter
    doc = json.load(open(sys.argv[2]))
    f = build_filter(doc, drop=set(filter(None, sys.argv[3].split(","))))
    f.load()
    os.execv(sys.argv[4], sys.argv[4:])
""")

ARCH = {"SCMP_ARCH_X86_64": "X86_64", "SCMP_ARCH_X86": "X86", "SCMP_ARCH_X32": "X32",
        "SCMP_ARCH_AARCH64": "AARCH64", "SCMP_ARCH_ARM": "ARM"}


def build_filter(doc, drop=()):
    """A libseccomp filter from an exported profile, as a runtime would build it."""
    assert doc["defaultAction"] == "SCMP_ACT_ERRNO"
    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(doc["defaultErrnoRet"]))
    for name in doc.get("architectures", []):
        arch = getattr(seccomp.Arch, ARCH[name])
        if not f.exist_arch(arch):
            f.add_arch(arch)
    for group in doc["syscalls"]:
        assert group["action"] == "SCMP_ACT_ALLOW"
        for name in group["names"]:
            if name in drop:
                continue
            assert seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) >= 0, name
            f.add_rule(seccomp.ALLOW, name)
    return f


@pytest.fixture(scope="module")
def traced_program(tmp_path_factory):
    """The program traced from its first instruction to its exit, and its exported seccomp profile."""
    base = tmp_path_factory.mktemp("seccomp")
    (base / "prog.py").write_text(PROGRAM)
    (base / "data.txt").write_text("some data\n" * 10)
    (base / "filterlib.py").write_text(
        "import seccomp\nARCH = %r\n" % ARCH
        + textwrap.dedent(inspect.getsource(build_filter)))
    argv = [PY, str(base / "prog.py"), str(base / "data.txt"), "20"]
    launcher = subprocess.Popen([PY, "-c", LAUNCH] + argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = base / "trace.json"
    try:
        tracer, lines = start_tracer(launcher.pid, out, "12s")
        try:
            launcher.stdin.write(b"go\n")
            launcher.stdin.flush()
            stdout, _ = launcher.communicate(timeout=60)  # the whole run happens inside the window
            assert launcher.returncode == 0
        finally:
            finish_tracer(tracer, lines)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    profile_path = base / "seccomp.json"
    r = cli("export", "--format", "seccomp", str(out), "--process", f"pid:{launcher.pid}", "-o", str(profile_path))
    assert r.returncode == 0, r.stderr
    return dict(base=base, argv=argv, expected=stdout.decode(), doc=json.loads(profile_path.read_text()),
                path=profile_path, trace=out)


def run_filtered(t, argv, drop=()):
    return subprocess.run([PY, "-c", LOADER, str(t["base"]), str(t["path"]), ",".join(drop)] + argv,
                          capture_output=True, text=True, timeout=60)


def test_seccomp_program_runs_under_its_exported_filter(traced_program):
    t = traced_program
    assert t["expected"].endswith("19 100\ndone\n")
    observed = set(t["doc"]["syscalls"][0]["names"])
    assert {"openat", "read", "write", "execve", "exit_group"} <= observed  # start to exit was traced
    assert not observed & {"mkdir", "mkdirat", "socket"}

    r = run_filtered(t, t["argv"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == t["expected"]
    # traced from its first instruction, the observed group alone is enough without a runtime
    extras = {n for g in t["doc"]["syscalls"][1:] for n in g["names"]}
    r = run_filtered(t, t["argv"], drop=extras)
    assert r.returncode == 0, r.stderr
    assert r.stdout == t["expected"]

    # a syscall the program never made is refused with EPERM (defaultErrnoRet 1)
    r = run_filtered(t, t["argv"] + ["--then-forbidden"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == t["expected"] + "mkdir EPERM\nsocket EPERM\n"
    assert not os.path.exists(t["argv"][2] + ".dir")

    # and the filter is what makes it so: take away one call the loop needs and the program fails
    sleeper = "clock_nanosleep" if "clock_nanosleep" in observed else "nanosleep"
    assert sleeper in observed
    r = run_filtered(t, t["argv"], drop=[sleeper])
    assert r.returncode != 0 and "PermissionError" in r.stderr and "done" not in r.stdout


def test_seccomp_profile_under_runc(traced_program, tmp_path):
    """runc (the runtime under Docker and containerd) starts the program under the exported profile."""
    t = traced_program
    bundle = tmp_path / "bundle"
    rootfs = bundle / "rootfs"
    for d in ("usr", "proc", "dev", "sys", "tmp", "etc", "work"):
        (rootfs / d).mkdir(parents=True)
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"), ("sbin", "usr/sbin")):
        os.symlink(target, rootfs / link)
    r = subprocess.run(["runc", "spec"], cwd=bundle, capture_output=True, text=True)
    assert r.returncode == 0, "runc is needed (Debian package runc, scripts/setup): " + r.stderr
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"].update(terminal=False, args=[PY, "/work/prog.py", "/work/data.txt", "20"])
    spec["root"] = {"path": "rootfs", "readonly": True}
    spec["mounts"] += [{"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
                       {"destination": "/work", "type": "bind", "source": str(t["base"]), "options": ["rbind", "ro"]}]

    def run(seccomp_doc, nnp):
        spec["process"]["noNewPrivileges"] = nnp
        spec["linux"]["seccomp"] = seccomp_doc
        (bundle / "config.json").write_text(json.dumps(spec))
        cid = "asbuilt-test-" + uuid.uuid4().hex[:8]
        try:
            return subprocess.run(["runc", "run", cid], cwd=bundle, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=120)
        finally:
            subprocess.run(["runc", "delete", "-f", cid], capture_output=True)

    expected = t["expected"].replace(str(t["base"]), "/work")
    # Docker's default (the filter is loaded before the privilege drop), then no-new-privileges
    for nnp in (False, True):
        r = run(t["doc"], nnp)
        assert r.returncode == 0, (nnp, r.stderr)
        assert r.stdout == expected
    # the runtime's own calls are what the extra groups are for: the observed ones alone do not start it
    bare = dict(t["doc"], syscalls=t["doc"]["syscalls"][:1])
    r = run(bare, False)
    assert r.returncode != 0 and "operation not permitted" in r.stderr, r.stderr
