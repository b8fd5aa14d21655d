"""The SQLite claim path: a dispatcher cycle costs what is due, not the number of subscriptions."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pusherd.store.types import Claim
from tests.conftest import ORG, Harness
from tests.test_sqlite_idle import subscribe_many

SUBSCRIPTIONS = 3000


async def test_an_idle_cycle_reads_the_due_index_only_whatever_the_subscriptions(
    harness: Harness,
) -> None:
    h = harness
    store: Any = h.runtime.store
    await subscribe_many(store, SUBSCRIPTIONS, ORG)
    statements: list[str] = []
    for conn in (store.db._quick, store.db._writer):
        conn.set_trace_callback(statements.append)
    claims: list[Claim] = []
    real_claim = store.claim

    async def spy(*args: Any, **kwargs: Any) -> Claim:
        result: Claim = await real_claim(*args, **kwargs)
        claims.append(result)
        return result

    store.claim = spy
    try:
        deadline = time.monotonic() + 10
        while len(claims) < 5:
            assert time.monotonic() < deadline, "the dispatcher did not run its cycles"
            h.runtime.dispatcher.wake()
            await asyncio.sleep(0.01)
    finally:
        del store.claim
        for conn in (store.db._quick, store.db._writer):
            conn.set_trace_callback(None)
    assert all(c.deliveries == [] for c in claims)
    # One statement per idle cycle (both ends of the due index), none per subscription,
    # and never a read of the subscriptions table.
    per_claim = [s for s in statements if "queues" in s]
    assert len(statements) <= len(claims) + 10, statements[:20]
    assert len(per_claim) >= len(claims)
    assert not [s for s in statements if "subscriptions" in s], statements[:20]
