"""Claiming and finishing deliveries across processes (the SQL side of the delivery queue).

The claim is the `pusherd_claim` function of the schema (see migrations/0001_initial.sql): one
round trip leases due rows in due order within the caller's room, with `per_destination` held
across every process and a fresh fencing token per row. Finishing a row is fenced by that token:
a process whose lease ran out and was taken over changes nothing, whatever it thinks happened.

These are the building blocks of the PostgreSQL store; the Store methods (issue 11's interface)
wrap them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from pusherd.store.postgres.pool import Pool

Executor = asyncpg.Connection | asyncpg.Pool | asyncpg.pool.PoolConnectionProxy | Pool

_CLAIM = "SELECT * FROM pusherd_claim($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"


@dataclass(frozen=True)
class Claimed:
    """What one claim took (rows of pusherd_claim, by id), and when to look again."""

    rows: list[asyncpg.Record]
    more: bool  # due work was left for lack of room or a busy origin: claim again soon
    next_due_ms: int | None  # earliest due time after now of any queue (None: nothing waits)


async def claim(
    db: Executor,
    owner: str,
    room: Mapping[str, int],
    default_room: int,
    budget: int,
    per_destination: int,
    now_ms: int | None,
    lease_ms: int,
    default_total: int | None = None,
    alone_total: int | None = None,
) -> Claimed:
    """Lease due deliveries (see pusherd_claim) in one round trip; now_ms None: by the
    database's clock, which every process shares (what a deployment on several machines uses).
    alone_total: the live leases an owner may hold on an origin no other owner holds any of
    (rows ready behind its attempts; None: per_destination, as with other owners)."""
    origins = list(room)
    rows = await db.fetch(
        _CLAIM,
        owner,
        origins,
        [room[o] for o in origins],
        default_room,
        budget,
        per_destination,
        now_ms,
        lease_ms,
        default_total,
        alone_total,
    )
    summary = rows[-1]  # always last, id NULL
    next_due = summary["next_due_ms"]
    return Claimed(rows[:-1], bool(summary["more"]), None if next_due is None else int(next_due))


def signing_keys(
    key: str, prev: str | None, prev_until_ms: int | None, now: int
) -> tuple[str, ...]:
    """The keys a delivery is signed with: the current one, then a rotated-out one still valid."""
    return (key,) if prev is None or (prev_until_ms or 0) <= now else (key, prev)


# Many outcomes in one statement (a group commit of the record path: one fsync for all). Only the
# holder of the current lease (its owner AND its token: should a database crash ever hand a token
# out twice, the owner still differs; a NULL token, for a row leased at ingest where no claim gave
# one, is fenced by the owner alone, which is unique per process run) moves a row on; a stale
# owner's row is not in `done` and nothing is written for it, not even an attempt the new owner's
# outcome supersedes. Only a retry moves a queue (its next due time may come earlier): a delivered
# or failed row was counted in its queue at its lease's end, so without it the queue's time is early
# at worst, and a claim at that time finds nothing and computes it afresh. Leaving those queue rows
# alone keeps the record from locking them through its commit, when every claim of the subscription
# would skip them (issue 12: a drain's claims found its one queue locked by the record in flight
# most of the time). All parts see one snapshot, in which the rows are still leased: a queue's next
# due time is taken over the subscription's rows not finished here, and the retry times of those
# that are. Queue rows are locked in subscription order first, so that two concurrent finishes
# cannot deadlock. The lock returns the row as last committed, which may be newer than the snapshot
# (another xmin): then a writer that committed meanwhile, such as an ingest whose rows are unseen
# here, set its due time, and that is kept (issue 12: else the new rows would wait for nothing; at
# worst a claim finds nothing due and computes it afresh).
_FINISH = """
WITH args AS (
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::integer[], $5::bigint[],
        $6::bigint[], $7::integer[], $8::text[], $9::double precision[], $10::text[])
        AS a(id, token, status, pos, next_ms, at_ms, code, error, duration_ms, body)
), done AS (
    UPDATE deliveries d SET status = a.status, attempts = d.attempts + 1, schedule_pos = a.pos,
        due_ms = coalesce(a.next_ms, d.due_ms),
        finished_ms = CASE WHEN a.status = 'pending' THEN NULL ELSE a.at_ms END,
        last_attempt_ms = a.at_ms, last_status_code = a.code, last_error = a.error,
        lease_owner = NULL, lease_token = NULL, lease_until_ms = NULL
    FROM args a
    WHERE d.id = a.id AND (a.token IS NULL OR d.lease_token = a.token) AND d.lease_owner = $11
        AND d.status = 'pending'
    RETURNING d.id, d.subscription, a.status, a.next_ms
), logged AS (
    INSERT INTO attempts (delivery_id, started_ms, duration_ms, status_code, error, response_body)
    SELECT a.id, a.at_ms, a.duration_ms, a.code, a.error, a.body
    FROM args a JOIN done ON done.id = a.id
), retried AS (
    SELECT DISTINCT subscription FROM done WHERE done.status = 'pending'
), seen AS (
    SELECT q.subscription, q.xmin::text AS version FROM queues q
    WHERE q.subscription IN (SELECT subscription FROM retried)
), locked AS (
    SELECT q.subscription, q.next_due_ms, q.xmin::text AS version FROM queues q
    WHERE q.subscription IN (SELECT subscription FROM retried)
    ORDER BY q.subscription FOR UPDATE
), queued AS (
    UPDATE queues q SET next_due_ms = least(
        (SELECT min(d.due_ms) FROM deliveries d
         WHERE d.subscription = q.subscription AND d.status = 'pending'
            AND d.id NOT IN (SELECT id FROM done)),
        (SELECT min(done.next_ms) FROM done
         WHERE done.subscription = q.subscription AND done.status = 'pending'),
        CASE WHEN l.version IS DISTINCT FROM s.version THEN l.next_due_ms END
    )
    FROM locked l LEFT JOIN seen s ON s.subscription = l.subscription
    WHERE q.subscription = l.subscription
)
SELECT id FROM done
"""


@dataclass(frozen=True)
class Outcome:
    """One attempt's result as the queue records it."""

    status: str  # "delivered" | "failed" | "pending" (a retry, due at next_attempt_ms)
    schedule_pos: int
    next_attempt_ms: int | None
    started_ms: int
    duration_ms: float
    status_code: int | None
    error: str | None
    response_body: str = ""


async def finish_many(
    db: Executor, owner: str, outcomes: Sequence[tuple[int, int | None, Outcome]]
) -> set[int]:
    """Record owner's attempts, (delivery id, lease token, outcome), in one statement; the ids
    whose lease it still held (the others changed nothing)."""
    if not outcomes:
        return set()
    columns: list[list[Any]] = [[] for _ in range(10)]
    for delivery_id, token, o in outcomes:
        values = (
            delivery_id,
            token,
            o.status,
            o.schedule_pos,
            o.next_attempt_ms,
            o.started_ms,
            o.status_code,
            o.error,
            o.duration_ms,
            o.response_body,
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    return {int(r[0]) for r in await db.fetch(_FINISH, *columns, owner)}


async def finish(
    db: Executor, owner: str, delivery_id: int, lease_token: int, outcome: Outcome
) -> bool:
    """Record one attempt under its lease; False (nothing changed) if the lease was lost."""
    return bool(await finish_many(db, owner, [(delivery_id, lease_token, outcome)]))
