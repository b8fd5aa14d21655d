"""Group-committed ingest on PostgreSQL: one statement, one round trip, one WAL flush per group.

Ingest requests that arrive while a group is being written wait for a free pool connection and
then go together as the next group (up to the pool's size of groups in flight at once). A group
is ONE autocommit statement (bench/pg_drivers.py measured this shape against both drivers): it
inserts the events from arrays with `unnest` (ON CONFLICT (organization, message_id) DO NOTHING:
idempotent across processes, since the unique index makes a concurrent insert of the same key
wait for the first one's fate), their deliveries, marks their queues due, and sends one
`pusherd_wake` notification for the whole group. With synchronous_commit on, the statement's
answer means the rows are on disk.

Duplicates are settled before the statement for repeats inside the group (the first one wins),
and after it, with one more query, for messageIds stored earlier or by another process.

Every queue the group adds to is written, even one already due (issue 12): a test on the due time
would be judged on the statement's snapshot, and skip a queue that a claim or record in flight is
about to move later without seeing the new rows. Written, the row is locked (in subscription
order, as finish_many locks them), so the ingest waits for such a writer and then marks the queue
due on top of what it committed; and a record whose snapshot predates this commit sees that the
queue row changed (claims.py keeps the due time then).

Hand-over (as on SQLite): with a taker (this process's dispatcher) offering room, the statement
creates the fresh deliveries it has room for already leased to it (no lease token: the owner,
unique per process run, fences them) and returns what it needs to send them, so they leave
without a claim (issue 12: at 1,000 events/s the claims lost most of their tries to the ingests
holding the one queue row, and the queue backed up to a p99 of 150 ms to 1.6 s). A
subscription's rows are taken only while its queue, read under the row lock (the latest
committed version), has nothing due: a fresh row never overtakes an older one. Per origin, as
in pusherd_claim: the origin's advisory lock is tried (held by another process's claim: no
hand-over there, its rows are claimed), and while another owner holds live leases on the origin
all leases together stay within per_destination. Groups that offer a hand-over are written one
at a time and never beside a claim of this process (`handing`), or they would make each other
skip the same rows and locks. Only deliveries left unleased wake anyone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from pusherd.clock import iso_ms, now_ms
from pusherd.store.ids import IdSource
from pusherd.store.postgres.dbclock import DB_NOW_MS
from pusherd.store.postgres.pool import Pool
from pusherd.store.types import ClaimedDelivery, Handover, Taker

Executor = Pool | asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

WAKE_CHANNEL = "pusherd_wake"

# The events of a group, idempotent on (organization, messageId): $1 .. $7 (uuids,
# organizations, names, messageIds, payloads, timestamps, created_ms); their fan-out ($8 .. $10:
# event index, subscription, origin as this process's cache knows it); and the fan-out's queue
# rows, locked in subscription order. A delivery takes its origin from its locked queue row, not
# from the cache: a destination changed through another process in the last second is already
# there (sync_queue moves the queue row under the same lock), and a row written with the old
# origin would count its lease against the wrong destination's per_destination for good.
# Both statements start so.
_NEW_EVENTS = """
WITH new_events AS (
    INSERT INTO events (uuid, organization, event_name, message_id, payload, timestamp, created_ms)
    SELECT x.u, x.o, x.n, x.m, x.p, x.t, $7
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
        WITH ORDINALITY AS x(u, o, n, m, p, t, i)
    ORDER BY x.i
    ON CONFLICT (organization, message_id) DO NOTHING
    RETURNING seq, organization, message_id
), fan AS (
    SELECT e.seq, f.s, f.g, f.i
    FROM unnest($8::integer[], $9::text[], $10::text[]) WITH ORDINALITY AS f(k, s, g, i)
    JOIN new_events e
        ON e.organization = ($2::text[])[f.k] AND e.message_id = ($4::text[])[f.k]
), locked AS (
    SELECT q.subscription, q.next_due_ms, q.origin FROM queues q
    WHERE q.subscription IN (SELECT s FROM fan)
    ORDER BY q.subscription FOR UPDATE
)"""

# Deliveries are due, and created (a hand-back puts a row back at least(created_ms, now)), at
# the database's time (dbclock.py): another machine's clock may differ.
_INSERT = (
    _NEW_EVENTS
    + """, new_deliveries AS (
    INSERT INTO deliveries (event_seq, subscription, origin, status, due_ms, created_ms)
    SELECT fan.seq, fan.s, coalesce(l.origin, fan.g), 'pending', """
    + DB_NOW_MS
    + """, """
    + DB_NOW_MS
    + """
    FROM fan LEFT JOIN locked l ON l.subscription = fan.s
    ORDER BY fan.i
    RETURNING id, event_seq, subscription
), due AS (
    UPDATE queues q SET next_due_ms = least(q.next_due_ms, """
    + DB_NOW_MS
    + """)
    FROM locked l WHERE q.subscription = l.subscription
), woke AS (
    SELECT pg_notify('pusherd_wake', $11::text) FROM (SELECT 1 FROM new_deliveries LIMIT 1) one
)
-- w.n is selected so that the planner cannot drop the join, and with it the NOTIFY.
SELECT e.organization, e.message_id, e.seq, d.id, d.subscription, w.n
FROM new_events e
LEFT JOIN new_deliveries d ON d.event_seq = e.seq
LEFT JOIN (SELECT count(*) AS n FROM woke) w ON true
ORDER BY e.seq, d.id
"""
)

# The same, creating the deliveries the taker has room for leased to it (see the module's
# docstring); $12 .. $17: owner, lease_ms, room (origins and counts), subscriptions to skip,
# per_destination. Queue times on the database's clock, as above.
_INSERT_HANDING = (
    _NEW_EVENTS
    + """, open_origins AS (
    SELECT r.o AS origin,
        pusherd_hand_over_room(r.o, $12, """
    + DB_NOW_MS
    + """, r.n, $17::integer) AS room
    FROM unnest($14::text[], $15::integer[]) AS r(o, n)
    WHERE $12::text IS NOT NULL AND r.n > 0 AND r.o IN (SELECT origin FROM locked)
), handed AS (
    SELECT c.i FROM (
        SELECT fan.i, l.origin AS g, row_number() OVER (PARTITION BY l.origin ORDER BY fan.i)
            AS rank
        FROM fan JOIN locked l ON l.subscription = fan.s
        WHERE (l.next_due_ms IS NULL OR l.next_due_ms > """
    + DB_NOW_MS
    + """)
            AND NOT (fan.s = ANY($16::text[]))
    ) c JOIN open_origins o ON o.origin = c.g
    WHERE c.rank <= o.room
), new_deliveries AS (
    INSERT INTO deliveries (event_seq, subscription, origin, status, due_ms, created_ms,
        lease_owner, lease_until_ms)
    SELECT fan.seq, fan.s, coalesce(l.origin, fan.g), 'pending',
        """
    + DB_NOW_MS
    + """ + CASE WHEN h.i IS NULL THEN 0 ELSE $13 END,
        """
    + DB_NOW_MS
    + """, CASE WHEN h.i IS NOT NULL THEN $12 END,
        CASE WHEN h.i IS NOT NULL THEN """
    + DB_NOW_MS
    + """ + $13 END
    FROM fan LEFT JOIN handed h ON h.i = fan.i LEFT JOIN locked l ON l.subscription = fan.s
    ORDER BY fan.i
    RETURNING id, event_seq, subscription, due_ms, lease_owner IS NOT NULL AS leased
), due AS (
    UPDATE queues q SET next_due_ms = least(q.next_due_ms, n.due)
    FROM (SELECT subscription, min(due_ms) AS due FROM new_deliveries GROUP BY subscription) n
    WHERE q.subscription = n.subscription AND q.subscription IN (SELECT subscription FROM locked)
), woke AS (
    SELECT pg_notify('pusherd_wake', $11::text)
    FROM (SELECT 1 FROM new_deliveries WHERE NOT leased LIMIT 1) one
)
-- w.n is selected so that the planner cannot drop the join, and with it the NOTIFY.
SELECT e.organization, e.message_id, e.seq, d.id, d.subscription, w.n, d.leased,
    s.destination, s.signing_key,
    CASE WHEN s.prev_key_until_ms > """
    + DB_NOW_MS
    + """ THEN s.prev_signing_key END
FROM new_events e
LEFT JOIN new_deliveries d ON d.event_seq = e.seq
LEFT JOIN subscriptions s ON d.leased AND s.uuid = d.subscription
LEFT JOIN (SELECT count(*) AS n FROM woke) w ON true
ORDER BY e.seq, d.id
"""
)

_ORIGINALS = """
SELECT e.organization, e.message_id, e.uuid,
    (SELECT count(*) FROM deliveries d WHERE d.event_seq = e.seq)
FROM events e
JOIN unnest($1::text[], $2::text[]) AS k(o, m) ON e.organization = k.o AND e.message_id = k.m
"""


@dataclass(frozen=True)
class EventIn:
    """One event to store, and the deliveries it fans out to: (subscription, origin) pairs."""

    organization: str
    event_name: str
    payload: str  # JSON text
    message_id: str | None = None  # None: a version-7 UUID is made for it
    timestamp: str | None = None  # None: the time of the write
    deliveries: Sequence[tuple[str, str]] = ()


@dataclass(frozen=True)
class EventOut:
    """What became of one event: stored now (with its delivery ids) or a duplicate."""

    message_uuid: str
    message_id: str
    duplicate: bool
    delivery_ids: tuple[int, ...] = ()
    delivery_count: int = 0  # for a duplicate: how many deliveries the original has
    handed: int = 0  # how many of delivery_ids were handed over leased (no claim needed)


@dataclass
class _Group:
    items: list[tuple[EventIn, str, str]] = field(default_factory=list)  # (event, uuid, mid)
    done: asyncio.Future[list[EventOut]] | None = None


class GroupWriter:
    """Collects concurrent ingests into groups, each written by one statement."""

    def __init__(self, pool: Pool, ids: IdSource | None = None, sender: str = "") -> None:
        self.pool = pool
        self.ids = ids or IdSource()
        # The wake-up's payload: the process that sent it (it has woken its own dispatcher).
        self.sender = sender
        self.groups_written = 0
        self.taker: Taker | None = None  # the dispatcher fresh deliveries are handed to
        self.per_destination = 2**31 - 1  # live leases per origin, all processes (see claims)
        self._open: _Group | None = None  # the group new requests join
        self._slots = asyncio.Semaphore(pool.max_size)
        # Held by the group writing with a hand-over offer, and by this process's claims: the
        # two take the same queue rows and origin locks, and would make each other skip them.
        self.handing = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def write(self, events: Sequence[EventIn]) -> list[EventOut]:
        """Store events in the next group commit; their outcomes, in order.

        All events of a group share its fate: if its statement fails, each request gets the
        error (StoreError when the database is unreachable).
        """
        group = self._open
        if group is None:
            loop = asyncio.get_running_loop()
            group = self._open = _Group(done=loop.create_future())
            task = loop.create_task(self._flush(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        first = len(group.items)
        for event in events:
            group.items.append((event, self.ids.uuid1(), event.message_id or self.ids.uuid7()))
        assert group.done is not None
        # Shielded: a request given up on must not cancel the others' shared write.
        results = await asyncio.shield(group.done)
        return results[first : first + len(events)]

    async def write_now(self, db: Executor, events: Sequence[EventIn]) -> list[EventOut]:
        """Store events with one statement on db now (inside the caller's transaction: a
        subscription's welcome message commits with the subscription)."""
        items = [(e, self.ids.uuid1(), e.message_id or self.ids.uuid7()) for e in events]
        return (await self._write(items, db))[0]

    async def _flush(self, group: _Group) -> None:
        assert group.done is not None
        async with self._slots:
            # Groups that offer a hand-over are written one at a time: each one's offer is the
            # taker's room after the previous one's rows were taken, and two of them would take
            # the same origin's advisory lock (the second then handing over nothing, and its
            # rows, due, would stop the hand-over until a claim took them). Requests arriving
            # meanwhile join the waiting group.
            taker = self.taker
            serial = taker is not None and taker.handover() is not None
            if serial:
                await self.handing.acquire()
            try:
                if self._open is group:
                    self._open = None  # requests from now on form the next group
                # The taker's room is read now, at the write, as data: what it can take now.
                handover = taker.handover() if serial and taker is not None else None
                try:
                    results, handed = await self._write(group.items, None, handover)
                except Exception as exc:
                    group.done.set_exception(exc)
                    group.done.exception()  # retrieved: each request re-raises its own copy
                    return
                self.groups_written += 1
                group.done.set_result(results)
                if handed and taker is not None:
                    taker.taken(handed)
            finally:
                if serial:
                    self.handing.release()

    async def _write(
        self,
        items: list[tuple[EventIn, str, str]],
        db: Executor | None = None,
        handover: Handover | None = None,
    ) -> tuple[list[EventOut], list[ClaimedDelivery]]:
        """The group's outcomes, and the deliveries created leased to the handover's owner."""
        db = self.pool if db is None else db
        now = now_ms()
        now_iso = iso_ms(now)
        first_of: dict[tuple[str, str], int] = {}
        fresh: list[int] = []  # indexes into items sent to the database
        for i, (event, _, mid) in enumerate(items):
            if first_of.setdefault((event.organization, mid), i) == i:
                fresh.append(i)
        k_col: list[int] = []
        s_col: list[str] = []
        g_col: list[str] = []
        for k, i in enumerate(fresh, start=1):
            for sub, origin in items[i][0].deliveries:
                k_col.append(k)
                s_col.append(sub)
                g_col.append(origin)
        args = [
            [items[i][1] for i in fresh],
            [items[i][0].organization for i in fresh],
            [items[i][0].event_name for i in fresh],
            [items[i][2] for i in fresh],
            [items[i][0].payload for i in fresh],
            [items[i][0].timestamp or now_iso for i in fresh],
            now,
            k_col,
            s_col,
            g_col,
            self.sender,
        ]
        if handover is not None and handover.room and s_col:
            offer = (handover.owner, handover.lease_ms, list(handover.room))
            rows = await db.fetch(
                _INSERT_HANDING,
                *args,
                *offer,
                list(handover.room.values()),
                list(handover.skip),
                self.per_destination,
            )
        else:  # nothing to hand over: the plain statement
            rows = await db.fetch(_INSERT, *args)
        stored: dict[tuple[str, str], list[int]] = {}
        leased: dict[int, asyncpg.Record] = {}
        for r in rows:
            ids = stored.setdefault((r[0], r[1]), [])
            if r[3] is not None:
                ids.append(r[3])
                if len(r) > 6 and r[6]:
                    leased[r[3]] = r
        missing = [
            (e.organization, mid) for e, _, mid in items if (e.organization, mid) not in stored
        ]
        originals: dict[tuple[str, str], tuple[str, int]] = {}
        if missing:
            for org, mid, uuid, count in await db.fetch(
                _ORIGINALS, [o for o, _ in missing], [m for _, m in missing]
            ):
                originals[(org, mid)] = (uuid, int(count))
        out: list[EventOut] = []
        handed: list[ClaimedDelivery] = []
        for i, (event, uuid, mid) in enumerate(items):
            key = (event.organization, mid)
            if key in stored and first_of[key] == i:
                made = tuple(stored[key])
                mine = [_handed(event, uuid, mid, leased[d], now) for d in made if d in leased]
                handed.extend(mine)
                out.append(EventOut(uuid, mid, False, made, len(made), len(mine)))
            elif key in stored:  # repeated inside this group: the first one's event
                first = out[first_of[key]]
                out.append(EventOut(first.message_uuid, mid, True, (), first.delivery_count))
            else:
                # Stored before, here or by another process (gone again only if retention
                # purged it in between: still a duplicate, of nothing left to count).
                original_uuid, count = originals.get(key, (uuid, 0))
                out.append(EventOut(original_uuid, mid, True, (), count))
        return out, handed


def _handed(event: EventIn, uuid: str, mid: str, r: asyncpg.Record, now: int) -> ClaimedDelivery:
    """A delivery the statement created leased to the handover's owner, ready to send."""
    return ClaimedDelivery(
        id=int(r[3]),
        subscription=r[4],
        attempts=0,
        schedule_pos=0,
        organization=event.organization,
        message_uuid=uuid,
        event_name=event.event_name,
        message_id=mid,
        payload=event.payload,
        timestamp=event.timestamp or iso_ms(now),
        destination=r[7],
        signing_keys=(r[8],) if r[9] is None else (r[8], r[9]),  # a rotated-out key still valid
    )
