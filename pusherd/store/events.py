"""Events and their fan-out into deliveries (the outbox), written in one transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence

import orjson

from pusherd.clock import iso_ms, now_ms
from pusherd.store.db import Database
from pusherd.store.ids import IdSource
from pusherd.store.models import IngestResult, NewEvent

# (event_name, subscription event_names, subscription scopes) -> wanted?
Matcher = Callable[[str, Sequence[str], Sequence[str]], bool]


def insert_event(
    conn: sqlite3.Connection,
    ids: IdSource,
    event: NewEvent,
    now: int,
    subscriptions: Iterable[str],
    now_iso: str | None = None,
) -> IngestResult:
    """Insert one event and a pending delivery to each given subscription.

    A messageId already stored for the organization makes this a duplicate: nothing is written
    and the original messageUuid is returned.
    """
    message_id = event.message_id or ids.uuid4()
    message_uuid = ids.uuid1()
    row = conn.execute(
        "INSERT INTO events (uuid, organization, event_name, message_id, payload, timestamp,"
        " created_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (organization, message_id) DO NOTHING RETURNING seq",
        (
            message_uuid,
            event.organization,
            event.event_name,
            message_id,
            event.payload,
            event.timestamp or now_iso or iso_ms(now),
            now,
        ),
    ).fetchone()
    if row is None:
        original = conn.execute(
            "SELECT uuid, (SELECT count(*) FROM deliveries WHERE event_seq = seq) FROM events"
            " WHERE organization = ? AND message_id = ?",
            (event.organization, message_id),
        ).fetchone()
        return IngestResult(original[0], message_id, original[1], duplicate=True)
    seq = row[0]
    delivery_ids = []
    for sub in subscriptions:
        cur = conn.execute(
            "INSERT INTO deliveries (event_seq, subscription, status, due_ms, created_ms)"
            " VALUES (?, ?, 'pending', ?, ?)",
            (seq, sub, now, now),
        )
        delivery_ids.append(int(cur.lastrowid or 0))
    return IngestResult(message_uuid, message_id, len(delivery_ids), False, tuple(delivery_ids))


Targets = list[tuple[str, list[str], list[str]]]


def _targets(conn: sqlite3.Connection, organization: str) -> Targets:
    rows = conn.execute(
        "SELECT uuid, event_names, scopes FROM subscriptions"
        " WHERE organization = ? AND deleted_ms IS NULL AND status != 'DISABLED'"
        " ORDER BY created_ms, uuid",
        (organization,),
    ).fetchall()
    return [(r[0], orjson.loads(r[1]), orjson.loads(r[2])) for r in rows]


class EventStore:
    """Ingest (mixed into SqliteStore)."""

    db: Database
    ids: IdSource
    # organization -> its deliverable subscriptions; cleared inside every write that changes a
    # subscription, so a write later in the same group commit never sees a stale list.
    targets_cache: dict[str, Targets]

    def subscriptions_changed(self) -> None:
        """Forget cached fan-out targets (call inside the write that changed a subscription)."""
        self.targets_cache.clear()

    async def ingest(self, events: Sequence[NewEvent], matches: Matcher) -> list[IngestResult]:
        """Store events and their deliveries atomically (all or nothing) in a group commit."""

        def fn(conn: sqlite3.Connection) -> list[IngestResult]:
            now = now_ms()
            now_iso = iso_ms(now)
            targets = self.targets_cache
            results = []
            for event in events:
                subs = targets.get(event.organization)
                if subs is None:
                    subs = targets[event.organization] = _targets(conn, event.organization)
                wanted = [
                    s for s, names, scopes in subs if matches(event.event_name, names, scopes)
                ]
                results.append(insert_event(conn, self.ids, event, now, wanted, now_iso))
            return results

        return await self.db.write(fn)

    async def send_to(self, event: NewEvent, subscriptions: Sequence[str]) -> IngestResult:
        """Store one event addressed to the given subscriptions only (test sends)."""

        def fn(conn: sqlite3.Connection) -> IngestResult:
            return insert_event(conn, self.ids, event, now_ms(), subscriptions)

        return await self.db.write(fn)
