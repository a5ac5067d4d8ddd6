"""``asbuilt run``: the daemon. Rescans, continuous low-overhead probes, snapshots, /metrics.

One main thread does everything that changes state, on deadlines:

- every second: drain the probes (exec/fork/exit, first-seen opens, connect/accept/bind/listen, DNS
  uprobes, port capture) into a TraceMerger that knows the live processes by pid;
- every ``refresh_interval``: harvest — fold the live facts into the rolling profile by identity
  (agent/rolling.py), forget exited pids everywhere (merger, probes, kernel maps: memory stays
  flat), publish a read-only copy for /metrics;
- every ``interval``: a full rescan (sockets with kernel byte counters, fds, libraries, host facts,
  packages of every file seen);
- every ``snapshot_interval``: msgpack + JSON snapshots in ``state_dir`` (atomic, 0600, rotated to
  ``retention``), plus ``latest.msgpack``/``latest.json``; a failed write (full disk) is logged and
  counted and retried at every refresh until it succeeds — nothing collected is lost meanwhile.

The /metrics server (exporters/prometheus.py) runs in its own thread and reads only the published
profile. SIGHUP re-reads the config (a bad one is logged and the old one kept); SIGTERM/SIGINT write
a final snapshot, then detach the probes. Logs are one line per event on stderr, for journald.
"""
from __future__ import annotations

import errno
import gc
import glob
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

from . import __version__
from .config import Config, load_config
from .errors import AsbuiltError, UsageError, WriteError
from .merge import TraceMerger
from .model import Coverage, ProbeRun, Process, Profile
from .rolling import FACT_LISTS, Rolling, ensure_identity, is_listener
from ..probes.base import Context

log = logging.getLogger("asbuilt.daemon")

DRAIN_SECONDS = 1.0
CAPTURE_REARM_SECONDS = 3600.0  # capture re-identifies every port this often (at a rescan)
SNAPSHOT_GLOB = "profile-*.msgpack"


# ------------------------------------------------------------------------------- snapshots
def _reason(err: BaseException) -> str:
    cause = err.__cause__ if isinstance(err, WriteError) else err
    code = getattr(cause, "errno", None)
    return errno.errorcode.get(code, "error") if code else "error"


class SnapshotWriter:
    """Timestamped msgpack + JSON pairs in one directory, rotated; ``latest.*`` always complete."""

    def __init__(self, state_dir: str, retention: int):
        self.state_dir = state_dir
        self.retention = retention

    def prepare(self) -> None:
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            os.chmod(self.state_dir, 0o700)
        except OSError as err:
            raise UsageError(f"state_dir {self.state_dir}: {err.strerror or err}") from err
        for tmp in glob.glob(os.path.join(self.state_dir, ".asbuilt-*.tmp")):
            try:  # left by a kill -9 between write and rename: never a snapshot
                os.unlink(tmp)
            except OSError:
                pass

    def write(self, profile: Profile) -> str:
        """Write one snapshot pair and the latest.* copies; WriteError when the disk says no."""
        from ..exporters.files import atomic_write, encode_profile

        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(profile.generated_at or time.time()))
        base = os.path.join(self.state_dir, f"profile-{stamp}")
        n = 1
        while os.path.exists(base + ".msgpack"):
            n += 1
            base = os.path.join(self.state_dir, f"profile-{stamp}-{n}")
        packed = encode_profile(profile, "msgpack")
        text = encode_profile(profile, "json")
        # JSON first: a pair is complete once its msgpack (what rotation counts) exists
        atomic_write(base + ".json", text)
        atomic_write(base + ".msgpack", packed)
        atomic_write(os.path.join(self.state_dir, "latest.json"), text)
        atomic_write(os.path.join(self.state_dir, "latest.msgpack"), packed)
        self.rotate()
        return base + ".msgpack"

    def rotate(self) -> int:
        snaps = sorted(glob.glob(os.path.join(self.state_dir, SNAPSHOT_GLOB)))
        removed = 0
        for path in snaps[:max(0, len(snaps) - self.retention)]:
            for p in (path, path[:-len(".msgpack")] + ".json"):
                try:
                    os.unlink(p)
                    removed += 1
                except OSError:
                    pass
        for orphan in glob.glob(os.path.join(self.state_dir, "profile-*.json")):
            if not os.path.exists(orphan[:-len(".json")] + ".msgpack") and orphan < (snaps[-1] if snaps else ""):
                try:
                    os.unlink(orphan)
                except OSError:
                    pass
        return removed

    def latest(self) -> Optional[Profile]:
        from .store import load_profile

        path = os.path.join(self.state_dir, "latest.msgpack")
        if not os.path.exists(path):
            return None
        try:
            return load_profile(path)
        except AsbuiltError as err:
            log.warning("previous snapshot not loaded path=%s reason=%s", path, err)
            return None


def _trim_heap() -> None:
    """Give back to the kernel the free pages at the top and inside the C heap (malloc_trim)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------- the daemon
class Daemon:
    def __init__(self, cfg: Config, load: Callable[[], Config]):
        self.cfg = cfg
        self.load = load  # re-reads file + environment + flags (SIGHUP)
        self.rolling = Rolling(cfg.max_processes, cfg.forget_after)
        self.writer = SnapshotWriter(cfg.state_dir, cfg.retention)
        self._rearmed_at = time.monotonic()
        self.published: Profile = Profile(mode="run")
        self.stop_event = threading.Event()
        self.reload_wanted = False
        self.counters: Dict[str, object] = dict(
            scans_total=0, scan_duration_seconds=0.0, snapshots_written_total=0, snapshot_errors_total={},
            last_snapshot_timestamp_seconds=0.0, events_total=0, lost_events_total=0,
            start_time_seconds=time.time(), config_reloads_total=0, processes_watched=0)
        self.ctx: Optional[Context] = None
        self.probes = None
        self.merger: Optional[TraceMerger] = None
        self.server = None
        self.collector = None
        self.scan_runs: List[ProbeRun] = []
        self._snapshot_due = 0.0
        self._snapshot_failing = False
        self._matchers = None

    # -- the metrics source (called from the server's threads: read-only, no locks needed)
    def snapshot(self) -> Profile:
        return self.published

    def stats(self) -> Dict[str, object]:
        out = dict(self.counters)
        out["snapshot_errors_total"] = dict(self.counters["snapshot_errors_total"])
        return out

    # -- selection
    def selected(self, proc: Process) -> bool:
        if proc.kernel_thread:
            return False
        if not self.cfg.select:
            return True
        if self._matchers is None:
            from .select import _matcher

            self._matchers = [_matcher(t.strip()) for t in self.cfg.select.split(",") if t.strip()]
        return any(m(proc) for m in self._matchers)

    # -- lifecycle
    def run(self) -> int:
        self.writer.prepare()
        previous = self.writer.latest()
        if previous is not None:
            self.rolling.seed(previous)
            log.info("continuing from previous snapshot processes=%d", len(previous.processes))
        self._install_signals()
        self._start_metrics()
        self.rescan(first=True)
        self._start_probes()
        now = time.monotonic()
        next_drain, next_refresh = now + DRAIN_SECONDS, now + self.cfg.refresh_interval
        next_scan = now + self.cfg.interval
        self._snapshot_due = now + min(self.cfg.snapshot_interval, 60.0)  # a first snapshot soon
        self.publish()
        log.info("running processes=%d metrics=%s state_dir=%s", len(self.rolling.procs),
                 self.cfg.metrics_listen, self.cfg.state_dir)
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                wait = min(next_drain, next_refresh, next_scan, self._snapshot_due) - now
                if wait > 0 and self.stop_event.wait(wait):
                    break
                if self.reload_wanted:
                    self.reload_wanted = False
                    self.reload()
                now = time.monotonic()
                if now >= next_drain:
                    self.drain()
                    next_drain = now + DRAIN_SECONDS
                if now >= next_refresh:
                    self.harvest()
                    self.publish()
                    next_refresh = now + self.cfg.refresh_interval
                if now >= next_scan:
                    self.rescan()
                    self.publish()
                    next_scan = time.monotonic() + self.cfg.interval
                if now >= self._snapshot_due:
                    self.write_snapshot()
        finally:
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        t0 = time.monotonic()
        try:
            self.drain()
            self.harvest()
            self.publish()
            self.write_snapshot(final=True)
        except Exception as err:  # the final snapshot is best effort; never a traceback at stop
            log.error("final snapshot failed reason=%s", err)
        if self.server is not None:
            try:
                self.server.close()
            except Exception as err:
                log.warning("metrics server close failed reason=%s", err)
        # Detach every probe at once (each tracepoint's detach waits for a grace period in the
        # kernel; closing their descriptors in parallel halves what the exit would take).
        try:
            from ..probes.ebpf.bpfobject import detach_all

            closed = detach_all()
        except Exception as err:  # stopping never fails: the exit closes whatever is left
            log.warning("detach failed reason=%s", err)
            closed = 0
        log.info("stopped seconds=%.2f descriptors_closed=%d", time.monotonic() - t0, closed)

    def _install_signals(self) -> None:
        def stop(signum, frame):
            log.info("signal=%s stopping", signal.Signals(signum).name)
            self.stop_event.set()

        def hup(signum, frame):  # applied by the loop within DRAIN_SECONDS
            self.reload_wanted = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)

    # -- metrics
    def _start_metrics(self) -> None:
        if self.cfg.metrics_listen == "off":
            log.info("metrics off")
            return
        from ..exporters.prometheus import MetricsServer, ProfileCollector

        if self.collector is None:
            self.collector = ProfileCollector(self, max_series=self.cfg.metrics_max_series)
        self.collector.max_series = self.cfg.metrics_max_series
        self.server = MetricsServer(self.cfg.metrics_listen, self.collector, tls_cert=self.cfg.metrics_tls_cert,
                                    tls_key=self.cfg.metrics_tls_key,
                                    basic_auth_user=self.cfg.metrics_basic_auth_user,
                                    basic_auth_password_hash=self.cfg.metrics_basic_auth_password_hash)
        log.info("metrics listening address=%s tls=%s basic_auth=%s", self.cfg.metrics_listen,
                 bool(self.cfg.metrics_tls_cert), bool(self.cfg.metrics_basic_auth_user))

    # -- probes
    def _new_ctx(self) -> Context:
        ctx = Context()
        ctx.options.update(packages=False, verify=False)
        return ctx

    def _start_probes(self) -> None:
        from .trace import ProbeSet

        self.ctx = self._new_ctx()
        live = Profile(mode="run", host=self.rolling.host)
        self.merger = TraceMerger(live, self.ctx, read_new=False)
        self._reset_live(self._last_scan)
        pids = sorted(p.pid for p in live.processes)
        self.probes = ProbeSet(self.ctx, syscalls=False, fdpoll=False)
        if not pids:
            log.warning("no process selected select=%r: probes idle until one appears", self.cfg.select)
        t0 = time.monotonic()
        self.probes.start(pids or [os.getpid()], children=True, use_ebpf=self.cfg.ebpf)
        for probe in self.probes.running:  # the kernel's open counters matter at harvest, not every second
            if hasattr(probe, "counts_interval"):
                probe.counts_interval = self.cfg.refresh_interval
        if self.cfg.capture:
            self.probes.start_capture(*self._capture_ports())
        else:
            self.probes._run("capture", "skipped", "capture = false")
        _trim_heap()
        for run in self.probes.runs.values():
            log.info("probe=%s status=%s mode=%s %s", run.name, run.status, run.mode,
                     f"reason={run.reason!r}" if run.reason else "")
        log.info("probes attached mode=%s seconds=%.2f processes=%d", self.probes.mode,
                 time.monotonic() - t0, len(pids))

    def _stop_probes(self) -> None:
        if self.probes is not None:
            self.drain()
            self.harvest()
            self.probes._stop_all()
            self.probes = None

    def _reset_live(self, scanned: List[Process]) -> None:
        """The merger's live processes become the rescan's (facts stripped: the rolling profile has them)."""
        assert self.merger is not None
        for proc in scanned:
            if not self.selected(proc):
                continue
            stub = Process(**{k: v for k, v in vars(proc).items() if k not in FACT_LISTS and k != "sockets"})
            stub.sockets = [s for s in proc.sockets if is_listener(s)]
            for name in FACT_LISTS:
                setattr(stub, name, {} if name in ("syscalls", "kernel_functions") else [])
            old = self.merger.by_pid.get(proc.pid)
            if old is not None:
                self.merger.profile.processes.remove(old)
            self.merger.by_pid[proc.pid] = stub
            self.merger.profile.processes.append(stub)

    def _capture_ports(self):
        ports, listening = {("udp", 53)}, set()
        for proc in self.rolling.procs.values():
            if not self.rolling._live.get(proc.identity):
                continue
            for s in proc.sockets:
                if s.proto in ("tcp", "udp") and s.local_port and not s.local_address.startswith("127.0.0.53"):
                    listening.add((s.proto, s.local_port))
            for p in proc.peers:
                if p.proto in ("tcp", "udp") and p.direction == "outbound" and p.port:
                    ports.add((p.proto, p.port))
        ports |= listening
        if len(ports) > 512:
            ports = set(sorted(listening)[:256]) | set(sorted(ports - listening)[:256])
        return ports, listening

    def drain(self) -> None:
        if self.probes is None or self.merger is None:
            return
        before = self.merger.events
        self.merger.add(self.probes.drain())
        self.counters["events_total"] = int(self.counters["events_total"]) + (self.merger.events - before)
        self.counters["lost_events_total"] = self.probes.lost()

    def harvest(self) -> None:
        """Live facts into the rolling profile; exited processes forgotten everywhere."""
        if self.merger is None:
            return
        now = time.time()
        proc_root = self.ctx.roots.proc if self.ctx else "/proc"
        gone = []
        for proc in list(self.merger.profile.processes):
            alive = os.path.exists(f"{proc_root}/{proc.pid}")
            if alive and not proc.exe and not proc.start_time:
                self._read_late(proc)
            if not alive:
                gone.append(proc.pid)
            if not self.selected(proc) and (proc.exe or proc.cmdline):
                continue
            has_facts = any(getattr(proc, n) for n in FACT_LISTS) or proc.learned != "scan"
            if has_facts and ensure_identity(proc):
                self.rolling.absorb(proc, now, from_scan=False)
            proc.learned = "scan"  # absorbed: a stub that only carries new facts from now on
            for name in FACT_LISTS:
                getattr(proc, name).clear()
            proc.sockets = [s for s in proc.sockets if is_listener(s)]
        if gone:
            self.merger.forget(gone)
            if self.probes is not None:
                self.probes.forget(gone)
            self.rolling.gone(gone)
        self.merger.facts = 0
        if self.probes is not None and self.probes.capture is not None:
            self.probes.update_capture(*self._capture_ports())

    def _read_late(self, proc: Process) -> None:
        """A process started since the last rescan and still running: read it once, now."""
        fresh = self.merger._read_process(proc.pid) if self.merger else None
        if fresh is None:
            return
        for name in ("exe", "cmdline", "user", "uid", "group", "gid", "cwd", "start_time", "cgroup",
                     "container_id", "container_runtime", "systemd_unit", "netns", "identity", "name"):
            setattr(proc, name, getattr(fresh, name))
        proc.sockets = [s for s in fresh.sockets if is_listener(s)] or proc.sockets

    _last_scan: List[Process] = []

    def rescan(self, first: bool = False) -> None:
        from ..probes.base import run_snapshot
        from .scan import PackageProbe, scan

        t0 = time.monotonic()
        ctx = self._new_ctx()
        self.drain()
        self.harvest()
        try:
            profile = scan(ctx)
        except AsbuiltError as err:
            log.error("rescan failed reason=%s", err)
            return
        now = time.time()
        chosen = [p for p in profile.processes if self.selected(p)]
        for proc in chosen:
            self.rolling.absorb(proc, now, from_scan=True)
        self.rolling.seen_in_scan(p.pid for p in chosen)
        self.rolling.host = profile.host
        if self.cfg.packages:
            pctx = Context(roots=ctx.roots, coverage=ctx.coverage)
            self.rolling.packages = run_snapshot(PackageProbe(list(self.rolling.procs.values())), pctx) or []
        self.rolling.expire(now)
        self.scan_runs = [r for r in ctx.coverage.probes]
        self.scan_gaps = ctx.coverage
        self._last_scan = chosen
        if self.merger is not None:
            known = set(self.merger.by_pid)
            self._reset_live(chosen)
            new = [p.pid for p in chosen if p.pid not in known]
            if new and self.cfg.select and self.probes is not None:
                self.probes.add_pids(new)  # a selection: processes that match now are watched too
        capture = getattr(self.probes, "capture", None) if self.probes is not None else None
        if capture is not None and time.monotonic() - self._rearmed_at >= CAPTURE_REARM_SECONDS:
            # Capture closes its socket once every port's protocol is known; look again now and
            # then (a service may have changed what it speaks, a port its peers).
            self._rearmed_at = time.monotonic()
            try:
                capture.rearm()
            except Exception as err:  # capture is evidence, never the daemon's failure
                log.warning("capture rearm failed reason=%s", err)
        seconds = time.monotonic() - t0
        self.counters["scans_total"] = int(self.counters["scans_total"]) + 1
        self.counters["scan_duration_seconds"] = round(seconds, 3)
        self.counters["processes_watched"] = len(chosen)
        log.info("rescan processes=%d identities=%d seconds=%.2f%s", len(chosen), len(self.rolling.procs),
                 seconds, " (first)" if first else "")
        # A rescan's garbage (a whole host's scan, the package index) is gone now: hand the pages
        # back instead of keeping the high-water mark of every rescan as resident memory.
        gc.collect()
        _trim_heap()

    def coverage(self) -> Coverage:
        cov = Coverage(privileged=os.geteuid() == 0, mode=self.probes.mode if self.probes else "")
        cov.probes = list(self.scan_runs)
        if self.probes is not None:
            for run in self.probes.runs.values():
                live = next((p for p in self.probes.running if getattr(p, "name", "") == run.name), None)
                if live is not None:
                    run.lost_events = int(getattr(live, "lost_events", 0) or 0)
                cov.probes.append(run)
        scan_cov = getattr(self, "scan_gaps", None)
        if scan_cov is not None:
            cov.gaps = list(scan_cov.gaps)
            cov.gaps_dropped = scan_cov.gaps_dropped
        if self.ctx is not None:
            cov.gaps += self.ctx.coverage.gaps[:200]
        if self.rolling.dropped:
            from .model import Gap

            cov.gaps.append(Gap(kind="truncated", subject="rolling profile",
                                detail=f"{self.rolling.dropped} facts past the per-process caps"))
        return cov

    def publish(self) -> None:
        self.published = self.rolling.publish(time.time(), self.coverage(), __version__)

    def write_snapshot(self, final: bool = False) -> None:
        try:
            path = self.writer.write(self.published)
        except WriteError as err:
            reason = _reason(err)
            errors = self.counters["snapshot_errors_total"]
            errors[reason] = errors.get(reason, 0) + 1
            if not self._snapshot_failing or final:
                log.error("snapshot not written reason=%s detail=%s (kept in memory; retrying every %gs)",
                          reason, err, self.cfg.refresh_interval)
            self._snapshot_failing = True
            self._snapshot_due = time.monotonic() + self.cfg.refresh_interval
            return
        if self._snapshot_failing:
            log.info("snapshots resumed")
        self._snapshot_failing = False
        self.counters["snapshots_written_total"] = int(self.counters["snapshots_written_total"]) + 1
        self.counters["last_snapshot_timestamp_seconds"] = time.time()
        self._snapshot_due = time.monotonic() + self.cfg.snapshot_interval
        log.info("snapshot written path=%s processes=%d%s", path, len(self.published.processes),
                 " (final)" if final else "")

    def reload(self) -> None:
        try:
            new = self.load()
        except AsbuiltError as err:
            log.error("config reload failed, keeping the old config reason=%s", err)
            return
        old, self.cfg = self.cfg, new
        self.counters["config_reloads_total"] = int(self.counters["config_reloads_total"]) + 1
        logging.getLogger("asbuilt").setLevel(new.log_level.upper())
        self.writer.state_dir, self.writer.retention = new.state_dir, new.retention
        if new.state_dir != old.state_dir:
            try:
                self.writer.prepare()
            except AsbuiltError as err:
                log.error("state_dir not usable, keeping %s reason=%s", old.state_dir, err)
                self.writer.state_dir = self.cfg.state_dir = old.state_dir
        self.rolling.max_processes, self.rolling.forget_after = new.max_processes, new.forget_after
        self._matchers = None
        if self.collector is not None:
            self.collector.max_series = new.metrics_max_series
        metrics_keys = ("metrics_listen", "metrics_tls_cert", "metrics_tls_key", "metrics_basic_auth_user",
                        "metrics_basic_auth_password_hash")
        if any(getattr(old, k) != getattr(new, k) for k in metrics_keys):
            if self.server is not None:
                self.server.close()
                self.server = None
            try:
                self._start_metrics()
            except AsbuiltError as err:
                log.error("metrics server not restarted reason=%s", err)
        if (old.ebpf, old.capture, old.select) != (new.ebpf, new.capture, new.select):
            self._stop_probes()
            self._start_probes()
        self.writer.rotate()
        changed = [k for k in vars(new) if getattr(old, k) != getattr(new, k)]
        log.info("config reloaded changed=%s", ",".join(changed) or "nothing")


def _overrides(args) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for flag, key in (("state_dir", "state_dir"), ("listen", "metrics_listen"), ("interval", "interval"),
                      ("snapshot_interval", "snapshot_interval"), ("retention", "retention"),
                      ("select", "select")):
        value = getattr(args, flag, None)
        if value is not None:
            out[key] = value
    if getattr(args, "no_ebpf", None):
        out["ebpf"] = False
    if getattr(args, "no_capture", None):
        out["capture"] = False
    return out


def run_daemon(args) -> int:
    def load() -> Config:
        return load_config(args.config, overrides=_overrides(args))

    cfg = load()
    if args.check_config:
        sys.stdout.write(cfg.to_toml())
        return 0
    # journald adds the time; one line per event, key=value context
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    logging.getLogger("asbuilt").setLevel(cfg.log_level.upper())
    root.setLevel(logging.WARNING)
    if os.geteuid() != 0:
        log.warning("not root: probes need root; running with what this user can see")
    os.umask(0o077)
    code = Daemon(cfg, load).run()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: Daemon.shutdown has detached the probes
