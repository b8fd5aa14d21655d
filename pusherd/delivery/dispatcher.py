"""The dispatcher: claim due deliveries with a lease and run attempts within the limits.

Limits: `max_in_flight` attempts in the whole process and `per_destination` per origin. Rows claimed
for an origin that is busy wait in a short in-memory queue; past that queue's cap they are handed
back with a due time estimated from the origin's latency, so one slow receiver never fills the
process. A per-origin circuit breaker pauses an origin after consecutive failures: its due rows are
parked (still leased by this process) until the pause ends, without spending an attempt, and rows
ingested for it meanwhile are born parked, so a dead receiver with a big backlog costs nothing.
Parked and leased rows of a process that died are handed back as soon as a new one starts.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from pusherd.clock import now_ms
from pusherd.config import DeliveryConfig
from pusherd.delivery.retry import Outcome, RetryPolicy
from pusherd.delivery.sender import Sender, origin_of, outcome_label
from pusherd.metrics import Metrics
from pusherd.store.base import Store
from pusherd.store.db import StoreError
from pusherd.store.models import AttemptRecord, ClaimedDelivery, StatusChange

log = structlog.get_logger("pusherd.delivery")

CLAIM_BATCH = 256
POLL_S = 1.0
BREAKER_THRESHOLD = 5
BREAKER_FIRST_PAUSE_S = 30.0
BREAKER_MAX_PAUSE_S = 600.0


def owner_is_dead(owner: str) -> bool:
    """Whether a lease owner ("host:pid:nonce") was a process of this host that is gone."""
    host, _, rest = owner.partition(":")
    pid_text, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine's, or unknown: its lease runs out on its own
    pid = int(pid_text)
    if pid == os.getpid():
        return True  # an earlier process with our pid (the nonce differs: not us)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Breaker:
    """Per-origin circuit breaker: open after 5 consecutive failures, 30s doubling to 10m."""

    first_pause_s: float = BREAKER_FIRST_PAUSE_S
    failures: int = 0
    pause_s: float = BREAKER_FIRST_PAUSE_S
    open_until: float = 0.0  # monotonic
    probing: bool = False

    def __post_init__(self) -> None:
        self.pause_s = self.first_pause_s

    def is_open(self, now: float) -> bool:
        """Whether attempts must wait: paused, or a probe is still out."""
        return self.failures >= BREAKER_THRESHOLD and (now < self.open_until or self.probing)

    def paused(self, now: float) -> bool:
        """Whether the pause itself is running (not merely a probe in flight)."""
        return self.failures >= BREAKER_THRESHOLD and now < self.open_until

    def record(self, success: bool, now: float) -> bool:
        """Count an attempt's result; True when this opened the circuit."""
        was_probe, self.probing = self.probing, False
        if success:
            self.failures, self.pause_s = 0, self.first_pause_s
            return False
        self.failures += 1
        if was_probe:
            self.pause_s = min(self.pause_s * 2, BREAKER_MAX_PAUSE_S)
        if self.failures >= BREAKER_THRESHOLD:
            self.open_until = now + self.pause_s
            return True
        return False


@dataclass
class Origin:
    """Scheduling state of one destination origin."""

    name: str
    in_flight: int = 0
    waiting: deque[ClaimedDelivery] = field(default_factory=deque)
    breaker: Breaker = field(default_factory=Breaker)
    latency_s: float = 0.05  # moving average of attempt durations
    subscriptions: set[str] = field(default_factory=set)  # seen delivering to this origin


class Dispatcher:
    """Claims due deliveries and sends them, woken by ingest with a poll as a fallback."""

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
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lease_ms = int(config.lease * 1000)
        self.disable_after_ms = int(config.disable_after * 1000)
        self.breaker_pause_s = breaker_pause_s
        self.waiting_cap = max(64, config.per_destination * 32)
        self.held_cap = max(CLAIM_BATCH, config.max_in_flight * 4)
        self._origins: dict[str, Origin] = {}
        self._held: set[int] = set()  # ids claimed by us: waiting or in flight
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._in_flight = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the claim loop."""
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def wake(self) -> None:
        """New work may be due (called right after an ingest commit)."""
        self._wake.set()

    async def refresh_subscription(self, subscription: str) -> int:
        """Hand back a changed subscription's claimed-but-waiting rows.

        They were read at claim time; after a destination, key or status change (or a delete)
        the next claim reads the subscription afresh (and fails or skips the rows it must).
        """
        ids: list[int] = []
        for origin in self._origins.values():
            mine = [d.id for d in origin.waiting if d.subscription == subscription]
            if mine:
                origin.waiting = deque(d for d in origin.waiting if d.subscription != subscription)
                ids.extend(mine)
        await self._release(ids)
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
            if not self._held and not await self._due_now():
                await asyncio.sleep(0.02)
                if not self._held and not await self._due_now():
                    return
            await asyncio.sleep(0.01)
        raise TimeoutError("dispatcher did not become idle")

    # -- claim loop ------------------------------------------------------------------------

    async def _due_now(self) -> bool:
        return self.store.has_due(now_ms())

    def _next_due_in(self) -> float:
        first = self.store.next_due_ms()
        if first is None:
            return POLL_S
        return min(POLL_S, max(0.0, (first - now_ms()) / 1000))

    async def _run(self) -> None:
        await self._recover()
        while not self._stop.is_set():
            self._wake.clear()
            try:
                timeout = await self._claim_once()
            except Exception as exc:
                # The loop must outlive a bad moment of the store (disk full, I/O error); the
                # leases of anything claimed run out on their own and the rows come back.
                log.error("claim_failed", error=f"{type(exc).__name__}: {exc}")
                timeout = POLL_S
            if timeout is None:
                await asyncio.sleep(0)  # let attempts start before claiming more
            elif timeout > 0:
                await self._wait(timeout)

    async def _claim_once(self) -> float | None:
        """Claim and dispatch one batch; return how long to wait (None: claim again now)."""
        room = min(self.config.max_in_flight - self._in_flight, self.held_cap - len(self._held))
        if room <= 0:
            return POLL_S  # an attempt finishing wakes the loop
        if await self._due_now():
            limit = min(room, CLAIM_BATCH)
            claimed = await self.store.claim(self.owner, limit, self.lease_ms)
            await self._dispatch(claimed)
            if len(claimed) >= limit:
                return None
        return self._next_due_in()

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

    async def _dispatch(self, claimed: list[ClaimedDelivery]) -> None:
        if self._stop.is_set():  # stopped while this claim was in flight
            await self._release([d.id for d in claimed if d.id not in self._held])
            return
        now, wall_ms = time.monotonic(), now_ms()
        give_back: dict[int, list[int]] = {}
        park: dict[int, list[int]] = {}
        for d in claimed:
            if d.id in self._held:
                continue  # already ours (its lease was just renewed)
            origin = self._origin(d.destination)
            origin.subscriptions.add(d.subscription)
            breaker = origin.breaker
            if breaker.paused(now):
                park.setdefault(self._resume_ms(breaker, now, wall_ms), []).append(d.id)
            elif (
                origin.in_flight < self.config.per_destination
                and not origin.waiting
                and not breaker.is_open(now)
            ):
                self._start(origin, d)
            elif len(origin.waiting) < self.waiting_cap:
                # Also while a probe is out: its answer decides whether these go or wait.
                self._held.add(d.id)
                origin.waiting.append(d)
            elif breaker.is_open(now):
                # A probe is out and enough rows wait for its answer: park the rest until it
                # must have come back.
                due = wall_ms + math.ceil(self.config.timeout * 1000) + 1000
                park.setdefault(due, []).append(d.id)
            else:
                backlog = len(origin.waiting) / self.config.per_destination
                delay_ms = int(min(5.0, max(0.02, origin.latency_s * backlog)) * 1000)
                give_back.setdefault(wall_ms + delay_ms, []).append(d.id)
        for due, ids in give_back.items():
            await self._release(ids, due)
        for due, ids in park.items():
            await self._park(ids, due)

    @staticmethod
    def _resume_ms(breaker: Breaker, now: float, wall_ms: int) -> int:
        """When rows parked by a paused origin are due again: when the pause ends."""
        return wall_ms + math.ceil(max(0.0, breaker.open_until - now) * 1000) + 1

    def parked_subscriptions(self) -> dict[str, tuple[int, str]]:
        """Subscriptions whose origin is paused: (due time, owner) for rows ingested now."""
        now = time.monotonic()
        paused = [o for o in self._origins.values() if o.breaker.paused(now)]
        if not paused:
            return {}
        wall_ms = now_ms()
        out: dict[str, tuple[int, str]] = {}
        for origin in paused:
            due = self._resume_ms(origin.breaker, now, wall_ms)
            for sub in origin.subscriptions:
                out[sub] = (due, self.owner)
        return out

    def _origin(self, destination: str) -> Origin:
        try:
            name = origin_of(destination)
        except ValueError:
            name = destination
        origin = self._origins.get(name)
        if origin is None:
            origin = self._origins[name] = Origin(name, breaker=Breaker(self.breaker_pause_s))
        return origin

    def _start(self, origin: Origin, d: ClaimedDelivery) -> None:
        breaker = origin.breaker
        if breaker.failures >= BREAKER_THRESHOLD:
            breaker.probing = True  # the pause is over: this attempt is the probe
        origin.in_flight += 1
        self._in_flight += 1
        self._held.add(d.id)
        self.metrics.in_flight.labels(origin=origin.name).set(origin.in_flight)
        task = asyncio.get_running_loop().create_task(self._attempt(origin, d))
        self._tasks[d.id] = task

    async def _release(self, ids: list[int], due_ms: int | None = None) -> None:
        for i in ids:
            self._held.discard(i)
        if not ids:
            return
        try:
            await self.store.release(self.owner, ids, due_ms)
        except StoreError as exc:
            # The lease runs out on its own; the rows are claimed again then.
            log.error("release_failed", error=str(exc), deliveries=len(ids))

    async def _park(self, ids: list[int], due_ms: int) -> None:
        """Keep rows leased until due_ms without spending an attempt (a paused origin)."""
        for i in ids:
            self._held.discard(i)
        try:
            await self.store.park(self.owner, ids, due_ms)
        except StoreError as exc:
            log.error("park_failed", error=str(exc), deliveries=len(ids))

    async def _recover(self) -> None:
        """Hand back rows leased or parked by a process of this host that has died."""
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

    async def _attempt(self, origin: Origin, d: ClaimedDelivery) -> None:
        started = now_ms()
        try:
            outcome = await self.sender.send(d)
            await self._record(origin, d, outcome, started)
        except asyncio.CancelledError:
            origin.breaker.probing = False
            raise
        except Exception:
            log.exception("attempt_crashed", delivery_id=d.id)
            if origin.breaker.probing:  # a probe that never answered must not pin the circuit
                origin.breaker.record(False, time.monotonic())
        finally:
            self._tasks.pop(d.id, None)
            self._held.discard(d.id)
            origin.in_flight -= 1
            self._in_flight -= 1
            self.metrics.in_flight.labels(origin=origin.name).set(origin.in_flight)
            if not self._stop.is_set():
                self._next_for(origin)
            self._wake.set()

    async def _record(
        self, origin: Origin, d: ClaimedDelivery, outcome: Outcome, started: int
    ) -> None:
        now = time.monotonic()
        origin.latency_s = 0.8 * origin.latency_s + 0.2 * outcome.duration_ms / 1000
        if origin.breaker.record(outcome.ok, now):
            log.warning(
                "circuit_opened",
                origin=origin.name,
                pause_s=origin.breaker.pause_s,
                failures=origin.breaker.failures,
            )
        self.metrics.circuit_open.labels(origin=origin.name).set(
            1 if origin.breaker.is_open(now) else 0
        )
        decision = self.policy.decide(d.schedule_pos + 1, outcome, now_ms())
        label = outcome_label(outcome)
        self.metrics.attempts.labels(outcome=label).inc()
        self.metrics.attempt_duration.observe(outcome.duration_ms / 1000)
        record = AttemptRecord(
            started_ms=started,
            duration_ms=round(outcome.duration_ms, 3),
            status_code=outcome.status_code,
            error=outcome.error,
            response_body=outcome.body,
        )
        change = await self.store.record_attempt(
            d, self.owner, record, decision.kind, decision.next_attempt_ms, self.disable_after_ms
        )
        if decision.kind == "delivered":
            self.metrics.finished.labels(status="delivered").inc()
        elif decision.kind in ("failed", "gone"):
            self.metrics.finished.labels(status="failed").inc()
        log.info(
            "delivery_attempted",
            delivery_id=d.id,
            subscription=d.subscription,
            event_name=d.event_name,
            origin=origin.name,
            attempt=d.attempts + 1,
            status_code=outcome.status_code,
            error=outcome.error,
            duration_ms=round(outcome.duration_ms, 1),
            result=decision.kind,
        )
        if change is not None:
            self.on_status_change(change)
            if change.new == "DISABLED":
                await self.refresh_subscription(d.subscription)

    def _next_for(self, origin: Origin) -> None:
        now = time.monotonic()
        if origin.waiting and origin.breaker.paused(now):
            ids = [d.id for d in origin.waiting]
            origin.waiting.clear()
            for i in ids:
                self._held.add(i)  # _park drops them from _held
            due = self._resume_ms(origin.breaker, now, now_ms())
            task = asyncio.get_running_loop().create_task(self._park(ids, due))
            self._tasks[-id(task)] = task
            task.add_done_callback(lambda t: self._tasks.pop(-id(t), None))
            return
        while origin.waiting and origin.in_flight < self.config.per_destination:
            if origin.breaker.is_open(now):
                break
            self._start(origin, origin.waiting.popleft())
