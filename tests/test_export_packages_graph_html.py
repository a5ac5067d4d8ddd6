"""``asbuilt export --format packages|ansible|graph|html``, end to end through the CLI.

Each artifact is checked by its real consumer: ``apt-get install --simulate`` and dpkg for the
package list, ``ansible-playbook --syntax-check`` and a ``--check`` run against localhost for the
playbook, Graphviz ``dot`` and Mermaid's own renderer (mermaid-cli driving Debian's Chromium) for
the graph, headless Chromium (screenshot and DOM) for the HTML report. Profiles are the real scan
and trace from ``real_profiles`` plus hand-built edge cases: no packages, rpm, IPv6 peers, a
process with 500 peers, a two-host fleet, hostile strings.

Mermaid-cli is looked up as ``$ASBUILT_MMDC``, ``mmdc`` on PATH, or /opt/mermaid-cli (where
scripts/setup --test installs it).
"""
from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib

import pytest
import yaml

from asbuilt.agent.model import (Coverage, FileRef, Host, Kernel, OsRelease, Package, Peer, Process, Profile,
                                 ProbeRun, Socket, Gap)
from asbuilt.exporters.files import write_profile

CHROMIUM = "/usr/bin/chromium"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = 'we"b [1] {x} #2 <b>&amp; \\n ü→✓'  # quotes, brackets, braces, #, HTML, backslash, unicode


def cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "asbuilt.agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return r


def save(profile: Profile, path) -> str:
    write_profile(profile, str(path))
    return str(path)


# ------------------------------------------------------------------------ consumers
def svg_texts(data: bytes) -> list:
    root = ET.fromstring(data)
    assert root.tag == SVG + "svg"
    return ["".join(t.itertext()) for t in root.iter(SVG + "text")]


def dot_svg(dot_path) -> bytes:
    r = subprocess.run(["dot", "-Tsvg", str(dot_path)], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def mmdc_path() -> str:
    for cand in (os.environ.get("ASBUILT_MMDC", ""), shutil.which("mmdc") or "",
                 "/opt/mermaid-cli/node_modules/.bin/mmdc"):
        if cand and os.access(cand, os.X_OK):
            return cand
    pytest.fail("mermaid-cli (mmdc) not found: scripts/setup --test installs it in /opt/mermaid-cli "
                "(or set ASBUILT_MMDC)")


def mermaid_render(mmd_path, tmp_path) -> str:
    """Mermaid's own parser and renderer on the file (exit != 0 on any parse error); the SVG text."""
    cfg = tmp_path / "puppeteer.json"
    cfg.write_text(json.dumps({"executablePath": CHROMIUM, "args": CHROME_FLAGS[1:]}))
    out = tmp_path / (os.path.basename(str(mmd_path)) + ".svg")
    env = dict(os.environ, PUPPETEER_SKIP_DOWNLOAD="1", PUPPETEER_EXECUTABLE_PATH=CHROMIUM)
    r = subprocess.run([mmdc_path(), "-q", "-p", str(cfg), "-i", str(mmd_path), "-o", str(out)],
                       capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, f"mermaid rejected {mmd_path}: {r.stderr[-2000:]}"
    text = out.read_text()
    assert "Syntax error" not in text and "Maximum text size" not in text
    return text


def mermaid_labels(svg_text: str) -> str:
    """The visible text of a Mermaid SVG (labels are HTML in foreignObject), unescaped."""
    import html

    return html.unescape(re.sub(r"<[^>]+>", "\n", svg_text)).replace("\u200b", "")  # see graph.mermaid_text


def png_pixels(path):
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB/RGBA PNG: a minimal decoder."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if ctype == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            bpp = 3 if color == 2 else 4
        elif ctype == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw, stride, prev, rows = zlib.decompress(idat), width * bpp, bytearray(width * bpp), []
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, bpp, rows


def chromium(tmp_path, page, *mode):
    r = subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chrome-profile'}", *mode,
                        f"file://{page}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


class _Resources(html.parser.HTMLParser):
    """Collects every tag name and every attribute that could load something."""

    def __init__(self):
        super().__init__()
        self.tags, self.loads = set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for k, v in attrs:
            if k in ("src", "href", "xlink:href", "data", "poster", "srcset", "action") and v and not v.startswith("#"):
                self.loads.append((tag, k, v))
            if k == "style" and v and "url(" in v:
                self.loads.append((tag, k, v))


class _UnsafeLoader(yaml.SafeLoader):
    """Reads Ansible's !unsafe tag as the plain string it is."""


_UnsafeLoader.add_constructor("!unsafe", lambda loader, node: loader.construct_scalar(node))


def ansible(*args, cwd, timeout=300):
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_HOST_KEY_CHECKING="False", ANSIBLE_RETRY_FILES_ENABLED="False",
               ANSIBLE_LOCAL_TEMP=str(cwd / ".ansible-tmp"), ANSIBLE_REMOTE_TEMP=str(cwd / ".ansible-tmp"))
    return subprocess.run(["ansible-playbook", "-i", "localhost,", "-c", "local", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=str(cwd), env=env)


def active_lines(text: str) -> list:
    return [re.sub(r"#.*", "", line).strip() for line in text.splitlines() if re.sub(r"#.*", "", line).strip()]


def installed_version(name: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


# ------------------------------------------------------------------------ hand-built profiles
def host(name="edge") -> Host:
    return Host(hostname=name, os=OsRelease(id="debian", pretty_name="Debian GNU/Linux 12 (bookworm)"),
                kernel=Kernel(release="6.1.0", machine="x86_64"))


def edge_profile(tmp_path) -> Profile:
    """IPv6 peers, hostile names, an unowned config file read, a written directory, a unit."""
    etc = tmp_path / "target" / "etc" / 'we"ird {{ x }} ü'
    conf = str(etc / "app.conf")
    log = str(tmp_path / "target" / "var" / "log" / "edge" / "edge.log")
    bash = installed_version("bash")
    proc = Process(
        pid=4242, identity="edge.service:/usr/bin/edge:0badc0de", name="edge", exe="/usr/bin/edge " + HOSTILE,
        cmdline=["/usr/bin/edge", "--name", HOSTILE, "<script>alert(1)</script>"], user="www-data", uid=33,
        exe_package="bash",
        files=[FileRef(path=conf, kind="config", mode="r", owned=False),
               FileRef(path=log, kind="log", mode="wac", owned=False),
               FileRef(path="/etc/ld.so.cache", kind="config", mode="r", owned=True, package="libc-bin"),
               FileRef(path="/dev/null", kind="device", mode="rw")],
        sockets=[Socket(proto="tcp", family="inet6", state="LISTEN", local_address="::", local_port=8443)],
        peers=[Peer(address="2001:db8::10", port=443, proto="tcp", family="inet6", direction="outbound",
                    names=["api.example.test"], protocol="tls", connections=7, details={"sni": "api.example.test"}),
               Peer(address="2001:db8::20", port=5432, proto="tcp", family="inet6", direction="outbound",
                    protocol="postgresql", connections=2),
               Peer(address="fe80::1", port=53, proto="udp", family="inet6", direction="outbound",
                    names=[HOSTILE], connections=1),
               Peer(address="::1", port=51000, proto="tcp", family="inet6", direction="inbound", local_port=8443,
                    protocol="http", connections=5),
               Peer(address="::1", port=51002, proto="tcp", family="inet6", direction="inbound", local_port=8443,
                    protocol="http", connections=3)])
    return Profile(mode="trace", generated_at=1.7e9, tool_version="test", host=host(), processes=[proc],
                   packages=[Package(name="bash", version=bash, architecture="amd64", manager="dpkg",
                                     origin="Debian:bookworm/main", used_by=[proc.identity]),
                             Package(name="libc-bin", version=installed_version("libc-bin"), architecture="amd64",
                                     manager="dpkg", origin="local")],
                   coverage=Coverage(probes=[ProbeRun(name="packages", status="ok")],
                                     gaps=[Gap(kind="denied", subject="pid 1", detail="<exe> & more")]))


def unit_profile() -> Profile:
    """A systemd service with a config file, for the playbook's unit task (syntax only: no such unit here)."""
    proc = Process(pid=10, identity="nginx.service:/usr/sbin/nginx:11111111", name="nginx", exe="/usr/sbin/nginx",
                   systemd_unit="nginx.service", user="root", exe_package="nginx-light",
                   files=[FileRef(path="/etc/nginx/sites-enabled/shop {{ lookup('pipe','id') }}", kind="config",
                                  mode="r", owned=False)])
    return Profile(mode="scan", host=host("web"), processes=[proc],
                   packages=[Package(name="nginx-light", version="1.22.1-9", architecture="amd64", manager="dpkg",
                                     origin="Debian:bookworm/main", used_by=[proc.identity])])


def rpm_profile() -> Profile:
    proc = Process(pid=7, identity="-:/usr/sbin/httpd:22222222", name="httpd", exe="/usr/sbin/httpd",
                   exe_package="httpd", user="apache",
                   libraries=[FileRef(path="/usr/lib64/libssl.so.3", kind="library", mode="r", package="openssl-libs")])
    return Profile(mode="scan", host=Host(hostname="rh", os=OsRelease(id="rocky", pretty_name="Rocky Linux 9.3"),
                                          kernel=Kernel(machine="x86_64")),
                   processes=[proc],
                   packages=[Package(name="httpd", version="2.4.57-5.el9", architecture="x86_64", manager="rpm",
                                     origin="appstream", used_by=[proc.identity]),
                             Package(name="openssl-libs", version="1:3.0.7-24.el9", architecture="x86_64",
                                     manager="rpm", origin="local")])


def bare_profile() -> Profile:
    """No package known at all (the package probe could not run)."""
    proc = Process(pid=99, identity="-:/opt/app/bin/app:33333333", name="app", exe="/opt/app/bin/app", user="app",
                   sockets=[Socket(proto="tcp", state="LISTEN", local_address="0.0.0.0", local_port=9000)])
    return Profile(mode="scan", host=host("bare"), processes=[proc],
                   coverage=Coverage(probes=[ProbeRun(name="packages", status="unavailable",
                                                      reason="no package database")]))


def busy_profile() -> Profile:
    """One process with 500 outbound peers and 300 inbound client addresses."""
    peers = [Peer(address=f"10.{i // 250}.{i % 250}.7", port=443 if i % 2 else 80, proto="tcp", direction="outbound",
                  protocol="http", connections=1000 - i) for i in range(500)]
    peers += [Peer(address=f"192.0.2.{i % 250}" if i < 250 else f"2001:db8::{i:x}", port=40000 + i, proto="tcp",
                   direction="inbound", local_port=8080, connections=1) for i in range(300)]
    proc = Process(pid=1234, identity="gw.service:/usr/bin/gw:44444444", name="gw", exe="/usr/bin/gw",
                   systemd_unit="gw.service", peers=peers,
                   sockets=[Socket(proto="tcp", state="LISTEN", local_address="0.0.0.0", local_port=8080)])
    return Profile(mode="trace", host=host("busy"), processes=[proc])


def fleet_profile() -> Profile:
    """web1's web -> db1's postgres, db1's postgres -> web1's web (peers point at each other), web -> outside."""
    web_id, db_id = "web.service:/usr/bin/web:aaaaaaaa", "postgresql.service:/usr/lib/postgresql/15/bin/postgres:bbbbbbbb"
    web = Process(pid=100, identity=web_id, name="web", exe="/usr/bin/web", systemd_unit="web.service", host="web1",
                  sockets=[Socket(proto="tcp", state="LISTEN", local_address="0.0.0.0", local_port=8080)],
                  peers=[Peer(address="10.0.0.2", port=5432, proto="tcp", direction="outbound", protocol="postgresql",
                              connections=12, host="db1", process=db_id),
                         Peer(address="203.0.113.9", port=443, proto="tcp", direction="outbound", protocol="tls",
                              names=["api.outside.test"], connections=3),
                         Peer(address="10.0.0.2", port=41000, proto="tcp", direction="inbound", local_port=8080,
                              protocol="http", connections=4, host="db1", process=db_id),
                         Peer(address="198.51.100.20", port=50000, proto="tcp", direction="inbound", local_port=8080,
                              protocol="http", connections=9)])
    db = Process(pid=200, identity=db_id, name="postgres", exe="/usr/lib/postgresql/15/bin/postgres",
                 systemd_unit="postgresql.service", host="db1",
                 sockets=[Socket(proto="tcp", state="LISTEN", local_address="10.0.0.2", local_port=5432)],
                 peers=[Peer(address="10.0.0.1", port=40000, proto="tcp", direction="inbound", local_port=5432,
                             protocol="postgresql", connections=12, host="web1", process=web_id),
                        Peer(address="10.0.0.1", port=8080, proto="tcp", direction="outbound", protocol="http",
                             connections=4, host="web1", process=web_id)])
    return Profile(mode="fleet", hosts=[host("web1"), host("db1")], processes=[web, db],
                   packages=[Package(name="postgresql-15", version="15.5-0+deb12u1", architecture="amd64",
                                     manager="dpkg", origin="Debian:bookworm/main", used_by=[db_id], hosts=["db1"]),
                             Package(name="libc6", version="2.36-9+deb12u4", architecture="amd64", manager="dpkg",
                                     origin="Debian:bookworm/main", used_by=[web_id, db_id], hosts=["web1", "db1"])])


# ------------------------------------------------------------------------ packages
def test_packages_real_scan_installable(real_profiles, tmp_path):
    from asbuilt.agent.store import load_profile

    out = tmp_path / "packages.txt"
    ok(cli("export", "-f", "packages", real_profiles["scan"], "-o", str(out)))
    text = out.read_text()
    assert text.startswith("# asbuilt packages:")
    specs = active_lines(text)
    assert specs, text
    for spec in specs:  # name=version, and the version is exactly the one installed on this (source) host
        name, _, version = spec.partition("=")
        assert version, spec
        assert installed_version(name.split(":")[0]) == version, spec
    profile = load_profile(real_profiles["scan"])
    used = {p.identity for p in profile.processes}
    for pk in profile.packages:
        if set(pk.used_by) & used:
            line = next(x for x in text.splitlines() if x.startswith(f"{pk.name}={pk.version} "))
            assert pk.origin in line
            assert ("LOCAL" in line) == (pk.origin == "local"), line
    # the real consumer: apt resolves every pinned line (simulation, no change to the host)
    r = subprocess.run(["apt-get", "install", "--simulate", "-q", *specs], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_packages_trace_selection(real_profiles):
    from asbuilt.agent.store import load_profile

    r = ok(cli("export", "-f", "packages", real_profiles["trace"], "--process", f"pid:{real_profiles['server_pid']}"))
    server = next(p for p in load_profile(real_profiles["trace"]).processes if p.pid == real_profiles["server_pid"])
    assert server.exe_package
    assert any(line.startswith(server.exe_package + "=") for line in active_lines(r.stdout)), r.stdout


def test_packages_rpm_and_none(tmp_path):
    r = ok(cli("export", "-f", "packages", save(rpm_profile(), tmp_path / "rpm.json")))
    assert active_lines(r.stdout) == ["httpd-2.4.57-5.el9", "openssl-libs-1:3.0.7-24.el9"]
    assert "yum install" in r.stdout
    assert re.search(r"^openssl-libs-1:3.0.7-24.el9 +# LOCAL", r.stdout, re.M)
    r = ok(cli("export", "-f", "packages", save(bare_profile(), tmp_path / "bare.json")))
    assert active_lines(r.stdout) == []
    assert "No package is known" in r.stdout and "unavailable" in r.stdout


# ------------------------------------------------------------------------ ansible
def test_ansible_real_trace_check_run(real_profiles, tmp_path):
    from asbuilt.agent.store import load_profile

    pb = tmp_path / "playbook.yml"
    ok(cli("export", "-f", "ansible", real_profiles["trace"], "-o", str(pb)))
    plays = yaml.load(pb.read_text(), Loader=_UnsafeLoader)
    apt = [t for t in plays[0]["tasks"] if "ansible.builtin.apt" in t]
    assert apt and all("=" in n for t in apt for n in t["ansible.builtin.apt"]["name"])
    profile = load_profile(real_profiles["trace"])
    configs = {f.path for p in profile.processes for f in p.files
               if f.owned is False and f.kind == "config" and "r" in f.mode and not f.error}
    copies = [t["ansible.builtin.copy"] for t in plays[0]["tasks"] if "ansible.builtin.copy" in t]
    assert {c["dest"] for c in copies} == configs
    assert os.path.join(real_profiles["workdir"], "app.conf") in configs  # the app's unowned config file
    for c in copies:  # the operator's step: the source host's files under files/
        (tmp_path / c["src"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(c["dest"], tmp_path / c["src"])
    r = ansible("--syntax-check", "playbook.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = ansible("--check", "playbook.yml", cwd=tmp_path)
    assert r.returncode == 0 and "failed=0" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_ansible_config_files_dirs_check_run(tmp_path):
    profile = edge_profile(tmp_path)
    conf, logf = profile.processes[0].files[0].path, profile.processes[0].files[1].path
    os.makedirs(os.path.dirname(conf))
    run = tmp_path / "run"
    run.mkdir()
    ok(cli("export", "-f", "ansible", save(profile, tmp_path / "edge.msgpack"), "-o", str(run / "playbook.yml")))
    text = (run / "playbook.yml").read_text()
    assert "TODO" in text
    tasks = yaml.load(text, Loader=_UnsafeLoader)[0]["tasks"]
    copy = [t["ansible.builtin.copy"] for t in tasks if "ansible.builtin.copy" in t]
    assert [c["dest"] for c in copy] == [conf]  # only the unowned config file, path exact despite {{ }} and quotes
    assert copy[0]["src"] == "files" + conf
    dirs = [t for t in tasks if "ansible.builtin.file" in t]
    assert dirs[0]["loop"] == [os.path.dirname(logf)] and dirs[0]["ansible.builtin.file"]["owner"] == "www-data"
    systemd = [t for t in tasks if "ansible.builtin.systemd" in t]
    assert systemd == []  # edge.service is not a unit in this profile (no systemd_unit)
    # the operator's step: the config file goes under files/ at its path; then a --check run here
    src = run / ("files" + conf)
    src.parent.mkdir(parents=True)
    src.write_text("listen=[::]:8443\n")
    r = ansible("--syntax-check", "playbook.yml", cwd=run)
    assert r.returncode == 0, r.stdout + r.stderr
    r = ansible("--check", "playbook.yml", cwd=run)
    assert r.returncode == 0 and "failed=0" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    assert not os.path.exists(conf)  # check mode changed nothing


def test_ansible_unit_rpm_none_syntax(tmp_path):
    for name, profile, module in (("unit", unit_profile(), "ansible.builtin.apt"),
                                  ("rpm", rpm_profile(), "ansible.builtin.yum"),
                                  ("bare", bare_profile(), "ansible.builtin.debug")):
        d = tmp_path / name
        d.mkdir()
        ok(cli("export", "-f", "ansible", save(profile, d / "p.json"), "-o", str(d / "playbook.yml")))
        text = (d / "playbook.yml").read_text()
        assert module in text, text
        r = ansible("--syntax-check", "playbook.yml", cwd=d)
        assert r.returncode == 0, r.stdout + r.stderr
    d = tmp_path / "fleet"  # one play per fleet host, each with its own packages
    d.mkdir()
    ok(cli("export", "-f", "ansible", save(fleet_profile(), d / "p.json"), "-o", str(d / "playbook.yml")))
    r = ansible("--syntax-check", "playbook.yml", cwd=d)
    assert r.returncode == 0, r.stdout + r.stderr
    plays = {p["hosts"]: p["tasks"] for p in yaml.load((d / "playbook.yml").read_text(), Loader=_UnsafeLoader)}
    assert set(plays) == {"web1", "db1"}
    apt = {h: [n for t in tasks if "ansible.builtin.apt" in t for n in t["ansible.builtin.apt"]["name"]]
           for h, tasks in plays.items()}
    assert apt == {"db1": ["libc6=2.36-9+deb12u4", "postgresql-15=15.5-0+deb12u1"], "web1": ["libc6=2.36-9+deb12u4"]}
    assert {t["ansible.builtin.systemd"]["name"] for h in plays for t in plays[h] if "ansible.builtin.systemd" in t} \
        == {"web.service", "postgresql.service"}
    tasks = yaml.load((tmp_path / "unit" / "playbook.yml").read_text(), Loader=_UnsafeLoader)[0]["tasks"]
    unit = next(t["ansible.builtin.systemd"] for t in tasks if "ansible.builtin.systemd" in t)
    assert unit == {"name": "nginx.service", "enabled": True, "state": "started", "daemon_reload": True}
    assert "!unsafe \"/etc/nginx/sites-enabled/shop {{ lookup('pipe','id') }}\"" in \
        (tmp_path / "unit" / "playbook.yml").read_text()


# ------------------------------------------------------------------------ graph
def test_graph_real_trace(real_profiles, tmp_path):
    from asbuilt.agent.store import load_profile

    out = tmp_path / "g"
    ok(cli("export", "-f", "graph", real_profiles["trace"], "-o", str(out)))
    assert sorted(os.listdir(out)) == ["graph.dot", "graph.mmd"]
    texts = svg_texts(dot_svg(out / "graph.dot"))
    server = next(p for p in load_profile(real_profiles["trace"]).processes if p.pid == real_profiles["server_pid"])
    assert os.path.basename(server.exe) in texts
    assert f"tcp :{real_profiles['port']}" in texts
    inbound = {x.address for x in server.peers if x.direction == "inbound"}
    assert inbound and inbound <= set(texts), (inbound, texts)
    labels = mermaid_labels(mermaid_render(out / "graph.mmd", tmp_path))
    assert os.path.basename(server.exe) in labels and f"tcp :{real_profiles['port']}" in labels


def test_graph_outputs_by_suffix(real_profiles, tmp_path):
    svg = tmp_path / "g.svg"
    ok(cli("export", "-f", "graph", real_profiles["scan"], "-o", str(svg)))
    assert "python3.11" in " ".join(svg_texts(svg.read_bytes()))
    png = tmp_path / "g.png"
    ok(cli("export", "-f", "graph", real_profiles["scan"], "-o", str(png)))
    w, h, _, rows = png_pixels(png)
    assert w > 50 and h > 50 and len(set(rows)) > 5
    for suffix, first in ((".dot", "digraph"), (".mmd", "%%")):
        f = tmp_path / ("g" + suffix)
        ok(cli("export", "-f", "graph", real_profiles["scan"], "-o", str(f)))
        assert f.read_text().startswith(first)
    r = ok(cli("export", "-f", "graph", real_profiles["scan"]))  # stdout: both, with headers
    assert "# ==> graph.mmd <==" in r.stdout and "# ==> graph.dot <==" in r.stdout
    r = cli("export", "-f", "graph", real_profiles["scan"], "--process", "no-such-process")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_graph_ipv6_and_hostile_labels(tmp_path):
    out = tmp_path / "g"
    ok(cli("export", "-f", "graph", save(edge_profile(tmp_path), tmp_path / "edge.json"), "-o", str(out)))
    dot = (out / "graph.dot").read_text()
    texts = svg_texts(dot_svg(out / "graph.dot"))
    for want in ("api.example.test:443", "2001:db8::10", "[2001:db8::20]:5432", "postgresql", "tcp :8443", "::1",
                 HOSTILE + ":53", "tls"):
        assert want in texts, (want, texts)
    assert any("tls" in t and "7 conns" in t for t in texts)
    assert any("http" in t and "8 conns" in t for t in texts)  # two inbound peers of ::1 aggregated
    assert texts.count("::1") == 1
    assert "\\n ü" not in dot.replace("\\\\n", "")  # the backslash is escaped, not a line break
    mmd = (out / "graph.mmd").read_text()
    assert HOSTILE not in mmd and "<b>" not in mmd  # quotes, brackets, # and HTML are entity codes
    assert "we#34;b #91;1#93; #123;x#125; #35;2 #60;b#62;" in mmd
    labels = mermaid_labels(mermaid_render(out / "graph.mmd", tmp_path))
    assert HOSTILE + ":53" in labels and "[2001:db8::20]:5432" in labels


def test_graph_500_peers_capped(tmp_path):
    out = tmp_path / "g"
    ok(cli("export", "-f", "graph", save(busy_profile(), tmp_path / "busy.msgpack"), "-o", str(out)))
    dot = (out / "graph.dot").read_text()
    nodes = re.findall(r"^\s+(n\d+) \[label=", dot, re.M)
    assert len(nodes) < 80, len(nodes)
    texts = svg_texts(dot_svg(out / "graph.dot"))
    assert "+470 more peers" in texts and "+270 more clients" in texts
    assert "10.0.0.7:80" in texts  # the busiest peer is kept
    assert "gw.service" in texts
    assert "[2001:db8::12b]:40299" not in texts
    labels = mermaid_labels(mermaid_render(out / "graph.mmd", tmp_path))
    assert "+470 more peers" in labels


def test_graph_fleet(tmp_path):
    out = tmp_path / "g"
    ok(cli("export", "-f", "graph", save(fleet_profile(), tmp_path / "fleet.msgpack"), "-o", str(out)))
    dot = (out / "graph.dot").read_text()
    clusters = {}
    for m in re.finditer(r"subgraph (cluster_\d+) \{\n\s+label=\"([^\"]*)\";.*?\n((?:\s+n\d+ \[.*\n)*)\s+\}", dot):
        clusters[m.group(2)] = re.findall(r'(n\d+) \[label="([^"]*)"', m.group(3))
    assert set(clusters) == {"web1", "db1", "outside the fleet"}, dot
    ids = {label.split("\\n")[0]: nid for group in clusters.values() for nid, label in group}
    assert ids["web.service"] in [n for n, _ in clusters["web1"]]
    assert ids["postgresql.service"] in [n for n, _ in clusters["db1"]]
    assert {label.split("\\n")[0] for _, label in clusters["outside the fleet"]} == {"api.outside.test:443",
                                                                                      "198.51.100.20"}
    web, db = ids["web.service"], ids["postgresql.service"]
    # peers resolved to fleet processes are process-to-process edges, each link drawn once
    assert len(re.findall(rf"^\s+{web} -> {db} \[label=\"tcp/postgresql :5432 · 12 conns\"", dot, re.M)) == 1
    assert len(re.findall(rf"^\s+{db} -> {web} \[label=\"tcp/http :8080 · 4 conns\"", dot, re.M)) == 1
    assert not re.search(r'label="10\.0\.0\.[12]', dot)  # no peer or client nodes for fleet peers
    texts = svg_texts(dot_svg(out / "graph.dot"))
    for want in ("web1", "db1", "outside the fleet", "web.service", "postgresql.service", "api.outside.test:443"):
        assert want in texts
    mmd = (out / "graph.mmd").read_text()
    assert mmd.count("subgraph ") == 3
    labels = mermaid_labels(mermaid_render(out / "graph.mmd", tmp_path))
    assert "outside the fleet" in labels and "postgresql.service" in labels


# ------------------------------------------------------------------------ html
@pytest.mark.parametrize("which", ["scan", "trace"])
def test_html_real_in_chromium(real_profiles, tmp_path, which):
    from asbuilt.agent.store import load_profile

    page = tmp_path / "report.html"
    ok(cli("export", "-f", "html", real_profiles[which], "-o", str(page)))
    text = page.read_text()
    res = _Resources()
    res.feed(text)
    assert res.loads == [] and not res.tags & {"script", "link", "iframe", "img", "object", "embed"}, res.loads
    assert "<svg" in text and "<?xml" not in text
    shot = tmp_path / "report.png"
    chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1280,2000")
    print(f"screenshot: {shot}")
    w, h, bpp, rows = png_pixels(shot)
    assert (w, h) == (1280, 2000)
    colours = {row[i:i + 3] for row in rows[::20] for i in range(0, w * bpp, 40 * bpp)}
    assert len(colours) > 8, "blank page"  # header, text, table lines
    dom = chromium(tmp_path, page, "--dump-dom")
    profile = load_profile(real_profiles[which])
    for want in ("As-built: " + profile.host.hostname, "Processes", "Listeners", "Peers", "Files by class", "Packages",
                 "Coverage and gaps", "Dependency graph"):
        assert want in dom, want
    for pk in profile.packages:
        assert pk.name in dom
    if which == "trace":
        assert f"127.0.0.1:{real_profiles['port']}" in dom
        assert os.path.join(real_profiles["workdir"], "app.log") in dom
        assert os.path.join(real_profiles["workdir"], "app.conf") in dom


def test_html_escapes_everything(tmp_path):
    page = tmp_path / "edge.html"
    ok(cli("export", "-f", "html", save(edge_profile(tmp_path), tmp_path / "edge.json"), "-o", str(page)))
    text = page.read_text()
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    dom = chromium(tmp_path, page, "--dump-dom")
    assert "<script" not in dom
    parser = _Resources()
    parser.feed(dom)
    assert "script" not in parser.tags and "b" not in parser.tags
    import html as htmlmod

    visible = htmlmod.unescape(re.sub(r"<[^>]+>", "", dom))
    for want in ("<script>alert(1)</script>", HOSTILE, "[2001:db8::20]:5432", "api.example.test", "sni=api.example.test",
                 "<exe> & more", "LOCAL", "no package"):
        assert want in visible, want
    shot = tmp_path / "edge.png"
    chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1280,2000")
    print(f"screenshot: {shot}")
    assert os.path.getsize(shot) > 20000


def test_html_fleet_and_busy(tmp_path):
    for name, profile in (("fleet", fleet_profile()), ("busy", busy_profile())):
        page = tmp_path / f"{name}.html"
        ok(cli("export", "-f", "html", save(profile, tmp_path / f"{name}.msgpack"), "-o", str(page)))
        dom = chromium(tmp_path, page, "--dump-dom")
        assert "Dependency graph" in dom and "<svg" in dom
    assert "more rows not shown" in dom  # 800 peers > the table cap


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("fmt", ["packages", "ansible", "graph", "html"])
def test_bad_input(tmp_path, fmt):
    junk = tmp_path / "junk.json"
    junk.write_text('{"hello": "world"}')
    trunc = tmp_path / "trunc.msgpack"
    trunc.write_bytes(b"\x85\xa4kind")
    for path in (junk, trunc, tmp_path / "missing.msgpack"):
        r = cli("export", "-f", fmt, str(path), "-o", str(tmp_path / "out"))
        assert r.returncode == 2, (path, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("asbuilt:"), r.stderr
        assert "Traceback" not in r.stderr
        assert not os.path.exists(tmp_path / "out")
