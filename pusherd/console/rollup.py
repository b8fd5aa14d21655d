"""Finished deliveries of a recent window (the last hour, the last day) per bucket and
subscription, in memory.

A bucket that ended more than SETTLE_MS ago gets no more finishes (a finish is stamped with the
time of its own write), so it is counted once and kept: a page view then reads only the buckets
completed since the last view and the two partial ends of its window, whatever the traffic of
the day. Counts are finishes as they happened: a failed delivery retried later still counts as a
failure at the time it failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from dataclasses import dataclass

from pusherd.clock import now_ms
from pusherd.store.console import BucketCount, ConsoleStore, MinuteCount, SubscriptionCounts

SETTLE_MS = 5_000
MAX_ENTRIES = 500_000  # (bucket, subscription) pairs kept at most; beyond, every view queries


@dataclass(frozen=True)
class Window:
    """What the pages show of a window."""

    buckets: list[MinuteCount]  # oldest first, the current (partial) one last
    by_subscription: dict[str, SubscriptionCounts]


class Rollup:
    """Complete buckets of a window, shared by every page view of this process."""

    def __init__(self, store: Callable[[], ConsoleStore], bucket_ms: int, window_ms: int) -> None:
        self._store_of = store  # the store opens after the app is built
        self.bucket_ms = bucket_ms
        self.window_ms = window_ms
        self._buckets: dict[int, dict[str, tuple[int, int]]] = {}
        self._complete_until = 0  # every bucket below this is in _buckets (within the day)
        self._lock = asyncio.Lock()  # concurrent views fill a missing range once
        self._enabled = True  # off once the day holds more than MAX_ENTRIES pairs

    async def _fill(self, now: int) -> None:
        window_start = (now - self.window_ms) // self.bucket_ms * self.bucket_ms
        complete_end = (now - SETTLE_MS) // self.bucket_ms * self.bucket_ms
        if not self._enabled:
            return
        async with self._lock:
            start = max(self._complete_until, window_start)
            if start < complete_end:
                for r in await self._store_of().finished_counts(
                    start, complete_end, self.bucket_ms
                ):
                    self._buckets.setdefault(r.bucket_ms, {})[r.subscription] = (
                        r.delivered,
                        r.failed,
                    )
                self._complete_until = complete_end
            for k in [k for k in self._buckets if k < window_start]:
                del self._buckets[k]
            if sum(len(b) for b in self._buckets.values()) > MAX_ENTRIES:
                self._buckets.clear()
                self._enabled = False  # too many subscriptions busy: views query the day

    async def window(self, subscriptions: Collection[str] | None) -> Window:
        """The window up to now for these subscriptions (None: every one)."""
        now = now_ms()
        await self._fill(now)
        since = now - self.window_ms
        head_end = since // self.bucket_ms * self.bucket_ms + self.bucket_ms
        rows = await self._store_of().finished_counts(since, head_end, self.bucket_ms)
        if not self._enabled:
            rows += await self._store_of().finished_counts(head_end, now + 1, self.bucket_ms)
        else:
            rows += await self._store_of().finished_counts(
                self._complete_until, now + 1, self.bucket_ms
            )
            for k, subs in self._buckets.items():
                if k >= head_end:
                    rows += [BucketCount(k, s, ok, bad) for s, (ok, bad) in subs.items()]
        totals: dict[int, list[int]] = {}
        per_sub: dict[str, list[int]] = {}
        for r in rows:
            if subscriptions is not None and r.subscription not in subscriptions:
                continue
            if r.bucket_ms >= head_end:  # the partial first bucket counts per subscription only
                t = totals.setdefault(r.bucket_ms, [0, 0])
                t[0] += r.delivered
                t[1] += r.failed
            c = per_sub.setdefault(r.subscription, [0, 0])
            c[0] += r.delivered
            c[1] += r.failed
        last = now // self.bucket_ms * self.bucket_ms
        buckets = [
            MinuteCount(k, *totals.get(k, (0, 0)))
            for k in range(head_end, last + 1, self.bucket_ms)
        ]
        return Window(buckets, {s: SubscriptionCounts(ok, bad) for s, (ok, bad) in per_sub.items()})
