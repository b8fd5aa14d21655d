"""Tokens and subscriptions on PostgreSQL, and the claim queue rows that follow a subscription.

Every write runs in one transaction that also sends its change as a NOTIFY (other processes hear
of it only once committed); the change is announced on this process's feed after the commit.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any

import asyncpg
import orjson

from pusherd.clock import now_ms
from pusherd.store.changes import Change, ChangeFeed, ChangeKind
from pusherd.store.errors import UuidTakenError
from pusherd.store.postgres.copy import origin_of
from pusherd.store.postgres.dbclock import DbClock
from pusherd.store.postgres.feed import CHANGE_CHANNEL, payload
from pusherd.store.postgres.ingest import EventIn, GroupWriter
from pusherd.store.postgres.pool import Pool
from pusherd.store.sqlite.tokens import TOKEN_PREFIX, hash_token
from pusherd.store.types import NewEvent, NewSubscription, Subscription, SubscriptionChanges, Token

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

_TOKEN_COLUMNS = "id, organization, scopes, name, created_ms, expires_ms, revoked_ms"
_SUB_COLUMNS = (
    "uuid, organization, transport, event_names, scopes, destination, contact_email, status,"
    " signing_key, prev_signing_key, prev_key_until_ms, created_ms, updated_ms, failing_since_ms"
)


def token_row(r: Any) -> Token:
    return Token(
        id=r[0],
        organization=r[1],
        scopes=tuple(orjson.loads(r[2])),
        name=r[3],
        created_ms=int(r[4]),
        expires_ms=None if r[5] is None else int(r[5]),
        revoked_ms=None if r[6] is None else int(r[6]),
    )


def sub_row(r: Any) -> Subscription:
    return Subscription(
        uuid=r[0],
        organization=r[1],
        transport=r[2],
        event_names=tuple(orjson.loads(r[3])),
        scopes=tuple(orjson.loads(r[4])),
        destination=r[5],
        contact_email=r[6],
        status=r[7],
        signing_key=r[8],
        prev_signing_key=r[9],
        prev_key_until_ms=r[10],
        created_ms=int(r[11]),
        updated_ms=int(r[12]),
        failing_since_ms=r[13],
    )


def _json(items: Iterable[str]) -> str:
    return orjson.dumps(list(items)).decode()


async def refresh_queues(conn: Conn, subscriptions: Iterable[str]) -> None:
    """Recompute next_due_ms of these subscriptions' queues, locking them in one order (the
    order finish_many uses), so that concurrent writers cannot deadlock."""
    subs = sorted(set(subscriptions))
    if not subs:
        return
    # The statement's snapshot is taken before the lock is granted: a due time that an ingest
    # committed in between (its rows unseen here) is kept, as in finish_many (issue 12).
    await conn.execute(
        "WITH seen AS (SELECT subscription, xmin::text AS version FROM queues"
        " WHERE subscription = ANY($1::text[])),"
        " locked AS (SELECT subscription, next_due_ms, xmin::text AS version FROM queues"
        " WHERE subscription = ANY($1::text[]) ORDER BY subscription FOR UPDATE)"
        " UPDATE queues q SET next_due_ms = least((SELECT min(d.due_ms) FROM deliveries d"
        " WHERE d.subscription = q.subscription AND d.status = 'pending'),"
        " CASE WHEN l.version IS DISTINCT FROM s.version THEN l.next_due_ms END)"
        " FROM locked l LEFT JOIN seen s ON s.subscription = l.subscription"
        " WHERE q.subscription = l.subscription",
        subs,
    )


async def sync_queue(conn: Conn, subscription: str) -> None:
    """Create, update or drop a subscription's queue after the subscription changed; its
    pending rows follow a new destination's origin (per_destination counts by it).

    The caller holds the subscription's row lock. Locks are then taken in the order of every
    other writer (the record path locks subscriptions first too): the pending deliveries, then
    the queue row, so that a destination change racing a record or a hand-back cannot deadlock.
    """
    row = await conn.fetchrow(
        "SELECT destination, status, deleted_ms FROM subscriptions WHERE uuid = $1", subscription
    )
    if row is None or row[2] is not None or row[1] == "DISABLED":
        await conn.execute("DELETE FROM queues WHERE subscription = $1", subscription)
        return
    origin = origin_of(row[0])
    move = (
        "UPDATE deliveries SET origin = $2 WHERE subscription = $1 AND status = 'pending'"
        " AND origin <> $2"
    )
    await conn.execute(move, subscription, origin)
    # Lock the queue row (an ingest holding it commits first), then, in statements of their own
    # and so with snapshots taken after the lock (issue 12), move the rows that ingest wrote for
    # the old origin and compute the due time over them: one statement would judge both on a
    # snapshot taken before the wait, and leave the ingest's deliveries waiting for nothing.
    await conn.execute(
        "INSERT INTO queues (subscription, origin, next_due_ms) VALUES ($1, $2, NULL)"
        " ON CONFLICT (subscription) DO UPDATE SET origin = excluded.origin",
        subscription,
        origin,
    )
    # Rows claimed meanwhile and being handed back (which waits for the queue row) are skipped
    # rather than waited for: they keep the old origin until they finish.
    await conn.execute(
        "UPDATE deliveries SET origin = $2 WHERE id IN (SELECT id FROM deliveries"
        " WHERE subscription = $1 AND status = 'pending' AND origin <> $2 FOR UPDATE SKIP LOCKED)",
        subscription,
        origin,
    )
    await conn.execute(
        "UPDATE queues SET next_due_ms = (SELECT min(due_ms) FROM deliveries"
        " WHERE subscription = $1 AND status = 'pending') WHERE subscription = $1",
        subscription,
    )


class Directory:
    """Tokens and subscriptions (mixed into PostgresStore)."""

    pool: Pool
    clock: DbClock
    changes: ChangeFeed
    sender: str
    writer: GroupWriter

    async def notify(self, conn: Conn, change: Change) -> None:
        """Tell the other processes, inside the transaction that made the change."""
        await conn.execute("SELECT pg_notify($1, $2)", CHANGE_CHANNEL, payload(self.sender, change))

    # -- tokens --------------------------------------------------------------------------------

    async def find_token(self, secret: str) -> Token | None:
        """The token with this secret, read from the database on every request (a revocation
        by any process is in force at once)."""
        rows = await self.pool.fetch(
            f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE hash = $1", hash_token(secret)
        )
        return token_row(rows[0]) if rows else None

    async def create_token(
        self, organization: str, scopes: tuple[str, ...], name: str, expires_ms: int | None
    ) -> tuple[Token, str]:
        """A new token and its secret (shown once, never stored)."""
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = Token(
            "tok_" + secrets.token_hex(6), organization, scopes, name, now_ms(), expires_ms, None
        )
        change = Change("token_created", organization, token=token.id)
        async with self.pool.transaction() as conn:
            await conn.execute(
                "INSERT INTO tokens (id, hash, organization, scopes, name, created_ms, expires_ms)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                token.id,
                hash_token(secret),
                organization,
                _json(scopes),
                name,
                token.created_ms,
                expires_ms,
            )
            await self.notify(conn, change)
        self.changes.announce(change)
        return token, secret

    async def list_tokens(self) -> list[Token]:
        """Every token, oldest first."""
        rows = await self.pool.fetch(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created_ms, id")
        return [token_row(r) for r in rows]

    async def revoke_token(self, token_id: str) -> bool:
        """Revoke by id; False when no such active token."""
        change = Change("token_revoked", token=token_id)
        async with self.pool.transaction() as conn:
            done = await conn.fetchval(
                "UPDATE tokens SET revoked_ms = $1 WHERE id = $2 AND revoked_ms IS NULL"
                " RETURNING true",
                now_ms(),
                token_id,
            )
            if done:
                await self.notify(conn, change)
        if done:
            self.changes.announce(change)
        return bool(done)

    # -- subscriptions -------------------------------------------------------------------------

    async def create_subscription(
        self, new: NewSubscription, welcome: NewEvent | None
    ) -> Subscription:
        """Insert it and, in the same transaction, queue `welcome` to it alone."""
        now = now_ms()
        async with self.pool.transaction() as conn:
            inserted = await conn.fetchval(
                "INSERT INTO subscriptions (uuid, organization, transport, event_names, scopes,"
                " destination, contact_email, status, signing_key, created_ms, updated_ms)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, 'ACTIVE', $8, $9, $9)"
                " ON CONFLICT (uuid) DO NOTHING RETURNING true",
                new.uuid,
                new.organization,
                new.transport,
                _json(new.event_names),
                _json(new.scopes),
                new.destination,
                new.contact_email,
                new.signing_key,
                now,
            )
            if not inserted:
                raise UuidTakenError(new.uuid)
            await sync_queue(conn, new.uuid)
            if welcome is not None:
                event = EventIn(
                    welcome.organization,
                    welcome.event_name,
                    welcome.payload,
                    welcome.message_id,
                    welcome.timestamp,
                    [(new.uuid, origin_of(new.destination))],
                )
                await self.writer.write_now(conn, [event])
            row = await conn.fetchrow(
                f"SELECT {_SUB_COLUMNS} FROM subscriptions WHERE uuid = $1", new.uuid
            )
            created = Change("subscription_created", new.organization, new.uuid)
            await self.notify(conn, created)
        self.changes.announce(created)
        if welcome is not None:
            self.changes.announce(Change("deliveries_queued", new.organization, new.uuid))
        return sub_row(row)

    async def list_subscriptions(self, organization: str) -> list[Subscription]:
        """The organization's live subscriptions, oldest first."""
        rows = await self.pool.fetch(
            f"SELECT {_SUB_COLUMNS} FROM subscriptions"
            " WHERE organization = $1 AND deleted_ms IS NULL ORDER BY created_ms, uuid",
            organization,
        )
        return [sub_row(r) for r in rows]

    async def get_subscription(self, organization: str, uuid: str) -> Subscription | None:
        """One live subscription of the organization, or None."""
        rows = await self.pool.fetch(
            f"SELECT {_SUB_COLUMNS} FROM subscriptions"
            " WHERE uuid = $1 AND organization = $2 AND deleted_ms IS NULL",
            uuid,
            organization,
        )
        return sub_row(rows[0]) if rows else None

    async def find_subscription(self, uuid: str) -> Subscription | None:
        """A live subscription of any organization, or None."""
        rows = await self.pool.fetch(
            f"SELECT {_SUB_COLUMNS} FROM subscriptions WHERE uuid = $1 AND deleted_ms IS NULL",
            uuid,
        )
        return sub_row(rows[0]) if rows else None

    async def update_subscription(
        self, organization: str, uuid: str, changes: SubscriptionChanges
    ) -> Subscription | None:
        """Apply a partial update; None when there is no such subscription."""
        async with self.pool.transaction() as conn:
            row = await conn.fetchrow(
                f"SELECT {_SUB_COLUMNS} FROM subscriptions"
                " WHERE uuid = $1 AND organization = $2 AND deleted_ms IS NULL FOR UPDATE",
                uuid,
                organization,
            )
            if row is None:
                return None
            sub = sub_row(row)
            pairs = changes.assignments(sub.status, now_ms())
            sets = ", ".join(f"{column} = ${i}" for i, (column, _) in enumerate(pairs, start=1))
            row = await conn.fetchrow(
                f"UPDATE subscriptions SET {sets} WHERE uuid = ${len(pairs) + 1}"
                f" RETURNING {_SUB_COLUMNS}",
                *(value for _, value in pairs),
                uuid,
            )
            await sync_queue(conn, uuid)
            updated = sub_row(row)
            kind: ChangeKind = (
                "subscription_disabled" if updated.status == "DISABLED" else "subscription_changed"
            )
            change = Change(kind, organization, uuid)
            await self.notify(conn, change)
        self.changes.announce(change)
        return updated

    async def delete_subscription(self, organization: str, uuid: str) -> bool:
        """Soft-delete it (its pending deliveries are closed by close_pending); False if none."""
        change = Change("subscription_deleted", organization, uuid)
        async with self.pool.transaction() as conn:
            now = now_ms()
            done = await conn.fetchval(
                "UPDATE subscriptions SET deleted_ms = $1, updated_ms = $1"
                " WHERE uuid = $2 AND organization = $3 AND deleted_ms IS NULL RETURNING true",
                now,
                uuid,
                organization,
            )
            if done:
                await sync_queue(conn, uuid)
                await self.notify(conn, change)
        if done:
            self.changes.announce(change)
        return bool(done)

    async def rotate_signing_key(
        self, organization: str, uuid: str, new_key: str, keep_old_ms: int
    ) -> bool:
        """Make new_key the signing key; the old one keeps signing for keep_old_ms."""
        change = Change("key_rotated", organization, uuid)
        async with self.pool.transaction() as conn:
            now = self.clock.now_ms()  # the claims of every process compare the old key's end
            done = await conn.fetchval(
                "UPDATE subscriptions SET prev_signing_key = signing_key,"
                " prev_key_until_ms = $1, signing_key = $2, updated_ms = $3"
                " WHERE uuid = $4 AND organization = $5 AND deleted_ms IS NULL RETURNING true",
                now + keep_old_ms,
                new_key,
                now,
                uuid,
                organization,
            )
            if done:
                await self.notify(conn, change)
        if done:
            self.changes.announce(change)
        return bool(done)
