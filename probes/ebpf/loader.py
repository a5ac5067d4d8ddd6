"""Load eBPF C sources for bcc: each program lives in its own ``.bpf.c`` file beside its probe.

Placeholders are written ``{{NAME}}`` and filled by :func:`render`, which fails on any left over
(or any given that the source does not use), so a typo never compiles into a silently different
program. ``ASBUILT_PRINT_BPF=1`` (the hidden ``--print-bpf`` flag) logs the final program text.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from typing import Dict, Sequence, Tuple, Union

from ...agent.errors import ProbeUnavailable

log = logging.getLogger(__name__)
_PLACEHOLDER = re.compile(r"\{\{([A-Z0-9_]+)\}\}")
HERE = os.path.dirname(os.path.abspath(__file__))


def source(name: str) -> str:
    """The text of ``probes/ebpf/<name>.bpf.c``."""
    with open(os.path.join(HERE, name + ".bpf.c"), encoding="utf-8") as fh:
        return fh.read()


def render(text: str, **values: Union[str, int]) -> str:
    """Fill every ``{{NAME}}`` placeholder; raise ValueError on a missing or unused value."""
    used = set(_PLACEHOLDER.findall(text))
    missing = used - set(values)
    unused = set(values) - used
    if missing or unused:
        raise ValueError(f"bpf placeholders: missing={sorted(missing)} unused={sorted(unused)}")
    out = _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)
    if os.environ.get("ASBUILT_PRINT_BPF"):
        log.info("bpf program text:\n%s", out)
    return out


_prefetched: Dict[str, object] = {}


def _request_key(text: str, cflags, functions) -> str:
    return json.dumps([text, list(cflags or []), [list(f) for f in functions]])


def prefetch(text: str, cflags: Union[list, None] = None, functions: Sequence[Tuple[str, str]] = ()) -> None:
    """Start compiling ``text`` in a child now; a later :func:`load` of the same program picks it up.
    Lets the probes of one trace compile on every core at once. Failures surface in ``load``."""
    if importlib.util.find_spec("bcc") is None:
        return
    from .bpfobject import Pending, load_request

    key = _request_key(text, cflags, functions)
    if key not in _prefetched:
        try:
            _prefetched[key] = Pending(load_request(text, cflags, list(functions)))
        except OSError as err:
            log.warning("prefetch failed error=%s", err)


def discard_prefetched() -> None:
    """Stop compiles nobody loaded (a trace that ended before starting every probe)."""
    while _prefetched:
        _prefetched.popitem()[1].close()


def load(text: str, cflags: Union[list, None] = None, functions: Sequence[Tuple[str, str]] = ()):
    """Compile ``text`` with bcc in a child process and hold the result by file descriptors
    (:mod:`.bpfobject`); ``functions`` are (name, prog type such as "KPROBE") loaded for attaching
    later (uprobes, kprobes). Missing bcc, headers or a refused load become ProbeUnavailable."""
    if importlib.util.find_spec("bcc") is None:
        raise ProbeUnavailable("bcc is not installed (Debian: python3-bpfcc)")
    from .bpfobject import BPFObject, ChildError, Pending, load_request

    pending = _prefetched.pop(_request_key(text, cflags, functions), None)
    try:
        if pending is None:
            pending = Pending(load_request(text, cflags, list(functions)))
        reply, fds = pending.result()
        log.info("compile child done peak_rss_mb=%.0f", pending.peak_rss_mb)
        return BPFObject(reply, fds)
    except (ChildError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ProbeUnavailable(f"eBPF program failed to load: {first}") from err
