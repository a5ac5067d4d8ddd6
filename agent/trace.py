"""``asbuilt trace --pid PID``: attach to a running process tree and learn what it does.

The profile starts from a scan of the tree (a daemon opened its config hours ago: only the scan
knows), then the event probes run for the window — eBPF (exec/fork/exit, opens, syscall counts in
one bcc object; connect/accept/bind/listen; DNS uprobes; kernel functions where allowed) or, without
eBPF, the proc connector plus fd polling — and every observation is merged as it is drained.
At the end a second scan of the traced processes adds what is open now (sockets with the kernel's
byte counters), packages are attached to every file seen, and the profile is written. Ctrl-C or
SIGTERM ends the window early and still writes the profile.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Dict, List, Optional

from .errors import AsbuiltError, ProbeUnavailable, UsageError
from .merge import TraceMerger
from .model import ProbeRun, Profile
from ..probes.base import Context

log = logging.getLogger(__name__)

DRAIN_INTERVAL = 0.5
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    """``30s``, ``5m``, ``1h``, ``500ms`` or plain seconds; UsageError otherwise."""
    m = _DURATION.match(str(text))
    if not m:
        raise UsageError(f"--duration {text!r}: expected e.g. 30s, 5m, 1h")
    value = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    if value <= 0:
        raise UsageError("--duration must be more than zero")
    return value


class Window:
    """The trace window: ends at the deadline, on Ctrl-C or SIGTERM (handlers restored on exit)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.started = time.monotonic()
        self.stopped = threading.Event()
        self.reason = "duration"
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._stop)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def restart(self) -> None:
        """The window opens once the probes are attached: ``--duration 3s`` means 3 s of observing."""
        self.started = time.monotonic()
        self.deadline = self.started + self.seconds

    def _stop(self, signum, frame):
        self.reason = "interrupted" if signum == signal.SIGINT else "terminated"
        self.stopped.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True while the window is still open."""
        left = self.deadline - time.monotonic()
        if left <= 0 or self.stopped.is_set():
            return False
        return not self.stopped.wait(min(seconds, left)) and time.monotonic() < self.deadline

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Progress:
    """Live progress on stderr: one rewritten line on a terminal, a line every 5 s otherwise."""

    def __init__(self, stream=None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.quiet = quiet
        self._last = 0.0

    def attached(self, pid: int, mode: str, seconds: float, runs: list) -> None:
        """One line once the probes are attached: what runs, what does not."""
        if self.quiet:
            return
        ok = [r.name for r in runs if r.status == "ok"]
        off = [f"{r.name} ({r.reason})" for r in runs if r.status != "ok"]
        self.stream.write(f"asbuilt: tracing pid {pid} mode={mode} attached in {seconds:.1f}s: "
                          f"{', '.join(ok)}" + (f"; unavailable: {'; '.join(off)}" if off else "") + "\n")
        self.stream.flush()

    def update(self, elapsed: float, events: int, facts: int, lost: int, final: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not final and not self.tty and now - self._last < 5:
            return
        self._last = now
        line = f"asbuilt: trace {elapsed:6.1f}s  events {events}  new facts {facts}  lost {lost}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------- probe sets
class ProbeSet:
    """The event probes of one trace, started together, drained together, stopped together."""

    def __init__(self, ctx: Context, syscalls: bool = True, fdpoll: bool = True,
                 syscalls_exact: bool = False):
        self.ctx = ctx
        self.syscalls_exact = syscalls_exact  # every call counted, not hot ones sampled
        self.fdpoll = fdpoll  # the daemon relies on its rescans instead of polling every fd table
        self.syscalls = syscalls  # the daemon leaves raw_syscalls off: it is the costly probe
        self.running: List[object] = []  # probes with drain()/stop()
        self.session = None
        self.runs: Dict[str, ProbeRun] = {}
        self.mode = ""
        self.capture = None
        self.capture_ports: set = set()

    def _run(self, name: str, status: str, reason: str = "", mode: str = "") -> ProbeRun:
        run = ProbeRun(name=name, status=status, reason=reason, mode=mode)
        self.runs[name] = run
        self.ctx.coverage.probes.append(run)
        return run

    def start(self, pids: List[int], children: bool, use_ebpf: bool) -> None:
        ebpf_reason = None if use_ebpf else "--no-ebpf"
        if use_ebpf:
            from ..probes.ebpf.tracer import check_bpf

            ebpf_reason = check_bpf(self.ctx)
        if ebpf_reason is None:
            try:
                self._start_ebpf(pids, children)
                self.mode = "ebpf"
                return
            except ProbeUnavailable as err:
                ebpf_reason = str(err)
                log.warning("ebpf unavailable, falling back reason=%s", err)
                self._stop_all()
        self.mode = "fallback"
        self._start_fallback(pids, children, ebpf_reason)

    def _start_ebpf(self, pids: List[int], children: bool) -> None:
        from ..probes.ebpf.files import FilesProbe
        from ..probes.ebpf.proc import ProcProbe
        from ..probes.ebpf.syscalls import SyscallsProbe
        from ..probes.ebpf.tracer import start_together

        from ..probes.ebpf import kfunc, loader
        from ..probes.ebpf.dns import DnsProbe
        from ..probes.ebpf.net import NetProbe

        t0 = time.monotonic()
        # Every object compiles in a child of its own: start them all now, on every core.
        optional = [NetProbe(), DnsProbe()]
        for probe in optional:
            if not probe.check(self.ctx):
                probe.prefetch(children)
        checks = kfunc.Checks()
        core = [ProcProbe(), FilesProbe()] + (
            [SyscallsProbe(exact=self.syscalls_exact)] if self.syscalls else [])
        try:
            self.session = start_together(self.ctx, core, pids, follow_children=children)
        except BaseException:
            loader.discard_prefetched()
            checks.result()
            raise
        for probe in core:
            self.running.append(probe)
            self._run(probe.name, "ok", mode="ebpf" + (f" {probe.mode}" if probe.name == "syscalls" else ""))
        if not self.syscalls:
            self._run("syscalls", "skipped", "off (a program on every syscall of the host is the costly "
                      "probe); asbuilt trace --pid counts them unless --syscalls=off")
        log.info("ebpf core attached seconds=%.2f", time.monotonic() - t0)
        for probe in optional:
            self._start_optional(probe, pids, children)
        loader.discard_prefetched()
        self._kfunc(checks)

    def _start_optional(self, probe, pids: List[int], children: bool) -> None:
        reason = probe.check(self.ctx)
        if reason:
            self._run(probe.name, "unavailable", reason)
            return
        try:
            probe.start(self.ctx, pids, children)
        except AsbuiltError as err:
            self._run(probe.name, "unavailable", str(err))
            return
        self.running.append(probe)
        self._run(probe.name, "ok", mode="ebpf")

    def _kfunc(self, checks) -> None:
        from ..probes.ebpf import kfunc

        reason, fentry = checks.result()
        if reason and fentry:
            self._run("kfunc", "unavailable", f"{reason}; {fentry}")
        else:  # a kernel that allows it (not this one): counted by the kfunc probe
            probe = kfunc.KfuncProbe()
            try:
                probe.start(self.ctx, [], False)
                self.running.append(probe)
                self._run("kfunc", "ok", mode="kprobe" if not reason else "fentry")
            except AsbuiltError as err:
                self._run("kfunc", "unavailable", str(err))

    def _start_fallback(self, pids: List[int], children: bool, why: str) -> None:
        from ..probes.fdpoll import FdPollProbe
        from ..probes.proc_connector import ProcConnectorProbe

        conn = ProcConnectorProbe()
        reason = conn.check(self.ctx)
        source = None
        if reason:
            self._run("proc_connector", "unavailable", reason)
        else:
            conn.start(self.ctx, pids, follow_children=children)
            self.running.append(conn)
            source = conn.traced
            self._run("proc_connector", "ok", f"eBPF unavailable: {why}", mode="fallback")
        if not self.fdpoll:
            self._run("fdpoll", "skipped", "the daemon's rescans read fds instead of polling them")
            for name in ("syscalls", "dns", "kfunc"):
                self._run(name, "unavailable", f"needs eBPF ({why})")
            return
        poll = FdPollProbe()
        poll.start(self.ctx, pids, follow_children=children, pid_source=source)
        self.running.append(poll)
        self._run("fdpoll", "ok", f"eBPF unavailable: {why}; polling misses files opened and closed "
                  "between polls, failed opens and syscalls", mode="fallback-polling")
        for name in ("syscalls", "dns", "kfunc"):
            self._run(name, "unavailable", f"needs eBPF ({why})")

    def start_capture(self, ports: set, listening: set, pcap: str = "") -> None:
        """Port capture on the traced processes' ports (scapy, AF_PACKET + kernel filter)."""
        from ..probes.capture import CaptureProbe

        probe = CaptureProbe()
        reason = probe.check(self.ctx)
        if reason:
            self._run("capture", "unavailable", reason)
            return
        try:
            probe.start(self.ctx, sorted(ports), pcap_path=pcap or None, listening=sorted(listening))
        except (AsbuiltError, ValueError) as err:
            self._run("capture", "unavailable", str(err))
            return
        self.capture, self.capture_ports = probe, set(ports)
        self.running.append(probe)
        self._run("capture", "ok", mode="af_packet")

    def update_capture(self, ports: set, listening: set) -> None:
        if self.capture is not None and ports != self.capture_ports:
            try:
                self.capture.set_ports(sorted(ports)[:512], listening=sorted(listening))
                self.capture_ports = set(ports)
            except (AsbuiltError, ValueError) as err:
                log.warning("capture ports not updated reason=%s", err)

    def drain(self) -> List[object]:
        out: List[object] = []
        for probe in self.running:
            try:
                got = probe.drain()
                if isinstance(got, list):
                    out.extend(got)
                else:
                    out.append(got)
            except AsbuiltError as err:
                log.warning("probe=%s drain failed reason=%s", getattr(probe, "name", "?"), err)
        return out

    def forget(self, pids) -> None:
        """Processes that are gone: drop what every probe keeps for them (the daemon's bound)."""
        for probe in self.running:
            fn = getattr(probe, "forget", None)
            if fn is not None:
                try:
                    fn(pids)
                except Exception as err:  # a stale map entry is not worth stopping for
                    log.warning("probe=%s forget failed reason=%s", getattr(probe, "name", "?"), err)

    def add_pids(self, pids: List[int]) -> None:
        """Start watching more processes (the daemon's selection matched new ones)."""
        if self.session is not None:
            self.session.add_pids(pids)
        for probe in self.running:
            fn = getattr(probe, "add_pids", None)
            if fn is not None and probe is not self.session:
                try:
                    fn(pids)
                except Exception as err:
                    log.warning("probe=%s add_pids failed reason=%s", getattr(probe, "name", "?"), err)

    def lost(self) -> int:
        return sum(getattr(p, "lost_events", 0) for p in self.running) + (
            getattr(self.session, "proc_lost", 0) if self.session else 0)

    def traced_pids(self) -> List[int]:
        pids = set()
        if self.session is not None:
            pids.update(self.session.traced_pids())
        for probe in self.running:
            fn = getattr(probe, "traced", None)
            if callable(fn):
                pids.update(fn())
        return sorted(pids)

    def stop(self) -> List[object]:
        out = self.drain()
        self._stop_all()
        for probe in self.running:
            run = self.runs.get(getattr(probe, "name", ""))
            if run is not None:
                run.lost_events = getattr(probe, "lost_events", 0)
                if hasattr(probe, "note"):  # how the counts were taken (which syscalls were sampled)
                    run.reason = probe.note()
        if self.capture is not None and "capture" in self.runs:
            try:  # what was identified when, and when the socket narrowed or closed
                self.runs["capture"].reason = self.capture.summary
            except Exception as err:
                log.warning("capture summary failed reason=%s", err)
        return out

    def _stop_all(self) -> None:
        for probe in self.running:
            try:
                if self.session is None or getattr(probe, "session", None) is not self.session:
                    probe.stop()
            except Exception as err:  # stopping must never lose the profile
                log.warning("probe=%s stop failed reason=%s", getattr(probe, "name", "?"), err)
        if self.session is not None:
            from ..probes.ebpf.tracer import close_together

            close_together(self.session)


# ----------------------------------------------------------------------------------- run
def tree_of(proc_root: str, pid: int, children: bool) -> List[int]:
    from ..probes.procfs.pids import descendants, read_parents

    return [pid] + (descendants(read_parents(proc_root), [pid]) if children else [])


def trace(ctx: Context, pid: int, seconds: float, children: bool = True, use_ebpf: bool = True,
          progress: Optional[Progress] = None, capture: bool = True, pcap: str = "",
          syscalls: str = "sampled") -> Profile:
    """Trace ``pid`` (and its children) for ``seconds``; returns the merged profile."""
    from .scan import scan

    if not os.path.exists(os.path.join(ctx.roots.proc, str(pid), "stat")):
        raise UsageError(f"pid {pid} is not running")
    progress = progress or Progress(quiet=True)
    pids = tree_of(ctx.roots.proc, pid, children)
    want_packages = ctx.options.get("packages", True)
    ctx.options["packages"] = False  # attached once, at the end, to everything the trace saw
    profile = scan(ctx, pids=pids)
    profile.mode, profile.target_pids = "trace", [pid]
    merger = TraceMerger(profile, ctx)
    probes = ProbeSet(ctx, syscalls=syscalls != "off", syscalls_exact=syscalls == "exact")
    t_start = time.time()
    with Window(seconds) as window:
        probes.start(pids, children, use_ebpf)
        if capture:
            probes.start_capture(*merger.ports(), pcap=pcap)
        else:
            probes._run("capture", "skipped", "--no-capture")
        ctx.coverage.mode = probes.mode
        progress.attached(pid, probes.mode, window.elapsed, [r for r in probes.runs.values()])
        window.restart()
        try:
            while window.wait(DRAIN_INTERVAL):
                merger.add(probes.drain())
                probes.update_capture(*merger.ports())
                progress.update(window.elapsed, merger.events, merger.facts, probes.lost())
        finally:
            window_seconds = window.elapsed  # the window, not the detach that follows (~3 s in bcc)
            merger.add(probes.stop())
    progress.update(window_seconds, merger.events, merger.facts, probes.lost(), final=True)
    if window.reason != "duration":
        ctx.gaps.add("truncated", "trace window", f"ended early ({window.reason}) after {window_seconds:.1f}s")

    # What is open now: sockets with byte counters, fds of children that appeared.
    alive = [p for p in merger.pids() if os.path.exists(os.path.join(ctx.roots.proc, str(p)))]
    if alive:
        final_ctx = Context(roots=ctx.roots, privileged=ctx.privileged, options=dict(ctx.options))
        final = scan(final_ctx, pids=alive)
        merger.merge_scan(final)
    merger.finish()
    if want_packages:
        from ..probes.base import run_snapshot
        from .scan import PackageProbe

        ctx.coverage.probes[:] = [r for r in ctx.coverage.probes
                                  if not (r.name == "packages" and r.status == "skipped")]
        profile.packages = run_snapshot(PackageProbe(profile.processes), ctx) or []
    profile.started_at = t_start
    profile.duration_seconds = round(window_seconds, 3)
    profile.generated_at = time.time()
    return profile


def run_trace(args) -> int:
    from ..exporters.files import write_profile
    from ..exporters.summary import one_line, render
    from ..probes.base import Roots

    seconds = parse_duration(args.duration)
    ctx = Context(roots=Roots())
    ctx.options["packages"] = not args.no_packages
    if not ctx.privileged:
        print("asbuilt: not root: tracing needs root; falling back to what this user can see",
              file=sys.stderr)
    progress = Progress(quiet=args.quiet and not args.progress)
    profile = trace(ctx, args.pid, seconds, children=args.children, use_ebpf=not args.no_ebpf,
                    progress=progress, capture=not args.no_capture, pcap=args.pcap,
                    syscalls=getattr(args, "syscalls", "sampled"))
    if args.output:
        write_profile(profile, args.output)
        print(f"asbuilt: wrote {args.output}: {one_line(profile)}", file=sys.stderr)
    if not args.quiet:
        render(profile, sys.stdout)
    return 0
