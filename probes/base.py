"""What every probe is: a name, whether it is on by default, what it needs, its cost, a ``check()``.

Snapshot probes ``collect(ctx)`` once per scan; streaming probes ``start(ctx)``, ``drain()`` on an
interval and ``stop()``. A probe returns plain typed observations and knows nothing of exporters.
Failure is data: :func:`run_snapshot` records ok/skipped/unavailable/error with the duration into
the profile's coverage, and one failing probe never stops another.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

from ..agent.errors import AsbuiltError
from ..agent.model import Coverage, Gap, ProbeRun

log = logging.getLogger(__name__)

MAX_GAPS = 500


@dataclass
class Roots:
    """Where the host's truth is read from: injected so tests run on captured trees."""

    proc: str = "/proc"
    sys: str = "/sys"
    rootfs: str = "/"

    def path(self, absolute: str) -> str:
        """A host path (``/etc/os-release``) under the configured root filesystem."""
        if self.rootfs in ("", "/"):
            return absolute
        return os.path.join(self.rootfs, absolute.lstrip("/"))

    @property
    def live(self) -> bool:
        return self.proc == "/proc" and self.sys == "/sys" and self.rootfs in ("", "/")


class GapRecorder:
    """Collects recorded gaps (vanished pids, denied reads ...) into a coverage section, bounded."""

    def __init__(self, coverage: Coverage, limit: int = MAX_GAPS):
        self.coverage = coverage
        self.limit = limit

    def add(self, kind: str, subject: str, detail: str = "") -> None:
        if len(self.coverage.gaps) >= self.limit:
            self.coverage.gaps_dropped += 1
            return
        self.coverage.gaps.append(Gap(kind=kind, subject=subject, detail=detail))


@dataclass
class Context:
    """Everything a probe may read: roots, the gap recorder, and the clock of this scan."""

    roots: Roots = field(default_factory=Roots)
    coverage: Coverage = field(default_factory=Coverage)
    now: float = field(default_factory=time.time)
    privileged: bool = field(default_factory=lambda: os.geteuid() == 0)
    options: dict = field(default_factory=dict)
    gaps: GapRecorder = field(init=False)

    def __post_init__(self) -> None:
        self.gaps = GapRecorder(self.coverage)


class Probe:
    """Base of every probe. Subclasses set the class attributes and override check/collect."""

    name = ""
    description = ""
    default = True
    needs: tuple = ()  # e.g. ("root", "bpf", "tracepoints", "libpcap")
    cost = "low"  # low, medium, high: what running it costs the host

    def check(self, ctx: Context) -> Optional[str]:
        """Why this probe cannot run here, or None when it can."""
        return None

    def collect(self, ctx: Context) -> Any:  # snapshot probes
        raise NotImplementedError


def run_snapshot(probe: Probe, ctx: Context, fn: Optional[Callable[[Context], Any]] = None,
                 count: Callable[[Any], int] = lambda r: len(r) if hasattr(r, "__len__") else 1) -> Any:
    """Run one snapshot probe, recording its outcome in ``ctx.coverage``; never raises.

    Returns the probe's result, or None when it was unavailable or failed.
    """
    run = ProbeRun(name=probe.name)
    ctx.coverage.probes.append(run)
    start = time.monotonic()
    try:
        reason = probe.check(ctx)
        if reason:
            run.status, run.reason = "unavailable", reason
            return None
        result = (fn or probe.collect)(ctx)
        run.status = "ok"
        try:
            run.items = int(count(result))
        except (TypeError, ValueError):
            run.items = 0
        return result
    except AsbuiltError as err:
        run.status, run.reason = "error", str(err)
        log.warning("probe=%s status=error reason=%s", probe.name, err)
        return None
    except Exception as err:  # one failing probe never stops another
        run.status, run.reason = "error", f"{type(err).__name__}: {err}"
        log.warning("probe=%s status=error reason=%s", probe.name, run.reason, exc_info=log.isEnabledFor(logging.DEBUG))
        return None
    finally:
        run.duration_seconds = round(time.monotonic() - start, 6)
