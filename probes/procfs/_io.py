"""Shared I/O for the procfs readers: one whole-file read, one readlink, OSError translated once.

Not a kernel file: the helpers every ``read_x`` uses so the OSError → :mod:`agent.errors`
translation lives in one place. Proc files lie about their size (``st_size`` is 0), so they are
read with ``os.read`` until a short read (the end, for these files), never sized with ``stat``.
Text is decoded with ``surrogateescape``, the same convention ``os.readlink``/``os.listdir`` use for
str paths, so a path read from ``maps`` compares equal to the same path read from an fd link.
"""
from __future__ import annotations

import os

from ...agent.errors import from_oserror

CHUNK = 65536
_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


def pid_path(proc_root: str, pid: int, name: str) -> str:
    """``<proc_root>/<pid>/<name>``."""
    return f"{proc_root}/{pid}/{name}"


def _read(path: str, short_is_end: bool) -> bytes:
    try:
        fd = os.open(path, _FLAGS)
    except OSError as err:
        raise from_oserror(err, path) from err
    try:
        data = os.read(fd, CHUNK)
        if short_is_end and len(data) < CHUNK:
            # A short read is the end of a single-record procfs file: the single_open seq_files
            # (stat, status, limits, cgroup, fdinfo) and the cmdline/environ readers fill the
            # buffer until the file ends. NOT true of record-per-line files such as maps: those
            # use read_records. Asking again would only return b"": one syscall in three, ~50 ms
            # over 1,000 processes.
            return data
        chunks = [data]
        while data:
            data = os.read(fd, CHUNK)
            chunks.append(data)
    except OSError as err:
        raise from_oserror(err, path) from err
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_bytes(path: str) -> bytes:
    """The whole content of ``path``; OSError is translated (Vanished, Denied, AsbuiltError)."""
    return _read(path, short_is_end=True)


def read_records(path: str) -> str:
    """The whole of a record-per-line seq_file (``maps``, ``mountinfo``, ``/proc/net/*``) as str.

    Unlike :func:`read_bytes`, reads until end of file: such a file answers each read with at most
    one page of whole records (the seq_file buffer), so a short read there is not the end.
    """
    return _read(path, short_is_end=False).decode("utf-8", "surrogateescape")


def read_text(path: str) -> str:
    """The whole content of ``path`` as str (``surrogateescape`` for undecodable bytes)."""
    return read_bytes(path).decode("utf-8", "surrogateescape")


def readlink(path: str) -> str:
    """The target of the symlink ``path``; OSError is translated."""
    try:
        return os.readlink(path)
    except OSError as err:
        raise from_oserror(err, path) from err
