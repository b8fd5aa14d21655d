"""Per-organization rate limits for the subscription API: fixed minute and hour windows."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pusherd.config import RateLimitConfig


@runtime_checkable
class SharedRateLimits(Protocol):
    """A store that counts requests for every process at once (windows aligned to the clock)."""

    async def rate_hit(self, organization: str, per_minute: int, per_hour: int) -> Verdict:
        """Count one request if both windows have room; the verdict."""
        ...


def shared_verdict(
    now_ms: int,
    allowed: bool,
    windows: tuple[tuple[int, int, int, int], ...],  # (limit, hits, start_ms, length_ms)
) -> Verdict:
    """The verdict of clock-aligned windows counted elsewhere (refused requests not counted)."""
    limit, hits, start, length = min(windows, key=lambda w: w[0] - w[1])
    reset = max(1, math.ceil((start + length - now_ms) / 1000))
    refused = [(s + n - now_ms) / 1000 for lim, h, s, n in windows if h >= lim]
    retry = 0 if allowed else max(1, math.ceil(max(refused, default=1.0)))
    return Verdict(allowed, limit, max(0, limit - hits), reset, retry)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the reported window resets
    retry_after_s: int  # when refused: seconds until a request is allowed again


class RateLimiter:
    """Counts requests per organization in a minute window and an hour window."""

    def __init__(
        self, config: RateLimitConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        # org -> [(window_start, count) for minute, hour]
        self._windows: dict[str, list[list[float]]] = {}

    def reload(self, config: RateLimitConfig) -> None:
        """New limits (SIGHUP); counts so far are kept."""
        self.config = config

    def hit(self, organization: str) -> Verdict:
        """Count one request and say whether it may proceed."""
        now = self._clock()
        limits = ((60.0, self.config.per_minute), (3600.0, self.config.per_hour))
        windows = self._windows.setdefault(organization, [[now, 0.0], [now, 0.0]])
        if len(self._windows) > 100_000:
            self._evict(now)
        state = []
        for (length, limit), window in zip(limits, windows, strict=True):
            if now - window[0] >= length:
                window[0], window[1] = now, 0.0
            state.append((limit, window, length))
        # length - elapsed, not start + length - now: the latter can round to just over length
        # (Retry-After 61 for a 60s window) because start + length is rounded first.
        refused = [length - (now - w[0]) for limit, w, length in state if w[1] >= limit]
        if not refused:
            for _, window, _ in state:
                window[1] += 1
        # Report the window with the fewest requests left.
        limit, window, length = min(state, key=lambda s: s[0] - s[1][1])
        remaining = max(0, int(limit - window[1]))
        reset = max(1, math.ceil(length - (now - window[0])))
        retry = max(1, math.ceil(max(refused))) if refused else 0
        return Verdict(not refused, limit, remaining, reset, retry)

    async def hit_shared(self, limits: SharedRateLimits, organization: str) -> Verdict:
        """Count one request in windows every process shares (PostgreSQL, SPEC §4 and §8)."""
        return await limits.rate_hit(organization, self.config.per_minute, self.config.per_hour)

    def _evict(self, now: float) -> None:
        stale = [o for o, w in self._windows.items() if now - w[1][0] >= 3600.0]
        for org in stale:
            del self._windows[org]
