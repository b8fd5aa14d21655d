"""The delivery log on PostgreSQL: requeue and replay, listings, counts, queue stats, retention."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from pusherd.clock import now_ms
from pusherd.store.changes import Change, ChangeFeed
from pusherd.store.errors import StoreError
from pusherd.store.postgres.dbclock import DbClock
from pusherd.store.postgres.directory import refresh_queues
from pusherd.store.postgres.feed import CHANGE_CHANNEL, payload
from pusherd.store.postgres.pool import Pool
from pusherd.store.types import (
    AttemptRecord,
    BackupSummary,
    DeliveryCounts,
    DeliveryView,
    QueueStats,
)

_VIEW = (
    "d.id, d.subscription, e.event_name, d.status, d.attempts, d.created_ms, d.finished_ms,"
    " d.last_status_code, d.last_error, CASE WHEN d.status = 'pending' THEN d.due_ms END"
)
# A finished delivery queued again gets a fresh retry schedule; its attempt count keeps growing.
_REQUEUE = (
    "UPDATE deliveries SET status = 'pending', due_ms = $1, finished_ms = NULL,"
    " schedule_pos = 0, lease_owner = NULL, lease_token = NULL, lease_until_ms = NULL"
)


def _view(r: Any, attempts: tuple[AttemptRecord, ...] = ()) -> DeliveryView:
    return DeliveryView(
        id=int(r[0]),
        subscription=r[1],
        event_name=r[2],
        status=r[3],
        attempts=int(r[4]),
        created_ms=int(r[5]),
        finished_ms=r[6],
        last_status_code=r[7],
        last_error=r[8],
        due_ms=r[9],
        attempt_log=attempts,
    )


class Log:
    """The delivery log (mixed into PostgresStore)."""

    pool: Pool
    clock: DbClock
    changes: ChangeFeed
    sender: str

    async def _queued(self, conn: Any, change: Change) -> None:
        await conn.execute("SELECT pg_notify($1, $2)", CHANGE_CHANNEL, payload(self.sender, change))

    async def requeue(self, delivery_id: int, organization: str) -> str:
        """Queue a finished delivery again: "queued", "pending" (still pending) or "missing"."""
        change = Change("deliveries_queued", organization)
        async with self.pool.transaction() as conn:
            row = await conn.fetchrow(
                "SELECT d.status, d.subscription FROM deliveries d"
                " JOIN subscriptions s ON s.uuid = d.subscription"
                " WHERE d.id = $1 AND s.organization = $2 AND s.deleted_ms IS NULL"
                " FOR UPDATE OF d",
                delivery_id,
                organization,
            )
            if row is None:
                return "missing"
            if row[0] == "pending":
                return "pending"
            await conn.execute(f"{_REQUEUE} WHERE id = $2", self.clock.now_ms(), delivery_id)
            await refresh_queues(conn, [row[1]])
            await self._queued(conn, change)
        self.changes.announce(change)
        return "queued"

    async def replay(self, subscription: str, since_ms: int | None, status: str | None) -> int:
        """Re-queue a subscription's finished deliveries (since a time / of a status)."""
        change = Change("deliveries_queued", subscription=subscription)
        async with self.pool.transaction() as conn:
            n = await conn.fetchval(
                f"WITH done AS ({_REQUEUE} WHERE subscription = $2"
                " AND status IN ('delivered', 'failed')"
                " AND ($3::bigint IS NULL OR created_ms >= $3)"
                " AND ($4::text IS NULL OR status = $4) RETURNING 1)"
                " SELECT count(*) FROM done",
                self.clock.now_ms(),
                subscription,
                since_ms,
                status,
            )
            await refresh_queues(conn, [subscription])
            if n:
                await self._queued(conn, change)
        if n:
            self.changes.announce(change)
        return int(n)

    async def list_deliveries(
        self, subscription: str, status: str | None, limit: int, before_id: int | None
    ) -> list[DeliveryView]:
        """A subscription's deliveries, newest first, keyset-paginated by id."""
        rows = await self.pool.fetch(
            f"SELECT {_VIEW} FROM deliveries d JOIN events e ON e.seq = d.event_seq"
            " WHERE d.subscription = $1 AND ($2::text IS NULL OR d.status = $2)"
            " AND ($3::bigint IS NULL OR d.id < $3) ORDER BY d.id DESC LIMIT $4",
            subscription,
            status,
            before_id,
            limit,
        )
        return [_view(r) for r in rows]

    async def get_delivery(self, delivery_id: int, organization: str) -> DeliveryView | None:
        """One delivery of the organization with every attempt, or None."""
        rows = await self.pool.fetch(
            f"SELECT {_VIEW} FROM deliveries d JOIN events e ON e.seq = d.event_seq"
            " JOIN subscriptions s ON s.uuid = d.subscription"
            " WHERE d.id = $1 AND s.organization = $2 AND s.deleted_ms IS NULL",
            delivery_id,
            organization,
        )
        if not rows:
            return None
        attempts = await self.pool.fetch(
            "SELECT started_ms, duration_ms, status_code, error, response_body FROM attempts"
            " WHERE delivery_id = $1 ORDER BY id",
            delivery_id,
        )
        log = tuple(AttemptRecord(int(a[0]), float(a[1]), a[2], a[3], a[4] or "") for a in attempts)
        return _view(rows[0], log)

    async def delivery_counts(self, subscriptions: Sequence[str]) -> DeliveryCounts:
        """delivered / failed / pending totals over these subscriptions."""
        if not subscriptions:
            return DeliveryCounts(0, 0, 0)
        rows = await self.pool.fetch(
            "SELECT status, count(*) FROM deliveries WHERE subscription = ANY($1::text[])"
            " GROUP BY status",
            list(subscriptions),
        )
        counts = {str(s): int(n) for s, n in rows}
        return DeliveryCounts(
            counts.get("delivered", 0), counts.get("failed", 0), counts.get("pending", 0)
        )

    async def queue_stats(self) -> QueueStats:
        """Pending deliveries and the age of the oldest one."""
        row = (
            await self.pool.fetch(
                "SELECT count(*), min(created_ms) FROM deliveries WHERE status = 'pending'"
            )
        )[0]
        oldest = row[1]
        age = 0.0 if oldest is None else max(0.0, (now_ms() - int(oldest)) / 1000)
        return QueueStats(int(row[0]), age)

    async def purge(self, cutoff_ms: int, batch: int) -> int:
        """Delete up to `batch` deliveries finished before cutoff (with their attempts), then
        events older than cutoff that no delivery refers to any more."""
        async with self.pool.transaction() as conn:
            removed = await conn.fetchval(
                "WITH gone AS (DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries"
                " WHERE status <> 'pending' AND finished_ms < $1 ORDER BY id LIMIT $2"
                " FOR UPDATE SKIP LOCKED) RETURNING id),"
                " logs AS (DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM gone))"
                " SELECT count(*) FROM gone",
                cutoff_ms,
                batch,
            )
            events = await conn.fetchval(
                "WITH gone AS (DELETE FROM events WHERE seq IN (SELECT seq FROM events e"
                " WHERE e.created_ms < $1 AND NOT EXISTS (SELECT 1 FROM deliveries d"
                " WHERE d.event_seq = e.seq) ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED)"
                " RETURNING 1) SELECT count(*) FROM gone",
                cutoff_ms,
                batch,
            )
        return int(removed) + int(events)

    async def backup(self, dest: str | os.PathLike[str]) -> BackupSummary:
        """Not on PostgreSQL: its own tools make consistent copies (`pusherd backup` says so)."""
        raise StoreError(
            "storage.url is set: back up the PostgreSQL database with pg_dump"
            " (pusherd backup copies the SQLite file only)"
        )
