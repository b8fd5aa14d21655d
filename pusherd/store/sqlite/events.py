"""Events and their fan-out into deliveries (the outbox), written in one transaction."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson

from pusherd.clock import iso_ms, now_ms
from pusherd.store.changes import Change, ChangeFeed
from pusherd.store.ids import IdSource
from pusherd.store.sqlite import queues
from pusherd.store.sqlite.db import Database
from pusherd.store.types import ClaimedDelivery, Handover, IngestResult, Matcher, NewEvent, Taker

_QUEUED = Change("deliveries_queued")


CHUNKS = (256, 64, 16, 4, 1)  # multi-row statement sizes: few shapes for the statement cache
_EVENT_COLUMNS = "uuid, organization, event_name, message_id, payload, timestamp, created_ms"
_DELIVERY_COLUMNS = (
    "event_seq, subscription, status, due_ms, created_ms, lease_owner, lease_until_ms"
)


def _chunks(rows: list[tuple[object, ...]]) -> Iterator[list[tuple[object, ...]]]:
    """Split rows into runs of CHUNKS sizes (largest first), in order."""
    i = 0
    for size in CHUNKS:
        while len(rows) - i >= size:
            yield rows[i : i + size]
            i += size


@lru_cache(maxsize=64)
def _multi_row_sql(head: str, width: int, rows: int, tail: str) -> str:
    """INSERT text for `rows` rows of `width` values (a few shapes, built once each)."""
    values = ", ".join(["(" + ", ".join("?" * width) + ")"] * rows)
    return f"{head} VALUES {values} {tail}"


def _insert_many(
    conn: sqlite3.Connection, head: str, width: int, tail: str, rows: list[tuple[object, ...]]
) -> list[Any]:
    """Multi-row INSERTs (rows are written in list order); the RETURNING rows of all of them."""
    out: list[Any] = []
    for chunk in _chunks(rows):
        params = [v for row in chunk for v in row]
        sql = _multi_row_sql(head, width, len(chunk), tail)
        out.extend(conn.execute(sql, params).fetchall())
    return out


@dataclass
class Fanout:
    """One event to insert and the subscriptions it goes to."""

    event: NewEvent
    subscriptions: Sequence[str]


def insert_events(
    conn: sqlite3.Connection,
    ids: IdSource,
    fanouts: Sequence[Fanout],
    now: int,
    handover: Handover | None = None,
    handed: list[ClaimedDelivery] | None = None,
) -> list[IngestResult]:
    """Insert events and a pending delivery to each of their subscriptions, in order.

    Two multi-row statements do the work of two statements per event. An event whose messageId
    is already stored for its organization (or comes earlier in `fanouts`) is a duplicate:
    nothing is written for it and the original messageUuid is returned. With a handover, the
    deliveries it has room for are created leased to its owner and appended to `handed`.
    """
    now_iso = iso_ms(now)
    uuids = [ids.uuid1() for _ in fanouts]
    message_ids = [f.event.message_id or ids.uuid7() for f in fanouts]
    inserted = {
        (org, mid): seq
        for seq, org, mid in _insert_many(
            conn,
            f"INSERT INTO events ({_EVENT_COLUMNS})",
            7,
            "ON CONFLICT (organization, message_id) DO NOTHING"
            " RETURNING seq, organization, message_id",
            [
                (
                    u,
                    f.event.organization,
                    f.event.event_name,
                    mid,
                    f.event.payload,
                    f.event.timestamp or now_iso,
                    now,
                )
                for f, u, mid in zip(fanouts, uuids, message_ids, strict=True)
            ],
        )
    }
    seqs: list[int | None] = []
    rows: list[tuple[object, ...]] = []
    for f, mid in zip(fanouts, message_ids, strict=True):
        seq = inserted.pop((f.event.organization, mid), None)  # a later repeat is a duplicate
        seqs.append(seq)
        if seq is None:
            continue
        for sub in f.subscriptions:
            rows.append((seq, sub, "pending", now, now, None, None))
    leased = _lease_fresh(conn, rows, handover, now) if handover is not None and rows else {}
    delivery_ids = {
        (seq, sub): i
        for i, seq, sub in _insert_many(
            conn,
            f"INSERT INTO deliveries ({_DELIVERY_COLUMNS})",
            7,
            "RETURNING id, event_seq, subscription",
            rows,
        )
    }
    queues.fresh_rows(conn, {str(r[1]) for r in rows if r[5] is None}, now)
    if leased:
        assert handover is not None and handed is not None
        until = now + handover.lease_ms
        queues.fresh_rows(conn, {str(r[1]) for r in rows if r[5] is not None}, until)
        handed.extend(
            _handed(conn, fanouts, seqs, uuids, message_ids, delivery_ids, leased, now_iso, now)
        )
    results = []
    for f, u, mid, seq in zip(fanouts, uuids, message_ids, seqs, strict=True):
        event = f.event
        if seq is None:
            original = conn.execute(
                "SELECT uuid, (SELECT count(*) FROM deliveries WHERE event_seq = seq) FROM events"
                " WHERE organization = ? AND message_id = ?",
                (event.organization, mid),
            ).fetchone()
            results.append(IngestResult(original[0], mid, original[1], duplicate=True))
            continue
        ids_of_event = tuple([delivery_ids[(seq, sub)] for sub in f.subscriptions])
        results.append(IngestResult(u, mid, len(ids_of_event), False, ids_of_event))
    return results


def _lease_fresh(
    conn: sqlite3.Connection, rows: list[tuple[object, ...]], handover: Handover, now: int
) -> dict[str, int]:
    """Turn the rows the handover has room for into rows leased to its owner, in place.

    A subscription's row is taken only while nothing of it is due unclaimed (older rows are in
    flight or waiting for a retry, or there are none), and once one of its rows is left in the
    table, its later rows are left too: a fresh delivery never overtakes an older one.
    Returns subscription -> rows taken.
    """
    subs = {str(r[1]) for r in rows} - handover.skip
    open_subs = {
        str(sub): str(origin)
        for sub, origin, due in conn.execute(
            "SELECT subscription, origin, next_due_ms FROM queues"
            " WHERE subscription IN (SELECT value FROM json_each(?))",
            (queues.id_list(subs),),
        ).fetchall()
        if due is None or due > now
    }
    room = dict(handover.room)
    until = now + handover.lease_ms
    taken: dict[str, int] = {}
    for i, (seq, sub, *_) in enumerate(rows):
        origin = open_subs.get(str(sub))
        if origin is None:
            continue
        if room.get(origin, 0) > 0:
            room[origin] -= 1
            rows[i] = (seq, sub, "pending", until, now, handover.owner, until)
            taken[str(sub)] = taken.get(str(sub), 0) + 1
        else:
            del open_subs[str(sub)]
    return taken


def _handed(
    conn: sqlite3.Connection,
    fanouts: Sequence[Fanout],
    seqs: Sequence[int | None],
    uuids: Sequence[str],
    message_ids: Sequence[str],
    delivery_ids: dict[tuple[int, str], int],
    leased: dict[str, int],
    now_iso: str,
    now: int,
) -> list[ClaimedDelivery]:
    """What the taker needs to send the leased rows, in ingest order."""
    keys = {
        str(r[0]): r[1:]
        for r in conn.execute(
            "SELECT uuid, destination, signing_key, prev_signing_key, prev_key_until_ms"
            " FROM subscriptions WHERE uuid IN (SELECT value FROM json_each(?))",
            (queues.id_list(leased),),
        ).fetchall()
    }
    left = dict(leased)
    out = []
    for f, seq, u, mid in zip(fanouts, seqs, uuids, message_ids, strict=True):
        if seq is None:
            continue
        for sub in f.subscriptions:
            if not left.get(sub):
                continue
            left[sub] -= 1
            destination, key, prev, prev_until = keys[sub]
            out.append(
                ClaimedDelivery(
                    id=delivery_ids[(seq, sub)],
                    subscription=sub,
                    attempts=0,
                    schedule_pos=0,
                    organization=f.event.organization,
                    message_uuid=u,
                    event_name=f.event.event_name,
                    message_id=mid,
                    payload=f.event.payload,
                    timestamp=f.event.timestamp or now_iso,
                    destination=destination,
                    signing_keys=(key,)
                    if prev is None or (prev_until or 0) <= now
                    else (key, prev),
                )
            )
    return out


def insert_event(
    conn: sqlite3.Connection,
    ids: IdSource,
    event: NewEvent,
    now: int,
    subscriptions: Sequence[str],
) -> IngestResult:
    """insert_events for one event (test sends, a subscription's welcome message)."""
    return insert_events(conn, ids, [Fanout(event, subscriptions)], now)[0]


@dataclass(frozen=True)
class Target:
    """A subscription events of its organization may fan out to."""

    uuid: str
    event_names: list[str]
    scopes: list[str]


def _targets(conn: sqlite3.Connection, organization: str) -> list[Target]:
    rows = conn.execute(
        "SELECT uuid, event_names, scopes FROM subscriptions"
        " WHERE organization = ? AND deleted_ms IS NULL AND status != 'DISABLED'"
        " ORDER BY created_ms, uuid",
        (organization,),
    ).fetchall()
    return [Target(r[0], orjson.loads(r[1]), orjson.loads(r[2])) for r in rows]


@dataclass
class IngestGroup:
    """Ingest requests waiting for the same group commit, in arrival order."""

    fanouts: list[Fanout] = field(default_factory=list)
    matchers: list[Matcher] = field(default_factory=list)
    written: asyncio.Future[list[IngestResult]] | None = None
    handed: list[ClaimedDelivery] = field(default_factory=list)  # leased to the taker
    taker: Taker | None = None  # the taker asked inside the write (it gets them after commit)


class EventStore:
    """Ingest (mixed into SqliteStore)."""

    db: Database
    ids: IdSource
    changes: ChangeFeed
    # organization -> its deliverable subscriptions; cleared inside every write that changes a
    # subscription, so a write later in the same group commit never sees a stale list.
    targets_cache: dict[str, list[Target]]
    ingest_group: IngestGroup | None  # the requests the next group commit writes
    taker: Taker | None  # takes fresh deliveries without a claim

    async def take_fresh(self, taker: Taker | None) -> None:
        """Hand fresh deliveries of this process's ingests straight to taker (see Handover)."""
        self.taker = taker

    def subscriptions_changed(self, organization: str) -> None:
        """Forget an organization's cached fan-out targets (call inside the write that changed
        one of its subscriptions)."""
        self.targets_cache.pop(organization, None)

    async def ingest(self, events: Sequence[NewEvent], matches: Matcher) -> list[IngestResult]:
        """Store events and their deliveries atomically (all or nothing) in a group commit.

        Requests that wait for the same group commit are written together, by one multi-row
        statement per table: under load that is two statements per group, not four per
        request. They share its fate too: if the commit fails, each of them gets the error.
        """
        group = self.ingest_group
        if group is None or (group.written is not None and group.written.done()):
            group = self.ingest_group = IngestGroup()

            def fn(conn: sqlite3.Connection) -> list[IngestResult]:
                self.ingest_group = None  # requests from now on go to the next commit
                return self._write_group(conn, group)

            group.written = written = self.db.write(fn)

            def closed(done: asyncio.Future[list[IngestResult]]) -> None:
                if self.ingest_group is group:  # the write failed before fn ran
                    self.ingest_group = None
                if done.cancelled() or done.exception() is not None:
                    return  # retrieved: each request has its own copy via shield
                if group.handed and group.taker is not None:
                    group.taker.taken(group.handed)
                if any(r.deliveries and not r.duplicate for r in done.result()):
                    self.changes.announce(_QUEUED)  # once per group commit

            written.add_done_callback(closed)
        first = len(group.fanouts)
        for event in events:
            group.fanouts.append(Fanout(event, []))
            group.matchers.append(matches)
        assert group.written is not None
        # Shielded: a request given up on must not cancel the others' shared write.
        results = await asyncio.shield(group.written)
        return results[first : first + len(events)]

    def _write_group(self, conn: sqlite3.Connection, group: IngestGroup) -> list[IngestResult]:
        # Matching runs here, inside the commit, so a subscription change written earlier in
        # the same group is seen: it cleared the cache, and the targets are read again.
        targets = self.targets_cache
        for f, matches in zip(group.fanouts, group.matchers, strict=True):
            subs = targets.get(f.event.organization)
            if subs is None:
                subs = targets[f.event.organization] = _targets(conn, f.event.organization)
            wanted = [t for t in subs if matches(f.event.event_name, t.event_names, t.scopes)]
            f.subscriptions = [t.uuid for t in wanted]
        # The taker's room is read here, at the write, as data: what it can take right now.
        group.taker = self.taker
        handover = group.taker.handover() if group.taker is not None else None
        return insert_events(conn, self.ids, group.fanouts, now_ms(), handover, group.handed)

    async def send_to(self, event: NewEvent, subscriptions: Sequence[str]) -> IngestResult:
        """Store one event addressed to the given subscriptions only (test sends)."""

        def fn(conn: sqlite3.Connection) -> IngestResult:
            return insert_event(conn, self.ids, event, now_ms(), subscriptions)

        result = await self.db.write(fn)
        if result.deliveries:
            self.changes.announce(Change("deliveries_queued", event.organization))
        return result
