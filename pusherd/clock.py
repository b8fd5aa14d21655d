"""Time helpers: unix milliseconds and the ISO-8601 forms pusherd shows."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any


def now_ms() -> int:
    """Wall-clock unix time in milliseconds."""
    return time.time_ns() // 1_000_000


_last_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def iso_ms(ms: int) -> str:
    """YYYY-MM-DDTHH:MM:SS.mmmZ for a unix-millisecond time."""
    second = ms // 1000
    if _last_second[0] != second:  # ingest asks many times a second: format the date once
        dt = datetime.fromtimestamp(second, tz=UTC)
        _last_second[:] = [second, dt.strftime("%Y-%m-%dT%H:%M:%S.")]
    return f"{_last_second[1]}{ms % 1000:03d}Z"


def iso_or_none(ms: int | None) -> str | None:
    """iso_ms, passing None through."""
    return None if ms is None else iso_ms(ms)


def parse_iso(text: str) -> datetime | None:
    """An ISO-8601 date-time (a trailing Z allowed), or None if it is not one."""
    if not isinstance(text, str) or len(text) < 10 or not (text.isascii() and text.isprintable()):
        return None  # fromisoformat reads up to a NUL and ignores the rest
    try:
        value = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return None
    return value
