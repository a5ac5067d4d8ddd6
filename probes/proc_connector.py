"""Process events (fork, exec, exit, uid, comm) from the kernel's proc connector, without eBPF.

The fallback for ``asbuilt trace`` where eBPF cannot run (old kernels such as CentOS 7's 3.10,
no privileges for bpf, ``--no-ebpf``). Kernel documentation: ``Documentation/driver-api/connector.rst``
and ``drivers/connector/cn_proc.c``; the message layouts are uapi (``linux/connector.h``,
``linux/cn_proc.h``) and stable. Stdlib ``socket`` + ``struct`` only.

Socket: ``socket(AF_NETLINK, SOCK_DGRAM, NETLINK_CONNECTOR=11)`` bound to multicast group
``CN_IDX_PROC`` (1); needs CAP_NET_ADMIN, and the kernel only serves listeners in the initial user
and pid namespaces (elsewhere it drops the subscription silently, hence the acknowledgement check).
Every datagram is one or more netlink messages, each aligned to 4 bytes, all native-endian::

    struct nlmsghdr {               /* 16 bytes */
        __u32 nlmsg_len;            /* header + payload */
        __u16 nlmsg_type;           /* NLMSG_DONE (3) for connector messages */
        __u16 nlmsg_flags;
        __u32 nlmsg_seq;
        __u32 nlmsg_pid;
    };
    struct cn_msg {                 /* linux/connector.h, 20 bytes */
        struct cb_id { __u32 idx; __u32 val; } id;   /* CN_IDX_PROC=1, CN_VAL_PROC=1 */
        __u32 seq;
        __u32 ack;
        __u16 len;                  /* length of data[] */
        __u16 flags;
        __u8  data[];
    };
    struct proc_event {             /* linux/cn_proc.h, 16-byte header + union */
        __u32 what;                 /* NONE=0 FORK=1 EXEC=2 UID=4 GID=0x40 SID=0x80 PTRACE=0x100
                                       COMM=0x200 COREDUMP=0x40000000 EXIT=0x80000000 */
        __u32 cpu;
        __u64 timestamp_ns;         /* ktime_get_ns(): CLOCK_MONOTONIC */
        union {
            struct { __u32 err; } ack;                                     /* NONE */
            struct { pid parent_pid, parent_tgid, child_pid, child_tgid; } fork;
            struct { pid process_pid, process_tgid; } exec;                /* also sid */
            struct { pid process_pid, process_tgid; __u32 ruid|rgid, euid|egid; } id;
            struct { pid process_pid, process_tgid, tracer_pid, tracer_tgid; } ptrace;
            struct { pid process_pid, process_tgid; char comm[16]; } comm;
            struct { pid process_pid, process_tgid, parent_pid, parent_tgid; } coredump;
            struct { pid process_pid, process_tgid; __u32 exit_code, exit_signal;
                     pid parent_pid, parent_tgid; } exit;   /* parent_* since 4.x: optional */
        } event_data;
    };

Subscribing sends ``cn_msg{id={1,1}, seq, ack, len=4}`` + ``__u32 PROC_CN_MCAST_LISTEN (1)``; the
kernel answers (to the whole group) with a PROC_EVENT_NONE carrying ``err`` and ``ack + 1``.
``exit_code`` is the raw wait status (``task->exit_code``): ``code << 8`` for an exit, the signal
number (| 0x80 for a core dump) for a kill; ``exit_signal`` is the signal sent to the parent.

Pids are those of the initial pid namespace. A recv that fails with ENOBUFS means the socket's
receive queue overflowed and events were lost: counted as an overrun (``lost_events``).
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Set, Union

from ..agent.errors import AsbuiltError, Denied, Vanished, from_oserror
from ..agent.model import Exec, ProbeRun
from .base import Context, Probe
from .procfs.pids import descendants, read_parents

log = logging.getLogger(__name__)

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2

NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4

PROC_EVENT_NONE = 0x00000000
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_UID = 0x00000004
PROC_EVENT_GID = 0x00000040
PROC_EVENT_SID = 0x00000080
PROC_EVENT_PTRACE = 0x00000100
PROC_EVENT_COMM = 0x00000200
PROC_EVENT_COREDUMP = 0x40000000
PROC_EVENT_EXIT = 0x80000000

_NLMSGHDR = struct.Struct("=IHHII")  # 16
_CN_MSG = struct.Struct("=IIIIHH")  # 20
_EV_HEADER = struct.Struct("=IIQ")  # 16
_PIDS2 = struct.Struct("=ii")
_PIDS4 = struct.Struct("=iiii")
_ID = struct.Struct("=iiII")
_COMM = struct.Struct("=ii16s")
_EXIT_OLD = struct.Struct("=iiII")  # before parent_pid/parent_tgid were added
_EXIT = struct.Struct("=iiIIii")
_ACK = struct.Struct("=I")
_OP = struct.Struct("=I")


def _align4(n: int) -> int:
    return (n + 3) & ~3


# ------------------------------------------------------------------------------------ events
@dataclass
class Event:
    """Header common to every proc connector event."""

    cpu: int
    timestamp_ns: int  # CLOCK_MONOTONIC


@dataclass
class AckEvent(Event):
    """PROC_EVENT_NONE: the answer to a (un)subscribe; ``ack`` is the request's ack + 1."""

    err: int
    seq: int
    ack: int


@dataclass
class ForkEvent(Event):
    parent_pid: int
    parent_tgid: int
    child_pid: int
    child_tgid: int

    @property
    def is_thread(self) -> bool:
        return self.child_pid != self.child_tgid


@dataclass
class ExecEvent(Event):
    pid: int
    tgid: int


@dataclass
class UidEvent(Event):
    pid: int
    tgid: int
    ruid: int
    euid: int


@dataclass
class GidEvent(Event):
    pid: int
    tgid: int
    rgid: int
    egid: int


@dataclass
class CommEvent(Event):
    pid: int
    tgid: int
    comm: str


@dataclass
class ExitEvent(Event):
    pid: int
    tgid: int
    exit_code: int  # raw wait status
    exit_signal: int  # signal sent to the parent (normally SIGCHLD)
    parent_pid: int = 0  # 0 on kernels before the field existed
    parent_tgid: int = 0

    @property
    def code(self) -> Optional[int]:
        """The exit status when the process exited, None when a signal killed it."""
        return (self.exit_code >> 8) & 0xFF if self.exit_code & 0x7F == 0 else None

    @property
    def signal(self) -> Optional[int]:
        """The signal that killed the process, None when it exited."""
        sig = self.exit_code & 0x7F
        return sig if sig else None


@dataclass
class OtherEvent(Event):
    """SID, PTRACE, COREDUMP or a kind this parser does not know: kept by number only."""

    what: int
    pid: int = 0
    tgid: int = 0


@dataclass
class ParseStats:
    """What :func:`parse_events` saw: messages parsed, skipped as malformed, ignored (not ours)."""

    messages: int = 0
    malformed: int = 0
    ignored: int = 0


def parse_events(buf: bytes, stats: Optional[ParseStats] = None) -> List[Event]:
    """Parse one datagram's netlink messages into events; pure, never raises on bad input.

    Truncated or malformed messages are skipped and counted in ``stats.malformed``; messages that
    are well-formed but not proc events (netlink control messages, other connector users) are
    counted in ``stats.ignored``. A broken netlink header ends the datagram (no resync possible).
    """
    st = stats if stats is not None else ParseStats()
    events: List[Event] = []
    view = memoryview(bytes(buf))
    off, end = 0, len(view)
    while off < end:
        if end - off < _NLMSGHDR.size:
            st.malformed += 1
            break
        nl_len, nl_type, _flags, _seq, _pid = _NLMSGHDR.unpack_from(view, off)
        if nl_len < _NLMSGHDR.size or nl_len > end - off:
            st.malformed += 1
            break
        payload = view[off + _NLMSGHDR.size: off + nl_len]
        off += _align4(nl_len)
        if nl_type in (NLMSG_NOOP, NLMSG_ERROR, NLMSG_OVERRUN):
            st.ignored += 1
            continue
        st.messages += 1
        event = _parse_cn(payload, st)
        if event is not None:
            events.append(event)
    return events


def _parse_cn(payload: memoryview, st: ParseStats) -> Optional[Event]:
    if len(payload) < _CN_MSG.size:
        st.malformed += 1
        return None
    idx, val, seq, ack, dlen, _flags = _CN_MSG.unpack_from(payload, 0)
    if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC):
        st.ignored += 1
        return None
    data = payload[_CN_MSG.size:]
    if dlen > len(data) or dlen < _EV_HEADER.size:
        st.malformed += 1
        return None
    data = data[:dlen]
    what, cpu, ts = _EV_HEADER.unpack_from(data, 0)
    body = data[_EV_HEADER.size:]
    try:
        return _parse_body(what, cpu, ts, body, seq, ack)
    except struct.error:
        st.malformed += 1
        return None


def _parse_body(what: int, cpu: int, ts: int, body: memoryview, seq: int, ack: int) -> Event:
    if what == PROC_EVENT_NONE:
        (err,) = _ACK.unpack_from(body, 0)
        return AckEvent(cpu, ts, err, seq, ack)
    if what == PROC_EVENT_FORK:
        return ForkEvent(cpu, ts, *_PIDS4.unpack_from(body, 0))
    if what == PROC_EVENT_EXEC:
        return ExecEvent(cpu, ts, *_PIDS2.unpack_from(body, 0))
    if what == PROC_EVENT_UID:
        return UidEvent(cpu, ts, *_ID.unpack_from(body, 0))
    if what == PROC_EVENT_GID:
        return GidEvent(cpu, ts, *_ID.unpack_from(body, 0))
    if what == PROC_EVENT_COMM:
        pid, tgid, raw = _COMM.unpack_from(body, 0)
        return CommEvent(cpu, ts, pid, tgid, raw.split(b"\0", 1)[0].decode("utf-8", "replace"))
    if what == PROC_EVENT_EXIT:
        if len(body) >= _EXIT.size:
            return ExitEvent(cpu, ts, *_EXIT.unpack_from(body, 0))
        return ExitEvent(cpu, ts, *_EXIT_OLD.unpack_from(body, 0))
    pid, tgid = _PIDS2.unpack_from(body, 0) if len(body) >= _PIDS2.size else (0, 0)
    return OtherEvent(cpu, ts, what, pid, tgid)


def build_mcast_message(op: int, seq: int = 0, ack: int = 0, port: int = 0) -> bytes:
    """A netlink message carrying cn_msg{CN_IDX_PROC} + ``op`` (PROC_CN_MCAST_LISTEN/IGNORE)."""
    data = _OP.pack(op)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, seq, ack, len(data), 0) + data
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, seq, port) + cn


# ------------------------------------------------------------------------------ /proc helpers
def parse_stat_ppid(text: str) -> int:
    """The ppid (4th field) of a ``/proc/PID/stat`` line; the comm may hold spaces and parens.

    Raises ValueError on malformed text.
    """
    _, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 2:
        raise ValueError("malformed /proc/PID/stat")
    return int(fields[1])


def read_exe(proc_root: str, pid: int) -> str:
    """The executable of ``pid`` (readlink of /proc/PID/exe); Vanished/Denied on failure."""
    path = os.path.join(proc_root, str(pid), "exe")
    try:
        return os.readlink(path)
    except OSError as err:
        raise from_oserror(err, path) from err


def read_cmdline(proc_root: str, pid: int) -> List[str]:
    """argv of ``pid`` from /proc/PID/cmdline; empty (a zombie or kernel thread) raises Vanished."""
    path = os.path.join(proc_root, str(pid), "cmdline")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise from_oserror(err, path) from err
    if not raw:
        raise Vanished(f"{path}: empty")
    return parse_cmdline(raw)


def read_comm(proc_root: str, pid: int) -> str:
    """The command name of ``pid`` (/proc/PID/comm, still readable while it is a zombie)."""
    path = os.path.join(proc_root, str(pid), "comm")
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace").rstrip("\n")
    except OSError as err:
        raise from_oserror(err, path) from err


def parse_cmdline(raw: bytes) -> List[str]:
    """NUL-separated argv (trailing NUL optional) into strings (pure)."""
    if not raw:
        return []
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")]


# ------------------------------------------------------------------------------ observations
@dataclass
class ProcFork:
    """A traced process started a new process (threads are not reported)."""

    pid: int
    ppid: int
    time: float


@dataclass
class ProcExec:
    """A traced process executed a program; path/argv read from /proc when the event arrived.

    ``complete`` is False when the process was already gone (or unreadable) by then: ``comm``
    (from /proc/PID/comm while it is a zombie, or a prctl COMM event) is then the only name known.
    """

    pid: int
    ppid: int
    path: str
    argv: List[str]
    time: float
    comm: str = ""
    complete: bool = True
    detail: str = ""


@dataclass
class ProcExit:
    pid: int
    ppid: int
    exit_code: Optional[int]  # exit status, None when killed by a signal
    signal: Optional[int]  # killing signal, None when it exited
    time: float


@dataclass
class ProcUid:
    pid: int
    ruid: int
    euid: int
    time: float


Observation = Union[ProcFork, ProcExec, ProcExit, ProcUid]


def to_execs(observations: Iterable[Observation]) -> List[Exec]:
    """Model ``Exec`` entries from exec observations, each given the exit code of its process.

    A process that exec'd twice yields two entries; the exit code goes to the last one. A process
    killed by a signal gets ``-signal`` (the subprocess convention).
    """
    execs: List[Exec] = []
    last: Dict[int, Exec] = {}
    for ob in observations:
        if isinstance(ob, ProcExec):
            ex = Exec(pid=ob.pid, ppid=ob.ppid, path=ob.path or ob.comm, argv=list(ob.argv), time=ob.time)
            execs.append(ex)
            last[ob.pid] = ex
        elif isinstance(ob, ProcExit) and ob.pid in last:
            last.pop(ob.pid).exit_code = ob.exit_code if ob.exit_code is not None else -(ob.signal or 0)
    return execs


# ------------------------------------------------------------------------------------ socket
class ConnectorSocket:
    """A subscribed proc connector socket. ``subscribe()`` waits for the kernel's acknowledgement."""

    RCVBUF_BYTES = 4 << 20

    def __init__(self) -> None:
        self.sock: Optional[socket.socket] = None
        self.listening = False
        self._seq = (os.getpid() << 8) & 0xFFFFFFFF

    def open(self) -> None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as err:
            raise _connector_error(err, "open") from err
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, 33, self.RCVBUF_BYTES)  # SO_RCVBUFFORCE (root)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF_BYTES)
            sock.bind((0, CN_IDX_PROC))
        except OSError as err:
            sock.close()
            raise _connector_error(err, "bind") from err
        self.sock = sock

    def _send(self, op: int) -> int:
        assert self.sock is not None
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        ack = (self._seq * 7919) & 0x7FFFFFFF
        try:
            self.sock.send(build_mcast_message(op, self._seq, ack, self.sock.getsockname()[0]))
        except OSError as err:
            raise _connector_error(err, "subscribe") from err
        return ack

    def subscribe(self, timeout: float = 1.0, on_events: Optional[Callable[[List[Event]], None]] = None) -> None:
        """Send PROC_CN_MCAST_LISTEN and wait for its ack; events read meanwhile go to ``on_events``."""
        ack = self._send(PROC_CN_MCAST_LISTEN)
        self.listening = True  # the kernel counted us even if the ack never comes
        deadline = time.monotonic() + timeout
        assert self.sock is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AsbuiltError("proc connector did not acknowledge the subscription "
                                   "(not in the initial pid/user namespace?)")
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            try:
                data = self.sock.recv(65536)
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    continue
                raise _connector_error(err, "receive") from err
            events = parse_events(data)
            for ev in events:
                if isinstance(ev, AckEvent) and ev.ack == (ack + 1) & 0xFFFFFFFF:
                    if ev.err:
                        raise _connector_error(OSError(ev.err, os.strerror(ev.err)), "subscribe")
                    if on_events:
                        on_events([e for e in events if e is not ev])
                    return
            if on_events:
                on_events(events)

    def close(self) -> None:
        if self.sock is None:
            return
        if self.listening:
            try:
                self._send(PROC_CN_MCAST_IGNORE)  # keeps the kernel's listener count balanced
            except AsbuiltError:
                pass
            self.listening = False
        self.sock.close()
        self.sock = None


def _connector_error(err: OSError, step: str) -> AsbuiltError:
    if err.errno in (errno.EPERM, errno.EACCES):
        return Denied(f"proc connector {step}: permission denied (needs root / CAP_NET_ADMIN)")
    if err.errno in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT, errno.ENOENT):
        return AsbuiltError(f"proc connector {step}: not supported by this kernel")
    return AsbuiltError(f"proc connector {step}: {err.strerror or err}")


# ------------------------------------------------------------------------------------- probe
class ProcConnectorProbe(Probe):
    """Streaming exec/fork/exit of a traced process tree from the proc connector."""

    name = "proc_connector"
    description = "exec/fork/exit of traced processes via the netlink proc connector (no eBPF)"
    default = True
    needs = ("root", "netlink-connector")
    cost = "low"
    mode = "proc-connector"

    QUEUE_MAX = 65536
    POLL_SECONDS = 0.2

    def __init__(self) -> None:
        self._conn: Optional[ConnectorSocket] = None
        self._thread: Optional[threading.Thread] = None
        self._queue: "queue.Queue[Observation]" = queue.Queue(maxsize=self.QUEUE_MAX)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._lock = threading.Lock()
        self._traced: Set[int] = set()
        self._ppid: Dict[int, int] = {}
        self._comm: Dict[int, str] = {}
        self._follow = False
        self._proc = "/proc"
        self._mono_to_wall = 0.0
        self._ctx: Optional[Context] = None
        self._gaps: "queue.Queue[tuple]" = queue.Queue(maxsize=1024)
        self.overruns = 0  # ENOBUFS: the kernel dropped an unknown number of events
        self.queue_dropped = 0  # observations dropped because drain() fell behind
        self.stats = ParseStats()
        self.items = 0
        self.error = ""
        self._started = 0.0

    @property
    def lost_events(self) -> int:
        return self.overruns + self.queue_dropped + self.stats.malformed

    # -------------------------------------------------------------------------------- check
    def check(self, ctx: Context) -> Optional[str]:
        if not (ctx.privileged and os.geteuid() == 0):
            return "needs root (CAP_NET_ADMIN) to listen to the proc connector"
        conn = ConnectorSocket()
        try:
            conn.open()
            conn.subscribe(timeout=1.0)
        except AsbuiltError as err:
            return str(err)
        finally:
            conn.close()
        return None

    # -------------------------------------------------------------------------------- start
    def start(self, ctx: Context, pids: Iterable[int], follow_children: bool = True) -> None:
        """Subscribe, then take the traced set (pids + existing descendants), then stream.

        Subscribing first means a child forked during the /proc scan is still seen (its FORK event
        waits in the socket). Raises AsbuiltError (Denied without privileges) when the connector
        cannot be used; :meth:`check` says the same without raising.
        """
        self._ctx = ctx
        self._proc = ctx.roots.proc
        self._follow = follow_children
        self._started = time.monotonic()
        self._mono_to_wall = time.time() - time.monotonic()
        conn = ConnectorSocket()
        conn.open()
        pending: List[Event] = []
        try:
            conn.subscribe(timeout=1.0, on_events=pending.extend)
        except AsbuiltError:
            conn.close()
            raise
        self._conn = conn
        targets = set(int(p) for p in pids)
        try:
            ppids = read_parents(self._proc)
        except AsbuiltError:
            self._conn = None
            conn.close()
            raise
        traced = (set(targets) | set(descendants(ppids, targets))) if follow_children else set(targets)
        with self._lock:
            self._traced = traced
            self._ppid = {p: ppids.get(p, 0) for p in traced}
        self._handle(pending)
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._loop, name="asbuilt-proc-connector", daemon=True)
        self._thread.start()

    def traced(self) -> Set[int]:
        """The pids currently traced (a copy): targets, descendants and live new children."""
        with self._lock:
            return set(self._traced)

    # --------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        conn = self._conn
        assert conn is not None and conn.sock is not None
        sock = conn.sock
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([sock, self._wake_r], [], [], self.POLL_SECONDS)
                if sock not in ready:
                    continue
                while not self._stop.is_set():  # drain what is queued without another select
                    try:
                        data = sock.recv(65536, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    except OSError as err:
                        if err.errno == errno.ENOBUFS:
                            self.overruns += 1
                            continue
                        raise
                    self._handle(parse_events(data, self.stats))
        except Exception as err:  # the probe stops; the run records why
            self.error = f"{type(err).__name__}: {err}"
            log.warning("probe=%s status=error reason=%s", self.name, self.error)

    def _wall(self, ts_ns: int) -> float:
        return round(self._mono_to_wall + ts_ns / 1e9, 6) if ts_ns else time.time()

    def _emit(self, ob: Observation) -> None:
        try:
            self._queue.put_nowait(ob)
            self.items += 1
        except queue.Full:
            self.queue_dropped += 1

    def _gap(self, kind: str, subject: str, detail: str) -> None:
        try:
            self._gaps.put_nowait((kind, subject, detail))
        except queue.Full:
            pass

    def _handle(self, events: List[Event]) -> None:
        for ev in events:
            if isinstance(ev, ForkEvent):
                if ev.is_thread:
                    continue
                with self._lock:
                    if not self._follow or ev.parent_tgid not in self._traced:
                        continue
                    self._traced.add(ev.child_tgid)
                    self._ppid[ev.child_tgid] = ev.parent_tgid
                self._emit(ProcFork(pid=ev.child_tgid, ppid=ev.parent_tgid, time=self._wall(ev.timestamp_ns)))
            elif isinstance(ev, CommEvent):
                if ev.tgid in self._traced and ev.pid == ev.tgid:
                    self._comm[ev.tgid] = ev.comm
            elif isinstance(ev, ExecEvent):
                if ev.tgid in self._traced:
                    self._emit(self._exec(ev))
            elif isinstance(ev, ExitEvent):
                if ev.pid != ev.tgid or ev.tgid not in self._traced:
                    continue  # a thread, or not ours
                with self._lock:
                    self._traced.discard(ev.tgid)  # the pid may be reused by an unrelated process
                    ppid = self._ppid.pop(ev.tgid, 0) or ev.parent_tgid
                self._comm.pop(ev.tgid, None)
                self._emit(ProcExit(pid=ev.tgid, ppid=ppid, exit_code=ev.code, signal=ev.signal,
                                    time=self._wall(ev.timestamp_ns)))
            elif isinstance(ev, UidEvent):
                if ev.tgid in self._traced and ev.pid == ev.tgid:
                    self._emit(ProcUid(pid=ev.tgid, ruid=ev.ruid, euid=ev.euid, time=self._wall(ev.timestamp_ns)))

    def _exec(self, ev: ExecEvent) -> ProcExec:
        pid = ev.tgid
        ob = ProcExec(pid=pid, ppid=self._ppid.get(pid, 0), path="", argv=[],
                      time=self._wall(ev.timestamp_ns), comm=self._comm.get(pid, ""))
        try:
            ob.path = read_exe(self._proc, pid)
            ob.argv = read_cmdline(self._proc, pid)
        except (Vanished, Denied) as err:
            ob.complete = False
            ob.detail = str(err)
            if not ob.comm:  # a zombie (exited, not yet reaped) still has its comm
                try:
                    ob.comm = read_comm(self._proc, pid)
                except AsbuiltError:
                    pass
            kind = "vanished" if isinstance(err, Vanished) else "denied"
            self._gap(kind, f"pid {pid}", f"exec ({ob.comm or '?'}): exe/cmdline not readable")
        except AsbuiltError as err:
            ob.complete, ob.detail = False, str(err)
            self._gap("unreadable", f"pid {pid}", str(err))
        return ob

    # -------------------------------------------------------------------------- drain/stop
    def drain(self) -> List[Observation]:
        """Observations since the last drain, in arrival order; gaps go to the context's recorder."""
        out: List[Observation] = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        while True:
            try:
                kind, subject, detail = self._gaps.get_nowait()
            except queue.Empty:
                break
            if self._ctx is not None:
                self._ctx.gaps.add(kind, subject, detail)
        return out

    def stop(self) -> None:
        """Stop the receive thread (promptly, via a wakeup pipe) and unsubscribe; idempotent."""
        self._stop.set()
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def probe_run(self) -> ProbeRun:
        """This run's coverage row: items, lost events (overruns + queue drops + malformed), mode."""
        status = "error" if self.error else "ok"
        reason = self.error or ("exec/fork/exit only: no file, socket or syscall events "
                                f"(kernel queue overruns: {self.overruns})")
        return ProbeRun(name=self.name, status=status, reason=reason, items=self.items,
                        lost_events=self.lost_events, mode=self.mode,
                        duration_seconds=round(time.monotonic() - self._started, 6) if self._started else 0.0)
