"""The console's part of the store contract (`Store.console`, SPEC §9), written against the
interface: a new backend is added as a parameter of the `store` fixture and must pass unchanged.
"""

from __future__ import annotations

from pusherd.store import Store
from pusherd.store.console import LogFilter
from pusherd.store.types import NewEvent
from tests.test_store_contract import (
    ORG,
    OTHER_ORG,
    claim,
    everything,
    ingest,
    now_ms,
    record,
    subscribe,
)
from tests.test_store_contract import store as store_fixture

store = store_fixture  # the contract suite's fixture: an empty store of each backend


async def test_a_sign_in_link_signs_in_once(store: Store) -> None:
    secret = await store.console.create_link(ORG, now_ms() + 60_000)
    state = await store.console.link_state(secret)
    assert state is not None and state.organization == ORG and state.used_ms is None
    assert await store.console.redeem_link(secret) == ORG
    assert await store.console.redeem_link(secret) is None  # used
    used = await store.console.link_state(secret)
    assert used is not None and used.used_ms is not None
    assert await store.console.redeem_link("pcl_made-up") is None
    assert await store.console.link_state("pcl_made-up") is None


async def test_an_expired_link_is_refused(store: Store) -> None:
    secret = await store.console.create_link(ORG, now_ms() - 1)
    assert await store.console.redeem_link(secret) is None


async def test_token_by_id_sees_revocation(store: Store) -> None:
    token, _ = await store.create_token(ORG, ("READ:PRODUCT",), "shop", None)
    found = await store.console.token_by_id(token.id)
    assert found is not None and found.organization == ORG and found.revoked_ms is None
    assert await store.revoke_token(token.id)
    revoked = await store.console.token_by_id(token.id)
    assert revoked is not None and revoked.status(now_ms()) == "revoked"
    assert await store.console.token_by_id("tok_none") is None


async def test_subscriptions_are_scoped_to_an_organization_unless_none(store: Store) -> None:
    mine = await subscribe(store, "https://a.example/hook")
    theirs = await subscribe(store, "https://b.example/hook", org=OTHER_ORG)
    assert [s.uuid for s in await store.console.subscriptions(ORG)] == [mine.uuid]
    assert {s.uuid for s in await store.console.subscriptions(None)} == {mine.uuid, theirs.uuid}
    assert await store.console.subscription(ORG, theirs.uuid) is None
    assert await store.console.subscription(None, theirs.uuid) is not None
    assert await store.delete_subscription(ORG, mine.uuid)
    assert await store.console.subscriptions(ORG) == []


async def test_queue_log_delivery_and_counts_follow_the_deliveries(store: Store) -> None:
    start = now_ms()
    sub = await subscribe(store)
    other = await subscribe(store, "https://b.example/hook", org=OTHER_ORG)
    await ingest(store, 3)
    await store.ingest([NewEvent(OTHER_ORG, "ProductCreated", "{}", None, None)], everything)
    queue = await store.console.queue(ORG)
    assert queue.pending == 3 and queue.oldest_pending_age_s >= 0
    assert (await store.console.queue(None)).pending == 4

    ok, failed, _ = [d for d in (await claim(store)).deliveries if d.subscription == sub.uuid]
    await store.record_attempt(ok, "me", record(True), "delivered", None, 10**9)
    await store.record_attempt(failed, "me", record(False), "failed", None, 10**9)

    page = await store.console.log_page(sub.uuid, LogFilter(), 2)
    assert [r.id for r in page.rows] == sorted((r.id for r in page.rows), reverse=True)
    assert len(page.rows) == 2 and page.next_before_id == page.rows[-1].id
    rest = await store.console.log_page(sub.uuid, LogFilter(before_id=page.next_before_id), 2)
    assert len(rest.rows) == 1 and rest.next_before_id is None
    only_failed = await store.console.log_page(sub.uuid, LogFilter(status="failed"), 10)
    assert [r.id for r in only_failed.rows] == [failed.id]

    detail = await store.console.delivery(ORG, failed.id)
    assert detail is not None and detail.subscription == sub.uuid
    assert [a.status_code for a in detail.attempt_log] == [500]
    assert await store.console.delivery(OTHER_ORG, failed.id) is None
    assert await store.console.delivery(None, failed.id) is not None

    counts = await store.console.finished_counts(start, now_ms() + 1, 60_000)
    assert sum(c.delivered for c in counts) == 1 and sum(c.failed for c in counts) == 1
    assert {c.subscription for c in counts} == {sub.uuid}
    latency = await store.console.latency(ORG, start)
    assert latency.attempts == 2 and latency.p50_ms is not None
    assert (await store.console.latency(OTHER_ORG, start)).attempts == 0
    assert other.uuid not in {c.subscription for c in counts}
