"""procfs readers: one module per kernel file (``/proc/PID/stat`` → ``stat.py`` ...).

Kernel documentation: Documentation/filesystems/proc.rst and ``man 5 proc``. Each module has a
``read_x(proc_root, ...)`` doing the I/O (whole file, no ``stat``) and a pure ``parse_x(text)``.
For processes, :func:`.process.read_process` gathers the per-process files for one pid with the
vanished/denied semantics; :func:`.pids.list_pids` lists the pids.
"""
from __future__ import annotations
