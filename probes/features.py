"""What this host's kernel and packages allow: the facts behind ``asbuilt doctor`` and probe checks.

Every check asks the kernel (open the socket, make the syscall, look for the tracepoint) rather than
guessing from a kernel version, and returns a :class:`Feature` with ``ok`` and a one-line detail.
Checks that are costly (compiling an eBPF program to try a kprobe) run only when asked.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib.util
import os
import platform
import re
import socket
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

# Capability bits (linux/capability.h).
CAPS = {"CAP_DAC_READ_SEARCH": 2, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13, "CAP_SYS_PTRACE": 19,
        "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38, "CAP_BPF": 39}

NETLINK_SOCK_DIAG, NETLINK_CONNECTOR, NETLINK_NETFILTER = 4, 11, 12
_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351}


@dataclass
class Feature:
    name: str
    ok: bool
    detail: str = ""


def tracefs(sys_root: str = "/sys") -> Optional[str]:
    """The mounted tracefs directory, or None."""
    for cand in TRACEFS_CANDIDATES:
        cand = cand.replace("/sys", sys_root, 1)
        if os.path.isdir(os.path.join(cand, "events")):
            return cand
    return None


def tracepoint_exists(category: str, event: str, sys_root: str = "/sys") -> bool:
    base = tracefs(sys_root)
    return bool(base) and os.path.isdir(os.path.join(base, "events", category, event))


def effective_caps(proc_root: str = "/proc") -> int:
    try:
        with open(os.path.join(proc_root, "self", "status")) as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def check_privileges() -> Feature:
    caps = effective_caps()
    have = [n for n, bit in CAPS.items() if caps >> bit & 1]
    missing = [n for n in ("CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_PTRACE",
                           "CAP_DAC_READ_SEARCH") if n not in have]
    root = os.geteuid() == 0
    if root and not missing:
        return Feature("privileges", True, "root with the capabilities the probes need")
    if "CAP_SYS_ADMIN" in have and root:
        return Feature("privileges", True, "root (CAP_SYS_ADMIN covers bpf/perfmon on this kernel)")
    detail = ("not root; " if not root else "") + ("missing " + ", ".join(missing) if missing else "")
    return Feature("privileges", False, detail.strip("; ") or "unprivileged")


def check_bpf_syscall() -> Feature:
    """Create (and close) a one-element BPF array map via the raw bpf(2) syscall."""
    nr = _BPF_SYSCALL.get(platform.machine())
    if nr is None:
        return Feature("bpf", False, f"unknown bpf syscall number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 30)()
    attr[0], attr[1], attr[2], attr[3] = 2, 4, 4, 1  # BPF_MAP_TYPE_ARRAY, key 4, value 4, 1 entry
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(0), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if fd >= 0:
        os.close(fd)
        return Feature("bpf", True, "bpf(2) map creation works")
    err = ctypes.get_errno()
    return Feature("bpf", False, f"bpf(2) refused: {errno.errorcode.get(err, err)}")


def check_btf(sys_root: str = "/sys") -> Feature:
    path = os.path.join(sys_root, "kernel", "btf", "vmlinux")
    ok = os.path.exists(path)
    return Feature("btf", ok, path if ok else "no /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF off)")


def check_tracepoints(sys_root: str = "/sys") -> Feature:
    base = tracefs(sys_root)
    if not base:
        return Feature("tracepoints", False, "tracefs not mounted (mount -t tracefs tracefs /sys/kernel/tracing)")
    wanted = [("syscalls", "sys_enter_openat"), ("sched", "sched_process_exec"),
              ("raw_syscalls", "sys_enter"), ("sock", "inet_sock_set_state")]
    missing = [f"{c}:{e}" for c, e in wanted if not tracepoint_exists(c, e, sys_root)]
    if missing:
        return Feature("tracepoints", False, f"{base}: missing " + ", ".join(missing))
    return Feature("tracepoints", True, f"{base}: syscalls, sched, raw_syscalls, sock")


def check_uprobes(sys_root: str = "/sys") -> Feature:
    pmu = os.path.join(sys_root, "bus", "event_source", "devices", "uprobe", "type")
    if os.path.exists(pmu):
        return Feature("uprobes", True, "uprobe PMU present")
    base = tracefs(sys_root)
    if base and os.path.exists(os.path.join(base, "uprobe_events")):
        return Feature("uprobes", True, "tracefs uprobe_events present")
    return Feature("uprobes", False, "no uprobe PMU or uprobe_events (CONFIG_UPROBE_EVENTS off)")


def check_lockdown(sys_root: str = "/sys") -> Feature:
    try:
        with open(os.path.join(sys_root, "kernel", "security", "lockdown")) as fh:
            text = fh.read().strip()
    except OSError:
        return Feature("lockdown", True, "no lockdown LSM file (securityfs not mounted or no LSM)")
    mode = text[text.find("[") + 1:text.find("]")] if "[" in text else text
    return Feature("lockdown", mode == "none", f"lockdown: {mode}")


def check_kernel_headers(rootfs: str = "/") -> Feature:
    release = os.uname().release
    build = os.path.join(rootfs, "lib", "modules", release, "build")
    if not os.path.exists(os.path.join(build, "Makefile")):
        return Feature("kernel_headers", False,
                       f"no headers at /lib/modules/{release}/build (scripts/setup links them)")
    target = os.path.realpath(build)
    if release in target:
        return Feature("kernel_headers", True, f"{target}")
    return Feature("kernel_headers", True,
                   f"{target} (another kernel's: tracepoint arguments only, no struct offsets)")


def check_bcc() -> Feature:
    """Whether bcc is installed, and its version, without importing it: importing bcc maps libbcc
    with all of LLVM (~75 MB resident); the agent compiles in a child (probes/ebpf/compile_child)."""
    spec = importlib.util.find_spec("bcc")
    if spec is None:
        return Feature("bcc", False, "python bcc not importable (Debian: python3-bpfcc)")
    version = "installed"
    for where in spec.submodule_search_locations or []:
        try:
            with open(os.path.join(where, "version.py"), encoding="utf-8") as fh:
                found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", fh.read())
        except OSError:
            continue
        if found:
            version = found.group(1)
            break
    return Feature("bcc", True, f"bcc {version}" if version != "installed" else version)


def check_libpcap() -> Feature:
    name = ctypes.util.find_library("pcap")
    return Feature("libpcap", bool(name), name or "libpcap not found (Debian: libpcap0.8)")


def _netlink(proto: int, groups: int = 0, kind: int = socket.SOCK_RAW) -> Optional[str]:
    try:
        with socket.socket(socket.AF_NETLINK, kind, proto) as s:
            s.bind((0, groups))
        return None
    except OSError as err:
        return errno.errorcode.get(err.errno, str(err))


def check_sock_diag() -> Feature:
    err = _netlink(NETLINK_SOCK_DIAG)
    return Feature("sock_diag", err is None, "netlink sock_diag" if err is None else f"sock_diag: {err}")


def check_conntrack(proc_root: str = "/proc") -> Feature:
    err = _netlink(NETLINK_NETFILTER)
    if err:
        return Feature("conntrack", False, f"netfilter netlink: {err}")
    loaded = os.path.exists(os.path.join(proc_root, "sys", "net", "netfilter", "nf_conntrack_max"))
    return Feature("conntrack", True, "nf_conntrack loaded" if loaded else
                   "netfilter netlink works; nf_conntrack not loaded (no table to read until it is)")


def check_proc_connector() -> Feature:
    err = _netlink(NETLINK_CONNECTOR, groups=1, kind=socket.SOCK_DGRAM)
    return Feature("proc_connector", err is None, "netlink connector CN_IDX_PROC" if err is None
                   else f"proc connector: {err}")


def check_af_packet() -> Feature:
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0):
            pass
        return Feature("af_packet", True, "AF_PACKET raw sockets")
    except (OSError, AttributeError) as err:
        return Feature("af_packet", False, f"AF_PACKET: {getattr(err, 'strerror', None) or err}")


def check_kprobes() -> Feature:
    from .ebpf import kfunc  # compiles and attaches a trivial program: costly, on request
    reason = kfunc.check_kprobes()
    return Feature("kprobes", reason is None, reason or "kprobe attach works")


def check_fentry() -> Feature:
    from .ebpf import kfunc
    reason = kfunc.check_fentry()
    return Feature("fentry", reason is None, reason or "fentry attach works")


CHEAP: List[Callable[[], Feature]] = [
    check_privileges, check_bpf_syscall, check_btf, check_tracepoints, check_uprobes, check_lockdown,
    check_kernel_headers, check_bcc, check_libpcap, check_sock_diag, check_conntrack,
    check_proc_connector, check_af_packet,
]
COSTLY: List[Callable[[], Feature]] = [check_kprobes, check_fentry]


def detect(costly: bool = False) -> Dict[str, Feature]:
    """Run every check (the costly attach attempts only when asked); never raises."""
    out: Dict[str, Feature] = {}
    for check in CHEAP + (COSTLY if costly else []):
        name = check.__name__.replace("check_", "")
        try:
            feat = check()
        except Exception as err:  # a check that breaks is itself a finding
            feat = Feature(name, False, f"check failed: {type(err).__name__}: {err}")
        out[feat.name] = feat
    return out
