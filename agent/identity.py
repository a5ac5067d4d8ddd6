"""Stable process identity: the key a process keeps across restarts and across hosts.

``identity(exe, argv, unit, container_id, container_image)`` returns a short, readable and stable key
``<scope>:<exe>:<hash8>``, e.g. ``nginx.service:/usr/sbin/nginx:1a2b3c4d``, where

* **scope** is, first match wins: the container image without tag or digest
  (``docker.io/library/redis``) when the process runs in a container with a known image; else the
  systemd unit, normalised (below); else the container id's first 12 characters; else ``-``.
  A unit that merely names the container (``docker-<id>.scope``, ``cri-containerd-<id>.scope``,
  ``libpod-<id>.scope``) gives way to the image.
* **exe** is the executable path, without a `` (deleted)`` suffix (an upgraded binary is the same
  program). Without one (kernel thread, exe unreadable): argv[0] when it is an absolute path, else
  ``[argv0]`` with digits replaced by ``N`` (pass a kernel thread's comm as its argv:
  ``kworker/0:1-events`` → ``[kworker/N:N-events]``).
* **hash8** is the first 8 hex digits of SHA-256 over scope, exe and :func:`normalise_argv` (NUL-joined).

The argv given must already be redacted (``agent.redact.redact_argv``). :func:`normalise_argv` drops
what changes from one run to the next and keeps what tells two instances apart:

* ``/proc/1234/...`` → ``/proc/<pid>/...``; pid-like flags (``--pid``, ``--ppid``, ``--parent-pid``,
  ``--pgid``) and ``pid=`` keys, in ``--flag=N`` and ``--flag N`` forms → ``<pid>``; other per-run
  flags (``--nonce``, ``--timestamp``, ``--start-time``, ``--launch-time-ticks``, ``--seed``,
  ``--session-id``, ``--request-id``, ``--run-id``) → ``<volatile>``;
* UUIDs → ``<uuid>``; runs of 12+ hex characters holding a digit and a letter (container ids,
  hashes, systemd-private ids) → ``<hex>``; runs of 10+ digits (epoch seconds, milliseconds) →
  ``<num>``;
* timestamps: ISO-8601 date-times (``2024-01-15T10:11:12Z``, ``2024-01-15 10:11``), compact
  ``20240115T101112``/``20240115-101112`` → ``<time>``; plain dates ``2024-01-15`` → ``<date>``;
* temporary paths under ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/user/N``: mktemp
  (``tmp.XXXXXXXXXX``), Python tempfile (``tmpXXXXXXXX``), ``pytest-of-USER/...`` (whole rest),
  ``systemd-private-*`` and names ending in a random ``.XXXXXX``/``-XXXXXX`` suffix (letters and
  digits mixed) → ``<tmp>``; runs of 6+ digits there → ``<num>``;
* a PostgreSQL backend title ``postgres: [cluster:] user db host(port) state`` keeps
  ``user db host`` and drops the client port and the state.

Ports, config paths, addresses, flags and their order are kept: two redis instances on different
ports are different identities. Never raises.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, List, Sequence

_UUID = re.compile(r"(?i)\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
_HEXRUN = re.compile(r"(?<![0-9A-Za-z])[0-9a-fA-F]{12,}(?![0-9A-Za-z])")
_LONGNUM = re.compile(r"(?<![0-9A-Za-z.])\d{10,}(?![0-9A-Za-z])")
_DATETIME = re.compile(
    r"\b\d{4}-\d{2}-\d{2}[T _]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?"
    r"|\b\d{8}[T_-]?\d{6}(?:Z|\b)")
_DATE = re.compile(r"(?<!\d)\d{4}-\d{2}-\d{2}(?!\d)")
_PROC_PID = re.compile(r"(?<![\w.])/proc/\d+(?=/|$|\s)")
_PID_KV = re.compile(r"(?i)(?<![\w.\-])((?:-{1,2})?(?:pid|ppid|parent[-_]?pid|pgid)=)\d+\b")
_PID_FLAGS = frozenset(("pid", "ppid", "parent-pid", "parent_pid", "parentpid", "pgid"))
_VOLATILE_FLAGS = frozenset(("nonce", "timestamp", "ts", "start-time", "started-at", "launch-time-ticks",
                             "seed", "session-id", "request-id", "run-id", "starttime"))
_FLAG = re.compile(r"^-{1,2}([A-Za-z][\w\-]*)$")
_FLAG_EQ = re.compile(r"^(-{1,2}([A-Za-z][\w\-]*)=)(.*)$", re.S)
_TMP_ROOT = r"(?:/tmp|/var/tmp|/dev/shm|/run/user/\d+)"
_PYTEST = re.compile(r"(" + _TMP_ROOT + r"/pytest-of-[^/\s]+/)[^\s\"':;,]*")
_TMP_COMPONENT = re.compile(
    r"(" + _TMP_ROOT + r"/(?:[^/\s\"':;,]{1,255}/){0,8}?)"
    r"(tmp\.[A-Za-z0-9]{6,}|tmp[a-z0-9_]{8}|systemd-private-[^/\s\"':;,]*"
    r"|[^/\s\"':;,]*?[._-](?=[A-Za-z0-9]{6,12}(?:[/\s\"':;,.]|$))"
    r"(?=[A-Za-z]*\d)(?=\d*[A-Za-z])[A-Za-z0-9]{6,12})(?=[/\s\"':;,.]|$)")
_TMP_DIGITS = re.compile(r"(" + _TMP_ROOT + r"/[^\s\"':;,]{0,255}?)(\d{6,})")
_PG_TITLE = re.compile(
    r"^(postgres: (?:[\w.\-/]+: )?\S+ \S+ (?:\d{1,3}(?:\.\d{1,3}){3}|\[?[0-9A-Fa-f:]+\]?|\[local\]|[\w.\-]+))"
    r"(?:\(\d+\))?(?: .*)?$", re.S)
_UNIT_CONTAINER = re.compile(r"^(?:docker|cri-containerd|crio|libpod|podman)-[0-9a-f]{12,}\.scope$")
_UNIT_SESSION = re.compile(r"^session-\d+\.scope$")
_UNIT_RUN = re.compile(r"^run-[ru]?[0-9a-f]+\.(scope|service)$")
_DIGITS = re.compile(r"\d+")


def _s(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return "" if value is None else str(value)


def _hex_sub(m: "re.Match[str]") -> str:
    run = m.group(0)
    has_digit = any(c.isdigit() for c in run)
    has_alpha = any(c.isalpha() for c in run)
    return "<hex>" if has_digit and has_alpha else run


def _tmp_sub(m: "re.Match[str]") -> str:
    return m.group(1) + "<tmp>"


def normalise_arg(arg: str) -> str:
    """Normalise one argument (see the module docstring); pure."""
    if not arg:
        return arg
    if "/proc/" in arg:
        arg = _PROC_PID.sub("/proc/<pid>", arg)
    if "=" in arg:
        arg = _PID_KV.sub(lambda m: m.group(1) + "<pid>", arg)
    if "/" in arg:
        arg = _PYTEST.sub(lambda m: m.group(1) + "<tmp>", arg)
        arg = _TMP_COMPONENT.sub(_tmp_sub, arg)
        arg = _TMP_DIGITS.sub(lambda m: m.group(1) + "<num>", arg)
    arg = _UUID.sub("<uuid>", arg)
    arg = _DATETIME.sub("<time>", arg)
    arg = _DATE.sub("<date>", arg)
    arg = _HEXRUN.sub(_hex_sub, arg)
    arg = _LONGNUM.sub("<num>", arg)
    return arg


def normalise_argv(argv: Sequence[Any]) -> List[str]:
    """The (already redacted) argv with per-run parts replaced by placeholders; for display and hashing."""
    try:
        args = [_s(a) for a in (argv or ())]
        if args:
            pg = _PG_TITLE.match(args[0])
            if pg and len(args) == 1 and "(" in args[0]:
                args[0] = pg.group(1)
        out: List[str] = []
        volatile_next = ""
        for a in args:
            if volatile_next:
                placeholder, volatile_next = volatile_next, ""
                if a and a[0] != "-":
                    out.append(placeholder)
                    continue
            m = _FLAG_EQ.match(a)
            if m:
                name = m.group(2).lower()
                if name in _PID_FLAGS:
                    out.append(m.group(1) + "<pid>")
                    continue
                if name in _VOLATILE_FLAGS:
                    out.append(m.group(1) + "<volatile>")
                    continue
            else:
                m = _FLAG.match(a)
                if m:
                    name = m.group(1).lower()
                    if name in _PID_FLAGS:
                        volatile_next = "<pid>"
                    elif name in _VOLATILE_FLAGS:
                        volatile_next = "<volatile>"
            out.append(normalise_arg(a))
        return out
    except Exception:  # noqa: BLE001 - identity must never fail a scan
        return [_s(a) for a in (argv or ())] if isinstance(argv, (list, tuple)) else []


def normalise_unit(unit: str) -> str:
    """A systemd unit with per-run parts removed (``session-42.scope`` → ``session-N.scope``)."""
    unit = _s(unit)
    if _UNIT_SESSION.match(unit):
        return "session-N.scope"
    m = _UNIT_RUN.match(unit)
    if m:
        return "run-*." + m.group(1)
    if _UNIT_CONTAINER.match(unit):
        return _HEXRUN.sub("<hex>", unit)
    return _HEXRUN.sub(_hex_sub, _UUID.sub("<uuid>", unit))


def image_repository(image: str) -> str:
    """A container image reference without tag or digest (``redis:7@sha256:...`` → ``redis``)."""
    image = _s(image).strip()
    image = image.split("@", 1)[0]
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        image = image[:colon]
    return image


def _scope(unit: str, container_id: str, container_image: str) -> str:
    image = image_repository(container_image) if container_image else ""
    unit = _s(unit)
    if image and (not unit or _UNIT_CONTAINER.match(unit) or (container_id and container_id[:12] in unit)):
        return image
    if unit:
        return normalise_unit(unit)
    if image:
        return image
    if container_id:
        return _s(container_id)[:12]
    return "-"


def identity(exe: Any, argv: Sequence[Any], unit: Any = "", container_id: Any = "",
             container_image: Any = "") -> str:
    """``<scope>:<exe>:<hash8>``: the same for a restarted process, comparable across hosts.

    See the module docstring for the rules. ``argv`` must already be redacted. Never raises.
    """
    try:
        exe_s = _s(exe)
        if exe_s.endswith(" (deleted)"):
            exe_s = exe_s[: -len(" (deleted)")]
        norm = normalise_argv(argv)
        if not exe_s:
            first = norm[0] if norm else "?"
            if first.startswith("/"):
                exe_s = first.split(" ", 1)[0]
            else:
                exe_s = "[" + _DIGITS.sub("N", first) + "]"
                if norm:
                    norm = [exe_s] + norm[1:]
        scope = _scope(_s(unit), _s(container_id), _s(container_image))
        material = "\0".join([scope, exe_s] + norm).encode("utf-8", "surrogateescape")
        digest = hashlib.sha256(material).hexdigest()[:8]
        return "%s:%s:%s" % (scope, exe_s, digest)
    except Exception:  # noqa: BLE001
        return "-:?:00000000"


__all__ = ["identity", "normalise_argv", "normalise_arg", "normalise_unit", "image_repository"]
