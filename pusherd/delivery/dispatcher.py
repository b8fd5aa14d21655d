"""The dispatcher: claim due deliveries with a lease and run attempts within the limits.

Deliveries are claimed per subscription, and only for destinations (origins) that have room: an
origin keeps at most `per_destination` attempts in flight and a short queue of claimed rows ready
behind them. A slow origin therefore never holds rows another origin could send, and the process
never reads more of the queue than it can send. The whole process keeps at most `max_in_flight`
attempts under way.

A per-origin circuit breaker pauses an origin after consecutive failures: its subscriptions are not
claimed from at all until the pause ends (so a dead receiver with a large backlog costs nothing),
then one probe decides. The breaker lives in memory: after a restart every origin starts closed.
Rows leased by a process of this host that died are handed back as soon as a new one starts.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from pusherd.clock import now_ms
from pusherd.config import DeliveryConfig
from pusherd.delivery.origins import (
    BREAKER_FIRST_PAUSE_S,
    QUEUE_FACTOR,
    Breaker,
    Claims,
    Limits,
    Origin,
    prune,
)
from pusherd.delivery.retry import Outcome, RetryPolicy
from pusherd.delivery.sender import Exchange, Sender, origin_of, outcome_label
from pusherd.log import info_enabled
from pusherd.metrics import Metrics
from pusherd.store.base import Store
from pusherd.store.db import StoreError
from pusherd.store.models import AttemptRecord, ClaimedDelivery, StatusChange

log = structlog.get_logger("pusherd.delivery")

POLL_S = 1.0
NOTHING_DUE = 2**62  # a due time that never comes
TARGETS_MAX_AGE_S = 5.0  # subscriptions are re-read at least this often (changes made elsewhere)


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


class Taking:
    """One ingest's hand-over: which fresh deliveries go straight to the dispatcher."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.owner = dispatcher.owner
        self.lease_ms = dispatcher.lease_ms
        self.promises: list[tuple[Origin, str]] = []
        self.missed: set[str] = set()  # subscriptions that got a row the usual way
        self.closed = False

    def wants(self, subscription: str) -> bool:
        """Take it when its origin has room and no older delivery of it may be due."""
        d = self.dispatcher
        if self.closed:  # accept() already ran: its ingest was given up on before this write
            d._quiet.pop(subscription, None)
            d._wake.set()
            return False
        origin = d._sub_origin.get(subscription)
        quiet_until = d._quiet.get(subscription)
        if (
            origin is None
            or d._stop.is_set()
            or quiet_until is None
            or quiet_until <= now_ms()
            or not origin.proven  # claimed instead, within the share of unproven origins
            or origin.breaker.tripped()
            or origin.free(d.config.per_destination) <= 0
        ):
            d._quiet.pop(subscription, None)  # a due row is now in the table: probe it
            self.missed.add(subscription)
            return False
        origin.promised += 1
        d._handing[subscription] = d._handing.get(subscription, 0) + 1
        self.promises.append((origin, subscription))
        return True


class Dispatcher:
    """Claims due deliveries and sends them, woken by ingest with a poll as a fallback.

    Fresh deliveries skip the claim: ingest creates them leased to this dispatcher when their
    origin has room and nothing older of their subscription is due (see Taking).
    """

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
        self._origins: dict[str, Origin] = {}
        self._limits = Limits(config.per_destination, config.max_in_flight)
        self._targets_at = -TARGETS_MAX_AGE_S  # monotonic time of the last read
        self._held: set[int] = set()  # ids claimed by us: waiting, in flight or being recorded
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._in_flight = 0
        self._gone: set[str] = set()  # answered 410, not yet recorded DISABLED
        self._sub_origin: dict[str, Origin] = {}
        # subscription -> earliest due time of its pending rows as last probed (a large number
        # when none); absent: unknown, probe before claiming. Cleared at least every POLL_S.
        self._quiet: dict[str, int] = {}
        # subscription -> deliveries an ingest is handing over (committed or not): its other
        # rows are not claimed meanwhile, or a newer one could leave before them.
        self._handing: dict[str, int] = {}
        self._probed_all_at = 0.0
        # Labelled metric children looked up once: labels() is costly on the hot path.
        self._outcomes = {
            o: metrics.attempts.labels(outcome=o)
            for o in ("success", "http_error", "network_error", "timeout")
        }
        self._finished = {s: metrics.finished.labels(status=s) for s in ("delivered", "failed")}

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the claim loop."""
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def wake(self, everything: bool = False) -> None:
        """New work may be due; `everything`: rows were queued behind the ingest path's back
        (test sends, retries, replays), so every subscription is probed again."""
        if everything:
            self._quiet.clear()
        self._wake.set()

    def taking(self) -> Taking:
        """A hand-over for one ingest (pass it to Store.ingest, then to accept())."""
        return Taking(self)

    def accept(self, taking: Taking, handed: list[ClaimedDelivery]) -> None:
        """Take the deliveries an ingest committed leased to us (none if its write failed)."""
        taking.closed = True
        wake = bool(taking.missed or handed or taking.promises)
        for origin, sub in taking.promises:
            origin.promised -= 1
            left = self._handing[sub] - 1
            if left:
                self._handing[sub] = left
            else:
                del self._handing[sub]
        taking.promises.clear()
        # A probe may have run between wants() and the commit and found nothing yet.
        for sub in taking.missed:
            self._quiet.pop(sub, None)
        taking.missed.clear()
        if handed:
            self._dispatch(handed)
        if wake:
            self._wake.set()  # rows it did not take, or ones held back by its promises

    async def refresh_subscription(self, subscription: str) -> int:
        """A subscription changed (destination, key, status) or was deleted.

        Its claimed-but-waiting rows were read at claim time: they are handed back, and the
        subscriptions are read afresh before the next claim.
        """
        ids: list[int] = []
        for origin in self._origins.values():
            mine = [d.id for d in origin.waiting if d.subscription == subscription]
            if mine:
                origin.waiting = deque(d for d in origin.waiting if d.subscription != subscription)
                ids.extend(mine)
        self._targets_at = -TARGETS_MAX_AGE_S
        self._quiet.clear()
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
            if not self._held and not self._anything_due():
                await asyncio.sleep(0.02)
                if not self._held and not self._anything_due():
                    return
            await asyncio.sleep(0.01)
        raise TimeoutError("dispatcher did not become idle")

    def _anything_due(self) -> bool:
        self._load_targets(force=True)
        wall_ms, now = now_ms(), time.monotonic()
        for origin in self._origins.values():
            if origin.breaker.paused(now):
                continue
            for sub in origin.subscriptions:
                due = self.store.next_due(sub)
                if due is not None and due <= wall_ms:
                    return True
        return False

    # -- claim loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        await self._recover()
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

    def _load_targets(self, force: bool = False) -> None:
        """Group the live, not DISABLED subscriptions by origin."""
        now = time.monotonic()
        if not force and now - self._targets_at < TARGETS_MAX_AGE_S:
            return
        self._targets_at = now
        for origin in self._origins.values():
            origin.subscriptions = []
        self._sub_origin = {}
        for uuid, destination in self.store.dispatch_targets():
            if uuid not in self._gone:
                origin = self._origin(destination)
                origin.subscriptions.append(uuid)
                self._sub_origin[uuid] = origin
        self._forget_idle_origins()

    async def _cycle(self) -> float:
        """Claim for every origin with room; return how long to wait (0: go again now)."""
        self._load_targets()
        now, wall_ms = time.monotonic(), now_ms()
        if now - self._probed_all_at >= POLL_S:
            # Rows may be queued by other means (another process, the CLI): look again.
            self._probed_all_at = now
            self._quiet.clear()
        budget = self.config.max_in_flight * (1 + QUEUE_FACTOR) - len(self._held)
        claims = Claims(self._origins.values(), self._limits, budget, now)
        next_ms = wall_ms + int(POLL_S * 1000)
        wants: list[tuple[str, int]] = []
        for origin in self._origins.values():
            if origin.breaker.paused(now):
                resume_ms = wall_ms + int((origin.breaker.open_until - now) * 1000) + 1
                next_ms = min(next_ms, resume_ms)
                continue
            room = claims.room(origin)
            if room <= 0 or not origin.subscriptions:
                continue
            due_subs = []
            for sub in origin.subscriptions:
                if sub in self._handing:
                    continue  # accept() wakes the loop again
                due = self._quiet.get(sub)
                if due is None or due <= wall_ms:
                    probed = self.store.next_due(sub)
                    due = NOTHING_DUE if probed is None else probed
                if due <= wall_ms:
                    self._quiet.pop(sub, None)
                    due_subs.append(sub)
                else:
                    self._quiet[sub] = due
                    next_ms = min(next_ms, due)
            if not due_subs:
                continue
            # Share the room among the origin's due subscriptions, starting where it stopped.
            origin.turn = (origin.turn + 1) % len(due_subs)
            share = -(-room // len(due_subs))
            for i in range(len(due_subs)):
                if room <= 0:
                    break
                n = min(share, room)
                wants.append((due_subs[(origin.turn + i) % len(due_subs)], n))
                room -= n
                claims.take(origin, n)
        if wants:
            claimed = await self.store.claim(self.owner, wants, self.lease_ms)
            self._dispatch(claimed)
            if len(claimed) >= sum(n for _, n in wants):
                return 0.0  # there may be more due right now
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
        for d in claimed:
            if d.id in self._held:
                continue  # already ours (its lease was just renewed)
            if d.subscription in self._gone:
                gone.append(d.id)
                continue
            self._held.add(d.id)
            self._origin(d.destination).waiting.append(d)
        if gone:
            self._spawn(self._release(gone))
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

    def _forget_idle_origins(self) -> None:
        """Drop origins no subscription points at any more, with their metric series."""
        for name in prune(self._origins):
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
        self._quiet.clear()  # those rows are due again: probe before handing fresh ones over
        try:
            await self.store.release(self.owner, ids)
        except StoreError as exc:
            # The lease runs out on its own; the rows are claimed again then.
            log.error("release_failed", error=str(exc), deliveries=len(ids))
        self._quiet.clear()  # again: a probe before the commit saw them still leased
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
                await self._record(d, outcome, started)
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

    async def _record(self, d: ClaimedDelivery, outcome: Outcome, started: int) -> None:
        decision = self.policy.decide(d.schedule_pos + 1, outcome, now_ms())
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
        if decision.kind == "retry" and decision.next_attempt_ms is not None:
            quiet = self._quiet.get(d.subscription)
            if quiet is not None:  # it is due again then: wake up for it
                self._quiet[d.subscription] = min(quiet, decision.next_attempt_ms)
        if decision.kind == "delivered":
            self._finished["delivered"].inc()
        elif decision.kind in ("failed", "gone"):
            self._finished["failed"].inc()
        if info_enabled():
            log.info(
                "delivery_attempted",
                delivery_id=d.id,
                subscription=d.subscription,
                event_name=d.event_name,
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
