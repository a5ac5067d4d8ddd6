"""``/proc/PID/cmdline``: the argument vector, each argument terminated by NUL.

Kernel documentation: Documentation/filesystems/proc.rst (Table 1-1, "cmdline");
``man 5 proc`` (``/proc/[pid]/cmdline``). Empty for kernel threads and zombies. A process may
rewrite its argv area (``setproctitle``): then there may be one space-joined argument and no final
NUL. Empty arguments in the middle are real and kept.
"""
from __future__ import annotations

from typing import List

from ._io import pid_path, read_text


def parse_cmdline(text: str) -> List[str]:
    """The arguments; a single trailing NUL (or none) ends the last one."""
    if not text:
        return []
    args = text.split("\0")
    if args[-1] == "":
        args.pop()
    return args


def read_cmdline(proc_root: str, pid: int) -> List[str]:
    """Read and parse ``/proc/PID/cmdline``."""
    return parse_cmdline(read_text(pid_path(proc_root, pid, "cmdline")))
