"""The store contract (SPEC §6, §8): what every backend must do, written against the interface.

Each test takes `store` (a freshly opened, empty store of one backend); a new backend is added as a
parameter of that fixture and must pass every test here unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from pusherd.config import StorageConfig
from pusherd.store import Change, Store, UuidTakenError, open_store
from pusherd.store.types import (
    AttemptRecord,
    Claim,
    ClaimedDelivery,
    Handover,
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


# What the PostgreSQL backend does not do (yet), each expected to fail there and only there.
POSTGRES_XFAIL: dict[str, str] = {
    "test_backup_copies_the_store_and_never_overwrites": (
        "by design: on PostgreSQL backups are pg_dump's job (SPEC §1), backup() refuses"
    ),
}


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An empty store of each backend, opened as the daemon opens it (open_store(config)):
    PostgreSQL in a fresh database of the test server (tests/pg.py)."""
    if request.param == "postgres":
        reason = POSTGRES_XFAIL.get(request.node.originalname)
        if reason is not None:
            request.node.add_marker(pytest.mark.xfail(strict=True, reason=reason))
        url = request.getfixturevalue("pg_url")
        config = StorageConfig(path=str(tmp_path / "unused.sqlite3"), url=url)
    else:
        config = StorageConfig(path=str(tmp_path / "pusherd.sqlite3"))
    s = await open_store(config)
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
    default_total: int | None = None,
) -> Claim:
    return await store.claim(owner, room or {}, default_room, budget, lease_ms, default_total)


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


async def test_origins_not_named_share_default_total(store: Store) -> None:
    for i in range(4):
        await subscribe(store, f"https://new{i}.example/hook")
    await ingest(store, 3)
    c = await claim(store, default_room=2, default_total=5)
    assert len(c.deliveries) == 5  # 2 + 2 + 1: the unnamed origins' total
    per_origin = Counter(d.destination for d in c.deliveries)
    assert max(per_origin.values()) <= 2


async def test_origins_in_use_are_those_deliverable_subscriptions_point_at(store: Store) -> None:
    a = await subscribe(store, "https://a.example/hook")
    b = await subscribe(store, "https://b.example/hook")
    c = await subscribe(store, "https://c.example/hook")
    await store.delete_subscription(ORG, a.uuid)
    await store.update_subscription(ORG, b.uuid, SubscriptionChanges(status="DISABLED"))
    await store.update_subscription(
        ORG, c.uuid, SubscriptionChanges(destination="https://d.example/hook")
    )
    names = [f"https://{x}.example:443" for x in "abcd"]
    assert await store.origins_in_use(names) == {"https://d.example:443"}


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


# -- ingest ----------------------------------------------------------------------------------


async def test_ingest_fans_out_to_matching_live_subscriptions_of_the_organization(
    store: Store,
) -> None:
    a = await subscribe(store)
    b = await subscribe(store)
    await subscribe(store, org=OTHER_ORG)
    await store.update_subscription(ORG, b.uuid, SubscriptionChanges(status="DISABLED"))
    (r,) = await store.ingest([NewEvent(ORG, "ProductCreated", '{"n": 1}', None, None)], everything)
    assert (r.deliveries, r.duplicate) == (1, False)
    assert r.message_id  # generated
    (d,) = (await claim(store)).deliveries
    assert (d.subscription, d.payload, d.event_name) == (a.uuid, '{"n": 1}', "ProductCreated")
    assert d.message_uuid == r.message_uuid and d.organization == ORG
    assert d.signing_keys == ("k" * 32,)


async def test_a_message_id_seen_before_is_not_fanned_out_again(store: Store) -> None:
    await subscribe(store)
    event = NewEvent(ORG, "ProductCreated", "{}", "same", None)
    (first,) = await store.ingest([event], everything)
    (again,) = await store.ingest([event], everything)
    assert again.duplicate and again.message_uuid == first.message_uuid
    assert again.deliveries == first.deliveries == 1
    # Inside one batch, a repeat is a duplicate of the first item.
    batch = await store.ingest([NewEvent(ORG, "ProductCreated", "{}", "b", None)] * 2, everything)
    assert [r.duplicate for r in batch] == [False, True]
    assert batch[0].message_uuid == batch[1].message_uuid
    # Another organization's messageId space is its own.
    (other,) = await store.ingest(
        [NewEvent(OTHER_ORG, "ProductCreated", "{}", "same", None)], everything
    )
    assert not other.duplicate
    assert len((await claim(store)).deliveries) == 2


async def test_concurrent_ingests_all_commit_with_their_own_results(store: Store) -> None:
    await subscribe(store)
    results = await asyncio.gather(*(ingest(store, 3) for _ in range(10)))
    assert len({m for r in results for m in r}) == 30
    assert (await store.queue_stats()).pending == 30


async def test_send_to_addresses_only_the_given_subscriptions(store: Store) -> None:
    a = await subscribe(store)
    await subscribe(store)
    r = await store.send_to(NewEvent(ORG, "TestMessage", "{}", None, None), [a.uuid])
    assert r.deliveries == 1 and len(r.delivery_ids) == 1
    assert [d.subscription for d in (await claim(store)).deliveries] == [a.uuid]


# -- record, retry, finish ---------------------------------------------------------------------


async def test_record_delivered_retry_and_failed(store: Store) -> None:
    sub = await subscribe(store)
    await ingest(store, 3)
    ok, retry, fail = (await claim(store)).deliveries
    assert await store.record_attempt(ok, "me", record(True), "delivered", None, 10**9) is None
    change = await store.record_attempt(retry, "me", record(False), "retry", now_ms(), 10**9)
    assert change is not None and (change.old, change.new) == ("ACTIVE", "FAILING")
    await store.record_attempt(fail, "me", record(False), "failed", None, 10**9)
    counts = await store.delivery_counts([sub.uuid])
    assert (counts.delivered, counts.failed, counts.pending, counts.total) == (1, 1, 1, 3)
    (again,) = (await claim(store)).deliveries  # the retry is due now
    assert (again.id, again.attempts, again.schedule_pos) == (retry.id, 1, 1)
    view = await store.get_delivery(retry.id, ORG)
    assert view is not None and view.status == "pending" and len(view.attempt_log) == 1
    assert view.attempt_log[0].status_code == 500
    assert await store.get_delivery(retry.id, OTHER_ORG) is None
    # A success after failures makes it ACTIVE again.
    change = await store.record_attempt(again, "me", record(True), "delivered", None, 10**9)
    assert change is not None and change.new == "ACTIVE"


async def test_gone_disables_the_subscription_and_close_pending_fails_the_rest(
    store: Store,
) -> None:
    sub = await subscribe(store)
    await ingest(store, 4)
    first, *rest = (await claim(store)).deliveries
    change = await store.record_attempt(first, "me", record(False), "gone", None, 10**9)
    assert change is not None and change.new == "DISABLED"
    assert await store.subscriptions_to_close() == [sub.uuid]
    await store.release("me", [d.id for d in rest])
    assert (await claim(store)).deliveries == []  # a DISABLED subscription's rows wait
    assert await store.close_pending(sub.uuid, 2) == ("failed", 2)
    assert await store.close_pending(sub.uuid, 2) == ("failed", 1)
    assert await store.close_pending(sub.uuid, 2) == ("failed", 0)
    assert await store.subscriptions_to_close() == []
    counts = await store.delivery_counts([sub.uuid])
    assert (counts.failed, counts.pending) == (4, 0)


async def test_disable_overdue_disables_only_a_subscription_failing_long_enough(
    store: Store,
) -> None:
    # SPEC §3: FAILING for disable_after means DISABLED, even when no attempt fails then (the
    # origin's breaker may hold them back): the runtime asks the store on a timer.
    failing = await subscribe(store)
    active = await subscribe(store, "https://b.example/hook")
    await ingest(store)
    seen: list[Change] = []
    store.changes.subscribe(seen.append)
    for d in (await claim(store)).deliveries:
        if d.subscription == failing.uuid:
            await store.record_attempt(d, "me", record(False), "retry", now_ms() + 10**6, 10**9)
    assert await store.disable_overdue(active.uuid, 0) is None  # ACTIVE is left alone
    assert await store.disable_overdue(failing.uuid, 10**9) is None  # not failing long enough
    change = await store.disable_overdue(failing.uuid, 0)
    assert change is not None and (change.old, change.new) == ("FAILING", "DISABLED")
    assert change.organization == ORG and change.destination == failing.destination
    assert await store.disable_overdue(failing.uuid, 0) is None
    statuses = {s.uuid: s.status for s in await store.list_subscriptions(ORG)}
    assert statuses == {failing.uuid: "DISABLED", active.uuid: "ACTIVE"}
    assert await store.subscriptions_to_close() == [failing.uuid]
    await wait_until(lambda: any(c.kind == "subscription_disabled" for c in seen))


async def test_a_deleted_subscriptions_pending_rows_are_cancelled(store: Store) -> None:
    sub = await subscribe(store)
    await ingest(store, 3)
    assert await store.delete_subscription(ORG, sub.uuid)
    assert not await store.delete_subscription(ORG, sub.uuid)
    assert await store.close_pending(sub.uuid, 100) == ("cancelled", 3)
    assert await store.get_subscription(ORG, sub.uuid) is None


async def test_leases_of_dead_owners_are_recovered(store: Store) -> None:
    await subscribe(store)
    await ingest(store, 2)
    await claim(store, owner="dead")
    await claim(store, owner="alive", budget=0)
    assert await store.recover_leases(lambda owner: owner == "dead") == 2
    assert len((await claim(store, owner="alive")).deliveries) == 2


# -- requeue, replay, listings, purge ---------------------------------------------------------


async def test_requeue_and_replay_queue_finished_deliveries_again(store: Store) -> None:
    sub = await subscribe(store)
    await ingest(store, 2)
    a, b = (await claim(store)).deliveries
    assert await store.requeue(a.id, ORG) == "pending"
    await store.record_attempt(a, "me", record(True), "delivered", None, 10**9)
    await store.record_attempt(b, "me", record(False), "failed", None, 10**9)
    assert await store.requeue(a.id, OTHER_ORG) == "missing"
    assert await store.requeue(a.id, ORG) == "queued"
    (again,) = (await claim(store)).deliveries
    assert (again.id, again.attempts, again.schedule_pos) == (a.id, 1, 0)
    await store.record_attempt(again, "me", record(True), "delivered", None, 10**9)
    assert await store.replay(sub.uuid, None, "failed") == 1
    assert await store.replay(sub.uuid, None, None) == 1  # the delivered one; b is pending
    assert sorted(d.id for d in (await claim(store)).deliveries) == [a.id, b.id]


async def test_list_deliveries_is_newest_first_and_keyset_paginated(store: Store) -> None:
    sub = await subscribe(store)
    await ingest(store, 5)
    page = await store.list_deliveries(sub.uuid, None, 3, None)
    assert [v.id for v in page] == sorted((v.id for v in page), reverse=True)
    rest = await store.list_deliveries(sub.uuid, None, 3, page[-1].id)
    assert len(page) == 3 and len(rest) == 2
    assert all(v.status == "pending" and v.due_ms is not None for v in page + rest)
    assert await store.list_deliveries(sub.uuid, "delivered", 10, None) == []


async def test_queue_stats_and_purge(store: Store) -> None:
    sub = await subscribe(store)
    await ingest(store, 3)
    stats = await store.queue_stats()
    assert stats.pending == 3 and stats.oldest_pending_age_s >= 0
    claimed = (await claim(store)).deliveries
    for d in claimed[:2]:
        await store.record_attempt(d, "me", record(True), "delivered", None, 10**9)
    assert await store.purge(now_ms() - 60_000, 100) == 0  # nothing finished that long ago
    removed = await store.purge(now_ms() + 1000, 100)
    assert removed == 4  # two deliveries and their two events
    counts = await store.delivery_counts([sub.uuid])
    assert (counts.delivered, counts.pending) == (0, 1)


async def test_backup_copies_the_store_and_never_overwrites(store: Store, tmp_path: Path) -> None:
    await subscribe(store)
    await ingest(store, 2)
    summary = await store.backup(tmp_path / "copy")
    assert (summary.subscriptions, summary.events, summary.deliveries, summary.pending) == (
        1,
        2,
        2,
        2,
    )
    with pytest.raises(FileExistsError):
        await store.backup(tmp_path / "copy")


# -- subscriptions and tokens ----------------------------------------------------------------


async def test_subscription_crud(store: Store) -> None:
    a = await subscribe(store, "https://a.example/1")
    b = await subscribe(store, "https://a.example/2")
    await subscribe(store, org=OTHER_ORG)
    assert {s.uuid for s in await store.list_subscriptions(ORG)} == {a.uuid, b.uuid}
    assert await store.get_subscription(OTHER_ORG, a.uuid) is None
    assert (await store.find_subscription(a.uuid)) == a
    with pytest.raises(UuidTakenError):
        await store.create_subscription(
            NewSubscription(a.uuid, ORG, "WEBHOOK", (), SCOPES, "https://x.example", None, "k"),
            None,
        )
    changed = await store.update_subscription(
        ORG, a.uuid, SubscriptionChanges(destination="https://c.example/", contact_email="x@y.z")
    )
    assert changed is not None and changed.destination == "https://c.example/"
    assert changed.contact_email == "x@y.z" and changed.event_names == ()
    assert await store.update_subscription(OTHER_ORG, a.uuid, SubscriptionChanges()) is None
    assert await store.rotate_signing_key(ORG, a.uuid, "n" * 32, 60_000)
    rotated = await store.get_subscription(ORG, a.uuid)
    assert rotated is not None and rotated.signing_key == "n" * 32
    assert rotated.prev_signing_key == "k" * 32
    assert await store.delete_subscription(ORG, a.uuid)
    assert await store.find_subscription(a.uuid) is None
    with pytest.raises(UuidTakenError):  # a deleted uuid stays taken
        await store.create_subscription(
            NewSubscription(a.uuid, ORG, "WEBHOOK", (), SCOPES, "https://x.example", None, "k"),
            None,
        )


async def test_a_rotated_out_key_signs_alongside_the_new_one(store: Store) -> None:
    sub = await subscribe(store)
    await store.rotate_signing_key(ORG, sub.uuid, "n" * 32, 60_000)
    await ingest(store, 1)
    (d,) = (await claim(store)).deliveries
    assert d.signing_keys == ("n" * 32, "k" * 32)


async def test_a_welcome_message_is_queued_with_the_subscription(store: Store) -> None:
    new = NewSubscription(
        str(uuid.uuid4()), ORG, "WEBHOOK", (), SCOPES, "https://a.example/", None, "k"
    )
    await store.create_subscription(new, NewEvent(ORG, "TestMessage", "{}", None, None))
    (d,) = (await claim(store)).deliveries
    assert (d.subscription, d.event_name) == (new.uuid, "TestMessage")


async def test_token_crud(store: Store) -> None:
    token, secret = await store.create_token(ORG, SCOPES, "ci", None)
    assert secret and secret not in repr(token)
    found = await store.find_token(secret)
    assert found == token and found.status(now_ms()) == "active"
    assert await store.find_token(secret + "x") is None
    assert [t.id for t in await store.list_tokens()] == [token.id]
    assert await store.revoke_token(token.id)
    assert not await store.revoke_token(token.id)
    revoked = await store.find_token(secret)
    assert revoked is not None and revoked.status(now_ms()) == "revoked"


# -- change announcements --------------------------------------------------------------------


async def test_writes_announce_their_changes_after_commit(store: Store) -> None:
    seen: list[Change] = []
    stop = store.changes.subscribe(seen.append)
    token, _ = await store.create_token(ORG, SCOPES, "", None)
    sub = await subscribe(store)
    await ingest(store, 2)
    await store.update_subscription(ORG, sub.uuid, SubscriptionChanges(contact_email="a@b.c"))
    await store.rotate_signing_key(ORG, sub.uuid, "n" * 32, 1000)
    (d, _) = (await claim(store)).deliveries
    await store.record_attempt(d, "me", record(True), "delivered", None, 10**9)
    await store.requeue(d.id, ORG)
    await store.update_subscription(ORG, sub.uuid, SubscriptionChanges(status="DISABLED"))
    await store.delete_subscription(ORG, sub.uuid)
    await store.revoke_token(token.id)
    stop()
    await ingest(store, 1)  # no longer listened to
    assert [(c.kind, c.subscription) for c in seen] == [
        ("token_created", ""),
        ("subscription_created", sub.uuid),
        ("deliveries_queued", ""),
        ("subscription_changed", sub.uuid),
        ("key_rotated", sub.uuid),
        ("deliveries_queued", ""),
        ("subscription_disabled", sub.uuid),
        ("subscription_deleted", sub.uuid),
        ("token_revoked", ""),
    ]
    assert seen[0].token == token.id and seen[1].organization == ORG


async def test_a_delivery_outcome_that_disables_is_announced(store: Store) -> None:
    sub = await subscribe(store)
    await ingest(store, 1)
    seen: list[Change] = []
    store.changes.subscribe(seen.append)
    (d,) = (await claim(store)).deliveries
    await store.record_attempt(d, "me", record(False), "gone", None, 10**9)
    assert [(c.kind, c.subscription, c.organization) for c in seen] == [
        ("subscription_disabled", sub.uuid, ORG)
    ]


# -- fresh deliveries handed over at ingest ----------------------------------------------------


class Taking:
    """A taker offering fixed room, recording what it was handed."""

    def __init__(self, room: dict[str, int], skip: frozenset[str] = frozenset()) -> None:
        self.offer = Handover("taker", LEASE_MS, room, skip)
        self.handed: list[list[ClaimedDelivery]] = []

    def handover(self) -> Handover | None:
        return self.offer

    def taken(self, deliveries: list[ClaimedDelivery]) -> None:
        self.handed.append(deliveries)


async def test_fresh_deliveries_are_handed_over_leased_within_the_offered_room(
    store: Store,
) -> None:
    a = await subscribe(store, "https://a.example/hook")
    b = await subscribe(store, "https://b.example/hook")
    taker = Taking({"https://a.example:443": 3})
    await store.take_fresh(taker)
    mids = await ingest(store, 5)
    (handed,) = taker.handed
    assert [d.message_id for d in handed] == mids[:3]  # the room, in ingest order
    assert {d.subscription for d in handed} == {a.uuid}
    assert handed[0].destination == a.destination and handed[0].signing_keys == ("k" * 32,)
    # The rest is claimed as usual: a's two rows it had no room for, b's five.
    c = await claim(store, owner="other")
    assert [d.message_id for d in c.deliveries if d.subscription == a.uuid] == mids[3:]
    assert [d.message_id for d in c.deliveries if d.subscription == b.uuid] == mids
    # The handed rows are the taker's: it records them.
    await store.record_attempt(handed[0], "taker", record(True), "delivered", None, 10**9)
    assert (await store.delivery_counts([a.uuid])).delivered == 1


async def test_a_fresh_delivery_never_overtakes_an_older_due_one(store: Store) -> None:
    a = await subscribe(store, "https://a.example/hook")
    old = await ingest(store, 2)  # due, unclaimed
    taker = Taking({"https://a.example:443": 10})
    await store.take_fresh(taker)
    new = await ingest(store, 2)
    assert taker.handed == []
    assert [d.message_id for d in (await claim(store)).deliveries] == old + new
    # Once its older rows are in flight, fresh ones are handed over again.
    more = await ingest(store, 1)
    assert [d.message_id for d in taker.handed[0]] == more
    assert taker.handed[0][0].subscription == a.uuid


async def test_skipped_subscriptions_and_stopped_takers_get_nothing(store: Store) -> None:
    a = await subscribe(store, "https://a.example/hook")
    taker = Taking({"https://a.example:443": 10}, skip=frozenset({a.uuid}))
    await store.take_fresh(taker)
    await ingest(store, 1)
    await store.take_fresh(None)
    await ingest(store, 1)
    assert taker.handed == []
    assert len((await claim(store)).deliveries) == 2
