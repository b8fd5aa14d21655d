"""Group-committed ingest on a real server: one statement per group, idempotent across
processes, queues marked due, one wake-up per group."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from pusherd.store import StoreError
from pusherd.store.postgres.ingest import EventIn, GroupWriter
from pusherd.store.postgres.migrate import migrate_url
from pusherd.store.postgres.pool import Pool
from tests.pg import PgServer, launch_or_skip

ORG = "5a0b9c1e-1d2f-4a3b-8c4d-111111111111"
SUB = "11111111-1111-4111-8111-111111111111"
ORIGIN = "https://shop.example:443"


@pytest.fixture
async def pool(pg_url: str) -> AsyncIterator[Pool]:
    await migrate_url(pg_url)
    p = Pool(pg_url, max_size=4)
    await p.open()
    await p.execute(
        "INSERT INTO queues (subscription, origin, next_due_ms) VALUES ($1, $2, NULL)", SUB, ORIGIN
    )
    yield p
    await p.close()


def event(mid: str | None = None, subs: int = 1) -> EventIn:
    return EventIn(ORG, "ProductCreated", '{"n": 1}', mid, None, [(SUB, ORIGIN)] * subs)


async def test_concurrent_ingests_share_one_statement(pool: Pool) -> None:
    writer = GroupWriter(pool)
    results = await asyncio.gather(*(writer.write([event(f"m{i}")]) for i in range(50)))
    assert writer.groups_written == 1  # fifty requests, one round trip, one commit
    assert [r[0].message_id for r in results] == [f"m{i}" for i in range(50)]
    assert all(not r[0].duplicate and len(r[0].delivery_ids) == 1 for r in results)
    # Stored in arrival order, each with its delivery, and the subscription's queue is due.
    rows = await pool.fetch(
        "SELECT e.message_id, e.uuid, d.id FROM events e JOIN deliveries d ON d.event_seq = e.seq"
        " ORDER BY e.seq"
    )
    assert [r[0] for r in rows] == [f"m{i}" for i in range(50)]
    assert [(r[1], r[2]) for r in rows] == [
        (r[0].message_uuid, r[0].delivery_ids[0]) for r in results
    ]
    assert await pool.fetchval("SELECT next_due_ms FROM queues") is not None


async def test_message_ids_are_idempotent_within_a_group_and_across_processes(
    pool: Pool, pg_url: str
) -> None:
    other_pool = Pool(pg_url, max_size=4)
    await other_pool.open()
    try:
        one, other = GroupWriter(pool), GroupWriter(other_pool)  # two processes
        [first, again] = await one.write([event("same"), event("same", subs=3)])
        assert not first.duplicate and again.duplicate
        assert again.message_uuid == first.message_uuid and again.delivery_count == 1
        # Both processes ingest the same messageIds at the same moment.
        mids = [f"x{i}" for i in range(20)]
        a, b = await asyncio.gather(
            one.write([event(m) for m in mids]), other.write([event(m) for m in mids])
        )
        for ra, rb in zip(a, b, strict=True):
            assert ra.message_uuid == rb.message_uuid
            assert [ra.duplicate, rb.duplicate].count(True) == 1
        later = await other.write([event("same")])
        assert later[0].duplicate and later[0].message_uuid == first.message_uuid
        assert await pool.fetchval("SELECT count(*) FROM events") == 21
        assert await pool.fetchval("SELECT count(*) FROM deliveries") == 21
    finally:
        await other_pool.close()


async def test_generated_message_ids_and_fan_out(pool: Pool) -> None:
    writer = GroupWriter(pool)
    [a, b] = await writer.write([event(None, subs=2), event(None, subs=0)])
    assert a.message_id != b.message_id and len(a.message_id) == 36
    assert len(a.delivery_ids) == 2 and b.delivery_ids == ()


async def test_one_wake_up_per_group_with_new_deliveries(pool: Pool, pg_url: str) -> None:
    wakes: list[str] = []
    listener = await asyncpg.connect(pg_url)
    await listener.add_listener("pusherd_wake", lambda *args: wakes.append(args[3]))
    try:
        writer = GroupWriter(pool)
        await asyncio.gather(*(writer.write([event(f"w{i}")]) for i in range(30)))
        await writer.write([event("w0")])  # only a duplicate: nothing new to deliver
        await pool.execute("SELECT pg_notify('pusherd_wake', 'marker')")
        deadline = time.monotonic() + 10
        while "marker" not in wakes:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert wakes == ["", "marker"]
    finally:
        await listener.close()


async def test_every_request_of_a_failed_group_gets_the_error(pool: Pool) -> None:
    writer = GroupWriter(pool)
    await pool.close()  # the database is out of reach
    results = await asyncio.gather(
        *(writer.write([event(f"f{i}")]) for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, StoreError) for r in results)


@pytest.fixture
def own_server() -> Iterator[PgServer]:
    """A server of this test's own, to restart without disturbing the others."""
    server = launch_or_skip()
    yield server
    server.cleanup()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_a_database_restart_mid_ingest_loses_nothing_acknowledged(
    own_server: PgServer, mode: str
) -> None:
    url = own_server.url()
    await migrate_url(url)
    pool = Pool(url, max_size=4)
    await pool.open()
    writer = GroupWriter(pool)
    acknowledged: list[str] = []
    refused: list[BaseException] = []
    stop = asyncio.Event()

    async def producer(n: int) -> None:
        i = 0
        while not stop.is_set():
            mid = f"p{n}-{i}"
            i += 1
            try:
                [out] = await writer.write([event(mid)])
            except StoreError as exc:  # what ingest turns into 503
                refused.append(exc)
                await asyncio.sleep(0.01)  # a producer's retry pause, not synchronisation
                continue
            assert out.message_id == mid
            acknowledged.append(mid)

    producers = [asyncio.create_task(producer(n)) for n in range(16)]
    try:
        await until_count(acknowledged, 200)
        await asyncio.to_thread(own_server.restart, mode)
        after = len(acknowledged)
        await until_count(acknowledged, after + 200)  # ingest resumed by itself
    finally:
        stop.set()
        await asyncio.gather(*producers)
    assert refused  # the outage was seen, as StoreError only (anything else fails a producer)
    stored = {r[0] for r in await pool.fetch("SELECT message_id FROM events")}
    assert set(acknowledged) <= stored
    await pool.close()


async def until_count(items: list[str], n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(items) < n:
        assert time.monotonic() < deadline, f"only {len(items)} of {n}"
        await asyncio.sleep(0.01)
