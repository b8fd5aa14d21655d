"""Retry policy: turns the outcome of one attempt into the next step (SPEC §6)."""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["MAX_RETRY_AFTER_S", "Decision", "Outcome", "RetryPolicy", "parse_retry_after"]

MAX_RETRY_AFTER_S = 86400.0

_RETRY_AFTER_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class Outcome:
    """Result of one delivery attempt."""

    status_code: int | None
    error: str | None
    duration_ms: float
    body: str = ""
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        """Whether the receiver answered 2xx."""
        return self.status_code is not None and 200 <= self.status_code < 300


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """Parse a Retry-After header (seconds or HTTP-date) into seconds from ``now_s``."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            # RFC 9110 dates are always GMT; "-0000" parses as naive.
            when = when.replace(tzinfo=dt.UTC)
        seconds = when.timestamp() - now_s
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


@dataclass(frozen=True)
class Decision:
    """What to do with a delivery after an attempt."""

    kind: Literal["delivered", "retry", "failed", "gone"]
    next_attempt_ms: int | None = None


class RetryPolicy:
    """Retry schedule with jitter; ``schedule[i]`` is the delay after attempt ``i + 1``."""

    def __init__(
        self, schedule: Sequence[float], jitter: float, rng: random.Random | None = None
    ) -> None:
        """Build a policy from the configured schedule (seconds) and jitter fraction."""
        self.schedule: tuple[float, ...] = tuple(schedule)
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()

    @property
    def max_attempts(self) -> int:
        """Total number of attempts a delivery gets, the first one included."""
        return len(self.schedule) + 1

    def decide(self, attempts: int, outcome: Outcome, now_ms: int) -> Decision:
        """Decide the next step; ``attempts`` counts the attempt that produced ``outcome``."""
        if outcome.ok:
            return Decision("delivered", None)
        if outcome.status_code == 410:
            return Decision("gone", None)
        index = attempts - 1
        if index >= len(self.schedule):
            return Decision("failed", None)
        delay = self.schedule[index] * (1.0 + self._rng.uniform(-self.jitter, self.jitter))
        if outcome.status_code in _RETRY_AFTER_STATUSES and outcome.retry_after_s is not None:
            delay = max(delay, min(outcome.retry_after_s, MAX_RETRY_AFTER_S))
        # A jitter above 1 could make the delay negative; never schedule in the past.
        delay = max(delay, 0.0)
        return Decision("retry", now_ms + round(delay * 1000))
