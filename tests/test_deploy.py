"""Deployment files, checked by the tools that consume them.

- ``systemd/asbuilt.service``: ``systemd-analyze verify`` (no warning), ``systemd-analyze security``
  (exposure score <= 5.0), and doctor, trace, scan and the daemon itself run under what of its
  sandbox this machine can enforce without systemd as PID 1: the capability bounding set,
  no_new_privs, the syscall deny list, address families and MemoryDenyWriteExecute, applied with
  prctl and libseccomp before exec. The mount-namespace options (ProtectSystem=, PrivateTmp= ...)
  are checked by systemd-analyze only.
- ``systemd/install.sh``: into a temporary root, twice; modes; an existing config kept; and once
  on this machine as scripts/setup runs it (no systemctl without systemd as init).
- ``systemd/asbuilt.toml``: tomllib, and ``asbuilt run --check-config`` (the daemon's own loader).
- ``vagrant/``: ``vagrant validate`` (provider-neutral, libvirt, VirtualBox), ``bash -n``, shellcheck.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
import urllib.request


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = os.path.join(REPO, "systemd", "asbuilt.service")
CONFIG = os.path.join(REPO, "systemd", "asbuilt.toml")
INSTALL = os.path.join(REPO, "systemd", "install.sh")
VAGRANT_DIR = os.path.join(REPO, "vagrant")
ASBUILT = os.path.join(REPO, ".venv", "bin", "asbuilt")
EXEC_START = "/usr/local/sbin/asbuilt run --config /etc/asbuilt/asbuilt.toml"
CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_NET_ADMIN",
        "CAP_NET_RAW", "CAP_SYS_RESOURCE"}
KEYS = {
    "agent": {"state_dir", "interval", "snapshot_interval", "retention", "select", "ebpf", "capture", "log_level"},
    "metrics": {"listen", "max_series", "tls_cert", "tls_key", "basic_auth_user", "basic_auth_password_hash"},
}


def _run(cmd, **kw):
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, **kw)


def _unit_settings(path: str = UNIT) -> dict:
    """{key: [values]} of a unit file (systemd allows a key more than once)."""
    out: dict = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith(("#", ";", "[")):
                continue
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


# ------------------------------------------------------------------------------------------ unit
def test_unit_verifies_without_warnings(tmp_path):
    # ExecStart= must name an executable: verify the unit with its ExecStart pointing at the symlink
    # install.sh makes (under a temporary root, so /usr/local/sbin of this machine is not touched);
    # everything else is the file as shipped.
    root = tmp_path / "root"
    r = _run(["bash", INSTALL, REPO, str(root)])
    assert r.returncode == 0, r.stderr
    link = root / "usr" / "local" / "sbin" / "asbuilt"
    assert os.readlink(link) == ASBUILT and os.access(link, os.X_OK)
    text = open(UNIT, encoding="utf-8").read()
    assert text.count("/usr/local/sbin/asbuilt") == 1, "ExecStart is the only place the binary is named"
    check = tmp_path / "verify"
    check.mkdir()
    (check / "asbuilt.service").write_text(text.replace("/usr/local/sbin/asbuilt", str(link)))
    r = _run(["systemd-analyze", "verify", str(check / "asbuilt.service")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).strip() == "", "systemd-analyze verify warned:\n" + r.stdout + r.stderr

    # The same check notices a bad key: an empty output above means the unit really is clean.
    (check / "asbuilt.service").write_text(text.replace("[Service]\n", "[Service]\nNoSuchSetting=1\n", 1)
                                           .replace("/usr/local/sbin/asbuilt", str(link)))
    r = _run(["systemd-analyze", "verify", str(check / "asbuilt.service")])
    assert "NoSuchSetting" in r.stdout + r.stderr


def test_unit_exposure_score_at_most_5():
    r = _run(["systemd-analyze", "security", "--offline=yes", UNIT])
    assert r.returncode == 0, r.stderr
    m = re.search(r"Overall exposure level for asbuilt\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout[-2000:]
    score = float(m.group(1))
    print(f"systemd-analyze security: exposure {score}")
    assert score <= 5.0, r.stdout
    # The machine-readable form says the same about the settings that matter most here.
    r = _run(["systemd-analyze", "security", "--offline=yes", "--json=short", UNIT])
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    for name in ("NoNewPrivileges=", "ProtectSystem=", "PrivateTmp=", "PrivateDevices=", "ProtectControlGroups=",
                 "RestrictSUIDSGID=", "LockPersonality=", "SystemCallArchitectures=", "UMask=",
                 "CapabilityBoundingSet=~CAP_SYS_MODULE", "CapabilityBoundingSet=~CAP_SET(UID|GID|PCAP)",
                 "SystemCallFilter=~@mount", "SystemCallFilter=~@module", "RestrictNamespaces=~user"):
        assert rows[name]["set"] and rows[name]["exposure"] in (None, 0, 0.0), (name, rows[name])
    # It observes the host: its network and process tree are the host's on purpose.
    for name in ("PrivateNetwork=", "ProtectProc="):
        assert not rows[name]["set"], (name, rows[name])


def test_unit_settings_are_the_documented_ones():
    s = _unit_settings()
    assert s["ExecStart"] == [EXEC_START]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"] and s["TimeoutStopSec"] == ["10"] and s["KillSignal"] == ["SIGTERM"]
    assert s["StateDirectory"] == ["asbuilt"] and s["StateDirectoryMode"] == ["0700"]
    assert set(s["CapabilityBoundingSet"][0].split()) == CAPS
    assert "AmbientCapabilities" not in s  # root: the bounding set is the limit
    for key in ("PrivateNetwork", "PrivatePIDs", "ProtectProc", "ProcSubset", "User", "DynamicUser"):
        assert key not in s, key
    # Off on purpose (bcc writes tracefs, reads kallsyms and /lib/modules).
    assert s["ProtectKernelTunables"] == ["no"] and s["ProtectKernelModules"] == ["no"]
    assert s["MemoryDenyWriteExecute"] == ["yes"]  # the sandbox tests below run the probes under it
    assert s["RestrictNamespaces"] == ["net"]
    assert set(s["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK",
                                                             "AF_PACKET"}
    assert "PYTHONDONTWRITEBYTECODE=1" in s["Environment"][0].split()
    # Every capability is justified in a comment of its own.
    comments = [ln for ln in open(UNIT, encoding="utf-8") if ln.startswith("#")]
    for cap in CAPS:
        assert any(re.match(rf"#\s+{cap}\s+\S", ln) for ln in comments), cap


SANDBOX = r'''
import ctypes, errno, os, socket, subprocess, sys
import seccomp

unit, argv = sys.argv[1], sys.argv[2:]
settings = {}
for line in open(unit):
    line = line.strip()
    if line and not line.startswith(("#", "[")) and "=" in line:
        k, v = line.split("=", 1)
        settings.setdefault(k, []).append(v)

def expand(name):
    text = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                          check=True).stdout
    calls = set()
    for w in (x.strip() for x in text.splitlines()[1:]):
        if w and not w.startswith("#"):
            calls |= expand(w) if w.startswith("@") else {w}
    return calls

def names(words):
    out = set()
    for w in words.split():
        out |= expand(w) if w.startswith("@") else {w}
    return out

deny = set()
for v in settings["SystemCallFilter"]:  # systemd's rule: a deny list first, later plain entries take out
    if v.startswith("~"):
        deny |= names(v[1:])
    else:
        deny -= names(v)
assert "bpf" not in deny and "mount" in deny and "init_module" in deny

libc = ctypes.CDLL(None, use_errno=True)
keep = set(settings["CapabilityBoundingSet"][0].split())
# util-linux lists the capabilities this kernel has, in bit order.
listed = subprocess.run(["setpriv", "--list-caps"], capture_output=True, text=True, check=True).stdout.split()
assert len(listed) == int(open("/proc/sys/kernel/cap_last_cap").read()) + 1
assert keep <= {"CAP_" + n.upper() for n in listed}, keep
for bit, name in enumerate("CAP_" + n.upper() for n in listed):
    if name not in keep and libc.prctl(24, bit, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP " + name)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS

f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
for call in sorted(deny):
    try:
        f.add_rule(seccomp.ERRNO(errno.EPERM), call)  # SystemCallErrorNumber=EPERM
    except (RuntimeError, ValueError, OSError):
        pass  # no such call on this architecture
families = {getattr(socket, a) for a in settings["RestrictAddressFamilies"][0].split()}
for family in range(64):
    if family not in families:
        f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, family))
if settings.get("MemoryDenyWriteExecute", ["no"])[-1] == "yes":  # systemd's seccomp form of it
    import mmap
    wx, x = mmap.PROT_WRITE | mmap.PROT_EXEC, mmap.PROT_EXEC
    f.add_rule(seccomp.ERRNO(errno.EPERM), "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, wx, wx))
    f.add_rule(seccomp.ERRNO(errno.EPERM), "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, x, x))
    f.add_rule(seccomp.ERRNO(errno.EPERM), "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, x, x))
    f.add_rule(seccomp.ERRNO(errno.EPERM), "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, 0o100000, 0o100000))
f.load()
os.execv(argv[0], argv)
'''

APP = r"""
import http.server, sys
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""

CLIENT = r"""
import socket, sys, time
port, end = int(sys.argv[1]), time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=2)
        c.sendall(b"GET / HTTP/1.1\r\nHost: deploy.asbuilt.test\r\nConnection: close\r\n\r\n")
        while c.recv(65536): pass
        c.close()
    except OSError:
        pass
    time.sleep(0.2)
"""


def _sandboxed(tmp_path, *args):
    script = tmp_path / "sandbox.py"
    script.write_text(SANDBOX)
    # sys.executable: the venv's Python sees Debian's python3-seccomp (system site-packages).
    return _run([sys.executable, str(script), UNIT, ASBUILT, *args], timeout=240)


def test_probes_run_under_the_units_capabilities_and_syscall_filter(tmp_path):
    # A denied capability or syscall shows up as a probe that runs unsandboxed and not sandboxed.
    free = _run([ASBUILT, "doctor", "--json"], timeout=240)
    assert free.returncode == 0, free.stderr
    boxed = _sandboxed(tmp_path, "doctor", "--json")
    assert boxed.returncode == 0, boxed.stderr
    want = {p["name"]: p["verdict"] for p in json.loads(free.stdout)["probes"]}
    got = {p["name"]: p["verdict"] for p in json.loads(boxed.stdout)["probes"]}
    assert got == want
    features = json.loads(boxed.stdout)["features"]
    assert features["privileges"]["ok"] and features["bpf"]["ok"], features

    # A trace under the sandbox: eBPF probes, sock_diag and the packet capture all work.
    server = subprocess.Popen(["/usr/bin/python3", "-c", APP], stdout=subprocess.PIPE, text=True)
    port = int(server.stdout.readline())
    client = subprocess.Popen(["/usr/bin/python3", "-c", CLIENT, str(port), "60"])
    try:
        out = tmp_path / "trace.json"
        r = _sandboxed(tmp_path, "trace", "--pid", str(server.pid), "--duration", "4s", "-o", str(out), "-q")
        assert r.returncode == 0, r.stderr
    finally:
        for p in (client, server):
            p.kill()
            p.wait()
    prof = json.loads(out.read_text())
    status = {p["name"]: p["status"] for p in prof["coverage"]["probes"]}
    for name in ("exec", "files", "syscalls", "net", "dns", "capture", "sockets", "processes"):
        assert status.get(name) == "ok", (name, prof["coverage"])
    (proc,) = [p for p in prof["processes"] if p["pid"] == server.pid]
    assert any(s.get("state") == "LISTEN" and s.get("local_port") == port for s in proc["sockets"]), proc["sockets"]
    inbound = [p for p in proc["peers"] if p["direction"] == "inbound" and p.get("local_port") == port]
    assert any(p.get("protocol") == "http" for p in inbound), proc["peers"]


def test_other_users_process_in_another_netns_reads_the_same_under_the_sandbox(tmp_path):
    # CAP_SYS_PTRACE (/proc/PID/{exe,cwd,fd,environ} of another user) and CAP_SYS_ADMIN (setns into
    # its network namespace for sock_diag): a scan of such a process loses nothing in the sandbox.
    ns = f"asbuilt-deploy-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    server = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        server = subprocess.Popen(["ip", "netns", "exec", ns, "setpriv", "--reuid=nobody", "--regid=nogroup",
                                   "--clear-groups", "/usr/bin/python3", "-c", APP], stdout=subprocess.PIPE,
                                  text=True, cwd="/")
        port = int(server.stdout.readline())
        free, boxed = tmp_path / "free.json", tmp_path / "boxed.json"
        r = _run([ASBUILT, "scan", "-q", "--no-packages", "--pid", str(server.pid), "-o", str(free)])
        assert r.returncode == 0, r.stderr
        r = _sandboxed(tmp_path, "scan", "-q", "--no-packages", "--pid", str(server.pid), "-o", str(boxed))
        assert r.returncode == 0, r.stderr
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)

    def facts(path):
        prof = json.loads(path.read_text())
        (proc,) = [p for p in prof["processes"] if p["pid"] == server.pid]
        gaps = [g for g in prof["coverage"].get("gaps", []) if g.get("subject") == f"pid {server.pid}"]
        return {"user": proc["user"], "exe": proc.get("exe"), "cwd": proc.get("cwd"),
                "env_names": sorted(proc.get("env_names", [])), "libraries": len(proc.get("libraries", [])),
                "listeners": sorted((s.get("local_address"), s.get("local_port")) for s in proc.get("sockets", [])
                                    if s.get("state") == "LISTEN"),
                "gaps": gaps}

    want = facts(free)
    assert want["user"] == "nobody" and want["listeners"] == [("127.0.0.1", port)] and not want["gaps"], want
    assert facts(boxed) == want


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_daemon_runs_reloads_and_stops_under_the_unit_sandbox(tmp_path):
    # ExecStart's command with the example config, state directory and listen address moved by the
    # ASBUILT_* variables a drop-in would set; ExecReload's SIGHUP; KillSignal within TimeoutStopSec.
    settings = _unit_settings()
    timeout_stop = float(settings["TimeoutStopSec"][0])
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    port = _free_port()
    script = tmp_path / "sandbox.py"
    script.write_text(SANDBOX)
    env = dict(os.environ, ASBUILT_STATE_DIR=str(state), ASBUILT_METRICS_LISTEN=f"127.0.0.1:{port}",
               PYTHONDONTWRITEBYTECODE="1")
    log = open(tmp_path / "daemon.log", "w+")
    args = EXEC_START.split()[1:]
    args[args.index("/etc/asbuilt/asbuilt.toml")] = CONFIG
    daemon = subprocess.Popen([sys.executable, str(script), UNIT, ASBUILT, *args], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        text = ""
        while time.monotonic() < deadline and daemon.poll() is None:
            try:
                text = _metrics(port)
                break
            except OSError:
                time.sleep(0.5)
        assert "asbuilt_build_info" in text, open(tmp_path / "daemon.log").read()[-3000:]
        daemon.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert daemon.poll() is None, open(tmp_path / "daemon.log").read()[-3000:]
        assert "asbuilt_build_info" in _metrics(port)
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=timeout_stop + 20) == 0, open(tmp_path / "daemon.log").read()[-3000:]
        took = time.monotonic() - started
        assert took <= timeout_stop, f"stopped after {took:.1f} s, TimeoutStopSec={timeout_stop:g}"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
    snapshots = [p for p in state.iterdir() if p.suffix == ".msgpack"]
    assert snapshots, list(state.iterdir())
    assert all(_mode(p) == 0o600 for p in state.iterdir() if p.is_file())


# --------------------------------------------------------------------------------------- install
def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_install_is_idempotent_and_keeps_an_existing_config(tmp_path):
    root = tmp_path / "root"
    env = dict(os.environ, ROOT=str(root))
    first = _run(["bash", INSTALL, REPO], env=env)
    assert first.returncode == 0, first.stderr
    unit = root / "etc/systemd/system/asbuilt.service"
    conf = root / "etc/asbuilt/asbuilt.toml"
    link = root / "usr/local/sbin/asbuilt"
    assert unit.read_bytes() == open(UNIT, "rb").read() and _mode(unit) == 0o644
    assert conf.read_bytes() == open(CONFIG, "rb").read() and _mode(conf) == 0o600
    assert _mode(root / "etc/asbuilt") == 0o700 and _mode(root / "var/lib/asbuilt") == 0o700
    assert os.path.islink(link) and os.readlink(link) == ASBUILT
    assert f"installed under {root}" in first.stderr  # and no systemctl: ROOT is not the live system

    def snapshot():
        return {str(p.relative_to(root)): (p.is_symlink() and os.readlink(p), _mode(p),
                                           p.is_file() and not p.is_symlink() and p.read_bytes())
                for p in sorted(root.rglob("*"))}

    before = snapshot()
    second = _run(["bash", INSTALL, REPO, str(root)], env=dict(os.environ))  # ROOT as the 2nd argument
    assert second.returncode == 0, second.stderr
    assert snapshot() == before and "wrote" not in second.stderr and "linked" not in second.stderr

    # An edited config is never overwritten; a drifted unit and a wrong link are put right.
    conf.write_text('[agent]\ninterval = "1m"\n')
    conf.chmod(0o640)
    unit.write_text("stale\n")
    unit.chmod(0o600)
    link.unlink()
    link.symlink_to("/nonexistent")
    third = _run(["bash", INSTALL, REPO], env=env)
    assert third.returncode == 0, third.stderr
    assert conf.read_text() == '[agent]\ninterval = "1m"\n' and "kept" in third.stderr
    assert unit.read_bytes() == open(UNIT, "rb").read() and _mode(unit) == 0o644
    assert os.readlink(link) == ASBUILT


def test_install_on_this_machine_as_scripts_setup_runs_it(tmp_path):
    # The live install (what scripts/setup does): real /etc and /usr/local/sbin, idempotent, and no
    # systemctl unless systemd is the running init. A systemctl that records its calls stands first
    # on PATH to tell.
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "systemctl.calls"
    (fake / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexit 0\n')
    (fake / "systemctl").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "ROOT"}
    env["PATH"] = str(fake) + os.pathsep + env.get("PATH", "")
    for _ in range(2):
        installed = _run(["bash", INSTALL, REPO], env=env)
        assert installed.returncode == 0, installed.stderr
    assert open("/etc/systemd/system/asbuilt.service", "rb").read() == open(UNIT, "rb").read()
    assert _mode("/etc/systemd/system/asbuilt.service") == 0o644
    assert _mode("/etc/asbuilt/asbuilt.toml") == 0o600 and _mode("/etc/asbuilt") == 0o700
    assert os.readlink("/usr/local/sbin/asbuilt") == ASBUILT
    r = _run(["/usr/local/sbin/asbuilt", "--version"])
    assert r.returncode == 0 and r.stdout.startswith("asbuilt "), r
    if os.path.isdir("/run/systemd/system"):
        assert "start it with: systemctl enable --now asbuilt" in installed.stderr
        assert "start" not in (calls.read_text() if calls.exists() else "")  # reload at most, never start
    else:
        assert not calls.exists(), calls.read_text()
        assert "systemd is not the running init here" in installed.stderr


def test_install_refuses_what_it_cannot_do(tmp_path):
    r = _run(["bash", INSTALL, str(tmp_path), str(tmp_path / "root")])  # not a checkout
    assert r.returncode == 1 and "not an asbuilt checkout" in r.stderr
    assert not (tmp_path / "root").exists()
    fake = tmp_path / "checkout"
    shutil.copytree(os.path.join(REPO, "systemd"), fake / "systemd")  # a checkout without .venv
    r = _run(["bash", str(fake / "systemd" / "install.sh"), str(fake), str(tmp_path / "root")])
    assert r.returncode == 1 and "run scripts/setup first" in r.stderr
    assert not (tmp_path / "root").exists()


# ---------------------------------------------------------------------------------------- config
def test_example_config_has_exactly_the_documented_keys():
    with open(CONFIG, "rb") as fh:
        data = tomllib.load(fh)
    assert {k: set(v) for k, v in data.items()} == KEYS
    assert data["metrics"]["listen"].startswith("127.0.0.1:")  # loopback unless the admin says otherwise
    assert data["agent"]["state_dir"] == "/var/lib/asbuilt"  # the unit's StateDirectory=


def test_example_config_is_what_the_daemon_loads_by_default(tmp_path):
    # The daemon's own loader takes the file, and its values are the built-in defaults: installing
    # the example changes nothing until the admin edits it.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}  # no ASBUILT_* leaking in
    example = _run([ASBUILT, "run", "--check-config", "--config", CONFIG], env=env)
    assert example.returncode == 0, example.stderr
    (tmp_path / "empty.toml").write_text("")
    default = _run([ASBUILT, "run", "--check-config", "--config", str(tmp_path / "empty.toml")], env=env)
    assert default.returncode == 0, default.stderr
    assert tomllib.loads(example.stdout) == tomllib.loads(default.stdout)


# --------------------------------------------------------------------------------------- vagrant
def _vagrant(tmp_path, *args, provider=None, path=None):
    env = dict(os.environ,
               VAGRANT_CHECKPOINT_DISABLE="1",  # no version check over the network
               VAGRANT_BOX_UPDATE_CHECK_DISABLE="1",
               VAGRANT_DOTFILE_PATH=str(tmp_path / "dotfile"),  # not vagrant/.vagrant in the checkout
               VAGRANT_HOME=str(tmp_path / "vagrant.d"))
    if provider:
        env["VAGRANT_DEFAULT_PROVIDER"] = provider
    if path:
        env["PATH"] = path + os.pathsep + env.get("PATH", "")
    return _run(["vagrant", "validate", *args], cwd=VAGRANT_DIR, env=env, timeout=180)


def test_vagrantfile_validates(tmp_path):
    before = set(os.listdir(VAGRANT_DIR))
    # Every machine's settings, without asking for a provider.
    r = _vagrant(tmp_path, "--ignore-provider")
    assert r.returncode == 0 and "validated successfully" in r.stdout, r.stdout + r.stderr
    for name in ("amzn2", "al2023", "centos7", "ubuntu1804", "ubuntu2004", "debian12"):
        assert f"{name}:" in r.stdout, r.stdout
    # The libvirt block, by Debian's vagrant-libvirt plugin (it validates without a libvirt daemon).
    r = _vagrant(tmp_path, provider="libvirt")
    assert r.returncode == 0 and "validated successfully" in r.stdout, r.stdout + r.stderr
    # The VirtualBox block: VirtualBox cannot run here, so a stand-in VBoxManage answers the one
    # question Vagrant asks before validating (its version); the provider's own checks then run.
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "vboxmanage.calls"
    (fake / "VBoxManage").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                                     '[ "$1" = --version ] && echo 7.0.14r161095\nexit 0\n')
    (fake / "VBoxManage").chmod(0o755)
    r = _vagrant(tmp_path, provider="virtualbox", path=str(fake))
    assert r.returncode == 0 and "validated successfully" in r.stdout, r.stdout + r.stderr
    assert calls.read_text().split("\n")[0] == "--version"
    # And the provider checks are real: a misspelt setting in the virtualbox block fails them.
    bad = tmp_path / "bad"
    shutil.copytree(VAGRANT_DIR, bad, ignore=shutil.ignore_patterns(".vagrant"))
    vf = bad / "Vagrantfile"
    vf.write_text(vf.read_text().replace("vb.cpus = CPUS", "vb.cpuz = CPUS"))
    env = dict(os.environ, VAGRANT_CHECKPOINT_DISABLE="1", VAGRANT_DOTFILE_PATH=str(tmp_path / "dot2"),
               VAGRANT_HOME=str(tmp_path / "vagrant.d"), VAGRANT_DEFAULT_PROVIDER="virtualbox",
               PATH=str(fake) + os.pathsep + os.environ.get("PATH", ""))
    r = _run(["vagrant", "validate"], cwd=str(bad), env=env, timeout=180)
    assert r.returncode != 0 and "cpuz" in r.stdout + r.stderr
    assert set(os.listdir(VAGRANT_DIR)) == before  # validation left nothing in the checkout


def test_provision_script_parses_and_lints():
    for script in (os.path.join(VAGRANT_DIR, "provision.sh"), INSTALL):
        r = _run(["bash", "-n", script])
        assert r.returncode == 0, r.stderr
        r = _run(["shellcheck", "--severity=style", script])
        assert r.returncode == 0, r.stdout
