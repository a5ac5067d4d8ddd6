"""dpkg's database: ``/var/lib/dpkg/status``, ``info/<pkg>[:arch].list``, ``info/<pkg>.md5sums``
and ``/var/lib/dpkg/diversions`` (see dpkg(1), dpkg-query(1), dpkg-divert(1), deb-md5sums(5)).

- Packages come from ``status`` (deb822 paragraphs). A package whose ``Status`` is not
  ``install ok installed`` (half-installed, unpacked, half-configured ...) still owns its files;
  asking for it records a gap so the profile says its files may not be what it ships.
- File ownership comes from every ``info/*.list`` file. :meth:`DpkgIndex.owners` reads them once
  looking for just the paths asked about (0.03 s, nothing else kept); a lookup it did not prefetch
  builds the full path table (0.06 s and ~25 MB for 140 000 paths on a small Debian 12 host).
- Diversions: a file diverted by package P from ``A`` to ``B`` is, at ``B``, the file that the
  *other* package ships as ``A``; at ``A`` it is P's own (or the admin's, for a local diversion).
- Merged /usr: a process maps ``/usr/lib/x86_64-linux-gnu/libc.so.6`` while dpkg lists
  ``/lib/x86_64-linux-gnu/libc.so.6`` (and the other way round); both spellings are tried, then
  the realpath under the root filesystem (``index.candidates``).
- Verify: md5 from ``info/<pkg>.md5sums`` or, for conffiles, the ``Conffiles:`` field of
  ``status``; files are hashed only on demand and cached by (path, size, mtime).
- Install time: dpkg records none, so it is the mtime of ``info/<pkg>.list`` (rewritten when the
  package is unpacked: install or upgrade).
- Origin: which archive provides the installed version (``apt_origin.py``), computed lazily for
  the packages actually asked about.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Set, Tuple

from ...agent.errors import Denied, from_oserror
from ...agent.model import Package
from ..base import GapRecorder, Roots
from .index import PackageIndex, candidates, merged_dirs, resolve_under

log = logging.getLogger(__name__)

DPKG_DIR = "/var/lib/dpkg"
# States whose files are on disk but may not be what the package ships.
UNFINISHED_STATES = ("half-installed", "unpacked", "half-configured")
_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")


# ------------------------------------------------------------------------------ data types
@dataclass
class StatusEntry:
    """One paragraph of ``status``."""

    name: str = ""
    version: str = ""
    architecture: str = ""
    want: str = ""  # install, hold, deinstall, purge, unknown
    flag: str = ""  # ok, reinstreq
    state: str = ""  # installed, half-installed, unpacked, config-files ...
    source: str = ""  # source package name ("Source:" without its version, else the name)
    multi_arch: str = ""
    conffiles: Dict[str, str] = field(default_factory=dict)  # path -> md5 ("" when unknown)

    @property
    def installed(self) -> bool:
        return self.flag == "ok" and self.state == "installed"

    @property
    def status(self) -> str:
        return " ".join(x for x in (self.want, self.flag, self.state) if x)


@dataclass
class Diversion:
    path: str = ""  # the path the diverted package ships
    divert_to: str = ""  # where that package's file actually lives
    package: Optional[str] = None  # the package that diverts; None for a local (admin) diversion


# --------------------------------------------------------------------------------- parsers
def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def parse_conffiles(value: str) -> Dict[str, str]:
    """The ``Conffiles:`` field: `` /etc/x <md5> [obsolete|remove-on-upgrade]`` per line.

    An md5 that is not 32 hex digits (``newconffile``) maps to "" (unknown). Pure.
    """
    out: Dict[str, str] = {}
    for line in value.split("\n"):
        parts = line.split()
        if len(parts) < 2 or not parts[0].startswith("/"):
            continue
        out[parts[0]] = parts[1].lower() if _MD5.match(parts[1]) else ""
    return out


# The fields of ``status`` an entry keeps, each with its continuation lines (leading space/tab).
_STATUS_FIELD = re.compile(r"^(Package|Version|Architecture|Status|Source|Multi-Arch|Conffiles):(.*(?:\n[ \t].*)*)",
                           re.M)
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")


def _status_paragraphs(text: str) -> Iterator[Dict[str, str]]:
    """The kept fields of each paragraph (deb822: ``Field: value`` lines, a blank line between
    paragraphs, continuation lines stripped and joined to the value by newlines), found by one
    regular expression per paragraph instead of a Python step per line: ``status`` is ~0.8 MB of
    mostly descriptions. Pure."""
    for chunk in _PARAGRAPH_BREAK.split(text):
        para: Dict[str, str] = {}
        for key, value in _STATUS_FIELD.findall(chunk):
            if "\n" in value:
                first, *more = value.split("\n")
                value = "\n".join([first.strip()] + [line.strip() for line in more])
            else:
                value = value.strip()
            para[key] = value
        if para:
            yield para


def parse_status(text: str) -> List[StatusEntry]:
    """Every paragraph of ``status`` that names a package. Pure."""
    out = []
    for para in _status_paragraphs(text):
        name = para.get("Package", "")
        if not name:
            continue
        status = para.get("Status", "").split()
        want, flag, state = status if len(status) == 3 else ("", "", "")
        source = para.get("Source", "").split(" ", 1)[0] or name
        out.append(StatusEntry(
            name=name, version=para.get("Version", ""), architecture=para.get("Architecture", ""),
            want=want, flag=flag, state=state, source=source, multi_arch=para.get("Multi-Arch", ""),
            conffiles=parse_conffiles(para.get("Conffiles", ""))))
    return out


def parse_list(text: str) -> List[str]:
    """``info/<pkg>.list``: one absolute path per line (``/.`` is the root). Pure."""
    out = []
    for line in text.split("\n"):
        if not line.startswith("/"):
            continue
        out.append("/" if line == "/." else line)
    return out


def parse_diversions(text: str) -> List[Diversion]:
    """``diversions``: groups of three lines (path, diverted-to, package or ``:``). A trailing
    incomplete group is dropped. Pure."""
    lines = text.split("\n")
    out = []
    for i in range(0, len(lines) - 2, 3):
        path, to, pkg = lines[i], lines[i + 1], lines[i + 2].strip()
        if not path.startswith("/") or not to.startswith("/") or not pkg:
            continue
        out.append(Diversion(path=path, divert_to=to, package=None if pkg == ":" else pkg))
    return out


def parse_md5sums(text: str) -> Dict[str, str]:
    """``info/<pkg>.md5sums``: ``<md5>  <path relative to />`` per line -> {"/path": md5}. Pure."""
    out = {}
    for line in text.split("\n"):
        digest, _, rel = line.partition(" ")
        rel = rel.lstrip(" *")  # two spaces, or " *" for binary mode
        if not rel or not _MD5.match(digest):
            continue
        out["/" + rel.lstrip("/")] = digest.lower()
    return out


# --------------------------------------------------------------------------------- readers
def _read(path: str) -> str:
    with open(path, "rb") as fh:
        return _decode(fh.read())


def read_status(roots: Roots) -> List[StatusEntry]:
    """Raises OSError (the caller records the gap)."""
    return parse_status(_read(roots.path(DPKG_DIR + "/status")))


def read_diversions(roots: Roots) -> List[Diversion]:
    try:
        return parse_diversions(_read(roots.path(DPKG_DIR + "/diversions")))
    except FileNotFoundError:
        return []


# ----------------------------------------------------------------------------------- index
class DpkgIndex(PackageIndex):
    """dpkg's view of the root filesystem.

    Origins come from scanning apt's list files for just the packages asked about (0.3 s, no
    cache built); ``use_apt_pkg=True`` uses python-apt's cache instead (same answers, measured here
    2.4x slower and ~30 MB larger, so it is not the default).
    """

    manager = "dpkg"

    def __init__(self, roots: Roots, gaps: GapRecorder, use_apt_pkg: bool = False, cache_file: str = ""):
        self.roots = roots
        self.gaps = gaps
        self.use_apt_pkg = use_apt_pkg
        self.info_dir = roots.path(DPKG_DIR + "/info")
        self.merged = merged_dirs(roots.rootfs)
        entries = [e for e in read_status(roots) if e.state and e.state != "not-installed"]
        by_name: Dict[str, List[StatusEntry]] = {}
        for e in entries:
            by_name.setdefault(e.name, []).append(e)
        # Key: the plain name when one architecture is installed, else name:arch (as dpkg -S).
        self.entries: Dict[str, StatusEntry] = {}
        self._alias: Dict[str, str] = {}
        for name, group in by_name.items():
            for e in group:
                key = name if len(group) == 1 else f"{name}:{e.architecture}"
                self.entries[key] = e
                self._alias[f"{name}:{e.architecture}"] = key
                self._alias[key] = key
            if len(group) == 1:
                self._alias[name] = name
        self.diversions = read_diversions(roots)
        self._div_from = {d.path: d for d in self.diversions}
        self._div_to = {d.divert_to: d for d in self.diversions}
        # path -> key or tuple of keys. Filled for the spellings asked about (see owners()), or for
        # every listed path once _complete (the full table: ~25 MB for 140 000 paths).
        self._files: Dict[str, object] = {}
        self._complete = False
        self._looked: Set[str] = set()  # spellings a targeted scan looked for, owned or not
        # The parent directory (bytes) of every path any list names: a path elsewhere is in no
        # list (see _prefetch). None until a full pass over the lists (or the cache) gave it.
        self._dirs: Optional[Set[bytes]] = None
        self._lists: Optional[List[Tuple[str, str, str]]] = None  # (key, stem, file) of every list
        self._list_stem: Dict[str, str] = {}
        self._list_mtime: Dict[str, Optional[float]] = {}
        self._unreadable: Set[str] = set()  # list files already recorded as a gap
        self._cands: Dict[str, List[str]] = {}
        self._real_dirs: Dict[str, str] = {}  # directory -> its realpath (see resolve_under)
        self._md5: Dict[str, Dict[str, str]] = {}
        self._hash_cache: Dict[Tuple[str, int, int], str] = {}
        self._hashing: Dict[str, object] = {}  # host path -> Future of _hash_file (prefetch_hashes)
        self._seen: Set[str] = set()
        self._origins: Dict[str, str] = {}
        self._resolver = None
        self._gapped: Set[str] = set()
        self._cached_digest: Dict[str, str] = {}  # host path -> md5 the cache still vouches for
        self.build_seconds = 0.0
        self.cache = self._open_cache(cache_file) if cache_file else None

    # -------------------------------------------------------------------------- the cache
    def _open_cache(self, cache_file: str):
        """The agent's cache of earlier answers (``cache.py``), its ownership part applied."""
        from . import cache as cachemod
        from .apt_origin import LISTS_DIR

        got = cachemod.read_cache(
            cache_file,
            cachemod.dpkg_stamp(self.roots.path(DPKG_DIR + "/status"), self.info_dir,
                                self.roots.path(DPKG_DIR + "/diversions")),
            cachemod.apt_stamp(self.roots.path(LISTS_DIR)))
        if not all(k in self.entries for keys in got.owners.values() for k in keys):
            got.owners, got.dirty = {}, True  # names another database: not ours to trust
        for path, keys in got.owners.items():
            self._looked.add(path)
            if keys:
                self._files[path] = keys[0] if len(keys) == 1 else keys
        self._dirs = got.dir_set()
        return got

    def cache_update(self) -> Optional[bytes]:
        """The cache's new content when this scan learned something, else None (nothing to write)."""
        if self.cache is None or not self.cache.dirty:
            return None
        return self.cache.encode()

    # ------------------------------------------------------------------ ownership table
    def _key_for_stem(self, stem: str) -> Optional[str]:
        key = self._alias.get(stem)
        if key is None and ":" in stem:
            key = self._alias.get(stem.split(":", 1)[0])
        return key

    def _list_files(self) -> List[Tuple[str, str, str]]:
        """(package key, stem, file path) of every ``info/*.list`` of a known package, in directory
        order (the order owners are recorded in, for a path several packages list)."""
        if self._lists is not None:
            return self._lists
        self._lists = []
        try:
            with os.scandir(self.info_dir) as it:
                for de in it:
                    if not de.name.endswith(".list"):
                        continue
                    stem = de.name[:-5]
                    key = self._key_for_stem(stem)
                    if key is None:
                        continue  # a list left behind by a purged package
                    self._lists.append((key, stem, de.path))
                    self._list_stem[key] = stem
        except OSError as err:
            self.gaps.add("unreadable", "packages", f"dpkg info: {err.strerror or err}")
        return self._lists

    def _read_lists(self) -> Iterator[Tuple[str, bytes]]:
        """(package key, raw content) of every list file; an unreadable one is a gap (once)."""
        for key, stem, path in self._list_files():
            try:
                with open(path, "rb") as fh:
                    yield key, fh.read()
            except OSError as err:
                if path not in self._unreadable:
                    self._unreadable.add(path)
                    self.gaps.add("unreadable", f"package {key}", f"{stem}.list: {err.strerror or err}")

    def _record(self, path: str, key: str) -> None:
        prev = self._files.setdefault(path, key)
        if prev is not key and prev != key:
            if isinstance(prev, tuple):
                if key not in prev:
                    self._files[path] = prev + (key,)
            else:
                self._files[path] = (prev, key)

    def _build(self) -> Dict[str, object]:
        """The full table: every path of every list. Used for lookups owners() did not prefetch."""
        start = time.monotonic()
        self._files = {}
        for key, data in self._read_lists():
            for path in parse_list(_decode(data)):
                self._record(path, key)
        self._complete = True
        self.build_seconds = time.monotonic() - start
        log.debug("dpkg index built paths=%d packages=%d seconds=%.3f",
                  len(self._files), len(self._list_stem), self.build_seconds)
        return self._files

    def _prefetch(self, spellings: Iterable[str]) -> None:
        """Look for just these paths in every list (one pass, nothing else kept).

        A scan asks about a few thousand paths; the full table holds every listed path (140 000
        on a small Debian 12 host, ~25 MB of Python objects). Splitting each list into lines and
        intersecting with the wanted set costs about half of building that table and keeps
        nothing but the answers.
        """
        wanted: Dict[bytes, str] = {}
        used = self.cache.used if self.cache is not None else set()
        for path in spellings:
            used.add(path)
            if path in self._looked:
                continue
            self._looked.add(path)
            if not path.startswith("/"):
                continue  # parse_list keeps absolute paths only: never owned
            wanted[path.encode("utf-8", "surrogateescape")] = path
            if path == "/":
                wanted[b"/."] = path  # how lists spell the root
        if not wanted or self._complete:
            return
        dirs = self._dirs
        if dirs is not None:
            # A path is a line of some list only if its directory is the directory of some line:
            # the others (temp files, new logs, a tool's own files) are unowned without a pass.
            wanted = {k: v for k, v in wanted.items() if k.rpartition(b"/")[0] in dirs}
            if not wanted:
                return
        start = time.monotonic()
        look = wanted.keys()
        unreadable = len(self._unreadable)
        found_dirs: Optional[Set[bytes]] = set() if dirs is None else None
        for key, data in self._read_lists():
            lines = data.split(b"\n")
            for line in look & set(lines):
                self._record(wanted[line], key)
            if found_dirs is not None:
                found_dirs.update([line.rpartition(b"/")[0] for line in lines if line[:1] == b"/"])
        self.build_seconds += time.monotonic() - start
        complete = len(self._unreadable) == unreadable and bool(self._lists)  # no list was unreadable
        if found_dirs is not None and complete:
            self._dirs = found_dirs
            if self.cache is not None:
                self.cache.keep_dirs(found_dirs)
        if self.cache is not None and complete:
            for path in set(wanted.values()):  # only answers that recorded no gap are kept
                got = self._files.get(path)
                self.cache.owners[path] = () if got is None else got if isinstance(got, tuple) else (got,)
            self.cache.dirty = True
        log.debug("dpkg lists scanned wanted=%d found=%d seconds=%.3f",
                  len(wanted), len(self._files), self.build_seconds)

    def _candidates(self, path: str) -> List[str]:
        """``index.candidates`` of ``path``, kept: owners() and verify() ask for the same path again
        and each time would resolve its symlinks again (a few lstat calls per path)."""
        got = self._cands.get(path)
        if got is None:
            got = self._cands[path] = candidates(self.roots.rootfs, path, self.merged, self._real_dirs)
        return got

    def _spellings(self, path: str) -> List[str]:
        """Every path _locate(path) may look up: its candidates and what diversions point to."""
        out = []
        for cand in self._candidates(path):
            out.append(cand)
            div = self._div_to.get(cand)
            if div is not None:
                out.append(div.path)
        return out

    def _owners_of(self, path: str) -> Tuple[str, ...]:
        if not self._complete and path not in self._looked:
            self._build()
        got = self._files.get(path)
        if got is None:
            return ()
        return got if isinstance(got, tuple) else (got,)  # type: ignore[return-value]

    def _locate(self, path: str) -> Iterator[Tuple[str, str]]:
        """(package key, path as the package lists it) for each spelling of ``path`` that a
        package owns, in the order of ``index.candidates``, diversions applied."""
        for cand in self._candidates(path):
            div = self._div_to.get(cand)
            if div is not None:  # cand holds the file another package ships as div.path
                for key in self._owners_of(div.path):
                    if self.entries[key].name != div.package:
                        yield key, div.path
                        break
                continue
            div = self._div_from.get(cand)
            if div is not None:  # cand holds the diverting package's own file (or the admin's)
                if div.package is not None:
                    for key in self._owners_of(cand):
                        if self.entries[key].name == div.package:
                            yield key, cand
                            break
                continue
            owners = self._owners_of(cand)
            if owners:
                yield owners[0], cand

    # ------------------------------------------------------------------------ interface
    def owners(self, paths: Iterable[str]) -> Dict[str, Optional[str]]:
        """owner() of each path, after one targeted pass over the lists for all of them."""
        paths = list(paths)
        if not self._complete:
            self._prefetch(s for p in paths for s in self._spellings(p))
        return {p: self.owner(p) for p in paths}

    def owner(self, path: str) -> Optional[str]:
        for key, _ in self._locate(path):
            self._seen.add(key)
            return key
        return None

    def _key(self, name: str) -> str:
        key = self._alias.get(name)
        if key is None:
            raise KeyError(name)
        return key

    def package(self, name: str) -> Package:
        key = self._key(name)
        e = self.entries[key]
        if not e.installed and key not in self._gapped:
            self._gapped.add(key)
            if e.state in UNFINISHED_STATES or e.flag == "reinstreq":
                self.gaps.add("truncated", f"package {key}",
                              f"dpkg status '{e.status}': its files may not be what it ships")
        mtime = self._install_time(key)
        return Package(name=key, version=e.version, architecture=e.architecture, manager="dpkg",
                       install_time=mtime, origin=self.origin(key), source=e.source)

    def _install_time(self, key: str) -> Optional[float]:
        """The mtime of the package's list file (dpkg rewrites it on install and upgrade)."""
        if key not in self._list_mtime:
            mtime = None
            for stem in self._stems(key):
                try:
                    mtime = os.stat(os.path.join(self.info_dir, stem + ".list")).st_mtime
                    break
                except OSError:
                    continue
            self._list_mtime[key] = mtime
        return self._list_mtime[key]

    def _stems(self, key: str) -> Tuple[str, ...]:
        """The names the package's ``info/`` files may have, in dpkg's two spellings: ``name:arch``
        then ``name``. Tried by name, so a scan the cache answered needs no listing of ``info/``,
        and the answer is the same with or without one (a list a purged foreign-architecture
        package left behind is never taken for the installed one's)."""
        e = self.entries[key]
        return (f"{e.name}:{e.architecture}", e.name)

    def origin(self, name: str) -> str:
        """Which archive provides the installed version ("Debian:bookworm/main"), "local" when
        none does, "unknown" when that cannot be told. Resolves, in one pass, every package
        owner() has returned so far whose origin is not known yet."""
        key = self._key(name)
        if key in self._origins:
            return self._origins[key]
        pending = {k for k in self._seen | {key} if k not in self._origins}
        if self.cache is not None:
            for k in list(pending):
                e = self.entries[k]
                got = self.cache.origins.get((e.name, e.version, e.architecture))
                if got is not None:
                    self._origins[k] = got
                    pending.discard(k)
        if pending:
            before = len(self.gaps.coverage.gaps) + self.gaps.coverage.gaps_dropped
            resolved = self._resolve_origins(pending)
            self._origins.update(resolved)
            if self.cache is not None and before == len(self.gaps.coverage.gaps) + self.gaps.coverage.gaps_dropped:
                for k, origin in resolved.items():  # only answers that recorded no gap are kept
                    e = self.entries[k]
                    self.cache.origins[(e.name, e.version, e.architecture)] = origin
                self.cache.dirty = True
        return self._origins.setdefault(key, "unknown")

    def _resolve_origins(self, keys: Iterable[str]) -> Dict[str, str]:
        from . import apt_origin
        if self._resolver is None:
            self._resolver = apt_origin.make_resolver(self.roots, self.gaps, self.use_apt_pkg)
        wanted = {k: (self.entries[k].name, self.entries[k].version, self.entries[k].architecture)
                  for k in keys}
        return self._resolver.origins(wanted)

    def _md5sums(self, key: str) -> Dict[str, str]:
        got = self._md5.get(key)
        if got is None:
            e = self.entries[key]
            got = {}
            for s in self._stems(key):
                try:
                    got = parse_md5sums(_read(os.path.join(self.info_dir, s + ".md5sums")))
                    break
                except OSError:
                    continue
            self._md5[key] = got
        return got

    def shipped_md5(self, key: str, listed: str) -> str:
        """The md5 the package shipped for ``listed`` ("" when it records none)."""
        e = self.entries[key]
        if listed in e.conffiles:
            return e.conffiles[listed]
        return self._md5sums(key).get(listed, "")

    def prefetch_hashes(self, paths: Iterable[str]) -> None:
        """Start hashing, on background threads, the files verify() will hash for ``paths``.

        Reading and md5 release the GIL, so two threads hash on both CPUs while the caller goes on
        (resolving origins, say); verify() then waits for its file's result. Largest files first,
        so the last one to finish is a small one. Gaps are still recorded by verify(), in its order.
        """
        todo: Dict[str, int] = {}
        for path in paths:
            for key, listed in self._locate(path):
                if not self.shipped_md5(key, listed):
                    continue
                host = self._host_file(path)
                if host not in self._hashing and host not in todo and host not in self._cached_digest:
                    try:
                        st = os.stat(host)
                    except OSError:
                        break  # verify() finds out again and says why
                    digest = self.cache.hash_of(host, st) if self.cache is not None else None
                    if digest is not None:
                        self._cached_digest[host] = digest
                    else:
                        todo[host] = st.st_size
                break
        if not todo:
            return
        from concurrent.futures import ThreadPoolExecutor

        try:
            workers = min(HASH_THREADS, len(os.sched_getaffinity(0)), len(todo))
        except (AttributeError, OSError):
            workers = 1
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="asbuilt-md5")
        try:
            for host in sorted(todo, key=lambda h: -todo[h]):
                self._hashing[host] = pool.submit(_hash_file, host)
        finally:
            pool.shutdown(wait=False)  # the threads end when the queue is empty

    def verify(self, path: str) -> Optional[bool]:
        for key, listed in self._locate(path):
            want = self.shipped_md5(key, listed)
            if not want:
                continue  # a symlink, a directory, or a package without md5sums: try the next
            have = self._hash(path)
            if have is None:
                return None
            return have != want
        return None

    def _host_file(self, path: str) -> str:
        host = self.roots.path(path)
        if not self.roots.live:
            real = self._real(path)
            host = self.roots.path(real) if real else host
        return host

    def _hash(self, path: str) -> Optional[str]:
        host = self._host_file(path)
        digest = self._cached_digest.get(host)
        if digest is not None:
            return digest
        pending = self._hashing.pop(host, None)
        try:
            if pending is not None:
                ck, digest, st = pending.result()  # type: ignore[attr-defined]  # raises its OSError
                self._hash_cache.setdefault(ck, digest)
            else:
                ck, digest, st = _hash_file(host, self._hash_cache)
        except OSError as err:
            if isinstance(from_oserror(err, path), Denied):
                self.gaps.add("denied", path, "cannot hash it to verify against its package")
            return None  # vanished or unreadable: cannot tell
        self._hash_cache[ck] = digest
        if self.cache is not None:
            self.cache.keep_hash(host, st, digest)
        return digest

    def _real(self, path: str) -> Optional[str]:
        return resolve_under(self.roots.rootfs, path)


HASH_THREADS = 2
HASH_CHUNK_BYTES = 1 << 21  # 2 MiB: each chunk is one GIL hand-off for a hashing thread


def _hash_file(host: str, cache: Optional[Dict[Tuple[str, int, int], str]] = None
               ) -> Tuple[Tuple[str, int, int], str, os.stat_result]:
    """((path, size, mtime_ns), md5 hex, the file's fstat before reading) of one file; ``cache``
    answers an unchanged file without reading it. Raises OSError. Safe on a worker thread
    (touches no shared state but ``cache`` reads)."""
    import hashlib

    with open(host, "rb", buffering=0) as fh:
        st = os.fstat(fh.fileno())
        ck = (host, st.st_size, st.st_mtime_ns)
        got = cache.get(ck) if cache is not None else None
        if got is not None:
            return ck, got, st
        h = hashlib.md5()
        buf = bytearray(min(HASH_CHUNK_BYTES, max(st.st_size, 1)))
        view = memoryview(buf)
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return ck, h.hexdigest(), st
