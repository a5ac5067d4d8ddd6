"""What one scan learned from dpkg's and apt's files, kept for the next scan while they are unchanged.

Not a kernel or dpkg file: the agent's own cache (``/var/cache/asbuilt/dpkg-index.msgpack`` by
default, written by the agent atomically, mode 0600). Each part is used only while what it was
computed from is unchanged, and otherwise recomputed exactly as without a cache:

- ``owners``: the result of the targeted pass over ``info/*.list`` for each spelling looked up
  (owner keys in list order, or none). Valid while the *dpkg stamp* matches: ``status``
  (mtime, size, inode), the ``info`` directory (mtime, inode: dpkg writes every list by a rename
  into it) and ``diversions``.
- ``dirs``: the parent directory of every path any list names (one bytes blob, sorted, joined by
  newlines; ~14,000 directories, ~0.8 MB on a Debian 12 host). A path whose directory is not in
  it is in no list, so it needs no pass over the lists and no ``owners`` entry: the new temp and
  log files every scan meets cost nothing and leave the cache unchanged. Valid while the
  *dpkg stamp* matches.
- ``origins``: the archive of each (name, version, architecture). Valid while the *apt stamp*
  matches: name, mtime and size of every file in ``/var/lib/apt/lists``.
- ``hashes``: the md5 of each hashed file, valid while the file's (size, mtime, ctime, inode,
  device) are the ones it had when hashed (``ctime`` cannot be set from user space, so a rewrite
  that restores the mtime still misses). A file changed within :data:`SETTLE_SECONDS` of being
  hashed is not kept (timestamps are coarse: a second write in the same tick would not show).

Only answers that recorded no gap are kept, so a scan with the cache records the same gaps as one
without. A missing, stale, truncated or foreign cache file is ignored: never an error.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Tuple

VERSION = 1
FILE_NAME = "dpkg-index.msgpack"
SETTLE_SECONDS = 2.0
MAX_BYTES = 64 << 20  # a larger file is not ours: ignored unread
MAX_ENTRIES = 20000  # past this many paths, a write keeps only the ones this scan asked about


def _stat_stamp(path: str, dir_ok: bool = False) -> List[int]:
    try:
        st = os.stat(path)
    except OSError:
        return []
    return [st.st_mtime_ns, st.st_size if not dir_ok else 0, st.st_ino, st.st_dev]


def dpkg_stamp(status: str, info_dir: str, diversions: str) -> List[Any]:
    """What the ownership answers depend on (see the module docstring)."""
    return [_stat_stamp(status), _stat_stamp(info_dir, dir_ok=True), _stat_stamp(diversions)]


def apt_stamp(lists_dir: str) -> List[Any]:
    """Name, mtime and size of every entry of apt's lists directory, sorted; [] without one."""
    out: List[Any] = []
    try:
        with os.scandir(lists_dir) as it:
            for de in it:
                try:
                    st = de.stat(follow_symlinks=False)
                except OSError:
                    continue
                out.append([de.name, st.st_mtime_ns, st.st_size])
    except OSError:
        return []
    out.sort()
    return out


def file_stamp(st: os.stat_result) -> List[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def settled(st: os.stat_result, now: Optional[float] = None) -> bool:
    """Whether a file was last changed long enough ago for its stamp to tell a later change."""
    now = time.time() if now is None else now
    return now - max(st.st_mtime, st.st_ctime) > SETTLE_SECONDS


class IndexCache:
    """The three parts, as plain dicts; ``dirty`` once something new was learned."""

    def __init__(self, dpkg: List[Any], apt: List[Any]):
        self.dpkg, self.apt = dpkg, apt
        self.owners: Dict[str, Tuple[str, ...]] = {}
        self.origins: Dict[Tuple[str, str, str], str] = {}
        self.hashes: Dict[str, Tuple[List[int], str]] = {}
        self.dirs: Optional[bytes] = None  # see the module docstring; None until a full pass made it
        self.dirty = False
        self.used: set = set()  # spellings and files this scan asked about

    def dir_set(self) -> Optional[set]:
        """``dirs`` as a set of (bytes) directories; None when the cache has none."""
        return None if self.dirs is None else set(self.dirs.split(b"\n"))

    def keep_dirs(self, dirs: set) -> None:
        self.dirs = b"\n".join(sorted(dirs))
        self.dirty = True

    def _dirty(self) -> "IndexCache":
        self.dirty = True
        return self

    # --------------------------------------------------------------------------- file format
    def encode(self) -> bytes:
        """The file's content. Paths of files that come and go (logs, temp files) would pile up
        scan after scan: past :data:`MAX_ENTRIES`, only what this scan asked about is kept."""
        import msgpack

        if len(self.owners) > MAX_ENTRIES:
            self.owners = {k: v for k, v in self.owners.items() if k in self.used}
        if len(self.hashes) > MAX_ENTRIES:
            self.hashes = {k: v for k, v in self.hashes.items() if k in self.used}
        return msgpack.packb({
            "version": VERSION, "dpkg": self.dpkg, "apt": self.apt,
            "owners": {k: list(v) for k, v in self.owners.items()},
            "dirs": self.dirs,
            "origins": [[n, v, a, o] for (n, v, a), o in self.origins.items()],
            "hashes": {k: [stamp, digest] for k, (stamp, digest) in self.hashes.items()},
        }, use_bin_type=True, unicode_errors="surrogateescape")

    @classmethod
    def decode(cls, raw: bytes, dpkg: List[Any], apt: List[Any]) -> "IndexCache":
        """A cache for the current stamps: the parts of ``raw`` still valid, the rest empty.
        Anything malformed gives an empty (dirty) cache, never an exception."""
        cache = cls(dpkg, apt)
        try:
            cache._load(raw)
        except Exception:  # noqa: BLE001 - a corrupt cache is only a slower scan
            cache = cls(dpkg, apt)
        if cache.dpkg != dpkg or cache.apt != apt:
            cache.dirty = True
        return cache

    def _load(self, raw: bytes) -> None:
        import msgpack

        data = msgpack.unpackb(raw, raw=False, unicode_errors="surrogateescape", strict_map_key=True)
        if not isinstance(data, dict) or data.get("version") != VERSION:
            self.dirty = True
            return
        if data.get("dpkg") == self.dpkg and self.dpkg and all(self.dpkg[:2]):
            owners = {}
            for path, keys in data["owners"].items():
                if not isinstance(path, str) or not isinstance(keys, list) or \
                        not all(isinstance(k, str) for k in keys):
                    raise ValueError("owners")
                owners[path] = tuple(keys)
            dirs = data.get("dirs")
            if dirs is not None and not isinstance(dirs, bytes):
                raise ValueError("dirs")
            self.owners, self.dirs = owners, dirs
        else:
            self.dirty = True
        if data.get("apt") == self.apt:
            origins = {}
            for item in data["origins"]:
                if not isinstance(item, list) or len(item) != 4 or not all(isinstance(x, str) for x in item):
                    raise ValueError("origins")
                origins[(item[0], item[1], item[2])] = item[3]
            self.origins = origins
        else:
            self.dirty = True
        hashes = {}
        for path, item in data["hashes"].items():
            if not isinstance(path, str) or not isinstance(item, list) or len(item) != 2:
                raise ValueError("hashes")
            stamp, digest = item
            if not isinstance(stamp, list) or len(stamp) != 5 or not all(type(x) is int for x in stamp) \
                    or not isinstance(digest, str) or len(digest) != 32:
                raise ValueError("hashes")
            hashes[path] = (stamp, digest)
        self.hashes = hashes

    # ------------------------------------------------------------------------------- lookups
    def hash_of(self, host: str, st: os.stat_result) -> Optional[str]:
        self.used.add(host)
        got = self.hashes.get(host)
        if got is not None and got[0] == file_stamp(st):
            return got[1]
        return None

    def keep_hash(self, host: str, st: os.stat_result, digest: str) -> None:
        self.used.add(host)
        stamp = file_stamp(st)
        got = self.hashes.get(host)
        if got is not None and got == (stamp, digest):
            return
        if settled(st):
            self.hashes[host] = (stamp, digest)
            self.dirty = True
        elif got is not None:
            del self.hashes[host]
            self.dirty = True


def read_cache(path: str, dpkg: List[Any], apt: List[Any]) -> IndexCache:
    """The cache at ``path`` for the current stamps; an empty one when it is absent or unusable.
    Only a regular file owned by root (or by us) and not writable by others is read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return IndexCache(dpkg, apt)._dirty()
    try:
        st = os.fstat(fd)
        import stat as stat_mod

        if not stat_mod.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()) \
                or st.st_mode & 0o022 or st.st_size > MAX_BYTES:
            return IndexCache(dpkg, apt)._dirty()
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        return IndexCache(dpkg, apt)._dirty()
    finally:
        os.close(fd)
    return IndexCache.decode(b"".join(chunks), dpkg, apt)

