"""The as-built profile: one typed model, rendered as msgpack (canonical), JSON, metrics and text.

Compact facts, not an event log. Units live in field names (``_bytes``, ``_seconds``); times are
Unix seconds (float). Every file, socket and peer says how it was learned (``learned``: ``scan``,
``trace`` or ``capture``). ``to_dict``/``from_dict`` are the only (de)serialisers; ``from_dict``
checks every field's type so a malformed file is rejected with a one-line :class:`ProfileError`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from .errors import ProfileError

SCHEMA_VERSION = 1
PROFILE_KIND = "asbuilt-profile"

# How a fact was learned.
SCAN, TRACE, CAPTURE = "scan", "trace", "capture"

# File classes (see agent/classify.py).
FILE_CLASSES = ("config", "log", "data", "library", "executable", "socket", "device", "pipe",
                "deleted", "anon", "proc", "other")


# --------------------------------------------------------------------------------------- host
@dataclass
class OsRelease:
    id: str = ""
    id_like: str = ""
    name: str = ""
    pretty_name: str = ""
    version_id: str = ""
    version_codename: str = ""


@dataclass
class Kernel:
    release: str = ""
    version: str = ""
    machine: str = ""


@dataclass
class Cpu:
    model: str = ""
    logical_count: int = 0
    physical_count: int = 0
    sockets: int = 0


@dataclass
class Memory:
    total_bytes: int = 0
    available_bytes: int = 0
    swap_total_bytes: int = 0


@dataclass
class Mount:
    device: str = ""
    mountpoint: str = ""
    fstype: str = ""
    options: str = ""
    size_bytes: Optional[int] = None
    used_bytes: Optional[int] = None


@dataclass
class Disk:
    name: str = ""
    size_bytes: int = 0
    model: str = ""
    vendor: str = ""
    rotational: Optional[bool] = None
    removable: Optional[bool] = None
    driver: str = ""
    kind: str = ""  # disk, partition, loop, dm, md ...


@dataclass
class Address:
    address: str = ""
    prefixlen: int = 0
    family: str = ""  # inet, inet6
    subnet: str = ""  # network implied by address/prefixlen, e.g. 10.0.1.0/24
    scope: str = ""


@dataclass
class Nic:
    name: str = ""
    index: int = 0
    mac: str = ""
    mtu: int = 0
    state: str = ""  # operstate: up, down, unknown
    kind: str = ""  # physical, loopback, veth, bridge, vlan, bond, tun, dummy ...
    driver: str = ""
    speed_mbps: Optional[int] = None
    master: str = ""
    addresses: List[Address] = field(default_factory=list)


@dataclass
class Route:
    family: str = ""
    dst: str = ""  # "default" or a CIDR
    gateway: str = ""
    dev: str = ""
    table: str = ""
    protocol: str = ""
    scope: str = ""
    metric: Optional[int] = None
    prefsrc: str = ""


@dataclass
class Dns:
    nameservers: List[str] = field(default_factory=list)
    search: List[str] = field(default_factory=list)
    options: List[str] = field(default_factory=list)


@dataclass
class Device:
    subsystem: str = ""  # pci, block, net ...
    name: str = ""  # bus address or device name
    driver: str = ""
    vendor: str = ""  # vendor id or name
    device: str = ""  # device id or model
    class_name: str = ""


@dataclass
class NetNamespace:
    inode: int = 0
    name: str = ""  # from /run/netns when named
    pids: List[int] = field(default_factory=list)
    nics: List[Nic] = field(default_factory=list)


@dataclass
class Host:
    hostname: str = ""
    os: OsRelease = field(default_factory=OsRelease)
    kernel: Kernel = field(default_factory=Kernel)
    boot_time: float = 0.0
    cpu: Cpu = field(default_factory=Cpu)
    memory: Memory = field(default_factory=Memory)
    disks: List[Disk] = field(default_factory=list)
    mounts: List[Mount] = field(default_factory=list)
    nics: List[Nic] = field(default_factory=list)
    routes: List[Route] = field(default_factory=list)
    default_gateways: List[str] = field(default_factory=list)
    dns: Dns = field(default_factory=Dns)
    devices: List[Device] = field(default_factory=list)
    netns: List[NetNamespace] = field(default_factory=list)
    machine_id: str = ""
    virtualization: str = ""  # e.g. kvm, xen, amazon (from DMI), "" unknown


# ---------------------------------------------------------------------------------- process
@dataclass
class FileRef:
    path: str = ""
    kind: str = "other"  # one of FILE_CLASSES
    mode: str = ""  # r, w, rw, x (exec), a (append), c (create) as observed
    package: Optional[str] = None  # owning package name; None = no package owns it / unknown
    owned: Optional[bool] = None  # True owned, False no package owns it, None package db unknown
    modified: Optional[bool] = None  # differs from what the package shipped
    deleted: bool = False
    learned: str = SCAN
    count: int = 0  # times seen (trace); 0 for a snapshot
    first_seen: float = 0.0
    last_seen: float = 0.0
    error: str = ""  # failed opens: errno name, e.g. ENOENT


@dataclass
class Socket:
    proto: str = ""  # tcp, udp, unix, raw, packet, netlink
    family: str = ""  # inet, inet6, unix ...
    state: str = ""  # LISTEN, ESTABLISHED, ... (tcp); UNCONN for udp
    local_address: str = ""
    local_port: int = 0
    remote_address: str = ""
    remote_port: int = 0
    path: str = ""  # unix socket path
    inode: int = 0
    peer_inode: int = 0  # unix peer
    netns: int = 0
    bytes_sent: Optional[int] = None
    bytes_received: Optional[int] = None
    learned: str = SCAN
    first_seen: float = 0.0
    last_seen: float = 0.0


@dataclass
class Peer:
    """A remote endpoint the process talks to, aggregated over connections."""

    address: str = ""
    port: int = 0
    proto: str = ""  # tcp, udp
    family: str = ""
    direction: str = ""  # outbound (we connected), inbound (they connected to our listener)
    names: List[str] = field(default_factory=list)  # names resolved to this address
    protocol: str = ""  # application protocol spoken (http, tls, postgresql ...)
    details: Dict[str, str] = field(default_factory=dict)  # a few identifying facts (SNI, Host ...)
    connections: int = 0
    bytes_sent: Optional[int] = None
    bytes_received: Optional[int] = None
    local_port: int = 0  # our listener's port, for inbound peers
    host: str = ""  # fleet merge: the fleet host whose listener this peer is ("" = outside the fleet)
    process: str = ""  # fleet merge: identity of the process listening there
    learned: str = SCAN
    first_seen: float = 0.0
    last_seen: float = 0.0


@dataclass
class DnsName:
    name: str = ""
    addresses: List[str] = field(default_factory=list)
    count: int = 0
    learned: str = TRACE
    first_seen: float = 0.0
    last_seen: float = 0.0


@dataclass
class Limit:
    name: str = ""
    soft: str = ""
    hard: str = ""
    unit: str = ""


@dataclass
class Exec:
    """A process the traced tree started during a trace."""

    pid: int = 0
    ppid: int = 0
    path: str = ""
    argv: List[str] = field(default_factory=list)
    time: float = 0.0  # first time seen
    exit_code: Optional[int] = None  # the last one seen
    count: int = 1  # execs of the same path and argv by the same parent


@dataclass
class Process:
    pid: int = 0
    ppid: int = 0
    identity: str = ""  # stable: exe + normalised cmdline + unit/container (agent/identity.py)
    name: str = ""  # comm
    exe: str = ""
    cmdline: List[str] = field(default_factory=list)  # redacted
    user: str = ""
    uid: int = -1
    group: str = ""
    gid: int = -1
    cwd: str = ""
    start_time: float = 0.0
    cgroup: str = ""
    container_id: str = ""
    container_runtime: str = ""  # docker, containerd, podman, kubepods, lxc
    systemd_unit: str = ""
    netns: int = 0
    kernel_thread: bool = False
    cpu_seconds: float = 0.0
    rss_bytes: int = 0
    threads: int = 0
    fd_count: int = 0
    limits: List[Limit] = field(default_factory=list)
    env_names: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)  # allow-listed values only
    exe_package: Optional[str] = None
    libraries: List[FileRef] = field(default_factory=list)
    mapped_files: List[FileRef] = field(default_factory=list)
    files: List[FileRef] = field(default_factory=list)
    failed_opens: List[FileRef] = field(default_factory=list)
    sockets: List[Socket] = field(default_factory=list)
    peers: List[Peer] = field(default_factory=list)
    dns: List[DnsName] = field(default_factory=list)
    execs: List[Exec] = field(default_factory=list)
    syscalls: Dict[str, int] = field(default_factory=dict)
    kernel_functions: Dict[str, int] = field(default_factory=dict)
    instances: int = 1  # short-lived processes of one identity seen during a trace, folded into one
    host: str = ""  # fleet merge: the hostname this process runs on ("" in a one-host profile)
    learned: str = SCAN
    first_seen: float = 0.0
    last_seen: float = 0.0


# --------------------------------------------------------------------------------- packages
@dataclass
class Package:
    name: str = ""
    version: str = ""
    architecture: str = ""
    manager: str = ""  # dpkg, rpm
    install_time: Optional[float] = None
    origin: str = ""  # archive/repository, e.g. "Debian:bookworm/main"; "local" when none has it
    source: str = ""
    modified_files: List[str] = field(default_factory=list)
    used_by: List[str] = field(default_factory=list)  # process identities
    hosts: List[str] = field(default_factory=list)  # fleet merge: hostnames that have it installed


# --------------------------------------------------------------------------------- coverage
@dataclass
class ProbeRun:
    name: str = ""
    status: str = ""  # ok, skipped, unavailable, error
    reason: str = ""
    duration_seconds: float = 0.0
    items: int = 0
    lost_events: int = 0
    mode: str = ""  # e.g. ebpf, fallback-polling


@dataclass
class Gap:
    kind: str = ""  # vanished, denied, unreadable, absent, unsupported, truncated
    subject: str = ""  # "pid 123", a path, a probe name
    detail: str = ""


@dataclass
class Coverage:
    probes: List[ProbeRun] = field(default_factory=list)
    gaps: List[Gap] = field(default_factory=list)
    gaps_dropped: int = 0  # gaps past the cap, counted not kept
    privileged: bool = False
    mode: str = ""


@dataclass
class Profile:
    schema_version: int = SCHEMA_VERSION
    kind: str = PROFILE_KIND
    tool_version: str = ""
    mode: str = "scan"  # scan, trace, run, fleet
    generated_at: float = 0.0
    started_at: float = 0.0
    duration_seconds: float = 0.0
    target_pids: List[int] = field(default_factory=list)  # trace: the pids asked for
    host: Host = field(default_factory=Host)
    processes: List[Process] = field(default_factory=list)
    packages: List[Package] = field(default_factory=list)
    coverage: Coverage = field(default_factory=Coverage)
    hosts: List[Host] = field(default_factory=list)  # fleet merge (mode "fleet"): every host merged


# ------------------------------------------------------------------------- serialisation
_PRIMITIVES = (str, int, float, bool, type(None))
_ALWAYS = ("schema_version", "kind")  # written even at their defaults: they identify the file
_PLANS: Dict[type, tuple] = {}


def _plan(cls: type) -> tuple:
    """(field name, default) per field of a model class, computed once: to_dict's hot path."""
    plan = _PLANS.get(cls)
    if plan is None:
        rows = []
        for f in dataclasses.fields(cls):
            if f.name in _ALWAYS:
                default: Any = _ALWAYS  # a sentinel no value equals
            elif f.default is not dataclasses.MISSING:
                default = f.default
            else:
                default = f.default_factory()  # type: ignore[misc]
            rows.append((f.name, default))
        plan = _PLANS[cls] = tuple(rows)
    return plan


def to_dict(obj: Any) -> Any:
    """Render a model object as plain dicts/lists, leaving out fields at their default (compact)."""
    if isinstance(obj, _PRIMITIVES):
        return obj
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    plan = _PLANS.get(type(obj))
    if plan is None:
        if not dataclasses.is_dataclass(obj):
            return [to_dict(v) for v in obj] if isinstance(obj, tuple) else obj
        plan = _plan(type(obj))
    out = {}
    for name, default in plan:
        value = getattr(obj, name)
        if value is default or value == default:
            continue
        out[name] = value if isinstance(value, _PRIMITIVES) else to_dict(value)
    return out


# msgpack's packer walks lists, dicts and primitives in C and calls back only for model objects:
# one generated function per class turns an object into the same dict to_dict makes, without
# to_dict's per-value recursion and type tests in Python (about twice as fast over a whole host).
_ENCODERS: Dict[type, Callable[[Any], dict]] = {}


def _str_keys(value: dict) -> dict:
    return value if all(type(k) is str for k in value) else {str(k): v for k, v in value.items()}


def _encoder(cls: type) -> Callable[[Any], dict]:
    """The generated ``obj -> dict`` of one model class (fields at their default left out, as to_dict)."""
    enc = _ENCODERS.get(cls)
    if enc is not None:
        return enc
    env: Dict[str, Any] = {"_ALWAYS": _ALWAYS, "_str_keys": _str_keys}
    lines = ["def enc(o):", "    d = {}"]
    for i, (name, default) in enumerate(_plan(cls)):
        env[f"D{i}"] = default
        lines.append(f"    v = o.{name}")
        value = "_str_keys(v)" if isinstance(default, dict) else "v"
        if default is _ALWAYS:
            lines.append(f"    d[{name!r}] = {value}")
        else:
            lines.append(f"    if v is not D{i} and v != D{i}:")
            lines.append(f"        d[{name!r}] = {value}")
    lines.append("    return d")
    exec("\n".join(lines), env)  # noqa: S102 - text built from the class's own field names
    enc = _ENCODERS[cls] = env["enc"]
    return enc


def msgpack_default(obj: Any) -> Any:
    """msgpack ``default=`` hook: model objects as to_dict would render them (tuples pack as arrays)."""
    enc = _ENCODERS.get(type(obj))
    if enc is None:
        if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
            raise TypeError(f"cannot serialise {type(obj).__name__}")
        enc = _encoder(type(obj))
    return enc(obj)


_HINTS: Dict[type, Dict[str, Any]] = {}


def _hints(cls: type) -> Dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(inner, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ProfileError(f"{where}: expected a list, got {type(value).__name__}")
        (inner,) = typing.get_args(tp)
        return [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProfileError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, inner = typing.get_args(tp)
        return {str(k): _convert(inner, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProfileError(f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(f"{where}: expected an integer, got {type(value).__name__}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ProfileError(f"{where}: expected true/false, got {type(value).__name__}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ProfileError(f"{where}: expected a string, got {type(value).__name__}")
        return value
    return value  # Any


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            continue  # unknown keys from a newer minor writer are ignored
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def profile_from_dict(data: Any) -> Profile:
    """Build a Profile from plain data, checking kind, schema version and every field's type."""
    if not isinstance(data, dict) or data.get("kind") != PROFILE_KIND:
        raise ProfileError("not an asbuilt profile")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ProfileError(
            f"profile schema version {version!r} is not supported (this asbuilt reads {SCHEMA_VERSION})")
    return _from_dict(Profile, data, "profile")
