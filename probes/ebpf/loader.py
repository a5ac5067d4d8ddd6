"""Load eBPF C sources for bcc: each program lives in its own ``.bpf.c`` file beside its probe.

Placeholders are written ``{{NAME}}`` and filled by :func:`render`, which fails on any left over
(or any given that the source does not use), so a typo never compiles into a silently different
program. ``ASBUILT_PRINT_BPF=1`` (the hidden ``--print-bpf`` flag) logs the final program text.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Union

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


def load(text: str, cflags: Union[list, None] = None):
    """Compile ``text`` with bcc; missing bcc or headers become ProbeUnavailable (one line)."""
    try:
        from bcc import BPF  # optional import, inside the probe only
    except ImportError as err:
        raise ProbeUnavailable("bcc is not installed (Debian: python3-bpfcc)") from err
    try:
        return BPF(text=text.encode(), cflags=list(cflags or []))
    except Exception as err:  # bcc raises bare Exception on compile/load failure
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ProbeUnavailable(f"eBPF program failed to load: {first}") from err
