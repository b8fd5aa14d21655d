"""The dispatcher: claim due deliveries with a lease and run attempts within the limits.

Each cycle asks the store once for what is due, telling it how much room every known
destination (origin) has: an origin keeps at most `per_destination` attempts in flight and a
short queue of claimed rows ready behind them, and one without room is skipped by the claim. The
store reads, per origin with room, the due end of its queues (one row per subscription with its
next due time), so a cycle costs what is due, not the number of subscriptions. A slow origin
never holds rows another origin could send, and the process never reads more of the queue than
it can send. The whole process keeps at most `max_in_flight` attempts under way.

A per-origin circuit breaker pauses an origin after consecutive failures: its subscriptions are not
claimed from at all until the pause ends (so a dead receiver with a large backlog costs nothing),
then one probe decides. The breaker lives in memory: after a restart every origin starts closed.
Rows leased by a process of this host that died are handed back as soon as a new one starts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from pusherd.clock import now_ms
from pusherd.config import DeliveryConfig
from pusherd.delivery.attempts import Attempts, origin_name
from pusherd.delivery.leases import new_owner, owner_is_dead
from pusherd.delivery.origins import (
    BREAKER_FIRST_PAUSE_S,
    QUEUE_FACTOR,
    Claims,
    Origin,
    prune,
)
from pusherd.delivery.recorder import Recorder
from pusherd.delivery.retry import RetryPolicy
from pusherd.delivery.sender import Sender
from pusherd.metrics import Metrics
from pusherd.store import Change, Store, StoreError
from pusherd.store.types import ClaimedDelivery, Handover, StatusChange

log = structlog.get_logger("pusherd.delivery")

POLL_S = 1.0  # rows queued by other means (another process, the CLI) are found this soon
# ... unless the last poll found nothing committed (an idle SQLite daemon; on PostgreSQL every
# poll looks): then it polls every IDLE_POLL_S, since each wake-up of an idle process is what
# its idle CPU is made of (14-45 ms of CPU each for a daemon grown to 100,000 subscriptions on
# a virtual machine, its memory cold after the sleep). Its own writes wake it at once, and so
# do another process's queued deliveries (`pusherd replay`) through the store's change feed:
# the poll is only the fallback when that word cannot reach it.
IDLE_POLL_S = 10.0
PRUNE_EVERY_S = 5.0  # idle origins are looked for this often, and after subscription changes
# Changes after which rows claimed before them are stale.
STALE_ROWS = frozenset(
    {"subscription_changed", "subscription_deleted", "subscription_disabled", "key_rotated"}
)


class Dispatcher(Attempts):
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
        owner = new_owner()
        self.on_status_change = on_status_change
        self.policy = policy or RetryPolicy(config.retry_schedule, config.jitter)
        self.lease_ms = int(config.lease * 1000)
        self.disable_after_ms = int(config.disable_after * 1000)
        recorder = Recorder(
            store, owner, self.policy, metrics, self.disable_after_ms, on_status_change
        )
        super().__init__(config, store, sender, metrics, owner, recorder, breaker_pause_s)
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        # subscription -> hand-backs under way after it changed (claims wait for them)
        self._settling: dict[str, int] = {}
        self._prune_at = 0.0  # monotonic time to look for origins to forget
        # Whether the next claim must look for due rows of origins it does not know (new
        # destinations): after rows were queued or handed back, on the poll, and once the
        # earliest due time of the last claim is reached. Otherwise only origins with room are
        # asked for rows, and a cycle where none has room asks the store nothing: 50 silent
        # origins with backlogs cost every claim a walk over their queues.
        self._discover = True
        self._discovered_at = 0.0  # monotonic
        self._next_due_ms: int | None = None  # the last claim's earliest due time after then
        self._active = True  # a cycle ran its claim since the last look for origins to forget

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the claim loop; from now on the store's change feed wakes it."""
        self._unsubscribe = self.store.changes.subscribe(self._changed)
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _changed(self, change: Change) -> None:
        """A committed write the dispatcher must know about (from the store's change feed)."""
        if change.kind == "deliveries_queued":
            self._discover = True
            self._wake.set()
        elif change.subscription and change.kind in STALE_ROWS:
            # Rows of it waiting here were read before the change (destination, key, status):
            # they go back, and are claimed afresh.
            self._discover = True
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
        self._discover = True
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
        self._wake.set()  # the claim loop sees the stop now, not at its next poll
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
        woken = True
        while not self._stop.is_set():
            self._wake.clear()
            try:
                timeout = await self._cycle(woken)
            except Exception as exc:
                # The loop must outlive a bad moment of the store (disk full, I/O error); the
                # leases of anything claimed run out on their own and the rows come back.
                log.error("claim_failed", error=f"{type(exc).__name__}: {exc}")
                timeout, self._discover = POLL_S, True
            if timeout > 0:
                woken = await self._wake.wait(timeout)
            else:
                await asyncio.sleep(0)  # let attempts start before claiming more
                woken = True

    async def _cycle(self, woken: bool = True) -> float:
        """One claim for every origin with room; return how long to wait (0: go again now).

        woken: False when only the wait's timeout (the poll, a due time) ended the wait.
        """
        now, wall_ms = time.monotonic(), now_ms()
        if not woken and await self._nothing_new(wall_ms):
            # The poll, and nothing was committed anywhere since the last look, no due time is
            # reached and no breaker is counting down: the last claim's answer still holds.
            # This is all an idle daemon does once a second (the claim would have read the
            # queues and visited every origin).
            self._discovered_at = now
            if self._active and now >= self._prune_at:
                await self._forget_idle_origins(now)  # once after the last claims, then no more
            if self._next_due_ms is None:
                return IDLE_POLL_S
            return max(0.0, min(IDLE_POLL_S, (self._next_due_ms - wall_ms) / 1000))
        self._active = True
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
        discover = (
            self._discover
            or now - self._discovered_at >= POLL_S
            or (self._next_due_ms is not None and self._next_due_ms <= wall_ms)
        )
        if not discover:
            if not any(n > 0 for n in room.values()):
                # No known origin may take rows and nothing can have become due elsewhere: a
                # freed slot, or the earliest due time, wakes the loop.
                if self._next_due_ms is not None:
                    next_ms = min(next_ms, self._next_due_ms)
                next_ms = min(next_ms, wall_ms + int((self._discovered_at + POLL_S - now) * 1000))
                return max(0.0, (next_ms - now_ms()) / 1000)
        else:
            self._discover, self._discovered_at = False, now
        # An origin seen for the first time slow-starts (one attempt, rows ready behind it),
        # and all of those together stay within the share of origins not proven yet.
        claim = await self.store.claim(
            self.owner,
            room,
            min(1, self.config.per_destination) * (1 + QUEUE_FACTOR),
            budget,
            self.lease_ms,
            default_total=max(0, claims.unproven_left) if discover else 0,
        )
        self._dispatch(claim.deliveries)
        self._next_due_ms = claim.next_due_ms
        if discover and self._unnamed_share_spent(claim.deliveries, room, claims, budget):
            self._discover = True  # origins not known yet may have been left rows due now
        if claim.more:
            return 0.0  # there may be more due right now
        if claim.next_due_ms is not None:
            next_ms = min(next_ms, claim.next_due_ms)
        return max(0.0, (next_ms - now_ms()) / 1000)

    def _unnamed_share_spent(
        self, claimed: list[ClaimedDelivery], room: dict[str, int], claims: Claims, budget: int
    ) -> bool:
        """Whether origins not named in the claim may have been left rows for lack of room:
        the claim took all the process's budget, or all the share of origins not named."""
        allowed = max(0, claims.unproven_left)
        if not allowed or len(claimed) >= budget:
            return True
        unnamed = sum(1 for d in claimed if origin_name(d.destination) not in room)
        return unnamed >= allowed

    async def _nothing_new(self, wall_ms: int) -> bool:
        """Whether a cycle the timeout started may skip its claim (see _cycle)."""
        if self._discover or self._settling:
            return False
        if self._next_due_ms is not None and self._next_due_ms <= wall_ms:
            return False
        if self._limits.tripped:
            return False  # a pause that ends, or a probe, is not a commit
        return not await self.store.may_have_changed()

    def _dispatch(self, claimed: list[ClaimedDelivery]) -> None:
        if self._stop.is_set():  # stopped while this claim was in flight
            fresh = [d.id for d in claimed if d.id not in self._held]
            self._spawn(self._release(fresh))
            return
        gone = []
        stale: dict[str, list[int]] = {}
        fed: dict[str, Origin] = {}  # origins given rows: only they may start more now
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
            origin = self._origin(d.destination)
            origin.waiting.append(d)
            fed[origin.name] = origin
        if gone:
            self._spawn(self._release(gone))
        for sub, ids in stale.items():
            self._hand_back(sub, ids)
        for origin in fed.values():
            self._pump(origin)

    async def _forget_idle_origins(self, now: float) -> None:
        """Drop origins that hold nothing and no subscription points at any more, with their
        metric series (an origin still pointed at keeps its breaker and slow-start state)."""
        self._prune_at, self._active = now + PRUNE_EVERY_S, False
        idle = [name for name, origin in self._origins.items() if origin.idle()]
        if idle:
            in_use = await self.store.origins_in_use(idle)
            for name in prune(self._origins, in_use):
                self.metrics.forget_origin(name)

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
