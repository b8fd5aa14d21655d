"""Subscription changes racing ingests and records on other connections (issue 12): the queue
row stays right and no transaction is aborted by a deadlock."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from pusherd.store.postgres.store import PostgresStore, open_postgres
from pusherd.store.types import (
    AttemptRecord,
    ClaimedDelivery,
    NewEvent,
    NewSubscription,
    SubscriptionChanges,
)
from tests.test_pg_redue import wait_until_blocked

ORG = "5a0b9c1e-1d2f-4a3b-8c4d-111111111111"
OLD, NEW = "https://old.example:443", "https://new.example:443"


def everything(*_: object) -> bool:
    return True


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresStore]:
    s = await open_postgres(pg_url)
    try:
        yield s
    finally:
        await s.close()


async def subscription(store: PostgresStore) -> str:
    sub = NewSubscription(
        str(uuid.uuid4()), ORG, "WEBHOOK", (), ("READ:PRODUCT",), OLD + "/hook", None, "k"
    )
    await store.create_subscription(sub, None)
    return sub.uuid


async def ingest_uncommitted(conn: asyncpg.Connection, sub: str, origin: str) -> None:
    """What an ingest with a cached fan-out target writes, in conn's open transaction: an event,
    its delivery due now (to the origin it knew), and the queue marked due, locked till commit."""
    now = int(time.time() * 1000)
    seq = await conn.fetchval(
        "INSERT INTO events (uuid, organization, event_name, message_id, payload, timestamp,"
        " created_ms) VALUES (gen_random_uuid()::text, $1, 'ProductCreated', 'racing', '{}',"
        " 'ts', $2) RETURNING seq",
        ORG,
        now,
    )
    await conn.execute(
        "INSERT INTO deliveries (event_seq, subscription, origin, status, due_ms, created_ms)"
        " VALUES ($1, $2, $3, 'pending', $4, $4)",
        seq,
        sub,
        origin,
        now,
    )
    await conn.execute(
        "UPDATE queues SET next_due_ms = least(next_due_ms, $2) WHERE subscription = $1", sub, now
    )


@pytest.mark.parametrize(
    "changes",
    [
        SubscriptionChanges(destination=NEW + "/hook"),
        SubscriptionChanges(event_names=("ProductCreated",)),
        SubscriptionChanges(status="ACTIVE", contact_email="ops@example.com"),
    ],
    ids=["destination", "event_names", "status"],
)
async def test_an_update_racing_an_ingest_leaves_the_queue_due(
    store: PostgresStore, pg_url: str, changes: SubscriptionChanges
) -> None:
    sub = await subscription(store)
    ingest = await asyncpg.connect(pg_url)
    try:
        await ingest.execute("BEGIN")
        await ingest_uncommitted(ingest, sub, OLD)
        update = asyncio.create_task(store.update_subscription(ORG, sub, changes))
        # The update has read the subscription and waits for the queue row the ingest holds.
        await wait_until_blocked(store.pool, ingest.get_server_pid())
        await ingest.execute("COMMIT")
        assert await asyncio.wait_for(update, 10) is not None
    finally:
        await ingest.close()
    db = store.pool
    origin = NEW if changes.destination else OLD
    (queue,) = await db.fetch("SELECT origin, next_due_ms FROM queues WHERE subscription = $1", sub)
    assert queue[1] is not None, "the new delivery waits for nothing"
    assert queue[0] == origin
    # The ingested row follows the new destination too (per_destination counts by origin).
    assert await db.fetchval("SELECT origin FROM deliveries WHERE subscription = $1", sub) == origin
    claimed = (await store.claim("me", {}, 10, 10, 60_000)).deliveries
    assert [d.message_id for d in claimed] == ["racing"]


async def claimed_one(store: PostgresStore, sub: str, mid: str) -> ClaimedDelivery:
    await store.ingest([NewEvent(ORG, "ProductCreated", "{}", mid, None)], everything)
    (delivery,) = [
        d for d in (await store.claim("me", {}, 10, 10, 60_000)).deliveries if d.message_id == mid
    ]
    return delivery


def ok() -> AttemptRecord:
    return AttemptRecord(int(time.time() * 1000), 1.0, 200, None, "")


async def test_a_destination_change_queued_before_a_record_does_not_deadlock(
    store: PostgresStore, pg_url: str
) -> None:
    """The update asks for the subscription first and the record right after (both wait on a
    third connection's lock): the update then gets the subscription, and the record must not
    hold the delivery row the update goes on to change."""
    sub = await subscription(store)
    delivery = await claimed_one(store, sub, "held")
    blocker = await asyncpg.connect(pg_url)
    try:
        await blocker.execute("BEGIN")
        await blocker.execute("SELECT 1 FROM subscriptions WHERE uuid = $1 FOR UPDATE", sub)
        change = SubscriptionChanges(destination=NEW + "/hook")
        update = asyncio.create_task(store.update_subscription(ORG, sub, change))
        await wait_until_blocked(store.pool, blocker.get_server_pid())
        record = asyncio.create_task(
            store.record_attempt(delivery, "me", ok(), "delivered", None, 10**9)
        )
        deadline = time.monotonic() + 10
        while (
            await store.pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            )
            < 2
        ):
            assert time.monotonic() < deadline, "the record never waited"
            await asyncio.sleep(0.01)
        await blocker.execute("ROLLBACK")
        # A deadlock would abort one of them (asyncpg.DeadlockDetectedError).
        await asyncio.wait_for(asyncio.gather(update, record), 10)
    finally:
        await blocker.close()
    counts = await store.delivery_counts([sub])
    assert (counts.delivered, counts.pending) == (1, 0)


async def test_destination_changes_and_records_run_together_without_error(
    store: PostgresStore,
) -> None:
    sub = await subscription(store)
    for i in range(25):
        delivery = await claimed_one(store, sub, f"m-{i}")
        change = SubscriptionChanges(destination=(NEW, OLD)[i % 2] + "/hook")
        await asyncio.wait_for(
            asyncio.gather(
                store.update_subscription(ORG, sub, change),
                store.record_attempt(delivery, "me", ok(), "delivered", None, 10**9),
            ),
            10,
        )
    counts = await store.delivery_counts([sub])
    assert (counts.delivered, counts.pending) == (25, 0)
