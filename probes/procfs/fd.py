"""``/proc/PID/fd/`` (one symlink per open descriptor) and ``/proc/PID/fdinfo/FD``.

Kernel documentation: Documentation/filesystems/proc.rst (section 3.8 "/proc/<pid>/fdinfo/<fd>");
``man 5 proc`` (``/proc/[pid]/fd/``, ``/proc/[pid]/fdinfo/``). Listing needs ptrace-read access
(EACCES → Denied). Link targets: a path (``" (deleted)"`` suffix when unlinked),
``socket:[INODE]``, ``pipe:[INODE]``, ``anon_inode:[eventpoll]`` / ``anon_inode:bpf-map``,
``/memfd:NAME (deleted)``, or a namespace ``net:[INODE]``. ``fdinfo`` has ``pos:``, ``flags:``
(octal ``open(2)`` flags as the file holds them now: the kernel clears ``O_CREAT``, ``O_EXCL``,
``O_TRUNC`` and ``O_NOCTTY`` after open, so "created" is only visible to tracing) and ``mnt_id:``.
A descriptor closed between the listing and its readlink is skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

from ...agent.errors import from_oserror
from ._io import pid_path, read_text
from .links import DELETED_SUFFIX

# Target kinds.
PATH, DELETED, SOCKET, PIPE, ANON_INODE, MEMFD, OTHER = (
    "path", "deleted", "socket", "pipe", "anon_inode", "memfd", "other")

O_ACCMODE = 0o3
O_RDONLY, O_WRONLY, O_RDWR = 0o0, 0o1, 0o2
O_CREAT = 0o100
O_TRUNC = 0o1000
O_APPEND = 0o2000


@dataclass
class FdEntry:
    fd: int = 0
    target: str = ""  # the raw readlink string
    kind: str = OTHER  # path, deleted, socket, pipe, anon_inode, memfd, other
    path: str = ""  # for path/deleted: the file path without suffix; memfd: the memfd name
    inode: int = 0  # for socket/pipe
    anon: str = ""  # for anon_inode: the name (eventpoll, eventfd, bpf-map ...)
    flags: Optional[int] = None  # from fdinfo, when read (regular files only)
    pos: Optional[int] = None


@dataclass
class FdInfo:
    pos: int = 0
    flags: int = 0
    mnt_id: int = 0
    ino: int = 0


def _bracket_inode(target: str, prefix: str) -> int:
    number = target[len(prefix):-1] if target.endswith("]") else ""
    return int(number) if number.isdigit() else 0


def classify(fd: int, target: str) -> FdEntry:
    """An FdEntry for one link target (pure)."""
    entry = FdEntry(fd=fd, target=target)
    if target.startswith("/"):
        if target.startswith("/memfd:"):
            entry.kind = MEMFD
            name = target[len("/memfd:"):]
            entry.path = name[: -len(DELETED_SUFFIX)] if name.endswith(DELETED_SUFFIX) else name
        elif target.endswith(DELETED_SUFFIX):
            entry.kind, entry.path = DELETED, target[: -len(DELETED_SUFFIX)]
        else:
            entry.kind, entry.path = PATH, target
    elif target.startswith("socket:["):
        entry.kind, entry.inode = SOCKET, _bracket_inode(target, "socket:[")
    elif target.startswith("pipe:["):
        entry.kind, entry.inode = PIPE, _bracket_inode(target, "pipe:[")
    elif target.startswith("anon_inode:"):
        name = target[len("anon_inode:"):]
        entry.kind, entry.anon = ANON_INODE, name[1:-1] if name.startswith("[") and name.endswith("]") else name
    return entry


def read_fds(proc_root: str, pid: int) -> List[FdEntry]:
    """The open descriptors with their classified link targets, sorted by fd."""
    base = pid_path(proc_root, pid, "fd")
    try:
        names = os.listdir(base)
    except OSError as err:
        raise from_oserror(err, base) from err
    base += "/"
    out: List[FdEntry] = []
    readlink = os.readlink
    for name in names:
        try:
            target = readlink(base + name)
        except FileNotFoundError:
            continue  # closed since the listing (or the process is gone: the caller re-checks)
        except OSError as err:
            raise from_oserror(err, base + name) from err
        if not name.isdigit():
            continue
        out.append(classify(int(name), target))
    out.sort(key=lambda e: e.fd)
    return out


def parse_fdinfo(text: str) -> FdInfo:
    """Parse fdinfo's ``key:<TAB>value`` lines (pos, flags in octal, mnt_id, ino); bad values skipped."""
    out = FdInfo()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        try:
            if key == "pos":
                out.pos = int(value)
            elif key == "flags":
                out.flags = int(value, 8)
            elif key == "mnt_id":
                out.mnt_id = int(value)
            elif key == "ino":
                out.ino = int(value)
        except ValueError:
            continue
    return out


def read_fdinfo(proc_root: str, pid: int, fd: int) -> FdInfo:
    """Read and parse ``/proc/PID/fdinfo/FD``."""
    return parse_fdinfo(read_text(pid_path(proc_root, pid, f"fdinfo/{fd}")))


def can_read(flags: int) -> bool:
    return flags & O_ACCMODE in (O_RDONLY, O_RDWR)


def can_write(flags: int) -> bool:
    return flags & O_ACCMODE in (O_WRONLY, O_RDWR)


def is_append(flags: int) -> bool:
    return bool(flags & O_APPEND)


def is_create(flags: int) -> bool:
    """O_CREAT: visible in flags from tracing ``openat``; always False in fdinfo (the kernel clears it)."""
    return bool(flags & O_CREAT)


def mode(flags: int) -> str:
    """The model's mode letters: ``r``, ``w``, ``rw``, plus ``a`` (append) and ``c`` (create)."""
    out = ("r" if can_read(flags) else "") + ("w" if can_write(flags) else "")
    if is_append(flags):
        out += "a"
    if is_create(flags):
        out += "c"
    return out
