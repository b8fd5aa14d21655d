"""What a running pusherd owns: store, HTTP client, dispatcher, metrics, limits, notices."""

from __future__ import annotations

import asyncio
import resource
import time

import structlog

from pusherd.catalogue import Catalogue
from pusherd.config import Config
from pusherd.delivery.dispatcher import Dispatcher
from pusherd.delivery.http import HttpClient
from pusherd.delivery.overdue import DisableTimers
from pusherd.delivery.sender import Sender
from pusherd.metrics import Metrics
from pusherd.notify import Notifier
from pusherd.ratelimit import RateLimiter, SharedRateLimits, Verdict
from pusherd.store import Change, Store, StoreError, open_store
from pusherd.store.types import StatusChange

log = structlog.get_logger("pusherd")

PURGE_EVERY_S = 60.0
# A pass that found nothing to purge or close waits twice as long as the last, up to this: each
# wake-up of an idle daemon costs CPU (its memory is cold), and a row that reaches the retention
# age meanwhile is purged at most this late.
PURGE_IDLE_MAX_S = 600.0
PURGE_BATCH = 500
CLOSE_BATCH = 1000
FD_RESERVE = 128  # descriptors kept for listeners, API clients, the database and SMTP


def next_purge_wait(last_s: float, found: bool) -> float:
    """The wait before the next retention pass: a minute after one that purged or closed
    something, else twice the last one, up to PURGE_IDLE_MAX_S."""
    return PURGE_EVERY_S if found else min(2 * last_s, PURGE_IDLE_MAX_S)


def idle_connections(max_in_flight: int) -> int:
    """How many idle keep-alive connections the HTTP client pools.

    Twice max_in_flight, as far as the process's descriptor limit allows (never below
    max_in_flight). Many destinations each keep up to per_destination connections busy in
    turn: with a pool no larger than max_in_flight, 50 destinations at 8 each evicted the
    connections a moment before they were needed again, and reopening them was most of what
    a delivery cost more with 10,000 subscriptions than with one (issue 11).
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 2 * max_in_flight
    spare = soft - max_in_flight - FD_RESERVE
    return max(max_in_flight, min(2 * max_in_flight, spare))


class Runtime:
    """Shared by the API and ingest apps; opened and closed by the API app's cleanup context."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.catalogue = Catalogue(config.events)
        self.metrics = Metrics()
        self.ratelimiter = RateLimiter(config.ratelimit)
        self.notifier = Notifier(config.smtp)
        self.disable_timers = DisableTimers(
            lambda: self.store, config.delivery.disable_after, self.status_changed
        )
        self._store: Store | None = None
        self._shared_limits: SharedRateLimits | None = None  # the store, if it counts for all
        self._client: HttpClient | None = None
        self._dispatcher: Dispatcher | None = None
        self._purger: asyncio.Task[None] | None = None
        self._closing: dict[str, asyncio.Task[None]] = {}
        self._looking: asyncio.Task[None] | None = None  # a look for subscriptions to close

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("pusherd is not started")
        return self._store

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            raise RuntimeError("pusherd is not started")
        return self._dispatcher

    async def start(self, *, dispatch: bool = True) -> None:
        """Open the store, the HTTP client and start the dispatcher and the retention purge."""
        cfg = self.config
        self._store = await open_store(cfg.storage, per_destination=cfg.delivery.per_destination)
        if isinstance(self._store, SharedRateLimits):
            self._shared_limits = self._store
        d = cfg.delivery
        self._client = HttpClient(
            d.allow_private_destinations, max_idle=idle_connections(d.max_in_flight)
        )
        sender = Sender(self._client, d.timeout)
        self._dispatcher = Dispatcher(d, self._store, sender, self.metrics, self.status_changed)
        self._store.changes.subscribe(self._changed)
        if dispatch:
            self._dispatcher.start()
            self._purger = asyncio.get_running_loop().create_task(self._purge_loop())
            await self._close_all()

    def status_changed(self, change: StatusChange) -> None:
        """A subscription's status changed by a delivery outcome: mail its contact."""
        self.notifier.notify(change)
        if change.new == "FAILING":
            self.disable_timers.failing(change.subscription)

    def _changed(self, change: Change) -> None:
        """A deleted or DISABLED subscription's pending deliveries are finished (change feed)."""
        if change.kind in ("subscription_deleted", "subscription_disabled"):
            self.close_pending_soon(change.subscription)
        elif change.kind == "subscription_changed" and not change.subscription:
            # Anything may have changed (PostgreSQL's LISTEN connection came back, and what was
            # announced while it was down is lost): look now rather than at the retention pass.
            self._look_for_closing()

    def _look_for_closing(self) -> None:
        if self._looking is None or self._looking.done():
            self._looking = asyncio.get_running_loop().create_task(self._close_all())

    async def _close_all(self) -> None:
        """Finish the pending deliveries of every deleted or DISABLED subscription."""
        try:
            closing = await self.store.subscriptions_to_close()
        except StoreError as exc:
            log.error("close_pending_failed", error=str(exc))
            return
        for sub in closing:
            self.close_pending_soon(sub)

    def close_pending_soon(self, subscription: str) -> None:
        """Finish a deleted or DISABLED subscription's pending deliveries, in the background."""
        if subscription in self._closing:
            return
        task = asyncio.get_running_loop().create_task(self._close_pending(subscription))
        self._closing[subscription] = task
        task.add_done_callback(lambda _: self._closing.pop(subscription, None))

    async def _close_pending(self, subscription: str) -> None:
        total = 0
        while True:
            try:
                status, n = await self.store.close_pending(subscription, CLOSE_BATCH)
            except StoreError as exc:
                log.error("close_pending_failed", subscription=subscription, error=str(exc))
                return
            if n == 0:
                break
            total += n
            if status == "failed":
                self.metrics.finished.labels(status="failed").inc(n)
            await asyncio.sleep(0)  # small batches: ingest goes in between
        if total:
            log.info("pending_deliveries_closed", subscription=subscription, deliveries=total)

    async def stop(self) -> None:
        """Stop the dispatcher (with shutdown_grace), then close everything."""
        tasks = (self._purger, self._looking, *self._closing.values())
        background = [t for t in tasks if t is not None]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if self._dispatcher is not None:
            await self._dispatcher.stop(self.config.delivery.shutdown_grace)
        await self.disable_timers.close()
        await self.notifier.drain()
        if self._client is not None:
            await self._client.close()
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def rate_hit(self, organization: str) -> Verdict:
        """Count one API request: across every process when the store shares its counts
        (PostgreSQL), else in this process's memory."""
        if self._shared_limits is not None:
            return await self.ratelimiter.hit_shared(self._shared_limits, organization)
        return self.ratelimiter.hit(organization)

    def reload(self, config: Config) -> None:
        """SIGHUP: new log level and rate limits."""
        self.ratelimiter.reload(config.ratelimit)

    async def purge_once(self) -> int:
        """One retention pass (small batches until nothing is left)."""
        cutoff = int((time.time() - self.config.storage.retention) * 1000)
        total = 0
        while True:
            removed = await self.store.purge(cutoff, PURGE_BATCH)
            total += removed
            if removed == 0:
                return total
            await asyncio.sleep(0.01)  # let ingest in between batches

    async def _purge_loop(self) -> None:
        wait = PURGE_EVERY_S
        while True:
            await asyncio.sleep(wait)
            try:
                # A failed look must not end the loop: the next pass looks again.
                closing = await self.store.subscriptions_to_close()
                for sub in closing:
                    self.close_pending_soon(sub)
                removed = await self.purge_once()
                # Expired console sessions and sign-in links go with the rest.
                removed += await self.store.console.purge_sessions(int(time.time() * 1000))
            except StoreError as exc:
                log.error("purge_failed", error=str(exc))
                wait = PURGE_EVERY_S
                continue
            if removed:
                log.info("retention_purged", rows=removed)
            wait = next_purge_wait(wait, bool(removed or closing))
