"""Events and their fan-out into deliveries (the outbox), written in one transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from pusherd.clock import iso_ms, now_ms
from pusherd.store.db import Database
from pusherd.store.ids import IdSource
from pusherd.store.models import ClaimedDelivery, IngestResult, NewEvent

# (event_name, subscription event_names, subscription scopes) -> wanted?
Matcher = Callable[[str, Sequence[str], Sequence[str]], bool]


def insert_event(
    conn: sqlite3.Connection,
    ids: IdSource,
    event: NewEvent,
    now: int,
    subscriptions: Iterable[str],
    now_iso: str | None = None,
    taken: Mapping[str, Target] | None = None,
    taker: Taker | None = None,
) -> IngestResult:
    """Insert one event and a pending delivery to each given subscription.

    A messageId already stored for the organization makes this a duplicate: nothing is written
    and the original messageUuid is returned.
    """
    message_id = event.message_id or ids.uuid7()
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
    handed: list[ClaimedDelivery] = []
    timestamp = event.timestamp or now_iso or iso_ms(now)
    for sub in subscriptions:
        target = taken.get(sub) if taken is not None else None
        if target is None or taker is None:
            cur = conn.execute(
                "INSERT INTO deliveries (event_seq, subscription, status, due_ms, created_ms)"
                " VALUES (?, ?, 'pending', ?, ?)",
                (seq, sub, now, now),
            )
            delivery_ids.append(int(cur.lastrowid or 0))
            continue
        # Born leased to the dispatcher that asked for it: no claim needed (its lease and the
        # dead-owner recovery keep it safe exactly like a claimed row).
        until = now + taker.lease_ms
        cur = conn.execute(
            "INSERT INTO deliveries (event_seq, subscription, status, due_ms, created_ms,"
            " lease_owner, lease_until_ms) VALUES (?, ?, 'pending', ?, ?, ?, ?)",
            (seq, sub, until, now, taker.owner, until),
        )
        delivery_id = int(cur.lastrowid or 0)
        delivery_ids.append(delivery_id)
        handed.append(
            ClaimedDelivery(
                id=delivery_id,
                subscription=sub,
                attempts=0,
                schedule_pos=0,
                organization=event.organization,
                message_uuid=message_uuid,
                event_name=event.event_name,
                message_id=message_id,
                payload=event.payload,
                timestamp=timestamp,
                destination=target.destination,
                signing_keys=target.keys(now),
            )
        )
    return IngestResult(
        message_uuid, message_id, len(delivery_ids), False, tuple(delivery_ids), tuple(handed)
    )


@dataclass(frozen=True)
class Target:
    """A subscription events of its organization may fan out to."""

    uuid: str
    event_names: list[str]
    scopes: list[str]
    destination: str
    signing_key: str = field(repr=False)
    prev_signing_key: str | None = field(repr=False)
    prev_key_until_ms: int | None

    def keys(self, now: int) -> tuple[str, ...]:
        """Signing keys: the current one, then a rotated-out one while it is still valid."""
        if self.prev_signing_key is None or (self.prev_key_until_ms or 0) <= now:
            return (self.signing_key,)
        return (self.signing_key, self.prev_signing_key)


class Taker(Protocol):
    """A dispatcher that takes fresh deliveries straight from ingest, leased to it."""

    owner: str
    lease_ms: int

    def wants(self, subscription: str) -> bool:
        """Whether to hand this subscription's new delivery over at once (reserves room)."""
        ...


def _targets(conn: sqlite3.Connection, organization: str) -> list[Target]:
    rows = conn.execute(
        "SELECT uuid, event_names, scopes, destination, signing_key, prev_signing_key,"
        " prev_key_until_ms FROM subscriptions"
        " WHERE organization = ? AND deleted_ms IS NULL AND status != 'DISABLED'"
        " ORDER BY created_ms, uuid",
        (organization,),
    ).fetchall()
    return [
        Target(r[0], orjson.loads(r[1]), orjson.loads(r[2]), r[3], r[4], r[5], r[6]) for r in rows
    ]


class EventStore:
    """Ingest (mixed into SqliteStore)."""

    db: Database
    ids: IdSource
    # organization -> its deliverable subscriptions; cleared inside every write that changes a
    # subscription, so a write later in the same group commit never sees a stale list.
    targets_cache: dict[str, list[Target]]

    def subscriptions_changed(self) -> None:
        """Forget cached fan-out targets (call inside the write that changed a subscription)."""
        self.targets_cache.clear()

    async def ingest(
        self, events: Sequence[NewEvent], matches: Matcher, taker: Taker | None = None
    ) -> list[IngestResult]:
        """Store events and their deliveries atomically (all or nothing) in a group commit.

        With a taker, deliveries it wants are created leased to it and returned in
        IngestResult.handed, to be sent without a claim.
        """

        def fn(conn: sqlite3.Connection) -> list[IngestResult]:
            now = now_ms()
            now_iso = iso_ms(now)
            targets = self.targets_cache
            results = []
            for event in events:
                subs = targets.get(event.organization)
                if subs is None:
                    subs = targets[event.organization] = _targets(conn, event.organization)
                wanted = [t for t in subs if matches(event.event_name, t.event_names, t.scopes)]
                taken = (
                    {t.uuid: t for t in wanted if taker.wants(t.uuid)}
                    if taker is not None
                    else None
                )
                results.append(
                    insert_event(
                        conn,
                        self.ids,
                        event,
                        now,
                        [t.uuid for t in wanted],
                        now_iso,
                        taken,
                        taker,
                    )
                )
            return results

        return await self.db.write(fn)

    async def send_to(self, event: NewEvent, subscriptions: Sequence[str]) -> IngestResult:
        """Store one event addressed to the given subscriptions only (test sends)."""

        def fn(conn: sqlite3.Connection) -> IngestResult:
            return insert_event(conn, self.ids, event, now_ms(), subscriptions)

        return await self.db.write(fn)
