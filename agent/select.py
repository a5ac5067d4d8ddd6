"""``--process SELECTOR``: pick processes out of a saved profile.

A selector is ``KEY:VALUE`` with KEY one of ``pid``, ``unit``, ``container``, ``user``, ``exe``,
``name``, ``identity``, ``host`` (VALUE may use shell wildcards, e.g. ``exe:*/nginx``), or a bare word,
which matches a process's name, exe basename or systemd unit. Several selectors joined with ``,``
are alternatives (any of them). Without a selector every user-space process is selected.
"""
from __future__ import annotations

import fnmatch
import os
from typing import Callable, Dict, List, Optional

from .errors import UsageError
from .model import Process, Profile

KEYS: Dict[str, Callable[[Process], List[str]]] = {
    "pid": lambda p: [str(p.pid)],
    "unit": lambda p: [p.systemd_unit, p.systemd_unit.rsplit(".", 1)[0] if p.systemd_unit else ""],
    "container": lambda p: [p.container_id, p.container_id[:12]],
    "user": lambda p: [p.user, str(p.uid)],
    "exe": lambda p: [p.exe],
    "name": lambda p: [p.name],
    "identity": lambda p: [p.identity],
    "host": lambda p: [p.host],
}


def _bare(p: Process) -> List[str]:
    unit = p.systemd_unit
    return [p.name, os.path.basename(p.exe), unit, unit.rsplit(".", 1)[0] if unit else ""]


def _matcher(term: str) -> Callable[[Process], bool]:
    key, sep, value = term.partition(":")
    if sep and key in KEYS:
        values = KEYS[key]
    elif sep and key and key.isalpha():
        raise UsageError(f"unknown process selector {key!r} (use one of: {', '.join(KEYS)}, or a bare name)")
    else:
        values, value = _bare, term
    if not value:
        raise UsageError(f"empty process selector {term!r}")
    return lambda p: any(v and fnmatch.fnmatchcase(v, value) for v in values(p))


def select_processes(profile: Profile, selector: Optional[str] = None) -> List[Process]:
    """The processes ``selector`` names (UsageError if it names none); every user process without one."""
    procs = [p for p in profile.processes if not p.kernel_thread]
    if not selector:
        return procs
    matchers = [_matcher(t.strip()) for t in selector.split(",") if t.strip()]
    if not matchers:
        raise UsageError(f"empty process selector {selector!r}")
    chosen = [p for p in procs if any(m(p) for m in matchers)]
    if not chosen:
        raise UsageError(f"no process in the profile matches {selector!r}")
    return chosen
