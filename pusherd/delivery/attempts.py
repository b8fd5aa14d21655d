"""Attempts: the slots of claimed rows, from an origin's queue to the recorded outcome.

`Attempts` holds what claimed rows need once they are ours: per-origin queues of rows ready to
go, the attempts in flight within `max_in_flight` and each origin's limits and breaker, and the
recording of each outcome. `Dispatcher` (dispatcher.py) builds the claim loop on top of it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

import structlog

from pusherd.clock import now_ms
from pusherd.config import DeliveryConfig
from pusherd.delivery.origins import Breaker, Limits, Origin
from pusherd.delivery.recorder import Recorder
from pusherd.delivery.retry import Outcome
from pusherd.delivery.sender import Exchange, Sender, origin_of, outcome_label
from pusherd.metrics import Metrics
from pusherd.store import Store, StoreError
from pusherd.store.types import ClaimedDelivery

log = structlog.get_logger("pusherd.delivery")


def origin_name(destination: str) -> str:
    """The origin a destination's attempts are scheduled under."""
    try:
        return origin_of(destination)
    except ValueError:
        return destination


class Wakeup:
    """What the claim loop sleeps on between cycles: set by anything that may make rows
    claimable. One future and one timer per wait: an asyncio.Event raced against a timeout
    (two tasks, asyncio.wait's waiter and callbacks) cost an idle daemon a third more CPU per
    poll, where every wake-up of a sleeping process is paid in cold memory."""

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[bool] | None = None

    def set(self) -> None:
        """Wake the loop (at once if it sleeps, else before its next sleep)."""
        self._set = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self, timeout_s: float) -> bool:
        """Sleep until set or timeout_s has passed; whether it was set."""
        if self._set:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(timeout_s, _time_out, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _time_out(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Attempts:
    """Rows claimed by this process: waiting per origin, in flight, being recorded."""

    def __init__(
        self,
        config: DeliveryConfig,
        store: Store,
        sender: Sender,
        metrics: Metrics,
        owner: str,
        recorder: Recorder,
        breaker_pause_s: float,
    ) -> None:
        self.config = config
        self.store = store
        self.sender = sender
        self.metrics = metrics
        self.owner = owner
        self.breaker_pause_s = breaker_pause_s
        self._recorder = recorder
        self._origins: dict[str, Origin] = {}
        self._limits = Limits(config.per_destination, config.max_in_flight)
        self._held: set[int] = set()  # ids claimed by us: waiting, in flight or being recorded
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._wake = Wakeup()  # something may be claimable: a slot freed, rows queued
        self._stop = asyncio.Event()
        self._in_flight = 0
        self._gone: set[str] = set()  # answered 410, not yet recorded DISABLED
        # Some origin's rows wait for room of the whole process (max_in_flight, or the share of
        # origins not proven healthy) rather than its own: a freed slot must look at every origin.
        self._starved = False
        # Labelled metric children looked up once: labels() is costly on the hot path.
        self._outcomes = {
            o: metrics.attempts.labels(outcome=o)
            for o in ("success", "http_error", "network_error", "timeout")
        }

    def _forget(self, subscription: str) -> list[int]:
        """Take a subscription's claimed-but-waiting rows out of the origins' queues."""
        ids: list[int] = []
        for origin in self._origins.values():
            mine = [d.id for d in origin.waiting if d.subscription == subscription]
            if mine:
                origin.waiting = deque(d for d in origin.waiting if d.subscription != subscription)
                ids.extend(mine)
        return ids

    async def refresh_subscription(self, subscription: str) -> int:
        """A subscription changed (destination, key, status) or was deleted: its claimed but
        waiting rows, read at claim time, are handed back. The change feed does this for every
        write; this is for the dispatcher's own knowledge (a 410 before it is recorded)."""
        ids = self._forget(subscription)
        await self._release(ids)
        self._wake.set()
        return len(ids)

    def _pump(self, only: Origin | None = None) -> None:
        """Start waiting rows wherever an origin and the process have room.

        With `only`, an origin whose own room grew (its attempt was written or answered): the
        other origins are looked at too only when one of them waits for room of the whole
        process, so a finished attempt does not cost a walk over every origin (50 silent
        origins with rows waiting made each attempt next to them ~10% dearer).
        """
        if self._stop.is_set():
            return
        now = time.monotonic()
        if only is not None and not self._starved:
            self._pump_origin(only, now)
            return
        self._starved = False
        for origin in self._origins.values():
            self._pump_origin(origin, now)

    def _pump_origin(self, origin: Origin, now: float) -> None:
        # Requests leave in the order rows wait: on idle connections they are written at once,
        # one after the other; a request that needs a new connection holds the origin's next
        # ones until it is written. Answers are awaited concurrently.
        while origin.waiting and not origin.sending:
            if self._in_flight >= self.config.max_in_flight:
                self._starved = True
                return
            breaker = origin.breaker
            if breaker.tripped():
                if breaker.paused(now) or breaker.probing or origin.in_flight:
                    return
                if not self._may_start(origin):
                    return
                breaker.probing = True  # the pause is over: this attempt is the probe
            elif not self._may_start(origin):
                return
            self._start(origin, origin.waiting.popleft())

    def _may_start(self, origin: Origin) -> bool:
        """Whether the origin may start one more attempt; notes when only the shares of the
        origins not proven healthy hold it back (a slot freed anywhere may then let it go)."""
        per_destination = self.config.per_destination
        if origin.may_start(per_destination):
            return True
        if origin.in_flight < origin.cap(per_destination):
            self._starved = True
        return False

    def _origin(self, destination: str) -> Origin:
        name = origin_name(destination)
        origin = self._origins.get(name)
        if origin is None:
            origin = self._origins[name] = Origin(
                name,
                Breaker(self.breaker_pause_s),
                self._limits,
                in_flight_gauge=self.metrics.in_flight.labels(origin=name),
                circuit_gauge=self.metrics.circuit_open.labels(origin=name),
            )
        return origin

    def _start(self, origin: Origin, d: ClaimedDelivery) -> None:
        # On an idle connection the request is written right here, in the order rows are
        # started; otherwise the attempt opens a connection first and holds the origin's next
        # requests back until this one is written.
        exchange = self.sender.start(d)
        if exchange is None:
            origin.sending += 1
        origin.begin()
        self._in_flight += 1
        origin.in_flight_gauge.set(origin.in_flight)
        self._tasks[d.id] = asyncio.get_running_loop().create_task(
            self._attempt(origin, d, exchange)
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a bookkeeping write in the background; stop() waits for it like an attempt."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks[-id(task)] = task
        task.add_done_callback(lambda t: self._tasks.pop(-id(t), None))

    async def _release(self, ids: list[int]) -> None:
        for i in ids:
            self._held.discard(i)
        if not ids:
            return
        try:
            await self.store.release(self.owner, ids)
        except StoreError as exc:
            # The lease runs out on its own; the rows are claimed again then.
            log.error("release_failed", error=str(exc), deliveries=len(ids))
        self._wake.set()

    # -- one attempt -----------------------------------------------------------------------

    async def _attempt(self, origin: Origin, d: ClaimedDelivery, exchange: Exchange | None) -> None:
        started = now_ms()
        slot_freed = False
        sent = exchange is not None

        def on_sent() -> None:
            nonlocal sent
            if sent:
                return
            sent = True
            origin.sending -= 1
            self._pump(origin)

        def free_slot() -> None:
            nonlocal slot_freed
            if slot_freed:
                return
            slot_freed = True
            on_sent()
            origin.end()
            self._in_flight -= 1
            origin.in_flight_gauge.set(origin.in_flight)
            self._pump(origin)
            self._wake.set()

        try:
            outcome = await self.sender.finish(d, exchange, on_sent)
            on_sent()
            self._count(origin, outcome)
            if outcome.status_code == 410:
                # Gone: nothing more may leave for this subscription, even before the DISABLED
                # status is committed.
                self._gone.add(d.subscription)
                await self.refresh_subscription(d.subscription)
            # The destination's answer is in: its slot is free while the attempt is recorded
            # (the row stays ours until then), so recording never idles the receiver.
            free_slot()
            try:
                await self._recorder.record(d, outcome, started)
            finally:
                if outcome.status_code == 410:
                    self._gone.discard(d.subscription)
        except asyncio.CancelledError:
            origin.breaker.probing = False
            raise
        except Exception:
            log.exception("attempt_crashed", delivery_id=d.id)
            if origin.breaker.probing:  # a probe that never answered must not pin the circuit
                origin.record(False, time.monotonic())
        finally:
            self._tasks.pop(d.id, None)
            self._held.discard(d.id)
            free_slot()
            self._wake.set()  # its next due time is known now (a retry, say)

    def _count(self, origin: Origin, outcome: Outcome) -> None:
        """Feed the breaker and the metrics with one attempt's outcome."""
        now = time.monotonic()
        if origin.record(outcome.ok, now):
            log.warning(
                "circuit_opened",
                origin=origin.name,
                pause_s=origin.breaker.pause_s,
                failures=origin.breaker.failures,
            )
            # Rows claimed for it go back; nothing is claimed for it until the pause ends.
            ids = [w.id for w in origin.waiting]
            origin.waiting.clear()
            self._spawn(self._release(ids))
        origin.circuit_gauge.set(1 if origin.breaker.tripped() else 0)
        self._outcomes[outcome_label(outcome)].inc()
        self.metrics.attempt_duration.observe(outcome.duration_ms / 1000)
