"""``/proc`` itself: the numeric directories are the processes (thread-group leaders).

Kernel documentation: Documentation/filesystems/proc.rst ("Process-Specific Subdirectories");
``man 5 proc`` (``/proc/[pid]``). Threads live under ``/proc/PID/task`` and are not listed here.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Set

from ...agent.errors import AsbuiltError, from_oserror


def parse_pids(names: Iterable[str]) -> List[int]:
    """The sorted pids among directory entry names (``self``, ``sys``, ``1x`` are skipped)."""
    return sorted(int(name) for name in names if name.isdigit() and name.isascii())


def list_pids(proc_root: str) -> List[int]:
    """The pids present under ``proc_root`` now, sorted."""
    try:
        names = os.listdir(proc_root)
    except OSError as err:
        raise from_oserror(err, proc_root) from err
    return parse_pids(names)


def read_parents(proc_root: str) -> Dict[int, int]:
    """pid -> ppid for every process now (``/proc/PID/stat``); vanished or unreadable ones skipped."""
    from .stat import read_stat

    out: Dict[int, int] = {}
    for pid in list_pids(proc_root):
        try:
            out[pid] = read_stat(proc_root, pid).ppid
        except AsbuiltError:
            continue  # vanished between the listing and the read: not in the tree any more
    return out


def descendants(parents: Dict[int, int], roots: Iterable[int]) -> List[int]:
    """Every descendant of ``roots`` in a pid -> ppid map, breadth-first, roots excluded. Pure."""
    children: Dict[int, List[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out: List[int] = []
    seen = set(roots)
    queue = list(roots)
    while queue:
        for child in sorted(children.get(queue.pop(0), ())):
            if child not in seen:
                seen.add(child)
                out.append(child)
                queue.append(child)
    return out


def process_tree(proc_root: str, roots: Iterable[int], follow_children: bool = True) -> Set[int]:
    """``roots`` plus, when following children, every live descendant."""
    roots = {int(p) for p in roots}
    if not follow_children:
        return roots
    return roots | set(descendants(read_parents(proc_root), roots))
