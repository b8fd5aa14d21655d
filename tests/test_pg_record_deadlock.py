"""Issue 12 (found in review): a record that changes a subscription's status locked its queue
row out of order, and deadlocked with an ingest fanning out to two subscriptions.

Since the record path locks queue rows only for retries (finish_many's `retried`), a batch with
a retry of S_high and a 410 (or a final failure, or a FAILING subscription's success) of S_low
locks queues(S_high) in finish_many, then queues(S_low) in _store_status -> sync_queue. Every
ingest locks its queue rows in subscription order: S_low, then S_high. The trigger below only
holds the record between two of its own statements (the UPDATE of subscriptions and the
sync_queue that follows it) so that the interleaving is deterministic; in production the window
is the round trips between finish_many and sync_queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from pusherd.store.postgres.store import PostgresStore, open_postgres
from tests.test_store_contract import claim, ingest, record, subscribe

GATE = 424242


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresStore]:
    s = await open_postgres(pg_url, background=False)
    try:
        yield s
    finally:
        await s.close()


async def _waiting(conn: asyncpg.Connection, n: int) -> None:
    for _ in range(500):
        got = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND pid <> pg_backend_pid()"
        )
        if got >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {n} backends waiting on a lock")


async def test_record_of_a_status_change_beside_a_retry_does_not_deadlock_an_ingest(
    store: PostgresStore, pg_url: str
) -> None:
    a = await subscribe(store, "https://a.example/hook")
    b = await subscribe(store, "https://b.example/hook")
    low, high = sorted([a.uuid, b.uuid])
    await ingest(store, 1)
    got = {d.subscription: d for d in (await claim(store, owner="me")).deliveries}
    assert set(got) == {low, high}

    gate = await asyncpg.connect(pg_url)
    try:
        await gate.execute(
            "CREATE FUNCTION review_gate() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN PERFORM pg_advisory_xact_lock({GATE}); RETURN NEW; END $$;"
            " CREATE TRIGGER review_gate BEFORE UPDATE OF status ON subscriptions"
            " FOR EACH ROW EXECUTE FUNCTION review_gate();"
        )
        await gate.execute(f"SELECT pg_advisory_lock({GATE})")
        # One group of records: S_low answered 410 (-> DISABLED), S_high is retried.
        rec = asyncio.gather(
            store.record_attempt(got[low], "me", record(False), "gone", None, 10**9),
            store.record_attempt(got[high], "me", record(False), "retry", None, 10**9),
        )
        await _waiting(gate, 1)  # the record holds queues(S_high), waits at the gate
        ing = asyncio.ensure_future(ingest(store, 1))
        await _waiting(gate, 2)  # the ingest holds queues(S_low), waits for queues(S_high)
        await gate.execute(f"SELECT pg_advisory_unlock({GATE})")
        results = await asyncio.gather(rec, ing, return_exceptions=True)
    finally:
        await gate.close()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"deadlock between a record and an ingest: {errors!r}"
