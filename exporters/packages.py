"""``export --format packages`` and ``--format ansible``: what to install and place on the new host.

The packages are those the selected processes use: their executables' packages
(``Process.exe_package``), the owners of the files and libraries they open (``FileRef.package``)
and the profile's packages whose ``used_by`` names one of them, with the version and origin seen on
the source host. A package whose origin is ``local`` (no repository known to the source host
offers that version) is marked LOCAL: it has to be brought over by hand or its pin dropped.

* ``packages.txt``: one installable line per package, ``name=version`` for dpkg (``apt-get
  install``), ``name-version`` for rpm (``yum install``), origin and users as a trailing comment.
* ``playbook.yml``: an Ansible playbook skeleton that installs those packages pinned, copies the
  unowned config files the processes read from ``files/<path>``, creates the directories they
  write to and enables their systemd services; owners and modes are placeholders marked TODO.
  Every value taken from the profile is tagged ``!unsafe`` so Ansible never templates it.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Set, Tuple

from ..agent.model import FileRef, Process, Profile
from .artifact import Artifact
from .graph import clean, process_label

log = logging.getLogger(__name__)

LOCAL = "local"
# uname -m -> dpkg architecture, to tell foreign-architecture (multiarch) packages apart
DPKG_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "i386", "i386": "i386", "armv7l": "armhf",
             "armv6l": "armel", "ppc64le": "ppc64el", "s390x": "s390x", "riscv64": "riscv64",
             "mips64": "mips64el", "loongarch64": "loong64"}
# directories never created by the playbook: pseudo filesystems and the root
NOT_CREATED = ("/proc", "/sys", "/dev")
WRITES = set("wac")


@dataclass
class Wanted:
    """One package to install."""

    name: str
    version: str = ""
    architecture: str = ""
    manager: str = ""  # dpkg, rpm, "" unknown (not in the profile's package list)
    origin: str = ""
    users: List[str] = field(default_factory=list)  # labels of the processes using it
    duplicate: bool = False  # another version of the same package is listed first

    @property
    def local(self) -> bool:
        return self.origin == LOCAL

    def spec(self, native: str = "") -> str:
        """The install argument: ``name[:arch]=version`` (dpkg), ``name-version`` (rpm)."""
        if self.manager == "rpm":
            return f"{self.name}-{self.version}" if self.version else self.name
        name = self.name
        if self.architecture and self.architecture != "all" and native and self.architecture != native:
            name = f"{name}:{self.architecture}"
        return f"{name}={self.version}" if self.version else name


def _refs(p: Process) -> Iterable[FileRef]:
    yield from p.libraries
    yield from p.mapped_files
    yield from p.files


def _split(name: str) -> str:
    """``libc6:amd64`` (dpkg -S form) -> ``libc6``."""
    return name.split(":", 1)[0]


def native_arch(profile: Profile) -> str:
    return DPKG_ARCH.get(profile.host.kernel.machine, "")


def wanted_packages(profile: Profile, processes: List[Process]) -> List[Wanted]:
    """The packages ``processes`` use, sorted by manager, local last, name."""
    labels = {p.identity: process_label(p) for p in processes if p.identity}
    hosts = {p.host for p in processes if p.host}
    by_name: Dict[str, Set[str]] = {}  # package name -> labels of processes that use it
    for p in processes:
        names = {_split(r.package) for r in _refs(p) if r.package}
        if p.exe_package:
            names.add(_split(p.exe_package))
        for n in names:
            by_name.setdefault(n, set()).add(process_label(p))
    rows: Dict[Tuple[str, str, str, str], Wanted] = {}
    for pk in profile.packages:
        users = {labels[i] for i in pk.used_by if i in labels} | by_name.get(pk.name, set())
        if not users or (hosts and pk.hosts and not hosts & set(pk.hosts)):
            continue
        key = (pk.manager, pk.name, pk.architecture, pk.version)
        row = rows.get(key)
        if row is None:
            row = rows[key] = Wanted(pk.name, pk.version, pk.architecture, pk.manager, pk.origin)
        row.users = sorted(set(row.users) | users)
    known = {r.name for r in rows.values()}
    for name, users in by_name.items():
        if name not in known:  # owned by a package the profile's list does not hold: no version known
            rows[("", name, "", "")] = Wanted(name, users=sorted(users))
    out = sorted(rows.values(), key=lambda w: (w.manager or "~", w.local, w.name, w.architecture, w.version))
    seen: Set[Tuple[str, str, str]] = set()
    for w in out:
        key = (w.manager, w.name, w.architecture)
        w.duplicate = key in seen
        seen.add(key)
    return out


def _users(w: Wanted, limit: int = 4) -> str:
    more = len(w.users) - limit
    return ", ".join(w.users[:limit]) + (f" +{more} more" if more > 0 else "")


def plural(n: int, word: str, many: str = "") -> str:
    return f"{n} {word if n == 1 else many or word + 's'}"


def _describe(profile: Profile, processes: List[Process]) -> str:
    procs = plural(len(processes), "process", "processes")
    hosts = sorted({p.host for p in processes if p.host})
    if hosts:
        return f"{procs} on {plural(len(hosts), 'host')} ({', '.join(hosts[:6])}{' ...' if len(hosts) > 6 else ''})"
    h = profile.host
    os_name = h.os.pretty_name or h.os.name or "unknown OS"
    return f"{procs} on {h.hostname or 'the source host'} ({os_name})"


def _generated(profile: Profile) -> str:
    if not profile.generated_at:
        return ""
    when = datetime.datetime.fromtimestamp(profile.generated_at, datetime.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M UTC")


COMMANDS = {"dpkg": "apt-get install", "rpm": "yum install"}


def render_packages(profile: Profile, processes: List[Process]) -> str:
    rows = wanted_packages(profile, processes)
    native = native_arch(profile)
    lines = [f"# asbuilt packages: {plural(len(rows), 'package')} used by {clean(_describe(profile, processes))}",
             f"# profile generated {_generated(profile) or '(time unknown)'} by asbuilt {profile.tool_version or ''}".rstrip(),
             "# Versions are pinned to those seen on the source host; each line ends with the package's origin",
             "# and the processes that use it. Install them all on the new host with:"]
    managers = sorted({w.manager for w in rows if w.manager})
    for m in managers or ["dpkg"]:
        lines.append(f"#   {COMMANDS.get(m, 'install')} $(sed -e 's/#.*//' packages.txt)")
    lines += ["# LOCAL marks a version no repository known to the source host offers: copy the package over",
              "# (dpkg-repack / the original .deb or .rpm) or drop the version pin before installing.", ""]
    if not rows:
        probe = next((r for r in profile.coverage.probes if r.name == "packages"), None)
        why = (f"the package probe {probe.status}" + (f": {probe.reason}" if probe.reason else "")
               if probe is not None and probe.status != "ok" else
               "the selected programs are not from packages, or no package database was read")
        lines.append(f"# No package is known for the selected processes ({clean(why)}).")
        return "\n".join(lines) + "\n"
    section = None
    for w in rows:
        title = (f"{w.manager or 'unknown manager'}"
                 + (f" ({COMMANDS[w.manager]})" if w.manager in COMMANDS else "")
                 + (", LOCAL origin: no repository known to the source host has these versions" if w.local else "")
                 + ("" if w.manager else ": owning package named by the files, version unknown"))
        if title != section:
            if section is not None:
                lines.append("")
            lines.append(f"# --- {title}")
            section = title
        if w.local:
            where = f"LOCAL (origin {w.origin})"
        elif w.origin:
            where = w.origin
        else:
            where = "origin unknown"
        comment = f"{where}; used by {_users(w)}"
        if w.duplicate:
            lines.append(f"# {w.spec(native)}  # another version of the one above, {clean(comment)}")
        else:
            lines.append(f"{w.spec(native)}  # {clean(comment)}")
    return "\n".join(lines) + "\n"


def export_packages(profile: Profile, processes: List[Process], output: str = "") -> List[Artifact]:
    text = render_packages(profile, processes)
    log.info("packages lines=%d", sum(1 for x in text.splitlines() if x and not x.startswith("#")))
    return [Artifact("packages.txt", text.encode("utf-8"))]


# ------------------------------------------------------------------------------ ansible
def yq(text: str) -> str:
    """A YAML double-quoted scalar, tagged ``!unsafe`` (Ansible never templates it)."""
    return "!unsafe " + json.dumps(clean(text), ensure_ascii=False)


def _is_config_read(ref: FileRef) -> bool:
    return (ref.owned is False and ref.kind == "config" and "r" in (ref.mode or "") and not ref.deleted
            and not ref.error and ref.path.startswith("/"))


def config_files(processes: List[Process]) -> List[Tuple[str, List[Process]]]:
    """(path, readers) of the unowned config files the processes read, by path."""
    out: Dict[str, List[Process]] = {}
    for p in processes:
        for ref in p.files:
            if _is_config_read(ref):
                out.setdefault(ref.path, []).append(p)
    return sorted(out.items())


def written_dirs(processes: List[Process]) -> List[Tuple[str, List[str]]]:
    """(directory, users) holding files the processes write, create or append to."""
    out: Dict[str, Set[str]] = {}
    for p in processes:
        for ref in p.files:
            if not (WRITES & set(ref.mode or "")) or ref.kind in ("socket", "device", "pipe", "proc", "anon"):
                continue
            path = ref.path
            if not path.startswith("/") or path.startswith(tuple(d + "/" for d in NOT_CREATED)):
                continue
            d = os.path.dirname(path)
            if d and d != "/":
                out.setdefault(d, set()).add(p.user or str(p.uid))
    return sorted((d, sorted(u for u in users if u and u != "-1")) for d, users in out.items())


def units(processes: List[Process]) -> List[Tuple[str, List[Process]]]:
    out: Dict[str, List[Process]] = {}
    for p in processes:
        u = p.systemd_unit
        if u.endswith(".service") and not u.startswith("user@"):
            out.setdefault(u, []).append(p)
    return sorted(out.items())


def _play(profile: Profile, processes: List[Process], host: str) -> List[str]:
    target = host or "all"
    names = sorted({process_label(p) for p in processes})
    title = f"asbuilt: {host or profile.host.hostname or 'host'} ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"
    out = [f"- name: {yq(title)}",
           f"  hosts: {yq(target)}" + ("" if host else "  # TODO: limit to the new host (-l NEWHOST)"),
           "  become: true",
           "  tasks:"]
    tasks = 0
    native = native_arch(profile)
    rows = [w for w in wanted_packages(profile, processes) if not w.duplicate and w.manager]
    for manager, module in (("dpkg", "ansible.builtin.apt"), ("rpm", "ansible.builtin.yum")):
        for local in (False, True):
            chosen = [w for w in rows if w.manager == manager and w.local == local]
            if not chosen:
                continue
            name = (f"Install the packages the processes use ({manager}, pinned)" if not local else
                    f"Install packages of LOCAL origin ({manager}, pinned)")
            out.append(f"    - name: {yq(name)}")
            if local:
                out.append("      # TODO: no repository known to the source host offers these versions: provide them")
                out.append("      # (a local repository, or copy the packages over) or drop the version pins.")
            out.append(f"      {module}:")
            out.append("        name:")
            for w in chosen:
                out.append(f"          - {yq(w.spec(native))}  # {clean(w.origin or 'origin unknown')}")
            out.append("        state: present")
            tasks += 1
    unknown = [w for w in wanted_packages(profile, processes) if not w.manager]
    if unknown:
        out.append("    # TODO: packages named by the processes' files whose manager and version are unknown: "
                   + clean(", ".join(w.name for w in unknown[:20])))
    for path, readers in config_files(processes):
        users = sorted({p.user or str(p.uid) for p in readers})
        who = ", ".join(sorted({process_label(p) for p in readers}))
        out += [f"    - name: {yq('Place config file ' + path + ' (read by ' + who + ')')}",
                "      ansible.builtin.copy:",
                f"        src: {yq('files' + path)}  # the file as it is on the source host",
                f"        dest: {yq(path)}",
                f"        owner: root  # TODO: the owner on the source host (read by user {clean(', '.join(users))})",
                "        group: root  # TODO: the group on the source host",
                "        mode: \"0644\"  # TODO: the mode on the source host (0600/0640 if it holds secrets)",
                ]
        tasks += 1
    dirs = written_dirs(processes)
    by_owner: Dict[str, List[str]] = {}
    for d, users in dirs:
        by_owner.setdefault(users[0] if len(users) == 1 else "", []).append(d)
    for owner, paths in sorted(by_owner.items()):
        out += [f"    - name: {yq('Create the directories written by ' + (owner and 'user ' + owner or 'the processes'))}",
                "      ansible.builtin.file:",
                "        path: \"{{ item }}\"",
                "        state: directory",
                f"        owner: {yq(owner or 'root')}  # TODO: check the owner on the source host",
                "        mode: \"0755\"  # TODO: the mode on the source host",
                "      loop:"]
        out += [f"        - {yq(d)}" for d in paths]
        tasks += 1
    for unit, procs in units(processes):
        out += [f"    - name: {yq('Enable and start ' + unit)}",
                "      # TODO: if no package ships this unit, copy it too (systemctl cat UNIT on the source host)",
                "      ansible.builtin.systemd:",
                f"        name: {yq(unit)}",
                "        enabled: true",
                "        state: started",
                "        daemon_reload: true"]
        tasks += 1
    if not tasks:
        out += ["    - name: Nothing to install or place was found for these processes",
                "      ansible.builtin.debug:",
                "        msg: \"asbuilt found no package, config file, directory or unit to carry over\""]
    return out


def render_playbook(profile: Profile, processes: List[Process]) -> str:
    out = ["---",
           f"# asbuilt ansible: playbook skeleton for {clean(_describe(profile, processes))}",
           f"# profile generated {_generated(profile) or '(time unknown)'}",
           "# Put each config file under files/ at its absolute path (e.g. files/etc/app/app.conf), review",
           "# every TODO, then: ansible-playbook -i INVENTORY playbook.yml --check --diff (and without --check).",
           "# Values taken from the profile are tagged !unsafe: Ansible never templates them."]
    hosts = sorted({p.host for p in processes})
    for h in hosts:
        out += _play(profile, [p for p in processes if p.host == h], h)
    return "\n".join(out) + "\n"


def export_ansible(profile: Profile, processes: List[Process], output: str = "") -> List[Artifact]:
    return [Artifact("playbook.yml", render_playbook(profile, processes).encode("utf-8"))]
