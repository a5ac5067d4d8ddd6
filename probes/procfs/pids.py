"""``/proc`` itself: the numeric directories are the processes (thread-group leaders).

Kernel documentation: Documentation/filesystems/proc.rst ("Process-Specific Subdirectories");
``man 5 proc`` (``/proc/[pid]``). Threads live under ``/proc/PID/task`` and are not listed here.
"""
from __future__ import annotations

import os
from typing import Iterable, List

from ...agent.errors import from_oserror


def parse_pids(names: Iterable[str]) -> List[int]:
    """The sorted pids among directory entry names (``self``, ``sys``, ``1x`` are skipped)."""
    return sorted(int(name) for name in names if name.isdigit() and name.isascii())


def list_pids(proc_root: str) -> List[int]:
    """The pids present under ``proc_root`` now, sorted."""
    try:
        names = os.listdir(proc_root)
    except OSError as err:
        raise from_oserror(err, proc_root) from err
    return parse_pids(names)
