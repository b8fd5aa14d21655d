"""Issue 12 (review, dbclock.py): a hand-back puts a row back at least(created_ms, now), but
created_ms is written on the ingesting process's own clock while `now` and every other due time
are on the database's clock. A process whose clock runs ahead (what dbclock.py is for) gets its
handed-back rows queued behind rows ingested after them: per-subscription order is lost on a
graceful stop or any release, with nothing failing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import pusherd.store.postgres.ingest as ingest_mod
from pusherd.store.postgres.store import PostgresStore, open_postgres
from tests.test_store_contract import claim, ingest, subscribe

AHEAD_MS = 10 * 60_000  # the ingesting machine's clock runs 10 minutes ahead of the database's


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresStore]:
    s = await open_postgres(pg_url, background=False)
    try:
        yield s
    finally:
        await s.close()


async def test_a_released_row_keeps_its_place_when_its_ingester_clock_runs_ahead(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await subscribe(store)
    real = ingest_mod.now_ms
    monkeypatch.setattr(ingest_mod, "now_ms", lambda: real() + AHEAD_MS)
    first = await ingest(store, 1)  # through the process whose clock runs ahead
    monkeypatch.setattr(ingest_mod, "now_ms", real)
    (d,) = (await claim(store, owner="fast")).deliveries
    assert d.message_id == first[0]
    second = await ingest(store, 1)  # through a process on time, while the first is leased
    await store.release("fast", [d.id])  # e.g. the fast process stops gracefully
    got = (await claim(store, owner="other", default_room=1, budget=1)).deliveries
    assert [x.message_id for x in got] == first, f"ingest order lost: {second} went first"
