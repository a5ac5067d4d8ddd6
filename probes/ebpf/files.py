"""Files the traced tree opens (``syscalls:sys_{enter,exit}_{openat,openat2,open,creat}``).

The kernel side is ``files.bpf.c``: it sends each new (process, path, access class, errno) once
and counts repeats in an LRU map read at drain time. Userspace makes relative paths absolute:
``AT_FDCWD`` against the process's working directory (read from ``/proc/PID/cwd`` once, then
followed through the traced chdir/fchdir calls and inherited at fork), another dirfd via
``/proc/PID/fd/DIRFD`` (proc(5)). Exec'd programs come from the exec events (mode ``x``).

``drain()`` returns the :class:`FileObservation` s that are new or whose count changed since the
last drain; ``count``/``last_seen`` are totals so far (replace an earlier copy, do not add).
"""
from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import struct
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ...agent.errors import AsbuiltError
from ..base import Context
from .tracer import PROC_EXEC, PROC_EXIT, PROC_FORK, ProcEvent, StreamingProbe, cstr, read_link, \
    tracepoint_exists

PATH_LEN = 512
FILE_SEEN_MAX = 16384
AT_FDCWD = -100
# Linux generic open(2) flag values (x86_64, aarch64 and most others share them).
O_ACCMODE, O_WRONLY, O_RDWR = 0o3, 0o1, 0o2
O_CREAT, O_TRUNC, O_APPEND = 0o100, 0o1000, 0o2000
O_DIRECTORY, O_PATH = 0o200000, 0o10000000
OPEN_CLASS_MASK = O_ACCMODE | O_CREAT | O_TRUNC | O_APPEND | O_PATH
FILE_OPEN, FILE_CHDIR, FILE_FCHDIR = 1, 2, 3
_FILE_HEADER = 48


@dataclass
class FileObservation:
    pid: int
    path: str  # absolute when it could be resolved; else as the process gave it
    mode: str  # r, w, rw; then "a" (O_APPEND), "c" (O_CREAT), "t" (O_TRUNC); "x" exec; "p" O_PATH
    error: str = ""  # errno name of a failed open, e.g. ENOENT; "" when it succeeded
    count: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0
    flags: int = 0  # the open flags' class bits (access mode, create, trunc, append, path)
    resolved: bool = True  # False: a relative path whose directory could not be read


def open_mode(flags: int) -> str:
    """The mode letters of open(2) flags: r, w or rw, then a (append), c (create), t (truncate)."""
    if flags & O_PATH:
        return "p"
    acc = flags & O_ACCMODE
    mode = "w" if acc == O_WRONLY else "rw" if acc == O_RDWR else "r"
    if flags & O_APPEND:
        mode += "a"
    if flags & O_CREAT:
        mode += "c"
    if flags & O_TRUNC:
        mode += "t"
    return mode


def errno_name(err: int) -> str:
    """``ENOENT`` for 2; ``E<n>`` for a number this Python does not name; "" for 0."""
    if not err:
        return ""
    return errno.errorcode.get(err, f"E{err}")


def join_path(base: Optional[str], path: str) -> Optional[str]:
    """``path`` made absolute against directory ``base`` (lexically); None when it cannot be."""
    if path.startswith("/"):
        return posixpath.normpath(path) if "/." in path or "//" in path else path
    if not base or not base.startswith("/"):
        return None
    return posixpath.normpath(posixpath.join(base, path))


class _FileEvent(ctypes.Structure):
    _fields_ = [("ts", ctypes.c_uint64), ("kind", ctypes.c_uint32), ("pid", ctypes.c_uint32),
                ("tid", ctypes.c_uint32), ("dfd", ctypes.c_int32), ("flags", ctypes.c_int32),
                ("err", ctypes.c_int32), ("hash", ctypes.c_uint64), ("cls", ctypes.c_uint32),
                ("len", ctypes.c_int32)]


class _Key(ctypes.Structure):  # struct file_key
    _fields_ = [("tgid", ctypes.c_uint32), ("cls", ctypes.c_uint32), ("hash", ctypes.c_uint64),
                ("err", ctypes.c_int32), ("pad", ctypes.c_uint32)]


class FilesProbe(StreamingProbe):
    """File opens (with flags and result) of the traced tree, deduplicated in the kernel."""

    name = "files"
    description = "files the traced processes open: path, mode, failures (errno), counts"
    default = True
    cost = "medium"
    lifecycle = True

    def __init__(self) -> None:
        super().__init__()
        self.ctx: Optional[Context] = None
        self.cwd: Dict[int, Optional[str]] = {}
        self.obs: Dict[Tuple[int, str, str, str], FileObservation] = {}
        self._kkeys: Dict[Tuple[int, int, int, int], Tuple[int, str, str, str]] = {}
        self._kbase: Dict[Tuple[int, int, int, int], int] = {}
        self._klast: Dict[Tuple[int, int, int, int], int] = {}
        self._changed: set = set()
        self.events = 0  # open events received (new facts)
        self.counts_interval = 0.0  # seconds between reads of the kernel's counters (the daemon: its refresh)
        self._counts_at = 0.0
        self._raw_values: Dict[bytes, bytes] = {}  # kernel key bytes -> value bytes at the last read
        self.wall_offset = 0.0

    def sources(self, ctx: Context):
        sys_root = ctx.roots.sys
        return [("files", dict(
            PATH_LEN=PATH_LEN, FILE_SEEN_MAX=FILE_SEEN_MAX, OPEN_CLASS_MASK=OPEN_CLASS_MASK,
            CREAT_FLAGS=O_CREAT | O_WRONLY | O_TRUNC,
            HAVE_OPEN_TP=int(tracepoint_exists("syscalls", "sys_enter_open", sys_root)),
            HAVE_CREAT_TP=int(tracepoint_exists("syscalls", "sys_enter_creat", sys_root)),
            HAVE_OPENAT2_TP=int(tracepoint_exists("syscalls", "sys_enter_openat2", sys_root)),
        ))]

    def attach(self, session) -> None:
        self.ctx = session.ctx
        self.wall_offset = session.wall_offset
        session.open_buffer("file_events", self._on_raw, self._on_lost)

    def on_seed(self, pid: int, ppid: int) -> None:
        self._cwd_of(pid)

    def _on_lost(self, count: int) -> None:
        self.lost_events += count

    def _on_raw(self, raw: bytes):
        if len(raw) < _FILE_HEADER:
            raise ValueError("short file event")
        ev = _FileEvent.from_buffer_copy(raw[:_FILE_HEADER])
        path = cstr(raw[_FILE_HEADER:]) if ev.len > 0 else ""
        return ev.ts, self._on_event, (ev, path, ev.len >= PATH_LEN)

    # ---------------------------------------------------------------- working directories
    def _cwd_of(self, pid: int) -> Optional[str]:
        if pid in self.cwd:
            return self.cwd[pid]
        try:
            cwd: Optional[str] = read_link(os.path.join(self.ctx.roots.proc, str(pid), "cwd"))
        except AsbuiltError as err:
            self.ctx.gaps.add("vanished", f"pid {pid}", f"working directory: {err}")
            cwd = None
        self.cwd[pid] = cwd
        return cwd

    def on_proc_event(self, ev: ProcEvent) -> None:
        if ev.kind == PROC_FORK:
            parent = self.cwd.get(ev.ppid)
            if parent is not None:
                self.cwd[ev.pid] = parent
        elif ev.kind == PROC_EXEC and ev.path:
            path = join_path(self._cwd_of(ev.pid) if not ev.path.startswith("/") else "/", ev.path)
            self._record(ev.pid, path or ev.path, "x", "", ev.time, 1, None, 0, path is not None)
        elif ev.kind == PROC_EXIT:
            self.cwd.pop(ev.pid, None)

    # --------------------------------------------------------------------------- events
    def _on_event(self, item) -> None:
        ev, path, truncated = item
        when = ev.ts / 1e9 + self.wall_offset
        pid = ev.pid
        if ev.kind == FILE_CHDIR:
            new = join_path(self._cwd_of(pid), path) if path else None
            if new is None:  # unknown base: ask the kernel (may already have moved on)
                self.cwd.pop(pid, None)
                new = self._cwd_of(pid)
            self.cwd[pid] = new
            return
        if ev.kind == FILE_FCHDIR:
            self.cwd.pop(pid, None)
            try:
                self.cwd[pid] = read_link(os.path.join(self.ctx.roots.proc, str(pid), "fd", str(ev.dfd)))
            except AsbuiltError:
                self._cwd_of(pid)
            return
        self.events += 1
        if truncated:
            self.ctx.gaps.add("truncated", f"pid {pid}", f"path longer than {PATH_LEN - 1} bytes: {path[:80]}")
        resolved = path.startswith("/")
        full: Optional[str] = path
        if not resolved:
            if ev.dfd == AT_FDCWD:
                full = join_path(self._cwd_of(pid), path)
            else:
                try:
                    base = read_link(os.path.join(self.ctx.roots.proc, str(pid), "fd", str(ev.dfd)))
                except AsbuiltError as err:
                    base = None
                    self.ctx.gaps.add("vanished", f"pid {pid}", f"dirfd {ev.dfd} of {path}: {err}")
                full = join_path(base, path)
            resolved = full is not None
        else:
            full = join_path("/", path)
        kkey = (pid, ev.cls, ev.hash, ev.err)
        self._record(pid, full or path, open_mode(ev.cls), errno_name(ev.err), when, 1, kkey,
                     ev.cls, resolved)

    def _record(self, pid: int, path: str, mode: str, error: str, when: float, count: int,
                kkey, flags: int, resolved: bool) -> None:
        key = (pid, path, mode, error)
        obs = self.obs.get(key)
        if obs is None:
            obs = self.obs[key] = FileObservation(pid=pid, path=path, mode=mode, error=error, count=0,
                                                  first_seen=when, last_seen=when, flags=flags,
                                                  resolved=resolved)
        if kkey is None:
            obs.count += count
        elif kkey in self._kkeys:
            # the kernel forgot this key (LRU) and sent it again: keep what it had counted
            self._kbase[kkey] = self._kbase.get(kkey, 0) + self._klast.pop(kkey, 0)
        else:
            self._kkeys[kkey] = key
        if kkey is not None:
            self._klast[kkey] = max(self._klast.get(kkey, 0), 1)
        obs.last_seen = max(obs.last_seen, when)
        self._changed.add(key)

    def _read_counts(self) -> None:
        """Fold the kernel's per-key counters into the observations."""
        table = self.session.bpf[b"file_seen"] if self.session and self.session.bpf else None
        if table is None:
            return
        self._counts_at = time.monotonic()
        seen_raw = self._raw_values
        for kraw, vraw in table.raw_items():
            if seen_raw.get(kraw) == vraw:
                continue  # unchanged since the last read: most of a long-lived map
            k = table.Key.from_buffer_copy(kraw)
            v = table.Leaf.from_buffer_copy(vraw[:ctypes.sizeof(table.Leaf)])
            kkey = (k.tgid, k.cls, k.hash, k.err)
            if kkey not in self._kkeys:
                continue  # its event is still in flight: counted at the next drain
            seen_raw[kraw] = vraw
            if v.count != self._klast.get(kkey):
                self._klast[kkey] = v.count
                okey = self._kkeys[kkey]
                self.obs[okey].last_seen = max(self.obs[okey].last_seen,
                                               v.last_ns / 1e9 + self.wall_offset)
                self._changed.add(okey)
        totals: Dict[Tuple[int, str, str, str], int] = {}
        for kkey, okey in self._kkeys.items():
            totals[okey] = totals.get(okey, 0) + self._kbase.get(kkey, 0) + self._klast.get(kkey, 0)
        for okey, obs in self.obs.items():
            if obs.mode == "x":
                continue
            if okey in totals:
                obs.count = totals[okey]

    def collect_drain(self) -> List[FileObservation]:
        if time.monotonic() - self._counts_at >= self.counts_interval:
            self._read_counts()
        out = [self.obs[k] for k in sorted(self._changed, key=lambda k: self.obs[k].first_seen)]
        self._changed = set()
        return [FileObservation(**vars(o)) for o in out]

    def forget(self, pids) -> None:
        """Drop every fact kept for processes that are gone (after the daemon harvested them)."""
        from .tracer import forget_in_table

        gone = set(pids)
        if not gone:
            return
        if self.session is not None and self.session.bpf is not None:
            forget_in_table(self.session.bpf[b"file_seen"], gone)
        self._raw_values = {k: v for k, v in self._raw_values.items()
                            if struct.unpack_from("<I", k)[0] not in gone}
        for kkey in [k for k in self._kkeys if k[0] in gone]:
            del self._kkeys[kkey]
            self._kbase.pop(kkey, None)
            self._klast.pop(kkey, None)
        for okey in [k for k in self.obs if k[0] in gone]:
            del self.obs[okey]
        self._changed = {k for k in self._changed if k[0] not in gone}
        for pid in gone:
            self.cwd.pop(pid, None)

    def snapshot(self) -> List[FileObservation]:
        """Every observation so far (counts as of the last drain)."""
        return sorted((FileObservation(**vars(o)) for o in self.obs.values()), key=lambda o: o.first_seen)
