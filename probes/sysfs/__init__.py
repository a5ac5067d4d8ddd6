"""Readers of sysfs (Documentation/ABI/*/sysfs-*): block and network devices, PCI, drivers.

Every reader takes the sysfs root (``/sys`` live, ``tests/fixtures/<distro>/sys`` in tests). An
attribute that is absent or that the kernel refuses to show (``speed`` of a virtual NIC answers
EINVAL) is ``None``, not an error: sysfs attributes come and go with drivers and kernel versions.
"""
from __future__ import annotations

import os
from typing import List, Optional

from ...agent.errors import from_oserror


def read_attr(path: str) -> Optional[str]:
    """One sysfs attribute, stripped; None when it is missing or unreadable for this device."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:  # ENOENT, EINVAL (speed of a down link), EACCES: all mean "no value here"
        return None
    return data.decode("utf-8", "replace").strip()


def read_int(path: str) -> Optional[int]:
    """A sysfs attribute that holds one integer (decimal or 0x-hex); None when absent or not a number."""
    text = read_attr(path)
    if not text:
        return None
    try:
        return int(text, 0) if text.lower().startswith("0x") else int(text)
    except ValueError:
        return None


def link_name(path: str) -> str:
    """The last component a sysfs symlink points at (``device/driver`` -> ``virtio_net``), "" if none."""
    try:
        target = os.readlink(path)
    except OSError:
        return ""
    return os.path.basename(target.rstrip("/"))


def list_dir(path: str, what: str) -> List[str]:
    """Sorted entries of a sysfs directory; a missing directory is an empty list, others raise."""
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []
    except OSError as err:
        raise from_oserror(err, what) from err
