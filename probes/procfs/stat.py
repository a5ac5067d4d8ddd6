"""``/proc/PID/stat``: one line of space-separated fields, the process's identity and counters.

Kernel documentation: Documentation/filesystems/proc.rst (Table 1-4, "Contents of the stat fields");
``man 5 proc`` (``/proc/[pid]/stat``); fs/proc/array.c ``do_task_stat``. ``comm`` is written in
parentheses unescaped, so it may itself hold spaces and ``)``: the fields after it are parsed from
the *last* ``)``. Times are in clock ticks (``SC_CLK_TCK``), ``starttime`` in ticks since boot,
``rss`` in pages.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...agent.errors import AsbuiltError
from ._io import pid_path, read_text

PF_KTHREAD = 0x00200000  # include/linux/sched.h: "I am a kernel thread"


@dataclass
class Stat:
    pid: int = 0
    comm: str = ""
    state: str = ""  # R, S, D, Z, T, t, X, I ...
    ppid: int = 0
    pgrp: int = 0
    session: int = 0
    flags: int = 0
    utime_ticks: int = 0
    stime_ticks: int = 0
    num_threads: int = 0
    starttime_ticks: int = 0
    vsize_bytes: int = 0
    rss_pages: int = 0

    @property
    def kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def parse_stat(text: str) -> Stat:
    """Parse the stat line; ValueError when it is empty, truncated or malformed."""
    open_paren = text.find("(")
    close_paren = text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise ValueError("stat: no '(comm)'")
    rest = text[close_paren + 1:].split()
    if len(rest) < 22:
        raise ValueError(f"stat: {len(rest)} fields after comm, need 22")
    try:
        return Stat(
            pid=int(text[:open_paren]),
            comm=text[open_paren + 1:close_paren],
            state=rest[0],
            ppid=int(rest[1]),
            pgrp=int(rest[2]),
            session=int(rest[3]),
            flags=int(rest[6]),
            utime_ticks=int(rest[11]),
            stime_ticks=int(rest[12]),
            num_threads=int(rest[17]),
            starttime_ticks=int(rest[19]),
            vsize_bytes=int(rest[20]),
            rss_pages=int(rest[21]),
        )
    except ValueError as err:
        raise ValueError(f"stat: {err}") from None


def read_stat(proc_root: str, pid: int) -> Stat:
    """Read and parse ``/proc/PID/stat``: Vanished, Denied, or AsbuiltError when malformed."""
    path = pid_path(proc_root, pid, "stat")
    text = read_text(path)
    try:
        return parse_stat(text)
    except ValueError as err:
        raise AsbuiltError(f"{path}: malformed ({err})") from err
