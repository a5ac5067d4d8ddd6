"""Resolver configuration from ``/etc/resolv.conf`` (resolv.conf(5)).

``nameserver`` lines give the servers (all listed, though glibc uses only the first three);
``search`` and ``domain`` are mutually exclusive and the last one in the file wins, as in glibc;
``options`` accumulate. Lines starting with ``#`` or ``;`` are comments, and so is the rest of a
line after ``#``/``;``. ``/etc/resolv.conf`` is often a symlink (systemd-resolved, resolvconf):
under a non-``/`` root its absolute target is resolved inside that root, never on the host.
"""
from __future__ import annotations

import os
import re

from ...agent.errors import Vanished, from_oserror
from ...agent.model import Dns

PATH = "etc/resolv.conf"
_MAX_LINKS = 8
_COMMENT = re.compile(r"[#;].*$")


def parse_resolv_conf(text: str) -> Dns:
    """Nameservers, search domains and options (pure)."""
    dns = Dns()
    for line in text.splitlines():
        words = _COMMENT.sub("", line).split()
        if not words:
            continue
        key, args = words[0], words[1:]
        if key == "nameserver" and args:
            dns.nameservers.append(args[0])
        elif key == "search":
            dns.search = list(args)
        elif key == "domain" and args:
            dns.search = [args[0]]
        elif key == "options":
            dns.options.extend(args)
    return dns


def resolve_in_root(rootfs: str, rel: str) -> str:
    """The real path of ``rel`` under ``rootfs``, following symlinks as if ``rootfs`` were ``/``."""
    if rootfs in ("", "/"):
        return "/" + rel.lstrip("/")
    path = rel.lstrip("/")
    for _ in range(_MAX_LINKS):
        full = os.path.join(rootfs, path)
        try:
            target = os.readlink(full)
        except OSError:  # not a link (or absent): open() will say which
            return full
        if target.startswith("/"):
            path = target.lstrip("/")
        else:
            path = os.path.normpath(os.path.join(os.path.dirname(path), target)).lstrip("/")
            while path.startswith("../"):
                path = path[3:]
    return os.path.join(rootfs, path)


def read_resolv_conf(rootfs: str) -> str:
    path = resolve_in_root(rootfs, PATH)
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError as err:
        raise Vanished(f"{path}: absent") from err
    except OSError as err:
        raise from_oserror(err, path) from err
