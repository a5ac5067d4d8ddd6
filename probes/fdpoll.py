"""Files and sockets of traced processes by polling ``/proc/PID/fd`` (the no-eBPF fallback).

Reads ``/proc/PID/fd/*`` (readlink: the open file's path, ``socket:[INODE]``, ``pipe:[INODE]``,
``anon_inode:...``), ``/proc/PID/fdinfo/N`` (``flags:`` in octal: the access mode and O_APPEND),
``/proc/PID/cwd`` and ``/proc/PID/exe``; see ``proc(5)`` and ``Documentation/filesystems/proc.rst``.
Every ``interval`` seconds (default 0.2) each traced process (per thread group: threads share the
fd table) is listed; each file path / socket inode is recorded once per pid with first/last seen
and the union of the access modes it was seen open with: ``r``, ``w``, ``rw``, plus ``a`` for
O_APPEND (``wa``, ``rwa``). O_CREAT and O_TRUNC are not kept by the kernel after open, so whether
a file was created cannot be known here.

What polling misses (coverage says so): a file or socket opened and closed between two polls
(config files read in one go at start-up, short DNS lookups, short-lived children that live
less than an interval), failed opens (ENOENT probes of search paths), and the direction of a
socket (sock_diag resolves the inode later). A thread that unshared its fd table
(``clone`` without CLONE_FILES) is not seen. A process that vanishes mid-poll is normal: it is
dropped from the set, and a gap is recorded only when it vanished before it was polled once.
Memory is bounded: at most ``max_per_pid`` records per process and ``max_pids`` processes,
with what did not fit counted (``dropped``, reported as lost events).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

from ..agent.errors import AsbuiltError, Denied, Vanished, from_oserror
from ..agent.model import ProbeRun
from .base import Context, Probe
from .procfs.pids import descendants, read_parents

log = logging.getLogger(__name__)

O_ACCMODE = 0o3
O_WRONLY = 0o1
O_RDWR = 0o2
O_APPEND = 0o2000
O_PATH = 0o10000000


# ------------------------------------------------------------------------------- pure parsers
def parse_fd_target(link: str) -> Tuple[str, Union[str, int], bool]:
    """Classify a ``/proc/PID/fd/N`` link: (kind, value, deleted) — pure.

    kind is ``file`` (value: path), ``socket`` (value: inode), ``pipe`` (value: ``pipe:[N]``),
    ``anon`` (``anon_inode:...``), ``memfd`` (``/memfd:NAME``) or ``other``; deleted is True for ``path (deleted)``.
    """
    if link.startswith("/memfd:"):
        return "memfd", link, link.endswith(" (deleted)")
    if link.startswith("/"):
        if link.endswith(" (deleted)"):
            return "file", link[: -len(" (deleted)")], True
        return "file", link, False
    if link.startswith("socket:[") and link.endswith("]"):
        try:
            return "socket", int(link[len("socket:["):-1]), False
        except ValueError:
            return "other", link, False
    if link.startswith("pipe:["):
        return "pipe", link, False
    if link.startswith("anon_inode:"):
        return "anon", link, False
    return "other", link, False


def parse_fdinfo_flags(text: str) -> Optional[int]:
    """The ``flags:`` value (octal) of a ``/proc/PID/fdinfo/N`` text, None if absent/malformed."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            try:
                return int(value.strip(), 8)
            except ValueError:
                return None
    return None


def mode_from_flags(flags: Optional[int]) -> str:
    """Access mode letters from open flags: ``r``, ``w``, ``rw``, plus ``a`` for O_APPEND; "" unknown."""
    if flags is None or flags & O_PATH:
        return ""
    acc = flags & O_ACCMODE
    mode = "w" if acc == O_WRONLY else "rw" if acc == O_RDWR else "r"
    if flags & O_APPEND:
        mode += "a"
    return mode


def merge_modes(old: str, new: str) -> str:
    """Union of two mode strings, in the canonical order r, w, a (pure)."""
    letters = set(old) | set(new)
    return "".join(c for c in "rwax" if c in letters)


# ------------------------------------------------------------------------------------ readers
def read_fd_table(proc_root: str, pid: int) -> Dict[int, str]:
    """fd number -> link target of ``pid``; Vanished/Denied when the fd directory cannot be listed.

    An fd closed between the listing and its readlink is left out (normal churn).
    """
    base = os.path.join(proc_root, str(pid), "fd")
    try:
        names = os.listdir(base)
    except OSError as err:
        raise from_oserror(err, base) from err
    table: Dict[int, str] = {}
    for name in names:
        try:
            table[int(name)] = os.readlink(os.path.join(base, name))
        except (OSError, ValueError):
            continue
    return table


def read_fdinfo_flags(proc_root: str, pid: int, fd: int) -> Optional[int]:
    """Open flags of one fd from ``/proc/PID/fdinfo/N``; None when it is gone or unreadable."""
    try:
        with open(os.path.join(proc_root, str(pid), "fdinfo", str(fd)), "rb") as fh:
            return parse_fdinfo_flags(fh.read().decode("ascii", "replace"))
    except OSError:
        return None


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError as err:
        raise from_oserror(err, path) from err


# ------------------------------------------------------------------------------- observations
@dataclass
class FdFile:
    """A path (or pipe/anon inode) a traced process had open."""

    pid: int
    path: str
    kind: str  # file, pipe, anon, memfd, other
    mode: str  # r, w, rw, + a (append); "" unknown
    deleted: bool
    first_seen: float
    last_seen: float


@dataclass
class FdSocket:
    """A socket a traced process had open, by inode (sock_diag / /proc/net resolve the rest)."""

    pid: int
    inode: int
    first_seen: float
    last_seen: float


@dataclass
class FdProcess:
    """Executable and working directory of a polled process (updated when they change)."""

    pid: int
    exe: str
    cwd: str
    first_seen: float
    last_seen: float


Observation = Union[FdFile, FdSocket, FdProcess]


class _PidState:
    __slots__ = ("table", "records", "info", "polled", "dropped")

    def __init__(self) -> None:
        self.table: Dict[int, str] = {}
        self.records: Dict[tuple, Union[FdFile, FdSocket]] = {}
        self.info: Optional[FdProcess] = None
        self.polled = False
        self.dropped = 0


# -------------------------------------------------------------------------------------- probe
class FdPollProbe(Probe):
    """Streaming: poll the fd tables of a traced process tree."""

    name = "fdpoll"
    description = "open files and sockets of traced processes by polling /proc/PID/fd (no eBPF)"
    default = True
    needs = ("root",)
    cost = "medium"
    mode = "fallback-polling"

    def __init__(self, interval: float = 0.2, max_per_pid: int = 4096, max_pids: int = 4096,
                 rescan_seconds: float = 1.0) -> None:
        self.interval = interval
        self.max_per_pid = max_per_pid
        self.max_pids = max_pids
        self.rescan_seconds = rescan_seconds
        self._proc = "/proc"
        self._ctx: Optional[Context] = None
        self._states: Dict[int, _PidState] = {}
        self._active: Set[int] = set()
        self._dirty: Dict[tuple, Observation] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._follow = False
        self._pid_source: Optional[Callable[[], Iterable[int]]] = None
        self._last_rescan = 0.0
        self._started = 0.0
        self.polls = 0
        self.pids_dropped = 0
        self.vanished = 0
        self.error = ""

    @property
    def dropped(self) -> int:
        """Records and processes that did not fit the memory bounds."""
        return self.pids_dropped + sum(s.dropped for s in self._states.values())

    def check(self, ctx: Context) -> Optional[str]:
        fd_dir = os.path.join(ctx.roots.proc, "self", "fd")
        if not os.path.isdir(fd_dir):
            return f"{fd_dir} is not readable: no procfs here"
        if not ctx.privileged:
            return "needs root to read other processes' /proc/PID/fd"
        return None

    # ------------------------------------------------------------------------- start/stop
    def start(self, ctx: Context, pids: Iterable[int], follow_children: bool = True,
              pid_source: Optional[Callable[[], Iterable[int]]] = None, background: bool = True) -> None:
        """Poll ``pids`` (and, when following children, their descendants) in a background thread.

        ``pid_source`` (e.g. :meth:`ProcConnectorProbe.traced`) supplies the current traced set
        each poll; without it, children are found by rescanning ``/proc/*/stat`` every
        ``rescan_seconds``. ``background=False`` polls once and leaves further polls to the
        caller (:meth:`poll_once`).
        """
        self._ctx = ctx
        self._proc = ctx.roots.proc
        self._follow = follow_children
        self._pid_source = pid_source
        self._started = time.monotonic()
        self.add_pids(pids)
        if follow_children and pid_source is None:
            self._rescan()
        self.poll_once()
        if not background:
            return
        self._thread = threading.Thread(target=self._loop, name="asbuilt-fdpoll", daemon=True)
        self._thread.start()

    def add_pids(self, pids: Iterable[int]) -> None:
        """Start polling these pids too (e.g. children learned from fork events)."""
        with self._lock:
            for pid in pids:
                pid = int(pid)
                if pid in self._states:
                    continue  # already polled (or vanished): a pid is taken once
                if len(self._states) >= self.max_pids:
                    self.pids_dropped += 1
                    continue
                self._states[pid] = _PidState()
                self._active.add(pid)

    def _rescan(self) -> None:
        self._last_rescan = time.monotonic()
        try:
            ppids = read_parents(self._proc)
        except AsbuiltError as err:
            log.debug("probe=%s rescan failed: %s", self.name, err)
            return
        with self._lock:
            roots = set(self._active)
        self.add_pids(set(descendants(ppids, roots)))

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                if self._pid_source is not None:
                    self.add_pids(self._pid_source())
                elif self._follow and time.monotonic() - self._last_rescan >= self.rescan_seconds:
                    self._rescan()
                self.poll_once()
        except Exception as err:  # the probe stops; the run records why
            self.error = f"{type(err).__name__}: {err}"
            log.warning("probe=%s status=error reason=%s", self.name, self.error)

    def stop(self) -> None:
        """Stop polling (prompt: the wait between polls is interruptible); idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    # ------------------------------------------------------------------------------ polling
    def poll_once(self) -> None:
        """One pass over every active pid; vanished/denied pids are dropped from the set."""
        now = time.time()
        with self._lock:
            active = sorted(self._active)
        for pid in active:
            try:
                self._poll_pid(pid, now)
            except Vanished:
                self._retire(pid, "vanished", "exited before its open files were read")
            except Denied as err:
                self._retire(pid, "denied", str(err))
        self.polls += 1

    def _retire(self, pid: int, kind: str, detail: str) -> None:
        with self._lock:
            self._active.discard(pid)
            state = self._states.get(pid)
            first_miss = state is not None and not state.polled
        if kind == "vanished":
            self.vanished += 1
            if not first_miss:
                return  # polled at least once, then exited: normal
        if self._ctx is not None:
            self._ctx.gaps.add(kind, f"pid {pid}", f"fdpoll: {detail}")

    def _poll_pid(self, pid: int, now: float) -> None:
        table = read_fd_table(self._proc, pid)  # Vanished/Denied: the whole pid
        base = os.path.join(self._proc, str(pid))
        try:
            exe = _readlink(os.path.join(base, "exe"))
        except (Vanished, Denied):
            exe = ""  # a zombie or kernel thread; the fd listing decides whether it is gone
        try:
            cwd = _readlink(os.path.join(base, "cwd"))
        except (Vanished, Denied):
            cwd = ""
        flags_of: Dict[int, Optional[int]] = {}
        state = self._states[pid]
        for fd, target in table.items():
            if state.table.get(fd) != target:  # newly opened since the last poll
                flags_of[fd] = read_fdinfo_flags(self._proc, pid, fd)
        with self._lock:
            self._update(pid, state, table, flags_of, exe, cwd, now)

    def _update(self, pid: int, state: _PidState, table: Dict[int, str],
                flags_of: Dict[int, Optional[int]], exe: str, cwd: str, now: float) -> None:
        state.polled = True
        if exe or cwd:
            info = state.info
            if info is None or (exe and exe != info.exe) or (cwd and cwd != info.cwd):
                state.info = FdProcess(pid=pid, exe=exe or (info.exe if info else ""),
                                       cwd=cwd or (info.cwd if info else ""), first_seen=now, last_seen=now)
                self._dirty[(pid, "proc")] = state.info
            else:
                info.last_seen = now
        for fd, target in table.items():
            kind, value, deleted = parse_fd_target(target)
            key = ("s", value) if kind == "socket" else ("f", value)
            rec = state.records.get(key)
            if rec is None:
                if len(state.records) >= self.max_per_pid:
                    if fd in flags_of:
                        state.dropped += 1
                    continue
                if kind == "socket":
                    rec = FdSocket(pid=pid, inode=int(value), first_seen=now, last_seen=now)
                else:
                    rec = FdFile(pid=pid, path=str(value), kind=kind,
                                 mode=mode_from_flags(flags_of.get(fd)) if kind == "file" else "",
                                 deleted=deleted, first_seen=now, last_seen=now)
                state.records[key] = rec
                self._dirty[(pid,) + key] = rec
                continue
            rec.last_seen = now
            if fd in flags_of and isinstance(rec, FdFile) and kind == "file":
                mode = merge_modes(rec.mode, mode_from_flags(flags_of[fd]))
                if mode != rec.mode or deleted != rec.deleted:
                    rec.mode, rec.deleted = mode, deleted
                    self._dirty[(pid,) + key] = rec
        state.table = table

    # ------------------------------------------------------------------------------ results
    def drain(self) -> List[Observation]:
        """Copies of the records new or changed (mode grew, exe/cwd changed) since the last drain."""
        with self._lock:
            out = [dataclasses.replace(ob) for ob in self._dirty.values()]
            self._dirty.clear()
        return out

    def records(self) -> List[Observation]:
        """Copies of every record kept, with up-to-date last_seen (call after stop())."""
        with self._lock:
            out: List[Observation] = []
            for state in self._states.values():
                if state.info is not None:
                    out.append(dataclasses.replace(state.info))
                out.extend(dataclasses.replace(r) for r in state.records.values())
        return out

    def probe_run(self) -> ProbeRun:
        """This run's coverage row: items kept, lost (= dropped by the bounds), and what it misses."""
        with self._lock:
            items = sum(len(s.records) for s in self._states.values())
        reason = self.error or (f"polled /proc/PID/fd every {self.interval:g} s: files and sockets "
                                "opened and closed between polls, and failed opens, are not seen")
        return ProbeRun(name=self.name, status="error" if self.error else "ok", reason=reason,
                        items=items, lost_events=self.dropped, mode=self.mode,
                        duration_seconds=round(time.monotonic() - self._started, 6) if self._started else 0.0)
