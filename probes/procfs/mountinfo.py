"""Mounts from ``/proc/self/mountinfo`` (proc(5), Documentation/filesystems/proc.rst §3.5).

A line is ``id parent major:minor root mountpoint options [optional...] - fstype source super-options``.
Paths escape space, tab, newline and backslash as octal (``\\040``); they are decoded here.

Pseudo filesystems that say nothing about the host's storage (proc, sysfs, cgroup ...) are left out;
tmpfs and devtmpfs stay (they hold data and take memory).

Sizes come from ``os.statvfs`` and only when the roots are the live host's (a captured tree's
mountpoints are not this machine's). statvfs on a dead NFS/CIFS server can block for minutes, so
every call runs in its own daemon thread joined with a timeout (:data:`STATVFS_TIMEOUT` seconds).
A call that times out leaves the mount's size empty and is reported to the caller; its thread is
abandoned (daemon: it cannot keep the process alive, and NFS waits are killable). After
:data:`MAX_STUCK` timeouts the remaining mounts are not statted at all, so a host with many dead
mounts costs at most ``MAX_STUCK * STATVFS_TIMEOUT`` seconds and leaks at most ``MAX_STUCK`` threads.
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from ...agent.errors import from_oserror
from ...agent.model import Mount

STATVFS_TIMEOUT = 2.0
MAX_STUCK = 3

PSEUDO_FSTYPES = frozenset((
    "proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs", "securityfs",
    "pstore", "bpf", "configfs", "fusectl", "hugetlbfs", "binfmt_misc", "autofs", "nsfs",
    "rpc_pipefs", "selinuxfs", "efivarfs", "nfsd",
))

_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass
class MountInfo:
    mount_id: int = 0
    parent_id: int = 0
    major_minor: str = ""
    root: str = ""
    mountpoint: str = ""
    options: str = ""
    optional: List[str] = field(default_factory=list)  # shared:N, master:N ...
    fstype: str = ""
    source: str = ""
    super_options: str = ""


def unescape(text: str) -> str:
    """Decode the kernel's octal escapes (``\\040`` -> space) (pure)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo_line(line: str) -> Optional[MountInfo]:
    """One line, or None when it is malformed or truncated (pure)."""
    words = line.split(" ")
    try:
        sep = words.index("-", 6)
    except ValueError:
        return None
    if len(words) < sep + 3:
        return None
    try:
        mount_id, parent_id = int(words[0]), int(words[1])
    except ValueError:
        return None
    return MountInfo(mount_id=mount_id, parent_id=parent_id, major_minor=words[2],
                     root=unescape(words[3]), mountpoint=unescape(words[4]), options=words[5],
                     optional=[w for w in words[6:sep] if w], fstype=words[sep + 1],
                     source=unescape(words[sep + 2]),
                     super_options=words[sep + 3] if len(words) > sep + 3 else "")


def parse_mountinfo(text: str) -> List[MountInfo]:
    """Every well-formed line, in file order (pure)."""
    out = []
    for line in text.splitlines():
        if line.strip():
            entry = parse_mountinfo_line(line.strip("\n"))
            if entry is not None:
                out.append(entry)
    return out


def merged_options(entry: MountInfo) -> str:
    """Per-mount options then the superblock's, without repeats, as ``/proc/mounts`` shows them."""
    seen = []
    for opt in entry.options.split(",") + entry.super_options.split(","):
        if opt and opt not in seen and not (opt in ("rw", "ro") and seen and seen[0] in ("rw", "ro")):
            seen.append(opt)
    return ",".join(seen)


def to_mounts(entries: List[MountInfo]) -> List[Mount]:
    """The mounts worth keeping, without sizes (pure)."""
    return [Mount(device=e.source, mountpoint=e.mountpoint, fstype=e.fstype, options=merged_options(e))
            for e in entries if e.fstype not in PSEUDO_FSTYPES]


def read_mountinfo(proc_root: str) -> str:
    path = os.path.join(proc_root, "self", "mountinfo")
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "surrogateescape")
    except OSError as err:
        raise from_oserror(err, path) from err


def _statvfs_with_timeout(path: str, timeout: float,
                          statvfs: Callable[[str], os.statvfs_result]) -> Tuple[str, object]:
    """("ok", statvfs result) | ("error", OSError) | ("timeout", None)."""
    box: list = []

    def run() -> None:
        try:
            box.append(("ok", statvfs(path)))
        except OSError as err:
            box.append(("error", err))

    worker = threading.Thread(target=run, name="asbuilt-statvfs", daemon=True)
    worker.start()
    worker.join(timeout)
    return box[0] if box else ("timeout", None)


def fill_sizes(mounts: List[Mount], on_problem: Callable[[str, str, str], None],
               timeout: float = STATVFS_TIMEOUT, max_stuck: int = MAX_STUCK,
               statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> None:
    """Set size_bytes/used_bytes of each mount from statvfs (live host only; see module docstring).

    ``on_problem(kind, subject, detail)`` is told of each mount left without a size (a gap).
    ``statvfs`` is injectable so the timeout path can be exercised with a call that really blocks.
    """
    stuck = 0
    for mount in mounts:
        if stuck >= max_stuck:
            on_problem("unreadable", mount.mountpoint, "statvfs skipped: earlier mounts did not answer")
            continue
        status, value = _statvfs_with_timeout(mount.mountpoint, timeout, statvfs)
        if status == "timeout":
            stuck += 1
            on_problem("unreadable", mount.mountpoint, f"statvfs did not answer within {timeout:g}s")
        elif status == "error":
            err = from_oserror(value, f"statvfs {mount.mountpoint}")  # type: ignore[arg-type]
            on_problem("unreadable", mount.mountpoint, str(err))
        else:
            st = value
            mount.size_bytes = st.f_blocks * st.f_frsize  # type: ignore[attr-defined]
            mount.used_bytes = (st.f_blocks - st.f_bfree) * st.f_frsize  # type: ignore[attr-defined]
