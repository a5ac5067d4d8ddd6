"""What a container draft (Dockerfile, ECS task definition) needs to know about a process selection.

:func:`services` turns the selected processes into services: the topmost processes that listen or
talk to peers (their descendants in the selection go with them; processes of one systemd unit or
container form one service), or the selection's roots when nothing listens or talks. :func:`draft`
then gathers, for one service, the facts both renderings share: listeners, directories written,
files no package owns that were read, packages used, environment (values only for allow-listed
names), the command line with each redacted value turned into a run-time ``${NAME}`` reference, and
notes on what the profile could not know. Pure: reads the model, never the host.
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Set, Tuple

from ..agent.errors import UsageError
from ..agent.model import FileRef, Package, Process, Profile
from ..agent.redact import REDACTED, TRUNCATED, env_allowed, secret_class

# Allow-listed variables whose observed value belongs to the old host or session, not to the app:
# shown as a note, not set in the container.
HOST_ENV = frozenset((
    "PATH", "HOME", "PWD", "OLDPWD", "SHELL", "TERM", "USER", "LOGNAME", "HOSTNAME", "TMPDIR", "TMP",
    "TEMP", "container", "DEBIAN_FRONTEND", "XDG_RUNTIME_DIR", "INVOCATION_ID", "JOURNAL_STREAM",
    "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", "WATCHDOG_USEC", "WATCHDOG_PID",
    "RUNTIME_DIRECTORY", "STATE_DIRECTORY", "CACHE_DIRECTORY", "LOGS_DIRECTORY",
    "CONFIGURATION_DIRECTORY", "CREDENTIALS_DIRECTORY", "KUBERNETES_SERVICE_HOST",
    "KUBERNETES_SERVICE_PORT", "KUBERNETES_PORT", "POD_NAME", "POD_NAMESPACE", "NODE_NAME"))
# Set by shells and session managers, meaningless to the app: not listed at all.
NOISE_ENV = frozenset(("_", "SHLVL", "OLDPWD", "PWD", "COLUMNS", "LINES", "PS1", "PS2", "MAIL",
                       "SSH_CLIENT", "SSH_CONNECTION", "SSH_TTY", "SSH_AUTH_SOCK", "TERM",
                       "MOTD_SHOWN", "XDG_SESSION_ID", "XDG_SESSION_TYPE", "XDG_SESSION_CLASS"))

# Files the base image or the container runtime provides, or that are generated on the host.
_HOST_MANAGED = frozenset((
    "/etc/ld.so.cache", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/etc/mtab",
    "/etc/machine-id", "/etc/localtime", "/etc/timezone", "/etc/passwd", "/etc/group", "/etc/shadow",
    "/etc/gshadow", "/etc/nsswitch.conf", "/etc/environment", "/etc/ld.so.preload",
    "/usr/lib/locale/locale-archive", "/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/subuid", "/etc/subgid", "/etc/adjtime"))
_HOST_MANAGED_PREFIXES = ("/etc/alternatives/", "/etc/ssl/certs/", "/etc/pki/ca-trust/extracted/",
                          "/var/lib/dpkg/", "/var/lib/rpm/", "/var/cache/ldconfig/", "/etc/ld.so.conf.d/")
_VIRTUAL_PREFIXES = ("/proc/", "/sys/", "/dev/", "/run/", "/var/run/")
_SCRATCH_DIRS = frozenset(("/tmp", "/var/tmp", "/dev/shm", "/", "/run", "/var/run"))
_SHIPPABLE_KINDS = frozenset(("config", "data", "other", "library", "executable", "log"))
_NOT_WRITABLE_KINDS = frozenset(("socket", "device", "pipe", "anon", "proc", "library", "executable"))
COPY_DIR_THRESHOLD = 8  # this many shipped files in one directory: ship the directory
_EPHEMERAL_PORT_MIN = 32768  # Linux ip_local_port_range default start: UDP below it is a service port


@dataclass
class Service:
    """One service of the selection: its main process and every selected descendant."""

    main: Process
    members: List[Process]


@dataclass
class Listener:
    proto: str
    port: int
    addresses: List[str] = field(default_factory=list)
    app_protocol: str = ""  # from inbound peers on this port (http ...)

    @property
    def loopback_only(self) -> bool:
        return bool(self.addresses) and all(_is_loopback(a) for a in self.addresses)


@dataclass
class Draft:
    """The facts a container rendering needs about one service."""

    name: str  # a short name: unit, container or executable basename
    service: Service
    listeners: List[Listener] = field(default_factory=list)
    volumes: List[str] = field(default_factory=list)  # directories written
    copies: List[Tuple[str, bool, str]] = field(default_factory=list)  # (path, is_dir, why)
    packages: List[Package] = field(default_factory=list)  # used, with a version
    unversioned: List[str] = field(default_factory=list)  # package names seen without a Package entry
    env_values: Dict[str, str] = field(default_factory=dict)  # allow-listed, to set
    env_host: Dict[str, str] = field(default_factory=dict)  # allow-listed but host-specific: note only
    env_required: List[str] = field(default_factory=list)  # names without a recorded value
    program: str = ""  # what to exec
    args: List[str] = field(default_factory=list)  # the rest of the command line (may hold REDACTED)
    secret_refs: List[str] = field(default_factory=list)  # run-time variables standing for redacted values
    exe_owned: Optional[bool] = None  # the executable belongs to a package (None: unknown)
    user: str = ""
    uid: int = -1
    group: str = ""
    gid: int = -1
    cwd: str = ""
    notes: List[str] = field(default_factory=list)  # what could not be known, one line each

    @property
    def main(self) -> Process:
        return self.service.main

    def shell_command(self) -> str:
        """The command as one ``sh -c`` string, each redacted value a quoted ``${NAME}`` reference."""
        return "exec " + " ".join(_shell_word(a, refs) for a, refs in self._ref_args())

    def _ref_args(self) -> List[Tuple[str, List[str]]]:
        rows, i = [], 0
        for arg in [self.program] + self.args:
            n = arg.count(REDACTED)
            rows.append((arg, self.secret_refs[i:i + n]))
            i += n
        return rows


def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "localhost") or address.startswith("::ffff:127.")


def _key(p: Process) -> Tuple[str, int]:
    return (p.host, p.pid)


def _scope(p: Process) -> Tuple[str, str, str]:
    unit = p.systemd_unit
    if unit in ("init.scope",) or unit.startswith(("session-", "user@", "user-")):
        unit = ""
    return (p.host, unit, p.container_id)


def _talks(p: Process) -> bool:
    return bool(p.peers) or any(_is_listener(s) for s in p.sockets)


def _is_listener(s) -> bool:
    if s.proto == "tcp" or s.proto == "tcp6":
        return s.state == "LISTEN" and s.local_port > 0
    if s.proto in ("udp", "udp6"):
        return bool(s.local_port) and not s.remote_port and s.state in ("", "UNCONN", "LISTEN", "CLOSE")
    return False


def services(profile: Profile, processes: List[Process]) -> List[Service]:
    """Group a selection into services, most significant first (see the module docstring)."""
    procs = [p for p in processes if not p.kernel_thread]
    if not procs:
        raise UsageError("no process selected: nothing to export")
    by_key = {_key(p): p for p in procs}

    def parent(p: Process) -> Optional[Process]:
        if p.ppid <= 0 or p.pid == 1 or p.ppid == p.pid:
            return None
        q = by_key.get((p.host, p.ppid))
        if q is None or q.pid == 1 or q.ppid == 0 or _scope(q) != _scope(p):
            return None
        return q

    targets = set(profile.target_pids) if profile.mode == "trace" else set()
    candidates = [p for p in procs if _talks(p) or p.pid in targets]
    if not candidates:
        candidates = [p for p in procs if parent(p) is None]
    cand_keys = {_key(p) for p in candidates}
    mains: List[Process] = []
    for p in candidates:
        q, top = parent(p), p
        seen = {_key(p)}
        while q is not None and _key(q) not in seen:
            seen.add(_key(q))
            if _key(q) in cand_keys:
                top = q
            q = parent(q)
        if top is p:
            mains.append(p)
    # members: each selected process under a main (first main up its chain)
    main_keys = {_key(m) for m in mains}
    members: Dict[Tuple[str, int], List[Process]] = {_key(m): [m] for m in mains}
    for p in procs:
        if _key(p) in main_keys:
            continue
        q, seen = parent(p), {_key(p)}
        while q is not None and _key(q) not in seen and _key(q) not in main_keys:
            seen.add(_key(q))
            q = parent(q)
        if q is not None and _key(q) in main_keys:
            members[_key(q)].append(p)
    # one service per systemd unit / container
    grouped: Dict[Tuple[str, str, str], List[Process]] = {}
    result: List[Service] = []
    for m in mains:
        scope = _scope(m)
        if scope[1] or scope[2]:
            grouped.setdefault(scope, []).append(m)
        else:
            result.append(Service(main=m, members=members[_key(m)]))
    for group in grouped.values():
        group.sort(key=lambda m: (-_weight(m), m.pid))
        result.append(Service(main=group[0], members=[p for m in group for p in members[_key(m)]]))
    result.sort(key=lambda s: (-sum(_weight(p) for p in s.members), s.main.host, s.main.pid))
    return result


def _weight(p: Process) -> int:
    return 4 * sum(1 for s in p.sockets if _is_listener(s)) + len(p.peers)


def service_name(p: Process) -> str:
    """A short readable name: systemd unit without suffix, container id, or executable basename."""
    if p.systemd_unit and _scope(p)[1]:
        return p.systemd_unit.rsplit(".", 1)[0]
    if p.container_id:
        return p.container_id[:12]
    base = os.path.basename(p.exe.split(" (deleted)")[0]) if p.exe and not p.exe.startswith("/memfd:") else ""
    return base or p.name or f"pid{p.pid}"


def selector_for(service: Service) -> str:
    """A ``--process`` selector naming this service, for messages."""
    p = service.main
    scope = _scope(p)
    if scope[1]:
        sel = "unit:" + scope[1]
    elif p.container_id:
        sel = "container:" + p.container_id[:12]
    else:
        sel = f"pid:{p.pid}"
    ports = sorted({s.local_port for m in service.members for s in m.sockets if _is_listener(s)})
    label = p.name + (" :" + ",".join(map(str, ports[:3])) if ports else "")
    return f"{sel} ({label})" if label else sel


# ---------------------------------------------------------------------------------- facts
def listeners(procs: Iterable[Process]) -> List[Listener]:
    out: Dict[Tuple[str, int], Listener] = {}
    procs = list(procs)
    inbound: Dict[int, str] = {}
    for p in procs:
        for peer in p.peers:
            if peer.direction == "inbound" and peer.local_port and peer.protocol:
                inbound.setdefault(peer.local_port, peer.protocol)
    for p in procs:
        for s in p.sockets:
            if not _is_listener(s):
                continue
            proto = "udp" if s.proto.startswith("udp") else "tcp"
            if proto == "udp" and s.local_port >= _EPHEMERAL_PORT_MIN and s.local_port not in inbound:
                continue  # an unconnected client socket (resolver ...), not a service port
            row = out.setdefault((proto, s.local_port), Listener(proto, s.local_port))
            if s.local_address not in row.addresses:
                row.addresses.append(s.local_address)
            if proto == "tcp":
                row.app_protocol = row.app_protocol or inbound.get(s.local_port, "")
    return sorted(out.values(), key=lambda r: (r.proto, r.port))


def _all_files(p: Process) -> Iterable[FileRef]:
    yield from p.files
    yield from p.libraries
    yield from p.mapped_files


def _written(f: FileRef) -> bool:
    return any(c in f.mode for c in "wac")


def _host_managed(path: str) -> bool:
    return (path in _HOST_MANAGED or path.startswith(_HOST_MANAGED_PREFIXES) or "/__pycache__/" in path
            or path.endswith((".pyc", ".pyo")))


def _compiled_source(path: str) -> str:
    """``/opt/app/__pycache__/mod.cpython-311.pyc`` -> ``/opt/app/mod.py`` outside the system's Python trees
    (Python opens the cached bytecode, not the source, so the source is what the trace cannot show)."""
    head, sep, name = path.rpartition("/__pycache__/")
    if not sep or not name.endswith(".pyc") or "/" in name:
        return ""
    if path.startswith("/usr/") and not path.startswith("/usr/local/"):
        return ""
    return f"{head}/{name.split('.', 1)[0]}.py"


def _collapse_dirs(dirs: Iterable[str]) -> List[str]:
    out: List[str] = []
    for d in sorted(set(dirs)):
        if not any(d == o or d.startswith(o.rstrip("/") + "/") for o in out):
            out.append(d)
    return out


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def draft(profile: Profile, service: Service) -> Draft:
    """Gather the shared facts about one service (see :class:`Draft`)."""
    main, members = service.main, service.members
    d = Draft(name=service_name(main), service=service, user=main.user, uid=main.uid, group=main.group,
              gid=main.gid, cwd=main.cwd)
    d.listeners = listeners(members)
    _files(profile, d)
    _packages(profile, d)
    _environment(d)
    _command(d)
    _unknowns(profile, d)
    return d


def _files(profile: Profile, d: Draft) -> None:
    volumes: Set[str] = set()
    shipped: Dict[str, str] = {}
    scratch: Set[str] = set()
    deleted: Set[str] = set()
    redirects: Set[str] = set()
    skipped: Set[str] = set()
    for p in d.service.members:
        for f in _all_files(p):
            path = f.path
            if not path.startswith("/") or f.error:
                continue
            if f.deleted or f.kind == "deleted":
                deleted.add(path)
                continue
            if path.startswith(("/proc/", "/sys/")) or (path.startswith("/dev/") and not path.startswith("/dev/shm/")):
                continue
            if _written(f):
                if f.kind in _NOT_WRITABLE_KINDS:
                    continue
                if f.kind == "other" and f.learned == "scan" and not f.count:
                    redirects.add(path)  # held open for writing since before we looked: stdout/stderr?
                    continue
                directory = os.path.dirname(path) or "/"
                if directory in _SCRATCH_DIRS or directory.startswith(("/run/", "/var/run/", "/dev/shm/")):
                    scratch.add(path)
                else:
                    volumes.add(directory)
                continue
            if f.kind not in _SHIPPABLE_KINDS or path.startswith(_VIRTUAL_PREFIXES):
                continue
            if path == p.exe:
                continue  # the executable is handled with the command
            source = _compiled_source(path) if f.owned is False else ""
            if source:
                shipped.setdefault(source, "source of a compiled module read (no package owns it)")
                continue
            if _host_managed(path):
                if f.owned is not True:
                    skipped.add(path)
                continue
            if f.owned is False:
                shipped.setdefault(path, "no package owns it")
            elif f.owned is True and f.modified:
                shipped.setdefault(path, f"changed since {f.package or 'its package'} installed it")
            elif f.owned is None and f.kind == "config":
                shipped.setdefault(path, "package ownership unknown")
    d.volumes = _collapse_dirs(volumes)
    exe = d.main.exe
    d.exe_owned = _exe_owned(d.main)
    if d.exe_owned is False and exe.startswith("/") and not exe.startswith("/memfd:") and " (deleted)" not in exe:
        shipped.setdefault(exe, "the executable: no package owns it")
    # ship a whole directory when many of its files are shipped
    per_dir: Dict[str, int] = {}
    for path in shipped:
        per_dir[os.path.dirname(path)] = per_dir.get(os.path.dirname(path), 0) + 1
    dirs = _collapse_dirs(k for k, n in per_dir.items() if n >= COPY_DIR_THRESHOLD and k not in _SCRATCH_DIRS)
    copies = [(k, True, f"{per_dir[k]} files read from it, no package owns them") for k in dirs]
    copies += [(path, False, why) for path, why in sorted(shipped.items())
               if not any(_under(path, k) for k in dirs)]
    d.copies = copies
    for path, _, _ in copies:
        for v in d.volumes:
            if _under(path, v):
                d.notes.append(f"{path} is shipped in the image but lies in the written directory {v}: "
                               "a volume mounted there hides it")
                break
    if deleted:
        d.notes.append("files in use that were deleted on the host (not shipped): " + _few(deleted))
    if redirects:
        d.notes.append("files held open for writing since before the profile (stdout/stderr redirected?), "
                       "not made volumes: " + _few(redirects))
    if scratch:
        d.notes.append("scratch files written (the container's writable layer or a tmpfs will do): "
                       + _few(scratch))
    if skipped:
        d.notes.append("host-managed files read (the base image or runtime provides its own): " + _few(skipped))


def _few(items: Iterable[str], n: int = 5) -> str:
    items = sorted(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _exe_owned(p: Process) -> Optional[bool]:
    if p.exe_package:
        return True
    for f in _all_files(p):
        if f.path == p.exe and f.owned is not None:
            return f.owned
    return None


def _packages(profile: Profile, d: Draft) -> None:
    identities = {p.identity for p in d.service.members if p.identity}
    names: Set[str] = set()
    for p in d.service.members:
        if p.exe_package:
            names.add(p.exe_package)
        for f in _all_files(p):
            if f.package:
                names.add(f.package)
    chosen: Dict[str, Package] = {}
    for pkg in profile.packages:
        if pkg.name in names or identities.intersection(pkg.used_by):
            if pkg.version:
                chosen.setdefault(pkg.name, pkg)
    d.packages = sorted(chosen.values(), key=lambda k: k.name)
    d.unversioned = sorted(names - set(chosen))


def _environment(d: Draft) -> None:
    values: Dict[str, str] = {}
    names: Set[str] = set()
    for p in d.service.members[:1]:  # the main process's environment is the service's
        values.update(p.env)
        names.update(p.env_names)
    for name in sorted(names | set(values)):
        if name in values and env_allowed(name):
            if name in HOST_ENV:
                d.env_host[name] = values[name]
            else:
                d.env_values[name] = values[name]
        elif name not in NOISE_ENV and not env_allowed(name):
            d.env_required.append(name)


_NAME_BEFORE = re.compile(r"([A-Za-z_][A-Za-z0-9_.\-]*)[\"']?\s*[=:]\s*[\"']?$")
_URL_BEFORE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://[^:/@\s]*:$")


def _env_name(raw: str) -> str:
    name = re.sub(r"[^A-Za-z0-9]+", "_", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", raw)).strip("_").upper()
    return name if name and not name[0].isdigit() else ("SECRET_" + name).rstrip("_")


def _ref_name(before: str, prev: str, prog: str) -> str:
    """A run-time variable name for a redacted value, from the text before it or the previous argument."""
    m = _URL_BEFORE.search(before)
    if m:
        return _env_name(m.group(1) + "_password")
    m = _NAME_BEFORE.search(before)
    if m and len(m.group(1)) > 2:
        name = m.group(1)
        if "." in name:  # Java -Dspring.datasource.password=: the last two segments
            if before.startswith("-D") and name.startswith("D"):
                name = name[1:]
            name = "_".join(name.split(".")[-2:])
        return _env_name(name)
    if not before and prev.startswith("-") and len(prev.lstrip("-")) > 2 and secret_class(prev):
        return _env_name(prev.lstrip("-"))
    return _env_name(prog + "_secret")


def _command(d: Draft) -> None:
    p = d.main
    argv = list(p.cmdline)
    exe = p.exe.split(" (deleted)")[0] if p.exe else ""
    if exe.startswith("/memfd:"):
        exe = ""
    if not argv:
        d.program = exe
        d.notes.append("command line unknown (empty or unreadable): only the executable is run")
    elif len(argv) == 1 and " " in argv[0] and not argv[0].startswith("/"):
        d.program = exe or argv[0].split()[0]
        d.notes.append(f"the process rewrote its command line ({argv[0][:60]!r}): its arguments are unknown")
    else:
        argv0 = argv[0]
        d.args = argv[1:]
        if "/" not in argv0 and exe:
            d.program = exe  # a PATH lookup on the old host: run the executable it found
        elif argv0.startswith("/") and exe and argv0 != exe and d.exe_owned is not False:
            d.program = exe
            d.notes.append(f"started as {argv0}, which resolved to {exe}: the draft runs {exe}")
        else:
            d.program = argv0
            if not argv0.startswith("/"):
                d.notes.append(f"the program {argv0} is relative to the working directory {d.cwd or '?'}")
    if any(a.startswith("<") and a.endswith(" more arguments>") or a.endswith(TRUNCATED) for a in d.args):
        d.notes.append("the command line was cut when profiled: the last arguments are missing")
    if not d.program:
        d.notes.append("executable unknown: the ENTRYPOINT must be filled in")
    refs: List[str] = []
    prog = os.path.basename(d.program) or "app"
    taken: Set[str] = set()
    prev = ""
    for arg in [d.program] + d.args:
        pos = 0
        while True:
            i = arg.find(REDACTED, pos)
            if i < 0:
                break
            name = base = _ref_name(arg[:i], prev, prog)
            n = 2
            while name in taken:
                name, n = f"{base}_{n}", n + 1
            taken.add(name)
            refs.append(name)
            pos = i + len(REDACTED)
        prev = arg
    d.secret_refs = refs


def _shell_word(arg: str, refs: List[str]) -> str:
    parts = arg.split(REDACTED)
    word = shlex.quote(parts[0]) if parts[0] else ""
    for ref, part in zip(refs, parts[1:]):
        word += '"${' + ref + '}"' + (shlex.quote(part) if part else "")
    return word or "''"


def _unknowns(profile: Profile, d: Draft) -> None:
    traced = profile.mode in ("trace", "run") and (
        d.main.pid in profile.target_pids or d.main.learned != "scan"
        or any(f.learned != "scan" for p in d.service.members for f in _all_files(p)))
    if traced:
        d.notes.append(f"files opened only before or after the {profile.duration_seconds:.0f} s trace window "
                       "(configuration read at start-up, say) are not in the profile: check the working "
                       "directory and the program's documented config paths")
    else:
        d.notes.append("seen only in a scan: files are known only if they were open at that moment; "
                       "trace the process (asbuilt trace --pid) to learn what it opens")
    if d.exe_owned is None and d.program:
        d.notes.append(f"whether a package owns {d.main.exe or d.program} is unknown (no package data)")
    if not profile.packages:
        d.notes.append("no package data in the profile: the packages the process needs are unknown")
    if d.unversioned:
        d.notes.append("packages seen without a version (installed unpinned): " + _few(d.unversioned, 8))
    modified = [f"{k.name}: {_few(k.modified_files, 3)}" for k in d.packages if k.modified_files]
    if modified:
        d.notes.append("package files changed since install (review, ship the changed copies): "
                       + "; ".join(modified[:5]))
    for lst in d.listeners:
        if lst.loopback_only:
            d.notes.append(f"{lst.proto} port {lst.port} listens on {', '.join(lst.addresses)} only: in a "
                           "container it must listen on all addresses (0.0.0.0 or ::) to be reachable")
    outbound = sorted({f"{(peer.names or [peer.address])[0]}:{peer.port}/{peer.protocol or peer.proto}"
                       for p in d.service.members for peer in p.peers if peer.direction == "outbound"})
    if outbound:
        d.notes.append("talks to (must be reachable from the container): " + _few(outbound, 8))
    if len(d.service.members) > 1:
        d.notes.append(f"{len(d.service.members)} processes in this service; only the main one "
                       f"(pid {d.main.pid}) is started: the others are assumed to be its children")


def sanitize_comment(text: str) -> str:
    """One line of comment text: control characters escaped, undecodable bytes shown as escapes."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: "\\x%02x" % ord(m.group(0)), text)


__all__ = ["Service", "Listener", "Draft", "services", "service_name", "selector_for", "draft",
           "listeners", "sanitize_comment", "HOST_ENV", "NOISE_ENV"]
