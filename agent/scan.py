"""The scan: one snapshot of the host and every process, assembled into a :class:`Profile`.

Order: host facts, processes (procfs), sockets (sock_diag, every network namespace in use), then
the joins — socket inodes to processes, established connections to peers, files to packages.
Each reader runs through :func:`run_snapshot`, so its outcome and duration land in coverage and a
failing reader leaves its part empty instead of stopping the scan.
"""
from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from . import __version__
from .classify import classify
from .identity import identity
from .model import (FileRef, Host, NetNamespace, Package, Peer, Process, Profile, Socket, SCAN)
from .redact import redact_argv, redact_env
from ..probes.base import Context, Probe, run_snapshot

log = logging.getLogger(__name__)

# Device files every process has: noise in a dependency profile.
NOISE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty",
                 "/dev/console", "/dev/ptmx")
NOISE_PREFIXES = ("/dev/pts/", "/dev/tty")
# Paths worth asking the package database about.
PACKAGE_KINDS = ("executable", "library", "config", "data", "log", "other", "deleted")
_PACKAGE_KINDS = frozenset(PACKAGE_KINDS)


# --------------------------------------------------------------------------------- probes
class HostProbe(Probe):
    name = "host"
    description = "os-release, hostname, kernel, CPU, memory, mounts, NICs, routes, DNS, devices"

    def collect(self, ctx: Context) -> Host:
        from ..probes.host import collect_host

        return collect_host(ctx)


class ProcessProbe(Probe):
    name = "processes"
    description = "procfs: every process's identity, files, maps, limits"

    def __init__(self, only: Optional[Iterable[int]] = None, build: Optional[Callable] = None):
        self.only = set(only) if only else None
        self.build = build  # ProcInfo -> model Process, applied as each process is read
        self.kernel_threads = 0
        self.workers = 1  # processes that read procfs in the last collect (see _fork_worker)

    def collect(self, ctx: Context) -> list:
        """ProcInfo of every process; with ``build``, (Process, socket inodes) pairs instead.

        Building each process as soon as it is read keeps one ProcInfo alive at a time instead of
        all of them (raw environments, maps, limits, fd lists: ~20 MB for 1,000 processes).

        With ``build``, many processes and more than one CPU, a forked copy of this process reads
        and builds pids too, both taking chunks from one queue (:class:`_PidQueue`,
        :func:`_fork_worker`): procfs reading and parsing is
        CPU-bound Python that threads would only serialise on the GIL. The results, gaps included,
        are applied in pid order exactly as a sequential read would, so the profile is the same.
        """
        from ..probes.procfs.pids import list_pids

        me = os.getpid()
        pids = list_pids(ctx.roots.proc)
        if self.only is not None:
            missing = self.only - set(pids)
            for pid in sorted(missing):
                ctx.gaps.add("vanished", f"pid {pid}", "not running at scan time")
            pids = [p for p in pids if p in self.only]
        if ctx.roots.live:
            pids = [p for p in pids if p != me]
        keep_kthreads = bool(ctx.options.get("kernel_threads"))
        read = lambda pid: _read_one(ctx.roots.proc, pid, keep_kthreads, self.build)  # noqa: E731
        results: Dict[int, tuple] = {}
        self.workers = 1
        queue = _PidQueue.make(pids) if self.build is not None and _may_fork(ctx, pids) else None
        worker = _fork_worker(ctx, queue, read) if queue is not None else None
        if queue is not None and worker is None:
            queue.close()
        if worker is not None:
            self.workers = 2
            try:
                for chunk in queue:
                    for pid in chunk:
                        results[pid] = read(pid)
            finally:
                queue.close()
                theirs = worker.result()
            if not theirs and not worker.ok:  # it failed: what it took is read below, as without it
                self.workers = 1
            results.update(theirs)
        out: list = []
        for pid in pids:
            gaps, item = results.pop(pid) if pid in results else read(pid)
            for kind, detail in gaps:
                ctx.gaps.add(kind, f"pid {pid}", detail)
            if isinstance(item, str):  # _KTHREAD (a copy of it, when it comes from the worker)
                self.kernel_threads += 1
            elif item is not None:
                out.append(item)
        return out


_KTHREAD = "kernel thread"  # _read_one's item for a kernel thread left out
MIN_FORK_PIDS = 200  # below this a worker's fork and result transfer cost more than they save


def _read_one(proc_root: str, pid: int, keep_kthreads: bool, build: Optional[Callable]) -> tuple:
    """Read (and build) one process: ``(gaps, item)``, gaps as (kind, detail) pairs for ``pid``.

    ``item`` is the ProcInfo, or ``(Process, socket inodes)`` with ``build``; :data:`_KTHREAD` for
    a kernel thread left out; None when nothing is kept. Plain data: it crosses from a worker.
    """
    from ..probes.procfs.process import read_process
    from .errors import AsbuiltError, Denied, Vanished

    try:
        info = read_process(proc_root, pid)
    except Vanished:
        return [("vanished", "exited during the scan")], None
    except Denied as err:
        return [("denied", str(err))], None
    except AsbuiltError as err:  # malformed or unreadable: this pid only
        return [("unreadable", str(err))], None
    if info.kernel_thread and not keep_kthreads:
        return [], _KTHREAD
    gaps = [("denied", part) for part in info.denied] + [("unreadable", part) for part in info.missing]
    if build is None:
        return gaps, info
    try:
        proc = build(info)
    except Exception as err:  # one odd process never stops the scan
        gaps.append(("unreadable", f"{type(err).__name__}: {err}"))
        return gaps, None
    return gaps, (proc, socket_inodes(info))


def _may_fork(ctx: Context, pids: List[int]) -> bool:
    """Whether a forked worker is worth it and safe: many pids, a second CPU, and no other thread
    in this process (a fork copies only the calling thread; a lock another one holds, in logging
    or in a library, would stay locked in the child). ``workers=1`` in the options turns it off."""
    if ctx.options.get("workers", 2) < 2 or len(pids) < MIN_FORK_PIDS or not hasattr(os, "fork"):
        return False
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    import threading

    return cpus > 1 and threading.active_count() == 1


class _PidQueue:
    """The pids to read, in chunks, shared by this process and a forked worker: each takes the
    next chunk when it is done with its last, so both finish together whatever the processes cost
    (a fixed half each left one side waiting for the other). A pipe holds one 4-byte token per
    chunk, written before the fork; a read of 4 bytes takes one whole token, atomically, and EOF
    once the pipe is empty (no write end is left open)."""

    CHUNK = 8  # pids per token: small enough to balance, large enough that tokens cost nothing

    def __init__(self, pids: List[int], rfd: int, chunk: int):
        self.pids, self.rfd, self.chunk = pids, rfd, chunk

    @classmethod
    def make(cls, pids: List[int]) -> Optional["_PidQueue"]:
        import struct

        chunk = max(cls.CHUNK, -(-len(pids) // 8000))  # at most 8,000 tokens: 32 KB, under a pipe's 64 KB
        tokens = b"".join(struct.pack("=I", i) for i in range(0, len(pids), chunk))
        try:
            rfd, wfd = os.pipe()
        except OSError:
            return None
        try:
            view = memoryview(tokens)
            while view:
                view = view[os.write(wfd, view):]
        except OSError:
            os.close(rfd)
            return None
        finally:
            os.close(wfd)
        return cls(pids, rfd, chunk)

    def __iter__(self):
        import struct

        while self.rfd >= 0:
            try:
                token = os.read(self.rfd, 4)
            except OSError:
                return
            if len(token) != 4:
                return
            (i,) = struct.unpack("=I", token)
            yield self.pids[i:i + self.chunk]

    def close(self) -> None:
        if self.rfd >= 0:
            os.close(self.rfd)
            self.rfd = -1


class _Worker:
    """A forked child reading chunks of the pids; :meth:`result` collects its answer."""

    def __init__(self, pid: int, fd: int):
        self.pid, self.fd = pid, fd
        self.ok = False  # exited 0 after writing its end marker

    def result(self) -> Dict[int, tuple]:
        """The worker's {pid: (gaps, item)}: every chunk it finished, even if it died later (the
        pids it took but did not finish are not in it: the caller reads them itself).

        The worker pickles each chunk into an anonymous file as soon as it is read; that file is
        unpickled after the worker has exited, chunk by chunk, never held whole as bytes."""
        import pickle

        got: Dict[int, tuple] = {}
        status = self._reap()
        try:
            with open(self.fd, "rb", buffering=1 << 16, closefd=True) as fh:
                fh.seek(0)
                loader = pickle.Unpickler(fh)  # one unpickler: its memo spans the chunks
                while True:
                    part = loader.load()
                    if part is None:  # the end marker: everything arrived
                        self.ok = status == 0
                        break
                    if not isinstance(part, dict):
                        break
                    got.update(part)
        except Exception as err:  # EOF mid-chunk: the worker died while writing; keep what came
            log.debug("scan worker pid=%d result ends early: %s", self.pid, err)
        if status != 0:
            log.debug("scan worker pid=%d failed status=%s, %d pids from it", self.pid, status, len(got))
        return got

    def _reap(self) -> Optional[int]:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            return None
        return os.waitstatus_to_exitcode(status)


def _rebuild(cls: type, values: tuple) -> Any:
    return cls(*values)


def _pickler_class():
    import dataclasses
    import pickle

    class Pickler(pickle.Pickler):
        """Model dataclasses travel as (class, field values) and are rebuilt by their constructor:
        pickle's default (``__dict__`` restored by update) would give every one of the ~50,000
        objects its own dict instead of the compact inline attributes (~10 MB more)."""

        def reducer_override(self, obj: Any) -> Any:
            cls = type(obj)
            names = _FIELDS.get(cls)
            if names is None:
                if not dataclasses.is_dataclass(cls) or isinstance(obj, type):
                    return NotImplemented
                fields = dataclasses.fields(cls)
                if not all(f.init for f in fields):
                    return NotImplemented
                names = _FIELDS[cls] = tuple(f.name for f in fields)
            return _rebuild, (cls, tuple(getattr(obj, name) for name in names))

    return Pickler


_FIELDS: Dict[type, tuple] = {}


def _result_file() -> Optional[int]:
    """An anonymous file for the worker's results: memfd, else an unlinked temp file."""
    try:
        return os.memfd_create("asbuilt-scan", getattr(os, "MFD_CLOEXEC", 0))
    except (AttributeError, OSError):
        pass
    import tempfile

    try:
        fh = tempfile.TemporaryFile()
    except OSError:
        return None
    fd = os.dup(fh.fileno())
    fh.close()
    return fd


def _fork_worker(ctx: Context, queue: _PidQueue, read: Callable[[int], tuple]) -> Optional[_Worker]:
    """Fork a copy of this process that takes chunks of pids from ``queue``, runs ``read`` on each
    pid and appends each chunk's pickled {pid: result} to an anonymous file it shares with us,
    then exits without running any of the parent's clean-up. None when the fork itself fails
    (the caller then reads every pid itself)."""
    import pickle

    fd = _result_file()
    if fd is None:
        return None
    try:
        child = os.fork()
    except OSError as err:
        log.debug("scan worker: fork failed: %s", err)
        os.close(fd)
        return None
    if child == 0:  # the worker: never returns
        code = 1
        try:
            with open(fd, "wb", buffering=1 << 16) as fh:
                pickler = _pickler_class()(fh, protocol=pickle.HIGHEST_PROTOCOL)
                for chunk in queue:
                    pickler.dump({pid: read(pid) for pid in chunk})
                pickler.dump(None)
            code = 0
        except BaseException:  # noqa: BLE001 - the parent reads the pids it took itself
            pass
        finally:
            os._exit(code)
    return _Worker(child, fd)


def socket_inodes(info) -> List[int]:
    """The socket inodes of a ProcInfo's descriptors, in fd order (what join_sockets needs)."""
    from ..probes.procfs import fd as fdmod

    return [entry.inode for entry in info.fds if entry.kind == fdmod.SOCKET and entry.inode]


class SocketProbe(Probe):
    name = "sockets"
    description = "TCP/UDP/unix sockets via netlink sock_diag, in every network namespace in use"
    needs = ("sock_diag",)

    def __init__(self, netns_pids: Dict[int, List[int]], root_ns: int):
        self.netns_pids = netns_pids  # netns inode -> pids in it
        self.root_ns = root_ns  # the host's own namespace: dumped directly

    def check(self, ctx: Context) -> Optional[str]:
        if not ctx.roots.live:
            return "captured tree: sockets need the live kernel"
        from ..probes.features import check_sock_diag

        feat = check_sock_diag()
        return None if feat.ok else feat.detail

    def collect(self, ctx: Context) -> Tuple[list, list]:
        from ..probes.netlink.sock_diag import dump_all
        from .errors import AsbuiltError, Vanished

        notes: List[str] = []
        inet, unix = dump_all(notes=notes)
        for ns, pids in sorted(self.netns_pids.items()):
            if not ns or ns == self.root_ns:
                continue
            for pid in pids:  # any live member of the namespace will do
                try:
                    i, u = dump_all(netns=os.path.join(ctx.roots.proc, str(pid), "ns", "net"), notes=notes)
                except Vanished:
                    continue
                except AsbuiltError as err:
                    ctx.gaps.add("unreadable", f"netns {ns}", str(err))
                    break
                for s in i:
                    s.netns = ns
                inet.extend(i)
                unix.extend(u)
                break
        for note in notes:
            ctx.gaps.add("unreadable", "sock_diag", note)
        return inet, unix


class PackageProbe(Probe):
    name = "packages"
    description = "dpkg/rpm: owner, version, install date, origin, modified files"

    def __init__(self, processes: List[Process]):
        self.processes = processes

    def collect(self, ctx: Context) -> List[Package]:
        from ..probes.packages.index import open_index

        cache_dir = ctx.options.get("cache_dir") or ""
        cache_file = os.path.join(cache_dir, "dpkg-index.msgpack") if cache_dir and ctx.roots.live else ""
        index = open_index(ctx.roots, ctx.gaps, cache_file=cache_file)
        if index is None:
            return []
        packages = attach_packages(self.processes, index, verify=bool(ctx.options.get("verify", True)))
        if cache_file:
            _save_cache(cache_file, index.cache_update())
        return packages


def _save_cache(path: str, data: Optional[bytes]) -> None:
    """Write the package index's cache (atomic, 0600, in a 0700 directory); failing to is only a
    slower next scan, never a gap in this one."""
    if data is None:
        return
    from ..exporters.files import atomic_write
    from .errors import AsbuiltError

    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        atomic_write(path, data)
    except (OSError, AsbuiltError) as err:
        log.debug("package cache not written path=%s: %s", path, err)


# ---------------------------------------------------------------------------------- joins
def _users(ctx: Context) -> Tuple[Dict[int, str], Dict[int, str]]:
    try:
        from ..probes.host import passwd

        return passwd.read_passwd(ctx.roots.rootfs), passwd.read_group(ctx.roots.rootfs)
    except Exception as err:  # names are a nicety; ids stay
        ctx.gaps.add("unreadable", "/etc/passwd", f"{type(err).__name__}: {err}")
        return {}, {}


def _socket_model(s, netns: int) -> Socket:
    if hasattr(s, "remote_port"):  # inet
        sent = s.bytes_acked if s.bytes_acked is not None else s.bytes_sent
        return Socket(proto=s.proto, family=s.family, state=s.state, local_address=s.local_address,
                      local_port=s.local_port, remote_address=s.remote_address, remote_port=s.remote_port,
                      inode=s.inode, netns=getattr(s, "netns", 0) or netns, bytes_sent=sent,
                      bytes_received=s.bytes_received, learned=SCAN)
    return Socket(proto="unix", family="unix", state=s.state, path=s.path, inode=s.inode,
                  peer_inode=s.peer_inode, netns=netns, learned=SCAN)


def derive_peers(proc: Process, unix_by_inode: Dict[int, Socket], owners: Dict[int, List[Process]],
                 now: float) -> None:
    """Peers from this process's sockets: established TCP/connected UDP, and connected unix sockets.

    A connection to one of the process's own listening ports is inbound and keyed by the client's
    address and our port (the client's ephemeral port never becomes part of a key); any other is
    outbound, keyed by the remote address and port.
    """
    listening = {(s.proto, s.local_port) for s in proc.sockets
                 if s.state == "LISTEN" or (s.proto == "udp" and not s.remote_port)}
    peers: Dict[tuple, Peer] = {}
    for s in proc.sockets:
        if s.proto in ("tcp", "udp") and s.remote_port and s.state not in ("LISTEN", "TIME_WAIT"):
            inbound = (s.proto, s.local_port) in listening
            key = ("inbound", s.proto, s.remote_address, s.local_port) if inbound else \
                ("outbound", s.proto, s.remote_address, s.remote_port)
            peer = peers.get(key)
            if peer is None:
                peer = peers[key] = Peer(address=s.remote_address, port=0 if inbound else s.remote_port,
                                         proto=s.proto, family=s.family,
                                         direction="inbound" if inbound else "outbound",
                                         local_port=s.local_port if inbound else 0,
                                         learned=SCAN, first_seen=now, last_seen=now)
            peer.connections += 1
            if s.bytes_sent is not None:
                peer.bytes_sent = (peer.bytes_sent or 0) + s.bytes_sent
            if s.bytes_received is not None:
                peer.bytes_received = (peer.bytes_received or 0) + s.bytes_received
        elif s.proto == "unix" and s.peer_inode:
            other = unix_by_inode.get(s.peer_inode)
            if other is None:
                continue
            them = [p for p in owners.get(s.peer_inode, []) if p.pid != proc.pid]
            if not them:
                continue  # a socketpair inside one process
            if other.path and not s.path:
                direction, address = "outbound", other.path  # we connected to their named socket
            elif s.path and not other.path:
                direction, address = "inbound", s.path  # they connected to ours
            else:
                continue
            key = (direction, "unix", address, them[0].identity)
            peer = peers.get(key)
            if peer is None:
                peer = peers[key] = Peer(address=address, proto="unix", family="unix", direction=direction,
                                         names=[f"{them[0].name}[{them[0].pid}]"], learned=SCAN,
                                         first_seen=now, last_seen=now)
            peer.connections += 1
    proc.peers = sorted(peers.values(), key=lambda p: (p.direction, p.proto, p.address, p.port, p.local_port))


def attach_packages(processes: List[Process], index, verify: bool = True) -> List[Package]:
    """Fill owner/owned/modified on every file reference and return the packages in use."""
    refs: Dict[str, List[Tuple[Process, Optional[FileRef]]]] = {}
    kinds, pseudo, get = _PACKAGE_KINDS, ("/proc/", "/sys/"), refs.get
    for proc in processes:  # ~20,000 references on 1,000 processes: kept to plain steps
        if proc.exe:
            refs.setdefault(proc.exe, []).append((proc, None))
        for group in (proc.libraries, proc.mapped_files, proc.files):
            for ref in group:
                path = ref.path
                if ref.kind in kinds and path[:1] == "/" and not path.startswith(pseudo):
                    uses = get(path)
                    if uses is None:
                        refs[path] = [(proc, ref)]
                    else:
                        uses.append((proc, ref))
    owners = index.owners(list(refs))
    if verify:  # hashing (GIL-free) runs on other threads while origins are resolved below
        index.prefetch_hashes([path for path in refs if owners.get(path)])
    packages: Dict[str, Package] = {}
    used_by: Dict[str, Set[str]] = {}  # a set: libc alone has a thousand users on a busy host
    for path, uses in refs.items():
        name = owners.get(path)
        modified = index.verify(path) if (verify and name) else None
        owned = name is not None
        for proc, ref in uses:
            if ref is None:
                proc.exe_package = name
            else:
                ref.package, ref.owned, ref.modified = name, owned, modified
        if not name:
            continue
        pkg = packages.get(name)
        if pkg is None:
            try:
                pkg = packages[name] = index.package(name)
            except KeyError:
                continue
        if modified:
            pkg.modified_files.append(path)
        used_by.setdefault(name, set()).update(proc.identity for proc, _ in uses)
    for name, pkg in packages.items():
        pkg.modified_files.sort()
        pkg.used_by = sorted(used_by.get(name, ()))
    return sorted(packages.values(), key=lambda p: p.name)


# ----------------------------------------------------------------------- process assembly
def build_process(info, users: Dict[int, str], groups: Dict[int, str], boot_time: float,
                  clk_tck: int, memo: Optional[Dict[tuple, Any]] = None) -> Process:
    """A model Process from one procfs reading (:class:`ProcInfo`); no sockets or packages yet.

    ``memo`` (one dict per scan) keeps the answers of the pure, regex-heavy steps (redaction,
    identity, file classification) by their input: the workers of one service share their
    environment, command line and files, so each distinct input is worked out once. Every
    process still gets its own lists and dicts.
    """
    from ..probes.procfs import fd as fdmod
    from .model import Limit

    if memo is None:
        memo = {}
    st, status = info.stat, info.status
    cmdline = tuple(info.cmdline)
    got = memo.get(cmdline)
    if got is None:
        got = memo[cmdline] = redact_argv(list(cmdline))
    argv = list(got)
    env_key = ("\0env",) + tuple((info.environ or {}).items())
    got = memo.get(env_key)
    if got is None:
        got = memo[env_key] = redact_env(dict(info.environ or {}))
    env_names, env_values = list(got[0]), dict(got[1])
    uid, gid = status.uid, status.gid
    proc = Process(
        pid=info.pid, ppid=st.ppid, name=st.comm, exe=info.exe, cmdline=argv,
        uid=uid, user=users.get(uid, str(uid) if uid >= 0 else ""),
        gid=gid, group=groups.get(gid, str(gid) if gid >= 0 else ""),
        cwd=info.cwd, start_time=round(boot_time + st.starttime_ticks / clk_tck, 2) if boot_time else 0.0,
        cgroup=info.cgroup, container_id=info.container_id, container_runtime=info.container_runtime,
        systemd_unit=info.systemd_unit, netns=info.netns, kernel_thread=st.kernel_thread,
        cpu_seconds=round((st.utime_ticks + st.stime_ticks) / clk_tck, 2),
        rss_bytes=status.rss_bytes if status.rss_bytes is not None else 0,
        threads=status.threads or st.num_threads, fd_count=len(info.fds),
        env_names=env_names, env=env_values,
    )
    proc.limits = [Limit(name=lim.name, soft=lim.soft, hard=lim.hard, unit=lim.unit) for lim in info.limits]
    id_key = ("\0id", proc.exe, proc.systemd_unit, proc.container_id) + tuple(argv)
    got = memo.get(id_key)
    if got is None:
        got = memo[id_key] = identity(proc.exe, argv, proc.systemd_unit, proc.container_id)
    proc.identity = got

    def kind_of(path: str, access: str) -> str:
        key = ("\0kind", path, access)
        kind = memo.get(key)
        if kind is None:
            kind = memo[key] = classify(path, access=access)
        return kind

    proc.libraries = [FileRef(path=link.path, kind="library", mode="r", deleted=link.deleted, learned=SCAN)
                      for link in info.libraries]
    proc.mapped_files = [FileRef(path=link.path, kind="deleted" if link.deleted else kind_of(link.path, "r"),
                                 mode="r", deleted=link.deleted, learned=SCAN)
                         for link in info.mapped_files if link.path != proc.exe]
    files: Dict[str, FileRef] = {}
    for entry in info.fds:
        if entry.kind not in (fdmod.PATH, fdmod.DELETED):
            continue  # sockets are joined from sock_diag; pipes/anon inodes are not dependencies
        path, deleted = entry.path, entry.kind == fdmod.DELETED
        if path in NOISE_DEVICES or path.startswith(NOISE_PREFIXES):
            continue
        access = fdmod.mode(entry.flags) if entry.flags is not None else ""
        ref = files.get(path)
        if ref is None:
            files[path] = FileRef(path=path, kind="deleted" if deleted else kind_of(path, access),
                                  mode=access, deleted=deleted, learned=SCAN)
        elif access:
            ref.mode = "".join(c for c in "rwac" if c in ref.mode + access)
    proc.files = sorted(files.values(), key=lambda f: f.path)
    return proc


# ------------------------------------------------------------------------------------ scan
def scan(ctx: Context, pids: Optional[Iterable[int]] = None) -> Profile:
    """Snapshot the host and its processes into a Profile. Never raises for expected conditions."""
    # A scan allocates hundreds of thousands of small objects that all live on into the profile:
    # the cyclic collector's passes over them find nothing and cost ~0.15 s for 1,000 processes.
    # It is paused for the scan and restored after, so a daemon collects between scans as usual.
    # Before it is restored, what the scan made is moved to the oldest generation (freeze, then
    # unfreeze: no traversal): left in the youngest, the first collections after the scan (while
    # the profile is encoded, say) would traverse all of it again, ~0.1 s. Objects that become
    # garbage stay collectable, by the next full collection.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _scan(ctx, pids)
    finally:
        if collecting:
            if gc.get_freeze_count() == 0:  # never thaw what someone else froze
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def _scan(ctx: Context, pids: Optional[Iterable[int]]) -> Profile:
    t0 = time.monotonic()
    profile = Profile(mode="scan", tool_version=__version__, started_at=ctx.now, coverage=ctx.coverage)
    ctx.coverage.privileged = ctx.privileged
    ctx.coverage.mode = "snapshot"

    host = run_snapshot(HostProbe(), ctx, count=lambda h: 1) or Host()
    profile.host = host

    users, groups = _users(ctx)
    clk_tck = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    memo: Dict[tuple, Any] = {}
    pprobe = ProcessProbe(pids, build=lambda info: build_process(info, users, groups, host.boot_time, clk_tck,
                                                                 memo))
    built: List[Tuple[Process, List[int]]] = run_snapshot(pprobe, ctx) or []
    processes = [proc for proc, _ in built]
    if pprobe.kernel_threads:
        ctx.gaps.add("skipped", "kernel threads", f"{pprobe.kernel_threads} left out (--kernel-threads keeps them)")

    netns_pids: Dict[int, List[int]] = {}
    for proc in processes:
        netns_pids.setdefault(proc.netns, []).append(proc.pid)
    root_ns = host_netns(ctx, netns_pids)
    sprobe = SocketProbe(netns_pids, root_ns)
    sockets = run_snapshot(sprobe, ctx, count=lambda r: len(r[0]) + len(r[1]))
    if sockets is not None:
        join_sockets(built, sockets[0], sockets[1], sprobe.root_ns, ctx.now)

    named = _named_namespaces(ctx)
    host.netns = [NetNamespace(inode=ns, name=named.get(ns, ""), pids=sorted(p))
                  for ns, p in sorted(netns_pids.items()) if ns and ns != root_ns]

    if ctx.options.get("packages", True):
        profile.packages = run_snapshot(PackageProbe(processes), ctx) or []
    else:
        ctx.coverage.probes.append(_skipped("packages", "--no-packages"))

    profile.processes = sorted(processes, key=lambda p: p.pid)
    profile.generated_at = time.time()
    profile.duration_seconds = round(time.monotonic() - t0, 3)
    return profile


def join_sockets(built: List[Tuple[Process, List[int]]], inet: list, unix: list, root_ns: int,
                 now: float) -> None:
    """Attach sockets to processes by socket inode (from /proc/PID/fd, see :func:`socket_inodes`)
    and derive peers."""
    by_inode: Dict[int, Socket] = {}
    for s in inet:
        by_inode.setdefault(s.inode, _socket_model(s, getattr(s, "netns", 0) or root_ns))
    unix_by_inode: Dict[int, Socket] = {}
    for s in unix:
        m = _socket_model(s, 0)
        unix_by_inode[s.inode] = m
        by_inode.setdefault(s.inode, m)
    owners: Dict[int, List[Process]] = {}
    for proc, inodes in built:
        seen: Set[int] = set()
        for inode in inodes:
            sock = by_inode.get(inode)
            if sock is None or inode in seen:
                continue
            seen.add(inode)
            proc.sockets.append(sock)
            owners.setdefault(inode, []).append(proc)
        proc.sockets.sort(key=lambda s: (s.proto, s.state != "LISTEN", s.local_port, s.remote_address, s.path))
    for proc, _ in built:
        derive_peers(proc, unix_by_inode, owners, now)
        # unix sockets are noise in the stored profile unless named or connected to a peer
        proc.sockets = [s for s in proc.sockets if s.proto != "unix" or s.path or s.state == "LISTEN"]


def host_netns(ctx: Context, netns_pids: Dict[int, List[int]]) -> int:
    """The host's own network namespace: ours when live, else pid 1's, else the most populated."""
    from ..probes.netlink.netns import netns_of
    from .errors import AsbuiltError

    for pid in ((os.getpid(),) if ctx.roots.live else ()) + (1,):
        try:
            return netns_of(ctx.roots.proc, pid)
        except AsbuiltError:
            continue
    populated = [(len(p), ns) for ns, p in netns_pids.items() if ns]
    return max(populated)[1] if populated else 0


def _named_namespaces(ctx: Context) -> Dict[int, str]:
    try:
        from ..probes.netlink.netns import named_namespaces

        return named_namespaces(ctx.roots.path("/run/netns"))
    except Exception:
        return {}


def _skipped(name: str, reason: str):
    from .model import ProbeRun

    return ProbeRun(name=name, status="skipped", reason=reason)
