"""The delivery log (SQLite): requeue and replay, listings, counts, queue stats, retention."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from pusherd.clock import now_ms
from pusherd.store.changes import Change, ChangeFeed
from pusherd.store.sqlite import queues
from pusherd.store.sqlite.claims import subscriptions_of
from pusherd.store.sqlite.db import Database
from pusherd.store.types import AttemptRecord, DeliveryCounts, DeliveryView, QueueStats

_VIEW = (
    "d.id, d.subscription, e.event_name, d.status, d.attempts, d.created_ms, d.finished_ms,"
    " d.last_status_code, d.last_error, CASE WHEN d.status = 'pending' THEN d.due_ms END"
)


# A finished delivery queued again gets a fresh retry schedule; its attempt count keeps growing.
_REQUEUE = (
    "UPDATE deliveries SET status = 'pending', due_ms = ?, finished_ms = NULL,"
    " schedule_pos = 0, lease_owner = NULL, lease_until_ms = NULL"
)


def requeue_finished(
    conn: sqlite3.Connection, subscription: str, since_ms: int | None, status: str | None
) -> int:
    """Re-queue a subscription's delivered/failed deliveries (created since since_ms, of status)."""
    where = ["subscription = ?", "status IN ('delivered', 'failed')"]
    params: list[Any] = [subscription]
    if since_ms is not None:
        where.append("created_ms >= ?")
        params.append(since_ms)
    if status is not None:
        where.append("status = ?")
        params.append(status)
    cur = conn.execute(f"{_REQUEUE} WHERE {' AND '.join(where)}", (now_ms(), *params))
    queues.refresh(conn, [subscription])
    return cur.rowcount


def _view(r: Sequence[Any], attempts: tuple[AttemptRecord, ...] = ()) -> DeliveryView:
    return DeliveryView(
        id=r[0],
        subscription=r[1],
        event_name=r[2],
        status=r[3],
        attempts=r[4],
        created_ms=r[5],
        finished_ms=r[6],
        last_status_code=r[7],
        last_error=r[8],
        due_ms=r[9],
        attempt_log=attempts,
    )


class DeliveryStore:
    """The delivery log (mixed into SqliteStore)."""

    db: Database
    changes: ChangeFeed

    async def requeue(self, delivery_id: int, organization: str) -> str:
        """Queue a finished delivery again: "queued", "pending" (still pending) or "missing"."""

        def fn(conn: sqlite3.Connection) -> str:
            row = conn.execute(
                "SELECT d.status FROM deliveries d JOIN subscriptions s ON s.uuid = d.subscription"
                " WHERE d.id = ? AND s.organization = ? AND s.deleted_ms IS NULL",
                (delivery_id, organization),
            ).fetchone()
            if row is None:
                return "missing"
            if row[0] == "pending":
                return "pending"
            conn.execute(f"{_REQUEUE} WHERE id = ?", (now_ms(), delivery_id))
            queues.refresh(conn, subscriptions_of(conn, [delivery_id]))
            return "queued"

        outcome = await self.db.write(fn)
        if outcome == "queued":
            self.changes.announce(Change("deliveries_queued", organization))
        return outcome

    async def replay(self, subscription: str, since_ms: int | None, status: str | None) -> int:
        """Re-queue a subscription's finished deliveries (optionally since a time / of a status)."""
        n = await self.db.write(lambda c: requeue_finished(c, subscription, since_ms, status))
        if n:
            self.changes.announce(Change("deliveries_queued", subscription=subscription))
        return n

    async def list_deliveries(
        self, subscription: str, status: str | None, limit: int, before_id: int | None
    ) -> list[DeliveryView]:
        """A subscription's deliveries, newest first, keyset-paginated by id."""
        where = ["d.subscription = ?"]
        params: list[Any] = [subscription]
        if status is not None:
            where.append("d.status = ?")
            params.append(status)
        if before_id is not None:
            where.append("d.id < ?")
            params.append(before_id)
        rows = await self.db.read(
            f"SELECT {_VIEW} FROM deliveries d JOIN events e ON e.seq = d.event_seq"
            f" WHERE {' AND '.join(where)} ORDER BY d.id DESC LIMIT ?",
            (*params, limit),
        )
        return [_view(r) for r in rows]

    async def get_delivery(self, delivery_id: int, organization: str) -> DeliveryView | None:
        """One delivery of the organization with every attempt, or None."""
        rows = await self.db.read(
            f"SELECT {_VIEW} FROM deliveries d JOIN events e ON e.seq = d.event_seq"
            " JOIN subscriptions s ON s.uuid = d.subscription"
            " WHERE d.id = ? AND s.organization = ? AND s.deleted_ms IS NULL",
            (delivery_id, organization),
        )
        if not rows:
            return None
        attempts = await self.db.read(
            "SELECT started_ms, duration_ms, status_code, error, response_body FROM attempts"
            " WHERE delivery_id = ? ORDER BY id",
            (delivery_id,),
        )
        return _view(rows[0], tuple(AttemptRecord(*a) for a in attempts))

    async def delivery_counts(self, subscriptions: Sequence[str]) -> DeliveryCounts:
        """delivered / failed / pending totals over these subscriptions."""
        if not subscriptions:
            return DeliveryCounts(0, 0, 0)
        marks = ",".join("?" * len(subscriptions))
        rows = await self.db.read(
            f"SELECT status, count(*) FROM deliveries WHERE subscription IN ({marks})"
            " GROUP BY status",
            subscriptions,
        )
        counts = {str(s): int(n) for s, n in rows}
        return DeliveryCounts(
            counts.get("delivered", 0), counts.get("failed", 0), counts.get("pending", 0)
        )

    async def queue_stats(self) -> QueueStats:
        """Pending deliveries and the age of the oldest one (waiting for a retry counts too)."""
        # Ids grow with creation: the smallest pending id is the oldest; both come from the
        # pending index alone.
        rows = await self.db.read(
            "SELECT n, (SELECT created_ms FROM deliveries WHERE id = first) FROM"
            " (SELECT count(*) AS n, min(id) AS first FROM deliveries WHERE status = 'pending')"
        )
        count, oldest = rows[0]
        age = 0.0 if oldest is None else max(0.0, (now_ms() - int(oldest)) / 1000)
        return QueueStats(int(count), age)

    async def purge(self, cutoff_ms: int, batch: int) -> int:
        """Delete up to `batch` deliveries finished before cutoff (with attempts) and orphan events.

        The search runs on the reader connection, off the event loop; the short delete re-checks
        its conditions inside the write, so a row re-queued meanwhile is left alone.
        """
        ids = [
            r[0]
            for r in await self.db.read(
                # A range of the finished index: nothing purgeable costs nothing (ORDER BY id
                # walked the whole table every minute).
                "SELECT id FROM deliveries WHERE finished_ms < ? AND status != 'pending'"
                " ORDER BY finished_ms LIMIT ?",
                (cutoff_ms, batch),
            )
        ]
        seqs = [
            r[0]
            for r in await self.db.read(
                # A range of the age index, oldest first: nothing old costs nothing.
                "SELECT seq FROM events e INDEXED BY events_by_age WHERE e.created_ms < ?"
                " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq AND"
                " (d.status = 'pending' OR d.finished_ms >= ?)) ORDER BY created_ms LIMIT ?",
                (cutoff_ms, cutoff_ms, batch),
            )
        ]
        if not ids and not seqs:
            return 0

        def fn(conn: sqlite3.Connection) -> int:
            removed = 0
            for i in ids:
                cur = conn.execute(
                    "DELETE FROM deliveries WHERE id = ? AND status != 'pending'"
                    " AND finished_ms < ?",
                    (i, cutoff_ms),
                )
                if cur.rowcount:
                    conn.execute("DELETE FROM attempts WHERE delivery_id = ?", (i,))
                    removed += 1
            for seq in seqs:
                cur = conn.execute(
                    "DELETE FROM events WHERE seq = ? AND NOT EXISTS"
                    " (SELECT 1 FROM deliveries WHERE event_seq = ?)",
                    (seq, seq),
                )
                removed += cur.rowcount
            return removed

        return await self.db.write(fn)
