#!/usr/bin/env bash
# Provision one asbuilt test machine (see Vagrantfile and README.md beside this file), as root:
#   1. what this distribution has: Python 3, libpcap, iproute, conntrack, and bcc with the running
#      kernel's headers where the distribution packages bcc for Python 3 (not CentOS 7, whose bcc
#      is Python 2 only: the agent runs there in its no-eBPF fallback mode);
#   2. a Python >= 3.9 (asbuilt's floor): the distribution's when it has one, else a standalone
#      CPython fetched by uv (CentOS 7, Ubuntu 18.04, Amazon Linux 2 ship 3.6-3.8);
#   3. a virtual environment at $ASBUILT_SRC/.venv with asbuilt installed from the synced checkout,
#      and the distribution's bcc module made importable in it;
#   4. systemd/install.sh (unit, config, /usr/local/sbin/asbuilt; the service is not started);
#   5. `asbuilt doctor` and `asbuilt scan`, results in /var/tmp/asbuilt-*.
# Idempotent: `vagrant provision NAME` runs it again after `vagrant rsync NAME`.
# Environment: ASBUILT_SRC (default /opt/asbuilt), ASBUILT_MACHINE (a label for the log),
# ASBUILT_STANDALONE_PYTHON=0 to fail instead of fetching a standalone Python.
set -euo pipefail

src=${ASBUILT_SRC:-/opt/asbuilt}
machine=${ASBUILT_MACHINE:-$(hostname)}
out=/var/tmp
venv=$src/.venv
say() { printf 'provision[%s]: %s\n' "$machine" "$*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root"
[ -f "$src/pyproject.toml" ] || die "$src is not an asbuilt checkout (is the rsync synced folder there?)"
# shellcheck disable=SC1091
. /etc/os-release
major=${VERSION_ID%%.*}
kernel=$(uname -r)
say "$PRETTY_NAME, kernel $kernel"

# ------------------------------------------------------------------ 1. distribution packages
pkg_install() {  # install what exists of the given packages, one at a time; never fail
  local p
  for p in "$@"; do
    if command -v apt-get >/dev/null; then
      apt-get install -y -q --no-install-recommends "$p" >/dev/null 2>&1 || say "not available: $p"
    elif command -v dnf >/dev/null; then
      dnf install -y -q "$p" >/dev/null 2>&1 || say "not available: $p"
    else
      yum install -y -q "$p" >/dev/null 2>&1 || say "not available: $p"
    fi
  done
}

bcc=yes
case "$ID" in
  debian|ubuntu)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    pkg_install python3 python3-venv python3-pip libpcap0.8 iproute2 conntrack rsync curl ca-certificates
    # Ubuntu 20.04 has 3.8 by default and 3.9 in universe.
    if [ "$ID" = ubuntu ] && [ "$VERSION_ID" = 20.04 ]; then pkg_install python3.9 python3.9-venv; fi
    pkg_install python3-bpfcc
    if ! apt-get install -y -q --no-install-recommends "linux-headers-$kernel" >/dev/null 2>&1; then
      # The box's kernel is older than the archive's: take the newest headers and link them, as
      # scripts/setup does (asbuilt's eBPF programs avoid struct offsets).
      arch=$(dpkg --print-architecture)
      if [ "$ID" = debian ]; then meta="linux-headers-$arch"; else meta=linux-headers-generic; fi
      pkg_install "$meta"
      hdr=$(find /usr/src -maxdepth 1 -name 'linux-headers-*' ! -name '*-common' 2>/dev/null | sort -V | tail -n 1)
      if [ -n "$hdr" ] && [ ! -e "/lib/modules/$kernel/build/Makefile" ]; then
        mkdir -p "/lib/modules/$kernel"
        ln -sfn "$hdr" "/lib/modules/$kernel/build"
        say "linked /lib/modules/$kernel/build -> $hdr (headers of another kernel)"
      fi
    fi
    ;;
  centos|rhel)
    if [ "$major" = 7 ]; then
      # CentOS 7 is end of life: its mirrors are gone, the packages live on in the vault.
      sed -i -e 's/^mirrorlist=/#mirrorlist=/' \
             -e 's|^#\?baseurl=http://mirror.centos.org|baseurl=http://vault.centos.org|' \
             /etc/yum.repos.d/CentOS-*.repo
      bcc=no  # python-bcc there is Python 2 only; the agent uses its fallback mode
    fi
    pkg_install python3 python3-pip libpcap iproute conntrack-tools rsync curl tar gzip
    if [ "$bcc" = yes ]; then pkg_install bcc-tools python3-bcc "kernel-devel-$kernel"; fi
    ;;
  amzn)
    pkg_install python3 python3-pip libpcap iproute conntrack-tools rsync tar gzip
    command -v curl >/dev/null || pkg_install curl  # AL2023 ships curl-minimal, which conflicts
    if [ "$major" = 2 ]; then
      # Amazon Linux 2: bcc is in the core repository (Python 3 bindings as python3-bcc on current
      # releases); older images need the BCC extras topic.
      pkg_install "kernel-devel-$kernel" bcc python3-bcc
      if ! rpm -q bcc >/dev/null 2>&1 && command -v amazon-linux-extras >/dev/null; then
        amazon-linux-extras install -y BCC >/dev/null 2>&1 || say "no BCC topic in amazon-linux-extras"
      fi
    else
      pkg_install "kernel-devel-$kernel" bcc-tools python3-bcc
    fi
    ;;
  rocky|almalinux|ol|fedora)
    pkg_install python3 python3-pip libpcap iproute conntrack-tools rsync curl tar gzip \
      bcc-tools python3-bcc "kernel-devel-$kernel"
    ;;
  *)
    die "no recipe for $ID $VERSION_ID"
    ;;
esac

# tracefs and debugfs: bcc attaches through them.
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
if [ -d /sys/kernel/tracing ]; then
  mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
fi

# ------------------------------------------------------------------ 2. a Python >= 3.9
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; }
python=""
for p in python3.13 python3.12 python3.11 python3.10 python3.9 python3; do
  if command -v "$p" >/dev/null && new_enough "$(command -v "$p")"; then python=$(command -v "$p"); break; fi
done
if [ -z "$python" ]; then
  [ "${ASBUILT_STANDALONE_PYTHON:-1}" = 1 ] || die "no Python >= 3.9 here and ASBUILT_STANDALONE_PYTHON=0"
  # uv fetches a relocatable CPython build (glibc 2.17+, so CentOS 7 too) into /opt.
  uv=/opt/asbuilt-uv/uv
  export UV_PYTHON_INSTALL_DIR=/opt/asbuilt-python
  if [ ! -x "$uv" ]; then
    say "no Python >= 3.9 from $ID $VERSION_ID: fetching uv for a standalone CPython 3.11"
    curl -LsSf https://astral.sh/uv/install.sh | env UV_UNMANAGED_INSTALL=/opt/asbuilt-uv sh >/dev/null
  fi
  "$uv" python install 3.11 >/dev/null
  python=$("$uv" python find 3.11)
fi
say "python: $python ($("$python" -c 'import platform; print(platform.python_version())'))"

# ------------------------------------------------------------------ 3. venv with asbuilt
if [ ! -x "$venv/bin/python" ] || [ "$(readlink -f "$venv/bin/python")" != "$(readlink -f "$python")" ]; then
  rm -rf "$venv"
  # --system-site-packages: with the distribution's Python this is where its bcc module is.
  "$python" -m venv --system-site-packages "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$src"

# bcc's Python module is pure Python over libbcc (ctypes), so the distribution's copy works from
# another Python 3 too: link it in when the venv cannot import it yet.
if [ "$bcc" = yes ] && ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mod=""
  for d in /usr/lib/python3/dist-packages /usr/lib/python3*/site-packages /usr/lib64/python3*/site-packages \
           /usr/lib/python2.7/site-packages; do
    if [ -f "$d/bcc/__init__.py" ]; then mod=$d/bcc; break; fi
  done
  if [ -n "$mod" ]; then
    ln -sfn "$mod" "$site/bcc"
    say "linked bcc from $mod"
  fi
fi
if "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
  say "bcc: importable"
else
  say "bcc: not importable: eBPF probes report unavailable, the agent uses its fallback mode"
fi

# ------------------------------------------------------------------ 4. the systemd unit
bash "$src/systemd/install.sh" "$src"
if command -v systemd-analyze >/dev/null && [ -d /run/systemd/system ]; then
  # Older systemd ignores the hardening settings it does not know (with a warning each):
  # keep the list, it says which protections this distribution's systemd gives.
  systemd-analyze verify /etc/systemd/system/asbuilt.service >"$out/asbuilt-verify.txt" 2>&1 || true
  systemd-analyze security asbuilt.service >"$out/asbuilt-security.txt" 2>&1 || true
fi

# ------------------------------------------------------------------ 5. doctor and scan
asbuilt=/usr/local/sbin/asbuilt
"$asbuilt" --version
"$asbuilt" doctor | tee "$out/asbuilt-doctor.txt"
"$asbuilt" doctor --json >"$out/asbuilt-doctor.json"
"$asbuilt" scan -q -o "$out/asbuilt-scan.msgpack"
"$asbuilt" show "$out/asbuilt-scan.msgpack" >"$out/asbuilt-show.txt"
head -n 40 "$out/asbuilt-show.txt"
say "done: $out/asbuilt-doctor.txt, $out/asbuilt-scan.msgpack; start the agent with: systemctl enable --now asbuilt"
