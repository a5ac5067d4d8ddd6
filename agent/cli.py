"""The ``asbuilt`` command line.

Every expected failure prints one line ``asbuilt: <what>`` on stderr and exits non-zero (2 for bad
input, 1 for a failed write); a traceback only ever means a bug, and then ``--debug`` shows it.
Every option can also be given as an ``ASBUILT_<NAME>`` environment variable (e.g.
``ASBUILT_PROC_ROOT``); the command line wins.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from typing import List, Optional

from . import __version__
from .errors import AsbuiltError, UsageError

log = logging.getLogger("asbuilt")


def _env_default(name: str, default):
    return os.environ.get("ASBUILT_" + name.upper().replace("-", "_"), default)


def _add_roots(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("roots (read a captured tree instead of the live host)")
    g.add_argument("--proc-root", default=_env_default("proc_root", "/proc"), help="procfs root (default /proc)")
    g.add_argument("--sys-root", default=_env_default("sys_root", "/sys"), help="sysfs root (default /sys)")
    g.add_argument("--rootfs", default=_env_default("rootfs", "/"), help="root filesystem (default /)")


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default=_env_default("output", ""),
                   help="write the profile here (.json for JSON, anything else msgpack); mode 0600, atomic")
    p.add_argument("--quiet", "-q", action="store_true", help="do not print the summary")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asbuilt", description="Turn a running Linux server into its as-built record.")
    parser.add_argument("--version", action="version", version=f"asbuilt {__version__}")
    parser.add_argument("--log-level", default=_env_default("log_level", "warning"),
                        choices=["debug", "info", "warning", "error"], help="stderr log level")
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("scan", help="snapshot of the whole host and every process (no tracing)")
    _add_output(p)
    _add_roots(p)
    p.add_argument("--pid", type=int, action="append", default=[],
                   help="only these processes (repeatable; default every process)")
    p.add_argument("--no-packages", action="store_true", help="skip the dpkg/rpm lookup")
    p.add_argument("--no-verify", action="store_true",
                   help="do not hash files to check them against their package's checksums")
    p.add_argument("--kernel-threads", action="store_true", help="include kernel threads")
    p.add_argument("--cache-dir", default=None,
                   help="package-database answers kept between scans, each used only while the files it "
                        "came from are unchanged (default /var/cache/asbuilt as root; ASBUILT_CACHE_DIR)")
    p.add_argument("--no-cache", dest="cache_dir", action="store_const", const="off",
                   help="no package cache")

    p = sub.add_parser("show", help="print a readable summary of a saved profile")
    p.add_argument("profile")
    p.add_argument("--all", action="store_true", help="every process, not only the ones that matter")

    p = sub.add_parser("doctor", help="what this host supports and what each probe will do")
    p.add_argument("--quick", action="store_true", help="skip the kprobe/fentry attach attempts")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("trace", help="attach to a running process and learn what it does")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--duration", default="30s", help="how long, e.g. 30s, 5m (Ctrl-C ends early)")
    p.add_argument("--children", dest="children", action="store_true", default=True)
    p.add_argument("--no-children", dest="children", action="store_false")
    p.add_argument("--no-ebpf", action="store_true", help="proc connector and polling only")
    p.add_argument("--no-packages", action="store_true", help="skip the dpkg/rpm lookup")
    p.add_argument("--no-capture", action="store_true", help="no packet capture on the process's ports")
    p.add_argument("--syscalls", choices=("sampled", "exact", "off"), default="sampled",
                   help="syscall counts: hot syscalls (>1,000/s) sampled 1 in 64 (default), every call "
                        "counted (about twice the per-syscall cost), or off")
    p.add_argument("--pcap", default="", help="also write the captured packets here (pcap, mode 0600)")
    p.add_argument("--progress", action="store_true", help="show progress even with --quiet")
    _add_output(p)

    p = sub.add_parser("run", help="the daemon: rescans, continuous probes, snapshots, /metrics")
    p.add_argument("--config", default=_env_default("config", ""),
                   help="TOML config file (default: built-in defaults; e.g. /etc/asbuilt/asbuilt.toml)")
    p.add_argument("--state-dir", default=None, help="where snapshots go (default /var/lib/asbuilt)")
    p.add_argument("--listen", default=None, help="/metrics address HOST:PORT, or 'off' (default 127.0.0.1:10977)")
    p.add_argument("--interval", default=None, help="rescan interval, e.g. 60s, 5m (default 5m)")
    p.add_argument("--snapshot-interval", default=None, help="snapshot interval (default 15m)")
    p.add_argument("--retention", type=int, default=None, help="snapshots kept (default 48)")
    p.add_argument("--no-ebpf", action="store_true", default=None, help="proc connector and polling only")
    p.add_argument("--no-capture", action="store_true", default=None, help="no packet capture")
    p.add_argument("--select", default=None,
                   help="only these processes (e.g. 'unit:nginx*,container:*'; default every process)")
    p.add_argument("--check-config", action="store_true", help="load and check the config, print it, exit")

    p = sub.add_parser("export", help="migration artifacts from a saved profile (no privileges needed)")
    p.add_argument("--format", "-f", required=True, choices=sorted(FORMATS), help="what to write")
    p.add_argument("profile")
    p.add_argument("--process", "-p", default="",
                   help="which processes: pid:N, unit:X, exe:PATH, name:X, container:ID, user:U, "
                        "identity:I, host:H, or a bare name; ',' for several; wildcards allowed")
    p.add_argument("-o", "--output", default="", help="write here (a directory when the format makes several files)")

    p = sub.add_parser("diff", help="what NEW lacks or adds compared with OLD (exit 1 when they differ)")
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--process", "-p", default="", help="compare only these processes (see export --process)")

    p = sub.add_parser("merge", help="many hosts' profiles into one fleet dependency map")
    p.add_argument("profiles", nargs="+")
    p.add_argument("-o", "--output", required=True, help="the fleet profile to write")
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


DEFAULT_CACHE_DIR = "/var/cache/asbuilt"


def cmd_scan(args) -> int:
    from ..exporters.files import write_profile
    from ..exporters.summary import one_line, render
    from ..probes.base import Context, Roots
    from .scan import scan

    ctx = Context(roots=Roots(proc=args.proc_root, sys=args.sys_root, rootfs=args.rootfs))
    # dpkg's answers kept between scans while dpkg's and apt's files are unchanged (see
    # probes/packages/cache.py); ASBUILT_CACHE_DIR=off (or empty) turns it off.
    cache_dir = getattr(args, "cache_dir", None)
    if cache_dir is None:
        cache_dir = _env_default("cache_dir", DEFAULT_CACHE_DIR if os.geteuid() == 0 else "")
    ctx.options.update(packages=not args.no_packages, verify=not args.no_verify,
                       kernel_threads=args.kernel_threads,
                       cache_dir="" if cache_dir in ("", "off", "none") else cache_dir)
    profile = scan(ctx, pids=args.pid or None)
    if args.output:
        gc.disable()  # encoding builds only acyclic dicts/lists: no collector passes over the profile
        try:
            write_profile(profile, args.output)
        finally:
            gc.enable()
        print(f"asbuilt: wrote {args.output}: {one_line(profile)}", file=sys.stderr)
        # The file is written (fsync'd, renamed): leave without tearing down a heap of a whole
        # host's objects one by one (~0.1 s over 1,000 processes); the kernel frees it at once.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)
    if not args.quiet:
        render(profile, sys.stdout)
    return 0


def cmd_show(args) -> int:
    from ..exporters.summary import render
    from .store import load_profile

    render(load_profile(args.profile), sys.stdout, everything=args.all)
    return 0


def cmd_doctor(args) -> int:
    from ..exporters.summary import render_doctor
    from ..probes.features import detect
    from .registry import plan

    features = detect(costly=not args.quick)
    render_doctor(features, plan(features), sys.stdout, as_json=args.json)
    return 0


def cmd_trace(args) -> int:
    from .trace import run_trace  # issue 3

    return run_trace(args)


def cmd_run(args) -> int:
    from .daemon import run_daemon  # issue 5

    return run_daemon(args)


def cmd_export(args) -> int:
    import importlib

    from ..exporters.files import atomic_write
    from .select import select_processes
    from .store import load_profile

    profile = load_profile(args.profile)
    processes = select_processes(profile, args.process or None)
    module, func = FORMATS[args.format].split(":")
    artifacts = getattr(importlib.import_module(f"..exporters.{module}", __package__), func)(
        profile, processes, output=args.output)
    if not args.output:
        for art in artifacts:
            if art.binary:
                raise UsageError(f"{args.format}: {art.name} is binary; give -o FILE")
            if len(artifacts) > 1:
                sys.stdout.write(f"# ==> {art.name} <==\n")
            sys.stdout.write(art.data.decode("utf-8", "backslashreplace"))
        return 0
    if len(artifacts) == 1:
        atomic_write(args.output, artifacts[0].data)
        print(f"asbuilt: wrote {args.output}", file=sys.stderr)
        return 0
    try:
        os.makedirs(args.output, mode=0o700, exist_ok=True)
    except OSError as err:
        from .errors import from_oserror

        raise from_oserror(err, args.output) from err
    for art in artifacts:
        atomic_write(os.path.join(args.output, art.name), art.data)
    print(f"asbuilt: wrote {len(artifacts)} files to {args.output}/: "
          + ", ".join(a.name for a in artifacts), file=sys.stderr)
    return 0


def cmd_diff(args) -> int:
    import json

    from .diff import diff_profiles, render_diff
    from .store import load_profile

    result = diff_profiles(load_profile(args.old), load_profile(args.new), process=args.process or None)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        render_diff(result, sys.stdout)
    return 0 if result.empty else 1


def cmd_merge(args) -> int:
    from ..exporters.files import write_profile
    from ..exporters.summary import one_line
    from .fleet import merge_profiles
    from .store import load_profile

    fleet = merge_profiles([load_profile(p) for p in args.profiles], sources=args.profiles)
    write_profile(fleet, args.output)
    print(f"asbuilt: wrote {args.output}: {len(fleet.hosts)} hosts, {one_line(fleet)}", file=sys.stderr)
    return 0


# export --format NAME -> "module:function" under asbuilt.exporters; each function takes
# (profile, processes, output="") and returns a list of exporters.artifact.Artifact.
FORMATS = {
    "dockerfile": "dockerfile:export", "ecs-task": "ecs:export", "security-groups": "security_groups:export",
    "seccomp": "seccomp:export", "packages": "packages:export_packages", "ansible": "packages:export_ansible",
    "graph": "graph:export", "html": "html:export",
}

COMMANDS = {"scan": cmd_scan, "show": cmd_show, "doctor": cmd_doctor, "trace": cmd_trace,
            "run": cmd_run, "export": cmd_export, "diff": cmd_diff, "merge": cmd_merge}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help(sys.stderr)
        return 2
    _setup_logging("debug" if args.debug else args.log_level)
    for stream in (sys.stdout, sys.stderr):  # undecodable path bytes print escaped, never crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return COMMANDS[args.command](args)
    except AsbuiltError as err:
        print(f"asbuilt: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("asbuilt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as err:  # a bug: one line unless --debug
        if args.debug:
            raise
        print(f"asbuilt: internal error: {type(err).__name__}: {err} (run with --debug for details)",
              file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
