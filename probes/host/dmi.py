"""A virtualization guess from DMI: ``/sys/class/dmi/id/{sys_vendor,product_name,bios_vendor}``.

Like systemd-detect-virt's DMI table: the vendor strings hypervisors put in SMBIOS. Absent DMI
(ARM boards, Firecracker, containers) or an unknown vendor gives "" (unknown, which a bare-metal
host also gives: DMI cannot prove the absence of a hypervisor).
"""
from __future__ import annotations

import os
from typing import Dict

from ..sysfs import read_attr

FIELDS = ("sys_vendor", "product_name", "bios_vendor")
# (substring, virtualization), checked in order against each field.
_VENDORS = (
    ("amazon ec2", "amazon"), ("qemu", "kvm"), ("kvm", "kvm"), ("xen", "xen"),
    ("vmware", "vmware"), ("innotek", "oracle"), ("virtualbox", "oracle"),
    ("microsoft corporation", "microsoft"), ("google", "google"), ("parallels", "parallels"),
    ("bochs", "bochs"), ("bhyve", "bhyve"), ("openstack", "kvm"),
)


def guess_virtualization(dmi: Dict[str, str]) -> str:
    """The hypervisor the DMI strings name, or "" (pure)."""
    product = dmi.get("product_name", "").lower()
    sys_vendor = dmi.get("sys_vendor", "").lower()
    if sys_vendor.startswith("microsoft") and "virtual machine" not in product:
        return ""  # a Surface laptop is not Hyper-V
    for field in FIELDS:
        value = dmi.get(field, "").lower()
        if field == "product_name" and value == "hvm domu":
            return "xen"
        for needle, virt in _VENDORS:
            if needle in value:
                return virt
    return ""


def read_dmi(sys_root: str) -> Dict[str, str]:
    """The DMI fields that exist (missing ones are left out)."""
    out = {}
    for field in FIELDS:
        value = read_attr(os.path.join(sys_root, "class", "dmi", "id", field))
        if value:
            out[field] = value
    return out
