"""An idle SQLite daemon's upkeep costs what is pending or written, not the number of
subscriptions: the minutely search for subscriptions to close, and the WAL checkpoints."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pusherd.store import Store, open_store
from pusherd.store.sqlite.db import Database
from pusherd.store.types import NewEvent, NewSubscription

ORG = "11111111-1111-4111-8111-111111111111"
SUBSCRIPTIONS = 3000
_ids = itertools.count()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Any]:
    s = await open_store(str(tmp_path / "pusherd.sqlite3"), background=False)
    try:
        yield s
    finally:
        await s.close()


async def subscribe_many(store: Store, n: int, org: str = ORG) -> list[str]:
    made = await asyncio.gather(
        *(
            store.create_subscription(
                NewSubscription(
                    str(uuid.uuid4()),
                    org,
                    "WEBHOOK",
                    (),
                    ("READ:PRODUCT",),
                    f"http://127.0.0.1:9/{i % 50}",
                    None,
                    "k" * 32,
                ),
                None,
            )
            for i in range(n)
        )
    )
    return [s.uuid for s in made]


async def ingest(store: Store, org: str, n: int) -> None:
    events = [NewEvent(org, "ProductCreated", "{}", f"m-{next(_ids)}", None) for _ in range(n)]
    await store.ingest(events, lambda *_: True)


async def reader_steps(store: Any, query: Any) -> tuple[Any, int]:
    """query()'s result and how many SQLite VM instructions its reads ran on the reader
    connection (counted in hundreds by a progress handler: deterministic, unlike a timing)."""
    ticks = 0

    def tick() -> int:
        nonlocal ticks
        ticks += 1
        return 0

    reader = store.db._reader
    await reader.set_progress_handler(tick, 100)
    try:
        result = await query()
    finally:
        await reader.set_progress_handler(None, 100)
    return result, ticks * 100


async def test_subscriptions_to_close_costs_what_is_pending_not_the_subscriptions(
    store: Any,
) -> None:
    await subscribe_many(store, SUBSCRIPTIONS)
    found, steps = await reader_steps(store, store.subscriptions_to_close)
    assert found == []
    # A scan of 3,000 subscriptions runs some 15,000 instructions; the walk of an empty
    # pending index a handful.
    assert steps < 1000

    # Pending rows of live, deleted and DISABLED subscriptions of three organizations.
    orgs = [str(uuid.uuid4()) for _ in range(3)]
    subs = [(await subscribe_many(store, 2, org)) for org in orgs]
    for org in orgs:
        await ingest(store, org, 3)
    deleted, disabled = subs[0][0], subs[1][1]
    assert await store.delete_subscription(orgs[0], deleted)
    await store.db.write(
        lambda c: c.execute(
            "UPDATE subscriptions SET status = 'DISABLED' WHERE uuid = ?", (disabled,)
        )
    )
    found, steps = await reader_steps(store, store.subscriptions_to_close)
    assert sorted(found) == sorted([deleted, disabled])
    assert steps < 2000  # six subscriptions with pending rows, whatever the other 3,000

    assert await store.close_pending(deleted, 100) == ("cancelled", 3)
    assert await store.subscriptions_to_close() == [disabled]


async def test_the_checkpointer_skips_a_wal_nothing_was_written_to(tmp_path: Path) -> None:
    db = Database(tmp_path / "pusherd.sqlite3", background=False)
    await db.open()
    try:
        checkpoints = 0
        real = db.checkpoint

        async def counted() -> None:
            nonlocal checkpoints
            checkpoints += 1
            await real()

        db.checkpoint = counted  # type: ignore[method-assign]
        assert not await db.checkpoint_if_written()  # freshly opened, nothing written
        await db.write(lambda c: c.execute("PRAGMA user_version"))
        assert await db.checkpoint_if_written()
        assert not await db.checkpoint_if_written()  # idle since: no checkpoint
        assert checkpoints == 1
        await db.write(lambda c: c.execute("PRAGMA user_version"), durable=False)
        assert await db.checkpoint_if_written()
        assert checkpoints == 2
    finally:
        await db.close()


async def test_a_purge_with_nothing_old_reads_no_events(store: Any) -> None:
    await subscribe_many(store, 1)
    for _ in range(4):
        await ingest(store, ORG, 500)
    cutoff_ms = int(time.time() * 1000) - 30 * 24 * 3600 * 1000  # the default retention
    removed, steps = await reader_steps(store, lambda: store.purge(cutoff_ms, 500))
    assert removed == 0
    # A scan of 2,000 events (looking for old ones no delivery needs) runs some 6,000
    # instructions; a range of the age index that is empty, a handful.
    assert steps < 1000
