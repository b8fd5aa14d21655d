"""Recording attempts on PostgreSQL: one transaction per group of concurrent records.

Records that arrive while a group is being written form the next group (one in flight at a
time, as on SQLite): one finish_many statement for every outcome, fenced row by row by owner
and fencing token, then the status changes of the subscriptions concerned, read with one
locking statement and written only when one changes. One WAL flush per group instead of one per
attempt: F measured 733-924 recorded/s one statement per outcome, 6,500-9,200/s batched.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog

from pusherd.clock import now_ms
from pusherd.store.changes import Change, ChangeFeed, ChangeKind
from pusherd.store.postgres import claims
from pusherd.store.postgres.dbclock import DbClock
from pusherd.store.postgres.directory import Conn, sync_queue
from pusherd.store.postgres.feed import CHANGE_CHANNEL, payload
from pusherd.store.postgres.pool import Pool
from pusherd.store.postgres.vacuum import Vacuum
from pusherd.store.types import AttemptRecord, ClaimedDelivery, Finish, StatusChange

log = structlog.get_logger("pusherd.store")

RESPONSE_BODY_MAX = 1024


@dataclass
class PendingRecord:
    delivery: ClaimedDelivery
    owner: str
    token: int | None
    outcome: claims.Outcome
    finish: Finish
    disable_after_ms: int
    future: asyncio.Future[StatusChange | None]


def _kind(new: str) -> ChangeKind:
    return "subscription_disabled" if new == "DISABLED" else "subscription_changed"


class Records:
    """Attempt records (mixed into PostgresStore)."""

    pool: Pool
    clock: DbClock
    changes: ChangeFeed
    sender: str
    leases: dict[int, int]
    _records: list[PendingRecord]
    _recorder: asyncio.Task[None] | None
    vacuum: Vacuum

    async def record_attempt(
        self,
        delivery: ClaimedDelivery,
        owner: str,
        attempt: AttemptRecord,
        finish: Finish,
        next_attempt_ms: int | None,
        disable_after_ms: int,
    ) -> StatusChange | None:
        """Record an attempt in the next group; only the current lease (owner and fencing
        token) moves the row on, and only then may the outcome change the subscription."""
        now = now_ms()
        if finish == "retry":
            # Computed on this process's clock, compared on the database's (dbclock.py).
            status, due = "pending", self.clock.to_db(next_attempt_ms or now)
        else:
            status, due = ("delivered" if finish == "delivered" else "failed"), None
        outcome = claims.Outcome(
            status=status,
            schedule_pos=delivery.schedule_pos + (0 if finish == "delivered" else 1),
            next_attempt_ms=due,
            started_ms=attempt.started_ms,
            duration_ms=attempt.duration_ms,
            status_code=attempt.status_code,
            error=attempt.error,
            response_body=attempt.response_body[:RESPONSE_BODY_MAX],
        )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[StatusChange | None] = loop.create_future()
        token = self.leases.get(delivery.id)
        self._records.append(
            PendingRecord(delivery, owner, token, outcome, finish, disable_after_ms, fut)
        )
        if self._recorder is None or self._recorder.done():
            self._recorder = loop.create_task(self._record_groups())
        # Shielded: a caller given up on must not cancel the group's shared write.
        return await asyncio.shield(fut)

    async def disable_overdue(
        self, subscription: str, disable_after_ms: int
    ) -> StatusChange | None:
        """DISABLE a subscription FAILING for disable_after_ms or longer; the change, or None."""
        now = self.clock.now_ms()  # failing_since_ms was set on the database's clock
        async with self.pool.transaction() as conn:
            # Locks in the order a record takes them: the subscription, then its queue row.
            row = await conn.fetchrow(
                "SELECT organization, contact_email, destination, status, failing_since_ms"
                " FROM subscriptions WHERE uuid = $1 AND deleted_ms IS NULL FOR UPDATE",
                subscription,
            )
            if row is None:
                return None
            org, email, destination, old, failing_since = row
            if old != "FAILING" or failing_since is None or now - failing_since < disable_after_ms:
                return None
            await conn.execute(
                "SELECT 1 FROM queues WHERE subscription = $1 FOR UPDATE", subscription
            )
            await self._store_status(
                conn, subscription, [org, email, destination, "DISABLED", failing_since], now
            )
        self.changes.announce(Change("subscription_disabled", org, subscription))
        reason = "failing continuously for longer than disable_after"
        return StatusChange(subscription, org, email, destination, old, "DISABLED", reason)

    async def _record_groups(self) -> None:
        while self._records:
            batch, self._records = self._records, []
            try:
                changes = await self._write_records(batch)
            except Exception as exc:
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            self.vacuum.finished(len(batch))
            for r, change in zip(batch, changes, strict=True):
                if self.leases.get(r.delivery.id) == r.token:
                    self.leases.pop(r.delivery.id, None)
                if not r.future.done():
                    r.future.set_result(change)
            for change in changes:
                if change is not None:
                    kind = _kind(change.new)
                    self.changes.announce(Change(kind, change.organization, change.subscription))

    async def _write_records(self, batch: list[PendingRecord]) -> list[StatusChange | None]:
        now = self.clock.now_ms()  # failing_since_ms is compared by every process
        out: list[StatusChange | None] = [None] * len(batch)
        async with self.pool.transaction() as conn:
            # The subscriptions first, as a subscription update locks them (then deliveries,
            # then queues): a destination change racing this record cannot deadlock (issue 12).
            rows = await conn.fetch(
                "SELECT uuid, organization, contact_email, destination, status, failing_since_ms"
                " FROM subscriptions WHERE uuid = ANY($1::text[]) AND deleted_ms IS NULL"
                " ORDER BY uuid FOR UPDATE",
                sorted({r.delivery.subscription for r in batch}),
            )
            state: dict[str, list[Any]] = {r[0]: list(r[1:]) for r in rows}
            await _lock_queues(conn, batch, state, now)
            done: set[int] = set()
            by_owner: dict[str, list[tuple[int, int | None, claims.Outcome]]] = {}
            for r in batch:
                by_owner.setdefault(r.owner, []).append((r.delivery.id, r.token, r.outcome))
            for owner, items in by_owner.items():
                done |= await claims.finish_many(conn, owner, items)
            applied = [i for i, r in enumerate(batch) if r.delivery.id in done]
            if not applied:
                return out
            before = {uuid: (s[3], s[4]) for uuid, s in state.items()}
            for i in applied:
                r = batch[i]
                s = state.get(r.delivery.subscription)
                if s is not None:
                    out[i] = _status_change(r, s, now)
            for uuid, s in state.items():
                if (s[3], s[4]) != before[uuid]:
                    await self._store_status(conn, uuid, s, now)
        return out

    async def _store_status(self, conn: Conn, uuid: str, s: list[Any], now: int) -> None:
        org, _, _, status, failing_since = s
        await conn.execute(
            "UPDATE subscriptions SET status = $1, failing_since_ms = $2, updated_ms = $3"
            " WHERE uuid = $4",
            status,
            failing_since,
            now,
            uuid,
        )
        await sync_queue(conn, uuid)
        change = Change(_kind(status), org, uuid)
        await conn.execute("SELECT pg_notify($1, $2)", CHANGE_CHANNEL, payload(self.sender, change))


async def _lock_queues(
    conn: Conn, batch: list[PendingRecord], state: dict[str, list[Any]], now: int
) -> None:
    """Lock, in subscription order as every ingest does, the queue rows this record may move:
    those of a retry (finish_many) and those whose subscription may change status (sync_queue).

    Locked one by one where each is moved, a retry of one subscription and a 410 of another
    took their queue rows out of order, and an ingest fanning out to both deadlocked with the
    record (issue 12). A delivered or failed row of a subscription that keeps its status moves
    nothing, and its queue row stays free for the claims.
    """
    trial = {uuid: list(s) for uuid, s in state.items()}  # _status_change updates in place
    moving = {
        r.delivery.subscription
        for r in batch
        if r.outcome.status == "pending"
        or (
            r.delivery.subscription in trial
            and _status_change(r, trial[r.delivery.subscription], now) is not None
        )
    }
    if moving:
        await conn.execute(
            "SELECT 1 FROM queues WHERE subscription = ANY($1::text[])"
            " ORDER BY subscription FOR UPDATE",
            sorted(moving),
        )


def _status_change(r: PendingRecord, s: list[Any], now: int) -> StatusChange | None:
    """The subscription's status after this outcome (s: its running state, updated in place)."""
    org, email, destination, old, failing_since = s
    new, reason = old, ""
    if r.finish == "delivered":
        if old == "FAILING":
            new, reason = "ACTIVE", "delivery succeeded"
    elif r.finish == "gone":
        if old != "DISABLED":
            new, reason = "DISABLED", "destination answered 410 Gone"
    elif old == "ACTIVE":
        new, reason, failing_since = "FAILING", "delivery attempt failed", now
    elif (
        old == "FAILING" and failing_since is not None and now - failing_since >= r.disable_after_ms
    ):
        new, reason = "DISABLED", "failing continuously for longer than disable_after"
    if new == old:
        return None
    s[3], s[4] = new, None if new == "ACTIVE" else failing_since
    return StatusChange(r.delivery.subscription, org, email, destination, old, new, reason)
