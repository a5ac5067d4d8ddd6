"""The short-lived process that compiles eBPF C with bcc and hands the loaded objects to the agent.

Run as ``python -m asbuilt.probes.ebpf.compile_child FD`` by :mod:`.bpfobject`; ``FD`` is its end of
a ``SOCK_SEQPACKET`` socketpair. It reads one JSON request,
``{"op": "load", "text": C, "cflags": [...], "load": [[function, "KPROBE"|...], ...]}``, compiles
``text`` (bcc attaches every ``TRACEPOINT_PROBE``/``RAW_TRACEPOINT_PROBE``/``KFUNC_PROBE`` while
loading), loads the listed functions for attaching later (uprobes, kprobes), and answers with a
JSON description (maps with their key/leaf/event ctypes layouts, programs, attachments) whose
file descriptors travel with it as ``SCM_RIGHTS``.

Then it exits with ``os._exit`` (no bcc clean-up: the attachments now belong to the agent, which
holds the descriptors; the kernel keeps a program attached while any descriptor of its link is open).
The agent never maps libbcc/LLVM, which is ~75 MB resident before the first program and ~40 MB more
per compiled object.
"""
from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
from typing import List

MAX_MSG = 1 << 20
FDS_PER_MSG = 200  # SCM_MAX_FD is 253


def typespec(t) -> dict:
    """A JSON description of a ctypes type, enough to rebuild it without bcc (see bpfobject.build_type)."""
    if isinstance(t, type) and issubclass(t, (ctypes.Structure, ctypes.Union)):
        fields = []
        for f in t._fields_:
            item = [f[0], typespec(f[1])]
            if len(f) > 2:
                item.append(f[2])
            fields.append(item)
        return {"kind": "union" if issubclass(t, ctypes.Union) else "struct", "fields": fields,
                "pack": getattr(t, "_pack_", 0), "anonymous": list(getattr(t, "_anonymous_", ())),
                "size": ctypes.sizeof(t)}
    if isinstance(t, type) and issubclass(t, ctypes.Array):
        return {"kind": "array", "of": typespec(t._type_), "n": t._length_, "size": ctypes.sizeof(t)}
    for name in ("c_char", "c_byte", "c_ubyte", "c_short", "c_ushort", "c_int", "c_uint", "c_long",
                 "c_ulong", "c_longlong", "c_ulonglong", "c_bool", "c_void_p", "c_char_p", "c_float",
                 "c_double", "c_int8", "c_uint8", "c_int16", "c_uint16", "c_int32", "c_uint32",
                 "c_int64", "c_uint64"):
        if t is getattr(ctypes, name):
            return {"kind": "prim", "name": name, "size": ctypes.sizeof(t)}
    for base in t.__mro__:  # bcc's own subclasses of primitives
        if base.__module__ == "ctypes" and hasattr(ctypes, base.__name__) and base.__name__.startswith("c_"):
            return {"kind": "prim", "name": base.__name__, "size": ctypes.sizeof(t)}
    raise TypeError(f"cannot describe ctypes type {t!r}")


def _load(req: dict):
    from bcc import BPF, lib  # the one place bcc is imported
    from bcc.table import PerfEventArray, _get_event_class

    bpf = BPF(text=req["text"].encode(), cflags=list(req.get("cflags") or []))
    fds: List[int] = []
    maps = {}
    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    for i in range(lib.bpf_num_tables(bpf.module)):
        name = lib.bpf_table_name(bpf.module, i)
        table = bpf.get_table(name)
        leaf = getattr(table, "sLeaf", table.Leaf)  # per-CPU tables: bcc's Leaf is the per-CPU array
        entry = {"fd": len(fds), "key": typespec(table.Key), "leaf": typespec(leaf)}
        if isinstance(table, PerfEventArray):
            try:
                entry["event"] = typespec(_get_event_class(table))
            except (Exception, SystemExit):  # bcc exits on a field type it cannot map
                pass
        fds.append(table.map_fd)
        maps[name.decode()] = entry
    progs = {}
    for fn_name, kind in req.get("load") or []:
        fn = bpf.load_func(fn_name.encode(), getattr(BPF, kind))
        progs[fn_name] = len(fds)
        fds.append(fn.fd)
    links = {}
    for attr in ("tracepoint_fds", "raw_tracepoint_fds", "kfunc_entry_fds", "kfunc_exit_fds", "lsm_fds"):
        for name, fd in getattr(bpf, attr, {}).items():
            name = name.decode() if isinstance(name, bytes) else str(name)
            links[f"{attr[:-4]}:{name}"] = len(fds)
            fds.append(fd)
    return {"maps": maps, "progs": progs, "links": links, "nfds": len(fds)}, fds


def send(sock: socket.socket, reply: dict, fds: List[int]) -> None:
    data = json.dumps(reply).encode()
    chunks = [fds[i:i + FDS_PER_MSG] for i in range(0, len(fds), FDS_PER_MSG)] or [[]]
    socket.send_fds(sock, [data], chunks[0])
    for chunk in chunks[1:]:
        socket.send_fds(sock, [b"fds"], chunk)


def main(argv: List[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    req = json.loads(sock.recv(MAX_MSG))
    try:
        if req.get("op") != "load":
            raise ValueError(f"unknown request {req.get('op')!r}")
        reply, fds = _load(req)
    except BaseException as err:  # bcc raises bare Exception; one line goes back to the agent
        text = str(err).strip()
        reply, fds = {"error": text.splitlines()[0] if text else type(err).__name__}, []
    sys.stdout.flush()
    sys.stderr.flush()
    send(sock, reply, fds)
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv)
    except BaseException as exc:  # a broken request: one line on stderr, no bcc clean-up
        print(f"compile child: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    sys.stderr.flush()
    os._exit(code)
