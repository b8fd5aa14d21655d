"""A claim reads what it takes: the due queues of origins without room are not walked through
(issue 11: with 10,000 due queues over 50 origins, taking one row for the one origin with room
read the whole due index)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pusherd.store import open_store
from pusherd.store.sqlite.queues import origin_of
from pusherd.store.types import NewEvent, NewSubscription

ORIGINS = 20
SUBSCRIPTIONS = 2000


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Any]:
    s = await open_store(str(tmp_path / "pusherd.sqlite3"), background=False)
    try:
        yield s
    finally:
        await s.close()


def destination(i: int) -> str:
    return f"http://127.0.0.1:{9000 + i % ORIGINS}/hook"


async def queues_over_origins(store: Any) -> list[str]:
    """SUBSCRIPTIONS subscriptions (one organization each) over ORIGINS origins, each with
    one pending delivery, ingested in subscription order; their organizations."""
    orgs = [str(uuid.uuid4()) for _ in range(SUBSCRIPTIONS)]
    await asyncio.gather(
        *(
            store.create_subscription(
                NewSubscription(
                    str(uuid.uuid4()), org, "WEBHOOK", (), ("READ:PRODUCT",), destination(i),
                    None, "k" * 32,
                ),
                None,
            )
            for i, org in enumerate(orgs)
        )
    )  # fmt: skip
    for org in orgs:
        await store.ingest(
            [NewEvent(org, "ProductCreated", "{}", f"m-{org}", None)], lambda *_: True
        )
    return orgs


def quick_steps(store: Any) -> list[int]:
    """A counter of the SQLite VM instructions run on the loop's quick reader (in hundreds)."""
    ticks = [0]

    def tick() -> int:
        ticks[0] += 1
        return 0

    store.db._quick.set_progress_handler(tick, 100)
    return ticks


async def test_a_claim_for_one_origin_with_room_reads_that_origin_only(store: Any) -> None:
    await queues_over_origins(store)
    origins = sorted({origin_of(destination(i)) for i in range(ORIGINS)})
    target = origins[7]
    room = {o: (1 if o == target else 0) for o in origins}
    ticks = quick_steps(store)
    claim = await store.claim("me", room, 4, 1000, 60_000)
    steps = ticks[0] * 100
    assert [d.destination for d in claim.deliveries] == [
        destination(i) for i in range(ORIGINS) if origin_of(destination(i)) == target
    ]
    # Skipping the 1,900 due queues of the blocked origins in the due index ran some 26,000
    # instructions; a seek per origin and one row of the origin with room, a few thousand.
    assert steps < 5000, steps
    # With room everywhere, each origin's share, still reading about what it takes.
    ticks[0] = 0
    claim = await store.claim("me", {o: 2 for o in origins}, 4, 1000, 60_000)
    assert len(claim.deliveries) == 2 * ORIGINS
    assert ticks[0] * 100 < 10_000
