#!/usr/bin/env python3
"""Daemon steady-state benchmark: `asbuilt run` watching every process under a churn of short-lived ones.

A background load starts 50 short-lived processes per second (a mix of /bin/true, cat, ls, sh -c, date
with varying arguments: what cron jobs, health checks and scripts do on a real host) for the whole run.
Side by side in one run:

  1. the load alone for --baseline seconds (what the load costs the host and how many processes/s it reaches);
  2. the load with `asbuilt run` (eBPF probes and capture on, every process, /metrics on loopback, scraped
     every 15 s like a Prometheus would) for --minutes minutes.

Each minute it prints the daemon's CPU (% of one core over that minute, from /proc/PID/stat utime+stime),
its RSS, the load's achieved rate, and the scrape time; then the targets of the issue as PASS/FAIL:

    daemon CPU < 3 % of one core (steady state: minutes 2..N); RSS < 150 MB; RSS at the last minute within
    10 % of minute 2.

Not a test: it measures and reports. Run as root with the repo's venv (see benchmarks/README.md):

    .venv/bin/python benchmarks/daemon_bench.py [--minutes 10] [--rate 50] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK = os.sysconf("SC_CLK_TCK")
COMMANDS = [["/bin/true"], ["cat", "/etc/hostname"], ["ls", "/tmp"], ["sh", "-c", "exit 0"], ["date", "+%s"],
            ["id", "-u"], ["uname", "-r"]]


def cpu_seconds(pid: int) -> float:
    """utime + stime of the daemon and of its waited-for children (the eBPF compile children)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / CLK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Load(threading.Thread):
    """Starts ``rate`` short-lived processes per second until stopped; counts them."""

    def __init__(self, rate: int):
        super().__init__(daemon=True)
        self.rate, self.started, self.stop = rate, 0, threading.Event()

    def run(self) -> None:
        rng = random.Random(7)
        interval, nxt = 1.0 / self.rate, time.monotonic()
        running = []
        while not self.stop.is_set():
            cmd = list(rng.choice(COMMANDS))
            running.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.started += 1
            running = [p for p in running if p.poll() is None]
            nxt += interval
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1:
                nxt = time.monotonic()  # fell behind: do not burst
        for p in running:
            p.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=int, default=10)
    ap.add_argument("--rate", type=int, default=50, help="short-lived processes per second")
    ap.add_argument("--baseline", type=int, default=60, help="seconds of load alone first")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    me = os.getpid()

    print(f"load: {args.rate} short-lived processes/s; baseline {args.baseline}s, then asbuilt run for "
          f"{args.minutes} min", flush=True)
    load = Load(args.rate)
    t0, c0 = time.monotonic(), cpu_seconds(me)
    load.start()
    time.sleep(args.baseline)
    base_rate = load.started / (time.monotonic() - t0)
    base_cpu = 100 * (cpu_seconds(me) - c0) / (time.monotonic() - t0)
    print(f"baseline: load reached {base_rate:.1f} processes/s; the load generator itself used {base_cpu:.1f}% "
          f"of a core", flush=True)

    state = tempfile.mkdtemp(prefix="asbuilt-bench-")
    port = free_port()
    cfg = os.path.join(state, "asbuilt.toml")
    with open(cfg, "w") as fh:
        fh.write(f'[agent]\nstate_dir = "{state}/state"\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    log = open(os.path.join(state, "daemon.log"), "w")
    daemon = subprocess.Popen([os.path.join(REPO, ".venv", "bin", "asbuilt"), "run", "--config", cfg],
                              stdout=subprocess.DEVNULL, stderr=log)
    rows = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if "running processes=" in open(log.name).read():
                break
            if daemon.poll() is not None:
                print(open(log.name).read())
                return 1
            time.sleep(0.5)
        print(f"daemon up (pid {daemon.pid}); log {log.name}", flush=True)
        print(f"{'minute':>6} {'cpu % core':>10} {'rss MB':>8} {'load/s':>7} {'scrape s':>9}", flush=True)
        for minute in range(1, args.minutes + 1):
            c_start, t_start, n_start = cpu_seconds(daemon.pid), time.monotonic(), load.started
            scrape = 0.0
            for _ in range(4):
                time.sleep(15)
                s0 = time.monotonic()
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                        r.read()
                    scrape = max(scrape, time.monotonic() - s0)
                except OSError as err:
                    print(f"scrape failed: {err}", flush=True)
            secs = time.monotonic() - t_start
            row = dict(minute=minute, cpu_percent=round(100 * (cpu_seconds(daemon.pid) - c_start) / secs, 2),
                       rss_mb=round(rss_mb(daemon.pid), 1), load_rate=round((load.started - n_start) / secs, 1),
                       scrape_seconds=round(scrape, 3))
            rows.append(row)
            print(f"{minute:>6} {row['cpu_percent']:>10} {row['rss_mb']:>8} {row['load_rate']:>7} "
                  f"{row['scrape_seconds']:>9}", flush=True)
    finally:
        load.stop.set()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
    steady = rows[1:] or rows
    cpu = sum(r["cpu_percent"] for r in steady) / max(1, len(steady))
    peak = max(r["rss_mb"] for r in rows) if rows else 0
    growth = (rows[-1]["rss_mb"] / rows[1]["rss_mb"] - 1) * 100 if len(rows) > 1 else 0.0
    rate_with = sum(r["load_rate"] for r in rows) / max(1, len(rows))
    print()
    print(f"load rate: {base_rate:.1f}/s alone vs {rate_with:.1f}/s with the daemon "
          f"(ratio {rate_with / base_rate:.3f})")
    print(f"{'PASS' if cpu < 3 else 'FAIL'} daemon CPU {cpu:.2f}% of one core (target < 3%)")
    print(f"{'PASS' if peak < 150 else 'FAIL'} daemon peak RSS {peak:.1f} MB (target < 150 MB)")
    print(f"{'PASS' if abs(growth) <= 10 else 'FAIL'} RSS minute {len(rows)} vs minute 2: {growth:+.1f}% "
          f"(target within 10%)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(baseline_rate=base_rate, rows=rows, cpu_percent=cpu, peak_rss_mb=peak,
                           rss_growth_percent=growth), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
