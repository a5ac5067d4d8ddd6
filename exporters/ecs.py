"""``asbuilt export --format ecs-task``: an ECS/Fargate task definition draft (RegisterTaskDefinition input).

One container per service of the selection (see ``_export_common.services``): the image is a
placeholder to replace, ports from the listeners, ``awslogs`` logging, ``environment`` for the
allow-listed values seen, ``secrets`` (an SSM parameter, or a Secrets Manager secret for secret-looking
names, both as ARN placeholders) for every other variable and for each value redacted from the
command line, ``entryPoint``/``command`` from the observed command line (redacted values become
``${NAME}`` expanded by ``sh -c`` from those secrets), ``user``, ``workingDirectory``, and a volume
mounted on each directory written. Task CPU and memory are sized from what was observed (resident
memory, average CPU since start) with headroom, rounded up to a valid Fargate combination; the
reasoning and what the profile could not know go in the containers' ``dockerLabels``
(``asbuilt.*``), since the JSON has no comments. The output validates against botocore's
RegisterTaskDefinition input model.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Dict, List, Set, Tuple

from ..agent import __version__
from ..agent.model import Process, Profile
from ..agent.redact import secret_class
from ._export_common import Draft, draft, services
from .artifact import Artifact

log = logging.getLogger(__name__)

MIB = 1 << 20
CPU_HEADROOM = 2.0  # times the average observed: room for peaks the average hides
MEMORY_HEADROOM = 1.5  # times the resident memory seen once
# Fargate task sizes: cpu units -> valid memory (MiB).
FARGATE_SIZES: List[Tuple[int, List[int]]] = [
    (256, [512, 1024, 2048]),
    (512, list(range(1024, 4096 + 1, 1024))),
    (1024, list(range(2048, 8192 + 1, 1024))),
    (2048, list(range(4096, 16384 + 1, 1024))),
    (4096, list(range(8192, 30720 + 1, 1024))),
    (8192, list(range(16384, 61440 + 1, 4096))),
    (16384, list(range(32768, 122880 + 1, 8192))),
]
_ARCH = {"x86_64": "X86_64", "amd64": "X86_64", "aarch64": "ARM64", "arm64": "ARM64"}
_APP_PROTOCOLS = {"http": "http", "http2": "http2", "grpc": "grpc"}


def fargate_size(vcpu: float, memory_mib: float) -> Tuple[int, int]:
    """The smallest valid Fargate (cpu units, memory MiB) with at least ``vcpu`` and ``memory_mib``."""
    units = vcpu * 1024
    for cpu, memories in FARGATE_SIZES:
        if cpu < units:
            continue
        for mem in memories:
            if mem >= memory_mib:
                return cpu, mem
    return FARGATE_SIZES[-1][0], FARGATE_SIZES[-1][1][-1]


def _name(text: str, limit: int = 255) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-_")
    return (name or "app")[:limit]


def _cpu_average(profile: Profile, p: Process) -> Tuple[float, float]:
    """(average cores, seconds it was averaged over) for one process: CPU since start / lifetime."""
    end = profile.generated_at or p.last_seen
    lifetime = end - p.start_time if p.start_time and end > p.start_time else profile.duration_seconds
    if lifetime <= 0:
        return 0.0, 0.0
    return p.cpu_seconds / lifetime, lifetime


def _sizing(profile: Profile, drafts: List[Draft]) -> Tuple[int, int, str]:
    rss = sum(p.rss_bytes for d in drafts for p in d.service.members)
    cores, cpu_s, span = 0.0, 0.0, 0.0
    for d in drafts:
        for p in d.service.members:
            avg, lifetime = _cpu_average(profile, p)
            cores += avg
            cpu_s += p.cpu_seconds
            span = max(span, lifetime)
    want_cpu = max(cores * CPU_HEADROOM, 0.25)
    want_mem = max(rss * MEMORY_HEADROOM / MIB, 512)
    cpu, mem = fargate_size(want_cpu, want_mem)
    why = (f"observed: resident memory {rss / MIB:.1f} MiB (one reading, not a peak); CPU {cpu_s:.2f} s over "
           f"{span:.0f} s alive = {cores:.3f} vCPU on average. Wanted {want_cpu:.2f} vCPU "
           f"(x{CPU_HEADROOM:g}, at least 0.25) and {want_mem:.0f} MiB (x{MEMORY_HEADROOM:g}, at least 512): "
           f"smallest Fargate size that fits is cpu {cpu} ({cpu / 1024:g} vCPU), memory {mem} MiB.")
    if not rss and not cpu_s:
        why = "nothing observed about CPU or memory: the smallest Fargate size is a placeholder"
    return cpu, mem, why


def _value_from(family: str, name: str) -> str:
    if secret_class(name):
        return f"arn:aws:secretsmanager:REGION:ACCOUNT:secret:{family}/{name}"
    return f"arn:aws:ssm:REGION:ACCOUNT:parameter/{family}/{name}"


def _container(profile: Profile, family: str, d: Draft, cname: str, volumes: Dict[str, str]) -> dict:
    c: dict = {
        "name": cname,
        "image": f"ACCOUNT.dkr.ecr.REGION.amazonaws.com/{family}:latest",
        "essential": True,
    }
    labels: Dict[str, str] = {
        "asbuilt.source": f"{profile.mode} profile of {profile.host.hostname or '?'} by asbuilt {__version__}",
        "asbuilt.process": f"{d.main.name} pid {d.main.pid} identity {d.main.identity or '?'}",
        "asbuilt.image": "placeholder: build it from asbuilt export --format dockerfile, push, put its URI here",
    }
    ports = []
    for lst in d.listeners:
        pm: dict = {"containerPort": lst.port, "hostPort": lst.port, "protocol": lst.proto}
        app = _APP_PROTOCOLS.get(lst.app_protocol)
        if app:
            pm["name"] = f"{cname.lower()[:40].strip('-_') or 'port'}-{lst.port}-{lst.proto}".replace("_", "-")
            pm["appProtocol"] = app
        ports.append(pm)
    if ports:
        c["portMappings"] = ports
    if d.secret_refs:
        c["entryPoint"] = ["/bin/sh", "-c"]
        c["command"] = [d.shell_command()]
        labels["asbuilt.command"] = ("redacted command-line values are read at run time from the secrets "
                                     + ", ".join(d.secret_refs))
    elif d.program:
        c["entryPoint"] = [d.program]
        if d.args:
            c["command"] = list(d.args)
    env = [{"name": k, "value": v} for k, v in sorted(d.env_values.items())]
    if env:
        c["environment"] = env
    names: List[str] = []
    for name in d.env_required + d.secret_refs:
        if name not in names and name not in d.env_values:
            names.append(name)
    if names:
        c["secrets"] = [{"name": n, "valueFrom": _value_from(family, n)} for n in names]
    if d.uid > 0:
        c["user"] = f"{d.uid}:{d.gid if d.gid >= 0 else d.uid}"
    elif d.uid == 0:
        labels["asbuilt.user"] = "ran as root on the host: consider a dedicated user"
    if d.cwd:
        c["workingDirectory"] = d.cwd
    mounts = []
    for path in d.volumes:
        vname = volumes.setdefault(path, _name(f"{cname}-{path.strip('/').replace('/', '-')}" or cname))
        mounts.append({"sourceVolume": vname, "containerPath": path, "readOnly": False})
    if mounts:
        c["mountPoints"] = mounts
        labels["asbuilt.volumes"] = ("written directories get task-scoped storage (lost when the task stops): "
                                     "add efsVolumeConfiguration to keep them")
    c["logConfiguration"] = {
        "logDriver": "awslogs",
        "options": {"awslogs-group": f"/ecs/{family}", "awslogs-region": "REGION",
                    "awslogs-stream-prefix": cname, "awslogs-create-group": "true"},
    }
    for lim in d.main.limits:
        if lim.name == "Max open files" and lim.soft.isdigit() and lim.hard.isdigit():
            c["ulimits"] = [{"name": "nofile", "softLimit": int(lim.soft), "hardLimit": int(lim.hard)}]
    if len(d.service.members) > 1:
        c["linuxParameters"] = {"initProcessEnabled": True}
    for i, note in enumerate(d.notes, 1):
        labels[f"asbuilt.note.{i:02d}"] = note
    c["dockerLabels"] = labels
    return c


def build(profile: Profile, processes: List[Process]) -> dict:
    """The RegisterTaskDefinition input for the selected services."""
    drafts = [draft(profile, s) for s in services(profile, processes)]
    family = _name(drafts[0].name if len(drafts) == 1 else (profile.host.hostname or "asbuilt") + "-services")
    cpu, mem, why = _sizing(profile, drafts)
    volumes: Dict[str, str] = {}
    containers: List[dict] = []
    taken: Set[str] = set()
    for d in drafts:
        cname, n = _name(d.name), 2
        while cname in taken:
            cname, n = f"{_name(d.name)}-{n}", n + 1
        taken.add(cname)
        containers.append(_container(profile, family, d, cname, volumes))
    containers[0]["dockerLabels"]["asbuilt.sizing"] = why
    ports: Dict[Tuple[int, str], str] = {}
    for c in containers:  # awsvpc: the containers of a task share one network namespace
        for pm in c.get("portMappings", []):
            other = ports.setdefault((pm["containerPort"], pm["protocol"]), c["name"])
            if other != c["name"]:
                c["dockerLabels"][f"asbuilt.conflict.{pm['containerPort']}"] = (
                    f"port {pm['containerPort']}/{pm['protocol']} is also {other}'s: containers of one awsvpc "
                    "task share the network; split them into separate task definitions")
    task: dict = {
        "family": family,
        "requiresCompatibilities": ["FARGATE"],
        "networkMode": "awsvpc",
        "cpu": str(cpu),
        "memory": str(mem),
        "executionRoleArn": "arn:aws:iam::ACCOUNT:role/ecsTaskExecutionRole",
        "containerDefinitions": containers,
    }
    arch = _ARCH.get(profile.host.kernel.machine)
    if arch:
        task["runtimePlatform"] = {"operatingSystemFamily": "LINUX", "cpuArchitecture": arch}
    if volumes:
        task["volumes"] = [{"name": v} for v in sorted(set(volumes.values()))]
    tags = [{"key": "asbuilt:generator", "value": f"asbuilt {__version__}"}]
    if profile.host.hostname:
        tags.append({"key": "asbuilt:source-host", "value": _name(profile.host.hostname, 256)})
    task["tags"] = tags
    return task


def _clean(value):
    """Undecodable bytes (surrogate escapes from the profile) become U+FFFD: the JSON stays valid UTF-8."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


def export(profile: Profile, processes: List[Process], output: str = "") -> List[Artifact]:
    """One ``task-definition.json`` artifact (``aws ecs register-task-definition --cli-input-json``)."""
    task = build(profile, processes)
    log.debug("export format=ecs-task family=%s containers=%d cpu=%s memory=%s", task["family"],
              len(task["containerDefinitions"]), task["cpu"], task["memory"])
    text = json.dumps(_clean(task), indent=2, ensure_ascii=True) + "\n"
    return [Artifact(name="task-definition.json", data=text.encode("ascii"))]


__all__ = ["export", "build", "fargate_size", "FARGATE_SIZES"]
