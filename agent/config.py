"""The daemon's configuration: one TOML file, every key also an ``ASBUILT_*`` variable and a flag.

Precedence, lowest first: built-in defaults, the TOML file (``--config``), ``ASBUILT_<SECTION>_<KEY>``
environment variables for the ``[metrics]`` section and ``ASBUILT_<KEY>`` for ``[agent]`` (e.g.
``ASBUILT_INTERVAL=1m``, ``ASBUILT_METRICS_LISTEN=off``), then command-line flags. A bad value is a
one-line UsageError naming the key; SIGHUP re-reads the same sources and keeps the old config when
the new one is bad.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from .errors import UsageError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Debian 12 has 3.11
    tomllib = None  # type: ignore

DEFAULT_PORT = 10977  # 9100-9999 are all allocated to exporters (Prometheus wiki); see README "Metrics"


@dataclass
class Config:
    # [agent]
    state_dir: str = "/var/lib/asbuilt"
    interval: float = 300.0  # full rescan, seconds
    snapshot_interval: float = 900.0
    refresh_interval: float = 10.0  # trace facts folded into the rolling profile and /metrics
    retention: int = 48  # snapshots kept
    select: str = ""  # process selector ("" = every process)
    ebpf: bool = True
    capture: bool = True
    packages: bool = True
    forget_after: float = 7 * 86400.0  # processes not seen for this long leave the rolling profile
    max_processes: int = 5000  # identities kept in the rolling profile
    log_level: str = "info"
    # [metrics]
    metrics_listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    metrics_max_series: int = 2000
    metrics_tls_cert: str = ""
    metrics_tls_key: str = ""
    metrics_basic_auth_user: str = ""
    metrics_basic_auth_password_hash: str = ""

    def to_toml(self) -> str:
        lines = ["[agent]"]
        for f in dataclasses.fields(self):
            if f.name.startswith("metrics_"):
                continue
            lines.append(f"{f.name} = {_toml_value(f.name, getattr(self, f.name))}")
        lines.append("")
        lines.append("[metrics]")
        for f in dataclasses.fields(self):
            if f.name.startswith("metrics_"):
                value = getattr(self, f.name)
                if f.name == "metrics_basic_auth_password_hash" and value:
                    value = "<set>"
                lines.append(f"{f.name[len('metrics_'):]} = {_toml_value(f.name, value)}")
        return "\n".join(lines) + "\n"


DURATIONS = {"interval", "snapshot_interval", "refresh_interval", "forget_after"}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def _toml_value(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if name in DURATIONS:
        return f'"{value:g}s"'
    if isinstance(value, (int, float)):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_seconds(key: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise UsageError(f"config {key}: {value!r} is not a duration (e.g. 30s, 5m, 1h)")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise UsageError(f"config {key}: must be more than zero")
    return seconds


def _coerce(key: str, value: Any) -> Any:
    field_type = {f.name: f.type for f in dataclasses.fields(Config)}[key]
    if key in DURATIONS:
        return parse_seconds(key, value)
    if field_type in ("bool", bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"config {key}: {value!r} is not true/false")
    if field_type in ("int", int):
        try:
            number = int(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or number < 1:
            raise UsageError(f"config {key}: {value!r} is not a positive integer")
        return number
    if not isinstance(value, str):
        raise UsageError(f"config {key}: expected a string, got {type(value).__name__}")
    return value


def _flatten(data: Mapping[str, Any], path: str) -> Dict[str, Any]:
    known = {f.name for f in dataclasses.fields(Config)}
    out: Dict[str, Any] = {}
    for section, body in data.items():
        if section not in ("agent", "metrics") or not isinstance(body, dict):
            raise UsageError(f"{path}: unknown section or key {section!r} (expected [agent] and [metrics])")
        for key, value in body.items():
            name = key if section == "agent" else f"metrics_{key}"
            if name not in known or (section == "agent" and name.startswith("metrics_")):
                raise UsageError(f"{path}: unknown key {section}.{key}")
            out[name] = value
    return out


def read_file(path: str) -> Dict[str, Any]:
    if tomllib is None:
        raise UsageError("reading a TOML config needs Python 3.11 or newer")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as err:
        raise UsageError(f"cannot read config {path}: {err.strerror or err}") from err
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"config {path}: {err}") from err
    return _flatten(data, path)


def from_environ(environ: Mapping[str, str]) -> Dict[str, Any]:
    out = {}
    for f in dataclasses.fields(Config):
        value = environ.get("ASBUILT_" + f.name.upper())
        if value is not None and f.name not in ("log_level",):
            out[f.name] = value
    return out


def load_config(path: str = "", environ: Optional[Mapping[str, str]] = None,
                overrides: Optional[Dict[str, Any]] = None) -> Config:
    """Defaults < file < environment < overrides (flags); UsageError on any bad key or value."""
    values: Dict[str, Any] = {}
    if path:
        values.update(read_file(path))
    values.update(from_environ(os.environ if environ is None else environ))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    cfg = Config()
    for key, value in values.items():
        setattr(cfg, key, _coerce(key, value))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    if cfg.log_level not in ("debug", "info", "warning", "error"):
        raise UsageError(f"config log_level: {cfg.log_level!r} is not debug/info/warning/error")
    if not os.path.isabs(cfg.state_dir):
        raise UsageError(f"config state_dir: {cfg.state_dir!r} is not an absolute path")
    if cfg.metrics_listen != "off":
        parse_listen(cfg.metrics_listen)
    if bool(cfg.metrics_tls_cert) != bool(cfg.metrics_tls_key):
        raise UsageError("config metrics.tls_cert and metrics.tls_key go together")
    if bool(cfg.metrics_basic_auth_user) != bool(cfg.metrics_basic_auth_password_hash):
        raise UsageError("config metrics.basic_auth_user and metrics.basic_auth_password_hash go together")
    if cfg.select:
        from .select import _matcher

        for term in cfg.select.split(","):
            if term.strip():
                _matcher(term.strip())


def parse_listen(text: str):
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); UsageError otherwise."""
    m = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", text) or re.match(r"^([^:\[\]]*):(\d+)$", text)
    if not m or not 0 <= int(m.group(2)) <= 65535:
        raise UsageError(f"config metrics.listen: {text!r} is not HOST:PORT, [IPV6]:PORT or off")
    return m.group(1) or "0.0.0.0", int(m.group(2))
