#!/usr/bin/env bash
# Install the asbuilt agent as a systemd service, from a checkout whose .venv scripts/setup made:
#   /etc/systemd/system/asbuilt.service   the hardened unit (0644, replaced when it changed)
#   /etc/asbuilt/asbuilt.toml             the example config (0600, directory 0700), only when absent:
#                                         an existing config is never touched
#   /var/lib/asbuilt                      state directory (0700; systemd also creates it)
#   /usr/local/sbin/asbuilt               symlink to CHECKOUT/.venv/bin/asbuilt (the unit's ExecStart)
# It neither enables nor starts the service, and runs systemctl (daemon-reload) only when systemd is
# the running init (/run/systemd/system exists) and ROOT is the live system. Idempotent.
#
#   bash systemd/install.sh [CHECKOUT] [ROOT]
# CHECKOUT defaults to this file's checkout; ROOT (also the ROOT environment variable) installs under
# another root directory instead of /, e.g. for tests or image builds.
set -euo pipefail

say() { printf 'install: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

here=${1:-$(cd "$(dirname "$0")/.." && pwd)}
here=$(cd "$here" 2>/dev/null && pwd) || die "no such checkout: ${1:-}"
root=${2:-${ROOT:-}}
root=${root%/}
src="$here/systemd"
exe="$here/.venv/bin/asbuilt"

if [ ! -f "$src/asbuilt.service" ] || [ ! -f "$src/asbuilt.toml" ]; then
  die "$here is not an asbuilt checkout (no systemd/asbuilt.service)"
fi
[ -x "$exe" ] || die "$exe is missing: run scripts/setup first"
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
  die "run as root (it writes /etc and /usr/local/sbin), or give a ROOT directory"
fi
case "$here/" in
  /tmp/*|/var/tmp/*)
    say "warning: $here is under a temporary directory, which the service does not see (PrivateTmp=yes): ExecStart will fail there" ;;
esac

changed=0
# put SRC DEST MODE: copy when the content differs, then make sure of the mode.
put() {
  if ! cmp -s "$1" "$2"; then
    install -D -m "$3" "$1" "$2"
    say "wrote $2"
    changed=1
  fi
  chmod "$3" "$2"
}

mkdir -p "$root/etc/systemd/system" "$root/usr/local/sbin"
put "$src/asbuilt.service" "$root/etc/systemd/system/asbuilt.service" 0644

install -d -m 0700 "$root/etc/asbuilt" "$root/var/lib/asbuilt"
chmod 0700 "$root/etc/asbuilt" "$root/var/lib/asbuilt"
conf="$root/etc/asbuilt/asbuilt.toml"
if [ -e "$conf" ] || [ -L "$conf" ]; then
  cmp -s "$src/asbuilt.toml" "$conf" || say "kept $conf (yours; the example is $src/asbuilt.toml)"
else
  install -m 0600 "$src/asbuilt.toml" "$conf"
  say "wrote $conf"
fi

link="$root/usr/local/sbin/asbuilt"
if [ "$(readlink "$link" 2>/dev/null || true)" != "$exe" ]; then
  ln -sfn "$exe" "$link"
  say "linked $link -> $exe"
fi

if [ -n "$root" ]; then
  say "installed under $root"
elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  if [ "$changed" = 1 ]; then systemctl daemon-reload; fi
  say "installed; start it with: systemctl enable --now asbuilt"
else
  say "installed; systemd is not the running init here, so nothing was reloaded"
fi
