"""User and group names from ``/etc/passwd`` and ``/etc/group`` (passwd(5), group(5)).

Pure parsers map uid -> name and gid -> name; the scan uses them to name process owners without
calling NSS (which would read the scanning host's databases, not the injected root's). The first
entry for an id wins, as getpwuid(3) returns it; NIS compat lines (``+``/``-``), comments and
malformed lines are skipped. Users only known to LDAP/SSSD stay unnamed.
"""
from __future__ import annotations

import os
from typing import Dict


from ..procfs._io import read_text


def _parse_ids(text: str, id_field: int, min_fields: int) -> Dict[int, str]:
    out: Dict[int, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith(("#", "+", "-")):
            continue
        fields = line.split(":")
        if len(fields) < min_fields or not fields[0]:
            continue
        try:
            ident = int(fields[id_field])
        except ValueError:
            continue
        if ident >= 0:
            out.setdefault(ident, fields[0])
    return out


def parse_passwd(text: str) -> Dict[int, str]:
    """uid -> user name (pure). A line is ``name:password:uid:gid:gecos:home:shell``."""
    return _parse_ids(text, 2, 4)


def parse_group(text: str) -> Dict[int, str]:
    """gid -> group name (pure). A line is ``name:password:gid:members``."""
    return _parse_ids(text, 2, 3)


def read_passwd(rootfs: str) -> Dict[int, str]:
    return parse_passwd(read_text(os.path.join(rootfs, "etc", "passwd")))


def read_group(rootfs: str) -> Dict[int, str]:
    return parse_group(read_text(os.path.join(rootfs, "etc", "group")))
