"""Package databases: which package owns each file a process uses, with version, install time,
origin, and whether the file differs from what the package shipped.

``open_index(roots, gaps)`` returns a :class:`PackageIndex` (dpkg or rpm) or None with a gap.
"""
from __future__ import annotations

from .index import PackageIndex, open_index

__all__ = ["PackageIndex", "open_index"]
