"""``/proc/PID/cgroup``: the control groups a process is in, one ``ID:controllers:path`` line each.

Kernel documentation: Documentation/admin-guide/cgroup-v2.rst ("/proc/PID/cgroup"),
Documentation/admin-guide/cgroup-v1/cgroups.rst; ``man 7 cgroups`` ("/proc/[pid]/cgroup"). A v2
(unified) line is ``0::/path``; v1 lines name their controllers (``4:memory:/path``,
``1:name=systemd:/path``). The path may itself contain ``:``.

:func:`derive` is pure: from a cgroup path it names the systemd unit and the container (id and
runtime), for systemd slices/scopes, Docker (systemd and cgroupfs drivers), containerd/CRI,
CRI-O, Podman, Kubernetes pods, LXC/LXD and Amazon ECS.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ._io import pid_path, read_text


@dataclass
class CgroupEntry:
    hierarchy: int = 0
    controllers: List[str] = field(default_factory=list)  # [] for the v2 line
    path: str = ""


@dataclass
class Derived:
    systemd_unit: str = ""  # innermost unit the process is in (outside a container: its service)
    container_id: str = ""
    container_runtime: str = ""  # docker, containerd, crio, podman, kubepods, lxc, ecs
    pod_id: str = ""  # Kubernetes pod UID, or ECS task id


def parse_cgroup(text: str) -> List[CgroupEntry]:
    """Parse the lines; malformed lines (no two ``:``, non-numeric ID) are skipped."""
    out: List[CgroupEntry] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        controllers = [c for c in parts[1].split(",") if c]
        out.append(CgroupEntry(hierarchy=int(parts[0]), controllers=controllers, path=parts[2]))
    return out


def cgroup_path(entries: List[CgroupEntry]) -> str:
    """The one path that places the process: the first that is not ``/`` among the v2 line, the
    v1 ``name=systemd`` line, then the other v1 lines in order (hybrid hosts often keep ``/`` in
    the unified tree while the v1 controllers carry the real placement). ``/`` when all are the
    root; ``""`` when there are no entries."""
    def rank(entry: CgroupEntry) -> int:
        if entry.hierarchy == 0 and not entry.controllers:
            return 0
        if "name=systemd" in entry.controllers:
            return 1
        return 2

    ordered = sorted(entries, key=rank)  # stable: file order within a rank
    for entry in ordered:
        if entry.path and entry.path != "/":
            return entry.path
    return "/" if entries else ""


@functools.lru_cache(maxsize=4096)
def _path_of(text: str) -> str:
    return cgroup_path(parse_cgroup(text))


def read_cgroup(proc_root: str, pid: int) -> str:
    """Read ``/proc/PID/cgroup`` and return :func:`cgroup_path` of it (each distinct text parsed
    once, bounded: processes share cgroups)."""
    return _path_of(read_text(pid_path(proc_root, pid, "cgroup")))


# ------------------------------------------------------------------------------------ derive
_HEX64 = r"[0-9a-f]{64}"
_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")
# systemd cgroup driver: <prefix>-<id>.scope
_SCOPE = re.compile(r"^(docker|cri-containerd|containerd|nerdctl|crio|libpod)-(" + _HEX64 + r")\.scope$")
# containerd/cri-o without systemd delegation: <pod slice>:<runtime>:<id>
_COLON = re.compile(r"^(?:.*:)?(docker|cri-containerd|crio|libpod):(" + _HEX64 + r")$")
# cgroupfs driver parents: /docker/<id>, /moby/<id>, /k8s.io/<id> ...
_PARENT_RUNTIME = {"docker": "docker", "moby": "docker", "actions_job": "docker",
                   "k8s.io": "containerd", "default": "containerd", "libpod_parent": "podman"}
_PREFIX_RUNTIME = {"docker": "docker", "cri-containerd": "containerd", "containerd": "containerd",
                   "nerdctl": "containerd", "crio": "crio", "libpod": "podman"}
_ID = re.compile("^" + _HEX64 + "$")
_LIBPOD_BARE = re.compile(r"^libpod-(" + _HEX64 + r")$")
_ECS_ID = re.compile(r"^(?:" + _HEX64 + r"|[0-9a-f]{32}-[0-9]+)$")
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_LXC_PAYLOAD = "lxc.payload."


def _container(parts: List[str], i: int) -> Optional[Tuple[str, str]]:
    """(runtime, id) when component ``i`` of the path names a container."""
    part = parts[i]
    parent = parts[i - 1] if i > 0 else ""
    match = _SCOPE.match(part)
    if match:
        return _PREFIX_RUNTIME[match.group(1)], match.group(2)
    match = _COLON.match(part)
    if match:
        return _PREFIX_RUNTIME[match.group(1)], match.group(2)
    if _ID.match(part):
        if parent in _PARENT_RUNTIME:
            return _PARENT_RUNTIME[parent], part
        if any(p.startswith("kubepods") for p in parts[:i]):
            return "kubepods", part
    match = _LIBPOD_BARE.match(part)
    if match:
        return "podman", match.group(1)
    if i >= 2 and parts[i - 2] == "ecs" and _ECS_ID.match(part):
        return "ecs", part
    if parent in ("lxc", "lxc.payload") and i == 1:
        return "lxc", part
    if part.startswith(_LXC_PAYLOAD) and i == 0 and len(part) > len(_LXC_PAYLOAD):
        return "lxc", part[len(_LXC_PAYLOAD):]
    return None


def derive(path: str) -> Derived:
    """The systemd unit and container (outermost, as the host's runtime names it) from a cgroup
    path. Inside a container, ``systemd_unit`` is a unit nested within it (or ``""``); the
    container's own scope is not reported as the unit."""
    out = Derived()
    parts = [p for p in path.split("/") if p]
    start = 0
    for i in range(len(parts)):
        found = _container(parts, i)
        if found:
            out.container_runtime, out.container_id = found
            start = i + 1
            for earlier in parts[: i + 1]:
                pod = _POD.search(earlier)
                if pod:
                    out.pod_id = pod.group(1).replace("_", "-")
            if out.container_runtime == "ecs":
                out.pod_id = parts[i - 1]
            break
    for part in reversed(parts[start:]):
        if part.endswith(_UNIT_SUFFIXES):
            out.systemd_unit = part
            break
    return out
