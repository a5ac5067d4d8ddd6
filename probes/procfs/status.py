"""``/proc/PID/status``: ``Key:<TAB>value`` lines, the human-readable process status.

Kernel documentation: Documentation/filesystems/proc.rst (Table 1-2, "Contents of the status
fields"); ``man 5 proc`` (``/proc/[pid]/status``); fs/proc/array.c ``proc_pid_status``. ``Name`` is
escaped by the kernel (a newline in comm reads ``\\n``); kernel threads have no ``Vm*`` lines.
Unknown keys are ignored and a malformed value leaves its field at the default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ._io import pid_path, read_text

_UNITS = {"kB": 1024, "mB": 1024 * 1024, "B": 1}


@dataclass
class Status:
    name: str = ""
    pid: int = 0
    ppid: int = 0
    uid: int = -1  # real
    euid: int = -1  # effective
    gid: int = -1
    egid: int = -1
    threads: int = 0
    rss_bytes: Optional[int] = None  # VmRSS; None for kernel threads
    nspid: List[int] = field(default_factory=list)  # pid in each nested pid namespace, outermost first


def _ints(value: str) -> List[int]:
    return [int(part) for part in value.split()]


def _size(value: str) -> int:
    parts = value.split()
    return int(parts[0]) * (_UNITS.get(parts[1], 1) if len(parts) > 1 else 1)


def parse_status(text: str) -> Status:
    """Parse status text; absent or malformed fields keep their defaults."""
    out = Status()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        try:
            if key == "Name":
                out.name = value[1:] if value.startswith("\t") else value.strip()
            elif key == "Pid":
                out.pid = int(value)
            elif key == "PPid":
                out.ppid = int(value)
            elif key == "Uid":
                ids = _ints(value)
                out.uid, out.euid = ids[0], ids[1]
            elif key == "Gid":
                ids = _ints(value)
                out.gid, out.egid = ids[0], ids[1]
            elif key == "Threads":
                out.threads = int(value)
            elif key == "VmRSS":
                out.rss_bytes = _size(value)
            elif key == "NSpid":
                out.nspid = _ints(value)
        except (ValueError, IndexError):
            continue
    return out


def read_status(proc_root: str, pid: int) -> Status:
    """Read and parse ``/proc/PID/status``."""
    return parse_status(read_text(pid_path(proc_root, pid, "status")))
