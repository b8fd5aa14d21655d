"""Claiming across processes on a real server: due order, rooms, per_destination held by all
claimers together, fencing tokens, take-over of a dead owner's rows, and never waiting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from pusherd.store.postgres.claims import Claimed, Outcome, claim, finish, finish_many
from pusherd.store.postgres.migrate import migrate

ORG = "5a0b9c1e-1d2f-4a3b-8c4d-111111111111"
LEASE_MS = 30_000


@pytest.fixture
async def db(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=12)
    async with pool.acquire() as conn:
        await migrate(conn)
    yield pool
    await pool.close()


async def seed(db: asyncpg.Pool, sub: str, origin: str, due: list[int]) -> list[int]:
    """A subscription to origin with one pending delivery per due time; their ids."""
    await db.execute(
        "INSERT INTO subscriptions (uuid, organization, transport, event_names, scopes,"
        " destination, status, signing_key, created_ms, updated_ms)"
        " VALUES ($1, $2, 'WEBHOOK', '[]', '[]', $3 || '/hook', 'ACTIVE', 'key', 0, 0)"
        " ON CONFLICT DO NOTHING",
        sub,
        ORG,
        origin,
    )
    ids = []
    for t in due:
        seq = await db.fetchval(
            "INSERT INTO events (uuid, organization, event_name, message_id, payload, timestamp,"
            " created_ms) VALUES (gen_random_uuid()::text, $1, 'ProductCreated',"
            " gen_random_uuid()::text, '{}', 'ts', 0) RETURNING seq",
            ORG,
        )
        ids.append(
            await db.fetchval(
                "INSERT INTO deliveries (event_seq, subscription, origin, status, due_ms,"
                " created_ms) VALUES ($1, $2, $3, 'pending', $4, 0) RETURNING id",
                seq,
                sub,
                origin,
                t,
            )
        )
    await db.execute(
        "INSERT INTO queues (subscription, origin, next_due_ms) VALUES ($1, $2, $3)"
        " ON CONFLICT (subscription) DO UPDATE SET next_due_ms ="
        " least(queues.next_due_ms, excluded.next_due_ms)",
        sub,
        origin,
        min(due),
    )
    return ids


async def take(
    db: asyncpg.Pool | asyncpg.Connection,
    owner: str = "p1",
    alone_total: int | None = None,
    **kw: int,
) -> Claimed:
    args = {"default_room": 100, "budget": 100, "per_destination": 100, "now_ms": 1_000}
    args.update(kw)
    return await claim(
        db,
        owner,
        {},
        args["default_room"],
        args["budget"],
        args["per_destination"],
        args["now_ms"],
        LEASE_MS,
        alone_total=alone_total,
    )


async def live_leases(db: asyncpg.Pool, origin: str, now_ms: int = 1_000) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM deliveries WHERE origin = $1 AND status = 'pending'"
            " AND lease_owner IS NOT NULL AND lease_until_ms > $2",
            origin,
            now_ms,
        )
    )


def delivered(now_ms: int) -> Outcome:
    return Outcome("delivered", 0, None, now_ms, 1.0, 200, None)


async def test_claims_the_oldest_due_first_within_the_budget(db: asyncpg.Pool) -> None:
    a = await seed(db, "sub-a", "https://a:443", [30, 10, 2_000])  # the last is not due yet
    b = await seed(db, "sub-b", "https://b:443", [20])
    first = await take(db, budget=2)
    assert sorted(r["id"] for r in first.rows) == sorted([a[1], b[0]])  # due at 10 and 20
    assert first.more  # the budget ran out with work still due
    assert first.rows[0]["payload"] == "{}" and first.rows[0]["destination"].endswith("/hook")
    second = await take(db, budget=10)
    assert [r["id"] for r in second.rows] == [a[0]]
    assert not second.more
    assert second.next_due_ms == 2_000  # the row not due yet; leases end later
    tokens = [r["lease_token"] for r in first.rows + second.rows]
    assert len(set(tokens)) == 3  # a fencing token per claimed row
    assert (await take(db)).rows == []


async def test_an_origin_gets_no_more_than_its_room(db: asyncpg.Pool) -> None:
    await seed(db, "sub-a", "https://a:443", [1, 2, 3, 4])
    await seed(db, "sub-b", "https://b:443", [1, 2, 3, 4])
    got = await claim(db, "p1", {"https://a:443": 1, "https://b:443": 0}, 2, 100, 100, 1_000, 1)
    assert [r["subscription"] for r in got.rows] == ["sub-a"]


async def test_a_sole_holder_keeps_rows_ready_but_shares_within_per_destination(
    db: asyncpg.Pool,
) -> None:
    # Issue 12: alone on an origin, a process leases rows ready behind its attempts (its own
    # per_destination limits those); beside another holder, all leases stay within the limit.
    origin = "https://one:443"
    await seed(db, "sub-a", origin, list(range(1, 21)))
    first = await take(db, "p1", alone_total=8, per_destination=2)
    assert len(first.rows) == 8
    assert (await take(db, "p2", alone_total=8, per_destination=2)).rows == []
    for row in first.rows[:7]:
        assert await finish(db, "p1", row["id"], row["lease_token"], delivered(1_000))
    second = await take(db, "p2", alone_total=8, per_destination=2)
    assert len(second.rows) == 1  # p1 still holds one: two in all
    assert (await take(db, "p1", alone_total=8, per_destination=2)).rows == []
    assert await live_leases(db, origin) == 2
    # Without alone_total (other callers), per_destination caps even a sole holder.
    assert await finish(db, "p1", first.rows[7]["id"], first.rows[7]["lease_token"], delivered(1))
    row = second.rows[0]
    assert await finish(db, "p2", row["id"], row["lease_token"], delivered(1_000))
    assert len((await take(db, "p3", per_destination=2)).rows) == 2


async def test_per_destination_holds_across_concurrent_claimers(db: asyncpg.Pool) -> None:
    # Six processes claim for one origin at once, each with room to spare: together they hold
    # at most per_destination live leases, round after round, as attempts finish.
    origin = "https://shared:443"
    for i in range(5):
        await seed(db, f"sub-{i}", origin, list(range(1, 13)))
    claimed: list[asyncpg.Record] = []
    for now in range(1_000, 1_020):
        got = await asyncio.gather(
            *(take(db, f"p{k}", per_destination=3, now_ms=now) for k in range(6))
        )
        claimed += [r for g in got for r in g.rows]
        assert await live_leases(db, origin, now) <= 3
        held = [(f"p{k}", r) for k, g in enumerate(got) for r in g.rows]
        for owner, row in held[:2]:  # some attempts finish
            assert await finish(db, owner, row["id"], row["lease_token"], delivered(now))
    assert len(claimed) >= 20  # the work did go on
    assert len({r["id"] for r in claimed}) == len(claimed)  # no row leased twice at once


async def test_a_lost_lease_is_taken_over_and_the_old_owner_cannot_record(
    db: asyncpg.Pool,
) -> None:
    [row_id] = await seed(db, "sub-a", "https://a:443", [1])
    old = (await take(db, "dead", now_ms=1_000)).rows[0]
    # Within the lease nobody else gets it; once it has run out, another process does.
    assert (await take(db, "alive", now_ms=1_000 + LEASE_MS - 1)).rows == []
    new = (await take(db, "alive", now_ms=1_000 + LEASE_MS)).rows[0]
    assert new["id"] == row_id and new["lease_token"] != old["lease_token"]
    # The old owner comes back (paused, partitioned) and reports a failure: nothing changes.
    late = Outcome("failed", 0, None, 50_000, 1.0, 500, "late")
    assert not await finish(db, "dead", row_id, old["lease_token"], late)
    # Nor with the new lease's token (should a token ever be handed out twice).
    assert not await finish(db, "dead", row_id, new["lease_token"], late)
    state = await db.fetchrow("SELECT status, lease_owner, attempts FROM deliveries")
    assert tuple(state) == ("pending", "alive", 0)
    assert await db.fetchval("SELECT count(*) FROM attempts") == 0
    assert await finish(db, "alive", row_id, new["lease_token"], delivered(40_000))
    state = await db.fetchrow("SELECT status, lease_owner, attempts FROM deliveries")
    assert tuple(state) == ("delivered", None, 1)
    # The record leaves the queue at the lease's end (it takes no queue lock for a finished
    # row); a claim then finds nothing and clears it.
    until = 1_000 + 2 * LEASE_MS
    assert await db.fetchval("SELECT next_due_ms FROM queues") == until
    assert (await take(db, "alive", now_ms=until)).rows == []
    assert await db.fetchval("SELECT next_due_ms FROM queues") is None


async def test_a_retry_keeps_the_queue_due_at_its_next_attempt(db: asyncpg.Pool) -> None:
    await seed(db, "sub-a", "https://a:443", [1])
    row = (await take(db)).rows[0]
    retry = Outcome("pending", 1, 5_000, 1_000, 1.0, 503, None)
    assert await finish(db, "p1", row["id"], row["lease_token"], retry)
    assert await db.fetchval("SELECT next_due_ms FROM queues") == 5_000
    assert (await take(db, now_ms=4_999)).rows == []
    assert [r["id"] for r in (await take(db, now_ms=5_000)).rows] == [row["id"]]


async def test_a_claim_never_waits_for_another_claim(db: asyncpg.Pool, pg_url: str) -> None:
    await seed(db, "sub-a", "https://a:443", [1, 2])
    await seed(db, "sub-b", "https://b:443", [1, 2])
    other = await asyncpg.connect(pg_url)
    mine = await asyncpg.connect(pg_url)
    try:
        # Another process is in the middle of admitting to origin a (its advisory lock) and of
        # claiming sub-b (its queue row and deliveries locked).
        tx = other.transaction()
        await tx.start()
        await other.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('pusherd.origin:' || $1, 0))",
            "https://a:443",
        )
        await other.execute("SELECT 1 FROM queues WHERE subscription = 'sub-b' FOR UPDATE")
        await mine.execute("SET lock_timeout = '100ms'")  # any wait would fail the claim
        got = await take(mine)
        assert got.rows == [] and got.more  # both skipped, and said so
        await tx.rollback()
        got = await take(mine)
        assert len(got.rows) == 4
    finally:
        await other.close()
        await mine.close()


async def test_many_outcomes_in_one_statement_each_fenced(db: asyncpg.Pool) -> None:
    a = await seed(db, "sub-a", "https://a:443", [1, 2, 3])
    b = await seed(db, "sub-b", "https://b:443", [1])
    rows = {r["id"]: r["lease_token"] for r in (await take(db)).rows}
    assert set(rows) == {*a, *b}
    retry = Outcome("pending", 1, 7_000, 1_000, 1.0, 503, None)
    done = await finish_many(
        db,
        "p1",
        [
            (a[0], rows[a[0]], delivered(1_000)),
            (a[1], rows[a[1]], retry),
            (a[2], rows[a[2]] + 1_000, delivered(1_000)),  # a token that is not the lease's
            (b[0], rows[b[0]], Outcome("failed", 0, None, 1_000, 1.0, 410, None)),
        ],
    )
    assert done == {a[0], a[1], b[0]}
    states = await db.fetch("SELECT id, status, lease_owner IS NULL FROM deliveries ORDER BY id")
    assert [tuple(r) for r in states] == [
        (a[0], "delivered", True),
        (a[1], "pending", True),
        (a[2], "pending", False),  # still leased: its holder has not reported yet
        (b[0], "failed", True),
    ]
    assert await db.fetchval("SELECT count(*) FROM attempts") == 3
    queues = dict(await db.fetch("SELECT subscription, next_due_ms FROM queues"))
    # sub-a: the retry at 7,000 comes before the leased row's lease end (31,000); sub-b, with
    # no retry, is left at its lease's end (no queue lock for finished rows).
    assert queues == {"sub-a": 7_000, "sub-b": 31_000}


async def test_without_a_time_the_database_clock_decides(db: asyncpg.Pool) -> None:
    [row_id] = await seed(db, "sub-a", "https://a:443", [1])
    before = int(await db.fetchval("SELECT extract(epoch FROM clock_timestamp()) * 1000"))
    got = await claim(db, "p1", {}, 8, 8, 8, None, LEASE_MS)
    after = int(await db.fetchval("SELECT extract(epoch FROM clock_timestamp()) * 1000"))
    assert [r["id"] for r in got.rows] == [row_id]
    until = await db.fetchval("SELECT lease_until_ms FROM deliveries")
    assert before + LEASE_MS <= until <= after + LEASE_MS
