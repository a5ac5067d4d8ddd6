"""The daemon's rolling host profile: every fact ever seen, keyed by process identity, bounded.

Rescans and harvested trace facts are absorbed here; each fact keeps first/last seen, counters only
grow (connections, opens, DNS answers, execs), and kernel byte counters from ``tcp_info`` are turned
into running totals from the difference between two scans of the same socket. A restarted process
keeps its entry (identities are stable); ``instances`` counts the distinct processes seen. Memory is
bounded: per-process fact caps (agent/merge.py's), a cap on identities (the least recently seen go
first) and ``forget_after`` for processes long gone.

:meth:`Rolling.publish` makes the read-only Profile that /metrics and snapshots use: processes that
changed since the last publish are copied, the others reuse their previous copy, so a scrape never
sees a half-absorbed process and publishing stays cheap in steady state.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from .identity import identity as make_identity
from .merge import MAX_EXECS_PER_PROCESS, MAX_FILES_PER_PROCESS, MAX_PEERS_PER_PROCESS, learned
from .model import SCAN, Coverage, FileRef, Host, Package, Peer, Process, Profile, Socket

log = logging.getLogger(__name__)

# What a rescan replaces (the latest reading is the truth) rather than accumulates.
SNAPSHOT_ATTRS = ("ppid", "exe", "cmdline", "user", "uid", "group", "gid", "cwd", "start_time", "cgroup",
                  "container_id", "container_runtime", "systemd_unit", "netns", "cpu_seconds", "rss_bytes",
                  "threads", "fd_count", "limits", "env_names", "env", "exe_package", "name")
FACT_LISTS = ("files", "failed_opens", "peers", "dns", "execs", "syscalls", "kernel_functions")


def ensure_identity(proc: Process) -> str:
    if not proc.identity and (proc.exe or proc.cmdline or proc.name):
        proc.identity = make_identity(proc.exe, proc.cmdline or [proc.name], proc.systemd_unit,
                                      proc.container_id)
    return proc.identity


def is_listener(s: Socket) -> bool:
    if s.proto == "tcp":
        return s.state == "LISTEN"
    if s.proto == "udp":
        return not s.remote_port
    return s.proto == "unix" and s.state == "LISTEN"


def _peer_key(p: Peer) -> tuple:
    return (p.direction, p.proto, p.address, p.port, p.local_port)


class Rolling:
    """Processes by identity with every fact seen; see the module docstring."""

    def __init__(self, max_processes: int = 5000, forget_after: float = 7 * 86400.0):
        self.max_processes = max_processes
        self.forget_after = forget_after
        self.procs: Dict[str, Process] = {}
        self.host = Host()
        self.packages: List[Package] = []
        self.coverage = Coverage()
        self.started_at = time.time()
        self.dropped = 0  # facts past the caps
        self._dirty: Set[str] = set()
        self._copies: Dict[str, Process] = {}
        self._live: Dict[str, Set[int]] = {}  # identity -> pids alive now (instances counts new ones)
        self._bytes: Dict[Tuple[str, tuple], Tuple[int, int]] = {}  # last scan's bytes per peer

    # ------------------------------------------------------------------------- absorbing
    def absorb(self, proc: Process, now: float, from_scan: bool) -> Optional[Process]:
        """Fold one process's facts into its identity's entry; None when it has no identity."""
        ident = ensure_identity(proc)
        if not ident:
            return None
        mine = self.procs.get(ident)
        live = self._live.setdefault(ident, set())
        if mine is None:
            mine = self.procs[ident] = Process(identity=ident, pid=proc.pid, instances=0,
                                               first_seen=proc.first_seen or proc.start_time or now,
                                               learned=proc.learned)
            for attr in SNAPSHOT_ATTRS:
                setattr(mine, attr, copy.copy(getattr(proc, attr)))
        if proc.pid and proc.pid not in live:
            live.add(proc.pid)
            mine.instances += 1
        if from_scan or not mine.exe:
            for attr in SNAPSHOT_ATTRS:
                value = getattr(proc, attr)
                if value or (from_scan and attr in ("cpu_seconds", "rss_bytes", "threads", "fd_count")):
                    setattr(mine, attr, copy.copy(value))
        if from_scan or proc.pid == mine.pid or not mine.pid:
            mine.pid = proc.pid or mine.pid
        mine.kernel_thread = proc.kernel_thread
        mine.learned = learned(mine.learned, proc.learned)
        mine.last_seen = max(mine.last_seen, proc.last_seen or now, now if from_scan else 0.0)
        if from_scan:
            if proc.libraries:
                mine.libraries = self._union_refs(mine.libraries, proc.libraries, now)
            if proc.mapped_files:
                mine.mapped_files = self._union_refs(mine.mapped_files, proc.mapped_files, now)
        for ref in proc.files:
            self._file(mine.files, ref, now, (ref.path,))
        for ref in proc.failed_opens:
            self._file(mine.failed_opens, ref, now, (ref.path, ref.error))
        for s in proc.sockets:
            if is_listener(s):
                self._socket(mine, s, now)
        self._peers(mine, proc, now, from_scan)
        for d in proc.dns:
            for have in mine.dns:
                if have.name == d.name:
                    have.count += d.count
                    have.addresses += [a for a in d.addresses if a not in have.addresses]
                    have.last_seen = max(have.last_seen, d.last_seen)
                    have.learned = learned(have.learned, d.learned)
                    break
            else:
                mine.dns.append(copy.deepcopy(d))
        for ex in proc.execs:
            for have in mine.execs:
                if have.path == ex.path and have.argv == ex.argv:
                    have.count += ex.count
                    have.pid = ex.pid
                    if ex.exit_code is not None:
                        have.exit_code = ex.exit_code
                    break
            else:
                if len(mine.execs) < MAX_EXECS_PER_PROCESS:
                    mine.execs.append(copy.deepcopy(ex))
                else:
                    self.dropped += 1
        for name, n in proc.syscalls.items():
            mine.syscalls[name] = mine.syscalls.get(name, 0) + n
        for name, n in proc.kernel_functions.items():
            mine.kernel_functions[name] = mine.kernel_functions.get(name, 0) + n
        self._dirty.add(ident)
        return mine

    def _union_refs(self, have: List[FileRef], new: List[FileRef], now: float) -> List[FileRef]:
        out = {r.path: r for r in have}
        for r in new:
            old = out.get(r.path)
            if old is None:
                out[r.path] = copy.copy(r)
                out[r.path].first_seen = out[r.path].first_seen or now
            else:
                old.package, old.owned, old.modified = r.package, r.owned, r.modified
            out[r.path].last_seen = now
        return list(out.values())[:MAX_FILES_PER_PROCESS]

    def _file(self, refs: List[FileRef], ref: FileRef, now: float, key: tuple) -> None:
        for have in refs:
            if (have.path,) == key or (have.path, have.error) == key:
                have.mode = "".join(c for c in "rwactxp" if c in have.mode + ref.mode)
                have.count += ref.count
                have.first_seen = min(have.first_seen or ref.first_seen or now, ref.first_seen or now)
                have.last_seen = max(have.last_seen, ref.last_seen or now)
                have.learned = learned(have.learned, ref.learned)
                if have.kind == "other" and ref.kind != "other":
                    have.kind = ref.kind
                if have.owned is None and ref.owned is not None:
                    have.package, have.owned, have.modified = ref.package, ref.owned, ref.modified
                have.deleted = ref.deleted
                return
        if len(refs) >= MAX_FILES_PER_PROCESS:
            self.dropped += 1
            return
        new = copy.copy(ref)
        new.first_seen = new.first_seen or now
        new.last_seen = new.last_seen or now
        refs.append(new)

    def _socket(self, mine: Process, s: Socket, now: float) -> None:
        key = (s.proto, s.local_address, s.local_port, s.path)
        for have in mine.sockets:
            if (have.proto, have.local_address, have.local_port, have.path) == key:
                have.last_seen = now
                have.learned = learned(have.learned, s.learned)
                have.inode = s.inode or have.inode
                return
        new = copy.copy(s)
        new.first_seen, new.last_seen = new.first_seen or now, now
        new.bytes_sent = new.bytes_received = None
        mine.sockets.append(new)

    def _peers(self, mine: Process, proc: Process, now: float, from_scan: bool) -> None:
        index = {_peer_key(p): p for p in mine.peers}
        for p in proc.peers:
            key = _peer_key(p)
            have = index.get(key)
            if have is None:
                if len(mine.peers) >= MAX_PEERS_PER_PROCESS:
                    self.dropped += 1
                    continue
                have = copy.deepcopy(p)
                have.bytes_sent = have.bytes_received = None
                have.connections = 0
                have.first_seen = have.first_seen or now
                mine.peers.append(have)
                index[key] = have
            elif p is not have:
                have.learned = learned(have.learned, p.learned)
                have.names += [n for n in p.names if n not in have.names]
                if p.protocol:
                    have.protocol = p.protocol
                have.details.update(p.details)
            # connections: trace counts are new events; a scan counts what is established now
            have.connections = max(have.connections, p.connections) if p.learned == SCAN \
                else have.connections + p.connections
            have.last_seen = max(have.last_seen, p.last_seen or now)
            if from_scan and (p.bytes_sent is not None or p.bytes_received is not None):
                bkey = (mine.identity, key)
                sent, recv = p.bytes_sent or 0, p.bytes_received or 0
                last_sent, last_recv = self._bytes.get(bkey, (0, 0))
                # a counter that went down is a new connection: all of it is new
                have.bytes_sent = (have.bytes_sent or 0) + (sent - last_sent if sent >= last_sent else sent)
                have.bytes_received = (have.bytes_received or 0) + (
                    recv - last_recv if recv >= last_recv else recv)
                self._bytes[bkey] = (sent, recv)

    # ------------------------------------------------------------------------- lifecycle
    def gone(self, pids: Iterable[int]) -> None:
        """Processes that exited: the next one with the same identity counts as a new instance."""
        gone = set(pids)
        for live in self._live.values():
            live -= gone

    def seen_in_scan(self, pids: Iterable[int]) -> None:
        """After a full rescan: only these pids are alive."""
        alive = set(pids)
        for ident, live in self._live.items():
            live &= alive
        stale = [k for k in self._bytes if not self._live.get(k[0])]
        for k in stale:  # a process with no live pid: its sockets are closed
            del self._bytes[k]

    def expire(self, now: float) -> int:
        """Forget processes not seen for ``forget_after`` and the oldest past ``max_processes``."""
        doomed = [i for i, p in self.procs.items()
                  if not self._live.get(i) and now - p.last_seen > self.forget_after]
        over = len(self.procs) - len(doomed) - self.max_processes
        if over > 0:
            rest = sorted((p.last_seen, i) for i, p in self.procs.items() if i not in set(doomed))
            doomed += [i for _, i in rest[:over]]
        for ident in doomed:
            self.procs.pop(ident, None)
            self._live.pop(ident, None)
            self._copies.pop(ident, None)
            self._dirty.discard(ident)
        if doomed:
            log.info("rolling profile forgot processes=%d", len(doomed))
        return len(doomed)

    def seed(self, profile: Profile) -> None:
        """Carry a previous snapshot's facts over a restart of the daemon (first seen survives)."""
        for proc in profile.processes:
            if proc.identity and proc.identity not in self.procs:
                proc.instances = 0
                self.procs[proc.identity] = proc
                self._dirty.add(proc.identity)
        if profile.started_at:
            self.started_at = min(self.started_at, profile.started_at)

    # ------------------------------------------------------------------------- publishing
    def publish(self, now: float, coverage: Coverage, tool_version: str,
                keep: Callable[[Process], bool] = lambda p: True) -> Profile:
        for ident in self._dirty:
            proc = self.procs.get(ident)
            if proc is not None:
                self._copies[ident] = copy.deepcopy(proc)
        self._dirty.clear()
        processes = sorted((p for p in self._copies.values() if keep(p)), key=lambda p: (p.pid, p.identity))
        cov = copy.deepcopy(coverage)
        return Profile(tool_version=tool_version, mode="run", generated_at=now, started_at=self.started_at,
                       duration_seconds=round(now - self.started_at, 3), host=copy.deepcopy(self.host),
                       processes=processes, packages=copy.deepcopy(self.packages), coverage=cov)
