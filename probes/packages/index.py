"""The common interface of package databases: which package owns a file, what that package is.

One :class:`PackageIndex` per scan. :func:`open_index` picks the database found under the root
filesystem: dpkg when ``<rootfs>/var/lib/dpkg/status`` exists (``dpkg.py``), rpm when an rpm
database exists and the ``rpm`` binary is present (``rpm.py``); with neither it records a gap
(``absent``/``packages``) and returns None, and the scan goes on without package facts.

Path helpers shared by both managers live here: merged-/usr aliases (a process maps
``/usr/lib/x86_64-linux-gnu/libc.so.6`` while dpkg lists ``/lib/x86_64-linux-gnu/libc.so.6``) and
symlink resolution *under* the root filesystem (an absolute link target is taken relative to it).
"""
from __future__ import annotations

import errno
import logging
import os
import posixpath
import shutil
import stat
from typing import Dict, Iterable, List, Optional

from ...agent.model import Package
from ..base import GapRecorder, Roots

log = logging.getLogger(__name__)

# Top-level directories that merged-/usr turns into symlinks to their /usr twin.
USRMERGE_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")

# Where rpm keeps its database, newest layout first.
RPM_DB_FILES = ("usr/lib/sysimage/rpm/rpmdb.sqlite", "usr/lib/sysimage/rpm/Packages",
                "var/lib/rpm/rpmdb.sqlite", "var/lib/rpm/Packages", "var/lib/rpm/Packages.db")


class PackageIndex:
    """One package database, read once per scan. Subclasses implement the three lookups."""

    manager = ""

    def owner(self, path: str) -> Optional[str]:
        """The name of the package that owns ``path``, or None when no package owns it."""
        raise NotImplementedError

    def owners(self, paths: Iterable[str]) -> Dict[str, Optional[str]]:
        """``owner()`` for many paths at once (rpm batches these into few processes)."""
        return {p: self.owner(p) for p in paths}

    def package(self, name: str) -> Package:
        """Name, version, architecture, manager, install time, origin and source of ``name``.

        Raises KeyError when no such package is installed.
        """
        raise NotImplementedError

    def verify(self, path: str) -> Optional[bool]:
        """True when ``path`` differs from what its package shipped, False when it matches,
        None when that cannot be told (not owned, no checksum shipped, unreadable)."""
        raise NotImplementedError

    def prefetch_hashes(self, paths: Iterable[str]) -> None:
        """A hint that verify() will be asked about ``paths``: an index may start hashing them in
        the background. Changes no result; the default does nothing."""

    def cache_update(self) -> Optional[bytes]:
        """New content for the agent's cache of this index's answers, or None (nothing to write)."""
        return None


# ----------------------------------------------------------------------------- path helpers
def merged_dirs(rootfs: str) -> frozenset:
    """Which of :data:`USRMERGE_DIRS` are symlinks to their ``/usr`` twin under ``rootfs``."""
    out = set()
    for d in USRMERGE_DIRS:
        try:
            target = os.readlink(os.path.join(rootfs or "/", d))
        except OSError:
            continue
        if posixpath.normpath(posixpath.join("/", target)) == "/usr/" + d:
            out.add(d)
    return frozenset(out)


def usrmerge_aliases(path: str, merged: Iterable[str] = USRMERGE_DIRS) -> List[str]:
    """The other spellings of ``path`` on a merged-/usr system: ``/lib/x`` <-> ``/usr/lib/x``.

    Only directories in ``merged`` are aliased. Pure.
    """
    if not path.startswith("/"):
        return []
    parts = path.split("/")  # "", top, ...
    if len(parts) >= 3 and parts[1] == "usr" and parts[2] in merged:
        return ["/" + "/".join(parts[2:])]
    if len(parts) >= 2 and parts[1] in merged:
        return ["/usr/" + "/".join(parts[1:])]
    return []


def resolve_under(rootfs: str, path: str, limit: int = 40,
                  dirs: Optional[Dict[str, str]] = None) -> Optional[str]:
    """``realpath`` of the host path ``path`` as seen from inside ``rootfs`` (a host path too).

    Absolute link targets are taken relative to ``rootfs``; ``..`` never climbs above it.
    Components that do not exist are kept as they are. None on a symlink loop.

    ``dirs`` (live root only) keeps the realpath of each directory resolved so far: a path whose
    last component is not a symlink is its directory's realpath plus that name, one ``lstat``
    instead of one per component (a thousand log files in one directory, a hundred libraries in
    ``/usr/lib/x86_64-linux-gnu``).
    """
    root = rootfs or "/"
    if root == "/":
        head, _, tail = path.rpartition("/")
        if dirs is None or not head.startswith("/") or tail in ("", ".", ".."):
            return os.path.realpath(path)
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return os.path.realpath(path)
        except OSError:
            pass  # absent: kept as it is, as realpath does
        real = dirs.get(head)
        if real is None:
            real = dirs[head] = os.path.realpath(head)
        return real.rstrip("/") + "/" + tail
    todo = [c for c in path.split("/") if c]
    done: List[str] = []
    hops = 0
    while todo:
        comp = todo.pop(0)
        if comp == ".":
            continue
        if comp == "..":
            if done:
                done.pop()
            continue
        host = os.path.join(root, *done, comp)
        try:
            target = os.readlink(host)
        except OSError:
            done.append(comp)
            continue
        hops += 1
        if hops > limit:
            return None
        if target.startswith("/"):
            done = []
        todo = [c for c in target.split("/") if c] + todo
    return "/" + "/".join(done)


def candidates(rootfs: str, path: str, merged: Iterable[str],
               dirs: Optional[Dict[str, str]] = None) -> List[str]:
    """Spellings of ``path`` to look up, in order: as given, its merged-/usr aliases, then its
    realpath under ``rootfs`` and that one's aliases. No duplicates. ``dirs``: see
    :func:`resolve_under`."""
    out: List[str] = []

    def add(p: Optional[str]) -> None:
        if p and p not in out:
            out.append(p)

    norm = posixpath.normpath(path) if path.startswith("/") else path
    add(norm)
    for a in usrmerge_aliases(norm, merged):
        add(a)
    real = resolve_under(rootfs, norm, dirs=dirs)
    if real and real != norm:
        add(real)
        for a in usrmerge_aliases(real, merged):
            add(a)
    return out


# ------------------------------------------------------------------------------- open_index
def find_rpm_db(roots: Roots) -> Optional[str]:
    """The rpm database file as a path inside the root filesystem (``/var/lib/rpm/rpmdb.sqlite``)."""
    for rel in RPM_DB_FILES:
        if os.path.exists(roots.path("/" + rel)):
            return "/" + rel
    return None


def open_index(roots: Roots, gaps: GapRecorder, cache_file: str = "") -> Optional[PackageIndex]:
    """The package database of ``roots.rootfs``, or None (with a recorded gap) when there is none
    or it cannot be read. Never raises for an expected condition: the scan goes on either way.

    ``cache_file``: dpkg's earlier answers, used while still valid (``cache.py``); the caller
    writes back ``index.cache_update()``."""
    status = roots.path("/var/lib/dpkg/status")
    if os.path.exists(status):
        from .dpkg import DpkgIndex
        try:
            return DpkgIndex(roots, gaps, cache_file=cache_file)
        except OSError as err:
            kind = "denied" if err.errno in (errno.EACCES, errno.EPERM) else "unreadable"
            gaps.add(kind, "packages", f"dpkg status: {err.strerror or err}")
            return None
    rpmdb = find_rpm_db(roots)
    if rpmdb:
        rpm = shutil.which("rpm")
        if not rpm:
            gaps.add("absent", "packages", f"rpm database at {rpmdb} but no rpm binary")
            return None
        from .rpm import RpmIndex
        return RpmIndex(roots, gaps, rpm=rpm, dbpath=posixpath.dirname(rpmdb))
    gaps.add("absent", "packages", "no dpkg or rpm database")
    return None

