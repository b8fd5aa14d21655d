"""Subscriptions (Zettle) a.k.a. webhooks (PayStell): one table, one model."""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson

from pusherd.clock import now_ms
from pusherd.store.changes import Change, ChangeFeed, ChangeKind
from pusherd.store.errors import UuidTakenError
from pusherd.store.ids import IdSource
from pusherd.store.sqlite import queues
from pusherd.store.sqlite.db import Database
from pusherd.store.sqlite.events import insert_event
from pusherd.store.types import (
    NewEvent,
    NewSubscription,
    Subscription,
    SubscriptionChanges,
)

_COLUMNS = (
    "uuid, organization, transport, event_names, scopes, destination, contact_email, status,"
    " signing_key, prev_signing_key, prev_key_until_ms, created_ms, updated_ms, failing_since_ms"
)


def _row(r: tuple[Any, ...]) -> Subscription:
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
        created_ms=r[11],
        updated_ms=r[12],
        failing_since_ms=r[13],
    )


def _json(items: tuple[str, ...]) -> str:
    return orjson.dumps(list(items)).decode()


def get_subscription(conn: sqlite3.Connection, organization: str, uuid: str) -> Subscription | None:
    """A live subscription of this organization, or None."""
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM subscriptions"
        " WHERE uuid = ? AND organization = ? AND deleted_ms IS NULL",
        (uuid, organization),
    ).fetchone()
    return _row(row) if row else None


class SubscriptionStore:
    """Subscription reads and writes (mixed into SqliteStore)."""

    db: Database
    ids: IdSource
    changes: ChangeFeed

    def subscriptions_changed(self, organization: str) -> None:
        """Forget what depends on an organization's subscriptions (EventStore's fan-out cache)."""

    async def create_subscription(
        self, new: NewSubscription, welcome: NewEvent | None
    ) -> Subscription:
        """Insert it and, in the same commit, queue `welcome` (the TestMessage) to it alone."""

        def fn(conn: sqlite3.Connection) -> Subscription:
            taken = conn.execute("SELECT 1 FROM subscriptions WHERE uuid = ?", (new.uuid,))
            if taken.fetchone():
                raise UuidTakenError(new.uuid)
            now = now_ms()
            conn.execute(
                "INSERT INTO subscriptions (uuid, organization, transport, event_names, scopes,"
                " destination, contact_email, status, signing_key, created_ms, updated_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'ACTIVE', ?, ?, ?)",
                (
                    new.uuid,
                    new.organization,
                    new.transport,
                    _json(new.event_names),
                    _json(new.scopes),
                    new.destination,
                    new.contact_email,
                    new.signing_key,
                    now,
                    now,
                ),
            )
            queues.sync(conn, new.uuid)
            if welcome is not None:
                insert_event(conn, self.ids, welcome, now, (new.uuid,))
            self.subscriptions_changed(new.organization)
            sub = get_subscription(conn, new.organization, new.uuid)
            assert sub is not None
            return sub

        sub = await self.db.write(fn)
        self.changes.announce(Change("subscription_created", sub.organization, sub.uuid))
        if welcome is not None:
            self.changes.announce(Change("deliveries_queued", sub.organization, sub.uuid))
        return sub

    async def list_subscriptions(self, organization: str) -> list[Subscription]:
        """The organization's live subscriptions, oldest first."""
        rows = self.db.read_now(
            f"SELECT {_COLUMNS} FROM subscriptions"
            " WHERE organization = ? AND deleted_ms IS NULL ORDER BY created_ms, uuid",
            (organization,),
        )
        return [_row(r) for r in rows]

    async def get_subscription(self, organization: str, uuid: str) -> Subscription | None:
        """One live subscription of the organization, or None (another org's is invisible)."""
        rows = self.db.read_now(
            f"SELECT {_COLUMNS} FROM subscriptions"
            " WHERE uuid = ? AND organization = ? AND deleted_ms IS NULL",
            (uuid, organization),
        )
        return _row(rows[0]) if rows else None

    async def find_subscription(self, uuid: str) -> Subscription | None:
        """A live subscription of any organization (operator commands), or None."""
        rows = self.db.read_now(
            f"SELECT {_COLUMNS} FROM subscriptions WHERE uuid = ? AND deleted_ms IS NULL",
            (uuid,),
        )
        return _row(rows[0]) if rows else None

    async def update_subscription(
        self, organization: str, uuid: str, changes: SubscriptionChanges
    ) -> Subscription | None:
        """Apply a partial update; None when there is no such subscription."""

        def fn(conn: sqlite3.Connection) -> Subscription | None:
            sub = get_subscription(conn, organization, uuid)
            if sub is None:
                return None
            pairs = changes.assignments(sub.status, now_ms())
            sets = ", ".join(f"{column} = ?" for column, _ in pairs)
            conn.execute(
                f"UPDATE subscriptions SET {sets} WHERE uuid = ?",
                (*(value for _, value in pairs), uuid),
            )
            queues.sync(conn, uuid)
            self.subscriptions_changed(organization)
            return get_subscription(conn, organization, uuid)

        sub = await self.db.write(fn)
        if sub is not None:
            kind: ChangeKind = (
                "subscription_disabled" if sub.status == "DISABLED" else "subscription_changed"
            )
            self.changes.announce(Change(kind, organization, uuid))
        return sub

    async def delete_subscription(self, organization: str, uuid: str) -> bool:
        """Soft-delete it and cancel its pending deliveries; False when there is none."""

        def fn(conn: sqlite3.Connection) -> bool:
            now = now_ms()
            cur = conn.execute(
                "UPDATE subscriptions SET deleted_ms = ?, updated_ms = ?"
                " WHERE uuid = ? AND organization = ? AND deleted_ms IS NULL",
                (now, now, uuid, organization),
            )
            # Its pending deliveries are cancelled in batches by close_pending().
            queues.sync(conn, uuid)
            self.subscriptions_changed(organization)
            return cur.rowcount > 0

        deleted = await self.db.write(fn)
        if deleted:
            self.changes.announce(Change("subscription_deleted", organization, uuid))
        return deleted

    async def rotate_signing_key(
        self, organization: str, uuid: str, new_key: str, keep_old_ms: int
    ) -> bool:
        """Make new_key the signing key; the old one keeps signing for keep_old_ms."""

        def fn(conn: sqlite3.Connection) -> bool:
            now = now_ms()
            cur = conn.execute(
                "UPDATE subscriptions SET prev_signing_key = signing_key,"
                " prev_key_until_ms = ?, signing_key = ?, updated_ms = ?"
                " WHERE uuid = ? AND organization = ? AND deleted_ms IS NULL",
                (now + keep_old_ms, new_key, now, uuid, organization),
            )
            return cur.rowcount > 0

        rotated = await self.db.write(fn)
        if rotated:
            self.changes.announce(Change("key_rotated", organization, uuid))
        return rotated
