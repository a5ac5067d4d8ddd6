"""One process, all of its ``/proc/PID/*`` files in one go: the per-process scan unit.

Kernel documentation: Documentation/filesystems/proc.rst ("Process-Specific Subdirectories");
``man 5 proc``. Each part is read by its own module (stat, status, cmdline, environ, links, maps,
fd, cgroup, limits); this module only orders the reads and applies the semantics:

* ``stat`` is read first; if it is gone (ENOENT/ESRCH) the pid has vanished → :class:`Vanished`.
* A permission denied on one part (environ, exe, maps, fds ... of another user's process when not
  root) leaves that part empty and appends its name to ``ProcInfo.denied``; the read goes on.
* Another part gone or unreadable while the process lives on (``exe`` of a zombie, say) leaves
  the part empty and appends its name to ``ProcInfo.missing``.
* PID reuse: ``stat`` is read again at the end; if the process is gone or its ``starttime``
  changed (another process took the pid), :class:`Vanished` is raised.

Kernel threads (``PF_KTHREAD``) have no executable, environment, mappings or descriptors of their
own: for them only stat, status and cgroup are read. Only regular-file descriptors (path and
deleted targets) get an access mode: a host may hold tens of thousands of socket fds. The mode
comes from the fd link's own permission bits (``lstat``, as lsof does); ``fdinfo`` is read only
for a descriptor open for writing (its ``O_APPEND`` is there alone) or for neither (``O_PATH``).
"""
from __future__ import annotations

import os
import stat as _stat
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, TypeVar

from ...agent.errors import AsbuiltError, Denied, Vanished
from . import fd as fdmod
from ._io import read_text
from .cgroup import derive, read_cgroup
from .cmdline import read_cmdline
from .environ import read_environ
from .limits import Limit, read_limits
from .links import Link, parse_link, read_cwd, read_exe, read_netns_inode, read_root
from .maps import read_mapped_files
from .stat import Stat, read_stat
from .status import Status, read_status

T = TypeVar("T")
_R_USR, _RW_USR = _stat.S_IRUSR, _stat.S_IRUSR | _stat.S_IWUSR

# Part names as they appear in ProcInfo.denied / ProcInfo.missing.
PARTS = ("status", "cmdline", "exe", "cwd", "root", "netns", "environ", "cgroup", "limits", "maps",
         "fds", "fdinfo")


@dataclass
class ProcInfo:
    pid: int = 0
    stat: Stat = field(default_factory=Stat)
    status: Status = field(default_factory=Status)
    cmdline: List[str] = field(default_factory=list)
    environ: Dict[str, str] = field(default_factory=dict)  # raw values: redact before storing
    exe: str = ""
    exe_deleted: bool = False
    cwd: str = ""
    cwd_deleted: bool = False
    root: str = ""
    netns: int = 0  # inode of /proc/PID/ns/net
    libraries: List[Link] = field(default_factory=list)  # from maps: *.so, ld-linux
    mapped_files: List[Link] = field(default_factory=list)  # from maps: other files (incl. the exe)
    fds: List[fdmod.FdEntry] = field(default_factory=list)  # path/deleted entries carry fdinfo flags
    cgroup: str = ""
    systemd_unit: str = ""
    container_id: str = ""
    container_runtime: str = ""
    pod_id: str = ""
    limits: List[Limit] = field(default_factory=list)
    denied: List[str] = field(default_factory=list)  # parts not readable: permission denied
    missing: List[str] = field(default_factory=list)  # parts gone/unreadable while the process lived

    @property
    def name(self) -> str:
        return self.stat.comm

    @property
    def ppid(self) -> int:
        return self.stat.ppid

    @property
    def kernel_thread(self) -> bool:
        return self.stat.kernel_thread


def _part(info: ProcInfo, name: str, fn: Callable[[str, int], T], proc_root: str) -> Optional[T]:
    try:
        return fn(proc_root, info.pid)
    except Denied:
        info.denied.append(name)
    except AsbuiltError:  # Vanished: gone while the process lives on, or an I/O error
        info.missing.append(name)
    return None


def _read_fds(info: ProcInfo, proc_root: str) -> None:
    entries = _part(info, "fds", fdmod.read_fds, proc_root)
    if not entries:
        return
    info.fds = entries
    base = f"{proc_root}/{info.pid}/fdinfo/"
    links = f"{proc_root}/{info.pid}/fd/"
    lstat = os.lstat
    for entry in entries:
        if entry.kind != fdmod.PATH and entry.kind != fdmod.DELETED:
            continue
        # The fd link's own mode bits are the open mode (r-x for FMODE_READ, -wx for FMODE_WRITE),
        # as lsof reads them: one lstat instead of opening fdinfo. Only a descriptor open for
        # writing (append is in fdinfo's flags alone) or for neither (O_PATH) has its fdinfo read.
        try:
            link_mode = lstat(links + str(entry.fd)).st_mode & _RW_USR
        except OSError:
            link_mode = 0
        if link_mode == _R_USR:
            entry.flags = fdmod.O_RDONLY
            continue
        try:
            fdinfo = fdmod.parse_fdinfo(read_text(base + str(entry.fd)))
        except Denied:
            if "fdinfo" not in info.denied:
                info.denied.append("fdinfo")
            return
        except AsbuiltError:
            continue  # closed since the listing
        entry.flags, entry.pos = fdinfo.flags, fdinfo.pos


def read_process(proc_root: str, pid: int, with_maps: bool = True, with_fds: bool = True,
                 with_environ: bool = True) -> ProcInfo:
    """Everything procfs says about ``pid``; :class:`Vanished` if it is gone or was reused."""
    stat = read_stat(proc_root, pid)  # Vanished here: the pid is gone
    info = ProcInfo(pid=pid, stat=stat)
    status = _part(info, "status", read_status, proc_root)
    if status is not None:
        info.status = status
    if not stat.kernel_thread:
        info.cmdline = _part(info, "cmdline", read_cmdline, proc_root) or []
        exe = _part(info, "exe", read_exe, proc_root)
        if exe is not None:
            info.exe, info.exe_deleted = exe
        cwd = _part(info, "cwd", read_cwd, proc_root)
        if cwd is not None:
            info.cwd, info.cwd_deleted = parse_link(cwd)
        info.root = _part(info, "root", read_root, proc_root) or ""
        info.netns = _part(info, "netns", read_netns_inode, proc_root) or 0
        if with_environ:
            info.environ = _part(info, "environ", read_environ, proc_root) or {}
    cgroup = _part(info, "cgroup", read_cgroup, proc_root)
    if cgroup:
        info.cgroup = cgroup
        derived = derive(cgroup)
        info.systemd_unit = derived.systemd_unit
        info.container_id = derived.container_id
        info.container_runtime = derived.container_runtime
        info.pod_id = derived.pod_id
    if not stat.kernel_thread:
        info.limits = _part(info, "limits", read_limits, proc_root) or []
        if with_maps:
            files = _part(info, "maps", read_mapped_files, proc_root)
            if files is not None:
                info.libraries, info.mapped_files = files.libraries, files.files
        if with_fds:
            _read_fds(info, proc_root)
    again = read_stat(proc_root, pid)  # Vanished here: it went away during the read
    if again.starttime_ticks != stat.starttime_ticks:
        raise Vanished(f"pid {pid}: reused by another process during the read")
    return info
