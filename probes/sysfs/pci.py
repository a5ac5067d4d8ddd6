"""PCI functions from ``/sys/bus/pci/devices/*`` (Documentation/ABI/testing/sysfs-bus-pci).

Per function (named by its bus address, ``0000:00:03.0``): ``vendor`` and ``device`` ids, the
24-bit ``class`` code, and the bound driver from the ``driver`` link (empty when none is bound).
Ids are kept as hex without ``0x`` (``1af4``); the class becomes a short name from the PCI class
table, with the code after it so nothing is lost (``ethernet (020000)``).
"""
from __future__ import annotations

import os
from typing import List

from ...agent.model import Device
from . import link_name, list_dir, read_attr

# PCI base classes (PCI Code and ID Assignment spec) and a few subclasses worth telling apart.
_BASE_CLASSES = {
    0x00: "unclassified", 0x01: "storage", 0x02: "network", 0x03: "display", 0x04: "multimedia",
    0x05: "memory", 0x06: "bridge", 0x07: "communication", 0x08: "system", 0x09: "input",
    0x0a: "docking", 0x0b: "processor", 0x0c: "serial-bus", 0x0d: "wireless", 0x0e: "intelligent",
    0x0f: "satellite", 0x10: "encryption", 0x11: "signal-processing", 0x12: "accelerator",
    0x13: "instrumentation", 0xff: "unassigned",
}
_SUBCLASSES = {
    0x0100: "scsi", 0x0101: "ide", 0x0104: "raid", 0x0106: "sata", 0x0107: "sas", 0x0108: "nvme",
    0x0200: "ethernet", 0x0207: "infiniband", 0x0300: "vga", 0x0302: "3d",
    0x0600: "host-bridge", 0x0601: "isa-bridge", 0x0604: "pci-bridge", 0x0c03: "usb",
    0x0c05: "smbus",
}


def _hex(text: str) -> str:
    text = text.strip().lower()
    return text[2:] if text.startswith("0x") else text


def class_name(code: str) -> str:
    """``0x020000`` -> ``ethernet (020000)``; unparseable input comes back as given (pure)."""
    digits = _hex(code)
    try:
        value = int(digits, 16)
    except ValueError:
        return code.strip()
    name = _SUBCLASSES.get(value >> 8) or _BASE_CLASSES.get(value >> 16, "")
    digits = f"{value:06x}"
    return f"{name} ({digits})" if name else digits


def read_pci_device(sys_root: str, address: str) -> Device:
    base = os.path.join(sys_root, "bus", "pci", "devices", address)
    code = read_attr(os.path.join(base, "class"))
    return Device(subsystem="pci", name=address,
                  driver=link_name(os.path.join(base, "driver")),
                  vendor=_hex(read_attr(os.path.join(base, "vendor")) or ""),
                  device=_hex(read_attr(os.path.join(base, "device")) or ""),
                  class_name=class_name(code) if code else "")


def read_pci_devices(sys_root: str) -> List[Device]:
    """Every PCI function, in bus-address order."""
    return [read_pci_device(sys_root, address)
            for address in list_dir(os.path.join(sys_root, "bus", "pci", "devices"), "sysfs bus/pci")]
