"""Block devices from ``/sys/block/*`` (Documentation/ABI/stable/sysfs-block).

Per device: ``size`` (always in 512-byte sectors, whatever the logical block size), ``removable``,
``queue/rotational``, ``device/model`` and ``device/vendor`` (SCSI/ATA/NVMe/virtio), the driver from
the ``device/driver`` link (NVMe namespaces: ``device/device/driver``), and partitions: the
subdirectories that hold a ``partition`` file. Unattached loop devices and unconfigured zram/ram
disks (size 0) are left out: every host has eight of them and they say nothing.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional

from ...agent.model import Disk
from . import link_name, list_dir, read_attr, read_int

SECTOR_BYTES = 512
_EMPTY_WHEN_ZERO = ("loop", "zram", "ram")


def kind_of(name: str) -> str:
    """The kind of a whole block device from its kernel name (pure)."""
    if name.startswith("loop"):
        return "loop"
    if name.startswith("dm-"):
        return "dm"
    if re.match(r"md\d", name):
        return "md"
    if name.startswith("nvme"):
        return "nvme"
    if name.startswith("zram"):
        return "zram"
    if re.match(r"ram\d", name):
        return "ram"
    if re.match(r"sr\d", name):
        return "rom"
    return "disk"


def _flag(text: Optional[str]) -> Optional[bool]:
    if text in ("0", "1"):
        return text == "1"
    return None


def read_disk(sys_root: str, name: str) -> Disk:
    """One whole block device."""
    base = os.path.join(sys_root, "block", name)
    sectors = read_int(os.path.join(base, "size")) or 0
    driver = link_name(os.path.join(base, "device", "driver"))
    if not driver:  # nvme0n1/device is the controller nvme0; its device is the PCI function
        driver = link_name(os.path.join(base, "device", "device", "driver"))
    return Disk(name=name, size_bytes=sectors * SECTOR_BYTES,
                model=read_attr(os.path.join(base, "device", "model")) or "",
                vendor=read_attr(os.path.join(base, "device", "vendor")) or "",
                rotational=_flag(read_attr(os.path.join(base, "queue", "rotational"))),
                removable=_flag(read_attr(os.path.join(base, "removable"))),
                driver=driver, kind=kind_of(name))


def read_partitions(sys_root: str, disk: str) -> List[Disk]:
    """The partitions of one block device, in name order."""
    base = os.path.join(sys_root, "block", disk)
    out = []
    for entry in list_dir(base, f"sysfs block/{disk}"):
        if not os.path.exists(os.path.join(base, entry, "partition")):
            continue
        sectors = read_int(os.path.join(base, entry, "size")) or 0
        out.append(Disk(name=entry, size_bytes=sectors * SECTOR_BYTES, kind="partition"))
    return out


def read_disks(sys_root: str) -> List[Disk]:
    """Every block device under ``<sys_root>/block`` followed by its partitions."""
    out: List[Disk] = []
    for name in list_dir(os.path.join(sys_root, "block"), "sysfs block"):
        disk = read_disk(sys_root, name)
        if disk.size_bytes == 0 and disk.kind in _EMPTY_WHEN_ZERO:
            continue
        out.append(disk)
        out.extend(read_partitions(sys_root, name))
    return out
