"""The one list of probes: their config keys, defaults, needs and fallbacks, and the doctor table.

A probe's ``needs`` are names of :mod:`asbuilt.probes.features` checks. ``plan()`` turns the detected
features into what each probe will do here: run, fall back (and to what), or stay off and why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from ..probes.features import Feature


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    kind: str  # snapshot (scan) or stream (trace / daemon)
    description: str
    needs: Tuple[str, ...] = ()
    default: bool = True
    fallback: str = ""  # what runs instead when a need is missing
    cost: str = "low"


PROBES: List[ProbeSpec] = [
    ProbeSpec("host", "snapshot", "os-release, hostname, kernel, CPU, memory, mounts, DNS resolvers"),
    ProbeSpec("devices", "snapshot", "sysfs block/net/PCI devices and their drivers"),
    ProbeSpec("network", "snapshot", "links, addresses, subnets, routes (rtnetlink)",
              fallback="/proc/net/route and /sys/class/net"),
    ProbeSpec("processes", "snapshot", "procfs: tree, exe, cmdline, user, cwd, cgroup, maps, fds, limits",
              needs=("privileges",), fallback="own processes only, other users' details recorded as gaps"),
    ProbeSpec("sockets", "snapshot", "TCP/UDP/unix sockets to owning process via sock_diag",
              needs=("sock_diag",), fallback="none: sockets recorded as a gap"),
    ProbeSpec("packages", "snapshot", "dpkg/rpm owner, version, install date, origin, modified files"),
    ProbeSpec("exec", "stream", "exec/fork/exit of the traced tree (sched tracepoints)",
              needs=("bcc", "bpf", "tracepoints", "kernel_headers"), fallback="proc connector"),
    ProbeSpec("files", "stream", "opens with flags and result, failed opens (syscall tracepoints)",
              needs=("bcc", "bpf", "tracepoints", "kernel_headers"), fallback="polling /proc/PID/fd"),
    ProbeSpec("net", "stream", "connect/accept/bind/listen, TCP lifecycle (syscall + sock tracepoints)",
              needs=("bcc", "bpf", "tracepoints", "kernel_headers"), fallback="polling sock_diag"),
    ProbeSpec("dns", "stream", "names resolved (uprobe on libc getaddrinfo/gethostbyname)",
              needs=("bcc", "bpf", "uprobes", "kernel_headers"), fallback="DNS in the port capture"),
    ProbeSpec("syscalls", "stream", "syscalls used, counted in kernel (raw_syscalls:sys_enter)",
              needs=("bcc", "bpf", "tracepoints", "kernel_headers"), fallback="none"),
    ProbeSpec("kfunc", "stream", "kernel function counts (kprobe or fentry)",
              needs=("bcc", "bpf", "kprobes|fentry"), fallback="none: reported unavailable", cost="medium"),
    ProbeSpec("capture", "stream", "packets on the process's own ports: protocol spoken per peer",
              needs=("af_packet", "libpcap"), cost="medium", fallback="none"),
]


def _need_ok(need: str, features: Dict[str, Feature]) -> Tuple[bool, str]:
    options = need.split("|")
    reasons = []
    for opt in options:
        feat = features.get(opt)
        if feat is None:
            reasons.append(f"{opt}: not checked")
            continue
        if feat.ok:
            return True, ""
        reasons.append(f"{opt}: {feat.detail}")
    return False, "; ".join(reasons)


def plan(features: Dict[str, Feature]) -> List[Tuple[ProbeSpec, str, str]]:
    """For each probe: (spec, verdict, why). Verdict: run, fallback, off."""
    rows = []
    for spec in PROBES:
        missing = []
        for need in spec.needs:
            ok, why = _need_ok(need, features)
            if not ok:
                missing.append(why)
        if not missing:
            rows.append((spec, "run", ""))
        elif spec.fallback and not spec.fallback.startswith("none"):
            rows.append((spec, "fallback", f"{spec.fallback} ({'; '.join(missing)})"))
        else:
            rows.append((spec, "off", "; ".join(missing)))
    return rows
