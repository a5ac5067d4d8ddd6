"""Kernel function call counts of the traced tree (``vfs_read``, ``tcp_sendmsg`` ...).

fentry (BPF trampolines, needs BTF) is preferred, kprobes are the fallback; the kernel side is
``kfunc.bpf.c``. Whether either works is found out by trying: :func:`check_fentry` and
:func:`check_kprobes` load a do-nothing program on a harmless function and detach it, and turn
a failure into one line naming what the kernel said plus the facts around it (kernel lockdown
mode from ``/sys/kernel/security/lockdown``, whether the kprobe PMU and tracefs
``kprobe_events`` exist; see kernel_lockdown(7)). They never raise.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ...agent.errors import ProbeUnavailable
from ..base import Context
from .tracer import StreamingProbe, TraceSession, check_bpf

DEFAULT_FUNCTIONS = ("vfs_read", "vfs_write", "tcp_sendmsg")
KFUNC_KEYS_MAX = 16384
_CHECK_FUNCTION = "vfs_read"


@dataclass
class KfuncObservation:
    pid: int
    function: str
    count: int  # calls since the previous drain


def parse_lockdown(text: str) -> str:
    """The active mode of ``none [integrity] confidentiality``; "" when none is marked."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return ""


def lockdown_mode(sys_root: str = "/sys") -> str:
    """The kernel lockdown mode, "" when unknown (no securityfs or no lockdown LSM)."""
    try:
        with open(os.path.join(sys_root, "kernel/security/lockdown"), encoding="utf-8") as fh:
            return parse_lockdown(fh.read())
    except OSError:
        return ""


def _kprobe_interface(sys_root: str) -> bool:
    if os.path.exists(os.path.join(sys_root, "bus/event_source/devices/kprobe")):
        return True
    return any(os.path.exists(os.path.join(sys_root, base, "kprobe_events"))
               for base in ("kernel/tracing", "kernel/debug/tracing"))


@contextlib.contextmanager
def _captured_stderr() -> Iterator[List[str]]:
    """Capture fd 2 (libbpf writes its reasons there) into the yielded list's one string."""
    out: List[str] = [""]
    with tempfile.TemporaryFile() as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out[0] = tmp.read().decode("utf-8", "replace")


def _last_line(*texts: str) -> str:
    for text in texts:
        lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
        if lines:
            return lines[-1][:160]
    return ""


def _facts(sys_root: str, kprobes: bool) -> str:
    facts = []
    if kprobes and not _kprobe_interface(sys_root):
        facts.append("the kernel offers no kprobe events (no kprobe PMU, no tracefs kprobe_events)")
    mode = lockdown_mode(sys_root)
    if mode and mode != "none":
        facts.append(f"kernel lockdown={mode}")
    return "; ".join(facts)


def _load_and_attach(load: Callable[[], int], attach: Callable[[int], int]) -> str:
    """Load a program and attach it, then drop both; "" when both worked, else what the kernel said."""
    try:
        prog = load()
    except OSError as err:
        return f"load said: {err.strerror}"
    try:
        os.close(attach(prog))
    except OSError as err:
        return f"attach said: {err.strerror}" + (f": {err.filename}" if err.filename else "")
    finally:
        os.close(prog)
    return ""


def _check_kprobes_direct(sys_root: str, function: str) -> Optional[str]:
    """Load a "return 0" kprobe program and attach it to ``function`` through the kprobe PMU, with
    plain syscalls (no bcc, no compile: a check must not cost the ~130 MB a compile child does)."""
    from . import bpfsys

    said = _load_and_attach(
        lambda: bpfsys.prog_load(bpfsys.PROG_TYPE_KPROBE,
                                 kern_version=bpfsys.kernel_version_code(os.uname().release)),
        lambda prog: bpfsys.attach_probe("kprobe", prog, function, sys_root=sys_root))
    if not said:
        return None
    return "kprobes unavailable: " + "; ".join(x for x in (_facts(sys_root, kprobes=True), said) if x)


def _check_fentry_direct(sys_root: str, function: str) -> Optional[str]:
    """Load a "return 0" fentry program on ``function`` (its id from the kernel's BTF) and attach it."""
    from . import bpfsys

    btf = os.path.join(sys_root, "kernel/btf/vmlinux")
    try:
        btf_id = bpfsys.btf_func_id(btf, function)
    except (OSError, LookupError, ValueError) as err:
        return f"fentry unavailable: no BTF for {function} ({btf}: {err})"
    said = _load_and_attach(
        lambda: bpfsys.prog_load(bpfsys.PROG_TYPE_TRACING, bpfsys.ATTACH_TRACE_FENTRY, btf_id),
        bpfsys.raw_tracepoint_open)
    if not said:
        return None
    return "fentry unavailable: " + "; ".join(x for x in (said, _facts(sys_root, kprobes=False)) if x)


class Checks:
    """Both checks, answered by :meth:`result` — (kprobes reason, fentry reason), None meaning it
    works. They load two-instruction programs with plain syscalls: ~0.1 s, no compile."""

    def __init__(self, sys_root: str = "/sys", function: str = _CHECK_FUNCTION):
        self.sys_root, self.function = sys_root, function

    def result(self) -> Tuple[Optional[str], Optional[str]]:
        kprobes = check_kprobes(self.sys_root, self.function)
        return kprobes, check_fentry(self.sys_root, self.function) if kprobes else None


def check_kprobes(sys_root: str = "/sys", function: str = _CHECK_FUNCTION,
                  bpf_cls=None) -> Optional[str]:
    """None when a kprobe on ``function`` attaches here; else ``kprobes unavailable: <why>``.
    ``bpf_cls`` (tests: a fake bcc class) runs the check through that class instead."""
    if bpf_cls is None:
        return _check_kprobes_direct(sys_root, function)
    return _check_kprobes_here(sys_root, function, bpf_cls)


def _check_kprobes_here(sys_root: str, function: str, bpf_cls) -> Optional[str]:
    """The kprobe check through a bcc-shaped ``bpf_cls`` (the tests' fake: this kernel refuses kprobes)."""
    BPF = bpf_cls
    bpf = None
    err_text = ""
    with _captured_stderr() as cap:
        try:
            bpf = BPF(text=b"int asbuilt_check(void *ctx) { return 0; }")
            bpf.attach_kprobe(event=function.encode(), fn_name=b"asbuilt_check")
            bpf.detach_kprobe(event=function.encode())
        except Exception as err:  # bcc raises bare Exception
            err_text = str(err) or type(err).__name__
        finally:
            if bpf is not None:
                with contextlib.suppress(Exception):
                    bpf.cleanup()
    if not err_text:
        return None
    facts = _facts(sys_root, kprobes=True)
    said = _last_line(cap[0]) or _last_line(err_text)
    return "kprobes unavailable: " + "; ".join(x for x in (facts, f"attach said: {said}") if x)


def check_fentry(sys_root: str = "/sys", function: str = _CHECK_FUNCTION,
                 bpf_cls=None) -> Optional[str]:
    """None when an fentry program on ``function`` loads and attaches; else ``fentry unavailable: <why>``.
    ``bpf_cls`` (tests: a fake bcc class) runs the check through that class instead."""
    if bpf_cls is None:
        return _check_fentry_direct(sys_root, function)
    return _check_fentry_here(sys_root, function, bpf_cls)


def _check_fentry_here(sys_root: str, function: str, bpf_cls) -> Optional[str]:
    """The fentry check through a bcc-shaped ``bpf_cls`` (the tests' fake)."""
    BPF = bpf_cls
    try:
        supported = BPF.support_kfunc()
    except Exception:
        supported = False
    if not supported:
        return "fentry unavailable: the kernel or bcc lacks BPF trampoline support (BTF, fentry)"
    bpf = None
    err_text = ""
    with _captured_stderr() as cap:
        try:  # bcc attaches KFUNC_PROBE programs while loading them
            bpf = BPF(text=f"KFUNC_PROBE({function}) {{ return 0; }}".encode())
        except Exception as err:
            err_text = str(err) or type(err).__name__
        finally:
            if bpf is not None:
                with contextlib.suppress(Exception):
                    bpf.cleanup()
    if not err_text:
        return None
    facts = _facts(sys_root, kprobes=False)
    said = _last_line(cap[0]) or _last_line(err_text)
    return "fentry unavailable: " + "; ".join(x for x in (f"load said: {said}", facts) if x)


def programs(functions: Sequence[str], mode: str) -> str:
    """The per-function C handlers for ``mode`` ("fentry" or "kprobe")."""
    out = []
    for idx, fn in enumerate(functions):
        if not fn.replace("_", "").isalnum():
            raise ValueError(f"not a kernel function name: {fn!r}")
        if mode == "fentry":
            out.append(f"KFUNC_PROBE({fn}) {{ return kfunc_count({idx}); }}")
        else:
            out.append(f"int kfunc_count_{idx}(struct pt_regs *ctx) {{ return kfunc_count({idx}); }}")
    return "\n".join(out)


class KfuncProbe(StreamingProbe):
    """Counts of chosen kernel functions per traced process (fentry, else kprobes)."""

    name = "kfunc"
    description = "how often the traced processes enter chosen kernel functions"
    default = False
    needs = ("root", "bpf", "kprobes or fentry")
    cost = "medium"

    def __init__(self, functions: Sequence[str] = DEFAULT_FUNCTIONS, bpf_cls=None) -> None:
        super().__init__()
        self.functions = list(functions)
        self.bpf_cls = bpf_cls  # tests: a fake bcc BPF class (this machine cannot run kprobes)
        self.mode = ""
        self.attached: List[str] = []
        self._last: Dict[Tuple[int, int], int] = {}

    def check(self, ctx: Context) -> Optional[str]:
        if self.bpf_cls is None:
            reason = check_bpf(ctx)
            if reason:
                return reason
        fn = self.functions[0] if self.functions else _CHECK_FUNCTION
        fentry = check_fentry(ctx.roots.sys, fn, self.bpf_cls)
        if fentry is None:
            self.mode = "fentry"
            return None
        kprobes = check_kprobes(ctx.roots.sys, fn, self.bpf_cls)
        if kprobes is None:
            self.mode = "kprobe"
            return None
        self.mode = ""
        return f"{kprobes}; {fentry}"

    def sources(self, ctx: Context):
        return [("kfunc", dict(KFUNC_KEYS_MAX=KFUNC_KEYS_MAX,
                               KFUNC_PROGRAMS=programs(self.functions, self.mode or "kprobe")))]

    def start(self, ctx: Context, pids: Sequence[int], follow_children: bool = True) -> None:
        """Check (which picks fentry or kprobe), then attach in a session of its own."""
        if not self.mode:
            reason = self.check(ctx)
            if reason:
                raise ProbeUnavailable(reason)
        load: Optional[Callable] = None
        if self.bpf_cls is not None:
            cls = self.bpf_cls
            load = lambda text, **_: cls(text=text)  # noqa: E731
        session = TraceSession(ctx, [self], follow_children=follow_children, load=load)
        session.start(pids)
        self._own_session = True

    def hand_attached(self):
        if self.mode == "fentry":
            return []
        return [(f"kfunc_count_{idx}", "KPROBE") for idx in range(len(self.functions))]

    def attach(self, session) -> None:
        if self.mode == "fentry":
            self.attached = list(self.functions)
            return
        for idx, fn in enumerate(self.functions):
            try:
                session.bpf.attach_kprobe(event=fn.encode(), fn_name=f"kfunc_count_{idx}".encode())
                self.attached.append(fn)
            except Exception as err:  # bcc: bare Exception when a function is not traceable
                session.ctx.gaps.add("unsupported", f"kprobe {fn}", _last_line(str(err)))
        if not self.attached:
            raise ProbeUnavailable("kprobes unavailable: none of the functions could be attached")

    def collect_drain(self) -> List[KfuncObservation]:
        if self.session is None or self.session.bpf is None:
            return []
        table = self.session.bpf[b"kfunc_counts"]
        out = []
        for k, per_cpu in table.items():
            key = (k.tgid, k.idx)
            total = sum(int(v) for v in per_cpu)
            delta = total - self._last.get(key, 0)
            self._last[key] = total
            if delta > 0 and k.idx < len(self.functions):
                out.append(KfuncObservation(pid=k.tgid, function=self.functions[k.idx], count=delta))
        out.sort(key=lambda o: (o.pid, o.function))
        return out
