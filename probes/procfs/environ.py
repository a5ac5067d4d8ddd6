"""``/proc/PID/environ``: the initial environment, ``NAME=value`` entries terminated by NUL.

Kernel documentation: Documentation/filesystems/proc.rst (Table 1-1, "environ");
``man 5 proc`` (``/proc/[pid]/environ``). Reading needs ptrace-read access (another user's process
gives EACCES → Denied). It shows the environment at exec time, not later ``setenv`` calls. Values
are secrets-bearing: callers redact before storing.
"""
from __future__ import annotations

from typing import Dict

from ._io import pid_path, read_text


def parse_environ(text: str) -> Dict[str, str]:
    """Entries split at the first ``=`` (a value may hold ``=``); an entry without ``=`` is kept
    as a name with an empty value; the first of duplicated names wins (as ``getenv``)."""
    env: Dict[str, str] = {}
    for entry in text.split("\0"):
        if not entry:
            continue
        name, _, value = entry.partition("=")
        if name not in env:
            env[name] = value
    return env


def read_environ(proc_root: str, pid: int) -> Dict[str, str]:
    """Read and parse ``/proc/PID/environ``."""
    return parse_environ(read_text(pid_path(proc_root, pid, "environ")))
