"""``asbuilt export --format seccomp``: a Docker/OCI seccomp profile from the syscalls a trace saw.

The profile denies everything (``SCMP_ACT_ERRNO``, ``defaultErrnoRet`` 1 = EPERM) and allows the
union of ``Process.syscalls`` over the selected processes, plus a small set the container runtime
needs after it has loaded the filter and before the program runs, and a few calls a trace window
rarely sees (see :data:`RUNTIME_GROUPS`). The layout is moby's profile format
(``profiles/seccomp``: ``defaultAction``, ``defaultErrnoRet``, ``architectures``, ``syscalls`` of
``{names, action, comment}``), which is also the OCI runtime spec's ``linux.seccomp`` shape: Docker
(``--security-opt seccomp=FILE``), Podman, containerd/CRI (Kubernetes ``Localhost`` profiles) and
runc read it. Notes live in each syscall group's ``comment``, the field moby defines for that; no
unknown top-level keys are added.

Names the syscall table did not know (``syscall_<nr>``) cannot be written in this format: they are
left out and said so in a comment. A profile without syscall counts (a scan, or a trace without
eBPF) is a one-line :class:`UsageError`.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Dict, Iterable, List, Sequence, Set

from ..agent.errors import UsageError
from ..agent.model import Host, Process, Profile
from .artifact import Artifact

log = logging.getLogger(__name__)

NAME = "seccomp.json"
ERRNO_EPERM = 1

# Host.kernel.machine -> the seccomp architectures a container on that host may run, native first
# (moby's default profile lists the same sub-architectures: 32-bit and x32 binaries on x86_64, arm
# binaries on aarch64). A machine not listed gets no "architectures": the runtime uses the native one.
ARCHITECTURES: Dict[str, Sequence[str]] = {
    "x86_64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "amd64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "aarch64": ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
    "arm64": ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
    "i386": ("SCMP_ARCH_X86",),
    "i686": ("SCMP_ARCH_X86",),
    "armv7l": ("SCMP_ARCH_ARM",),
    "ppc64le": ("SCMP_ARCH_PPC64LE",),
    "s390x": ("SCMP_ARCH_S390X", "SCMP_ARCH_S390"),
    "riscv64": ("SCMP_ARCH_RISCV64",),
}

# Allowed although a trace may not have seen them, each group with why. The runtime part follows
# the runc base profile that kubernetes-sigs/security-profiles-operator measured and publishes
# (examples/baseprofile-runc.yaml, runc 1.2): what runc itself calls between loading the filter and
# the program's first instruction. Docker's default (no-new-privileges off) loads the filter before
# runc drops users and capabilities, hence the privilege calls; runc >= 1.2 first execs its small
# static runc-dmz binary, hence its start-up calls. Names a host's architecture lacks (arch_prctl
# on aarch64) are ignored by libseccomp-based runtimes.
RUNTIME_GROUPS: Sequence[tuple] = (
    ("process start and end a trace window rarely covers: the runtime execs the program, the "
     "program exits (exit_group; exit for its threads), and returns from signal handlers "
     "(rt_sigreturn: without it the first handled signal kills the process)",
     ("execve", "exit", "exit_group", "rt_sigreturn")),
    ("container runtime (runc) after the filter is loaded: drop users, groups and capabilities "
     "(Docker's default, no-new-privileges off, loads the filter before this)",
     ("capget", "capset", "prctl", "setgid", "setgroups", "setuid", "getuid")),
    ("container runtime (runc) after the filter is loaded: check its parent, find the executable, "
     "signal the exec fifo, close inherited descriptors, chdir to the working directory",
     ("chdir", "close", "close_range", "faccessat2", "fcntl", "fstat", "fstatfs", "getcwd",
      "getdents64", "getpid", "getppid", "newfstatat", "openat", "read", "recvfrom", "write")),
    ("container runtime (runc) after the filter is loaded: the Go runtime's scheduler, timers and "
     "signals, and runc-dmz's start-up (runc >= 1.2)",
     ("arch_prctl", "brk", "epoll_ctl", "epoll_pwait", "futex", "mmap", "mprotect", "nanosleep",
      "sched_yield", "set_tid_address", "tgkill")),
)

_UNKNOWN = re.compile(r"^syscall_\d+$")
_VALID = re.compile(r"^[a-z_][a-z0-9_]*$")


def architectures(hosts: Iterable[Host]) -> List[str]:
    """The seccomp architectures of the hosts' machines, native first, each once."""
    out: List[str] = []
    for host in hosts:
        for arch in ARCHITECTURES.get((host.kernel.machine or "").strip().lower(), ()):
            if arch not in out:
                out.append(arch)
    return out


def _hosts_of(profile: Profile, processes: Sequence[Process]) -> List[Host]:
    """The host each process runs on (fleet profiles keep one Host per merged machine)."""
    by_name = {h.hostname: h for h in profile.hosts}
    hosts: List[Host] = []
    for p in processes:
        host = by_name.get(p.host, profile.host) if p.host else profile.host
        if all(host is not h for h in hosts):
            hosts.append(host)
    return hosts or [profile.host]


def _who(processes: Sequence[Process]) -> str:
    names = sorted({p.name or p.exe.rsplit("/", 1)[-1] or str(p.pid) for p in processes})
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{len(processes)} process{'es' if len(processes) != 1 else ''} ({shown})"


def build_profile(profile: Profile, processes: Sequence[Process]) -> dict:
    """The seccomp profile as plain data; UsageError when no syscall was observed."""
    traced = [p for p in processes if p.syscalls]
    if not traced:
        raise UsageError("no syscalls observed: trace the process with eBPF first")
    observed: Set[str] = set()
    unknown: Set[str] = set()
    for p in traced:
        for name in p.syscalls:
            if _UNKNOWN.match(name) or not _VALID.match(name):
                unknown.add(name)
            else:
                observed.add(name)
    if not observed:
        raise UsageError("no named syscalls observed (only " + ", ".join(sorted(unknown)[:5])
                         + "): this profile cannot be written as a seccomp profile")
    if unknown:
        log.warning("seccomp unnamed_syscalls=%s left out (no name in the syscall table)",
                    ",".join(sorted(unknown)))

    notes = [f"observed: the syscalls {_who(traced)} made during asbuilt {profile.mode or 'trace'}"
             + (f" ({profile.duration_seconds:g} s)" if profile.duration_seconds else "")
             + (f" on {profile.host.hostname}" if profile.host.hostname else "")
             + "; code paths the window did not exercise (errors, reloads, shutdown) are not here"]
    untraced = [p for p in processes if not p.syscalls]
    if untraced:
        notes.append(f"{_who(untraced)} selected without syscall counts: not covered")
    if unknown:
        notes.append("left out, no name in the syscall table: " + ", ".join(sorted(unknown)))
    runs = [r for r in profile.coverage.probes if r.name == "syscalls"]
    if any(r.lost_events for r in runs):
        notes.append(f"the syscall probe lost {sum(r.lost_events for r in runs)} events: the list may be short")

    groups = [{"names": sorted(observed), "action": "SCMP_ACT_ALLOW", "comment": "; ".join(notes)}]
    seen = set(observed)
    for why, names in RUNTIME_GROUPS:
        extra = sorted(set(names) - seen)
        seen.update(extra)
        if extra:
            groups.append({"names": extra, "action": "SCMP_ACT_ALLOW",
                           "comment": "not observed, allowed for the " + why})

    out: dict = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": ERRNO_EPERM}
    arches = architectures(_hosts_of(profile, traced))
    if arches:
        out["architectures"] = arches
    else:
        log.warning("seccomp machine=%r unknown: no architectures listed (the runtime uses its native one)",
                    profile.host.kernel.machine)
    out["syscalls"] = groups
    return out


def export(profile: Profile, processes: List[Process], output: str = "") -> List[Artifact]:
    """``seccomp.json``: pass it to ``docker run --security-opt seccomp=seccomp.json``."""
    data = build_profile(profile, processes)
    return [Artifact(NAME, (json.dumps(data, indent=2) + "\n").encode())]
