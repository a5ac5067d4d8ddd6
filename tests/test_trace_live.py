"""Live, as root: `asbuilt trace --pid` on a real program the test starts, with eBPF and without.

The traced helper waits on stdin until the trace says its probes are attached, then: reads a config
file by a relative path, appends to a log, probes for a missing file, resolves a name from
/etc/hosts, connects to a server on a loopback alias and to one in a network namespace the test
creates, and forks a child that execs /bin/cat. A secret on its command line must not appear.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from asbuilt.agent.store import load_profile
from conftest import ECHO_SERVER

PY = "/usr/bin/python3"
SECRET = "tok-SECRET-4242"
HOSTS_LINE = "127.0.0.77 asbuilt-db.test"
MISSING = "/etc/asbuilt-missing.conf"

HELPER = textwrap.dedent("""
    import os, socket, sys, time
    workdir, log, port1, ns_addr, port2, hold = sys.argv[1:7]
    hold = float(hold)
    sys.stdin.readline()                       # go: the probes are attached
    os.chdir(workdir)
    conf = open("app.conf")                    # relative to the cwd
    conf.read(); time.sleep(hold)
    logf = open(log, "a"); logf.write("hello\\n"); logf.flush(); time.sleep(hold)
    try:
        open("/etc/asbuilt-missing.conf")
    except FileNotFoundError:
        pass
    socket.getaddrinfo("asbuilt-db.test", int(port1), proto=socket.IPPROTO_TCP)
    c1 = socket.create_connection(("asbuilt-db.test", int(port1))); c1.sendall(b"ping"); c1.recv(16)
    c2 = socket.create_connection((ns_addr, int(port2))); c2.sendall(b"ping"); c2.recv(16)
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open("/dev/null", os.O_WRONLY), 1)
        os.execv("/bin/cat", ["cat", os.path.join(workdir, "app.conf")])
    os.waitpid(pid, 0)
    time.sleep(hold)
    print("done", flush=True)
    sys.stdin.readline()                       # hold connections open until the test ends
""")


def _start_server(args):
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline())


@pytest.fixture
def hosts_entry():
    with open("/etc/hosts") as fh:
        original = fh.read()
    with open("/etc/hosts", "a") as fh:
        fh.write(("" if original.endswith("\n") else "\n") + HOSTS_LINE + "\n")
    try:
        yield
    finally:  # remove only our line: another test may have edited the file meanwhile
        with open("/etc/hosts") as fh:
            lines = fh.read().splitlines(keepends=True)
        with open("/etc/hosts", "w") as fh:
            fh.write("".join(l for l in lines if l.strip() != HOSTS_LINE))


@pytest.fixture
def network(hosts_entry):
    """A server on 127.0.0.77 and one inside a namespace reached over a veth pair."""
    ns = "asb-tr-" + uuid.uuid4().hex[:6]
    veth = "asbv" + uuid.uuid4().hex[:6]
    net = f"10.199.{random.randint(2, 170)}.{4 * random.randint(0, 62)}"  # a /30 of our own
    base = net.rsplit(".", 1)[0] + "."
    mine, theirs = base + str(int(net.rsplit(".", 1)[1]) + 1), base + str(int(net.rsplit(".", 1)[1]) + 2)
    procs = []
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p"], check=True)
        subprocess.run(["ip", "link", "set", veth + "p", "netns", ns], check=True)
        subprocess.run(["ip", "addr", "add", mine + "/30", "dev", veth], check=True)
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
        for cmd in (["ip", "addr", "add", theirs + "/30", "dev", veth + "p"],
                    ["ip", "link", "set", veth + "p", "up"], ["ip", "link", "set", "lo", "up"]):
            subprocess.run(["ip", "netns", "exec", ns] + cmd, check=True)
        local, port1 = _start_server([PY, "-c", ECHO_SERVER, "127.0.0.77"])
        procs.append(local)
        remote, port2 = _start_server(["ip", "netns", "exec", ns, PY, "-c", ECHO_SERVER, theirs])
        procs.append(remote)
        yield dict(port1=port1, port2=port2, ns_addr=theirs)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        subprocess.run(["ip", "link", "del", veth], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


def run_trace(tmp_path, network, extra, hold=0.0, duration="20s", interrupt=False):
    work = tmp_path / "app"
    work.mkdir()
    (work / "app.conf").write_text("db=asbuilt-db.test\n")
    log = tmp_path / "app.log"
    helper = subprocess.Popen([PY, "-c", HELPER, str(work), str(log), str(network["port1"]),
                               network["ns_addr"], str(network["port2"]), str(hold),
                               "--api-token", SECRET],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    out = tmp_path / "trace.json"
    tracer = subprocess.Popen([sys.executable, "-m", "asbuilt.agent.cli", "trace", "--pid", str(helper.pid),
                               "--duration", duration, "-o", str(out), "-q", "--progress"] + extra,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in tracer.stderr:  # wait for "attached"
            lines.append(line)
            if "attached in" in line:
                break
        assert any("attached in" in l for l in lines), "".join(lines)
        helper.stdin.write("go\n")
        helper.stdin.flush()
        assert helper.stdout.readline().strip() == "done"
        time.sleep(1.0)  # a drain or two
        if interrupt:
            tracer.send_signal(signal.SIGINT)
        rest = tracer.stderr.read()
        tracer.wait(timeout=60)
    finally:
        helper.kill()
        helper.wait()
        if tracer.poll() is None:
            tracer.kill()
    assert tracer.returncode == 0, "".join(lines) + rest
    assert "Traceback" not in rest, rest
    return load_profile(str(out)), helper.pid, work, log, "".join(lines) + rest, out


def _proc(profile, pid):
    (p,) = [p for p in profile.processes if p.pid == pid]
    return p


def test_trace_ebpf(tmp_path, network):
    profile, pid, work, log, stderr, out = run_trace(tmp_path, network, [], duration="8s")
    assert profile.mode == "trace" and profile.coverage.mode == "ebpf"
    runs = {r.name: r for r in profile.coverage.probes}
    for name in ("exec", "files", "syscalls", "net", "dns", "capture"):
        assert runs[name].status == "ok", runs[name]
    assert runs["kfunc"].status == "unavailable" and runs["kfunc"].reason

    me = _proc(profile, pid)
    files = {f.path: f for f in me.files}
    conf = files[str(work / "app.conf")]
    assert "r" in conf.mode and conf.kind == "config" and "trace" in conf.learned
    assert "a" in files[str(log)].mode and files[str(log)].kind == "log"
    failed = {f.path: f for f in me.failed_opens}
    assert failed[MISSING].error == "ENOENT"

    (dns,) = [d for d in me.dns if d.name == "asbuilt-db.test"]
    assert "127.0.0.77" in dns.addresses
    peers = {(p.direction, p.address, p.port): p for p in me.peers}
    db = peers[("outbound", "127.0.0.77", network["port1"])]
    assert "asbuilt-db.test" in db.names and db.proto == "tcp" and db.connections >= 1
    assert db.bytes_sent is not None and db.bytes_sent >= 4  # tcp_info, from the final scan
    assert ("outbound", network["ns_addr"], network["port2"]) in peers

    (cat_exec,) = [e for e in me.execs if e.path.endswith("/cat")]
    assert cat_exec.argv == ["cat", str(work / "app.conf")] and cat_exec.exit_code in (0, None)
    (child,) = [p for p in profile.processes if p.exe.endswith("/cat") or p.name == "cat"]
    assert child.ppid == pid and str(work / "app.conf") in {f.path for f in child.files}

    for name in ("openat", "connect", "write"):
        assert me.syscalls.get(name, 0) >= 1, (name, me.syscalls)
    assert any(name in me.syscalls for name in ("clone", "clone3", "fork"))

    raw = out.read_text()
    assert SECRET not in raw and SECRET not in stderr
    assert "--api-token" in me.cmdline
    assert profile.packages and any(p.name == "libc6" for p in profile.packages)


def test_trace_fallback_without_ebpf(tmp_path, network):
    profile, pid, work, log, stderr, out = run_trace(tmp_path, network, ["--no-ebpf"], hold=0.8,
                                                     duration="15s")
    assert profile.coverage.mode == "fallback"
    runs = {r.name: r for r in profile.coverage.probes}
    assert runs["proc_connector"].status == "ok" and runs["fdpoll"].status == "ok"
    assert "polling misses" in runs["fdpoll"].reason
    assert runs["syscalls"].status == "unavailable" and "--no-ebpf" in runs["syscalls"].reason
    me = _proc(profile, pid)
    files = {f.path: f for f in me.files}
    assert str(work / "app.conf") in files and "trace" in files[str(work / "app.conf")].learned
    assert "a" in files[str(log)].mode
    assert any(e.path.endswith("/cat") for e in me.execs)
    peers = {(p.direction, p.address, p.port) for p in me.peers}
    assert ("outbound", "127.0.0.77", network["port1"]) in peers  # open at the end: final scan
    assert SECRET not in out.read_text()


def test_ctrl_c_ends_cleanly_and_writes(tmp_path, network):
    profile, pid, work, log, stderr, out = run_trace(tmp_path, network, [], duration="10m", interrupt=True)
    assert profile.duration_seconds < 120
    assert any(g.subject == "trace window" and "interrupted" in g.detail for g in profile.coverage.gaps)
    assert str(work / "app.conf") in {f.path for f in _proc(profile, pid).files}


def test_trace_bad_pid_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "asbuilt.agent.cli", "trace", "--pid", "999999",
                        "--duration", "1s"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "asbuilt: pid 999999 is not running"
    r = subprocess.run([sys.executable, "-m", "asbuilt.agent.cli", "trace", "--pid", "1",
                        "--duration", "soon"], capture_output=True, text=True)
    assert r.returncode == 2 and "--duration" in r.stderr and r.stderr.count("\n") == 1


HTTP_CLIENT = textwrap.dedent("""
    import sys, time, urllib.request
    sys.stdin.readline()
    req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/orders/12345?token=abc",
                                 headers={"User-Agent": "curl/8.0", "Host": "shop.asbuilt.test"})
    urllib.request.urlopen(req).read()   # teaches the capture filter this port (eBPF connect)
    time.sleep(1.5)                      # a drain and a filter update
    urllib.request.urlopen(req).read()   # captured from its first packet
    print("done", flush=True)
    sys.stdin.readline()
""")


def test_trace_capture_identifies_http_peer(tmp_path):
    """Capture during trace: the protocol spoken is recorded on the right peer of the right process."""
    server = subprocess.Popen([PY, "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = int(server.stdout.readline().split(" port ")[1].split()[0])
    (tmp_path / "orders").mkdir()
    (tmp_path / "orders" / "12345").write_text("{}")
    client = subprocess.Popen([PY, "-c", HTTP_CLIENT, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    out = tmp_path / "t.json"
    pcap = tmp_path / "t.pcap"
    tracer = subprocess.Popen([sys.executable, "-m", "asbuilt.agent.cli", "trace", "--pid", str(client.pid),
                               "--duration", "6s", "-o", str(out), "--pcap", str(pcap), "-q", "--progress"],
                              stderr=subprocess.PIPE, text=True)
    try:
        for line in tracer.stderr:
            if "attached in" in line:
                break
        client.stdin.write("go\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "done"
        rest = tracer.stderr.read()
        assert tracer.wait(timeout=60) == 0, rest
    finally:
        for p in (client, server, tracer):
            if p.poll() is None:
                p.kill()
            p.wait()
    profile = load_profile(str(out))
    runs = {r.name: r for r in profile.coverage.probes}
    assert runs["capture"].status == "ok", runs["capture"]
    me = _proc(profile, client.pid)
    (peer,) = [p for p in me.peers if p.port == port and p.direction == "outbound"]
    assert peer.protocol == "http" and "capture" in peer.learned
    assert peer.details.get("host") == "shop.asbuilt.test"
    assert "abc" not in json.dumps(peer.details)  # the query string is never kept
    assert peer.details.get("path") == "/orders/{id}" and peer.connections == 2
    assert "127.0.0.1" not in peer.names  # getaddrinfo of a literal address names nothing
    assert pcap.exists() and oct(os.stat(pcap).st_mode & 0o777) == "0o600"


def test_duration_is_the_window_not_the_detach(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    out = tmp_path / "t.json"
    try:
        r = subprocess.run([sys.executable, "-m", "asbuilt.agent.cli", "trace", "--pid", str(sleeper.pid),
                            "--duration", "2s", "--no-capture", "-q", "-o", str(out)], capture_output=True, text=True)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert r.returncode == 0, r.stderr
    assert 2.0 <= load_profile(str(out)).duration_seconds < 2.6
