"""Deliveries: claiming with a lease, recording attempts, the delivery log, replay, retention."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pusherd.clock import now_ms
from pusherd.store import queues
from pusherd.store.db import Database, StoreError
from pusherd.store.models import (
    AttemptRecord,
    Claim,
    ClaimedDelivery,
    DeliveryCounts,
    DeliveryView,
    QueueStats,
    StatusChange,
)

Finish = Literal["delivered", "retry", "failed", "gone"]
RESPONSE_BODY_MAX = 1024
BLOCKED_IN_SQL = 500  # more origins without room than this are skipped in Python instead

_VIEW = (
    "d.id, d.subscription, e.event_name, d.status, d.attempts, d.created_ms, d.finished_ms,"
    " d.last_status_code, d.last_error, CASE WHEN d.status = 'pending' THEN d.due_ms END"
)


# A row handed back without an attempt is due at once, and keeps its place in ingest order:
# a claim moved its due time to the lease's end, a row never attempted goes back to its creation
# time (one waiting for a retry keeps "now"). Both parameters are the current time.
_DUE_AGAIN = "CASE WHEN schedule_pos = 0 THEN min(created_ms, ?) ELSE ? END"

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


def _status_change(
    conn: sqlite3.Connection,
    sub_uuid: str,
    success: bool,
    gone: bool,
    now: int,
    disable_after_ms: int,
) -> StatusChange | None:
    row = conn.execute(
        "SELECT organization, contact_email, destination, status, failing_since_ms"
        " FROM subscriptions WHERE uuid = ? AND deleted_ms IS NULL",
        (sub_uuid,),
    ).fetchone()
    if row is None:
        return None
    org, email, destination, old, failing_since = row
    new, reason = old, ""
    if success:
        if old == "FAILING":
            new, reason = "ACTIVE", "delivery succeeded"
    elif gone:
        if old != "DISABLED":
            new, reason = "DISABLED", "destination answered 410 Gone"
    elif old == "ACTIVE":
        new, reason, failing_since = "FAILING", "delivery attempt failed", now
    elif old == "FAILING" and failing_since is not None and now - failing_since >= disable_after_ms:
        new, reason = "DISABLED", "failing continuously for longer than disable_after"
    if new == old:
        return None
    conn.execute(
        "UPDATE subscriptions SET status = ?, failing_since_ms = ?, updated_ms = ? WHERE uuid = ?",
        (new, None if new == "ACTIVE" else failing_since, now, sub_uuid),
    )
    queues.sync(conn, sub_uuid)
    return StatusChange(sub_uuid, org, email, destination, old, new, reason)


def _subscriptions_of(conn: sqlite3.Connection, ids: Sequence[int]) -> list[str]:
    marks = ",".join("?" * len(ids))
    rows = conn.execute(
        f"SELECT DISTINCT subscription FROM deliveries WHERE id IN ({marks})", tuple(ids)
    ).fetchall()
    return [str(r[0]) for r in rows]


def _claim_rows(
    conn: sqlite3.Connection, owner: str, plan: Sequence[tuple[str, int]], now: int, until: int
) -> tuple[list[ClaimedDelivery], bool]:
    """Lease up to n due rows of each (subscription, n) in due order; (rows by id, whether
    some subscription gave all that was asked: it may have more)."""
    ids: list[int] = []
    full = False
    for subscription, limit in plan:
        rows = conn.execute(
            "UPDATE deliveries SET lease_owner = ?, lease_until_ms = ?, due_ms = ?"
            " WHERE id IN (SELECT id FROM deliveries WHERE subscription = ?"
            " AND status = 'pending' AND due_ms <= ? ORDER BY due_ms, id LIMIT ?)"
            " RETURNING id",
            (owner, until, until, subscription, now, limit),
        ).fetchall()
        full = full or len(rows) >= limit
        ids.extend(r[0] for r in rows)
    queues.refresh(conn, [sub for sub, _ in plan])
    if not ids:
        return [], full
    ids.sort()
    marks = ",".join("?" * len(ids))
    data = conn.execute(
        "SELECT d.id, d.subscription, d.attempts, d.schedule_pos, e.organization, e.uuid,"
        " e.event_name, e.message_id, e.payload, e.timestamp, s.destination, s.signing_key,"
        " s.prev_signing_key, s.prev_key_until_ms, s.status, s.deleted_ms"
        " FROM deliveries d JOIN events e ON e.seq = d.event_seq"
        " JOIN subscriptions s ON s.uuid = d.subscription"
        f" WHERE d.id IN ({marks}) ORDER BY d.id",
        ids,
    ).fetchall()
    out, dead = [], []
    for r in data:
        if r[14] == "DISABLED" or r[15] is not None:
            dead.append((now, now, r[0]))  # left pending for close_pending()
            continue
        keys = (r[11],) if r[12] is None or (r[13] or 0) <= now else (r[11], r[12])
        out.append(
            ClaimedDelivery(
                id=r[0],
                subscription=r[1],
                attempts=r[2],
                schedule_pos=r[3],
                organization=r[4],
                message_uuid=r[5],
                event_name=r[6],
                message_id=r[7],
                payload=r[8],
                timestamp=r[9],
                destination=r[10],
                signing_keys=keys,
            )
        )
    if dead:
        conn.executemany(
            f"UPDATE deliveries SET due_ms = {_DUE_AGAIN}, lease_owner = NULL,"
            " lease_until_ms = NULL WHERE id = ?",
            dead,
        )
    return out, full


@dataclass
class _Record:
    delivery: ClaimedDelivery
    owner: str
    attempt: AttemptRecord
    finish: Finish
    next_attempt_ms: int | None
    disable_after_ms: int
    future: asyncio.Future[StatusChange | None]


class DeliveryStore:
    """Delivery reads and writes (mixed into SqliteStore)."""

    db: Database
    _records: list[_Record]

    def subscriptions_changed(self, organization: str) -> None:
        """Forget what depends on an organization's subscriptions (EventStore's fan-out cache)."""

    async def due_at(self, blocked: Collection[str] = ()) -> int | None:
        """The earliest next due time of any queue whose origin is not blocked (None: none)."""
        marks = ",".join("?" * len(blocked))
        where = f" AND origin NOT IN ({marks})" if blocked else ""
        rows = self.db.read_now(
            f"SELECT min(next_due_ms) FROM queues WHERE next_due_ms IS NOT NULL{where}",
            tuple(blocked),
        )
        return None if rows[0][0] is None else int(rows[0][0])

    async def claim(
        self,
        owner: str,
        room: Mapping[str, int],
        default_room: int,
        budget: int,
        lease_ms: int,
    ) -> Claim:
        """Lease due deliveries within each origin's room and the budget, oldest due first.

        The due end of the queues index names the subscriptions that have something due (a
        blocked origin's are skipped); each gets a share of its origin's room, and its rows are
        taken from its range of the deliveries index in due order. Nothing is written when
        nothing is due.
        """
        now = now_ms()
        plan, more = self._plan(now, room, default_room, budget)
        if not plan:
            return Claim([], more, self._next_due_after(now))

        def fn(conn: sqlite3.Connection) -> tuple[list[ClaimedDelivery], bool]:
            return _claim_rows(conn, owner, plan, now, now + lease_ms)

        claimed, full = await self.db.write(fn, durable=False)
        return Claim(claimed, more or full, self._next_due_after(now))

    def _plan(
        self, now: int, room: Mapping[str, int], default_room: int, budget: int
    ) -> tuple[list[tuple[str, int]], bool]:
        """(subscription, how many) to claim, and whether due queues were left unread."""
        if budget <= 0:
            return [], False
        blocked = [o for o, n in room.items() if n <= 0]
        where = ""
        if 0 < len(blocked) <= BLOCKED_IN_SQL:
            where = f" AND origin NOT IN ({','.join('?' * len(blocked))})"
        else:
            blocked = []
        limit = budget + 16
        rows = self.db.read_now(
            f"SELECT subscription, origin FROM queues WHERE next_due_ms <= ?{where}"
            " ORDER BY next_due_ms LIMIT ?",
            (now, *blocked, limit),
        )
        by_origin: dict[str, list[str]] = {}
        for sub, origin in rows:
            by_origin.setdefault(origin, []).append(sub)
        plan: list[tuple[str, int]] = []
        for origin, subs in by_origin.items():
            left = min(room.get(origin, default_room), budget)
            if left <= 0:
                continue
            share = -(-left // len(subs))  # the origin's room, shared among its due queues
            for sub in subs:
                n = min(share, left)
                if n <= 0:
                    break
                plan.append((sub, n))
                left -= n
                budget -= n
            if budget <= 0:
                break
        return plan, len(rows) >= limit

    def _next_due_after(self, now: int) -> int | None:
        rows = self.db.read_now("SELECT min(next_due_ms) FROM queues WHERE next_due_ms > ?", (now,))
        return None if rows[0][0] is None else int(rows[0][0])

    async def record_attempt(
        self,
        delivery: ClaimedDelivery,
        owner: str,
        attempt: AttemptRecord,
        finish: Finish,
        next_attempt_ms: int | None,
        disable_after_ms: int,
    ) -> StatusChange | None:
        """Record one attempt and its consequence durably; return a status change.

        Records waiting for the same group commit are written by one write (executemany), so
        the per-write overhead is paid once per commit, not once per attempt.
        """
        fut: asyncio.Future[StatusChange | None] = asyncio.get_running_loop().create_future()
        self._records.append(
            _Record(delivery, owner, attempt, finish, next_attempt_ms, disable_after_ms, fut)
        )
        if len(self._records) == 1:
            taken: list[_Record] = []
            done = self.db.write(lambda conn: self._write_records(conn, taken), urgent=False)
            done.add_done_callback(lambda f: self._settle_records(f, taken))
        return await fut

    def _settle_records(
        self, done: asyncio.Future[list[StatusChange | None]], taken: list[_Record]
    ) -> None:
        """Hand each waiting record its result once the commit is through (or its error)."""
        if not taken:  # the write never ran: every record still buffered shared it
            taken[:], self._records = self._records, []
        error = None if done.cancelled() else done.exception()
        changes = [] if error is not None or done.cancelled() else done.result()
        for i, r in enumerate(taken):
            if r.future.done():
                continue
            if error is not None or done.cancelled():
                r.future.set_exception(error or StoreError("attempt not recorded"))
            else:
                r.future.set_result(changes[i])

    def _write_records(
        self, conn: sqlite3.Connection, taken: list[_Record]
    ) -> list[StatusChange | None]:
        batch, self._records = self._records, []
        taken[:] = batch
        now = now_ms()
        attempts, updates = [], []
        for r in batch:
            a = r.attempt
            attempts.append(
                (
                    r.delivery.id,
                    a.started_ms,
                    a.duration_ms,
                    a.status_code,
                    a.error,
                    a.response_body[:RESPONSE_BODY_MAX],
                )
            )
            if r.finish == "retry":
                status, finished, due = "pending", None, r.next_attempt_ms or now
            else:
                status = "delivered" if r.finish == "delivered" else "failed"
                finished, due = now, now
            updates.append(
                (
                    status,
                    0 if r.finish == "delivered" else 1,
                    due,
                    finished,
                    a.started_ms,
                    a.status_code,
                    a.error,
                    r.delivery.id,
                    r.owner,
                )
            )
        conn.executemany(
            "INSERT INTO attempts (delivery_id, started_ms, duration_ms, status_code, error,"
            " response_body) VALUES (?, ?, ?, ?, ?, ?)",
            attempts,
        )
        # Only the lease holder moves a row on; a stale owner just leaves its attempt record.
        conn.executemany(
            "UPDATE deliveries SET status = ?, attempts = attempts + 1,"
            " schedule_pos = schedule_pos + ?, due_ms = ?, finished_ms = ?,"
            " lease_owner = NULL, lease_until_ms = NULL, last_attempt_ms = ?,"
            " last_status_code = ?, last_error = ?"
            " WHERE id = ? AND status = 'pending' AND lease_owner = ?",
            updates,
        )
        queues.refresh(conn, [r.delivery.subscription for r in batch])
        changes: list[StatusChange | None] = []
        for r in batch:
            change = _status_change(
                conn,
                r.delivery.subscription,
                success=r.finish == "delivered",
                gone=r.finish == "gone",
                now=now,
                disable_after_ms=r.disable_after_ms,
            )
            if change is not None:
                self.subscriptions_changed(change.organization)
            changes.append(change)

        return changes

    async def release(self, owner: str, ids: Sequence[int]) -> None:
        """Give leased deliveries back without spending an attempt, due at once."""
        if not ids:
            return

        def fn(conn: sqlite3.Connection) -> None:
            now = now_ms()
            conn.executemany(
                f"UPDATE deliveries SET lease_owner = NULL, lease_until_ms = NULL,"
                f" due_ms = {_DUE_AGAIN} WHERE id = ? AND status = 'pending' AND lease_owner = ?",
                [(now, now, i, owner) for i in ids],
            )
            queues.refresh(conn, _subscriptions_of(conn, ids))

        await self.db.write(fn, urgent=False, durable=False)

    def subscriptions_to_close(self) -> list[str]:
        """Deleted or DISABLED subscriptions that may still have pending deliveries."""
        rows = self.db.read_now(
            "SELECT uuid FROM subscriptions s WHERE (deleted_ms IS NOT NULL OR status = 'DISABLED')"
            " AND EXISTS (SELECT 1 FROM deliveries d WHERE d.subscription = s.uuid"
            " AND d.status = 'pending')"
        )
        return [str(r[0]) for r in rows]

    async def close_pending(self, subscription: str, batch: int) -> tuple[str, int]:
        """Finish up to `batch` pending deliveries of a deleted ("cancelled") or DISABLED
        ("failed") subscription: (that status, how many); 0 when none or it is live again."""

        def fn(conn: sqlite3.Connection) -> tuple[str, int]:
            row = conn.execute(
                "SELECT status, deleted_ms FROM subscriptions WHERE uuid = ?", (subscription,)
            ).fetchone()
            if row is None:
                return "", 0
            if row[1] is not None:
                status, error = "cancelled", "subscription deleted"
            elif row[0] == "DISABLED":
                status, error = "failed", "subscription disabled"
            else:
                return "", 0
            cur = conn.execute(
                "UPDATE deliveries SET status = ?, finished_ms = ?, last_error = ?,"
                " lease_owner = NULL, lease_until_ms = NULL"
                " WHERE id IN (SELECT id FROM deliveries WHERE subscription = ?"
                " AND status = 'pending' LIMIT ?)",
                (status, now_ms(), error, subscription, batch),
            )
            queues.refresh(conn, [subscription])
            return status, cur.rowcount

        return await self.db.write(fn)

    async def recover_leases(self, is_dead: Callable[[str], bool]) -> int:
        """Make rows leased or parked by dead owners due now; returns how many.

        Only rows due in the future are looked at (a range of the due index): rows whose lease
        has already run out are claimable anyway.
        """
        now = now_ms()
        owners = await self.db.read(
            "SELECT DISTINCT lease_owner FROM deliveries"
            " WHERE status = 'pending' AND due_ms > ? AND lease_owner IS NOT NULL",
            (now,),
        )
        dead = [str(r[0]) for r in owners if is_dead(str(r[0]))]
        if not dead:
            return 0

        def fn(conn: sqlite3.Connection) -> int:
            freed = 0
            for owner in dead:
                subs = conn.execute(
                    "SELECT DISTINCT subscription FROM deliveries WHERE status = 'pending'"
                    " AND due_ms > ? AND lease_owner = ?",
                    (now, owner),
                ).fetchall()
                cur = conn.execute(
                    f"UPDATE deliveries SET due_ms = {_DUE_AGAIN}, lease_owner = NULL,"
                    " lease_until_ms = NULL"
                    " WHERE id IN (SELECT id FROM deliveries WHERE status = 'pending'"
                    " AND due_ms > ? AND lease_owner = ?)",
                    (now, now, now, owner),
                )
                queues.refresh(conn, [str(r[0]) for r in subs])
                freed += cur.rowcount
            return freed

        return await self.db.write(fn)

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
            queues.refresh(conn, _subscriptions_of(conn, [delivery_id]))
            return "queued"

        return await self.db.write(fn)

    async def replay(self, subscription: str, since_ms: int | None, status: str | None) -> int:
        """Re-queue a subscription's finished deliveries (optionally since a time / of a status)."""
        return await self.db.write(lambda c: requeue_finished(c, subscription, since_ms, status))

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
                "SELECT id FROM deliveries WHERE status != 'pending' AND finished_ms < ?"
                " ORDER BY id LIMIT ?",
                (cutoff_ms, batch),
            )
        ]
        seqs = [
            r[0]
            for r in await self.db.read(
                "SELECT seq FROM events e WHERE e.created_ms < ? AND NOT EXISTS"
                " (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq AND"
                " (d.status = 'pending' OR d.finished_ms >= ?)) ORDER BY seq LIMIT ?",
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
