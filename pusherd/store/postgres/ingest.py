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

Executor = Pool | asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

WAKE_CHANNEL = "pusherd_wake"

# Deliveries are due at the database's time (dbclock.py): another machine's clock may differ.
_INSERT = (
    """
WITH new_events AS (
    INSERT INTO events (uuid, organization, event_name, message_id, payload, timestamp, created_ms)
    SELECT x.u, x.o, x.n, x.m, x.p, x.t, $7
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
        WITH ORDINALITY AS x(u, o, n, m, p, t, i)
    ORDER BY x.i
    ON CONFLICT (organization, message_id) DO NOTHING
    RETURNING seq, organization, message_id
), new_deliveries AS (
    INSERT INTO deliveries (event_seq, subscription, origin, status, due_ms, created_ms)
    SELECT e.seq, f.s, f.g, 'pending', """
    + DB_NOW_MS
    + """, $7
    FROM unnest($8::integer[], $9::text[], $10::text[]) WITH ORDINALITY AS f(k, s, g, i)
    JOIN new_events e
        ON e.organization = ($2::text[])[f.k] AND e.message_id = ($4::text[])[f.k]
    ORDER BY f.i
    RETURNING id, event_seq, subscription
), locked AS (
    SELECT subscription FROM queues
    WHERE subscription IN (SELECT subscription FROM new_deliveries)
    ORDER BY subscription FOR UPDATE
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
        self._open: _Group | None = None  # the group new requests join
        self._slots = asyncio.Semaphore(pool.max_size)
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
        return await self._write(items, db)

    async def _flush(self, group: _Group) -> None:
        assert group.done is not None
        async with self._slots:
            if self._open is group:
                self._open = None  # requests from now on form the next group
            try:
                results = await self._write(group.items)
            except Exception as exc:
                group.done.set_exception(exc)
                group.done.exception()  # retrieved: each request re-raises its own copy
                return
            self.groups_written += 1
            group.done.set_result(results)

    async def _write(
        self, items: list[tuple[EventIn, str, str]], db: Executor | None = None
    ) -> list[EventOut]:
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
        rows = await db.fetch(
            _INSERT,
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
        )
        stored: dict[tuple[str, str], list[int]] = {}
        for org, mid, _seq, delivery_id, _sub, _woke in rows:
            ids = stored.setdefault((org, mid), [])
            if delivery_id is not None:
                ids.append(delivery_id)
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
        for i, (event, uuid, mid) in enumerate(items):
            key = (event.organization, mid)
            if key in stored and first_of[key] == i:
                made = tuple(stored[key])
                out.append(EventOut(uuid, mid, False, made, len(made)))
            elif key in stored:  # repeated inside this group: the first one's event
                first = out[first_of[key]]
                out.append(EventOut(first.message_uuid, mid, True, (), first.delivery_count))
            else:
                # Stored before, here or by another process (gone again only if retention
                # purged it in between: still a duplicate, of nothing left to count).
                original_uuid, count = originals.get(key, (uuid, 0))
                out.append(EventOut(original_uuid, mid, True, (), count))
        return out
