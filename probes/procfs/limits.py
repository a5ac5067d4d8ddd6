"""``/proc/PID/limits``: the resource limits (``getrlimit``), a header line then one row per limit.

Kernel documentation: Documentation/filesystems/proc.rst (Table 1-1 "limits"); ``man 5 proc``
(``/proc/[pid]/limits``); fs/proc/base.c ``proc_pid_limits``. Columns are space-padded
(``%-25s %-20s %-20s %-10s``); names have single spaces inside, so columns are split at runs of
two or more spaces. Values stay strings (``unlimited`` or a number); two rows have no unit.
"""
from __future__ import annotations

import functools
import re
from typing import List, NamedTuple, Tuple

from ._io import pid_path, read_text

_ROW = re.compile(r"^(\S.*?)\s{2,}(\S+)\s+(\S+)(?:\s+(\S+))?\s*$")


class Limit(NamedTuple):
    name: str
    soft: str
    hard: str
    unit: str


def parse_limits(text: str) -> List[Limit]:
    """Parse the rows; the header and malformed rows are skipped."""
    out: List[Limit] = []
    for line in text.splitlines():
        if line.startswith("Limit "):
            continue
        match = _ROW.match(line)
        if match:
            out.append(Limit(match.group(1), match.group(2), match.group(3), match.group(4) or ""))
    return out


@functools.lru_cache(maxsize=256)
def _parsed(text: str) -> Tuple[Limit, ...]:
    return tuple(parse_limits(text))


def read_limits(proc_root: str, pid: int) -> List[Limit]:
    """Read and parse ``/proc/PID/limits`` (most processes share a few distinct texts: each is
    parsed once, bounded)."""
    return list(_parsed(read_text(pid_path(proc_root, pid, "limits"))))
