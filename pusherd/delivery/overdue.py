"""DISABLED on time (SPEC §3): a subscription FAILING for `disable_after` is disabled then.

The record of a failed attempt checks the rule too, but a failing origin's circuit breaker
holds its attempts back for 30 s to 10 min: without a timer, a subscription past its
disable_after stayed FAILING (and its contact unwarned) until the breaker let a probe through.
The store decides from the subscription's own failing_since, so a timer left over from an
earlier FAILING spell (the subscription recovered, or was re-enabled) changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from pusherd.store import Store, StoreError
from pusherd.store.types import StatusChange

log = structlog.get_logger("pusherd.delivery")

SLACK_S = 0.25  # PostgreSQL compares on the database's clock, which may be a little behind


class DisableTimers:
    """One timer per subscription this process saw turn FAILING."""

    def __init__(
        self,
        store: Callable[[], Store],
        disable_after_s: float,
        on_change: Callable[[StatusChange], None],
    ) -> None:
        self._store = store
        self._after_s = disable_after_s
        self._on_change = on_change
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def failing(self, subscription: str) -> None:
        """The subscription turned FAILING now: look again once disable_after has passed."""
        old = self._timers.pop(subscription, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[subscription] = loop.call_later(
            self._after_s + SLACK_S, self._due, subscription
        )

    def _due(self, subscription: str) -> None:
        self._timers.pop(subscription, None)
        task = asyncio.get_running_loop().create_task(self._disable(subscription))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _disable(self, subscription: str) -> None:
        try:
            change = await self._store().disable_overdue(subscription, round(self._after_s * 1000))
        except StoreError as exc:
            # The next failed attempt applies the rule as well.
            log.error("disable_check_failed", subscription=subscription, error=str(exc))
            return
        if change is not None:
            self._on_change(change)

    async def close(self) -> None:
        """Cancel the timers and the checks under way."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
