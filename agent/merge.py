"""Folding trace observations into a profile: each new fact once, counters and first/last seen.

Observations come from the eBPF probes (``probes/ebpf``) or the fallback (proc connector, fd
polling); they are told apart by class name so the probes need not share base classes. Facts seen
both by the scan and the trace say so in ``learned`` (``scan+trace``).
"""
from __future__ import annotations

import ipaddress
import logging
import os
from typing import Dict, Iterable, List, Optional, Tuple

from .classify import classify
from .model import DnsName, Exec, FileRef, Peer, Process, Profile, Socket, SCAN, TRACE, CAPTURE
from .redact import redact_argv
from ..probes.base import Context

log = logging.getLogger(__name__)

_ORDER = (SCAN, TRACE, CAPTURE)
MAX_FILES_PER_PROCESS = 20000
MAX_PEERS_PER_PROCESS = 5000
MAX_EXECS_PER_PROCESS = 2000


def learned(a: str, b: str) -> str:
    """Union of two ``learned`` values, in the canonical order: ``scan+trace``."""
    parts = set(filter(None, (a or "").split("+") + (b or "").split("+")))
    return "+".join(p for p in _ORDER if p in parts) or b


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _mode_union(a: str, b: str) -> str:
    return "".join(c for c in "rwactxp" if c in (a or "") + (b or ""))


class TraceMerger:
    """Merges drained observations into ``profile`` in place."""

    def __init__(self, profile: Profile, ctx: Context, read_new: bool = True):
        self.profile = profile
        self.ctx = ctx
        self.read_new = read_new  # read /proc of a process first seen by a probe (the daemon defers it)
        self._exec_of: Dict[int, Exec] = {}  # pid -> the Exec entry its exit code goes to
        self.by_pid: Dict[int, Process] = {p.pid: p for p in profile.processes}
        self.events = 0  # observations' event counts, for progress
        self.facts = 0  # new facts added
        self.dropped = 0
        self.names: Dict[Tuple[int, str], List[str]] = {}  # (pid, address) -> names resolved to it
        self._seen_pids = set(self.by_pid)
        self._totals: Dict[tuple, int] = {}  # probes that report running totals: last total per fact

    def _delta(self, key: tuple, total: int) -> int:
        """The increase of a running total since its last drain (net and dns report totals)."""
        before = self._totals.get(key, 0)
        self._totals[key] = max(before, total)
        return max(0, total - before)

    # ---------------------------------------------------------------- processes
    def pids(self) -> List[int]:
        return sorted(self.by_pid)

    def process(self, pid: int, ppid: int = 0, comm: str = "", when: float = 0.0) -> Process:
        proc = self.by_pid.get(pid)
        if proc is None:
            proc = (self._read_process(pid) if self.read_new else None) or self._stub(pid, ppid, comm)
            proc.learned = TRACE
            proc.first_seen = proc.first_seen or when
            self.by_pid[pid] = proc
            self.profile.processes.append(proc)
            self.facts += 1
        if when:
            proc.last_seen = max(proc.last_seen, when)
        return proc

    def _stub(self, pid: int, ppid: int, comm: str) -> Process:
        """A process known only from an event: unit, container and user come from its parent."""
        proc = Process(pid=pid, ppid=ppid, name=comm)
        parent = self.by_pid.get(ppid)
        if parent is not None:
            for attr in ("systemd_unit", "container_id", "container_runtime", "cgroup", "user", "uid",
                         "group", "gid", "netns", "cwd"):
                setattr(proc, attr, getattr(parent, attr))
        return proc

    def forget(self, pids: Iterable[int]) -> None:
        """Drop what is kept per pid for processes that are gone (the daemon, after harvesting)."""
        gone = set(pids)
        if not gone:
            return
        for pid in gone:
            proc = self.by_pid.pop(pid, None)
            self._exec_of.pop(pid, None)
            self._seen_pids.discard(pid)
        self.profile.processes = [p for p in self.profile.processes if p.pid not in gone]
        self._totals = {k: v for k, v in self._totals.items() if not (len(k) > 1 and k[1] in gone)}
        self.names = {k: v for k, v in self.names.items() if k[0] not in gone}

    def _read_process(self, pid: int) -> Optional[Process]:
        """A child that appeared during the trace: read it now, while it lives."""
        from .errors import AsbuiltError
        from .scan import build_process
        from ..probes.procfs.process import read_process

        try:
            info = read_process(self.ctx.roots.proc, pid, with_fds=False)
        except AsbuiltError:
            return None
        clk = os.sysconf("SC_CLK_TCK")
        return build_process(info, {}, {}, self.profile.host.boot_time, clk)

    # ------------------------------------------------------------------- dispatch
    def add(self, observations: Iterable[object]) -> None:
        for obs in observations:
            handler = getattr(self, "_on_" + type(obs).__name__, None)
            if handler is None:
                log.debug("unmerged observation type=%s", type(obs).__name__)
                continue
            try:
                handler(obs)
            except Exception as err:  # one odd observation never loses the others
                log.warning("merge failed type=%s reason=%s", type(obs).__name__, err)

    # exec / fork / exit -- eBPF and proc connector
    def _exec(self, pid: int, ppid: int, path: str, argv: List[str], when: float, comm: str = "") -> None:
        self.events += 1
        argv = redact_argv(argv)
        proc = self.process(pid, ppid, comm, when)
        if path and not proc.exe:
            proc.exe = path
        if argv:
            proc.cmdline = argv
        if comm:
            proc.name = comm
        elif not proc.name and path:
            proc.name = os.path.basename(path)[:15]
        parent = self.by_pid.get(ppid) or self.by_pid.get(self.profile.target_pids[0]
                                                          if self.profile.target_pids else -1)
        if parent is not None:
            for ex in parent.execs:
                if ex.path == path and ex.argv == argv:
                    ex.count += 1
                    ex.pid = pid  # the latest instance: its exit code is the one recorded next
                    self._exec_of[pid] = ex
                    break
            else:
                if len(parent.execs) < MAX_EXECS_PER_PROCESS:
                    parent.execs.append(Exec(pid=pid, ppid=ppid, path=path, argv=argv, time=when))
                    self._exec_of[pid] = parent.execs[-1]
                    self.facts += 1
                else:
                    self.dropped += 1
        if path:
            self._file(pid, path, "x", "", 1, when, when)

    def _on_ExecObservation(self, o) -> None:
        self._exec(o.pid, o.ppid, o.path, list(o.argv), o.time, o.comm)

    def _on_ProcExec(self, o) -> None:
        self._exec(o.pid, o.ppid, o.path, list(o.argv), o.time, o.comm)

    def _on_ForkObservation(self, o) -> None:
        self.events += 1
        self.process(o.pid, o.ppid, "", o.time).ppid = o.ppid

    _on_ProcFork = _on_ForkObservation

    def _exit(self, pid: int, code: Optional[int], when: float) -> None:
        self.events += 1
        ex = self._exec_of.pop(pid, None)
        if ex is not None and ex.pid == pid and ex.exit_code is None:
            ex.exit_code = code
        proc = self.by_pid.get(pid)
        if proc is not None and when:
            proc.last_seen = max(proc.last_seen, when)

    def _on_ExitObservation(self, o) -> None:
        self._exit(o.pid, o.exit_code, o.time)

    def _on_ProcExit(self, o) -> None:
        code = o.exit_code if o.exit_code is not None else (-o.signal if o.signal else None)
        self._exit(o.pid, code, o.time)

    # files
    def _file(self, pid: int, path: str, mode: str, error: str, count: int, first: float, last: float) -> None:
        from .scan import NOISE_DEVICES, NOISE_PREFIXES

        if not error and (path in NOISE_DEVICES or path.startswith(NOISE_PREFIXES)):
            return
        proc = self.process(pid, when=last)
        bucket = proc.failed_opens if error else proc.files
        for ref in bucket:
            if ref.path == path and ref.error == error:
                ref.count += count
                ref.mode = _mode_union(ref.mode, mode)
                ref.learned = learned(ref.learned, TRACE)
                ref.first_seen = min(ref.first_seen or first, first)
                ref.last_seen = max(ref.last_seen, last)
                return
        if len(bucket) >= MAX_FILES_PER_PROCESS:
            self.dropped += 1
            return
        kind = "executable" if "x" in mode else classify(path, access=mode)
        bucket.append(FileRef(path=path, kind=kind, mode=mode, error=error, learned=TRACE, count=count,
                              first_seen=first, last_seen=last))
        self.facts += 1

    def _on_FileObservation(self, o) -> None:
        count = self._delta(("file", o.pid, o.path, o.mode, o.error), o.count or 1)  # running totals
        self.events += count
        self._file(o.pid, o.path, o.mode, o.error, count, o.first_seen, o.last_seen)

    def _on_FdFile(self, o) -> None:
        self.events += 1
        if o.kind not in ("path", "deleted", "file", ""):
            return
        self._file(o.pid, o.path, o.mode, "", 1, o.first_seen, o.last_seen)

    def _on_FdProcess(self, o) -> None:
        proc = self.process(o.pid)
        if getattr(o, "exe", "") and not proc.exe:
            proc.exe = o.exe
        if getattr(o, "cwd", "") and not proc.cwd:
            proc.cwd = o.cwd

    def _on_FdSocket(self, o) -> None:
        self.events += 1  # sockets are joined by the final scan's sock_diag dump

    # syscalls
    def _on_SyscallObservation(self, o) -> None:
        self.events += o.count
        proc = self.process(o.pid)
        if o.name not in proc.syscalls:
            self.facts += 1
        proc.syscalls[o.name] = proc.syscalls.get(o.name, 0) + o.count

    def _on_KfuncObservation(self, o) -> None:
        self.events += o.count
        proc = self.process(o.pid) if getattr(o, "pid", 0) else None
        target = proc or (self.by_pid.get(self.profile.target_pids[0]) if self.profile.target_pids else None)
        if target is not None:
            target.kernel_functions[o.function] = target.kernel_functions.get(o.function, 0) + o.count

    # network
    def _on_NetObservation(self, o) -> None:
        count = self._delta(("net", o.pid, o.direction, o.proto, o.family, o.local_addr, o.local_port,
                             o.peer_addr, o.peer_port, o.error), o.count)
        self.events += count
        proc = self.process(o.pid, when=o.last_seen)
        if o.direction in ("listen", "bind"):
            if o.direction == "bind" and o.proto == "tcp":
                return  # a TCP bind is followed by its listen (or is a client's source port)
            for s in proc.sockets:
                if s.proto == o.proto and s.local_port == o.local_port and s.local_address == o.local_addr \
                        and (s.state == "LISTEN" or o.proto != "tcp"):
                    s.learned = learned(s.learned, TRACE)
                    return
            proc.sockets.append(Socket(proto=o.proto or "tcp", family=o.family,
                                       state="LISTEN" if o.direction == "listen" else "UNCONN",
                                       local_address=o.local_addr, local_port=o.local_port,
                                       path=o.local_addr if o.family == "unix" else "",
                                       learned=TRACE, first_seen=o.first_seen, last_seen=o.last_seen))
            self.facts += 1
            return
        inbound = o.direction == "inbound"
        peer = Peer(address=o.peer_addr, port=0 if inbound else o.peer_port, proto=o.proto or "tcp",
                    family=o.family, direction=o.direction, local_port=o.local_port if inbound else 0,
                    connections=count, learned=TRACE, first_seen=o.first_seen, last_seen=o.last_seen)
        if o.error:
            peer.details["error"] = o.error
        self._peer(proc, peer)

    def _peer(self, proc: Process, new: Peer) -> None:
        key = (new.direction, new.proto, new.address, new.port, new.local_port)
        for p in proc.peers:
            if (p.direction, p.proto, p.address, p.port, p.local_port) == key:
                p.connections += new.connections
                if new.learned != SCAN:
                    p.first_seen = min(p.first_seen or new.first_seen, new.first_seen)
                    p.last_seen = max(p.last_seen, new.last_seen)
                for attr in ("bytes_sent", "bytes_received"):
                    if getattr(new, attr) is not None:
                        setattr(p, attr, max(getattr(p, attr) or 0, getattr(new, attr)))
                p.details.update(new.details)
                if new.protocol:
                    p.protocol = new.protocol
                p.learned = learned(p.learned, new.learned)
                return
        if new.learned == CAPTURE:
            new.connections = 0  # captured flows are evidence of a protocol, not a connection count
        if len(proc.peers) >= MAX_PEERS_PER_PROCESS:
            self.dropped += 1
            return
        proc.peers.append(new)
        self.facts += 1

    # dns
    def _on_DnsObservation(self, o) -> None:
        count = self._delta(("dns", o.pid, o.name, getattr(o, "result", 0)), o.count)
        self.events += count
        if _is_address(o.name):
            return  # getaddrinfo("10.0.0.5") resolves nothing: not a name
        proc = self.process(o.pid, when=o.last_seen)
        for d in proc.dns:
            if d.name == o.name:
                d.count += count
                d.last_seen = max(d.last_seen, o.last_seen)
                for a in o.addresses:
                    if a not in d.addresses:
                        d.addresses.append(a)
                break
        else:
            proc.dns.append(DnsName(name=o.name, addresses=list(o.addresses), count=count, learned=TRACE,
                                    first_seen=o.first_seen, last_seen=o.last_seen))
            self.facts += 1
        for a in o.addresses:
            names = self.names.setdefault((o.pid, a), [])
            if o.name not in names:
                names.append(o.name)

    # capture
    def _on_CaptureObservations(self, o) -> None:
        for peer in o.peers:
            self._capture_peer(peer)
        target = self.by_pid.get(self.profile.target_pids[0]) if self.profile.target_pids else None
        for n in o.names:
            if target is None:
                break
            count = self._delta(("capture-dns", n.name), n.count)
            self.events += count
            for d in target.dns:
                if d.name == n.name:
                    d.learned = learned(d.learned, CAPTURE)
                    d.count += count
                    d.addresses += [a for a in n.addresses if a not in d.addresses]
                    break
            else:
                target.dns.append(DnsName(name=n.name, addresses=list(n.addresses), count=count,
                                          learned=CAPTURE, first_seen=n.first_seen, last_seen=n.last_seen))
                self.facts += 1
            for a in n.addresses:
                names = self.names.setdefault((target.pid, a), [])
                if n.name not in names:
                    names.append(n.name)

    def _owner_of(self, o) -> Optional[Process]:
        """The traced process a captured flow belongs to: by its listener, else by its peer."""
        procs = list(self.by_pid.values())
        if o.direction == "inbound":
            for proc in procs:
                if any(s.local_port == o.local_port and s.proto == o.proto for s in proc.sockets):
                    return proc
        for want_addr in (True, False):
            for proc in procs:
                for p in proc.peers:
                    if p.direction == o.direction and p.port == o.port and (not want_addr or p.address == o.address):
                        return proc
        return self.by_pid.get(self.profile.target_pids[0]) if self.profile.target_pids else None

    def _capture_peer(self, o) -> None:
        self.events += 1
        proc = self._owner_of(o)
        if proc is None or not o.protocol:
            return
        self._peer(proc, Peer(address=o.address, port=o.port, proto=o.proto, family=o.family,
                              direction=o.direction, local_port=o.local_port, protocol=o.protocol,
                              details=dict(o.details), learned=CAPTURE, first_seen=o.first_seen,
                              last_seen=o.last_seen))

    def ports(self) -> Tuple[set, set]:
        """(ports to capture on, listening ports) of the traced processes, from what is known now.

        Listeners' ports and the service ports of outbound peers; UDP/53 always (names). Ephemeral
        client ports never: they are the other side's business and change per connection.
        """
        ports, listening = {("udp", 53)}, set()
        for proc in self.by_pid.values():
            for s in proc.sockets:
                if s.proto in ("tcp", "udp") and s.local_port and (s.state == "LISTEN" or
                                                                    (s.proto == "udp" and not s.remote_port)):
                    listening.add((s.proto, s.local_port))
            for p in proc.peers:
                if p.proto in ("tcp", "udp") and p.direction == "outbound" and p.port:
                    ports.add((p.proto, p.port))
        ports |= listening
        return ports, listening

    # ------------------------------------------------------------------- final scan
    def merge_scan(self, final: Profile) -> None:
        """What is open at the end of the window: sockets, byte counters, new fds."""
        for fresh in final.processes:
            proc = self.by_pid.get(fresh.pid)
            if proc is None:
                fresh.learned = TRACE
                self.by_pid[fresh.pid] = fresh
                self.profile.processes.append(fresh)
                continue
            known = {(s.proto, s.inode, s.local_port, s.remote_address, s.remote_port, s.path) for s in proc.sockets}
            for s in fresh.sockets:
                if (s.proto, s.inode, s.local_port, s.remote_address, s.remote_port, s.path) not in known:
                    proc.sockets.append(s)
            for peer in fresh.peers:
                self._peer(proc, peer)
            for ref in fresh.files:
                if not any(r.path == ref.path for r in proc.files):
                    proc.files.append(ref)
            proc.fd_count = fresh.fd_count or proc.fd_count
            proc.rss_bytes, proc.cpu_seconds = fresh.rss_bytes, fresh.cpu_seconds

    def fold(self) -> None:
        """Processes born during the trace with one identity become one entry (``instances``).

        A shell loop that runs ``cat`` a thousand times is one dependency, not a thousand.
        Processes the initial scan found keep their own entries.
        """
        first: Dict[str, Process] = {}
        keep: List[Process] = []
        for proc in sorted(self.profile.processes, key=lambda p: p.pid):
            if proc.pid in self._seen_pids or not proc.identity:
                keep.append(proc)
                continue
            into = first.get(proc.identity)
            if into is None:
                first[proc.identity] = proc
                keep.append(proc)
                continue
            into.instances += proc.instances
            into.last_seen = max(into.last_seen, proc.last_seen)
            for ref in proc.files + proc.failed_opens:
                self._file(into.pid, ref.path, ref.mode, ref.error, ref.count or 1, ref.first_seen, ref.last_seen)
            for peer in proc.peers:
                self._peer(into, peer)
            for name, n in proc.syscalls.items():
                into.syscalls[name] = into.syscalls.get(name, 0) + n
            for d in proc.dns:
                if not any(x.name == d.name for x in into.dns):
                    into.dns.append(d)
            into.execs.extend(proc.execs)
            del self.by_pid[proc.pid]
        self.profile.processes = keep

    def finish(self) -> None:
        """Fold short-lived processes, names onto peers, stable order, dropped counts into coverage."""
        from .identity import identity

        for proc in self.profile.processes:
            if not proc.identity and (proc.exe or proc.cmdline or proc.name):
                # a child gone before it could be read has only its comm: fold by that
                proc.identity = identity(proc.exe, proc.cmdline or [proc.name], proc.systemd_unit,
                                         proc.container_id)
        self.fold()
        global_names: Dict[str, List[str]] = {}
        for (_, addr), names in self.names.items():
            for n in names:
                global_names.setdefault(addr, [])
                if n not in global_names[addr]:
                    global_names[addr].append(n)
        for proc in self.profile.processes:
            for peer in proc.peers:
                names = self.names.get((proc.pid, peer.address)) or global_names.get(peer.address, [])
                for n in names:
                    if n not in peer.names:
                        peer.names.append(n)
            proc.files.sort(key=lambda f: f.path)
            proc.failed_opens.sort(key=lambda f: f.path)
            proc.peers.sort(key=lambda p: (p.direction, p.proto, p.address, p.port, p.local_port))
            proc.dns.sort(key=lambda d: d.name)
            proc.syscalls = dict(sorted(proc.syscalls.items()))
        self.profile.processes.sort(key=lambda p: p.pid)
        if self.dropped:
            self.ctx.gaps.add("truncated", "trace", f"{self.dropped} facts past the per-process caps")
