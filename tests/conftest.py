"""Shared fixtures: real profiles produced in this test run by a real scan and a real trace.

``real_profiles`` starts a small web app (Python's http.server in a working directory of its own,
reading an unowned config file and appending to a log) and a client that keeps calling it with a
``Host:`` header, then runs ``asbuilt scan`` and ``asbuilt trace --pid SERVER`` against them. Tests of
the saved-profile commands (export, diff, merge, metrics) use these files, not only hand-written ones.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

PY = "/usr/bin/python3"

APP = r"""
import http.server, os, sys, time
os.chdir(sys.argv[1])
open("app.conf").read()
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *a):
        open("app.conf").read()  # re-read per request, as many apps do: the trace sees it
        with open("app.log", "a") as fh: fh.write(fmt % a + "\n")
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""

CLIENT = r"""
import socket, sys, time
port = int(sys.argv[1])
end = time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=2)
        c.sendall(b"GET /orders/12345?k=v HTTP/1.1\r\nHost: shop.asbuilt.test\r\nUser-Agent: curl/8.0\r\nConnection: close\r\n\r\n")
        while c.recv(65536): pass
        c.close()
    except OSError:
        pass
    time.sleep(0.2)
"""


# A TCP echo server on the address in argv[1] (IPv4 or IPv6), printing its port: the peer the live
# trace, export and daemon tests connect to (test files import it: ``from conftest import ECHO_SERVER``).
ECHO_SERVER = r"""
import socket, sys, threading
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0)); s.listen(64); print(s.getsockname()[1], flush=True)
def serve(c):
    with c:
        while True:
            d = c.recv(4096)
            if not d: return
            c.sendall(d)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def _cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "asbuilt.agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def real_profiles(tmp_path_factory):
    """{'scan': path, 'trace': path, 'server_pid': int, 'port': int, 'workdir': path} from real runs."""
    if os.geteuid() != 0:
        pytest.fail("the test suite runs as root (scripts/test): it traces real processes")
    base = tmp_path_factory.mktemp("real")
    work = base / "app"
    work.mkdir()
    (work / "app.conf").write_text("listen=127.0.0.1\n")
    (work / "orders").mkdir()
    (work / "orders" / "12345").write_text("{}")
    server = subprocess.Popen([PY, "-c", APP, str(work)], stdout=subprocess.PIPE, text=True)
    port = int(server.stdout.readline())
    client = subprocess.Popen([PY, "-c", CLIENT, str(port), "60"])
    try:
        time.sleep(0.5)
        scan = base / "scan.msgpack"
        r = _cli("scan", "-o", str(scan), "-q")
        assert r.returncode == 0, r.stderr
        trace = base / "trace.json"
        r = _cli("trace", "--pid", str(server.pid), "--duration", "10s", "-o", str(trace), "-q")
        assert r.returncode == 0, r.stderr
    finally:
        for p in (client, server):
            p.kill()
            p.wait()
    return {"scan": str(scan), "trace": str(trace), "server_pid": server.pid, "port": port,
            "workdir": str(work)}
