"""The dispatcher: claim due deliveries with a lease and run attempts within the limits.

Each cycle asks the store once for what is due, telling it how much room every known
destination (origin) has: an origin keeps at most `per_destination` attempts in flight and a
short queue of claimed rows ready behind them, and one without room is skipped by the claim. The
store reads the due end of its queues index (one row per subscription with its next due time),
so a cycle costs what is due, not the number of subscriptions. A slow origin never holds rows
another origin could send, and the process never reads more of the queue than it can send. The
whole process keeps at most `max_in_flight` attempts under way.

A per-origin circuit breaker pauses an origin after consecutive failures: its subscriptions are not
claimed from at all until the pause ends (so a dead receiver with a large backlog costs nothing),
then one probe decides. The breaker lives in memory: after a restart every origin starts closed.
Rows leased by a process of this host that died are handed back as soon as a new one starts.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from pusherd.clock import now_ms
from pusherd.config import DeliveryConfig
from pusherd.delivery.leases import new_owner, owner_is_dead
from pusherd.delivery.origins import (
    BREAKER_FIRST_PAUSE_S,
    QUEUE_FACTOR,
    Breaker,
    Claims,
    Limits,
    Origin,
    prune,
)
from pusherd.delivery.recorder import Recorder
from pusherd.delivery.retry import Outcome, RetryPolicy
from pusherd.delivery.sender import Exchange, Sender, origin_of, outcome_label
from pusherd.metrics import Metrics
from pusherd.store import Change, Store, StoreError
from pusherd.store.types import ClaimedDelivery, Handover, StatusChange

log = structlog.get_logger("pusherd.delivery")

POLL_S = 1.0  # rows queued by other means (another process, the CLI) are found this soon
PRUNE_EVERY_S = 5.0  # idle origins are looked for this often, and after subscription changes
# Changes after which rows claimed before them are stale.
STALE_ROWS = frozenset(
    {"subscription_changed", "subscription_deleted", "subscription_disabled", "key_rotated"}
)


class Dispatcher:
    """Claims due deliveries and sends them, woken by the store's change feed (ingest, requeue)
    with a poll as a fallback."""

    def __init__(
        self,
        config: DeliveryConfig,
        store: Store,
        sender: Sender,
        metrics: Metrics,
        on_status_change: Callable[[StatusChange], None],
        policy: RetryPolicy | None = None,
        breaker_pause_s: float = BREAKER_FIRST_PAUSE_S,
    ) -> None:
        self.config = config
        self.store = store
        self.sender = sender
        self.metrics = metrics
        self.on_status_change = on_status_change
        self.policy = policy or RetryPolicy(config.retry_schedule, config.jitter)
        self.owner = new_owner()
        self.lease_ms = int(config.lease * 1000)
        self.disable_after_ms = int(config.disable_after * 1000)
        self.breaker_pause_s = breaker_pause_s
        self._origins: dict[str, Origin] = {}
        self._limits = Limits(config.per_destination, config.max_in_flight)
        self._held: set[int] = set()  # ids claimed by us: waiting, in flight or being recorded
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._in_flight = 0
        self._gone: set[str] = set()  # answered 410, not yet recorded DISABLED
        self._unsubscribe: Callable[[], None] | None = None
        # subscription -> hand-backs under way after it changed (claims wait for them)
        self._settling: dict[str, int] = {}
        self._prune_at = 0.0  # monotonic time to look for origins to forget
        # Labelled metric children looked up once: labels() is costly on the hot path.
        self._outcomes = {
            o: metrics.attempts.labels(outcome=o)
            for o in ("success", "http_error", "network_error", "timeout")
        }
        self._recorder = Recorder(
            store, self.owner, self.policy, metrics, self.disable_after_ms, on_status_change
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the claim loop; from now on the store's change feed wakes it."""
        self._unsubscribe = self.store.changes.subscribe(self._changed)
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _changed(self, change: Change) -> None:
        """A committed write the dispatcher must know about (from the store's change feed)."""
        if change.kind == "deliveries_queued":
            self._wake.set()
        elif change.subscription and change.kind in STALE_ROWS:
            # Rows of it waiting here were read before the change (destination, key, status):
            # they go back, and are claimed afresh.
            self._hand_back(change.subscription, self._forget(change.subscription))
            self._prune_at = 0.0  # its origin may be pointed at no more

    def _hand_back(self, subscription: str, ids: list[int]) -> None:
        """Release a changed subscription's rows; no claim runs until that is committed, so
        its newer rows never leave ahead of them."""
        self._settling[subscription] = self._settling.get(subscription, 0) + 1

        async def hand_back() -> None:
            try:
                await self._release(ids)
            finally:
                left = self._settling[subscription] - 1
                if left:
                    self._settling[subscription] = left
                else:
                    del self._settling[subscription]
                self._wake.set()

        self._spawn(hand_back())

    def wake(self) -> None:
        """Claim without waiting for the poll (the change feed calls this for queued rows)."""
        self._wake.set()

    def handover(self) -> Handover | None:
        """The room it offers fresh deliveries now (asked by the store inside an ingest's write):
        origins proven healthy with room; others, and new origins, go through a claim."""
        if self._stop.is_set() or self._settling:
            return None
        now = time.monotonic()
        budget = self.config.max_in_flight * (1 + QUEUE_FACTOR) - len(self._held)
        claims = Claims(self._origins.values(), self._limits, budget, now)
        room = {
            name: n
            for name, origin in self._origins.items()
            if origin.proven and (n := claims.room(origin)) > 0
        }
        if not room:
            return None
        return Handover(self.owner, self.lease_ms, room, frozenset(self._gone))

    def taken(self, deliveries: list[ClaimedDelivery]) -> None:
        """Deliveries an ingest committed leased to us: sent like claimed ones."""
        self._dispatch(deliveries)

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

    async def stop(self, grace_s: float) -> None:
        """Stop claiming, let attempts finish for up to grace_s, then hand back the rest.

        Idempotent: a second call waits for the first (SIGTERM starts the grace period at once,
        the app's cleanup joins it later).
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop_once(grace_s))
        await asyncio.shield(self._stopping)

    async def _stop_once(self, grace_s: float) -> None:
        self._stop.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
        await self.store.take_fresh(None)
        if self._loop_task is not None:
            await self._loop_task
        waiting = [d.id for o in self._origins.values() for d in o.waiting]
        for o in self._origins.values():
            o.waiting.clear()
        await self._release(waiting)
        unfinished: list[int] = []
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks.values()), timeout=grace_s)
            # Taken before cancelling: a cancelled attempt drops its id from _held on the way out.
            unfinished = list(self._held)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        unfinished.extend(i for i in self._held if i not in unfinished)
        await self._release(unfinished)
        log.info("dispatcher_stopped", released=len(waiting) + len(unfinished), owner=self.owner)

    async def run_until_idle(self, timeout_s: float = 10.0) -> None:
        """Wait until nothing is due, waiting or in flight (for tests and the CLI)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.wake()
            if not self._held and not await self._anything_due():
                await asyncio.sleep(0.02)
                if not self._held and not await self._anything_due():
                    return
            await asyncio.sleep(0.01)
        raise TimeoutError("dispatcher did not become idle")

    async def _anything_due(self) -> bool:
        now = time.monotonic()
        paused = [o.name for o in self._origins.values() if o.breaker.paused(now)]
        due = await self.store.due_at(paused)
        return due is not None and due <= now_ms()

    # -- claim loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        await self._recover()
        await self.store.take_fresh(self)
        while not self._stop.is_set():
            self._wake.clear()
            try:
                timeout = await self._cycle()
            except Exception as exc:
                # The loop must outlive a bad moment of the store (disk full, I/O error); the
                # leases of anything claimed run out on their own and the rows come back.
                log.error("claim_failed", error=f"{type(exc).__name__}: {exc}")
                timeout = POLL_S
            if timeout > 0:
                await self._wait(timeout)
            else:
                await asyncio.sleep(0)  # let attempts start before claiming more

    async def _cycle(self) -> float:
        """One claim for every origin with room; return how long to wait (0: go again now)."""
        now, wall_ms = time.monotonic(), now_ms()
        if now >= self._prune_at:
            await self._forget_idle_origins(now)
        next_ms = wall_ms + int(POLL_S * 1000)
        budget = self.config.max_in_flight * (1 + QUEUE_FACTOR) - len(self._held)
        if budget <= 0 or self._settling:
            return POLL_S  # a finished attempt, or the hand-back's commit, wakes the loop
        claims = Claims(self._origins.values(), self._limits, budget, now)
        room: dict[str, int] = {}
        for origin in self._origins.values():
            if origin.breaker.paused(now):
                resume_ms = wall_ms + int((origin.breaker.open_until - now) * 1000) + 1
                next_ms = min(next_ms, resume_ms)
            room[origin.name] = claims.room(origin)
        # An origin seen for the first time slow-starts (one attempt, rows ready behind it),
        # and all of those together stay within the share of origins not proven yet.
        claim = await self.store.claim(
            self.owner,
            room,
            min(1, self.config.per_destination) * (1 + QUEUE_FACTOR),
            budget,
            self.lease_ms,
            default_total=max(0, claims.unproven_left),
        )
        self._dispatch(claim.deliveries)
        if claim.more:
            return 0.0  # there may be more due right now
        if claim.next_due_ms is not None:
            next_ms = min(next_ms, claim.next_due_ms)
        return max(0.0, (next_ms - now_ms()) / 1000)

    async def _wait(self, timeout_s: float) -> None:
        waits = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self._stop.wait()),
        ]
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _dispatch(self, claimed: list[ClaimedDelivery]) -> None:
        if self._stop.is_set():  # stopped while this claim was in flight
            fresh = [d.id for d in claimed if d.id not in self._held]
            self._spawn(self._release(fresh))
            return
        gone = []
        stale: dict[str, list[int]] = {}
        for d in claimed:
            if d.id in self._held:
                continue  # already ours (its lease was just renewed)
            if d.subscription in self._gone:
                gone.append(d.id)
                continue
            if d.subscription in self._settling:  # claimed while it changed: read too early
                stale.setdefault(d.subscription, []).append(d.id)
                continue
            self._held.add(d.id)
            self._origin(d.destination).waiting.append(d)
        if gone:
            self._spawn(self._release(gone))
        for sub, ids in stale.items():
            self._hand_back(sub, ids)
        self._pump()

    def _pump(self) -> None:
        """Start waiting rows wherever an origin and the process have room."""
        if self._stop.is_set():
            return
        now = time.monotonic()
        for origin in self._origins.values():
            # Requests leave in the order rows wait: on idle connections they are written
            # at once, one after the other; a request that needs a new connection holds the
            # origin's next ones until it is written. Answers are awaited concurrently.
            while (
                origin.waiting
                and not origin.sending
                and self._in_flight < self.config.max_in_flight
            ):
                breaker = origin.breaker
                if breaker.tripped():
                    if breaker.paused(now) or breaker.probing or origin.in_flight:
                        break
                    if not origin.may_start(self.config.per_destination):
                        break
                    breaker.probing = True  # the pause is over: this attempt is the probe
                elif not origin.may_start(self.config.per_destination):
                    break
                self._start(origin, origin.waiting.popleft())

    def _origin(self, destination: str) -> Origin:
        try:
            name = origin_of(destination)
        except ValueError:
            name = destination
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

    async def _forget_idle_origins(self, now: float) -> None:
        """Drop origins that hold nothing and no subscription points at any more, with their
        metric series (an origin still pointed at keeps its breaker and slow-start state)."""
        self._prune_at = now + PRUNE_EVERY_S
        idle = [name for name, origin in self._origins.items() if origin.idle()]
        if idle:
            in_use = await self.store.origins_in_use(idle)
            for name in prune(self._origins, in_use):
                self.metrics.forget_origin(name)

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

    async def _recover(self) -> None:
        """Hand back rows leased by a process of this host that has died."""
        try:
            freed = await self.store.recover_leases(
                lambda owner: owner != self.owner and owner_is_dead(owner)
            )
        except StoreError as exc:
            log.error("lease_recovery_failed", error=str(exc))
            return
        if freed:
            log.info("leases_recovered", deliveries=freed)

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
            self._pump()

        def free_slot() -> None:
            nonlocal slot_freed
            if slot_freed:
                return
            slot_freed = True
            on_sent()
            origin.end()
            self._in_flight -= 1
            origin.in_flight_gauge.set(origin.in_flight)
            self._pump()
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
