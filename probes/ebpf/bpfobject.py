"""A loaded eBPF object held by file descriptors: the part of bcc's ``BPF`` API the probes use, no bcc.

:func:`compile_object` runs :mod:`.compile_child` (bcc, LLVM) in a child process, receives the
descriptors of the maps, programs and tracepoint attachments over a unix socket, and returns a
:class:`BPFObject`. It answers what the probes ask of a bcc ``BPF``: ``obj[b"map"]`` → :class:`Table`
(``Key``/``Leaf`` ctypes types, ``[]``, ``[]=``, ``del``, ``items()``, ``items_lookup_batch()``,
``open_perf_buffer()``, ``event()``), ``perf_buffer_poll()``, ``attach_uprobe()``/``attach_uretprobe()``/
``attach_kprobe()`` and ``cleanup()`` (closing the descriptors detaches everything at once).

Perf buffer callbacks receive ``(cpu, data: bytes, size)``.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import weakref
from typing import Callable, Dict, List, Optional, Tuple

from . import bpfsys

CHILD_TIMEOUT = 120.0


class ChildError(Exception):
    """The compile child failed: the message is its one line."""


# ------------------------------------------------------------------------------ types
def build_type(spec: dict):
    """A ctypes type from :func:`.compile_child.typespec`'s description."""
    kind = spec["kind"]
    if kind == "prim":
        t = getattr(ctypes, spec["name"])
    elif kind == "array":
        t = build_type(spec["of"]) * spec["n"]
    else:
        fields = [tuple([f[0], build_type(f[1])] + list(f[2:])) for f in spec["fields"]]
        ns: Dict[str, object] = {}
        if spec.get("pack"):
            ns["_pack_"] = spec["pack"]
        if spec.get("anonymous"):
            ns["_anonymous_"] = spec["anonymous"]
        ns["_fields_"] = fields
        base = ctypes.Union if kind == "union" else ctypes.Structure
        t = type("bpf_" + kind, (base,), ns)
    if "size" in spec and ctypes.sizeof(t) != spec["size"]:
        raise ChildError(f"ctypes layout mismatch: {ctypes.sizeof(t)} != {spec['size']} bytes")
    return t


def _raw(value, size: int) -> bytes:
    raw = bytes(value) if not isinstance(value, (bytes, bytearray)) else bytes(value)
    if len(raw) != size:
        raise ValueError(f"{len(raw)} bytes where the map wants {size}")
    return raw


class Table:
    """One map of a :class:`BPFObject`, shaped like bcc's table classes."""

    def __init__(self, owner: "BPFObject", name: str, fd: int, spec: dict):
        self.owner = owner
        self.name = name
        self.raw = bpfsys.RawMap(fd, owner.ncpus)
        self.Key = build_type(spec["key"])
        self.Leaf = build_type(spec["leaf"])
        self._event = build_type(spec["event"]) if spec.get("event") else None
        self.rings: List[bpfsys.PerfRing] = []
        self._callback: Optional[Callable] = None
        self._lost: Optional[Callable] = None

    # --- values
    def _key(self, key) -> bytes:
        return _raw(key, self.raw.info.key_size)

    def _leaf(self, raw: bytes):
        if not self.raw.percpu:
            return self.Leaf.from_buffer_copy(raw[:ctypes.sizeof(self.Leaf)])
        slot = self.raw.slot
        out = []
        for cpu in range(self.raw.ncpus):
            leaf = self.Leaf.from_buffer_copy(raw[cpu * slot:cpu * slot + ctypes.sizeof(self.Leaf)])
            out.append(leaf.value if hasattr(leaf, "value") and not isinstance(
                leaf, (ctypes.Structure, ctypes.Union, ctypes.Array)) else leaf)
        return out

    def __getitem__(self, key):
        raw = self.raw.lookup(self._key(key))
        if raw is None:
            raise KeyError(key)
        return self._leaf(raw)

    def __setitem__(self, key, leaf) -> None:
        value = _raw(leaf, ctypes.sizeof(self.Leaf))
        if self.raw.percpu:
            value = (value + b"\0" * (self.raw.slot - len(value))) * self.raw.ncpus
        self.raw.update(self._key(key), value)

    def __delitem__(self, key) -> None:
        if not self.raw.delete(self._key(key)):
            raise KeyError(key)

    def _pairs(self, pairs: List[Tuple[bytes, bytes]]) -> list:
        return [(self.Key.from_buffer_copy(k), self._leaf(v)) for k, v in pairs]

    def items(self) -> list:
        return self._pairs(self.raw.items())

    def items_lookup_batch(self) -> list:
        """Every entry in a few syscalls (kernel 5.6+); raises OSError where batches are unsupported."""
        if self.raw.info.type in bpfsys.ARRAY_TYPES:
            raise OSError(22, "no batch lookups on arrays here")
        return self._pairs(self.raw.items_batch())

    def raw_items(self) -> List[Tuple[bytes, bytes]]:
        """Every entry as (key bytes, value bytes): batched where the kernel can, no ctypes objects
        (a drain that only needs what changed compares bytes instead of building ~10^5 structs)."""
        if self.raw.info.type not in bpfsys.ARRAY_TYPES:
            try:
                return self.raw.items_batch()
            except OSError:
                pass
        return self.raw.items()

    # --- perf buffers
    def event(self, data):
        if self._event is None:
            raise ValueError(f"map {self.name}: event layout unknown")
        raw = bytes(data)
        size = ctypes.sizeof(self._event)
        return self._event.from_buffer_copy(raw[:size] + b"\0" * max(0, size - len(raw)))

    def open_perf_buffer(self, callback: Callable, page_cnt: int = 8, lost_cb: Optional[Callable] = None) -> None:
        if page_cnt & (page_cnt - 1):
            raise ValueError("perf buffer page count must be a power of two")
        self._callback, self._lost = callback, lost_cb
        try:
            for cpu in bpfsys.online_cpus(self.owner.sys_root):
                ring = bpfsys.PerfRing(cpu, page_cnt)
                self.rings.append(ring)
                self.raw.update(bytes(ctypes.c_uint32(cpu)), bytes(ctypes.c_uint32(ring.fd)))
        except BaseException:
            self.close_rings()
            raise
        self.owner.buffers.append(self)

    def poll(self) -> int:
        cb = self._callback
        lost = self._lost or (lambda n: None)
        n = 0
        for ring in self.rings:
            n += ring.read(lambda cpu, data: cb(cpu, data, len(data)), lost)
        return n

    def close_rings(self) -> None:
        for ring in self.rings:
            try:
                ring.close()
            except OSError:
                pass
        self.rings = []


class BPFObject:
    """The descriptors of one loaded object; see the module docstring."""

    def __init__(self, reply: dict, fds: List[int], sys_root: str = "/sys"):
        self.sys_root = sys_root
        self.fds = list(fds)
        self.ncpus = bpfsys.possible_cpus(sys_root)
        self.buffers: List[Table] = []
        self.progs: Dict[str, int] = {k: fds[i] for k, i in reply.get("progs", {}).items()}
        self.links: Dict[str, int] = {k: fds[i] for k, i in reply.get("links", {}).items()}
        self.probe_fds: Dict[Tuple[str, str, str], int] = {}
        self.tables: Dict[str, Table] = {}
        _live.add(self)
        try:
            for name, spec in reply.get("maps", {}).items():
                self.tables[name] = Table(self, name, fds[spec["fd"]], spec)
        except BaseException:
            self.cleanup()
            raise

    def __getitem__(self, name) -> Table:
        key = name.decode() if isinstance(name, bytes) else name
        return self.tables[key]

    def perf_buffer_poll(self, timeout: int = -1) -> int:
        """Read every ring; with a timeout (ms), wait for data first (the rings wake at a quarter full)."""
        if timeout and self.buffers:
            fds = [r.fd for t in self.buffers for r in t.rings]
            try:
                select.select(fds, [], [], None if timeout < 0 else timeout / 1000.0)
            except (OSError, ValueError):
                pass
        return sum(t.poll() for t in self.buffers)

    # --- probes on functions
    def _prog(self, fn_name) -> int:
        name = fn_name.decode() if isinstance(fn_name, bytes) else fn_name
        if name not in self.progs:
            raise ValueError(f"function {name} was not loaded for attaching")
        return self.progs[name]

    def attach_uprobe(self, name=b"", sym=b"", fn_name=b"", pid: int = -1, retprobe: bool = False) -> None:
        path = name.decode() if isinstance(name, bytes) else name
        symbol = sym.decode() if isinstance(sym, bytes) else sym
        try:
            offset = bpfsys.elf_symbol_offset(path, symbol)
        except (OSError, LookupError, ValueError, IndexError, Exception) as err:
            raise ChildError(f"could not resolve {symbol} in {path}: {err}") from err
        fd = bpfsys.attach_probe("uprobe", self._prog(fn_name), path, offset, retprobe, pid, self.sys_root)
        self.probe_fds[("uprobe", path + (":ret" if retprobe else ""), symbol)] = fd

    def attach_uretprobe(self, name=b"", sym=b"", fn_name=b"", pid: int = -1) -> None:
        self.attach_uprobe(name=name, sym=sym, fn_name=fn_name, pid=pid, retprobe=True)

    def attach_kprobe(self, event=b"", fn_name=b"", retprobe: bool = False) -> None:
        function = event.decode() if isinstance(event, bytes) else event
        fd = bpfsys.attach_probe("kprobe", self._prog(fn_name), function, 0, retprobe, -1, self.sys_root)
        self.probe_fds[("kprobe", function, "ret" if retprobe else "")] = fd

    def _take_fds(self) -> List[int]:
        for table in self.buffers:
            table.close_rings()
        self.buffers = []
        fds = list(self.probe_fds.values()) + self.fds
        self.probe_fds = {}
        self.fds = []
        return fds

    def cleanup(self) -> None:
        """Close every descriptor: the kernel detaches the programs and frees the maps."""
        close_fds(self._take_fds())


_live: "weakref.WeakSet[BPFObject]" = weakref.WeakSet()


def close_fds(fds: List[int]) -> None:
    """Close descriptors, many at a time: each tracepoint's detach waits for an RCU grace period
    in the kernel (~70 ms here), so ~50 one after the other take ~3.5 s; in threads ~2 s."""
    def close(chunk: List[int]) -> None:
        for fd in chunk:
            try:
                os.close(fd)
            except OSError:
                pass

    if len(fds) < 4:
        close(fds)
        return
    chunks = [fds[i::16] for i in range(min(16, len(fds)))]
    threads = [threading.Thread(target=close, args=(chunk,), daemon=True) for chunk in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def detach_all() -> int:
    """Close the descriptors of every live object at once (the daemon's stop); returns how many."""
    fds = [fd for obj in list(_live) for fd in obj._take_fds()]
    close_fds(fds)
    return len(fds)


# ------------------------------------------------------------------------------ the child
class Pending:
    """A compile child under way: :meth:`result` waits for its answer (reply, descriptors)."""

    def __init__(self, request: dict):
        self.peak_rss_mb = 0.0
        self.parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.err_file = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __package__ + ".compile_child", str(child.fileno())],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, stdout=self.err_file,
                stderr=self.err_file)
            self.parent.sendall(json.dumps(request).encode())
        except BaseException:
            self.parent.close()
            self.err_file.close()
            raise
        finally:
            child.close()

    def _said(self) -> str:
        self.err_file.seek(0)
        lines = [ln.strip() for ln in self.err_file.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    def result(self) -> Tuple[dict, List[int]]:
        fds: List[int] = []
        try:
            self.parent.settimeout(CHILD_TIMEOUT)
            msg, got, _flags, _addr = socket.recv_fds(self.parent, 1 << 20, 253)
            fds.extend(got)
            if not msg:
                self.proc.wait(timeout=CHILD_TIMEOUT)
                raise ChildError(self._said() or f"compile child exited {self.proc.returncode}")
            reply = json.loads(msg)
            while len(fds) < reply.get("nfds", 0):
                _m, more, _f, _a = socket.recv_fds(self.parent, 16, 253)
                if not more:
                    raise ChildError("compile child sent fewer descriptors than it announced")
                fds.extend(more)
            self._reap()
            if "error" in reply:
                raise ChildError(reply["error"] or self._said() or "failed")
            return reply, fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        finally:
            self.close()

    def _reap(self) -> None:
        """Wait for the child (it exits right after answering) and keep its peak RSS for the log."""
        try:
            _pid, status, usage = os.wait4(self.proc.pid, 0)
        except ChildProcessError:
            return
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.peak_rss_mb = usage.ru_maxrss / 1024

    def close(self) -> None:
        """Stop the child if it still runs (an abandoned prefetch) and release everything."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.parent.close()
        self.err_file.close()


def _run_child(request: dict) -> Tuple[dict, List[int]]:
    return Pending(request).result()


def load_request(text: str, cflags: Optional[List[str]] = None,
                 load: Optional[List[Tuple[str, str]]] = None) -> dict:
    return {"op": "load", "text": text, "cflags": list(cflags or []), "load": [list(x) for x in (load or [])]}


def compile_object(text: str, cflags: Optional[List[str]] = None,
                   load: Optional[List[Tuple[str, str]]] = None, sys_root: str = "/sys") -> BPFObject:
    """Compile and load ``text`` in a child; ``load`` lists (function, bcc prog type name such as
    "KPROBE") to keep for attach_uprobe/attach_kprobe. Raises ChildError (one line) on failure."""
    reply, fds = _run_child(load_request(text, cflags, load))
    return BPFObject(reply, fds, sys_root)
