"""Processors from ``/proc/cpuinfo`` (proc(5); format per architecture, arch/*/kernel/cpu/proc.c).

Blocks separated by blank lines, one per logical (online) CPU, each starting ``processor : N``.
x86 gives ``physical id`` (socket) and ``core id``: physical cores are the distinct pairs, sockets
the distinct physical ids. Architectures without them (arm64, s390, many VMs' ppc64) leave
``physical_count`` and ``sockets`` 0, meaning unknown. The model is ``model name`` (x86, arm64
with newer kernels), else ``Hardware``/``cpu model``/``cpu``/``Processor`` as other arches spell it.
"""
from __future__ import annotations

import os
from typing import Dict, List, Set, Tuple

from ...agent.errors import from_oserror
from ...agent.model import Cpu

_MODEL_KEYS = ("model name", "cpu model", "Processor", "cpu", "Hardware")


def parse_cpuinfo_blocks(text: str) -> List[Dict[str, str]]:
    """One ``key -> value`` dict per processor block (pure)."""
    blocks: List[Dict[str, str]] = []
    current: Dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    return blocks


def parse_cpuinfo(text: str) -> Cpu:
    """Model, logical CPUs, physical cores and sockets (pure)."""
    blocks = parse_cpuinfo_blocks(text)
    cpus = [b for b in blocks if "processor" in b and b["processor"].isdigit()]
    model = ""
    for key in _MODEL_KEYS:
        for block in cpus + blocks:  # arm64 and others put Hardware in a trailing block
            if block.get(key):
                model = block[key]
                break
        if model:
            break
    cores: Set[Tuple[str, str]] = set()
    sockets: Set[str] = set()
    for block in cpus:
        if "physical id" in block and "core id" in block:
            cores.add((block["physical id"], block["core id"]))
            sockets.add(block["physical id"])
    return Cpu(model=model, logical_count=len(cpus), physical_count=len(cores), sockets=len(sockets))


def read_cpuinfo(proc_root: str) -> str:
    path = os.path.join(proc_root, "cpuinfo")
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")
    except OSError as err:
        raise from_oserror(err, path) from err
