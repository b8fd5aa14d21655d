"""The ingest hand-over and the drain's vacuum on PostgreSQL (issue 12), beside other processes.

The hand-over's contract (room, ingest order, never overtaking an older due row) is in
tests/test_store_contract.py; here is what only several processes on one database show:
per_destination held with another owner's leases, and an origin another process is claiming.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from pusherd.store.postgres.store import PostgresStore, open_postgres
from tests.test_store_contract import (
    LEASE_MS,
    Taking,
    claim,
    ingest,
    record,
    subscribe,
)

ORIGIN = "https://a.example:443"


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresStore]:
    """A store whose processes may have 2 requests in flight per destination, all together."""
    s = await open_postgres(pg_url, background=False, per_destination=2)
    try:
        yield s
    finally:
        await s.close()


async def test_another_owners_leases_keep_the_hand_over_within_per_destination(
    store: PostgresStore,
) -> None:
    await subscribe(store)
    await ingest(store, 1)
    (theirs,) = (await claim(store, owner="other")).deliveries  # another process's attempt
    taker = Taking({ORIGIN: 10})
    await store.take_fresh(taker)
    mids = await ingest(store, 3)
    # 2 leases on the origin in all: theirs and one handed over; the other two wait, due.
    (handed,) = taker.handed
    assert [d.message_id for d in handed] == mids[:1]
    assert (await store.due_at() or 2**62) <= int(time.time() * 1000)
    counts = await store.delivery_counts([theirs.subscription])
    assert counts.pending == 4
    # Another process may take none of them meanwhile; once its attempt is recorded, the taker
    # is alone on the origin and claims them, in order.
    assert (await claim(store, owner="third")).deliveries == []
    await store.record_attempt(theirs, "other", record(True), "delivered", None, 10**9)
    got = (await claim(store, owner=taker.offer.owner)).deliveries
    assert [d.message_id for d in got] == mids[1:]


async def test_no_hand_over_to_an_origin_another_process_is_claiming(
    store: PostgresStore, pg_url: str
) -> None:
    await subscribe(store)
    taker = Taking({ORIGIN: 10})
    await store.take_fresh(taker)
    other = await asyncpg.connect(pg_url)
    try:
        # Another process's claim holds the origin's advisory lock (as pusherd_claim takes it).
        await other.execute("BEGIN")
        await other.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('pusherd.origin:' || $1, 0))", ORIGIN
        )
        first = await ingest(store, 1)
        assert taker.handed == []
        await other.execute("ROLLBACK")
    finally:
        await other.close()
    # Its row is due and claimable; the next one waits behind it (no overtaking) ...
    await ingest(store, 1)
    assert taker.handed == []
    got = (await claim(store, owner=taker.offer.owner, lease_ms=LEASE_MS)).deliveries
    assert [d.message_id for d in got][:1] == first  # per_destination 2: both, in order
    # ... and once nothing older is due, fresh rows are handed over again.
    later = await ingest(store, 1)
    assert [d.message_id for d in taker.handed[0]] == later


async def test_the_recording_process_vacuums_behind_a_drain(store: PostgresStore) -> None:
    store.vacuum.every = 4
    await subscribe(store)
    await ingest(store, 4)
    rows = (await claim(store, owner="me")).deliveries
    assert len(rows) == 4
    await asyncio.gather(
        *(store.record_attempt(d, "me", record(True), "delivered", None, 10**9) for d in rows)
    )
    deadline = time.monotonic() + 30
    while store.vacuum.runs < 1:  # a vacuum of a small table: well within the deadline
        assert time.monotonic() < deadline, "no vacuum after 4 finished deliveries"
        await asyncio.sleep(0.01)
    vacuums = await store.pool.fetchval(
        "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'deliveries'"
    )
    assert vacuums >= 1


async def test_a_claim_committed_while_an_ingest_waits_is_counted_by_its_hand_over(
    store: PostgresStore, pg_url: str
) -> None:
    # Another process's claim leases the subscription's two due rows (per_destination is 2)
    # while holding the origin's lock and the queue row. An ingest arriving meanwhile waits for
    # the queue row; once the claim commits, the hand-over must count those two leases, not
    # the ones its statement's snapshot (taken before the commit) saw: else a third attempt.
    sub = await subscribe(store)
    await ingest(store, 2)
    taker = Taking({ORIGIN: 10})
    await store.take_fresh(taker)
    other = await asyncpg.connect(pg_url)
    try:
        await other.execute("BEGIN")
        await other.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('pusherd.origin:' || $1, 0))", ORIGIN
        )
        await other.execute("SELECT 1 FROM queues WHERE subscription = $1 FOR UPDATE", sub.uuid)
        until = int(time.time() * 1000) + 60_000
        await other.execute(
            "UPDATE deliveries SET lease_owner = 'other', lease_token = 1, lease_until_ms = $2"
            " WHERE subscription = $1",
            sub.uuid,
            until,
        )
        await other.execute(
            "UPDATE queues SET next_due_ms = $2 WHERE subscription = $1", sub.uuid, until
        )
        ingesting = asyncio.ensure_future(ingest(store, 1))
        deadline = time.monotonic() + 10
        while not await other.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        ):
            assert time.monotonic() < deadline, "the ingest never waited for the queue row"
            await asyncio.sleep(0.01)
        await other.execute("COMMIT")
        await ingesting
    finally:
        await other.close()
    assert taker.handed == []  # 2 live leases of another owner: no room on the origin
    live = await store.pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE lease_owner IS NOT NULL AND status = 'pending'"
    )
    assert live == 2
