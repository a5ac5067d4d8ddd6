"""``/proc/PID/exe``, ``/proc/PID/cwd``, ``/proc/PID/root`` and ``/proc/PID/ns/net``: symlinks.

Kernel documentation: Documentation/filesystems/proc.rst (Table 1-1, "exe", "cwd", "root"),
``man 5 proc`` (``/proc/[pid]/exe``, ``/proc/[pid]/ns/``), ``man 7 namespaces``. Reading them needs
ptrace-read access (EACCES → Denied). ``exe`` does not exist for kernel threads and zombies
(ENOENT). A file unlinked after it was opened reads ``<path> (deleted)``. A namespace link reads
``net:[4026531840]``, the number being the namespace's inode.
"""
from __future__ import annotations

from typing import NamedTuple

from ._io import pid_path, readlink

DELETED_SUFFIX = " (deleted)"


class Link(NamedTuple):
    path: str
    deleted: bool = False


def parse_link(target: str) -> Link:
    """Split the ``" (deleted)"`` suffix off a link target."""
    if target.endswith(DELETED_SUFFIX):
        return Link(target[: -len(DELETED_SUFFIX)], True)
    return Link(target, False)


def parse_ns_inode(target: str, kind: str = "net") -> int:
    """The inode in ``<kind>:[<inode>]``; 0 when the target is not of that form."""
    prefix = kind + ":["
    if target.startswith(prefix) and target.endswith("]"):
        number = target[len(prefix):-1]
        if number.isdigit():
            return int(number)
    return 0


def read_exe(proc_root: str, pid: int) -> Link:
    """The executable's path and whether it was deleted (replaced by an upgrade, say)."""
    return parse_link(readlink(pid_path(proc_root, pid, "exe")))


def read_cwd(proc_root: str, pid: int) -> str:
    """The working directory (raw link target: may end in ``" (deleted)"``)."""
    return readlink(pid_path(proc_root, pid, "cwd"))


def read_root(proc_root: str, pid: int) -> str:
    """The root directory (``/`` unless chrooted or in another mount namespace's view)."""
    return readlink(pid_path(proc_root, pid, "root"))


def read_netns_inode(proc_root: str, pid: int) -> int:
    """The inode of the process's network namespace (0 if the link is not ``net:[N]``)."""
    return parse_ns_inode(readlink(pid_path(proc_root, pid, "ns/net")), "net")
