"""System statistics from ``/proc/stat`` (proc(5)); the profile keeps ``btime``, the boot time.

``btime N`` is the boot time in seconds since the epoch; per-process start times in
``/proc/PID/stat`` are clock ticks after it.
"""
from __future__ import annotations

import os

from ...agent.errors import AsbuiltError, from_oserror


def parse_boot_time(text: str) -> float:
    """The ``btime`` value; 0.0 when absent or malformed (pure)."""
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "btime":
            try:
                return float(int(words[1]))
            except ValueError:
                return 0.0
    return 0.0


def read_proc_stat(proc_root: str) -> str:
    path = os.path.join(proc_root, "stat")
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("ascii", "replace")
    except OSError as err:
        raise from_oserror(err, path) from err


def read_boot_time(proc_root: str) -> float:
    """Boot time (Unix seconds) of the host whose procfs is at ``proc_root``."""
    value = parse_boot_time(read_proc_stat(proc_root))
    if not value:
        raise AsbuiltError(f"{os.path.join(proc_root, 'stat')}: no btime line")
    return value
