"""The distribution from ``/etc/os-release``, else ``/usr/lib/os-release`` (os-release(5)).

Lines are ``KEY=value`` with shell-style quoting (double or single quotes, backslash escapes);
``#`` starts a comment line. Unknown keys and malformed lines are ignored.
"""
from __future__ import annotations

import os
import shlex
from typing import Dict

from ...agent.errors import Vanished, from_oserror
from ...agent.model import OsRelease

PATHS = ("etc/os-release", "usr/lib/os-release")


def parse_os_release_vars(text: str) -> Dict[str, str]:
    """Every ``KEY=value`` assignment, unquoted as a shell would (pure)."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, raw = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            continue
        try:
            words = shlex.split(raw, comments=True, posix=True)
        except ValueError:  # unbalanced quote: take the text as written, minus a leading quote
            words = [raw.strip().lstrip("\"'")]
        out[key] = " ".join(words)
    return out


def parse_os_release(text: str) -> OsRelease:
    """The fields of os-release that the profile keeps (pure)."""
    v = parse_os_release_vars(text)
    return OsRelease(id=v.get("ID", ""), id_like=v.get("ID_LIKE", ""), name=v.get("NAME", ""),
                     pretty_name=v.get("PRETTY_NAME", ""), version_id=v.get("VERSION_ID", ""),
                     version_codename=v.get("VERSION_CODENAME", ""))


def read_os_release(rootfs: str) -> str:
    """The text of the first os-release file that exists under ``rootfs``."""
    last: OSError = FileNotFoundError(2, "No such file or directory")
    for rel in PATHS:
        path = os.path.join(rootfs, rel)
        try:
            with open(path, "rb") as fh:
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError as err:
            last = err
        except OSError as err:
            raise from_oserror(err, path) from err
    raise Vanished(f"{os.path.join(rootfs, PATHS[0])}: absent (nor {PATHS[1]})") from last
