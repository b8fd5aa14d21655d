"""The store contract (SPEC §6, §8): what every backend must do, written against the interface.

Each test takes `store` (a freshly opened, empty store of one backend); a new backend is added as a
parameter of that fixture and must pass every test here unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from pusherd.store import Store, open_store
from pusherd.store.types import (
    AttemptRecord,
    Claim,
    NewEvent,
    NewSubscription,
    Subscription,
    SubscriptionChanges,
)

ORG = "5a0b9c1e-1d2f-4a3b-8c4d-111111111111"
OTHER_ORG = "5a0b9c1e-1d2f-4a3b-8c4d-222222222222"
SCOPES = ("READ:PRODUCT",)
LEASE_MS = 60_000
ROOM = 100  # default room per origin in these claims


@pytest.fixture(params=["sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An empty store of each backend."""
    s = await open_store(str(tmp_path / "pusherd.sqlite3"))
    try:
        yield s
    finally:
        await s.close()


def everything(event_name: str, names: Sequence[str], scopes: Sequence[str]) -> bool:
    """A matcher that fans every event out to every subscription of its organization."""
    return True


_ids = itertools.count()


async def subscribe(
    store: Store, destination: str = "https://a.example/hook", org: str = ORG
) -> Subscription:
    """A new ACTIVE subscription (no welcome message)."""
    new = NewSubscription(
        uuid=str(uuid.uuid4()),
        organization=org,
        transport="WEBHOOK",
        event_names=(),
        scopes=SCOPES,
        destination=destination,
        contact_email=None,
        signing_key="k" * 32,
    )
    return await store.create_subscription(new, None)


async def ingest(store: Store, n: int = 1, org: str = ORG) -> list[str]:
    """Ingest n ProductCreated events; their messageIds."""
    mids = [f"m-{next(_ids)}" for _ in range(n)]
    await store.ingest(
        [NewEvent(org, "ProductCreated", "{}", mid, None) for mid in mids], everything
    )
    return mids


async def claim(
    store: Store,
    owner: str = "me",
    room: dict[str, int] | None = None,
    default_room: int = ROOM,
    budget: int = 1000,
    lease_ms: int = LEASE_MS,
) -> Claim:
    return await store.claim(owner, room or {}, default_room, budget, lease_ms)


async def wait_until(check: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.005)


def record(ok: bool) -> AttemptRecord:
    return AttemptRecord(now_ms(), 1.0, 200 if ok else 500, None if ok else "HTTP 500", "")


def now_ms() -> int:
    return int(time.time() * 1000)


# -- claim: the queues index -----------------------------------------------------------------


async def test_nothing_due_claims_nothing_and_reports_no_next_time(store: Store) -> None:
    for _ in range(20):
        await subscribe(store)
    c = await claim(store)
    assert c.deliveries == [] and not c.more and c.next_due_ms is None
    assert await store.due_at() is None


async def test_claim_takes_due_rows_in_ingest_order_per_subscription(store: Store) -> None:
    a = await subscribe(store, "https://a.example/hook")
    b = await subscribe(store, "https://b.example/hook")
    mids = await ingest(store, 5)
    c = await claim(store)
    for sub in (a, b):
        mine = [d.message_id for d in c.deliveries if d.subscription == sub.uuid]
        assert mine == mids
    assert {d.destination for d in c.deliveries} == {a.destination, b.destination}
    again = await claim(store, owner="other")
    assert again.deliveries == []  # leased


async def test_claim_respects_room_per_origin_and_the_budget(store: Store) -> None:
    a1 = await subscribe(store, "https://a.example/1")
    a2 = await subscribe(store, "https://a.example:443/2")  # the same origin
    b = await subscribe(store, "https://b.example/hook")
    await ingest(store, 10)
    c = await claim(store, room={"https://a.example:443": 4}, default_room=3)
    per_sub = {s.uuid: sum(d.subscription == s.uuid for d in c.deliveries) for s in (a1, a2, b)}
    assert per_sub[a1.uuid] + per_sub[a2.uuid] == 4
    assert per_sub[a1.uuid] == per_sub[a2.uuid] == 2  # the origin's room is shared
    assert per_sub[b.uuid] == 3
    assert c.more
    small = await claim(store, budget=2)
    assert len(small.deliveries) == 2


async def test_an_origin_without_room_is_not_claimed_from(store: Store) -> None:
    await subscribe(store, "https://paused.example/hook")
    ok = await subscribe(store, "https://ok.example/hook")
    await ingest(store, 3)
    c = await claim(store, room={"https://paused.example:443": 0})
    assert {d.subscription for d in c.deliveries} == {ok.uuid}
    assert len(c.deliveries) == 3
    # Nothing else is due before the leases end; the paused origin's rows are due now.
    assert (await store.due_at(["https://paused.example:443"]) or 0) > now_ms() + LEASE_MS // 2
    assert (await store.due_at() or 2**62) <= now_ms()


async def test_an_expired_lease_is_claimed_again_and_the_old_owner_cannot_record(
    store: Store,
) -> None:
    await subscribe(store)
    await ingest(store, 1)
    claimed_at = now_ms()
    first = (await claim(store, owner="dead", lease_ms=1)).deliveries
    assert len(first) == 1
    await wait_until(lambda: now_ms() > claimed_at + 2)  # the 1 ms lease has run out
    second = (await claim(store, owner="alive")).deliveries
    assert [d.id for d in second] == [first[0].id]
    # The old owner's outcome does not move the row on; the new owner's does.
    await store.record_attempt(first[0], "dead", record(True), "delivered", None, 10**9)
    assert (await store.delivery_counts([first[0].subscription])).pending == 1
    await store.record_attempt(second[0], "alive", record(True), "delivered", None, 10**9)
    counts = await store.delivery_counts([first[0].subscription])
    assert (counts.pending, counts.delivered) == (0, 1)


async def test_a_retry_is_due_at_its_time_and_reported_as_the_next_due_time(store: Store) -> None:
    await subscribe(store)
    await ingest(store, 1)
    (d,) = (await claim(store)).deliveries
    later = now_ms() + 60_000
    await store.record_attempt(d, "me", record(False), "retry", later, 10**9)
    c = await claim(store)
    assert c.deliveries == [] and c.next_due_ms == later
    assert await store.due_at() == later


async def test_released_rows_are_due_at_once_in_their_old_order(store: Store) -> None:
    await subscribe(store)
    mids = await ingest(store, 4)
    c = await claim(store)
    await store.release("me", [d.id for d in c.deliveries])
    again = await claim(store, owner="other")
    assert [d.message_id for d in again.deliveries] == mids


async def test_disabled_and_deleted_subscriptions_are_not_claimed(store: Store) -> None:
    a = await subscribe(store)
    b = await subscribe(store)
    live = await subscribe(store)
    await ingest(store, 2)
    await store.update_subscription(ORG, a.uuid, SubscriptionChanges(status="DISABLED"))
    await store.delete_subscription(ORG, b.uuid)
    c = await claim(store)
    assert {d.subscription for d in c.deliveries} == {live.uuid}
    await store.release("me", [d.id for d in c.deliveries])
    # Enabled again: its pending rows are due again.
    await store.update_subscription(ORG, a.uuid, SubscriptionChanges(status="ACTIVE"))
    c = await claim(store)
    assert {d.subscription for d in c.deliveries} == {live.uuid, a.uuid}


async def test_a_new_destination_moves_the_queue_to_its_origin(store: Store) -> None:
    a = await subscribe(store, "https://old.example/hook")
    await ingest(store, 1)
    await store.update_subscription(
        ORG, a.uuid, SubscriptionChanges(destination="https://new.example/hook")
    )
    c = await claim(store, room={"https://old.example:443": 0})
    assert [d.destination for d in c.deliveries] == ["https://new.example/hook"]
