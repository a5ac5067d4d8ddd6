"""Record-per-line proc files are read to the end, not to the first short read (regression)."""
import os

from asbuilt.probes.procfs._io import read_records
from asbuilt.probes.procfs.maps import read_maps


def test_maps_longer_than_one_page_is_read_whole():
    with open(f"/proc/{os.getpid()}/maps", "rb") as fh:
        expected = fh.read()
    assert len(expected) > 4096, "this python maps more than a page of lines"
    entries = read_maps("/proc", os.getpid())
    assert len(entries) == len(expected.splitlines())
    assert any(os.path.basename(e.path).startswith("libc.so") for e in entries)


def test_read_records_equals_a_plain_read():
    path = f"/proc/{os.getpid()}/maps"
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        assert read_records(path).splitlines() == fh.read().splitlines()
