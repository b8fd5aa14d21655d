"""PostgresStore across processes: two stores on one database, as two pusherd processes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from pusherd.config import StorageConfig
from pusherd.store import Change, Store, open_store
from pusherd.store.types import AttemptRecord, NewEvent, NewSubscription, SubscriptionChanges

ORG = "5a0b9c1e-1d2f-4a3b-8c4d-111111111111"


def everything(*_: object) -> bool:
    return True


async def wait_until(check: Callable[[], bool], limit_s: float = 1.0) -> None:
    """SPEC §8: a change made through one process is in force in every other within 1 s."""
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, "not seen within the deadline"
        await asyncio.sleep(0.005)


@pytest.fixture
async def pair(pg_url: str) -> AsyncIterator[tuple[Store, Store]]:
    a = await open_store(StorageConfig(url=pg_url))
    b = await open_store(StorageConfig(url=pg_url))
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_changes_reach_the_other_process_and_not_twice_their_own(
    pair: tuple[Store, Store],
) -> None:
    a, b = pair
    seen_a: list[Change] = []
    seen_b: list[Change] = []
    a.changes.subscribe(seen_a.append)
    b.changes.subscribe(seen_b.append)
    # b caches the organization's fan-out targets: none yet.
    (r,) = await b.ingest([NewEvent(ORG, "ProductCreated", "{}", "before", None)], everything)
    assert r.deliveries == 0
    new = NewSubscription(
        str(uuid.uuid4()), ORG, "WEBHOOK", (), ("READ:PRODUCT",), "https://a.example/", None, "k"
    )
    await a.create_subscription(new, None)
    await wait_until(lambda: any(c.kind == "subscription_created" for c in seen_b))
    # b's cache was dropped by the notification: its next event fans out to the new subscription.
    (r,) = await b.ingest([NewEvent(ORG, "ProductCreated", "{}", "after", None)], everything)
    assert r.deliveries == 1
    await wait_until(lambda: any(c.kind == "deliveries_queued" for c in seen_a))
    await a.update_subscription(ORG, new.uuid, SubscriptionChanges(status="DISABLED"))
    await wait_until(lambda: any(c.kind == "subscription_disabled" for c in seen_b))
    change = next(c for c in seen_b if c.kind == "subscription_disabled")
    assert (change.organization, change.subscription) == (ORG, new.uuid)
    token, _ = await b.create_token(ORG, ("READ:PRODUCT",), "", None)
    await wait_until(lambda: any(c.token == token.id for c in seen_a))
    await asyncio.sleep(0.2)  # room for an echo that must not come
    assert [c.kind for c in seen_a] == [
        "subscription_created",
        "deliveries_queued",
        "subscription_disabled",
        "token_created",
    ]


async def test_wake_ups_are_coalesced_per_group_commit(pair: tuple[Store, Store]) -> None:
    a, b = pair
    await a.create_subscription(
        NewSubscription(
            str(uuid.uuid4()),
            ORG,
            "WEBHOOK",
            (),
            ("READ:PRODUCT",),
            "https://a.example/",
            None,
            "k",
        ),
        None,
    )
    woken: list[Change] = []
    b.changes.subscribe(lambda c: woken.append(c) if c.kind == "deliveries_queued" else None)
    events = [[NewEvent(ORG, "ProductCreated", "{}", f"m-{i}", None)] for i in range(100)]
    await asyncio.gather(*(a.ingest(e, everything) for e in events))
    await wait_until(lambda: len(woken) > 0)
    await asyncio.sleep(0.2)
    assert 1 <= len(woken) <= 50  # one per group commit (up to ten in flight), not per row
    assert (await b.queue_stats()).pending == 100


async def test_concurrent_records_are_each_applied_with_their_status_changes(
    pair: tuple[Store, Store],
) -> None:
    a, _ = pair
    sub = NewSubscription(
        str(uuid.uuid4()), ORG, "WEBHOOK", (), ("READ:PRODUCT",), "https://a.example/", None, "k"
    )
    await a.create_subscription(sub, None)
    await a.ingest(
        [NewEvent(ORG, "ProductCreated", "{}", f"c-{i}", None) for i in range(50)], everything
    )
    claimed = (await a.claim("me", {}, 100, 100, 60_000)).deliveries
    assert len(claimed) == 50
    seen: list[Change] = []
    a.changes.subscribe(seen.append)
    now = int(time.time() * 1000)
    ok = AttemptRecord(now, 1.0, 200, None, "")
    bad = AttemptRecord(now, 1.0, 500, "HTTP 500", "")
    # All at once (one group or a few): the failure first makes it FAILING, once.
    outcomes = await asyncio.gather(
        a.record_attempt(claimed[0], "me", bad, "retry", now + 60_000, 10**9),
        *(a.record_attempt(d, "me", ok, "delivered", None, 10**9) for d in claimed[1:]),
        a.record_attempt(claimed[1], "other", ok, "delivered", None, 10**9),  # not its lease
    )
    changes = [c for c in outcomes if c is not None]
    assert [(c.old, c.new) for c in changes][:1] == [("ACTIVE", "FAILING")]
    counts = await a.delivery_counts([sub.uuid])
    assert (counts.delivered, counts.pending) == (49, 1)
    view = await a.get_delivery(claimed[1].id, ORG)
    assert view is not None and len(view.attempt_log) == 1  # the stale owner's left nothing
    assert any(c.kind == "subscription_changed" for c in seen)
