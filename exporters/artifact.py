"""What an ``asbuilt export`` format returns: named files, written by the CLI (or printed)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Artifact:
    name: str  # a file name, e.g. "Dockerfile", "main.tf"; the CLI writes it as -o OUT or OUT/name
    data: bytes
    binary: bool = False  # never printed to a terminal
