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

Executor = asyncpg.Connection | asyncpg.Pool | asyncpg.pool.PoolConnectionProxy

_CLAIM = "SELECT * FROM pusherd_claim($1, $2, $3, $4, $5, $6, $7, $8)"


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
    now_ms: int,
    lease_ms: int,
) -> Claimed:
    """Lease due deliveries (see pusherd_claim) in one round trip."""
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
    )
    summary = rows[-1]  # always last, id NULL
    next_due = summary["next_due_ms"]
    return Claimed(rows[:-1], bool(summary["more"]), None if next_due is None else int(next_due))


# Only the holder of the current lease moves the row on; a stale owner's statement finds no row
# (`done` is empty) and writes nothing, not even an attempt the new owner's outcome supersedes.
# All parts see one snapshot, in which the row is still leased: the queue's next due time is
# taken over the subscription's other pending rows, and this row's own retry time.
_FINISH = """
WITH args AS (
    SELECT $1::bigint AS id, $2::bigint AS token, $3::text AS status, $4::integer AS pos,
        $5::bigint AS next_ms, $6::bigint AS at_ms, $7::integer AS code, $8::text AS error,
        $9::double precision AS duration_ms, $10::text AS body
), done AS (
    UPDATE deliveries d SET status = a.status, attempts = d.attempts + 1, schedule_pos = a.pos,
        due_ms = coalesce(a.next_ms, d.due_ms),
        finished_ms = CASE WHEN a.status = 'pending' THEN NULL ELSE a.at_ms END,
        last_attempt_ms = a.at_ms, last_status_code = a.code, last_error = a.error,
        lease_owner = NULL, lease_token = NULL, lease_until_ms = NULL
    FROM args a
    WHERE d.id = a.id AND d.lease_token = a.token AND d.status = 'pending'
    RETURNING d.id, d.subscription
), logged AS (
    INSERT INTO attempts (delivery_id, started_ms, duration_ms, status_code, error, response_body)
    SELECT done.id, a.at_ms, a.duration_ms, a.code, a.error, a.body FROM done, args a
), queued AS (
    UPDATE queues q SET next_due_ms = least(
        (SELECT min(d.due_ms) FROM deliveries d, args a
         WHERE d.subscription = q.subscription AND d.status = 'pending' AND d.id <> a.id),
        (SELECT a.next_ms FROM args a WHERE a.status = 'pending')
    )
    WHERE q.subscription IN (SELECT subscription FROM done)
)
SELECT count(*) FROM done
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


async def finish(db: Executor, delivery_id: int, lease_token: int, outcome: Outcome) -> bool:
    """Record an attempt under lease_token; False (nothing changed) if the lease was lost."""
    params: Sequence[Any] = (
        delivery_id,
        lease_token,
        outcome.status,
        outcome.schedule_pos,
        outcome.next_attempt_ms,
        outcome.started_ms,
        outcome.status_code,
        outcome.error,
        outcome.duration_ms,
        outcome.response_body,
    )
    return bool(await db.fetchval(_FINISH, *params))
