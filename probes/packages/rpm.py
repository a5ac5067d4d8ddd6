"""rpm's database, through the ``rpm`` tool: ``rpm -qf`` (owner), ``rpm -q --queryformat``
(package facts) and ``rpm -V`` (verify) — see rpm(8). The database format (sqlite, bdb, ndb)
is rpm's business, so it is never read directly.

- ``owners()`` batches many paths into one ``rpm -qf`` per chunk; when a file has two owners the
  line count no longer matches and that chunk is asked again one path at a time.
- ``package()``: ``%{NAME}\\t%{EPOCH}:%{VERSION}-%{RELEASE}\\t%{ARCH}\\t%{INSTALLTIME}\\t%{VENDOR}\\t
  %{PACKAGER}\\t%{SOURCERPM}``; origin is the vendor (else the packager), rpm keeping no repository.
- ``verify()``: ``rpm -V --nodeps --noscripts <pkg>`` once per package, cached; a file is modified
  when its size or digest differs or it is missing.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

from ...agent.model import Package
from ..base import GapRecorder, Roots
from .index import PackageIndex, resolve_under

log = logging.getLogger(__name__)

QUERY_FORMAT = ("%{NAME}\\t%|EPOCH?{%{EPOCH}:}|%{VERSION}-%{RELEASE}\\t%{ARCH}\\t%{INSTALLTIME}\\t"
                "%{VENDOR}\\t%{PACKAGER}\\t%{SOURCERPM}\\n")
OWNER_FORMAT = "%{NAME}\\n"
CHUNK = 200
TIMEOUT_SECONDS = 120
_NOT_OWNED = re.compile(r"^file (.*) is not owned by any package$")
_VERIFY = re.compile(r"^(missing|[SM5DLUGTP.?]{8,9})\s+(?:([cdglr])\s+)?(/.*)$")


@dataclass
class RpmPackage:
    name: str = ""
    version: str = ""  # [epoch:]version-release
    architecture: str = ""
    install_time: Optional[float] = None
    vendor: str = ""
    packager: str = ""
    source: str = ""  # source package name, from SOURCERPM


@dataclass
class RpmVerify:
    path: str = ""
    flags: str = ""  # e.g. "S.5....T." or "missing"
    attribute: str = ""  # c config, d doc, g ghost, l license, r readme

    @property
    def modified(self) -> Optional[bool]:
        if self.flags == "missing":
            return True
        if "S" in self.flags or "5" in self.flags:
            return True
        if len(self.flags) > 2 and self.flags[2] == "?":
            return None  # digest could not be computed (unreadable)
        return False


def _none(value: str) -> str:
    return "" if value == "(none)" else value


def source_name(srpm: str) -> str:
    """``bash-5.1.8-6.el9.src.rpm`` -> ``bash``. Pure."""
    srpm = _none(srpm)
    if not srpm.endswith(".rpm"):
        return srpm
    parts = srpm.rsplit("-", 2)
    return parts[0] if len(parts) == 3 else srpm


def parse_query(text: str) -> List[RpmPackage]:
    """Lines of :data:`QUERY_FORMAT` output; malformed lines are skipped. Pure."""
    out = []
    for line in text.split("\n"):
        fields = line.split("\t")
        if len(fields) != 7 or not fields[0]:
            continue
        name, version, arch, installed, vendor, packager, srpm = fields
        try:
            itime: Optional[float] = float(installed)
        except ValueError:
            itime = None
        out.append(RpmPackage(name=name, version=version, architecture=_none(arch),
                              install_time=itime, vendor=_none(vendor), packager=_none(packager),
                              source=source_name(srpm) or name))
    return out


def parse_owner_lines(text: str, paths: Sequence[str]) -> Optional[Dict[str, Optional[str]]]:
    """``rpm -qf --qf '%{NAME}\\n' PATH...`` output -> {path: name or None}. None when the lines do
    not pair up one-to-one with ``paths`` (a file with two owners, an error line). Pure."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if len(lines) != len(paths):
        return None
    out: Dict[str, Optional[str]] = {}
    for path, line in zip(paths, lines):
        m = _NOT_OWNED.match(line)
        if m:
            if m.group(1) != path:
                return None
            out[path] = None
        elif " " in line.strip():
            return None  # an error or message, not a package name
        else:
            out[path] = line.strip()
    return out


def parse_verify(text: str) -> Dict[str, RpmVerify]:
    """``rpm -V`` output -> {path: result}; lines that are not file results are skipped. Pure."""
    out = {}
    for line in text.split("\n"):
        m = _VERIFY.match(line.rstrip())
        if m:
            out[m.group(3)] = RpmVerify(path=m.group(3), flags=m.group(1), attribute=m.group(2) or "")
    return out


class RpmIndex(PackageIndex):
    manager = "rpm"

    def __init__(self, roots: Roots, gaps: GapRecorder, rpm: str = "rpm", dbpath: str = ""):
        self.roots = roots
        self.gaps = gaps
        self.rpm = rpm
        self.dbpath = dbpath  # the database directory as seen inside the root filesystem
        self._owner: Dict[str, Optional[str]] = {}
        self._packages: Dict[str, Package] = {}
        self._verify: Dict[str, Dict[str, RpmVerify]] = {}

    def _run(self, args: List[str]) -> Optional[str]:
        cmd = [self.rpm]
        if self.roots.rootfs not in ("", "/"):
            cmd += ["--root", self.roots.rootfs]
        if self.dbpath:  # rpm's own default may differ (Debian's rpm: ~/.rpmdb)
            cmd += ["--dbpath", self.dbpath]
        try:
            res = subprocess.run(cmd + args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 timeout=TIMEOUT_SECONDS, env=dict(os.environ, LC_ALL="C"))
        except (OSError, subprocess.TimeoutExpired) as err:
            self.gaps.add("unreadable", "packages", f"rpm {args[0]}: {err}")
            return None
        return res.stdout.decode("utf-8", "surrogateescape")  # exit 1 = some not owned/differ

    def _query_owners(self, paths: Sequence[str]) -> Dict[str, Optional[str]]:
        out: Dict[str, Optional[str]] = {}
        for i in range(0, len(paths), CHUNK):
            chunk = list(paths[i:i + CHUNK])
            text = self._run(["-qf", "--queryformat", OWNER_FORMAT] + chunk)
            got = parse_owner_lines(text, chunk) if text is not None else None
            if got is None and len(chunk) > 1:
                for p in chunk:  # two owners or an error: one at a time, first owner wins
                    t = self._run(["-qf", "--queryformat", OWNER_FORMAT, p]) or ""
                    first = t.split("\n", 1)[0].strip()
                    out[p] = None if (not first or " " in first) else first
                continue
            out.update(got or {p: None for p in chunk})
        return out

    def owners(self, paths: Iterable[str]) -> Dict[str, Optional[str]]:
        want = [p for p in dict.fromkeys(paths) if p not in self._owner]
        if want:
            self._owner.update(self._query_owners(want))
            unowned = [p for p in want if self._owner[p] is None]
            real = {p: resolve_under(self.roots.rootfs, p) for p in unowned}
            retry = [r for p, r in real.items() if r and r != p]
            if retry:
                again = self._query_owners(list(dict.fromkeys(retry)))
                for p, r in real.items():
                    if r and again.get(r):
                        self._owner[p] = again[r]
        return {p: self._owner.get(p) for p in paths}

    def owner(self, path: str) -> Optional[str]:
        return self.owners([path])[path]

    def package(self, name: str) -> Package:
        got = self._packages.get(name)
        if got is None:
            text = self._run(["-q", "--queryformat", QUERY_FORMAT, name]) or ""
            parsed = parse_query(text)
            if not parsed:
                raise KeyError(name)
            p = parsed[0]
            got = self._packages[name] = Package(
                name=p.name, version=p.version, architecture=p.architecture, manager="rpm",
                install_time=p.install_time, origin=p.vendor or p.packager or "unknown",
                source=p.source)
        return got

    def verify(self, path: str) -> Optional[bool]:
        name = self.owner(path)
        if name is None:
            return None
        results = self._verify.get(name)
        if results is None:
            text = self._run(["-V", "--nodeps", "--noscripts", name])
            if text is None:
                return None
            results = self._verify[name] = parse_verify(text)
        for p in (path, resolve_under(self.roots.rootfs, path)):
            if p in results:
                return results[p].modified
        return False
