"""Profile files: msgpack (canonical) and JSON renderings of the same model.

Every write is atomic and owner-only: a temp file (mode 0600) in the target directory, written,
fsynced, renamed over the target, and the directory fsynced. A reader therefore sees either the old
file or the new one, never a torn one, even after ``kill -9`` or a full disk.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import msgpack

from ..agent.errors import WriteError
from ..agent.model import Profile, msgpack_default, to_dict


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically with the given mode; raise WriteError on failure."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = -1, ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".asbuilt-", suffix=".tmp", dir=directory)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
        tmp = ""
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def format_for(path: str) -> str:
    """The file format implied by a path's suffix: msgpack unless it ends in .json."""
    return "json" if path.endswith(".json") else "msgpack"


def encode_profile(profile: Profile, fmt: str) -> bytes:
    if fmt == "json":
        return (json.dumps(to_dict(profile), indent=1, sort_keys=False) + "\n").encode()
    # paths are kept byte-exact: undecodable bytes travel as surrogate escapes; model objects are
    # rendered by msgpack_default as the packer meets them (the same maps to_dict would make)
    return msgpack.packb(profile, use_bin_type=True, unicode_errors="surrogateescape", default=msgpack_default)


def write_profile(profile: Profile, path: str, fmt: str = "") -> None:
    """Write ``profile`` to ``path`` (format from the suffix unless given), atomically, mode 0600."""
    atomic_write(path, encode_profile(profile, fmt or format_for(path)))
