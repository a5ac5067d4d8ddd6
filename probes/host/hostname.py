"""The host's name from ``/proc/sys/kernel/hostname`` and its id from ``/etc/machine-id``.

The hostname is the UTS name of the reader's namespace (proc(5)); machine-id(5) is 32 lower-case
hex digits, with ``/var/lib/dbus/machine-id`` as the older location. A machine-id that is not
32 hex digits (empty on a first boot, ``uninitialized``) is reported as "".
"""
from __future__ import annotations

import os
import re

from ...agent.errors import Vanished
from ..procfs._io import read_text

MACHINE_ID_PATHS = ("etc/machine-id", "var/lib/dbus/machine-id")
_MACHINE_ID = re.compile(r"[0-9a-f]{32}")


def parse_hostname(text: str) -> str:
    """The first line, stripped (pure)."""
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def read_hostname(proc_root: str) -> str:
    return parse_hostname(read_text(os.path.join(proc_root, "sys", "kernel", "hostname")))


def parse_machine_id(text: str) -> str:
    """The machine id when well-formed, else "" (pure)."""
    value = text.strip().lower()
    return value if _MACHINE_ID.fullmatch(value) else ""


def read_machine_id(rootfs: str) -> str:
    """The machine id from the first of ``MACHINE_ID_PATHS`` that exists under ``rootfs``."""
    for rel in MACHINE_ID_PATHS:
        try:
            return parse_machine_id(read_text(os.path.join(rootfs, rel)))
        except Vanished:
            continue
    raise Vanished(f"{os.path.join(rootfs, MACHINE_ID_PATHS[0])}: absent")
