"""``asbuilt export --format dockerfile``: a Dockerfile draft for one service of a saved profile.

The base image matches the observed OS release (``debian`` 12 -> ``debian:bookworm-slim``, ``ubuntu``
20.04 -> ``ubuntu:20.04``, ``amzn`` 2 -> ``amazonlinux:2``, ``centos`` 7 -> ``centos:7``, RHEL -> UBI,
Rocky, Alma, Fedora, Oracle, Alpine, openSUSE; anything else: a commented best guess). Then:
the packages the service used, pinned to the versions seen (``apt-get install pkg=version``,
``yum``/``dnf install pkg-version``), less what the base image already has; ``COPY`` of the files no
package owns that it read (the build context must mirror their paths); ``VOLUME`` for the directories
it wrote; ``EXPOSE`` for its listeners; ``ENV`` for allow-listed values, comments naming every other
variable it needs; ``USER``, ``WORKDIR``; ``ENTRYPOINT``/``CMD`` in exec form from the observed command
line, where each redacted value becomes a run-time ``${NAME}`` expanded by ``sh -c`` (no value is
ever written); and closing comments on what the profile could not know.

Several unrelated services in the selection is a usage error naming ``--process`` selectors.
"""
from __future__ import annotations

import datetime
import json
import logging
import re
from typing import Dict, List, Optional, Tuple

from ..agent import __version__
from ..agent.errors import UsageError
from ..agent.model import OsRelease, Package, Process, Profile
from ._export_common import Draft, draft, sanitize_comment, selector_for, services
from .artifact import Artifact

log = logging.getLogger(__name__)

# Packages in the official base images (required/essential priority): never reinstalled or pinned.
_DPKG_BASE = frozenset((
    "adduser", "apt", "base-files", "base-passwd", "bash", "bsdutils", "coreutils", "dash", "debconf",
    "debian-archive-keyring", "debianutils", "diffutils", "dpkg", "e2fsprogs", "findutils", "gpgv",
    "grep", "gzip", "hostname", "init-system-helpers", "libacl1", "libapt-pkg6.0", "libattr1",
    "libaudit-common", "libaudit1", "libblkid1", "libbz2-1.0", "libc-bin", "libc6", "libcap-ng0",
    "libcap2", "libcom-err2", "libcrypt1", "libdb5.3", "libdebconfclient0", "libext2fs2", "libffi8",
    "libgcc-s1", "libgcrypt20", "libgmp10", "libgnutls30", "libgpg-error0", "libhogweed6", "libidn2-0",
    "liblz4-1", "liblzma5", "libmd0", "libmount1", "libnettle8", "libp11-kit0", "libpam-modules",
    "libpam-modules-bin", "libpam-runtime", "libpam0g", "libpcre2-8-0", "libpcre3", "libseccomp2",
    "libselinux1", "libsemanage-common", "libsemanage2", "libsepol2", "libsmartcols1", "libss2",
    "libstdc++6", "libsystemd0", "libtasn1-6", "libtinfo6", "libudev1", "libunistring2", "libuuid1",
    "libxxhash0", "libzstd1", "login", "logsave", "mawk", "mount", "ncurses-base", "ncurses-bin",
    "passwd", "perl-base", "sed", "sysvinit-utils", "tar", "tzdata", "usr-is-merged", "util-linux",
    "util-linux-extra", "zlib1g", "libgssapi-krb5-2", "libk5crypto3", "libkeyutils1", "libkrb5-3",
    "libkrb5support0", "libnsl2", "libtirpc3", "libtirpc-common", "libprocps8", "procps"))
_DPKG_BASE_PATTERNS = (re.compile(r"^gcc-\d+-base$"), re.compile(r"^libunistring\d+$"),
                       re.compile(r"^libgnutls\d+$"), re.compile(r"^libhogweed\d+$"),
                       re.compile(r"^libnettle\d+$"), re.compile(r"^libffi\d+$"))
_RPM_BASE = frozenset((
    "filesystem", "setup", "basesystem", "glibc", "glibc-common", "glibc-minimal-langpack",
    "glibc-langpack-en", "bash", "coreutils", "coreutils-single", "libgcc", "libstdc++", "ncurses-base",
    "ncurses-libs", "zlib", "libselinux", "libsepol", "pcre", "pcre2", "libacl", "libattr", "libcap",
    "sed", "grep", "gawk", "tzdata", "rpm", "rpm-libs", "info", "libcom_err", "keyutils-libs",
    "krb5-libs", "xz-libs", "bzip2-libs", "libzstd", "lz4-libs", "popt", "libxcrypt", "audit-libs",
    "libffi", "p11-kit", "p11-kit-trust", "ca-certificates", "crypto-policies", "openssl-libs",
    "elfutils-libelf", "libsmartcols", "libblkid", "libuuid", "libmount", "gmp", "libtasn1",
    "libgpg-error", "libgcrypt", "sqlite-libs", "libdb", "nss-softokn-freebl", "chkconfig", "yum",
    "dnf", "libdnf", "microdnf", "system-release", "amazon-linux-repo-cdn", "redhat-release",
    "rocky-release", "almalinux-release", "centos-release", "fedora-release"))
# Users the base images already have.
_DPKG_USERS = frozenset(("root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news",
                         "uucp", "proxy", "www-data", "backup", "list", "irc", "gnats", "_apt", "nobody"))
_RPM_USERS = frozenset(("root", "bin", "daemon", "adm", "lp", "sync", "shutdown", "halt", "mail",
                        "operator", "games", "ftp", "nobody"))

_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._@+,:=%~/-]*$")
_QUOTABLE_PATH = re.compile(r"^/[^\x00-\x1f\x7f\"\\$*?\[\]]*$")  # JSON form: spaces allowed, no globs/vars
_PKG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9+._-]*$")
_PKG_VERSION = re.compile(r"^[A-Za-z0-9.+~:_-]+$")
_USER_NAME = re.compile(r"^[a-z_][a-z0-9_.-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ------------------------------------------------------------------------------- base image
def base_image(os_release: OsRelease, manager: str = "") -> Tuple[str, str, str]:
    """(image, installer, note) for an os-release; installer is apt, yum, dnf, apk or ""; note is
    non-empty when the image is a guess."""
    ident = (os_release.id or "").lower()
    ver = os_release.version_id or ""
    code = os_release.version_codename or ""
    major = ver.split(".")[0]
    like = (os_release.id_like or "").lower().split()
    if ident == "debian":
        if code:
            return f"debian:{code}-slim", "apt", ""
        if major.isdigit():
            return f"debian:{major}-slim", "apt", ""
        return "debian:stable-slim", "apt", "Debian release unknown: stable assumed"
    if ident == "ubuntu":
        if ver:
            return f"ubuntu:{ver}", "apt", ""
        return f"ubuntu:{code or 'latest'}", "apt", "" if code else "Ubuntu release unknown"
    if ident == "amzn":
        return f"amazonlinux:{major or 'latest'}", ("yum" if major == "2" else "dnf"), \
            "" if major else "Amazon Linux release unknown"
    if ident == "centos":
        if major.isdigit() and int(major) >= 8 and "stream" in (os_release.name or "").lower() + \
                (os_release.pretty_name or "").lower():
            return f"quay.io/centos/centos:stream{major}", "dnf", ""
        if major:
            return f"centos:{major}", ("yum" if int(major or 0) <= 7 else "dnf"), \
                "" if int(major) <= 7 else "CentOS 8 is end of life: consider Rocky or AlmaLinux"
    if ident == "rhel" and major:
        return f"registry.access.redhat.com/ubi{major}/ubi:{ver}", ("yum" if major == "7" else "dnf"), ""
    if ident == "rocky" and ver:
        return f"rockylinux:{ver if int(major or 0) < 9 else major}", "dnf", ""
    if ident == "almalinux" and ver:
        return f"almalinux:{ver}", "dnf", ""
    if ident == "fedora" and ver:
        return f"fedora:{ver}", "dnf", ""
    if ident == "ol" and major:
        return f"oraclelinux:{major}", ("yum" if major == "7" else "dnf"), ""
    if ident == "alpine" and ver:
        return f"alpine:{'.'.join(ver.split('.')[:2])}", "apk", ""
    if ident in ("opensuse-leap", "sles") and ver:
        return f"opensuse/leap:{ver}", "zypper", "" if ident == "opensuse-leap" else \
            "SLES: the openSUSE Leap image of the same release is the nearest public match"
    # a guess from ID_LIKE, then from the package manager seen
    what = os_release.pretty_name or ident or "unknown"
    if "debian" in like or "ubuntu" in like or (not like and manager == "dpkg"):
        return "debian:stable-slim", "apt", f"OS {what!r} not recognised: a Debian-like image guessed"
    if any(x in like for x in ("rhel", "fedora", "centos")) or manager == "rpm":
        return "rockylinux:9", "dnf", f"OS {what!r} not recognised: a RHEL-like image guessed"
    return "debian:stable-slim", "apt", f"OS {what!r} not recognised: Debian guessed"


def _in_base(installer: str, name: str) -> bool:
    if installer == "apt":
        return name in _DPKG_BASE or any(p.match(name) for p in _DPKG_BASE_PATTERNS)
    if installer in ("yum", "dnf"):
        return name in _RPM_BASE
    return False


_NATIVE_ARCH = {"x86_64": ("amd64", "x86_64"), "aarch64": ("arm64", "aarch64"), "armv7l": ("armhf", "armv7hl"),
                "i686": ("i386", "i686"), "s390x": ("s390x", "s390x"), "ppc64le": ("ppc64el", "ppc64le")}


def _pin(installer: str, pkg: Package, machine: str) -> str:
    native = _NATIVE_ARCH.get(machine, ("", ""))
    arch = pkg.architecture
    if installer == "apt":
        qual = f":{arch}" if arch and arch not in ("all", native[0]) and native[0] else ""
        return f"{pkg.name}{qual}={pkg.version}"
    suffix = f".{arch}" if arch and arch not in ("noarch", native[1]) and native[1] else ""
    return f"{pkg.name}-{pkg.version}{suffix}"


def _install(installer: str, words: List[str]) -> List[str]:
    if installer == "apt":
        return (["RUN apt-get update \\", " && apt-get install -y --no-install-recommends \\"]
                + [f"      {w} \\" for w in words] + [" && rm -rf /var/lib/apt/lists/*"])
    if installer in ("yum", "dnf"):
        return ([f"RUN {installer} install -y \\"] + [f"      {w} \\" for w in words]
                + [f" && {installer} clean all"])
    if installer == "apk":
        return ["RUN apk add --no-cache \\"] + [f"      {w} \\" for w in words[:-1]] + [f"      {words[-1]}"]
    if installer == "zypper":
        return (["RUN zypper --non-interactive install \\"] + [f"      {w} \\" for w in words]
                + [" && zypper clean --all"])
    return []


# ------------------------------------------------------------------------------- quoting
def _comment(text: str) -> str:
    line = sanitize_comment(text)
    return "# " + (line + "." if line.endswith("\\") else line)


def _json(words: List[str]) -> str:
    return json.dumps([w.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for w in words])


def _env_value(value: str) -> Optional[str]:
    if re.search(r"[\x00-\x1f\x7f]", value):
        return None
    value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def _copy_line(path: str, is_dir: bool) -> Optional[str]:
    suffix = "/" if is_dir else ""
    if _SAFE_PATH.match(path):
        return f"COPY {path[1:]}{suffix} {path}{suffix}"
    if _QUOTABLE_PATH.match(path) and path.strip() == path:
        return "COPY " + _json([path[1:] + suffix, path + suffix])
    return None


# ------------------------------------------------------------------------------- rendering
def _choose(profile: Profile, processes: List[Process]) -> Draft:
    found = services(profile, processes)
    if len(found) > 1:
        shown = "; ".join(selector_for(s) for s in found[:5]) + ("; ..." if len(found) > 5 else "")
        raise UsageError(f"{len(found)} unrelated services selected, a Dockerfile holds one: pick it with "
                         f"--process, e.g. {shown}")
    return draft(profile, found[0])


def _manager(profile: Profile) -> str:
    counts: Dict[str, int] = {}
    for pkg in profile.packages:
        counts[pkg.manager] = counts.get(pkg.manager, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else ""


def render(profile: Profile, d: Draft) -> str:
    """The Dockerfile text for one drafted service."""
    host = profile.host
    image, installer, guess = base_image(host.os, _manager(profile))
    notes = list(d.notes)
    when = datetime.datetime.fromtimestamp(profile.generated_at or 0, datetime.timezone.utc)
    out: List[str] = [
        _comment(f"Dockerfile drafted by asbuilt {__version__} from a {profile.mode} profile of "
                 f"{host.hostname or 'an unnamed host'} ({host.os.pretty_name or host.os.id or 'OS unknown'}), "
                 f"{when:%Y-%m-%d %H:%M} UTC."),
        _comment(f"Service {d.name}: {d.main.name} pid {d.main.pid}, identity {d.main.identity or '?'}."),
        "# A draft to review, not a proven build: read the notes at the end.",
    ]
    if guess:
        out.append(_comment(f"Base image is a best guess: {guess}."))
    out.append(f"FROM {image}")

    # packages
    machine = host.kernel.machine
    own = {"apt": "dpkg", "yum": "rpm", "dnf": "rpm", "zypper": "rpm"}.get(installer, "")
    wanted = [k for k in d.packages if k.manager == own]
    mismatched = sorted({k.name for k in d.packages} - {k.name for k in wanted})
    if mismatched:
        notes.append(f"packages of another manager than the base image's {installer}: {', '.join(mismatched[:8])}")
    base = [k for k in wanted if _in_base(installer, k.name)]
    pinned, bad = [], []
    for k in wanted:
        if k in base:
            continue
        if _PKG_NAME.match(k.name) and _PKG_VERSION.match(k.version):
            pinned.append(_pin(installer, k, machine))
        else:
            bad.append(k.name)
    loose = [n for n in d.unversioned if _PKG_NAME.match(n) and not _in_base(installer, n)]
    if bad:
        notes.append("package names or versions not usable on a command line (left out): " + ", ".join(bad[:5]))
    words = sorted(set(pinned)) + sorted(set(loose))
    out.append("")
    if words and installer in ("apt", "yum", "dnf", "apk", "zypper"):
        out.append("# Packages the service used, pinned to the versions seen on the host.")
        if base:
            out.append(_comment("Already in the base image, not pinned (seen: "
                                + ", ".join(f"{k.name} {k.version}" for k in base[:12])
                                + (" ..." if len(base) > 12 else "") + ")."))
        local = [k.name for k in wanted if k.origin == "local" and k not in base]
        if local:
            out.append(_comment("No configured archive offered these versions when profiled (origin local): "
                                + ", ".join(local[:8]) + "; a pinned version that left the archive needs a "
                                "snapshot archive or a relaxed pin."))
        if loose:
            out.append(_comment("Seen without a version, so not pinned: " + ", ".join(loose[:8])))
        out.extend(_install(installer, words))
    elif not profile.packages:
        out.append("# No package data in the profile: install what the program needs here.")
    else:
        out.append("# The service used no package beyond the base image's.")

    # user
    user_line = ""
    chown = ""
    if d.uid == 0 or d.user == "root":
        out.append("")
        out.append("# Ran as root on the host: consider a dedicated user (useradd, then USER).")
    elif d.uid > 0:
        known = _DPKG_USERS if installer == "apt" else _RPM_USERS
        group = d.group if d.group and _USER_NAME.match(d.group) else d.user
        chown = f"{d.uid}:{d.gid if d.gid >= 0 else d.uid}"
        if d.user and _USER_NAME.match(d.user):
            user_line = f"USER {d.user}"
            if d.user not in known and installer in ("apt", "yum", "dnf"):
                gid = d.gid if d.gid >= 0 else d.uid
                out += ["", _comment(f"The service ran as {d.user} (uid {d.uid}, gid {gid})."),
                        f"RUN (getent group {group} >/dev/null || groupadd --system --gid {gid} {group}) \\",
                        f" && useradd --system --no-log-init --uid {d.uid} --gid {gid} --home-dir / "
                        f"--shell /usr/sbin/nologin {d.user}"]
        else:
            user_line = f"USER {chown}"
    else:
        notes.append("the user the service ran as is unknown: USER left out")

    # files
    copies = [(c, _copy_line(c[0], c[1])) for c in d.copies]
    if copies:
        out += ["", "# Files no package owns that the service read (or changed package files). The build",
                "# context must hold each one at the same path relative to the context's root, e.g.",
                "#   tar -C / -cf - PATH... | tar -C CONTEXT -xf -"]
        for (path, _, why), line in copies:
            if line is None:
                notes.append(f"not copied, its name cannot be written in a COPY line: {path!r}")
                continue
            out.append(_comment(why))
            out.append(line)

    volumes = [v for v in d.volumes if _QUOTABLE_PATH.match(v)]
    for v in d.volumes:
        if v not in volumes:
            notes.append(f"written directory not declared, its name cannot be written safely: {v!r}")
    if volumes:
        out += ["", "# Directories the service wrote to (logs, data): keep them out of the image."]
        if chown:
            out.append("RUN mkdir -p " + " ".join(volumes) + f" && chown {chown} " + " ".join(volumes))
        out.append("VOLUME " + _json(volumes))

    if d.listeners:
        out += ["", "# Listeners (" + ", ".join(
            f"{lst.port}/{lst.proto} on {' '.join(lst.addresses)}" + (f" {lst.app_protocol}" if lst.app_protocol
                                                                     else "") for lst in d.listeners) + ")."]
        out.append("EXPOSE " + " ".join(f"{lst.port}/{lst.proto}" for lst in d.listeners))

    # environment
    env_lines = []
    for name, value in sorted(d.env_values.items()):
        quoted = _env_value(value) if _ENV_NAME.match(name) else None
        if quoted is None:
            notes.append(f"environment variable {name} has a value that cannot be written in ENV")
        else:
            env_lines.append(f"ENV {name}={quoted}")
    if env_lines or d.env_host or d.env_required:
        out += ["", "# Environment: allow-listed values as seen; host-specific ones shown, not set."]
        out += env_lines
        for name, value in sorted(d.env_host.items()):
            out.append(_comment(f"seen, not set: {name}={value}"))
        for name in d.env_required:
            out.append(_comment(f"required at run time: {name} (value not recorded)"))

    if d.cwd and d.cwd != "/":
        if _QUOTABLE_PATH.match(d.cwd) and d.cwd.strip() == d.cwd:
            out += ["", f"WORKDIR {d.cwd}"]
        else:
            notes.append(f"working directory cannot be written in WORKDIR: {d.cwd!r}")
    if user_line:
        out += ["", user_line]

    # command
    out.append("")
    if d.secret_refs:
        for ref in d.secret_refs:
            out.append(_comment(f"${{{ref}}} stands for a value redacted from the command line: give it at run "
                                f"time (docker run -e {ref}=..., or a secret store), never in the image."))
        out.append("ENTRYPOINT " + _json(["/bin/sh", "-c", d.shell_command(), d.program or "app"]))
    elif d.program:
        out.append("ENTRYPOINT " + _json([d.program]))
        if d.args:
            out.append("CMD " + _json(d.args))
    else:
        out.append("# ENTRYPOINT unknown: fill in the program to run.")

    if notes:
        out += ["", "# What the profile could not tell (review before building):"]
        out += [_comment("- " + n) for n in notes]
    return "\n".join(out) + "\n"


def export(profile: Profile, processes: List[Process], output: str = "") -> List[Artifact]:
    """One ``Dockerfile`` artifact for the selected service (UsageError when several are selected)."""
    d = _choose(profile, processes)
    text = render(profile, d)
    log.debug("export format=dockerfile service=%s pid=%d packages=%d copies=%d volumes=%d",
              d.name, d.main.pid, len(d.packages), len(d.copies), len(d.volumes))
    return [Artifact(name="Dockerfile", data=text.encode("utf-8", "backslashreplace"))]


__all__ = ["export", "render", "base_image"]
