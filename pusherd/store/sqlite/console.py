"""The console's queries on SQLite (SPEC §9), on the reader connection: never on the loop's thread.

Bounded at any size: time windows are ranges of an index (`deliveries_finished`) or of the
primary key (ids grow with time, so the first id of a window is found by a binary search of
about 20 primary-key probes); a log page looks at no more than LOG_SCAN_ROWS rows of one
subscription; latency looks at no more than LATENCY_SAMPLE attempts.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from pusherd.clock import now_ms
from pusherd.store.console import (
    LATENCY_SAMPLE,
    LOG_SCAN_ROWS,
    BucketCount,
    DeliveryDetail,
    Latency,
    LinkState,
    LogFilter,
    LogPage,
    LogRow,
    Queue,
    first_id_at,
    latency_of,
    link_hash,
    new_link_secret,
)
from pusherd.store.sqlite.db import Database
from pusherd.store.sqlite.sessions import SqliteSessions
from pusherd.store.sqlite.subscriptions import _COLUMNS as _SUB_COLUMNS
from pusherd.store.sqlite.subscriptions import _row as _subscription
from pusherd.store.sqlite.tokens import _COLUMNS as _TOKEN_COLUMNS
from pusherd.store.sqlite.tokens import _row as _token
from pusherd.store.types import AttemptRecord, Subscription, Token

_LOG_COLUMNS = (
    "d.id, e.event_name, d.status, d.attempts, d.created_ms, d.finished_ms,"
    " d.last_status_code, d.last_error, CASE WHEN d.status = 'pending' THEN d.due_ms END"
)


def _log_row(r: Sequence[Any]) -> LogRow:
    return LogRow(*r[:9])


def _org_clause(organization: str | None, column: str = "s.organization") -> tuple[str, list[Any]]:
    if organization is None:
        return "", []
    return f" AND {column} = ?", [organization]


class SqliteConsoleStore(SqliteSessions):
    """ConsoleStore on the SQLite file's reader connection (sessions: store/sqlite/sessions.py)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def _first_id_at(self, table: str, column: str, ms: int) -> int:
        """The smallest id whose `column` is >= ms (ids grow with time): a binary search."""
        # Two scalar subqueries: min() and max() in one SELECT would scan the table.
        rows = await self.db.read(
            f"SELECT (SELECT rowid FROM {table} ORDER BY rowid LIMIT 1),"
            f" (SELECT rowid FROM {table} ORDER BY rowid DESC LIMIT 1)"
        )

        async def probe(mid: int) -> tuple[int, int] | None:
            found = await self.db.read(
                f"SELECT rowid, {column} FROM {table} WHERE rowid >= ? ORDER BY rowid LIMIT 1",
                (mid,),
            )
            return (int(found[0][0]), int(found[0][1])) if found else None

        return await first_id_at((rows[0][0], rows[0][1]), probe, ms)

    async def token_by_id(self, token_id: str) -> Token | None:
        """A token by its public id (sessions keep the id, never the secret)."""
        rows = await self.db.read(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = ?", (token_id,))
        return _token(tuple(rows[0])) if rows else None

    async def subscriptions(self, organization: str | None) -> list[Subscription]:
        """Live subscriptions, FAILING and DISABLED first, then oldest first."""
        where, params = _org_clause(organization, "organization")
        rows = await self.db.read(
            f"SELECT {_SUB_COLUMNS} FROM subscriptions WHERE deleted_ms IS NULL{where}"
            " ORDER BY CASE status WHEN 'DISABLED' THEN 0 WHEN 'FAILING' THEN 1 ELSE 2 END,"
            " created_ms, uuid",
            params,
        )
        return [_subscription(r) for r in rows]

    async def subscription(self, organization: str | None, uuid: str) -> Subscription | None:
        """One live subscription (of this organization, unless None)."""
        where, params = _org_clause(organization, "organization")
        rows = await self.db.read(
            f"SELECT {_SUB_COLUMNS} FROM subscriptions WHERE uuid = ? AND deleted_ms IS NULL"
            f"{where}",
            [uuid, *params],
        )
        return _subscription(rows[0]) if rows else None

    async def finished_counts(
        self, since_ms: int, until_ms: int, bucket_ms: int
    ) -> list[BucketCount]:
        """Per bucket and subscription (every organization): delivered and failed finishes."""
        b = int(bucket_ms)
        rows = await self.db.read(
            f"SELECT finished_ms / {b} * {b} AS k, subscription, sum(status = 'delivered'),"
            " sum(status = 'failed') FROM deliveries INDEXED BY deliveries_finished"
            " WHERE finished_ms >= ? AND finished_ms < ? AND status IN ('delivered', 'failed')"
            " GROUP BY k, subscription",
            (since_ms, until_ms),
        )
        return [BucketCount(int(k), str(sub), int(ok), int(bad)) for k, sub, ok, bad in rows]

    async def latency(self, organization: str | None, since_ms: int) -> Latency:
        """p50/p99 attempt duration of the newest (at most LATENCY_SAMPLE) attempts since then."""
        first = await self._first_id_at("attempts", "started_ms", since_ms)
        join, where, params = "", "", list[Any]()
        if organization is not None:
            join = (
                " JOIN deliveries d ON d.id = a.delivery_id"
                " JOIN subscriptions s ON s.uuid = d.subscription"
            )
            where, params = _org_clause(organization)
        # The window is cut to the newest attempts first, so a small organization in a busy
        # installation never makes this walk the whole hour.
        rows = await self.db.read(
            "SELECT a.duration_ms FROM (SELECT id, delivery_id, duration_ms FROM attempts"
            " WHERE id >= ? ORDER BY id DESC LIMIT ?) a"
            f"{join} WHERE 1{where}",
            [first, LATENCY_SAMPLE, *params],
        )
        return latency_of(r[0] for r in rows)

    async def queue(self, organization: str | None) -> Queue:
        """Pending deliveries and the age of the oldest (a range of the pending index)."""
        where, params = "", list[Any]()
        if organization is not None:
            where = " AND subscription IN (SELECT uuid FROM subscriptions WHERE organization = ?)"
            params = [organization]
        rows = await self.db.read(
            "SELECT n, (SELECT created_ms FROM deliveries WHERE id = first) FROM"
            " (SELECT count(*) AS n, min(id) AS first FROM deliveries"
            f" WHERE status = 'pending'{where})",
            params,
        )
        count, oldest = rows[0]
        age = 0.0 if oldest is None else max(0.0, (now_ms() - int(oldest)) / 1000)
        return Queue(int(count), age)

    async def log_page(self, subscription: str, flt: LogFilter, limit: int) -> LogPage:
        """A subscription's deliveries newest first, filtered; looks at <= LOG_SCAN_ROWS rows."""
        upper = flt.before_id if flt.before_id is not None else 2**63 - 1
        lower = 0
        if flt.until_ms is not None:
            upper = min(
                upper, await self._first_id_at("deliveries", "created_ms", flt.until_ms + 1)
            )
        if flt.since_ms is not None:
            lower = await self._first_id_at("deliveries", "created_ms", flt.since_ms)
        window = (
            "SELECT id FROM deliveries WHERE subscription = ? AND id < ? AND id >= ?"
            " ORDER BY id DESC LIMIT ?"
        )
        wparams: list[Any] = [subscription, upper, lower, LOG_SCAN_ROWS]
        where, params = [], []
        if flt.status is not None:
            where.append("d.status = ?")
            params.append(flt.status)
        if flt.event_name is not None:
            where.append("e.event_name = ?")
            params.append(flt.event_name)
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        rows = await self.db.read(
            f"SELECT {_LOG_COLUMNS} FROM ({window}) w JOIN deliveries d ON d.id = w.id"
            f" JOIN events e ON e.seq = d.event_seq{cond} ORDER BY d.id DESC LIMIT ?",
            [*wparams, *params, limit + 1],
        )
        page = tuple(_log_row(r) for r in rows[:limit])
        if len(rows) > limit:
            return LogPage(page, page[-1].id)
        scanned = await self.db.read(f"SELECT count(*), min(id) FROM ({window})", wparams)
        count, oldest = scanned[0]
        if int(count) >= LOG_SCAN_ROWS and oldest is not None:
            return LogPage(page, int(oldest))  # more rows below what this page looked at
        return LogPage(page, None)

    async def delivery(self, organization: str | None, delivery_id: int) -> DeliveryDetail | None:
        """One delivery (of this organization, unless None) with its event and every attempt."""
        where, params = _org_clause(organization)
        rows = await self.db.read(
            f"SELECT {_LOG_COLUMNS}, d.subscription, s.organization, s.destination, e.uuid,"
            " e.message_id, e.payload, e.timestamp, s.signing_key, s.prev_signing_key,"
            " s.prev_key_until_ms FROM deliveries d JOIN events e ON e.seq = d.event_seq"
            " JOIN subscriptions s ON s.uuid = d.subscription"
            f" WHERE d.id = ? AND s.deleted_ms IS NULL{where}",
            [delivery_id, *params],
        )
        if not rows:
            return None
        r = rows[0]
        keys = (r[16],) if r[17] is None or (r[18] or 0) <= now_ms() else (r[16], r[17])
        attempts = await self.db.read(
            "SELECT started_ms, duration_ms, status_code, error, response_body FROM attempts"
            " WHERE delivery_id = ? ORDER BY id",
            (delivery_id,),
        )
        return DeliveryDetail(
            row=_log_row(r),
            subscription=r[9],
            organization=r[10],
            destination=r[11],
            message_uuid=r[12],
            message_id=r[13],
            payload=r[14],
            timestamp=r[15],
            signing_keys=keys,
            attempt_log=tuple(AttemptRecord(*a) for a in attempts),
        )

    async def create_link(self, organization: str, expires_ms: int) -> str:
        """Store a one-time sign-in link; returns its secret (only its hash is kept)."""
        secret = new_link_secret()
        digest = link_hash(secret)

        def fn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO console_links (hash, organization, created_ms, expires_ms)"
                " VALUES (?, ?, ?, ?)",
                (digest, organization, now_ms(), expires_ms),
            )

        await self.db.write(fn)
        return secret

    async def link_state(self, secret: str) -> LinkState | None:
        """A sign-in link as stored (None when there is no such link)."""
        rows = await self.db.read(
            "SELECT organization, expires_ms, used_ms FROM console_links WHERE hash = ?",
            (link_hash(secret),),
        )
        return LinkState(rows[0][0], rows[0][1], rows[0][2]) if rows else None

    async def redeem_link(self, secret: str) -> str | None:
        """Use a sign-in link: its organization, or None when unknown, used or expired."""
        digest = link_hash(secret)

        def fn(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "UPDATE console_links SET used_ms = ? WHERE hash = ? AND used_ms IS NULL"
                " AND expires_ms > ? RETURNING organization",
                (now_ms(), digest, now_ms()),
            ).fetchone()
            return None if row is None else str(row[0])

        result: str | None = await self.db.write(fn)
        return result
