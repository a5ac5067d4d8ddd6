#!/usr/bin/env python3
"""Trace overhead benchmark: a syscall-heavy redis under `asbuilt trace`, `strace -f` and bcc's syscount.

Starts its own `redis-server` on a free loopback port (no persistence), then, over several rounds, runs the same
fixed `redis-benchmark -q -n N -c 50 -t get,set,incr,lpush` against it untraced and under each tracer in turn,
alternating the order of the modes between rounds, and prints throughput per mode (each round, median, ratio to
untraced), the tracer's own CPU and peak RSS over the load, and how long it took to attach. A last step traces a
30 s window of the same load with `asbuilt trace -o profile.msgpack` while `strace -f -o log` records the same
window, and compares the two sizes. Then one PASS/FAIL line per target of the issue:

    throughput with every default probe on >= 97 % of untraced; agent CPU < 25 % of one core;
    agent peak RSS < 150 MB; probes attached within 5 s of the command starting;
    a 30 s profile < 1 % of the `strace -f` log of the same window.

Not a test: it measures and reports; the exit status is 0 unless redis could not be started.
Run as root with the repo's venv (see benchmarks/README.md):

    .venv/bin/python benchmarks/trace_bench.py [--rounds 3] [--seconds 10] [--json out.json]

Stdlib only, plus asbuilt's own load_profile to say what the 30 s profile holds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THROUGHPUT_TARGET = 0.97
CPU_TARGET_PCT = 25.0
RSS_TARGET_MB = 150.0
ATTACH_TARGET_S = 5.0
SIZE_TARGET = 0.01
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
FLOOR_PROBE = os.path.join(REPO, "benchmarks", "floor_probe.py")
CAPTURE_THREAD = "asbuilt-capture"  # the capture probe names its thread (prctl PR_SET_NAME)
CAPTURE_RATIO_TARGET = 0.97  # throughput with capture / without (--no-capture)
CAPTURE_CPU_TARGET_PCT = 15.0

ASBUILT_ATTACHED = re.compile(r"asbuilt: tracing pid \d+ mode=(\S+) attached in ([\d.]+)s: ?(.*)")
ASBUILT_PROGRESS = re.compile(r"asbuilt: trace\s+([\d.]+)s\s+events (\d+)\s+new facts (\d+)\s+lost (\d+)")
RPS_LINE = re.compile(r"^\s*([A-Za-z_]+)(?: \(.*\))?: ([\d.]+) requests per second")


def log(msg: str) -> None:
    sys.stderr.write(f"[trace_bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ========================================================================================== /proc readings
def proc_cpu_ticks(pid: int) -> Optional[int]:
    """utime+stime of a process (all its threads, live and exited), in clock ticks; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


def thread_cpu_ticks(pid: int, comm: str) -> Optional[int]:
    """utime+stime of the live threads of ``pid`` named ``comm`` (capture figures); None when there is none."""
    total, found = 0, False
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as fh:
                text = fh.read().decode("ascii", "replace")
        except OSError:
            continue
        if text[text.find("(") + 1:text.rfind(")")] != comm:
            continue
        fields = text[text.rfind(")") + 2:].split()
        total, found = total + int(fields[11]) + int(fields[12]), True
    return total if found else None


def proc_status_kb(pid: int, key: str) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh.read().decode("ascii", "replace").splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def host_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy (not idle/iowait) over ``seconds``, from /proc/stat."""
    def read() -> Tuple[int, int]:
        with open("/proc/stat", "rb") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle
    t0, i0 = read()
    time.sleep(seconds)
    t1, i1 = read()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


# ========================================================================================== child processes
class Child:
    """A process the benchmark started: own session (a terminal's Ctrl-C reaches only the benchmark), stdout and
    stderr read line by line in threads with arrival times, reaped with wait4 for its rusage."""

    live: List["Child"] = []

    def __init__(self, name: str, argv: List[str], env: Optional[Dict[str, str]] = None,
                 ready: Optional[Callable[[str, str], bool]] = None, keep_stdout: bool = True) -> None:
        self.name, self.argv = name, argv
        self.role = "tracer"  # or "load", "server": decides how cleanup stops it
        self.ready_test = ready
        self.ready_at: Optional[float] = None
        self.ready_event = threading.Event()
        self.lines: List[Tuple[float, str, str]] = []  # (monotonic, stream, line)
        self.rc: Optional[int] = None
        self.maxrss_kb: Optional[int] = None
        self.ended_at: Optional[float] = None
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if keep_stdout else subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, env=env, start_new_session=True)
        self.pid = self.proc.pid
        Child.live.append(self)
        self._threads = []
        for stream, fh in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            if fh is not None:
                t = threading.Thread(target=self._read, args=(stream, fh), daemon=True)
                t.start()
                self._threads.append(t)

    def _read(self, stream: str, fh) -> None:
        buf = b""
        while True:
            chunk = fh.read1(65536) if hasattr(fh, "read1") else fh.read(65536)
            if not chunk:
                break
            buf += chunk
            parts = re.split(rb"[\r\n]", buf)
            buf = parts.pop()
            now = time.monotonic()
            for raw in parts:
                if not raw.strip():
                    continue
                line = raw.decode("utf-8", "replace")
                self.lines.append((now, stream, line))
                if self.ready_test is not None and not self.ready_event.is_set() and self.ready_test(stream, line):
                    self.ready_at = now
                    self.ready_event.set()
        if buf.strip():
            self.lines.append((time.monotonic(), stream, buf.decode("utf-8", "replace")))

    def text(self, stream: Optional[str] = None) -> str:
        return "\n".join(line for _, s, line in self.lines if stream is None or s == stream)

    def alive(self) -> bool:
        return self.rc is None and self._reap(os.WNOHANG)

    def _reap(self, flags: int) -> bool:
        """True while still running."""
        if self.rc is not None:
            return False
        try:
            pid, status, ru = os.wait4(self.pid, flags)
        except ChildProcessError:
            self.rc = self.proc.returncode if self.proc.returncode is not None else -1
            return False
        if pid == 0:
            return True
        self.rc = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status
        self.proc.returncode = self.rc  # Popen must not wait for it again
        self.maxrss_kb = ru.ru_maxrss
        self.ended_at = time.monotonic()
        if self in Child.live:
            Child.live.remove(self)
        return False

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for exit; True if it exited within ``timeout``."""
        end = None if timeout is None else time.monotonic() + timeout
        while self._reap(os.WNOHANG):
            if end is not None and time.monotonic() >= end:
                return False
            time.sleep(0.02)
        for t in self._threads:
            t.join(1.0)
        return True

    def send(self, sig: int) -> None:
        if self.rc is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, sig: int = signal.SIGINT, grace: float = 30.0) -> bool:
        """Ask it to stop (a tracer detaches cleanly on SIGINT), SIGKILL its group after ``grace`` s.
        True when it stopped on its own."""
        if self.rc is not None:
            return True
        self.send(sig)
        if self.wait(grace):
            return True
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait(5.0)
        return False


def cleanup_children() -> None:
    """Tracers first (SIGINT so bcc and strace detach cleanly), then load generators, then redis."""
    order = {"tracer": 0, "load": 1, "server": 2}
    for child in sorted(list(Child.live), key=lambda c: order.get(getattr(c, "role", "tracer"), 0)):
        role = getattr(child, "role", "tracer")
        if role == "load":
            child.stop(signal.SIGKILL, grace=5.0)
        elif role == "server":
            child.stop(signal.SIGTERM, grace=10.0)
        else:
            child.stop(signal.SIGINT, grace=20.0)


# ========================================================================================== redis
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_ping(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(server: str, port: int, tmpdir: str) -> Child:
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", tmpdir, "--logfile", os.path.join(tmpdir, "redis.log"), "--daemonize", "no"]
    child = Child("redis-server", argv, keep_stdout=False)
    child.role = "server"
    end = time.monotonic() + 10
    while time.monotonic() < end:
        if not child.alive():
            raise RuntimeError(f"redis-server exited rc={child.rc}: {child.text()[-400:]}")
        if redis_ping(port):
            return child
        time.sleep(0.05)
    raise RuntimeError("redis-server did not answer PING within 10 s")


def parse_rps(text: str) -> Dict[str, float]:
    """{test: requests/s} from `redis-benchmark -q` output (progress lines are separated by CR)."""
    out: Dict[str, float] = {}
    for line in re.split(r"[\r\n]", text):
        m = RPS_LINE.match(line)
        if m:
            out[m.group(1).upper()] = float(m.group(2))
    return out


def run_load(bench: str, port: int, n: int, clients: int, tests: str, timeout: float) -> dict:
    """One redis-benchmark run; throughput = all requests / the sum of each test's time."""
    argv = [bench, "-h", "127.0.0.1", "-p", str(port), "-q", "-n", str(n), "-c", str(clients), "-t", tests]
    t0 = time.monotonic()
    child = Child("redis-benchmark", argv)
    child.role = "load"
    finished = child.wait(timeout)
    wall = time.monotonic() - t0
    if not finished:
        child.stop(signal.SIGKILL, grace=2)
    per_test = parse_rps(child.text("stdout"))
    want = [t.strip().upper() for t in tests.split(",") if t.strip()]
    ok = finished and child.rc == 0 and all(t in per_test for t in want)
    res = {"n": n, "wall_s": round(wall, 3), "per_test_rps": per_test, "ok": ok}
    if ok:
        seconds = sum(n / per_test[t] for t in want)
        res["rps"] = round(len(want) * n / seconds, 1)
    else:
        res["error"] = (f"timed out after {timeout:.0f} s" if not finished else f"rc={child.rc}") + \
            (f", missing {sorted(set(want) - set(per_test))}" if set(want) - set(per_test) else "")
    return res


class LoadLoop:
    """redis-benchmark over and over until stopped (the load for the size window)."""

    def __init__(self, bench: str, port: int, n: int, clients: int, tests: str) -> None:
        self.argv = [bench, "-h", "127.0.0.1", "-p", str(port), "-q", "-n", str(n), "-c", str(clients), "-t", tests]
        self.stopped = threading.Event()
        self.current: Optional[Child] = None
        self.runs = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopped.is_set():
            child = Child("redis-benchmark", self.argv)
            child.role = "load"
            self.current = child
            while not child.wait(0.2):
                if self.stopped.is_set():
                    child.stop(signal.SIGKILL, grace=2)
                    return
            self.runs += 1

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(10)


# ========================================================================================== tracers
class Mode:
    """One way of running the load: untraced, or under a tracer started from ``argv(tmpdir, tag)``."""

    def __init__(self, key: str, label: str, argv: Optional[Callable[[str, str], List[str]]] = None,
                 ready: Optional[Callable[[str, str], bool]] = None, n_div: int = 1,
                 env: Optional[Dict[str, str]] = None, asbuilt: bool = False, flags: str = "") -> None:
        self.key, self.label, self.argv, self.ready = key, label, argv, ready
        self.n_div, self.env, self.asbuilt, self.flags = n_div, env, asbuilt, flags


def asbuilt_ready(stream: str, line: str) -> bool:
    return stream == "stderr" and ASBUILT_ATTACHED.search(line) is not None


def build_modes(args, pid: int) -> List[Mode]:
    cmd = shlex.split(args.cmd)
    hold = f"{args.tracer_timeout:.0f}s"  # a long window, ended by SIGINT when the load is done

    def asbuilt_mode(key: str, label: str, flags: str) -> Mode:
        extra = shlex.split(flags)
        return Mode(key, label, lambda tmp, tag: cmd + ["trace", "--pid", str(pid), "--duration", hold, "-q",
                                                        "--progress", "-o", os.path.join(tmp, f"{tag}.msgpack")]
                    + extra, asbuilt_ready, asbuilt=True, flags=flags)

    def floor_mode(key: str, label: str, which: str) -> Mode:
        return Mode(key, label, lambda tmp, tag: [sys.executable, FLOOR_PROBE, which],
                    lambda s, line: s == "stderr" and line.startswith("floor_probe: attached"))

    known: Dict[str, Mode] = {
        "untraced": Mode("untraced", "untraced"),
        "asbuilt": asbuilt_mode("asbuilt", "asbuilt trace", ""),
        "asbuilt-no-capture": asbuilt_mode("asbuilt-no-capture", "asbuilt trace --no-capture", "--no-capture"),
        "strace": Mode("strace", "strace -f",
                       lambda tmp, tag: [args.strace, "-f", "-o", os.path.join(tmp, f"{tag}.strace"), "-p", str(pid)],
                       lambda s, line: s == "stderr" and "attached" in line, n_div=args.strace_div),
        # do-nothing programs where asbuilt's probes attach: what the kernel's tracepoint dispatch alone costs
        "floor-tp": floor_mode("floor-tp", "floor: 1 null syscall tracepoint", "tp-enter"),
        "floor-raw": floor_mode("floor-raw", "floor: null raw sys_enter", "raw-enter"),
        "floor-raw2": floor_mode("floor-raw2", "floor: null raw sys_enter+sys_exit", "raw-both"),
        "floor-set": floor_mode("floor-set", "floor: null progs, default probe set", "probe-set"),
        "syscount": Mode("syscount", "syscount-bpfcc",
                         lambda tmp, tag: [args.syscount, "-p", str(pid)],
                         lambda s, line: s == "stdout" and line.startswith("Tracing syscalls"),
                         env=dict(os.environ, PYTHONUNBUFFERED="1")),
    }
    modes = []
    for key in [k.strip() for k in args.modes.split(",") if k.strip()]:
        if key not in known:
            raise SystemExit(f"trace_bench: unknown mode {key!r} (known: {', '.join(known)})")
        if key == "strace" and not shutil.which(args.strace):
            log("strace not found: strace row skipped")
            continue
        if key == "syscount" and not os.access(args.syscount, os.X_OK):
            log(f"{args.syscount} not found: syscount row skipped")
            continue
        modes.append(known[key])
    for spec in args.variant:
        name, _, flags = spec.partition("=")
        modes.append(asbuilt_mode("asbuilt-" + name.strip(), f"asbuilt trace {flags.strip()}".strip(), flags))
    if not any(m.key == "untraced" for m in modes):
        modes.insert(0, known["untraced"])
    return modes


def run_mode(args, mode: Mode, rnd: int, tmpdir: str, redis: Child, n: int) -> dict:
    tag = f"{mode.key}-r{rnd + 1}"
    res: dict = {"mode": mode.key, "round": rnd + 1}
    tracer: Optional[Child] = None
    if mode.argv is not None:
        tracer = Child(mode.label, mode.argv(tmpdir, tag), env=mode.env, ready=mode.ready)
        if not tracer.ready_event.wait(args.attach_timeout):
            tracer.stop(grace=20)
            res.update(ok=False, error=f"not attached within {args.attach_timeout:.0f} s "
                       f"(rc={tracer.rc}): {tracer.text('stderr')[-300:]}")
            return res
        res["attach_s"] = round(tracer.ready_at - tracer.started_at, 2)
        if mode.asbuilt:
            m = ASBUILT_ATTACHED.search(tracer.text("stderr"))
            if m:
                res["attach_self_s"] = float(m.group(2))
                res["asbuilt_mode"] = m.group(1)
                res["probes"] = m.group(3).split(";")[0]
        time.sleep(args.settle)
    ticks0 = proc_cpu_ticks(tracer.pid) if tracer else None
    cticks0 = thread_cpu_ticks(tracer.pid, CAPTURE_THREAD) if tracer and mode.asbuilt else None
    rticks0 = proc_cpu_ticks(redis.pid)
    t0 = time.monotonic()
    load = run_load(args.bench, args.port, max(1000, n // mode.n_div), args.clients, args.tests,
                    args.load_timeout)
    window = time.monotonic() - t0
    rticks1 = proc_cpu_ticks(redis.pid)
    res.update(load)
    res["window_s"] = round(window, 2)
    if rticks0 is not None and rticks1 is not None:
        res["redis_cpu_pct"] = round(100.0 * (rticks1 - rticks0) / CLK_TCK / window, 1)
    if tracer is not None:
        ticks1 = proc_cpu_ticks(tracer.pid)
        if cticks0 is not None:
            cticks1 = thread_cpu_ticks(tracer.pid, CAPTURE_THREAD)
            if cticks1 is not None:
                res["capture_cpu_pct"] = round(100.0 * (cticks1 - cticks0) / CLK_TCK / window, 1)
        hwm = proc_status_kb(tracer.pid, "VmHWM")
        rss_now = proc_status_kb(tracer.pid, "VmRSS")
        if ticks0 is not None and ticks1 is not None:
            res["cpu_pct"] = round(100.0 * (ticks1 - ticks0) / CLK_TCK / window, 1)
        if hwm is not None:
            res["hwm_window_mb"] = round(hwm / 1024, 1)
        if rss_now is not None:
            res["rss_window_mb"] = round(rss_now / 1024, 1)
        if not tracer.alive():
            res["ok"] = False
            res["error"] = f"{mode.label} exited during the load (rc={tracer.rc}): {tracer.text('stderr')[-300:]}"
        t_stop = time.monotonic()
        clean = tracer.stop(signal.SIGINT, grace=args.stop_timeout)
        res["stop_s"] = round(time.monotonic() - t_stop, 2)
        res["tracer_rc"] = tracer.rc
        if not clean:
            res["error"] = (res.get("error", "") + f" did not stop within {args.stop_timeout:.0f} s").strip()
        if tracer.maxrss_kb is not None:
            res["maxrss_mb"] = round(tracer.maxrss_kb / 1024, 1)
        if mode.asbuilt:
            progress = ASBUILT_PROGRESS.findall(tracer.text("stderr"))
            if progress:
                res["events"], res["lost"] = int(progress[-1][1]), int(progress[-1][3])
            path = os.path.join(tmpdir, f"{tag}.msgpack")
            if os.path.exists(path):
                res["profile_bytes"] = os.path.getsize(path)
            elif clean:
                res["error"] = (res.get("error", "") + " no profile written").strip()
            if tracer.rc not in (0, None):
                res["stderr_tail"] = tracer.text("stderr")[-400:]
        # the strace log of a full-speed run can be large: its size is kept, the file is not
        for suffix in (".strace",):
            path = os.path.join(tmpdir, tag + suffix)
            if os.path.exists(path):
                res["log_bytes"] = os.path.getsize(path)
                os.unlink(path)
    return res


# ========================================================================================== size window
def size_window(args, tmpdir: str, redis_pid: int, n: int) -> dict:
    """`asbuilt trace --duration W -o profile` and `strace -f -o log` over the same window of the same load.

    The load runs first; asbuilt starts; when it says it is attached, its window began ``attached in X s`` earlier,
    so strace is attached then and stopped at the window's end: strace records a little less than asbuilt's window
    (the attach time), which only favours strace."""
    res: dict = {"window_s": args.size_window}
    profile = os.path.join(tmpdir, "size-window.msgpack")
    strace_log = os.path.join(tmpdir, "size-window.strace")
    load = LoadLoop(args.bench, args.port, max(1000, n // 4), args.clients, args.tests)
    strace = None
    try:
        time.sleep(1.0)
        cmd = shlex.split(args.cmd) + ["trace", "--pid", str(redis_pid), "--duration", f"{args.size_window:g}s",
                                       "-q", "--progress", "-o", profile]
        asb = Child("asbuilt trace", cmd, ready=asbuilt_ready)
        if not asb.ready_event.wait(args.attach_timeout):
            asb.stop(grace=20)
            res["error"] = f"asbuilt not attached: {asb.text('stderr')[-300:]}"
            return res
        m = ASBUILT_ATTACHED.search(asb.text("stderr"))
        window_start = asb.ready_at - (float(m.group(2)) if m else 0.0)
        window_end = window_start + args.size_window
        if shutil.which(args.strace):
            strace = Child("strace -f", [args.strace, "-f", "-o", strace_log, "-p", str(redis_pid)],
                           ready=lambda s, line: s == "stderr" and "attached" in line)
            strace.ready_event.wait(10)
            strace_start = time.monotonic()
        while time.monotonic() < window_end and asb.alive():
            time.sleep(0.05)
        if strace is not None:
            strace.stop(signal.SIGINT, grace=15)
            res["strace_seconds"] = round(time.monotonic() - strace_start, 2)
        finished = asb.wait(args.size_window + args.stop_timeout)
        if not finished:
            asb.stop(grace=10)
        res["asbuilt_rc"] = asb.rc
        res["asbuilt_wall_s"] = round((asb.ended_at or time.monotonic()) - asb.started_at, 2)
        progress = ASBUILT_PROGRESS.findall(asb.text("stderr"))
        if progress:
            res["asbuilt_final_elapsed_s"] = float(progress[-1][0])
            res["events"], res["lost"] = int(progress[-1][1]), int(progress[-1][3])
        if os.path.exists(profile):
            res["profile_bytes"] = os.path.getsize(profile)
            res["profile"] = profile_summary(profile)
        else:
            res["error"] = f"no profile written (rc={asb.rc}): {asb.text('stderr')[-300:]}"
        if strace is not None and os.path.exists(strace_log):
            res["strace_bytes"] = os.path.getsize(strace_log)
            with open(strace_log, "rb") as fh:
                res["strace_lines"] = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
            os.unlink(strace_log)
        res["load_runs"] = load.runs
    finally:
        load.stop()
        if strace is not None and strace.rc is None:
            strace.stop(signal.SIGINT, grace=15)
    return res


def profile_summary(path: str) -> dict:
    """What the profile holds (counts), via asbuilt's own loader; {} if it cannot be imported."""
    try:
        sys.path.insert(0, REPO)
        from asbuilt.agent.store import load_profile
    except Exception:
        return {}
    try:
        prof = load_profile(path)
    except Exception as err:  # the figure is still worth printing
        return {"error": f"{type(err).__name__}: {err}"}
    out = {}
    for name in ("processes", "packages"):
        val = getattr(prof, name, None)
        if isinstance(val, (list, dict)):
            out[name] = len(val)
    procs = getattr(prof, "processes", None) or []
    if isinstance(procs, dict):
        procs = list(procs.values())
    for field in ("files", "sockets", "peers", "syscalls"):
        total = 0
        for p in procs:
            val = getattr(p, field, None)
            if isinstance(val, (list, dict)):
                total += len(val)
        out[field] = total
    return out


# ========================================================================================== report
def median(vals: List[float]) -> Optional[float]:
    return statistics.median(vals) if vals else None


def summarise(modes: List[Mode], runs: List[dict]) -> Dict[str, dict]:
    rows: Dict[str, dict] = {}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode.key]
        ok = [r for r in mine if r.get("ok") and "rps" in r]
        row = {"label": mode.label, "rounds": [r.get("rps") for r in mine], "median_rps": median([r["rps"] for r in ok]),
               "failed": [r.get("error", "?") for r in mine if not r.get("ok")]}
        for key in ("cpu_pct", "hwm_window_mb", "rss_window_mb", "maxrss_mb", "attach_s", "attach_self_s", "stop_s", "lost",
                    "profile_bytes", "log_bytes", "redis_cpu_pct", "capture_cpu_pct"):
            vals = [r[key] for r in mine if key in r]
            if vals:
                row[key] = {"median": median(vals), "max": max(vals), "min": min(vals)}
        tests = sorted({t for r in ok for t in r["per_test_rps"]})
        row["per_test_median_rps"] = {t: median([r["per_test_rps"][t] for r in ok if t in r["per_test_rps"]])
                                      for t in tests}
        rows[mode.key] = row
    base = rows.get("untraced", {}).get("median_rps")
    for row in rows.values():
        row["ratio"] = round(row["median_rps"] / base, 4) if base and row["median_rps"] else None
        row["per_test_ratio"] = {t: round(v / rows["untraced"]["per_test_median_rps"][t], 4)
                                 for t, v in row["per_test_median_rps"].items()
                                 if base and rows["untraced"]["per_test_median_rps"].get(t)}
    return rows


def _num(v, fmt: str = "{:.0f}", width: int = 8) -> str:
    return (fmt.format(v) if isinstance(v, (int, float)) else "-").rjust(width)


def _stat(row: dict, key: str, which: str = "max", fmt: str = "{:.1f}", width: int = 7) -> str:
    v = row.get(key, {}).get(which) if isinstance(row.get(key), dict) else None
    return _num(v, fmt, width)


def verdicts(rows: Dict[str, dict], size: Optional[dict]) -> List[dict]:
    out = []
    a = rows.get("asbuilt")

    def add(name: str, ok: Optional[bool], detail: str) -> None:
        out.append({"target": name, "verdict": "n/a" if ok is None else ("PASS" if ok else "FAIL"), "detail": detail})

    if a is None:
        add("asbuilt rows", None, "mode 'asbuilt' not run")
        return out
    ratio = a.get("ratio")
    add(f"throughput >= {THROUGHPUT_TARGET:.0%} of untraced (every default probe on)",
        None if ratio is None else ratio >= THROUGHPUT_TARGET,
        f"median {a['median_rps'] or 0:.0f} vs {rows['untraced']['median_rps'] or 0:.0f} req/s = "
        f"{(ratio or 0):.1%}")
    floors = [(rows[k]["label"], rows[k]["ratio"]) for k in ("floor-tp", "floor-raw", "floor-raw2", "floor-set")
              if rows.get(k, {}).get("ratio") is not None]
    if floors:
        below = [f for f in floors if f[1] < THROUGHPUT_TARGET]
        add(f"floor: do-nothing programs where the probes attach keep >= {THROUGHPUT_TARGET:.0%} (is the target "
            "reachable here at all?)", not below,
            "; ".join(f"{label.split(': ', 1)[-1]} {ratio:.1%}" for label, ratio in floors)
            + (" -- below the target, so no probe attached there can meet it on this host" if below else ""))
    nc = rows.get("asbuilt-no-capture")
    if nc is not None and nc.get("ratio") is not None:
        add(f"throughput >= {THROUGHPUT_TARGET:.0%} of untraced with --no-capture (information)",
            nc["ratio"] >= THROUGHPUT_TARGET, f"{nc['ratio']:.1%}")
    if nc is not None and nc.get("median_rps") and a.get("median_rps"):
        cap = a["median_rps"] / nc["median_rps"]
        add(f"capture: throughput with capture >= {CAPTURE_RATIO_TARGET:.0%} of the same trace with --no-capture",
            cap >= CAPTURE_RATIO_TARGET, f"median {a['median_rps']:.0f} vs {nc['median_rps']:.0f} req/s = {cap:.1%}")
    ccpu = a.get("capture_cpu_pct", {}).get("max")
    extra = ""
    if nc is not None and a.get("cpu_pct") and nc.get("cpu_pct"):
        extra = (f"; tracer CPU median {a['cpu_pct']['median']:.1f}% with capture vs {nc['cpu_pct']['median']:.1f}% "
                 "without")
    add(f"capture: capture thread CPU < {CAPTURE_CPU_TARGET_PCT:.0f}% of one core while the load runs",
        None if ccpu is None else ccpu < CAPTURE_CPU_TARGET_PCT,
        (f"max {ccpu}% (median {a['capture_cpu_pct']['median']:.1f}%) over the rounds" if ccpu is not None
         else "no reading (thread not found)") + extra)
    cpu = a.get("cpu_pct", {}).get("max")
    add(f"agent CPU < {CPU_TARGET_PCT:.0f}% of one core while tracing the load", None if cpu is None else cpu < CPU_TARGET_PCT,
        f"max {cpu}% (median {a.get('cpu_pct', {}).get('median')}%) over the rounds" if cpu is not None else "no reading")
    rss = a.get("maxrss_mb", {}).get("max")
    add(f"agent peak RSS < {RSS_TARGET_MB:.0f} MB", None if rss is None else rss < RSS_TARGET_MB,
        f"max {rss} MB over the whole run (wait4 ru_maxrss, final scan included); at the end of the load "
        f"VmHWM max {a.get('hwm_window_mb', {}).get('max')} MB, VmRSS max {a.get('rss_window_mb', {}).get('max')} MB"
        if rss is not None else "no reading")
    att = a.get("attach_s", {}).get("max")
    add(f"probes attached within {ATTACH_TARGET_S:.0f} s of the command starting",
        None if att is None else att < ATTACH_TARGET_S,
        f"max {att} s from exec to the 'attached' line (asbuilt's own figure, after its initial scan: "
        f"max {a.get('attach_self_s', {}).get('max')} s)" if att is not None else "no reading")
    if size is not None:
        pb, sb = size.get("profile_bytes"), size.get("strace_bytes")
        if pb and sb:
            add(f"{size['window_s']:g} s profile < {SIZE_TARGET:.0%} of the strace -f log", pb / sb < SIZE_TARGET,
                f"{pb} B vs {sb} B = {pb / sb:.4%}")
        else:
            add(f"{size['window_s']:g} s profile < {SIZE_TARGET:.0%} of the strace -f log", None,
                size.get("error", "no strace log or no profile"))
    return out


def print_report(res: dict) -> None:
    cfg, rows = res["config"], res["rows"]
    p = print
    p(f"trace overhead: redis-server {cfg['redis_version']} on 127.0.0.1:{cfg['port']}, "
      f"redis-benchmark -q -n {cfg['n']} -c {cfg['clients']} -t {cfg['tests']}; {cfg['rounds']} rounds, "
      f"order alternating; {cfg['cpus']} CPUs; host busy before start {cfg['host_busy_before']:.0%}")
    if cfg.get("strace_n"):
        p(f"strace runs use -n {cfg['strace_n']} (N/{cfg['strace_div']}: it would take ~20x longer); "
          "throughput is per second either way")
    p("")
    rounds = cfg["rounds"]
    head = f"{'mode':<36}" + "".join(f"{'r' + str(i + 1) + ' req/s':>10}" for i in range(rounds)) + \
        f"{'median':>10}{'ratio':>8}{'cpu%':>7}{'peakMB':>7}{'hwmMB':>7}{'rssMB':>7}{'attach':>7}{'stop':>6}{'redis%':>7}" \
        f"{'cap%':>6}"
    p(head)
    p("-" * len(head))
    for key, row in rows.items():
        line = f"{row['label'][:35]:<36}" + "".join(_num(v, width=10) for v in (row["rounds"] + [None] * rounds)[:rounds])
        line += _num(row["median_rps"], width=10) + _num(row["ratio"], "{:.1%}", 8)
        line += _stat(row, "cpu_pct", "max") + _stat(row, "maxrss_mb", "max", "{:.0f}") + \
            _stat(row, "hwm_window_mb", "max", "{:.0f}") + _stat(row, "rss_window_mb", "max", "{:.0f}") + \
            _stat(row, "attach_s", "max") + \
            _stat(row, "stop_s", "max", "{:.1f}", 6) + _stat(row, "redis_cpu_pct", "median", "{:.0f}") + \
            _stat(row, "capture_cpu_pct", "max", "{:.1f}", 6)
        p(line)
        for err in row["failed"]:
            p(f"    failed run: {err}")
    p("")
    p("cpu% = tracer's user+sys over the load window, % of one core; peakMB = peak RSS over the tracer's whole run")
    p("(wait4 ru_maxrss: never below the benchmark's own ~17 MB, carried across exec); hwmMB / rssMB = VmHWM / VmRSS")
    p("at the end of the load; attach = s from exec to attached; stop = s from SIGINT to exit (asbuilt: last drain,")
    p("final scan, packages, write); all max over rounds; redis% = redis-server's CPU over the load (median);")
    p(f"cap% = CPU of asbuilt's capture thread ({CAPTURE_THREAD}) over the load, max over rounds (its kernel-side")
    p("cost, the packet taps in the traced server's own network path, shows in the throughput instead)")
    tests = list(rows.get("untraced", {}).get("per_test_median_rps", {}))
    if tests:
        p("")
        p(f"{'per test: ratio to untraced':<36}" + "".join(f"{t:>10}" for t in tests))
        for key, row in rows.items():
            if key == "untraced":
                p(f"{'untraced (req/s)':<36}" + "".join(_num(row['per_test_median_rps'].get(t), width=10) for t in tests))
                continue
            p(f"{row['label'][:35]:<36}" + "".join(_num(row['per_test_ratio'].get(t), '{:.1%}', 10) for t in tests))
    a_runs = [r for r in res["runs"] if r["mode"].startswith("asbuilt")]
    if a_runs:
        p("")
        p("asbuilt runs: " + "; ".join(
            f"{r['mode']} r{r['round']}: events {r.get('events', '-')}, lost {r.get('lost', '-')}, "
            f"profile {r.get('profile_bytes', '-')} B" for r in a_runs))
    s_runs = [r for r in res["runs"] if "log_bytes" in r]
    if s_runs:
        p("strace logs of the overhead runs: " + ", ".join(
            f"r{r['round']} {r['log_bytes'] / 1e6:.1f} MB for {r['n']}x{len(cfg['tests'].split(','))} requests"
            for r in s_runs))
    size = res.get("size")
    if size:
        p("")
        pb, sb = size.get("profile_bytes"), size.get("strace_bytes")
        p(f"size, {size['window_s']:g} s window of the same load: asbuilt profile {pb if pb is not None else '-'} B"
          f" {json.dumps(size.get('profile', {}))}; strace -f log {sb if sb is not None else '-'} B "
          f"({size.get('strace_lines', '-')} lines, strace attached {size.get('strace_seconds', '-')} s)"
          + (f"; ratio {pb / sb:.4%}" if pb and sb else ""))
        if "asbuilt_final_elapsed_s" in size:
            p(f"  asbuilt --duration {size['window_s']:g}s: window closed at {size['asbuilt_final_elapsed_s']} s, "
              f"process ran {size.get('asbuilt_wall_s')} s; events {size.get('events')}, lost {size.get('lost')}")
        if size.get("error"):
            p(f"  error: {size['error']}")
    p("")
    for v in res["verdicts"]:
        p(f"{v['verdict']:<5} {v['target']}: {v['detail']}")
    p(f"\ntotal benchmark time {res['elapsed_s']:.0f} s")


# ========================================================================================== main
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="asbuilt trace overhead on redis vs strace -f and syscount")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=10.0, help="size each untraced run to about this long")
    p.add_argument("-n", "--requests", type=int, default=0, help="requests per test (overrides --seconds)")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--tests", default="get,set,incr,lpush")
    p.add_argument("--modes", default="untraced,asbuilt,asbuilt-no-capture,strace,syscount,floor-tp,floor-raw,floor-raw2,floor-set")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="an extra asbuilt row with these trace flags, e.g. nebpf='--no-ebpf --no-capture'")
    p.add_argument("--strace-div", type=int, default=20, help="strace runs use N / this many requests")
    p.add_argument("--size-window", type=float, default=30.0, help="seconds; 0 skips the size step")
    p.add_argument("--cmd", default=os.path.join(REPO, ".venv", "bin", "asbuilt"))
    p.add_argument("--redis-server", dest="server", default=shutil.which("redis-server") or "redis-server")
    p.add_argument("--redis-benchmark", dest="bench", default=shutil.which("redis-benchmark") or "redis-benchmark")
    p.add_argument("--strace", default="strace")
    p.add_argument("--syscount", default="/usr/sbin/syscount-bpfcc")
    p.add_argument("--port", type=int, default=0, help="redis port (default: a free one)")
    p.add_argument("--settle", type=float, default=0.5, help="seconds between attach and load")
    p.add_argument("--attach-timeout", type=float, default=60.0)
    p.add_argument("--stop-timeout", type=float, default=60.0)
    p.add_argument("--load-timeout", type=float, default=180.0)
    p.add_argument("--tracer-timeout", type=float, default=900.0, help="asbuilt --duration for overhead runs")
    p.add_argument("--json", default="", help="also write every figure here")
    return p.parse_args(argv)


def _on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # same clean-up as Ctrl-C


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if os.geteuid() != 0:
        log("not root: asbuilt, strace -p and syscount need root; rows will fail")
    for tool in (args.server, args.bench):
        if not shutil.which(tool):
            log(f"{tool} not found (Debian: apt-get install redis-server redis-tools)")
            return 2
    started = time.monotonic()
    tmpdir = tempfile.mkdtemp(prefix="asbuilt-tracebench-")
    res: dict = {}
    try:
        busy = host_busy(1.0)
        if busy > 0.10:
            log(f"host already {busy:.0%} busy before the benchmark: figures will be noisy")
        args.port = args.port or free_port()
        redis = start_redis(args.server, args.port, tmpdir)
        version = subprocess.run([args.server, "--version"], capture_output=True, text=True).stdout.split()
        log(f"redis-server pid {redis.pid} on 127.0.0.1:{args.port}")
        modes = build_modes(args, redis.pid)

        # warm-up (not counted) and sizing
        tests_n = len([t for t in args.tests.split(",") if t.strip()])
        warm = run_load(args.bench, args.port, 50000, args.clients, args.tests, args.load_timeout)
        if not warm.get("ok"):
            raise RuntimeError(f"redis-benchmark failed: {warm.get('error')}")
        n = args.requests or max(10000, int(warm["rps"] * args.seconds / tests_n) // 10000 * 10000)
        log(f"warm-up {warm['rps']:.0f} req/s -> -n {n} per test (~{tests_n * n / warm['rps']:.0f} s untraced)")

        runs: List[dict] = []
        for rnd in range(args.rounds):
            k = rnd % len(modes)
            order = modes[k:] + modes[:k]
            if rnd % 2:
                order = order[::-1]
            for mode in order:
                log(f"round {rnd + 1}/{args.rounds}: {mode.label}")
                r = run_mode(args, mode, rnd, tmpdir, redis, n)
                runs.append(r)
                log(f"  -> {r.get('rps', 'FAILED')} req/s" + (f" ({r['error']})" if r.get("error") else "") +
                    (f", tracer cpu {r['cpu_pct']}%" if "cpu_pct" in r else "") +
                    (f", attach {r['attach_s']} s" if "attach_s" in r else ""))
                if not redis.alive():
                    raise RuntimeError(f"redis-server died (rc={redis.rc})")
        size = None
        if args.size_window > 0:
            log(f"size window: asbuilt trace --duration {args.size_window:g}s and strace -f over the same load")
            size = size_window(args, tmpdir, redis.pid, n)
        rows = summarise(modes, runs)
        res = {"config": {"n": n, "rounds": args.rounds, "clients": args.clients, "tests": args.tests,
                          "port": args.port, "redis_version": next((v[2:] for v in version if v.startswith("v=")), "?"),
                          "cpus": os.cpu_count(), "host_busy_before": busy, "cmd": args.cmd,
                          "strace_div": args.strace_div,
                          "strace_n": max(1000, n // args.strace_div) if any(m.key == "strace" for m in modes) else 0,
                          "warmup_rps": warm["rps"]},
               "runs": runs, "rows": rows, "size": size, "verdicts": verdicts(rows, size),
               "elapsed_s": time.monotonic() - started}
        print_report(res)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(res, fh, indent=1, default=str)
        return 0
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    except RuntimeError as err:
        log(f"error: {err}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup_children()
        shutil.rmtree(tmpdir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
