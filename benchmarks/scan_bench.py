#!/usr/bin/env python3
"""Scan speed benchmark: `asbuilt scan` against ps, ss and lsof over the same loaded host.

Starts N idle processes holding files and M sockets (loopback TCP pairs plus listeners, UDP, unix), waits until
all are ready, then times each tool in turn (alternating across repeats) and prints wall time, CPU, peak RSS and
the wall ratio against `asbuilt scan`, then a verdict for each target of the issue:

    1,000 processes and 10,000 sockets scanned in under 2 s wall, peak RSS under 100 MB,
    and no worse than `lsof -n -P` over the same host.

Not a test: it measures and reports; the exit status is 0 unless the load could not be built.
Run as root with the repo's venv (see benchmarks/README.md):

    .venv/bin/python benchmarks/scan_bench.py [--procs 1000] [--sockets 10000] [--repeat 3] [--json]

Stdlib only, plus asbuilt's own load_profile to prove the written profile contains the load.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WALL_TARGET_S = 2.0
RSS_TARGET_MB = 100.0
SPAWN_FLAG = "--_spawn"  # internal: run as the load spawner


# =================================================================================== the load (spawner side)
def _plan(procs: int, sockets: int) -> Dict[str, int]:
    """Split the socket budget: a few TCP listeners and named unix listeners, then 70 % TCP ends (connection
    pairs), 15 % UDP, 15 % unix socketpair ends."""
    listeners = max(1, procs // 20) if sockets >= 4 else 0
    rest = max(0, sockets - 2 * listeners)
    conns = int(rest * 0.35) if listeners else 0
    udp = int(rest * 0.15)
    pairs = max(0, (rest - 2 * conns - udp) // 2)
    return {"listeners": listeners, "conns": conns, "udp": udp, "pairs": pairs,
            "total": 2 * listeners + 2 * conns + udp + 2 * pairs}


def _share(total: int, parts: int, i: int) -> int:
    q, r = divmod(total, parts)
    return q + (1 if i < r else 0)


def _raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass


def _tcp_listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(4096)
    return s


def _child(i: int, fds: List[int], drop: List[int], tmpdir: str, files: int,
           ready_w: int, hold_r: int) -> None:
    """An idle load process: keep its sockets, open its files, say ready, sleep until the hold pipe closes."""
    try:
        for fd in drop:
            try:
                os.close(fd)
            except OSError:
                pass
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        held = []
        if files >= 1:  # a log, opened for append
            fd = os.open(os.path.join(tmpdir, "log", f"p{i}.log"),
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(fd, b"started\n")
            held.append(fd)
        if files >= 2:  # a config, opened for read
            held.append(os.open(os.path.join(tmpdir, "etc", "bench.conf"), os.O_RDONLY))
        for k in range(max(0, files - 2)):  # data files, read
            held.append(os.open(os.path.join(tmpdir, "data", f"d{(i + k) % 64}.dat"), os.O_RDONLY))
        os.write(ready_w, b"r")
        os.close(ready_w)
        while os.read(hold_r, 1):  # EOF when the benchmark goes away
            pass
    except BaseException:  # noqa: BLE001 - a load process never runs the parent's code paths
        pass
    finally:
        os._exit(0)


def spawner_main(argv: List[str]) -> int:
    """Build the load; print one JSON line (pids, counts) on stdout when every child is ready; then wait."""
    p = argparse.ArgumentParser(prog="scan_bench.py " + SPAWN_FLAG)
    p.add_argument("--procs", type=int, required=True)
    p.add_argument("--sockets", type=int, required=True)
    p.add_argument("--files", type=int, required=True)
    p.add_argument("--tmpdir", required=True)
    p.add_argument("--hold-fd", type=int, required=True)
    a = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark owns Ctrl-C and kills our group
    n, plan = a.procs, _plan(a.procs, a.sockets)
    _raise_nofile(4 * plan["listeners"] + 4 * (plan["total"] // max(1, n)) + 256)
    for sub in ("log", "etc", "data", "sock"):
        os.makedirs(os.path.join(a.tmpdir, sub), exist_ok=True)
    with open(os.path.join(a.tmpdir, "etc", "bench.conf"), "w") as fh:
        fh.write("listen = 127.0.0.1\nworkers = 1\n")
    for k in range(64):
        with open(os.path.join(a.tmpdir, "data", f"d{k}.dat"), "wb") as fh:
            fh.write(b"x" * 512)

    ready_r, ready_w = os.pipe()
    # Listeners: TCP listener k and named unix listener k belong to child owner(k); the spawner keeps a copy
    # of every TCP listener until all children are forked, so it can accept connections made to it.
    nl = plan["listeners"]
    owner = {(k * n) // nl: k for k in range(nl)} if nl else {}
    tcp_listeners = [_tcp_listener() for _ in range(nl)]
    ports = [s.getsockname()[1] for s in tcp_listeners]
    listener_fds = [s.detach() for s in tcp_listeners]
    udp_ports: List[int] = []
    carry: List[int] = []  # accepted ends of the previous child's connections: they go to the next child
    pids: List[int] = []
    made = {"tcp": 0, "udp": 0, "unix": 0, "unix_named": 0}
    for i in range(n):
        own: List[int] = list(carry)
        carry = []
        if i in owner:
            k = owner[i]
            own.append(listener_fds[k])
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            u.bind(os.path.join(a.tmpdir, "sock", f"l{k}.sock"))
            u.listen(16)
            own.append(u.detach())
            made["tcp"] += 1
            made["unix"] += 1
            made["unix_named"] += 1
        for _ in range(_share(plan["conns"], n, i)):
            c = socket.create_connection(("127.0.0.1", ports[i % nl]))
            srv = socket.socket(fileno=listener_fds[i % nl])
            acc, _addr = srv.accept()
            srv.detach()
            own.append(c.detach())
            (own if i == n - 1 else carry).append(acc.detach())
            made["tcp"] += 2
        for _ in range(_share(plan["udp"], n, i)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            if udp_ports and len(udp_ports) % 2:  # every other one connected to an earlier one
                s.connect(("127.0.0.1", udp_ports[-1]))
            udp_ports.append(s.getsockname()[1])
            own.append(s.detach())
            made["udp"] += 1
        for _ in range(_share(plan["pairs"], n, i)):
            x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            own.extend((x.detach(), y.detach()))
            made["unix"] += 2
        own_set = set(own)
        drop = [fd for fd in listener_fds + carry + [ready_r] if fd not in own_set]
        pid = os.fork()
        if pid == 0:
            _child(i, own, drop, a.tmpdir, a.files, ready_w, a.hold_fd)
        pids.append(pid)
        listener_set = set(listener_fds)
        for fd in own:
            if fd not in listener_set:
                os.close(fd)
    for fd in listener_fds:
        os.close(fd)
    os.close(ready_w)
    got = 0
    while got < n:
        chunk = os.read(ready_r, 65536)
        if not chunk:
            break  # a child died before saying ready
        got += len(chunk)
    made["total"] = made["tcp"] + made["udp"] + made["unix"]
    sys.stdout.write(json.dumps({"pids": pids, "ready": got, "sockets": made,
                                 "files": n * a.files, "spawner": os.getpid()}) + "\n")
    sys.stdout.flush()
    while os.read(a.hold_fd, 1):  # until the benchmark closes the hold pipe (or dies)
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for pid in pids:  # reap them, so the benchmark's wait for us means the load is gone
        try:
            os.waitpid(pid, 0)
        except OSError:
            pass
    return 0


# ============================================================================ the load (benchmark side)
class Load:
    """The spawner process group; `close()` kills all of it and removes the temp dir."""

    def __init__(self, procs: int, sockets: int, files: int) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="asbuilt-bench-")
        self.proc: Optional[subprocess.Popen] = None
        self.hold_r, self.hold_w = os.pipe()
        self.info: dict = {}
        self.procs, self.sockets, self.files = procs, sockets, files

    def start(self, timeout: float = 300.0) -> dict:
        cmd = [sys.executable, os.path.abspath(__file__), SPAWN_FLAG, "--procs", str(self.procs),
               "--sockets", str(self.sockets), "--files", str(self.files), "--tmpdir", self.tmpdir,
               "--hold-fd", str(self.hold_r)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     pass_fds=(self.hold_r,), start_new_session=True)
        os.close(self.hold_r)
        self.hold_r = -1
        timer = threading.Timer(timeout, self._kill_group)
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line:
            raise RuntimeError(f"load spawner exited (rc={self.proc.poll()}) before the load was ready")
        self.info = json.loads(line)
        if self.info["ready"] < self.procs:
            raise RuntimeError(f"only {self.info['ready']} of {self.procs} load processes became ready")
        return self.info

    def _kill_group(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass

    def close(self) -> None:
        if self.hold_w >= 0:
            os.close(self.hold_w)  # children see EOF and exit
            self.hold_w = -1
        if self.hold_r >= 0:
            os.close(self.hold_r)
            self.hold_r = -1
        if self.proc is not None:
            if self.info:  # ready: the spawner kills and reaps its children on the hold pipe's EOF
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            self._kill_group()  # still building, stuck, or a straggler: the whole group goes
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None
        shutil.rmtree(self.tmpdir, ignore_errors=True)


# ================================================================================================ measuring
class Tool:
    def __init__(self, name: str, argv: List[str], output: str = "") -> None:
        self.name, self.argv, self.output = name, argv, output
        self.runs: List[dict] = []
        self.error = ""

    def ok_runs(self) -> List[dict]:
        return [r for r in self.runs if r["rc"] == 0]


TIME = "/usr/bin/time"  # GNU time: its small fork gives a true peak RSS (see run_once)


def run_once(argv: List[str], timeout: float) -> dict:
    """Run argv with stdout discarded: wall time, user+sys CPU (wait4's rusage) and peak RSS.

    Linux carries a process's peak RSS across exec, so a tool forked straight from this Python process reports at
    least this process's RSS. When GNU time is installed the tool is forked from it instead (a ~2 MB process)
    and its %M is the tool's own peak; otherwise wait4's ru_maxrss is used and is a floor of our own RSS."""
    err = tempfile.TemporaryFile()
    rss_file = tempfile.NamedTemporaryFile(prefix="asbuilt-bench-rss-", delete=False)
    rss_file.close()
    use_time = os.access(TIME, os.X_OK)
    full = [TIME, "-f", "%M", "-o", rss_file.name, "--"] + argv if use_time else argv
    try:
        if use_time and not (os.path.isabs(argv[0]) or shutil.which(argv[0])):
            return {"rc": 127, "wall_s": 0.0, "cpu_s": 0.0, "rss_mb": 0.0, "error": f"{argv[0]}: not found"}
        t0 = time.perf_counter()
        try:
            # own process group, so a timeout or Ctrl-C kills the tool and not only GNU time
            p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                 start_new_session=True)
        except OSError as e:
            return {"rc": 127, "wall_s": 0.0, "cpu_s": 0.0, "rss_mb": 0.0,
                    "error": f"cannot start {full[0]}: {e.strerror or e}"}

        def kill_group() -> None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass

        timer = threading.Timer(timeout, kill_group)
        timer.start()
        try:
            _pid, status, ru = os.wait4(p.pid, 0)  # PEP 475: retried on EINTR
        except BaseException:
            kill_group()
            p.wait()
            raise
        finally:
            timer.cancel()
        kill_group()  # nothing of the run outlives it
        wall = time.perf_counter() - t0
        rc = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status >> 8
        p.returncode = rc
        rss_kb = ru.ru_maxrss
        if use_time:
            with open(rss_file.name) as fh:
                nums = [ln.strip() for ln in fh if ln.strip().isdigit()]
            if nums:
                rss_kb = int(nums[-1])
        out = {"rc": rc, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "rss_mb": rss_kb / 1024.0,
               "rss_source": "time %M" if use_time else "wait4 ru_maxrss"}
        if rc != 0:
            err.seek(0)
            lines = [ln for ln in err.read().decode("utf-8", "replace").splitlines()
                     if ln.strip() and not ln.startswith("Command exited with non-zero status")]
            why = f"killed after {timeout:.0f} s" if rc == -signal.SIGKILL else f"rc={rc}"
            out["error"] = f"{why}: {lines[-1].strip() if lines else '(no stderr)'}"
        return out
    finally:
        err.close()
        os.unlink(rss_file.name)


def summarise(tool: Tool) -> dict:
    ok = tool.ok_runs()
    row = {"tool": tool.name, "argv": tool.argv, "runs": tool.runs, "ok": bool(ok)}
    if not ok:
        errs = [r.get("error", "") for r in tool.runs if r.get("error")]
        row["error"] = tool.error or (errs[-1] if errs else "did not run")
        return row
    walls = [r["wall_s"] for r in ok]
    row.update(wall_best_s=min(walls), wall_median_s=statistics.median(walls),
               cpu_median_s=statistics.median(r["cpu_s"] for r in ok),
               rss_peak_mb=max(r["rss_mb"] for r in ok), failed_runs=len(tool.runs) - len(ok))
    return row


# =============================================================================== checking the profile
def profile_contents(path: str, load: dict, tmpdir: str) -> dict:
    """What the written profile holds of the load: processes, sockets by protocol, files under the temp dir."""
    try:
        sys.path.insert(0, REPO)
        from asbuilt.agent.store import load_profile  # noqa: E402 - the venv's editable install
    except ImportError as e:
        return {"error": f"cannot import asbuilt.agent.store ({e}); run with the repo's .venv/bin/python"}
    try:
        prof = load_profile(path)
    except Exception as e:  # noqa: BLE001 - reported, never fatal
        return {"error": f"cannot load {path}: {e}"}
    pids = set(load["pids"])
    found = [p for p in prof.processes if p.pid in pids]
    by_proto: Dict[str, int] = {}
    for p in found:
        for s in p.sockets:
            by_proto[s.proto] = by_proto.get(s.proto, 0) + 1
    files = sum(1 for p in found for f in p.files if f.path.startswith(tmpdir))
    return {"processes_total": len(prof.processes), "sockets_total": sum(len(p.sockets) for p in prof.processes),
            "load_processes": len(found), "load_sockets": sum(by_proto.values()), "load_sockets_by_proto": by_proto,
            "load_files": files}


def coverage_verdicts(profiles: Dict[str, dict], load: dict, procs: int) -> List[dict]:
    """Did the profile really contain the load? (Unnamed unix socketpairs are left out of profiles by design,
    so unix counts only need to reach the named listeners.)"""
    out = []
    made = load["sockets"]
    for name, c in profiles.items():
        if "error" in c:
            out.append({"target": f"{name}: profile holds the load", "ok": False, "detail": c["error"]})
            continue
        got = c["load_sockets_by_proto"]
        missing = []
        if c["load_processes"] < procs:
            missing.append(f"processes {c['load_processes']}/{procs}")
        for proto in ("tcp", "udp"):
            if got.get(proto, 0) < made[proto]:
                missing.append(f"{proto} {got.get(proto, 0)}/{made[proto]}")
        if got.get("unix", 0) < made["unix_named"]:
            missing.append(f"named unix {got.get('unix', 0)}/{made['unix_named']}")
        if c["load_files"] < load["files"]:
            missing.append(f"files {c['load_files']}/{load['files']}")
        out.append({"target": f"{name}: profile holds the load", "ok": not missing,
                    "detail": "missing " + ", ".join(missing) if missing else
                    f"{c['load_processes']} processes, {c['load_sockets']} sockets, {c['load_files']} files"})
    return out


# ==================================================================================================== report
def fmt_row(row: dict, ref: Optional[float]) -> str:
    if not row["ok"]:
        return f"{row['tool']:<24} FAILED  {row['error']}"
    ratio = f"{row['wall_median_s'] / ref:6.2f}x" if ref else "     -"
    extra = f"  ({row['failed_runs']} failed runs)" if row.get("failed_runs") else ""
    return (f"{row['tool']:<24} {row['wall_best_s']:8.3f} {row['wall_median_s']:8.3f} {row['cpu_median_s']:8.3f} "
            f"{row['rss_peak_mb']:8.1f} {ratio}{extra}")


def verdicts(rows: Dict[str, dict], asbuilt_names: List[str]) -> List[dict]:
    out = []
    lsof = rows.get("lsof -n -P")
    for name in asbuilt_names:
        r = rows.get(name)
        if not r or not r["ok"]:
            out.append({"target": f"{name}: runs", "ok": False, "detail": (r or {}).get("error", "not run")})
            continue
        out.append({"target": f"{name}: wall < {WALL_TARGET_S:g} s", "ok": r["wall_median_s"] < WALL_TARGET_S,
                    "detail": f"median {r['wall_median_s']:.3f} s, best {r['wall_best_s']:.3f} s"})
        out.append({"target": f"{name}: peak RSS < {RSS_TARGET_MB:g} MB", "ok": r["rss_peak_mb"] < RSS_TARGET_MB,
                    "detail": f"{r['rss_peak_mb']:.1f} MB"})
        if lsof and lsof["ok"]:
            out.append({"target": f"{name}: wall <= lsof -n -P",
                        "ok": r["wall_median_s"] <= lsof["wall_median_s"],
                        "detail": f"{r['wall_median_s']:.3f} s vs {lsof['wall_median_s']:.3f} s "
                                  f"(asbuilt/lsof = {r['wall_median_s'] / lsof['wall_median_s']:.2f}x)"
                                  if lsof["wall_median_s"] > 0 else ""})
        else:
            out.append({"target": f"{name}: wall <= lsof -n -P", "ok": None,
                        "detail": "lsof did not run: " + ((lsof or {}).get("error") or "missing")})
    return out


def print_report(res: dict) -> None:
    a = res["config"]
    ld = res["load"]
    print(f"load: {a['procs']} idle processes, {ld['sockets']['total']} sockets "
          f"(tcp {ld['sockets']['tcp']}, udp {ld['sockets']['udp']}, unix {ld['sockets']['unix']}), "
          f"{ld['files']} open files; built in {res['load_seconds']:.1f} s; "
          f"host {res['host_processes']} processes; {a['repeat']} repeats, alternating; cpus {os.cpu_count()}")
    ref_row = res["rows"].get(res["reference"])
    ref = ref_row["wall_median_s"] if ref_row and ref_row["ok"] else None
    print()
    print(f"{'tool':<24} {'wall-best':>8} {'wall-med':>8} {'cpu-med':>8} {'rss-MB':>8} {'wall/asbuilt':>7}")
    print("-" * 78)
    for name in res["order"]:
        print(fmt_row(res["rows"][name], ref))
    print(f"(seconds; ratio = tool's median wall / `{res['reference']}` median wall; rss = peak RSS; "
          f"--no-pkgs = --no-verify --no-packages)")
    print()
    for name, c in res["profiles"].items():
        if "error" in c:
            print(f"profile of {name}: {c['error']}")
            continue
        got, made = c["load_sockets_by_proto"], ld["sockets"]
        print(f"profile of {name}: {c['processes_total']} processes, {c['sockets_total']} sockets in all; "
              f"of the load: {c['load_processes']}/{a['procs']} processes, "
              f"{c['load_sockets']}/{made['total']} sockets (tcp {got.get('tcp', 0)}/{made['tcp']}, "
              f"udp {got.get('udp', 0)}/{made['udp']}, unix {got.get('unix', 0)}/{made['unix']} "
              f"of which {made['unix_named']} named), {c['load_files']}/{ld['files']} files")
    print()
    for v in res["verdicts"]:
        mark = "PASS" if v["ok"] else ("n/a " if v["ok"] is None else "FAIL")
        print(f"{mark}  {v['target']:<50} {v['detail']}")


# ====================================================================================================== main
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=1000, help="idle load processes (default 1000)")
    p.add_argument("--sockets", type=int, default=10000, help="sockets held by the load, in all (default 10000)")
    p.add_argument("--files-per-proc", type=int, default=3, help="files each load process holds open (default 3)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each tool; best and median reported (default 3)")
    p.add_argument("--cmd", default=os.path.join(REPO, ".venv", "bin", "asbuilt"),
                   help="the asbuilt command (default the repo's .venv/bin/asbuilt)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a tool run is killed")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    a = p.parse_args(argv)
    if a.procs < 1 or a.sockets < 0 or a.files_per_proc < 0 or a.repeat < 1:
        p.error("--procs and --repeat must be >= 1, --sockets and --files-per-proc >= 0")
    return a


def main(argv: Optional[List[str]] = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.geteuid() != 0:
        print("scan_bench: not root: ss -p, lsof and asbuilt will not see other users' processes",
              file=sys.stderr)
    load = Load(a.procs, a.sockets, a.files_per_proc)
    try:
        t0 = time.perf_counter()
        info = load.start()
        load_s = time.perf_counter() - t0
        out_plain = os.path.join(load.tmpdir, "scan-noverify.msgpack")
        out_verify = os.path.join(load.tmpdir, "scan.msgpack")
        out_bare = os.path.join(load.tmpdir, "scan-nopkgs.msgpack")
        tools = [
            Tool("asbuilt scan", [a.cmd, "scan", "-o", out_verify], out_verify),
            Tool("asbuilt scan --no-verify", [a.cmd, "scan", "-o", out_plain, "--no-verify"], out_plain),
            # informative: the host/process/socket scan alone, without the dpkg/rpm index
            Tool("asbuilt scan --no-pkgs", [a.cmd, "scan", "-o", out_bare, "--no-verify", "--no-packages"],
                 out_bare),
            Tool("ps -eo pid,ppid,user,args", ["ps", "-eo", "pid,ppid,user,args"]),
            Tool("ss -tunapx", ["ss", "-tunapx"]),
            Tool("lsof -n -P", ["lsof", "-n", "-P"]),
        ]
        for t in tools:
            exe = t.argv[0]
            if not (os.path.isabs(exe) and os.access(exe, os.X_OK)) and not shutil.which(exe):
                t.error = f"{exe}: not found"
        for r in range(a.repeat):
            order = tools if r % 2 == 0 else list(reversed(tools))  # alternate so no tool always runs first
            for t in order:
                if t.error:
                    continue
                run = run_once(t.argv, a.timeout)
                t.runs.append(run)
                if not a.json:
                    state = "ok" if run["rc"] == 0 else run.get("error", "failed")
                    print(f"  run {r + 1}/{a.repeat} {t.name:<26} {run['wall_s']:7.3f} s  {state}",
                          file=sys.stderr, flush=True)
        rows = {t.name: summarise(t) for t in tools}
        profiles = {t.name: profile_contents(t.output, info, load.tmpdir)
                    for t in tools if t.output and rows[t.name]["ok"]}
        asbuilt_names = ["asbuilt scan", "asbuilt scan --no-verify"]  # the targets apply to these
        res = {
            "config": {"procs": a.procs, "sockets": a.sockets, "files_per_proc": a.files_per_proc,
                       "repeat": a.repeat, "cmd": a.cmd, "cpus": os.cpu_count()},
            "targets": {"wall_s": WALL_TARGET_S, "rss_mb": RSS_TARGET_MB, "vs": "lsof -n -P"},
            "load": {k: info[k] for k in ("sockets", "files", "ready")},
            "load_seconds": load_s,
            "host_processes": sum(1 for d in os.listdir("/proc") if d.isdigit()),
            "reference": "asbuilt scan", "order": [t.name for t in tools], "rows": rows, "profiles": profiles,
            "verdicts": verdicts(rows, asbuilt_names) + coverage_verdicts(profiles, info, a.procs),
        }
        if a.json:
            json.dump(res, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print_report(res)
        return 0
    except RuntimeError as e:
        print(f"scan_bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("scan_bench: interrupted", file=sys.stderr)
        return 130
    finally:
        load.close()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == SPAWN_FLAG:
        sys.exit(spawner_main(sys.argv[2:]))
    sys.exit(main())
