"""One error vocabulary for asbuilt.

Every expected failure is one of these; the CLI prints ``asbuilt: <message>`` on one line and exits
with the class's ``exit_code``. OSError is translated in one place (:func:`from_oserror`) so callers
never match on message strings.
"""
from __future__ import annotations

import errno


class AsbuiltError(Exception):
    """Base of every expected asbuilt failure."""

    exit_code = 2


class UsageError(AsbuiltError):
    """The command line or configuration is wrong."""


class ProfileError(AsbuiltError):
    """A profile file is missing, truncated, of another schema, or not a profile at all."""


class ProbeUnavailable(AsbuiltError):
    """A probe cannot run on this host (missing feature, privilege, package)."""


class Vanished(AsbuiltError):
    """The process (or file) went away while it was being read: normal on a live host."""


class Denied(AsbuiltError):
    """Permission denied reading something: becomes an empty field plus a recorded gap."""


class WriteError(AsbuiltError):
    """Writing an output file failed (full disk, read-only filesystem, permissions)."""

    exit_code = 1


def from_oserror(err: OSError, what: str) -> AsbuiltError:
    """Translate an OSError raised while reading ``what`` into the asbuilt vocabulary."""
    if err.errno in (errno.ENOENT, errno.ESRCH):
        return Vanished(f"{what}: gone")
    if err.errno in (errno.EACCES, errno.EPERM):
        return Denied(f"{what}: permission denied")
    return AsbuiltError(f"{what}: {err.strerror or err}")
