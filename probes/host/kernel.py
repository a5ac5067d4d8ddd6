"""The running kernel from ``/proc/sys/kernel/osrelease`` and ``/proc/sys/kernel/version`` (proc(5)).

The machine (``x86_64``) is not in procfs; it comes from ``os.uname()`` only when the roots are the
live host's, since a captured tree is not necessarily of this machine's architecture.
"""
from __future__ import annotations

import os

from ...agent.model import Kernel
from ..procfs._io import read_text


def parse_kernel(osrelease: str, version: str, machine: str = "") -> Kernel:
    """Kernel facts from the two files' texts (pure)."""
    return Kernel(release=osrelease.strip(), version=version.strip(), machine=machine.strip())


def read_kernel(proc_root: str, live: bool) -> Kernel:
    base = os.path.join(proc_root, "sys", "kernel")
    return parse_kernel(read_text(os.path.join(base, "osrelease")), read_text(os.path.join(base, "version")),
                        os.uname().machine if live else "")
