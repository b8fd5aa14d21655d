"""Recording attempts (SQLite): one executemany per group commit, status changes with them."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass

from pusherd.clock import now_ms
from pusherd.store.changes import Change, ChangeFeed, ChangeKind
from pusherd.store.errors import StoreError
from pusherd.store.sqlite import queues
from pusherd.store.sqlite.db import Database
from pusherd.store.types import AttemptRecord, ClaimedDelivery, Finish, StatusChange

RESPONSE_BODY_MAX = 1024


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


@dataclass
class _Record:
    delivery: ClaimedDelivery
    owner: str
    attempt: AttemptRecord
    finish: Finish
    next_attempt_ms: int | None
    disable_after_ms: int
    future: asyncio.Future[StatusChange | None]


class RecordStore:
    """Attempt records (mixed into SqliteStore)."""

    db: Database
    changes: ChangeFeed
    _records: list[_Record]

    def subscriptions_changed(self, organization: str) -> None:
        """Forget what depends on an organization's subscriptions (EventStore's fan-out cache)."""

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

    async def disable_overdue(
        self, subscription: str, disable_after_ms: int
    ) -> StatusChange | None:
        """DISABLE a subscription FAILING for disable_after_ms or longer; the change, or None."""

        def write(conn: sqlite3.Connection) -> StatusChange | None:
            row = conn.execute(
                "SELECT status FROM subscriptions WHERE uuid = ? AND deleted_ms IS NULL",
                (subscription,),
            ).fetchone()
            if row is None or row[0] != "FAILING":
                return None  # an ACTIVE one would turn FAILING below
            change = _status_change(conn, subscription, False, False, now_ms(), disable_after_ms)
            if change is not None:
                self.subscriptions_changed(change.organization)
            return change

        change = await self.db.write(write)
        if change is not None:
            self.changes.announce(
                Change("subscription_disabled", change.organization, change.subscription)
            )
        return change

    def _settle_records(
        self, done: asyncio.Future[list[StatusChange | None]], taken: list[_Record]
    ) -> None:
        """Hand each waiting record its result once the commit is through (or its error)."""
        if not taken:  # the write never ran: every record still buffered shared it
            taken[:], self._records = self._records, []
        error = None if done.cancelled() else done.exception()
        changes = [] if error is not None or done.cancelled() else done.result()
        for change in changes:
            if change is not None:
                kind: ChangeKind = (
                    "subscription_disabled" if change.new == "DISABLED" else "subscription_changed"
                )
                self.changes.announce(Change(kind, change.organization, change.subscription))
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
