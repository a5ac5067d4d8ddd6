"""Network namespaces: which processes share one, their ``ip netns`` names, and running code in one.

- ``/proc/PID/ns/net`` -- a magic link reading ``net:[INODE]``; the inode identifies the namespace
  (``man 7 namespaces``, ``man 7 network_namespaces``).
- ``/run/netns/NAME`` -- ``ip netns add`` bind-mounts the namespace file there
  (``man 8 ip-netns``); ``stat`` of the mount gives the same inode. A stale entry (the mount gone,
  the empty file left) lives on the directory's own filesystem and is ignored.
- ``setns(2)`` with ``CLONE_NEWNET`` moves only the calling thread. :func:`in_netns` calls it
  through ctypes (``os.setns`` exists only from Python 3.12) in a short-lived dedicated thread,
  so the caller's thread never changes namespace. A socket keeps the namespace it was created in,
  so a netlink socket made inside can be used from any thread afterwards.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from typing import Any, Callable, Dict, List, Optional, TypeVar, Union

from ...agent.errors import AsbuiltError, Denied, from_oserror

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc: Optional[ctypes.CDLL] = None


def parse_ns_link(text: str) -> int:
    """The inode in a namespace link's text (``net:[4026531840]``); ValueError when malformed."""
    kind, sep, rest = text.strip().partition(":[")
    if not sep or not kind or not rest.endswith("]") or not rest[:-1].isdigit():
        raise ValueError(f"not a namespace link: {text!r}")
    return int(rest[:-1])


def netns_of(proc_root: str, pid: int) -> int:
    """Inode of the network namespace of ``pid`` (readlink ``<proc_root>/PID/ns/net``)."""
    path = os.path.join(proc_root, str(pid), "ns", "net")
    try:
        text = os.readlink(path)
    except OSError as err:
        raise from_oserror(err, f"pid {pid} net namespace") from err
    try:
        return parse_ns_link(text)
    except ValueError as err:
        raise AsbuiltError(f"{path}: {err}") from err


def namespaces(proc_root: str, denied: Optional[List[int]] = None) -> Dict[int, List[int]]:
    """Every network namespace in use by a process: {namespace inode: [pids]} (pids sorted).

    Processes that vanish while listing are left out; those whose link cannot be read are left
    out and their pids appended to ``denied`` when given (to be recorded as gaps).
    """
    out: Dict[int, List[int]] = {}
    try:
        names = os.listdir(proc_root)
    except OSError as err:
        raise from_oserror(err, proc_root) from err
    for name in names:
        if not name.isdigit():
            continue
        try:
            inode = netns_of(proc_root, int(name))
        except Denied:
            if denied is not None:
                denied.append(int(name))
            continue
        except AsbuiltError:
            continue
        out.setdefault(inode, []).append(int(name))
    for pids in out.values():
        pids.sort()
    return out


def named_namespaces(run_netns: str = "/run/netns") -> Dict[int, str]:
    """Namespaces named by ``ip netns``: {namespace inode: name}. Empty when the directory is absent."""
    try:
        dir_dev = os.stat(run_netns).st_dev
        names = sorted(os.listdir(run_netns))
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise from_oserror(err, run_netns) from err
    out: Dict[int, str] = {}
    for name in names:
        try:
            st = os.stat(os.path.join(run_netns, name))
        except OSError:
            continue  # removed meanwhile, or unreadable
        if st.st_dev == dir_dev:
            continue  # not a bind mount of a namespace: a stale or foreign file
        out.setdefault(st.st_ino, name)
    return out


def _setns() -> Callable[[int, int], int]:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = _libc.setns
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def in_netns(ns: Union[str, int], fn: Callable[[], T]) -> T:
    """Run ``fn()`` inside the network namespace ``ns`` and return its result.

    ``ns`` is a namespace file path (``/proc/PID/ns/net``, ``/run/netns/NAME``) or an open fd of
    one. ``fn`` runs in a new thread that enters the namespace and then ends; the calling thread's
    namespace never changes. Exceptions from ``fn`` propagate. Raises Vanished when the namespace
    (or its process) is gone, Denied without the privilege (CAP_SYS_ADMIN).
    """
    what = f"net namespace {ns}"
    if isinstance(ns, int):
        fd, own = ns, False
    else:
        try:
            fd, own = os.open(ns, os.O_RDONLY | os.O_CLOEXEC), True
        except OSError as err:
            raise from_oserror(err, what) from err
    setns = _setns()
    outcome: Dict[str, Any] = {}

    def worker() -> None:
        try:
            if setns(fd, CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                err = OSError(code, os.strerror(code))
                if code == errno.EINVAL:
                    outcome["error"] = AsbuiltError(f"{what}: not a network namespace")
                else:
                    outcome["error"] = from_oserror(err, what)
                outcome["cause"] = err
                return
            outcome["result"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    try:
        thread = threading.Thread(target=worker, name="asbuilt-netns", daemon=True)
        thread.start()
        thread.join()
    finally:
        if own:
            os.close(fd)
    if "error" in outcome:
        exc = outcome["error"]
        cause = outcome.get("cause")
        if cause is not None:
            raise exc from cause
        raise exc
    return outcome["result"]
