"""Issue 12 (review, SPEC §8 per_destination across processes): a delivery written by a process
whose subscription cache still has the old destination (up to 1 s after a change made through
another process) keeps the old origin in deliveries.origin for good: sync_queue already ran, and
nothing moves it later. It is sent to the new destination (the claim and the hand-over read
subscriptions.destination) but its lease counts against the old origin, so other processes'
claims (and hand-overs) on the new origin do not see it and exceed per_destination.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from pusherd.store.postgres.copy import origin_of
from pusherd.store.postgres.store import PostgresStore, open_postgres
from pusherd.store.types import SubscriptionChanges
from tests.test_store_contract import claim, ingest, record, subscribe

A = "https://a.example/hook"
B = "https://b.example/hook"


@pytest.fixture
async def stores(pg_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    p1 = await open_postgres(pg_url, background=False, per_destination=1)
    p2 = await open_postgres(pg_url, background=False, per_destination=1)
    try:
        yield p1, p2
    finally:
        await p1.close()
        await p2.close()


async def test_a_row_written_with_a_stale_origin_still_counts_for_per_destination(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    p1, p2 = stores
    s = await subscribe(p1, A, org="org-s")
    await subscribe(p2, B, org="org-t")
    # p1 has S's targets cached (as every process does between changes); drain that row.
    await ingest(p1, 1, org="org-s")
    (warm,) = (await claim(p1, owner="w")).deliveries
    await p1.record_attempt(warm, "w", record(True), "delivered", None, 10**9)
    # S moves to b.example through p2; p1 hears of it within 1 s (here: not yet).
    await p2.update_subscription("org-s", s.uuid, SubscriptionChanges(destination=B))
    await ingest(p1, 1, org="org-s")  # X: S's row, written by p1 a moment after the change
    await asyncio.sleep(0.01)
    await ingest(p2, 1, org="org-t")  # Y: T's row on b.example
    one = (await claim(p1, owner="one", default_room=1, budget=1)).deliveries
    two = (await claim(p2, owner="two", default_room=1, budget=1)).deliveries
    sent_to_b = [d for d in one + two if origin_of(d.destination) == origin_of(B)]
    origins = await p1.pool.fetch(
        "SELECT d.origin, s.destination FROM deliveries d JOIN subscriptions s"
        " ON s.uuid = d.subscription WHERE d.status = 'pending'"
    )
    assert len(sent_to_b) <= 1, (
        f"per_destination 1 exceeded on b.example: {len(sent_to_b)} attempts at once;"
        f" pending rows (origin, destination): {[tuple(r) for r in origins]}"
    )
