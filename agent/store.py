"""Loading saved profiles (msgpack or JSON, detected from the content, not the name)."""
from __future__ import annotations

import json

import msgpack

from .errors import ProfileError
from .model import Profile, profile_from_dict


def parse_profile(raw: bytes, name: str = "profile") -> Profile:
    """Decode a profile from bytes; any malformation becomes a one-line ProfileError."""
    if not raw:
        raise ProfileError(f"{name}: empty file, not a profile")
    head = raw.lstrip()[:1]
    try:
        if head in (b"{", b"["):
            data = json.loads(raw.decode("utf-8"))  # JSON is written ASCII-only: \udcXX escapes
        else:
            data = msgpack.unpackb(raw, raw=False, strict_map_key=False, unicode_errors="surrogateescape")
    except (ValueError, UnicodeDecodeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as err:
        raise ProfileError(f"{name}: truncated or not a profile ({type(err).__name__})") from err
    try:
        return profile_from_dict(data)
    except ProfileError as err:
        raise ProfileError(f"{name}: {err}") from err
    except (TypeError, ValueError) as err:
        raise ProfileError(f"{name}: malformed profile ({err})") from err


def load_profile(path: str) -> Profile:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise ProfileError(f"cannot read {path}: {err.strerror or err}") from err
    return parse_profile(raw, path)
