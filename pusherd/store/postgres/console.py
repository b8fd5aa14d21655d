"""The console's queries on PostgreSQL (SPEC §9): the same answers as on SQLite, at any size.

Bounded like the SQLite version: time windows are ranges of an index (`deliveries_finished`) or
of the primary key (ids grow with time, so the first id of a window is found by a binary search
of about 20 primary-key probes on one connection); a log page looks at no more than
LOG_SCAN_ROWS rows of one subscription (`deliveries_by_subscription`); latency looks at no more
than LATENCY_SAMPLE attempts; the queue is a range of the pending index (`deliveries_due`).
"""

from __future__ import annotations

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
from pusherd.store.postgres.directory import _SUB_COLUMNS, _TOKEN_COLUMNS, sub_row, token_row
from pusherd.store.postgres.pool import Pool
from pusherd.store.postgres.sessions import PostgresSessions
from pusherd.store.types import AttemptRecord, Subscription, Token

_LOG_COLUMNS = (
    "d.id, e.event_name, d.status, d.attempts, d.created_ms, d.finished_ms,"
    " d.last_status_code, d.last_error, CASE WHEN d.status = 'pending' THEN d.due_ms END"
)
_NO_UPPER = 2**63 - 1
# The tables whose first id at a time is searched; names are never taken from input.
_TIMED = {"deliveries": "created_ms", "attempts": "started_ms"}


def _log_row(r: Any) -> LogRow:
    return LogRow(*r[:9])


class PostgresConsoleStore(PostgresSessions):
    """ConsoleStore on the PostgreSQL store's pool (sessions: store/postgres/sessions.py)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def _first_id_at(self, table: str, ms: int) -> int:
        """The smallest id of table whose time is >= ms (ids grow with time): a binary search."""
        column = _TIMED[table]
        async with self.pool.transaction() as conn:  # one connection for every probe
            ends = await conn.fetchrow(
                f"SELECT (SELECT id FROM {table} ORDER BY id LIMIT 1),"
                f" (SELECT id FROM {table} ORDER BY id DESC LIMIT 1)"
            )

            async def probe(mid: int) -> tuple[int, int] | None:
                found = await conn.fetchrow(
                    f"SELECT id, {column} FROM {table} WHERE id >= $1 ORDER BY id LIMIT 1", mid
                )
                return None if found is None else (int(found[0]), int(found[1]))

            assert ends is not None  # two scalar subqueries: always one row
            return await first_id_at((ends[0], ends[1]), probe, ms)

    async def token_by_id(self, token_id: str) -> Token | None:
        """A token by its public id (sessions keep the id, never the secret)."""
        rows = await self.pool.fetch(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = $1", token_id)
        return token_row(rows[0]) if rows else None

    async def subscriptions(self, organization: str | None) -> list[Subscription]:
        """Live subscriptions, FAILING and DISABLED first, then oldest first."""
        rows = await self.pool.fetch(
            f"SELECT {_SUB_COLUMNS} FROM subscriptions WHERE deleted_ms IS NULL"
            " AND ($1::text IS NULL OR organization = $1)"
            " ORDER BY CASE status WHEN 'DISABLED' THEN 0 WHEN 'FAILING' THEN 1 ELSE 2 END,"
            " created_ms, uuid",
            organization,
        )
        return [sub_row(r) for r in rows]

    async def subscription(self, organization: str | None, uuid: str) -> Subscription | None:
        """One live subscription (of this organization, unless None)."""
        rows = await self.pool.fetch(
            f"SELECT {_SUB_COLUMNS} FROM subscriptions WHERE uuid = $1 AND deleted_ms IS NULL"
            " AND ($2::text IS NULL OR organization = $2)",
            uuid,
            organization,
        )
        return sub_row(rows[0]) if rows else None

    async def finished_counts(
        self, since_ms: int, until_ms: int, bucket_ms: int
    ) -> list[BucketCount]:
        """Per bucket and subscription (every organization): delivered and failed finishes."""
        rows = await self.pool.fetch(
            "SELECT finished_ms / $3 * $3 AS k, subscription,"
            " count(*) FILTER (WHERE status = 'delivered'),"
            " count(*) FILTER (WHERE status = 'failed') FROM deliveries"
            " WHERE finished_ms IS NOT NULL AND finished_ms >= $1 AND finished_ms < $2"
            " AND status IN ('delivered', 'failed') GROUP BY k, subscription",
            since_ms,
            until_ms,
            int(bucket_ms),
        )
        return [BucketCount(int(k), str(sub), int(ok), int(bad)) for k, sub, ok, bad in rows]

    async def latency(self, organization: str | None, since_ms: int) -> Latency:
        """p50/p99 attempt duration of the newest (at most LATENCY_SAMPLE) attempts since then."""
        first = await self._first_id_at("attempts", since_ms)
        # The window is cut to the newest attempts first, so a small organization in a busy
        # installation never makes this walk the whole hour.
        rows = await self.pool.fetch(
            "SELECT a.duration_ms FROM (SELECT id, delivery_id, duration_ms FROM attempts"
            " WHERE id >= $1 ORDER BY id DESC LIMIT $2) a"
            " WHERE $3::text IS NULL OR EXISTS (SELECT 1 FROM deliveries d"
            " JOIN subscriptions s ON s.uuid = d.subscription"
            " WHERE d.id = a.delivery_id AND s.organization = $3)",
            first,
            LATENCY_SAMPLE,
            organization,
        )
        return latency_of(r[0] for r in rows)

    async def queue(self, organization: str | None) -> Queue:
        """Pending deliveries and the age of the oldest (a range of the pending index)."""
        # Two statements rather than "$1 IS NULL OR ...": a generic plan of a prepared
        # statement must still range over the pending index by subscription.
        where, params = "", list[Any]()
        if organization is not None:
            where = " AND subscription IN (SELECT uuid FROM subscriptions WHERE organization = $1)"
            params = [organization]
        row = await self.pool.fetch(
            "SELECT p.n, (SELECT created_ms FROM deliveries WHERE id = p.first) FROM"
            " (SELECT count(*) AS n, min(id) AS first FROM deliveries"
            f" WHERE status = 'pending'{where}) p",
            *params,
        )
        count, oldest = row[0]
        age = 0.0 if oldest is None else max(0.0, (now_ms() - int(oldest)) / 1000)
        return Queue(int(count), age)

    async def log_page(self, subscription: str, flt: LogFilter, limit: int) -> LogPage:
        """A subscription's deliveries newest first, filtered; looks at <= LOG_SCAN_ROWS rows."""
        upper = flt.before_id if flt.before_id is not None else _NO_UPPER
        lower = 0
        if flt.until_ms is not None:
            upper = min(upper, await self._first_id_at("deliveries", flt.until_ms + 1))
        if flt.since_ms is not None:
            lower = await self._first_id_at("deliveries", flt.since_ms)
        window = (
            "SELECT id FROM deliveries WHERE subscription = $1 AND id < $2 AND id >= $3"
            " ORDER BY id DESC LIMIT $4"
        )
        wparams: list[Any] = [subscription, upper, lower, LOG_SCAN_ROWS]
        rows = await self.pool.fetch(
            f"SELECT {_LOG_COLUMNS} FROM ({window}) w JOIN deliveries d ON d.id = w.id"
            " JOIN events e ON e.seq = d.event_seq"
            " WHERE ($5::text IS NULL OR d.status = $5)"
            " AND ($6::text IS NULL OR e.event_name = $6) ORDER BY d.id DESC LIMIT $7",
            *wparams,
            flt.status,
            flt.event_name,
            limit + 1,
        )
        page = tuple(_log_row(r) for r in rows[:limit])
        if len(rows) > limit:
            return LogPage(page, page[-1].id)
        scanned = await self.pool.fetch(f"SELECT count(*), min(id) FROM ({window}) w", *wparams)
        count, oldest = scanned[0]
        if int(count) >= LOG_SCAN_ROWS and oldest is not None:
            return LogPage(page, int(oldest))  # more rows below what this page looked at
        return LogPage(page, None)

    async def delivery(self, organization: str | None, delivery_id: int) -> DeliveryDetail | None:
        """One delivery (of this organization, unless None) with its event and every attempt."""
        rows = await self.pool.fetch(
            f"SELECT {_LOG_COLUMNS}, d.subscription, s.organization, s.destination, e.uuid,"
            " e.message_id, e.payload, e.timestamp, s.signing_key, s.prev_signing_key,"
            " s.prev_key_until_ms FROM deliveries d JOIN events e ON e.seq = d.event_seq"
            " JOIN subscriptions s ON s.uuid = d.subscription"
            " WHERE d.id = $1 AND s.deleted_ms IS NULL"
            " AND ($2::text IS NULL OR s.organization = $2)",
            delivery_id,
            organization,
        )
        if not rows:
            return None
        r = rows[0]
        keys = (r[16],) if r[17] is None or (r[18] or 0) <= now_ms() else (r[16], r[17])
        attempts = await self.pool.fetch(
            "SELECT started_ms, duration_ms, status_code, error, response_body FROM attempts"
            " WHERE delivery_id = $1 ORDER BY id",
            delivery_id,
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
        await self.pool.execute(
            "INSERT INTO console_links (hash, organization, created_ms, expires_ms)"
            " VALUES ($1, $2, $3, $4)",
            link_hash(secret),
            organization,
            now_ms(),
            expires_ms,
        )
        return secret

    async def link_state(self, secret: str) -> LinkState | None:
        """A sign-in link as stored (None when there is no such link)."""
        rows = await self.pool.fetch(
            "SELECT organization, expires_ms, used_ms FROM console_links WHERE hash = $1",
            link_hash(secret),
        )
        return LinkState(rows[0][0], rows[0][1], rows[0][2]) if rows else None

    async def redeem_link(self, secret: str) -> str | None:
        """Use a sign-in link: its organization, or None when unknown, used or expired.
        One statement: of two processes redeeming the same link at once, one gets it."""
        now = now_ms()
        org = await self.pool.fetchval(
            "UPDATE console_links SET used_ms = $1 WHERE hash = $2 AND used_ms IS NULL"
            " AND expires_ms > $1 RETURNING organization",
            now,
            link_hash(secret),
        )
        return None if org is None else str(org)
