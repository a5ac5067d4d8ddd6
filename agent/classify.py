"""What kind of file a process touches, from its path (and how it was opened): one of ``FILE_CLASSES``.

Pure and path-only (no ``stat``): the same answer for a live scan, a trace event and a saved profile.
Rules, first match wins:

1. raw fd targets (readlink of ``/proc/PID/fd/N``, see :func:`raw_target_kind`): ``socket:[N]`` →
   socket, ``pipe:[N]`` → pipe, ``anon_inode:...``, namespace links (``net:[N]``), ``/memfd:...``
   and maps pseudo-paths (``[heap]``, ``[vdso]``, ``[anon:...]``) → anon; a `` (deleted)`` suffix →
   deleted;
2. ``/proc/**``, ``/sys/**`` → proc;
3. ``is_exec`` → executable; ``is_library`` → library;
4. ``/dev/shm/**`` → data; ``/dev/log`` and ``*.sock``/``*.socket`` → socket; ``/dev/**`` → device;
5. shared objects (``*.so``, ``*.so.N...``, ``ld-linux*``, ``ld-musl-*``), ``*.jar``, Node ``*.node``,
   Python modules under ``/usr/lib/python*``, ``site-packages``, ``dist-packages`` → library;
6. ``/var/log/**``, ``*.log``, ``*.log.N``, ``*.log.N.gz``, ``*.log-YYYYMMDD``, ``*.journal``,
   ``nohup.out``, ``*.err`` → log;
7. database-ish suffixes (``.db``, ``.sqlite``, ``.sqlite3``, ``.ibd``, ``.frm``, ``.myd``, ``.wal``,
   ``.rdb``, ``.aof``, ``.mdb``, ``.ldb``, ``.sst``, ``.parquet``, ``-wal``/``-shm``/``-journal``
   companions) → data;
8. ``/etc/**`` → config;
9. config suffixes (``.conf``, ``.cfg``, ``.cnf``, ``.ini``, ``.yaml``, ``.yml``, ``.toml``,
   ``.properties``, ``.env``/``.env.*``, ``.json``, ``.xml``, ``.pem``, ``.crt``, ``.key``) → config,
   except ``.json``/``.xml`` under the data roots (next rule), which are data;
10. data roots ``/var/lib``, ``/srv``, ``/data``, ``/var/cache``, ``/var/spool``, ``/var/mail``,
    ``/var/opt`` → data;
11. opened for append (``a`` in ``access``) → log (the path was not clearly data above);
12. ``/usr/bin``, ``/usr/sbin``, ``/bin``, ``/sbin``, ``/usr/local/bin``, ``/usr/local/sbin``,
    ``/usr/libexec`` → executable;
13. otherwise → other.

``access`` uses the letters r (read), w (write), a (append), c (create), x (exec).
"""
from __future__ import annotations

import functools
import re
from typing import Optional

from .model import FILE_CLASSES  # noqa: F401 - the vocabulary returned here

DELETED_SUFFIX = " (deleted)"

_RAW = re.compile(r"^([a-z_]+):\[?([^\]]*)\]?$")
_NS_KINDS = frozenset(("net", "mnt", "pid", "uts", "ipc", "user", "cgroup", "time", "pid_for_children",
                       "time_for_children"))
_LIBRARY = re.compile(
    r"(?:\.so(?:\.[0-9][\w.]*)?|/ld-linux[^/]*|/ld-musl-[^/]*|\.jar|\.node)$"
    r"|/(?:usr/(?:local/)?lib/python[\d.]*|[^/]*-packages)/.*\.(?:py|pyc|pyo|so)$")
_LOG = re.compile(
    r"(?:\.log(?:\.\d+)?(?:\.(?:gz|bz2|xz|zst))?|\.log-\d{8}(?:\.(?:gz|bz2|xz|zst))?|\.journal~?"
    r"|/nohup\.out|\.err)$", re.I)
_DATA_SUFFIX = re.compile(
    r"\.(?:db|sqlite|sqlite3|ibd|ibdata\d*|frm|myd|myi|wal|rdb|aof|mdb|ldb|sst|parquet|dbf|kdbx)$"
    r"|-(?:wal|shm|journal)$|/ibdata\d+$|/ib_logfile\d+$", re.I)
_CONFIG_SUFFIX = re.compile(
    r"(?:\.(?:conf|cfg|cnf|ini|yaml|yml|toml|properties|pem|crt|key|cert)|/\.env(?:\.[\w-]+)?"
    r"|\.env)$", re.I)
_SOFT_CONFIG_SUFFIX = re.compile(r"\.(?:json|xml)$", re.I)
_DATA_ROOTS = ("/var/lib/", "/srv/", "/data/", "/var/cache/", "/var/spool/", "/var/mail/", "/var/opt/")
_EXEC_DIRS = ("/usr/bin/", "/usr/sbin/", "/bin/", "/sbin/", "/usr/local/bin/", "/usr/local/sbin/",
              "/usr/libexec/")


def raw_target_kind(target: str) -> str:
    """Kind of a ``/proc/PID/fd/N`` link target that is not a plain path, else ``""``.

    ``socket:[123]`` → socket, ``pipe:[123]`` → pipe, ``anon_inode:[eventfd]``/``anon_inode:inotify``,
    namespace links (``net:[4026531840]``) and ``/memfd:name (deleted)`` → anon,
    ``/path (deleted)`` → deleted; ``/dev/...`` → device; a plain path or empty → "".
    """
    if not target:
        return ""
    if target[0] == "/":
        if target.startswith("/memfd:"):
            return "anon"
        if target.endswith(DELETED_SUFFIX):
            return "deleted"
        if target.startswith("/dev/") and not target.startswith("/dev/shm/") and target != "/dev/log":
            return "device"
        return ""
    if target[0] == "[":  # maps pseudo paths: [heap] [stack] [vdso] [anon:name]
        return "anon"
    m = _RAW.match(target)
    if m:
        kind = m.group(1)
        if kind == "socket":
            return "socket"
        if kind == "pipe":
            return "pipe"
        if kind == "anon_inode" or kind in _NS_KINDS:
            return "anon"
    return ""


def raw_target_inode(target: str) -> Optional[int]:
    """The inode of a ``socket:[N]``/``pipe:[N]``/``net:[N]`` target, or None."""
    m = _RAW.match(target or "")
    if m and m.group(2).isdigit():
        return int(m.group(2))
    return None


def strip_deleted(path: str) -> str:
    """The path without a trailing `` (deleted)``."""
    return path[: -len(DELETED_SUFFIX)] if path.endswith(DELETED_SUFFIX) else path


def classify(path: str, *, access: str = "", is_exec: bool = False, is_library: bool = False) -> str:
    """One of ``agent.model.FILE_CLASSES`` for a path or fd target (rules in the module docstring)."""
    if not isinstance(path, str) or not path:
        return "other"
    return _classify(path, access, is_exec, is_library)


@functools.lru_cache(maxsize=16384)
def _classify(path: str, access: str, is_exec: bool, is_library: bool) -> str:
    """Pure and called for every file fact the daemon learns (thousands a second under churn):
    the same few paths come back again and again, so answers are cached."""
    raw = raw_target_kind(path)
    if raw and raw != "device":
        return raw
    if path[0] != "/":
        return "other"
    if path.startswith(("/proc/", "/sys/")) or path in ("/proc", "/sys"):
        return "proc"
    if is_exec:
        return "executable"
    if is_library:
        return "library"
    if path.startswith("/dev/"):
        if path.startswith("/dev/shm/"):
            return "data"
        if path == "/dev/log":
            return "socket"
        return "device"
    if path.endswith((".sock", ".socket")):
        return "socket"
    if _LIBRARY.search(path):
        return "library"
    if path.startswith("/var/log/") or _LOG.search(path):
        return "log"
    if _DATA_SUFFIX.search(path):
        return "data"
    if path.startswith("/etc/"):
        return "config"
    under_data = path.startswith(_DATA_ROOTS)
    if _CONFIG_SUFFIX.search(path):
        return "config"
    if _SOFT_CONFIG_SUFFIX.search(path):
        return "data" if under_data else "config"
    if under_data:
        return "data"
    if "a" in access:
        return "log"
    if path.startswith(_EXEC_DIRS):
        return "executable"
    return "other"


__all__ = ["classify", "raw_target_kind", "raw_target_inode", "strip_deleted", "DELETED_SUFFIX"]
