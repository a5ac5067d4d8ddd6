"""Memory totals from ``/proc/meminfo`` (proc(5), Documentation/filesystems/proc.rst).

Lines are ``Key:   value kB``; values with a ``kB`` unit are KiB. ``MemAvailable`` exists since
Linux 3.14; before it the estimate is ``MemFree + Buffers + Cached``.
"""
from __future__ import annotations

import os
from typing import Dict

from ...agent.errors import from_oserror
from ...agent.model import Memory


def parse_meminfo_fields(text: str) -> Dict[str, int]:
    """Every ``Key: value [kB]`` line as bytes (kB scaled by 1024); malformed lines skipped (pure)."""
    out: Dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        words = rest.split()
        if not sep or not words:
            continue
        try:
            value = int(words[0])
        except ValueError:
            continue
        if len(words) > 1 and words[1].lower() == "kb":
            value *= 1024
        out[key.strip()] = value
    return out


def parse_meminfo(text: str) -> Memory:
    """Total, available and swap total in bytes (pure)."""
    f = parse_meminfo_fields(text)
    available = f.get("MemAvailable")
    if available is None:
        available = f.get("MemFree", 0) + f.get("Buffers", 0) + f.get("Cached", 0)
    return Memory(total_bytes=f.get("MemTotal", 0), available_bytes=available,
                  swap_total_bytes=f.get("SwapTotal", 0))


def read_meminfo(proc_root: str) -> str:
    path = os.path.join(proc_root, "meminfo")
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("ascii", "replace")
    except OSError as err:
        raise from_oserror(err, path) from err
