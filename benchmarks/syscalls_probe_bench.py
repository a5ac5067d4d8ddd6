#!/usr/bin/env python3
"""What the syscall-count probe costs redis-server under redis-benchmark, variant by variant.

``asbuilt trace`` has no switch that runs the syscalls probe alone, so this starts its own tracer: a child
process (this script with ``--tracer VARIANT``) that opens one TraceSession holding the proc probe and the
variant's probes, seeds it with redis-server's pid, drains every 0.5 s (as ``asbuilt trace`` does) and
detaches on SIGINT. Over several rounds, with the variant order rotated each round, the same fixed
``redis-benchmark -q -n N -c 50 -t get,set`` runs untraced and under each variant; the report
gives each variant's median requests/s and the median of its ratios to the untraced runs just before and
after it (an untraced run sits between every two traced ones), plus the tracer's CPU over the load.

Variants (``--variants``, comma-separated):

    proc             proc.bpf.c alone (sched tracepoints, clone/exec/exit syscalls): the floor
    tp-exact         + syscalls, perf-event tracepoint raw_syscalls:sys_enter, every call counted (the old probe)
    raw-exact        + syscalls, raw tracepoint sys_enter, every call counted (--syscalls=exact)
    raw-sampled      + syscalls, raw tracepoint, hot syscalls sampled (the default)
    tp-sampled       + syscalls, perf-event tracepoint, hot syscalls sampled
    raw-allhot       + syscalls, raw tracepoint, every syscall hot and (almost) never sampled: the floor
                     of the program (array check + bpf_get_prandom_u32); tp-allhot the same as a tracepoint
    files            proc + files (syscalls:sys_enter/exit_openat*)
    files+raw-sampled  proc + files + syscalls default: the marginal cost next to the other default probes
    files+tp-exact   proc + files + the old syscalls probe

Run as root from the repo root, under the shared benchmark lock:

    flock /tmp/asbuilt-bench.lock .venv/bin/python benchmarks/syscalls_probe_bench.py [--rounds 5] [-n 100000] [--variants proc,raw-sampled]

Not a test: it measures and prints. Numbers from a shared 2-core VM are noisy: compare medians of ratios.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import trace_bench as tb  # noqa: E402  (Child, start_redis, run_load, proc_cpu_ticks)

sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from asbuilt.probes.ebpf.syscalls import SAMPLE_ONE_IN  # noqa: E402

VARIANTS = ("proc", "tp-exact", "raw-exact", "raw-sampled", "tp-sampled", "raw-allhot", "tp-allhot", "files",
            "files+raw-sampled", "files+tp-exact")


# ---------------------------------------------------------------------------------------- tracer child
def tracer_main(variant: str, pid: int, interval: float, one_in: int) -> int:
    from asbuilt.probes.base import Context
    from asbuilt.probes.ebpf.files import FilesProbe
    from asbuilt.probes.ebpf.proc import ProcProbe
    from asbuilt.probes.ebpf.syscalls import HOT_RATE, NR_MAX, SyscallsProbe
    from asbuilt.probes.ebpf.tracer import close_together, start_together

    probes = [ProcProbe()]
    if variant.startswith("files"):
        probes.append(FilesProbe())
    sc_variant = variant.split("+", 1)[1] if "+" in variant else variant
    syscalls = None
    if sc_variant in ("tp-exact", "raw-exact", "raw-sampled", "tp-sampled", "raw-allhot", "tp-allhot"):
        attach = "tracepoint" if sc_variant.startswith("tp") else "raw_tracepoint"
        allhot = sc_variant.endswith("allhot")
        syscalls = SyscallsProbe(exact=sc_variant.endswith("exact"), attach=attach,
                                 sample_one_in=1 << 30 if allhot else one_in,
                                 hot_rate=float("inf") if allhot else HOT_RATE)
        probes.append(syscalls)
    stop = []
    signal.signal(signal.SIGINT, lambda s, f: stop.append(s))
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    session = start_together(Context(), probes, [pid], follow_children=True)
    if syscalls is not None and sc_variant.endswith("allhot"):
        # the floor of the program: every syscall hot, (almost) never sampled
        syscalls.cold_rate = -1.0
        table = session.bpf[b"syscall_hot"]
        for nr in range(NR_MAX):
            table[ctypes.c_int(nr)] = ctypes.c_uint32(1)
        syscalls.hot = set(range(NR_MAX))
    print(f"attached {variant} mode={syscalls.mode if syscalls else '-'}", file=sys.stderr, flush=True)
    totals: Dict[str, int] = {}
    drains = 0
    while not stop:
        time.sleep(interval)
        for probe in probes:
            for obs in probe.drain():
                name = getattr(obs, "name", None)
                if syscalls is not None and probe is syscalls and name:
                    totals[name] = totals.get(name, 0) + obs.count
        drains += 1
    close_together(session)
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:6]
    print("result " + json.dumps({"drains": drains, "syscalls": len(totals), "top": top,
                                  "hot": sorted(syscalls.ever_hot) if syscalls else [],
                                  "note": syscalls.note() if syscalls else ""}), file=sys.stderr, flush=True)
    return 0


# ---------------------------------------------------------------------------------------- driver
def one_run(args, variant: Optional[str], redis_pid: int) -> dict:
    res: dict = {"variant": variant or "untraced"}
    tracer = None
    if variant:
        argv = [sys.executable, os.path.abspath(__file__), "--tracer", variant, "--pid", str(redis_pid)]
        tracer = tb.Child(variant, argv, ready=lambda s, line: s == "stderr" and line.startswith("attached"))
        if not tracer.ready_event.wait(60):
            tracer.stop(grace=10)
            res.update(ok=False, error=tracer.text("stderr")[-400:])
            return res
        time.sleep(args.settle)
    # a short load first (traced and untraced alike): the sampled variants mark hot syscalls on it,
    # so the measured window sees their steady state (hot syscalls sampled)
    tb.run_load(args.bench, args.port, max(1000, args.n // 10), args.clients, args.tests, 120)
    ticks0 = tb.proc_cpu_ticks(tracer.pid) if tracer else None
    rticks0 = tb.proc_cpu_ticks(redis_pid)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    load = tb.run_load(args.bench, args.port, args.n, args.clients, args.tests, 300)
    window = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rticks1 = tb.proc_cpu_ticks(redis_pid)
    res.update(load)
    requests = args.n * len([t for t in args.tests.split(",") if t.strip()])
    if rticks0 is not None and rticks1 is not None:  # CPU per request: less noisy than requests/s
        res["redis_us_per_req"] = round(1e6 * (rticks1 - rticks0) / tb.CLK_TCK / requests, 2)
    res["bench_us_per_req"] = round(1e6 * ((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime))
                                    / requests, 2)
    if tracer is not None:
        ticks1 = tb.proc_cpu_ticks(tracer.pid)
        if ticks0 is not None and ticks1 is not None:
            res["tracer_cpu_pct"] = round(100.0 * (ticks1 - ticks0) / tb.CLK_TCK / window, 1)
        tracer.stop(signal.SIGINT, grace=30)
        for line in tracer.text("stderr").splitlines():
            if line.startswith("result "):
                res["tracer"] = json.loads(line[len("result "):])
    return res


# ---------------------------------------------------------------------------------------- micro
def dd_cpu(count: int, wait_line: bool = False, on_start=None) -> float:
    """CPU seconds (user+sys, from wait4) of ``dd bs=1 count=N`` (2N syscalls: read + write).

    With ``wait_line`` the shell waits for a line on stdin before exec'ing dd, so a tracer can be
    attached to its pid first (``on_start(pid)``); exec keeps the pid, so dd is traced."""
    import subprocess

    cmd = f"dd if=/dev/zero of=/dev/null bs=1 count={count} status=none"
    proc = subprocess.Popen(["sh", "-c", ("read x; " if wait_line else "") + "exec " + cmd],
                            stdin=subprocess.PIPE)
    if on_start is not None:
        on_start(proc.pid)
    if wait_line:
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
    _pid, _status, ru = os.wait4(proc.pid, 0)
    proc.returncode = 0
    proc.stdin.close()
    return ru.ru_utime + ru.ru_stime


def micro(args, variants: List[str]) -> None:
    """ns of CPU per syscall of a traced dd and of an untraced dd, per variant (CPU time, not wall:
    far less sensitive to other load on a shared machine than requests/s)."""
    rows: Dict[str, Dict[str, List[float]]] = {}
    calls = 2 * args.micro_count
    for rnd in range(args.rounds):
        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
        for variant in [None] + order:
            key = variant or "untraced"
            row = rows.setdefault(key, {"traced": [], "other": []})
            if variant is None:
                row["traced"].append(1e9 * dd_cpu(args.micro_count) / calls)
                row["other"].append(1e9 * dd_cpu(args.micro_count) / calls)
                continue
            holder: Dict[str, object] = {}

            def attach(pid: int, variant=variant) -> None:
                argv = [sys.executable, os.path.abspath(__file__), "--tracer", variant, "--pid", str(pid)]
                t = tb.Child(variant, argv, ready=lambda s, line: s == "stderr" and line.startswith("attached"))
                holder["t"] = t
                if not t.ready_event.wait(60):
                    raise RuntimeError(t.text("stderr")[-300:])
                time.sleep(args.settle)

            row["traced"].append(1e9 * dd_cpu(args.micro_count, True, attach) / calls)
            row["other"].append(1e9 * dd_cpu(args.micro_count) / calls)
            tracer = holder["t"]
            tracer.stop(signal.SIGINT, grace=30)
            if rnd == 0:
                for line in tracer.text("stderr").splitlines():
                    if line.startswith("result "):
                        r = json.loads(line[len("result "):])
                        row["result"] = r["top"][:3]
            tb.log(f"micro round {rnd + 1} {key:<18} traced {row['traced'][-1]:.0f} ns/call, "
                   f"untraced process {row['other'][-1]:.0f} ns/call")
    base_t = statistics.median(rows["untraced"]["traced"])
    base_o = statistics.median(rows["untraced"]["other"])
    print(f"dd bs=1 count={args.micro_count} ({calls} syscalls), CPU ns per syscall, median of {args.rounds}")
    print(f"{'variant':<20}{'traced dd':>10}{'+ns':>7}{'untraced dd':>13}{'+ns':>7}   counted (round 1)")
    for key, row in rows.items():
        t, o = statistics.median(row["traced"]), statistics.median(row["other"])
        print(f"{key:<20}{t:>10.0f}{t - base_t:>+7.0f}{o:>13.0f}{o - base_o:>+7.0f}   {row.get('result', '')}")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tracer", help=argparse.SUPPRESS)
    ap.add_argument("--pid", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--interval", type=float, default=0.5, help="drain interval of the tracer (s)")
    ap.add_argument("--sample-one-in", type=int, default=SAMPLE_ONE_IN, help="hot syscalls: one call in N counted")
    ap.add_argument("--variants", default="proc,tp-exact,raw-exact,raw-sampled")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=100000, help="requests per test per run")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--tests", default="get,set")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds between attach and load")
    ap.add_argument("--server", default="redis-server")
    ap.add_argument("--bench", default="redis-benchmark")
    ap.add_argument("--json", help="also write every run here")
    ap.add_argument("--micro", action="store_true", help="dd bs=1 CPU per syscall instead of redis")
    ap.add_argument("--micro-count", type=int, default=1000000, help="dd bs=1 count (2 syscalls each)")
    args = ap.parse_args(argv)
    if args.tracer:
        return tracer_main(args.tracer, args.pid, args.interval, args.sample_one_in)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}; known: {', '.join(VARIANTS)}")
    if args.micro:
        try:
            micro(args, variants)
        finally:
            tb.cleanup_children()
        return 0
    args.port = tb.free_port()
    runs: List[dict] = []
    with tempfile.TemporaryDirectory(prefix="sc-bench-") as tmp:
        redis = tb.start_redis(args.server, args.port, tmp)
        try:
            tb.run_load(args.bench, args.port, args.n // 4, args.clients, args.tests, 120)  # warm-up
            for rnd in range(args.rounds):
                order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
                seq = [x for v in order for x in (None, v)] + [None]  # untraced between every two
                for i, variant in enumerate(seq):
                    res = one_run(args, variant, redis.pid)
                    res["round"], res["slot"] = rnd + 1, i
                    runs.append(res)
                    tb.log(f"round {rnd + 1} {res['variant']:<18} rps={res.get('rps')} "
                           f"cpu={res.get('tracer_cpu_pct', '-')} {res.get('error', '')}")
        finally:
            tb.cleanup_children()
    report(variants, runs)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(runs, fh, indent=1)
    return 0


def paired_ratios(runs: List[dict], variant: str) -> List[float]:
    """Each run of ``variant`` over the mean of the untraced runs just before and after it."""
    out = []
    for i, r in enumerate(runs):
        if r["variant"] != variant or not r.get("rps"):
            continue
        near = [runs[j]["rps"] for j in (i - 1, i + 1) if 0 <= j < len(runs)
                and runs[j]["variant"] == "untraced" and runs[j].get("rps")]
        if near:
            out.append(r["rps"] / statistics.mean(near))
    return out


def _med(runs: List[dict], variant: str, key: str) -> float:
    vals = [r[key] for r in runs if r["variant"] == variant and r.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


def report(variants: List[str], runs: List[dict]) -> None:
    print(f"{'variant':<20}{'median rps':>12}{'median ratio':>14}  {'ratios to the adjacent untraced runs':<44}"
          f"{'tracer cpu%':>12}{'redis us/req':>14}{'bench us/req':>14}")
    for v in ["untraced"] + variants:
        vals = [r["rps"] for r in runs if r["variant"] == v and r.get("rps")]
        ratios = paired_ratios(runs, v) if v != "untraced" else [1.0]
        cpu = [r["tracer_cpu_pct"] for r in runs if r["variant"] == v and "tracer_cpu_pct" in r]
        print(f"{v:<20}{statistics.median(vals) if vals else float('nan'):>12.0f}"
              f"{statistics.median(ratios) if ratios else float('nan'):>14.3f}  "
              f"{' '.join(f'{x:.3f}' for x in ratios):<44}"
              f"{statistics.median(cpu) if cpu else float('nan'):>12.1f}"
              f"{_med(runs, v, 'redis_us_per_req'):>14.2f}{_med(runs, v, 'bench_us_per_req'):>14.2f}")
    seen = set()
    for r in runs:
        if r.get("tracer") and r["variant"] not in seen:
            seen.add(r["variant"])
            t = r["tracer"]
            print(f"  {r['variant']}: {t['syscalls']} syscalls, top {t['top'][:4]}, hot {t['hot']}")


if __name__ == "__main__":
    sys.exit(main())
