"""The bpf(2) and perf_event_open(2) system calls the agent needs once programs are loaded, without bcc.

bcc (libbcc links all of LLVM and clang) is only needed to *compile*; holding it costs ~75 MB of
resident memory before the first program and ~40 MB more per compiled object. The agent therefore
compiles in a short-lived child (:mod:`.compile_child`) that hands over the file descriptors of the
loaded maps, programs and attachments, and does everything after that here, with plain syscalls:

- maps: ``BPF_MAP_{LOOKUP,UPDATE,DELETE}_ELEM``, ``BPF_MAP_GET_NEXT_KEY``, ``BPF_MAP_LOOKUP_BATCH``
  (5.6+), ``BPF_OBJ_GET_INFO_BY_FD`` (see bpf(2) and ``include/uapi/linux/bpf.h``);
- perf buffers: one ``PERF_COUNT_SW_BPF_OUTPUT`` event per online CPU, its ring mmapped and read
  as ``PERF_RECORD_SAMPLE`` (raw) / ``PERF_RECORD_LOST`` records (perf_event_open(2), "MMAP layout");
- uprobes and kprobes through the perf PMUs (``/sys/bus/event_source/devices/{uprobe,kprobe}``)
  with ``PERF_EVENT_IOC_SET_BPF``; the uprobe offset comes from the library's ELF dynamic symbols.

Everything raises OSError (with errno) on failure; callers translate it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import platform
import struct
from typing import Callable, Iterator, List, Optional, Tuple

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

_NR = {  # (bpf, perf_event_open)
    "x86_64": (321, 298), "aarch64": (280, 241), "ppc64le": (361, 319), "s390x": (351, 331),
    "riscv64": (280, 241),
}
NR_BPF, NR_PERF_EVENT_OPEN = _NR.get(platform.machine(), (321, 298))

# bpf commands
MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 1, 2, 3, 4
OBJ_GET_INFO_BY_FD = 15
MAP_LOOKUP_BATCH = 24
MAP_DELETE_BATCH = 27

# map types whose value is one slot per possible CPU
PERCPU_TYPES = {5, 6, 10}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
ARRAY_TYPES = {2, 6}  # ARRAY, PERCPU_ARRAY
PERF_EVENT_ARRAY = 4

PAGE_SIZE = mmap.PAGESIZE
PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 8
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408
PERF_RECORD_LOST, PERF_RECORD_SAMPLE = 2, 9
_WATERMARK = 1 << 14  # perf_event_attr flag bit: wake up on wakeup_watermark bytes, not per event


def _check(ret: int) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def bpf(cmd: int, attr: ctypes.Array) -> int:
    """One bpf(2) call; ``attr`` is a ctypes buffer holding the command's part of ``union bpf_attr``."""
    return _check(_libc.syscall(NR_BPF, ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(len(attr))))


def _addr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def possible_cpus(sys_root: str = "/sys") -> int:
    """How many CPUs per-CPU map values have slots for (``/sys/devices/system/cpu/possible``)."""
    return len(cpu_list(_read(os.path.join(sys_root, "devices/system/cpu/possible"))))


def online_cpus(sys_root: str = "/sys") -> List[int]:
    return cpu_list(_read(os.path.join(sys_root, "devices/system/cpu/online")))


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read()
    except OSError:
        return f"0-{(os.cpu_count() or 1) - 1}"


def cpu_list(text: str) -> List[int]:
    """``"0-3,5"`` into [0, 1, 2, 3, 5]; malformed parts are skipped."""
    out: List[int] = []
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out.extend(range(int(lo), int(hi or lo) + 1))
    return out


class MapInfo:
    __slots__ = ("type", "id", "key_size", "value_size", "max_entries", "flags", "name")

    def __init__(self, raw: bytes):
        (self.type, self.id, self.key_size, self.value_size, self.max_entries,
         self.flags) = struct.unpack_from("<6I", raw)
        self.name = raw[24:40].split(b"\0", 1)[0].decode("ascii", "replace")


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(88)
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    bpf(OBJ_GET_INFO_BY_FD, attr)
    return MapInfo(info.raw)


class RawMap:
    """A BPF map by file descriptor: raw bytes in, raw bytes out (``value`` holds every CPU's slot)."""

    def __init__(self, fd: int, ncpus: int = 0):
        self.fd = fd
        self.info = map_info(fd)
        self.percpu = self.info.type in PERCPU_TYPES
        self.slot = (self.info.value_size + 7) // 8 * 8 if self.percpu else self.info.value_size
        self.ncpus = (ncpus or possible_cpus()) if self.percpu else 1
        self.value_len = self.slot * self.ncpus

    def _elem(self, cmd: int, key: Optional[ctypes.Array], value: Optional[ctypes.Array], flags: int = 0):
        attr = ctypes.create_string_buffer(32)
        struct.pack_into("<IIQQQ", attr, 0, self.fd, 0, _addr(key), _addr(value), flags)
        bpf(cmd, attr)

    def _key(self, key: bytes) -> ctypes.Array:
        if len(key) != self.info.key_size:
            raise ValueError(f"map {self.info.name}: key of {len(key)} bytes, want {self.info.key_size}")
        return ctypes.create_string_buffer(key, len(key))

    def lookup(self, key: bytes) -> Optional[bytes]:
        value = ctypes.create_string_buffer(self.value_len)
        try:
            self._elem(MAP_LOOKUP_ELEM, self._key(key), value)
        except OSError as err:
            if err.errno == 2:  # ENOENT
                return None
            raise
        return value.raw

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        if len(value) != self.value_len:
            raise ValueError(f"map {self.info.name}: value of {len(value)} bytes, want {self.value_len}")
        self._elem(MAP_UPDATE_ELEM, self._key(key), ctypes.create_string_buffer(value, len(value)), flags)

    def delete(self, key: bytes) -> bool:
        try:
            self._elem(MAP_DELETE_ELEM, self._key(key), None)
        except OSError as err:
            if err.errno == 2:
                return False
            raise
        return True

    def delete_many(self, keys: List[bytes]) -> int:
        """Delete ``keys`` with BPF_MAP_DELETE_BATCH (one syscall; 5.6+), one by one where the kernel
        has no batch or a key is already gone; returns how many were deleted."""
        ks = self.info.key_size
        done = 0
        while keys:
            buf = ctypes.create_string_buffer(b"".join(keys), ks * len(keys))
            attr = ctypes.create_string_buffer(56)
            struct.pack_into("<QQQQIIQQ", attr, 0, 0, 0, ctypes.addressof(buf), 0, len(keys), self.fd, 0, 0)
            try:
                bpf(MAP_DELETE_BATCH, attr)
                return done + len(keys)
            except OSError as err:
                count = struct.unpack_from("<I", attr, 32)[0]
                done += count
                if err.errno != 2:  # no batch op here: the slow way for what is left
                    return done + sum(1 for k in keys[count:] if self.delete(k))
                keys = keys[count + 1:]  # keys[count] was already gone: skip it
        return done

    def keys(self) -> Iterator[bytes]:
        size = self.info.key_size
        cur: Optional[ctypes.Array] = None
        nxt = ctypes.create_string_buffer(size)
        while True:
            try:
                self._elem(MAP_GET_NEXT_KEY, cur, nxt)
            except OSError as err:
                if err.errno == 2:
                    return
                raise
            yield nxt.raw
            cur = ctypes.create_string_buffer(nxt.raw, size)

    def items(self) -> List[Tuple[bytes, bytes]]:
        out = []
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:  # deleted between the walk and the lookup
                out.append((key, value))
        return out

    def items_batch(self, chunk: int = 4096) -> List[Tuple[bytes, bytes]]:
        """Every entry via BPF_MAP_LOOKUP_BATCH (a few syscalls for the whole map); OSError where the
        kernel has no batch ops for this map type (EINVAL/ENOTSUPP)."""
        ks, vs = self.info.key_size, self.value_len
        chunk = max(1, min(chunk, self.info.max_entries or chunk))
        keys = ctypes.create_string_buffer(ks * chunk)
        values = ctypes.create_string_buffer(vs * chunk)
        in_batch = ctypes.create_string_buffer(max(ks, 8))
        out_batch = ctypes.create_string_buffer(max(ks, 8))
        out: List[Tuple[bytes, bytes]] = []
        first = True
        while True:
            attr = ctypes.create_string_buffer(56)
            struct.pack_into("<QQQQIIQQ", attr, 0, 0 if first else ctypes.addressof(in_batch),
                             ctypes.addressof(out_batch), ctypes.addressof(keys),
                             ctypes.addressof(values), chunk, self.fd, 0, 0)
            done = False
            try:
                bpf(MAP_LOOKUP_BATCH, attr)
            except OSError as err:
                if err.errno != 2:  # ENOENT: the last (possibly partial) batch
                    raise
                done = True
            count = struct.unpack_from("<I", attr, 32)[0]
            kraw, vraw = keys.raw, values.raw
            out.extend((kraw[i * ks:(i + 1) * ks], vraw[i * vs:(i + 1) * vs]) for i in range(count))
            if done:
                return out
            ctypes.memmove(in_batch, out_batch, len(out_batch))
            first = False


# ------------------------------------------------------------------------------ perf rings
class PerfAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
                ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
                ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64),
                ("wakeup", ctypes.c_uint32), ("bp_type", ctypes.c_uint32),
                ("config1", ctypes.c_uint64), ("config2", ctypes.c_uint64),
                ("rest", ctypes.c_uint8 * 56)]  # the attr is 128 bytes (PERF_ATTR_SIZE_VER7)


def perf_event_open(attr: PerfAttr, pid: int, cpu: int) -> int:
    attr.size = ctypes.sizeof(PerfAttr)
    return _check(_libc.syscall(NR_PERF_EVENT_OPEN, ctypes.byref(attr), ctypes.c_int(pid),
                                ctypes.c_int(cpu), ctypes.c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC)))


def _ioctl(fd: int, req: int, arg: int = 0) -> None:
    _check(_libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(req), ctypes.c_ulong(arg)))


class PerfRing:
    """One CPU's BPF output ring: ``read(on_sample, on_lost)`` consumes every record written so far."""

    def __init__(self, cpu: int, pages: int):
        attr = PerfAttr(type=PERF_TYPE_SOFTWARE, config=PERF_COUNT_SW_BPF_OUTPUT, sample_period=1,
                        sample_type=PERF_SAMPLE_RAW, flags=_WATERMARK,
                        wakeup=max(PAGE_SIZE, pages * PAGE_SIZE // 4))
        self.cpu = cpu
        self.fd = perf_event_open(attr, -1, cpu)
        self.size = pages * PAGE_SIZE
        try:
            self.mm = mmap.mmap(self.fd, PAGE_SIZE + self.size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
            _ioctl(self.fd, PERF_EVENT_IOC_ENABLE)
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, on_sample: Callable[[int, bytes], None], on_lost: Callable[[int], None]) -> int:
        mm, size, cpu = self.mm, self.size, self.cpu
        head = struct.unpack_from("<Q", mm, 1024)[0]  # data_head
        tail = struct.unpack_from("<Q", mm, 1032)[0]  # data_tail
        length = head - tail
        if length <= 0:
            return 0
        start = PAGE_SIZE + tail % size
        if tail % size + length <= size:  # what was written since, copied out once
            buf = mm[start:start + length]
        else:
            buf = mm[start:PAGE_SIZE + size] + mm[PAGE_SIZE:PAGE_SIZE + (tail % size + length - size)]
        unpack = struct.unpack_from
        pos = n = 0
        while pos + 8 <= length:
            rtype, _misc, rsize = unpack("<IHH", buf, pos)
            if rsize < 8 or pos + rsize > length:
                break  # torn ring: give up on this read rather than loop
            if rtype == PERF_RECORD_SAMPLE:
                raw_len = unpack("<I", buf, pos + 8)[0]
                on_sample(cpu, buf[pos + 12:pos + 12 + min(raw_len, rsize - 12)])
                n += 1
            elif rtype == PERF_RECORD_LOST and rsize >= 24:
                on_lost(unpack("<Q", buf, pos + 16)[0])
            pos += rsize
        struct.pack_into("<Q", mm, 1032, tail + pos)
        return n

    def close(self) -> None:
        try:
            self.mm.close()
        finally:
            os.close(self.fd)


# --------------------------------------------------------------------------- u/kprobes
def _pmu(name: str, sys_root: str = "/sys") -> Tuple[int, int]:
    """(PMU type, retprobe config bit) of the ``uprobe``/``kprobe`` perf PMU; OSError when absent."""
    base = os.path.join(sys_root, "bus/event_source/devices", name)
    with open(os.path.join(base, "type"), encoding="ascii") as fh:
        pmu = int(fh.read().strip())
    bit = 0
    try:
        with open(os.path.join(base, "format/retprobe"), encoding="ascii") as fh:
            bit = int(fh.read().strip().split(":")[1])  # "config:0"
    except (OSError, ValueError, IndexError):
        pass
    return pmu, bit


def attach_probe(kind: str, prog_fd: int, target: str, offset: int = 0, retprobe: bool = False,
                 pid: int = -1, sys_root: str = "/sys") -> int:
    """Attach ``prog_fd`` to a uprobe (``target`` = file, ``offset`` into it) or kprobe (``target`` =
    kernel function); returns the perf event fd that holds the attachment (close it to detach)."""
    pmu, bit = _pmu(kind, sys_root)
    name = ctypes.create_string_buffer(target.encode())
    attr = PerfAttr(type=pmu, sample_period=1, wakeup=1, config=(1 << bit) if retprobe else 0,
                    config1=ctypes.addressof(name), config2=offset)
    fd = perf_event_open(attr, pid, 0 if pid == -1 else -1)
    try:
        _ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        _ioctl(fd, PERF_EVENT_IOC_ENABLE)
    except BaseException:
        os.close(fd)
        raise
    return fd


# ------------------------------------------------------------------ feature checks by loading
PROG_LOAD, RAW_TRACEPOINT_OPEN = 5, 17
PROG_TYPE_KPROBE, PROG_TYPE_TRACING = 2, 26
ATTACH_TRACE_FENTRY = 24
_RETURN_ZERO = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])  # r0 = 0; exit


def kernel_version_code(release: str) -> int:
    """LINUX_VERSION_CODE of ``uname -r`` ("6.18.44-fc" -> 0x06122c); kprobe programs need it on
    kernels before 5.0."""
    parts = []
    for item in release.split("-")[0].split(".")[:3]:
        digits = "".join(ch for ch in item if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    major, minor, patch = (parts + [0, 0, 0])[:3]
    return (major << 16) + (minor << 8) + min(patch, 255)


def prog_load(prog_type: int, attach_type: int = 0, btf_id: int = 0, kern_version: int = 0) -> int:
    """Load the two-instruction "return 0" program of ``prog_type``; its fd, or OSError with the
    kernel's errno (and the verifier's first line in the message)."""
    insns = ctypes.create_string_buffer(_RETURN_ZERO, len(_RETURN_ZERO))
    license = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQIIQII", attr, 0, prog_type, 2, ctypes.addressof(insns),
                     ctypes.addressof(license), 1, len(log), ctypes.addressof(log), kern_version, 0)
    struct.pack_into("<16s", attr, 48, b"asbuilt_check")
    struct.pack_into("<I", attr, 68, attach_type)
    struct.pack_into("<I", attr, 108, btf_id)
    try:
        return bpf(PROG_LOAD, attr)
    except OSError as err:
        said = log.value.decode("utf-8", "replace").strip().splitlines()
        raise OSError(err.errno, err.strerror + (f" ({said[-1]})" if said else "")) from None


def raw_tracepoint_open(prog_fd: int, name: Optional[str] = None) -> int:
    """Attach a raw tracepoint, or a tracing (fentry/fexit) program when ``name`` is None."""
    buf = ctypes.create_string_buffer(name.encode()) if name else None
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<QI", attr, 0, ctypes.addressof(buf) if buf is not None else 0, prog_fd)
    return bpf(RAW_TRACEPOINT_OPEN, attr)


_BTF_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}  # kind -> fixed bytes after the common header
_BTF_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}  # kind -> bytes per vlen item


def btf_func_id(path: str, name: str) -> int:
    """The BTF type id of kernel function ``name`` in ``path`` (``/sys/kernel/btf/vmlinux``);
    LookupError when absent, ValueError when the file is not BTF."""
    with open(path, "rb") as fh:
        data = fh.read()
    return _btf_func_id(data, name)


def _btf_func_id(data: bytes, name: str) -> int:
    if len(data) < 24 or struct.unpack_from("<H", data)[0] != 0xEB9F:
        raise ValueError("not BTF")
    hdr_len, type_off, type_len, str_off, _str_len = struct.unpack_from("<IIIII", data, 4)
    strings = hdr_len + str_off
    want = name.encode() + b"\0"
    pos, end, type_id = hdr_len + type_off, hdr_len + type_off + type_len, 1
    while pos + 12 <= end:
        name_off, info = struct.unpack_from("<II", data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if kind == 12 and data[strings + name_off:strings + name_off + len(want)] == want:
            return type_id
        pos += 12 + _BTF_EXTRA.get(kind, 0) + vlen * _BTF_PER_MEMBER.get(kind, 0)
        type_id += 1
    raise LookupError(f"{name} not in the kernel's BTF")


# ------------------------------------------------------------------------------ ELF symbols
STT_FUNC, STT_GNU_IFUNC = 2, 10


def elf_symbol_offset(path: str, symbol: str) -> int:
    """The file offset of function ``symbol`` in the ELF64 little-endian ``path`` (what a uprobe
    needs), from ``.dynsym`` then ``.symtab``; LookupError when absent, ValueError when not ELF64."""
    st = os.stat(path)
    return _cached_offset(path, st.st_dev, st.st_ino, st.st_mtime_ns, symbol)


@functools.lru_cache(maxsize=64)
def _cached_offset(path: str, dev: int, ino: int, mtime_ns: int, symbol: str) -> int:
    """One read and parse per (file version, symbol): a uprobe and its uretprobe, every library."""
    with open(path, "rb") as fh:
        data = fh.read()
    return _symbol_offset(data, symbol)


def _symbol_offset(data: bytes, symbol: str) -> int:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (e_phoff, e_shoff) = struct.unpack_from("<QQ", data, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", data, 0x36)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)]
    want = symbol.encode()
    value = None
    for sh_type in (11, 2):  # SHT_DYNSYM, then SHT_SYMTAB
        for sec in sections:
            if sec[1] != sh_type:
                continue
            strtab = sections[sec[6]]  # sh_link
            str_off = strtab[4]
            for i in range(sec[5] // 24):
                st_name, st_info, _other, st_shndx, st_value, _size = struct.unpack_from(
                    "<IBBHQQ", data, sec[4] + i * 24)
                if st_shndx == 0 or st_value == 0 or (st_info & 0xF) not in (STT_FUNC, STT_GNU_IFUNC):
                    continue
                start = str_off + st_name
                if data[start:start + len(want) + 1] != want + b"\0":
                    continue
                if st_info & 0xF == STT_GNU_IFUNC:
                    raise LookupError(f"{symbol} is an IFUNC (not probed)")
                value = st_value
                break
            if value is not None:
                break
        if value is not None:
            break
    if value is None:
        raise LookupError(f"symbol {symbol} not found")
    for i in range(e_phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == 1 and p_vaddr <= value < p_vaddr + p_filesz:  # PT_LOAD
            return value - p_vaddr + p_offset
    return value


__all__ = ["RawMap", "PerfRing", "attach_probe", "elf_symbol_offset", "possible_cpus", "online_cpus",
           "cpu_list", "map_info"]
