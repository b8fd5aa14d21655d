"""Rate limits on PostgreSQL: one count per organization, whichever process a request reaches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from pusherd.store.postgres.migrate import migrate_url
from pusherd.store.postgres.pool import Pool
from pusherd.store.postgres.ratelimit import hit

ORG = "5a0b9c1e-1d2f-4a3b-8c4d-111111111111"
OTHER = "5a0b9c1e-1d2f-4a3b-8c4d-222222222222"
T0 = 1_800_000_000_000  # on an hour boundary


@pytest.fixture
async def pools(pg_url: str) -> AsyncIterator[list[Pool]]:
    await migrate_url(pg_url)
    out = [Pool(pg_url, max_size=8) for _ in range(3)]  # three processes
    for p in out:
        await p.open()
    yield out
    for p in out:
        await p.close()


async def test_the_limit_holds_across_processes(pools: list[Pool]) -> None:
    results = await asyncio.gather(*(hit(pools[i % 3], ORG, T0 + i, 10, 1000) for i in range(40)))
    assert sum(r.allowed for r in results) == 10
    assert max(r.minute_hits for r in results) == 10  # refused requests are not counted
    assert (await hit(pools[0], OTHER, T0, 10, 1000)).allowed  # per organization


async def test_windows_roll_over_on_the_clock(pools: list[Pool]) -> None:
    for i in range(3):
        assert (await hit(pools[i], ORG, T0 + 59_000, 3, 5)).allowed
    late = await hit(pools[0], ORG, T0 + 59_999, 3, 5)
    assert not late.allowed and late.minute_start_ms == T0
    nxt = await hit(pools[1], ORG, T0 + 60_000, 3, 5)  # a new minute
    assert nxt.allowed and nxt.minute_hits == 1 and nxt.hour_hits == 4
    assert (await hit(pools[2], ORG, T0 + 61_000, 3, 5)).allowed
    hour_full = await hit(pools[0], ORG, T0 + 62_000, 3, 5)
    assert not hour_full.allowed and hour_full.hour_hits == 5
    assert (await hit(pools[0], ORG, T0 + 3_600_000, 3, 5)).allowed  # a new hour
    # Ended windows are swept: the organization keeps its two current rows only.
    assert await pools[0].fetchval("SELECT count(*) FROM rate_windows") == 2
