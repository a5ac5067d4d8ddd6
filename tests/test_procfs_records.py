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


def _text_answer(proc_root, pid):
    from asbuilt.probes.procfs._io import pid_path
    from asbuilt.probes.procfs.maps import parse_mapped_files

    return parse_mapped_files(read_records(pid_path(proc_root, pid, "maps")))


def test_procmap_query_answers_as_the_maps_text(tmp_path):
    """read_mapped_files asks the kernel by PROCMAP_QUERY (6.11+; this kernel has it) and must give
    what the text gives: for every process here, and for one mapping a deleted file and a file
    whose name has spaces."""
    import mmap
    import subprocess
    import sys

    from asbuilt.probes.procfs import maps

    odd = tmp_path / "a data file.bin"
    gone = tmp_path / "gone.bin"
    for f in (odd, gone):
        f.write_bytes(b"x" * mmap.PAGESIZE)
    code = ("import mmap,sys,os\n"
            f"a=open({str(odd)!r},'rb'); m1=mmap.mmap(a.fileno(),0,access=mmap.ACCESS_READ)\n"
            f"b=open({str(gone)!r},'rb'); m2=mmap.mmap(b.fileno(),0,access=mmap.ACCESS_READ)\n"
            f"os.unlink({str(gone)!r}); print('ready',flush=True); sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with open(f"/proc/{child.pid}/maps", "rb") as fh:
            assert maps.query_mapped_paths(fh.fileno()) is not None, "PROCMAP_QUERY answered"
        got = maps.read_mapped_files("/proc", child.pid)
        assert got == _text_answer("/proc", child.pid)
        files = {(link.path, link.deleted) for link in got.files}
        assert (str(odd), False) in files and (str(gone), True) in files
        from asbuilt.agent.errors import AsbuiltError

        compared = 0
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                want = _text_answer("/proc", int(name))
                got = maps.read_mapped_files("/proc", int(name))
            except AsbuiltError:  # denied (pid 1 here) or exited between the reads
                continue
            if got != want and os.path.exists(f"/proc/{name}"):
                assert got == _text_answer("/proc", int(name)), f"pid {name}"  # not a change in between
            compared += 1
        assert compared > 5
    finally:
        child.stdin.close()
        child.wait(10)


def test_captured_maps_file_falls_back_to_the_text(tmp_path):
    """A captured tree's maps is a plain file: the ioctl is refused and the text is parsed."""
    from asbuilt.probes.procfs import maps

    with open(f"/proc/{os.getpid()}/maps", "rb") as fh:
        text = fh.read()
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "maps").write_bytes(text)
    with open(tmp_path / "42" / "maps", "rb") as fh:
        assert maps.query_mapped_paths(fh.fileno()) is None
    got = maps.read_mapped_files(str(tmp_path), 42)
    assert got == maps.parse_mapped_files(text.decode("utf-8", "surrogateescape"))
    assert any(os.path.basename(link.path).startswith("libc.so") for link in got.libraries)
