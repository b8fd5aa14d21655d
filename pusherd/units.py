"""Durations and sizes as config and CLI write them: "500ms", "5s", "2h", "512KiB", "1MiB"."""

from __future__ import annotations

import re

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|K|M|G)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as "500ms", "5s", "10m", "2h", "3d"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            unit = m.group(2)
            return float(m.group(1)) * _DURATION_UNITS[unit]
    raise ValueError(
        f"not a duration: {value!r} (use seconds or e.g. '500ms', '5s', '10m', '2h', '3d')"
    )


def parse_size(value: object) -> int:
    """Bytes from a number or a string such as "512KiB", "1MiB", "1MB"."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "b").lower()
            return int(m.group(1)) * _SIZE_UNITS[unit]
    raise ValueError(f"not a size: {value!r} (use bytes or e.g. '512KiB', '1MiB', '1MB')")
