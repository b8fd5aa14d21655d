"""An event ingested while another delivery of its subscription is being recorded stays due
(issue 12): the record's statement must not overwrite the queue's due time with one computed
from a snapshot taken before the ingest committed, or the new delivery waits for nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from pusherd.store.postgres.claims import Outcome, claim, finish
from pusherd.store.postgres.directory import refresh_queues
from pusherd.store.postgres.ingest import EventIn, GroupWriter
from pusherd.store.postgres.migrate import migrate_url
from pusherd.store.postgres.pool import Pool
from tests.conftest import Receiver
from tests.test_pg_cli import config_with_url
from tests.test_pg_serve import admin_auth, serving, subscribe

ORG = "5a0b9c1e-1d2f-4a3b-8c4d-111111111111"
SUB = "11111111-1111-4111-8111-111111111111"
ORIGIN = "https://shop.example:443"
LEASE_MS = 30_000


@pytest.fixture
async def pool(pg_url: str) -> AsyncIterator[Pool]:
    await migrate_url(pg_url)
    p = Pool(pg_url, max_size=4)
    await p.open()
    await p.execute(
        "INSERT INTO subscriptions (uuid, organization, transport, event_names, scopes,"
        " destination, status, signing_key, created_ms, updated_ms)"
        " VALUES ($1, $2, 'WEBHOOK', '[]', '[]', $3 || '/hook', 'ACTIVE', 'key', 0, 0)",
        SUB,
        ORG,
        ORIGIN,
    )
    await p.execute(
        "INSERT INTO queues (subscription, origin, next_due_ms) VALUES ($1, $2, NULL)", SUB, ORIGIN
    )
    yield p
    await p.close()


def event(mid: str) -> EventIn:
    return EventIn(ORG, "ProductCreated", '{"n": 1}', mid, None, [(SUB, ORIGIN)])


async def claim_all(pool: Pool) -> list[asyncpg.Record]:
    """Claim by the database's clock, as the dispatcher does."""
    return (await claim(pool, "p1", {}, 100, 100, 100, None, LEASE_MS)).rows


async def wait_until_blocked(pool: Pool, pid: int) -> None:
    """Until some backend other than pid waits for a lock (the statement under test)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        n = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> $1",
            pid,
        )
        if n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the statement never waited for the lock")


async def ingest_while_blocked(
    pool: Pool, blocker: asyncpg.Connection, delivery_id: int, statement: asyncio.Task[object]
) -> None:
    """With the statement under test blocked on delivery_id's row (its snapshot taken, the queue
    not yet locked), ingest a new event for the same subscription, then let it go on."""
    await wait_until_blocked(pool, blocker.get_server_pid())
    await GroupWriter(pool).write([event("new")])  # committed: the queue is due now
    await blocker.execute("ROLLBACK")
    await asyncio.wait_for(statement, 10)


async def test_an_event_ingested_during_a_record_stays_due(pool: Pool, pg_url: str) -> None:
    (first,) = await GroupWriter(pool).write([event("test-message")])
    (row,) = await claim_all(pool)
    blocker = await asyncpg.connect(pg_url)
    try:
        await blocker.execute("BEGIN")
        await blocker.execute("SELECT 1 FROM deliveries WHERE id = $1 FOR UPDATE", row["id"])
        now = int(time.time() * 1000)
        done = Outcome("delivered", 0, None, now, 1.0, 200, None)
        record = asyncio.create_task(finish(pool, "p1", row["id"], row["lease_token"], done))
        await ingest_while_blocked(pool, blocker, row["id"], record)
        assert record.result()
    finally:
        await blocker.close()
    assert await pool.fetchval("SELECT next_due_ms FROM queues") is not None
    got = await claim_all(pool)
    assert [r["message_id"] for r in got] == ["new"]
    assert first.delivery_ids != (got[0]["id"],)


async def ingest_in(conn: asyncpg.Connection, mid: str) -> None:
    """What the ingest statement writes, in conn's open transaction: an event, its delivery due
    now, and its queue marked due (holding the queue row's lock until the commit)."""
    now = int(time.time() * 1000)
    seq = await conn.fetchval(
        "INSERT INTO events (uuid, organization, event_name, message_id, payload, timestamp,"
        " created_ms) VALUES (gen_random_uuid()::text, $1, 'ProductCreated', $2, '{}', 'ts', $3)"
        " RETURNING seq",
        ORG,
        mid,
        now,
    )
    await conn.execute(
        "INSERT INTO deliveries (event_seq, subscription, origin, status, due_ms, created_ms)"
        " VALUES ($1, $2, $3, 'pending', $4, $4)",
        seq,
        SUB,
        ORIGIN,
        now,
    )
    await conn.execute(
        "UPDATE queues SET next_due_ms = $2 WHERE subscription = $1"
        " AND (next_due_ms IS NULL OR next_due_ms > $2)",
        SUB,
        now,
    )


@pytest.mark.parametrize("writer", ["record", "refresh"])
async def test_an_event_committed_while_the_queue_is_awaited_stays_due(
    pool: Pool, pg_url: str, writer: str
) -> None:
    await GroupWriter(pool).write([event("test-message")])
    (row,) = await claim_all(pool)
    ingest = await asyncpg.connect(pg_url)
    try:
        # An ingest is in flight: its rows written, the queue row locked, not committed yet.
        await ingest.execute("BEGIN")
        await ingest_in(ingest, "new")
        if writer == "record":
            # A retry: the one outcome whose record locks the queue (it may come earlier).
            now = int(time.time() * 1000)
            done = Outcome("pending", 1, now + 60_000, now, 1.0, 503, None)
            task: asyncio.Task[object] = asyncio.create_task(
                finish(pool, "p1", row["id"], row["lease_token"], done)
            )
        else:

            async def release() -> None:
                # What the hand-backs (release, close_pending, ...) do: move rows, then refresh.
                async with pool.transaction() as conn:
                    await conn.execute(
                        "UPDATE deliveries SET lease_owner = NULL, lease_token = NULL,"
                        " lease_until_ms = NULL, status = 'cancelled' WHERE id = $1",
                        row["id"],
                    )
                    await refresh_queues(conn, [SUB])

            task = asyncio.create_task(release())
        # Its snapshot is taken (before the ingest's commit) and it waits for the queue row.
        await wait_until_blocked(pool, ingest.get_server_pid())
        await ingest.execute("COMMIT")
        await asyncio.wait_for(task, 10)
    finally:
        await ingest.close()
    assert await pool.fetchval("SELECT next_due_ms FROM queues") is not None
    got = await claim_all(pool)
    assert [r["message_id"] for r in got] == ["new"]


async def test_an_event_ingested_during_a_claim_stays_due(pool: Pool, pg_url: str) -> None:
    await GroupWriter(pool).write([event("test-message")])  # its queue is due
    claimer = await asyncpg.connect(pg_url)
    try:
        # A claim in flight: the queue row locked, the row leased and the queue's due time moved
        # to the lease's end, judged on a snapshot that cannot see the event ingested next.
        await claimer.execute("BEGIN")
        await claimer.execute("SELECT 1 FROM queues WHERE subscription = $1 FOR UPDATE", SUB)
        await claimer.execute(
            "UPDATE deliveries SET lease_owner = 'p1', lease_token = 1,"
            " lease_until_ms = $1, due_ms = $1",
            int(time.time() * 1000) + LEASE_MS,
        )
        await claimer.execute(
            "UPDATE queues SET next_due_ms = (SELECT min(due_ms) FROM deliveries"
            " WHERE status = 'pending')"
        )
        ingest = asyncio.create_task(GroupWriter(pool).write([event("new")]))
        deadline = time.monotonic() + 10
        while not ingest.done():  # it waits for the claim (or, wrongly, does not)
            n = await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            )
            if n:
                break
            assert time.monotonic() < deadline, "the ingest neither finished nor waited"
            await asyncio.sleep(0.01)
        await claimer.execute("COMMIT")
        await asyncio.wait_for(ingest, 10)
    finally:
        await claimer.close()
    got = await claim_all(pool)
    assert [r["message_id"] for r in got] == ["new"]


async def test_each_event_reaches_the_receiver_at_once_end_to_end(
    tmp_path: Path, pg_url: str, receiver: Receiver
) -> None:
    """Events ingested one at a time, each as soon as the one before arrived (so while its
    attempt is being recorded), each arrive within 2 s, not at the next event (issue 12)."""
    config = config_with_url(tmp_path / "one.toml", tmp_path / "one.sqlite3", pg_url)
    auth = await admin_auth(config)
    async with serving(config, config.read_text()) as svc, aiohttp.ClientSession() as session:
        await subscribe(session, svc.api, auth, receiver.url)
        await receiver.wait_for(1, timeout=5)  # the TestMessage
        for n in range(40):
            event = {
                "eventName": "ProductCreated",
                "organizationUuid": ORG,
                "payload": {"n": n},
                "messageId": f"m-{n}",
            }
            async with session.post(svc.ingest + "/events", json=event) as resp:
                assert resp.status == 202, await resp.text()
                assert (await resp.json())["deliveries"] == 1
            await receiver.wait_for(n + 1, "ProductCreated", timeout=2)
        assert await asyncio.to_thread(svc.stop) == 0
