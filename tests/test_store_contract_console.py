"""The console's part of the store contract (`Store.console`, SPEC §9), written against the
interface: a new backend is added as a parameter of the `store` fixture and must pass unchanged.
"""

from __future__ import annotations

from pusherd.store import Store
from pusherd.store.console import SESSIONS_PER_TOKEN, LogFilter, SessionRecord
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


def a_session(now: int, org: str | None = ORG, token_id: str | None = "tok_1") -> SessionRecord:
    return SessionRecord(org, ORG, "token tok_1", token_id, "csrf-value", now, now, now + 60_000)


async def test_a_session_is_kept_under_a_hash_of_its_id(store: Store) -> None:
    now = now_ms()
    await store.console.create_session("cookie-id-1", a_session(now))
    await store.console.create_session("cookie-id-admin", a_session(now, org=None, token_id=None))
    got = await store.console.session("cookie-id-1", now)
    assert got == a_session(now)
    admin = await store.console.session("cookie-id-admin", now)
    assert admin is not None and admin.organization is None and admin.token_id is None
    assert await store.console.session("cookie-id-2", now) is None
    # Expired: not answered, whatever its row still says.
    assert await store.console.session("cookie-id-1", now + 60_000) is None


async def test_touching_moves_the_expiry_forward_only(store: Store) -> None:
    now = now_ms()
    await store.console.create_session("sid", a_session(now))
    await store.console.touch_session("sid", now + 30_000, now + 90_000)
    got = await store.console.session("sid", now + 60_000)
    assert got is not None and got.last_seen_ms == now + 30_000 and got.expires_ms == now + 90_000
    await store.console.touch_session("sid", now + 10_000, now + 70_000)  # a late, older touch
    got = await store.console.session("sid", now + 60_000)
    assert got is not None and got.last_seen_ms == now + 30_000 and got.expires_ms == now + 90_000
    await store.console.touch_session("unknown", now, now + 1)  # nothing to touch: no error


async def test_ending_a_session_removes_it(store: Store) -> None:
    now = now_ms()
    await store.console.create_session("sid", a_session(now))
    await store.console.create_session("other", a_session(now))
    assert await store.console.end_session("sid") is True
    assert await store.console.session("sid", now) is None
    assert await store.console.end_session("sid") is False
    assert await store.console.session("other", now) is not None


async def test_flash_messages_wait_for_one_page(store: Store) -> None:
    now = now_ms()
    await store.console.create_session("sid", a_session(now))
    await store.console.add_flash("sid", ["queued", 'with "quotes" & <markup>'])
    await store.console.add_flash("sid", ["second"])
    got = await store.console.session("sid", now)
    assert got is not None and got.flash == ("queued", 'with "quotes" & <markup>', "second")
    assert await store.console.take_flash("sid") == ["queued", 'with "quotes" & <markup>', "second"]
    assert await store.console.take_flash("sid") == []
    got = await store.console.session("sid", now)
    assert got is not None and got.flash == ()
    await store.console.add_flash("gone", ["nobody"])  # a signed-out session: dropped
    assert await store.console.take_flash("gone") == []


async def test_purge_removes_expired_sessions_and_links(store: Store) -> None:
    now = now_ms()
    await store.console.create_session("old", a_session(now - 120_000))
    await store.console.create_session("live", a_session(now))
    old_link = await store.console.create_link(ORG, now - 1)
    live_link = await store.console.create_link(ORG, now + 60_000)
    assert await store.console.purge_sessions(now) == 2
    assert await store.console.session("live", now) is not None
    assert await store.console.session("old", now - 120_000) is None  # the row is gone
    assert await store.console.link_state(old_link) is None
    assert await store.console.link_state(live_link) is not None
    assert await store.console.purge_sessions(now) == 0


async def test_a_token_keeps_its_most_recent_sessions_only(store: Store) -> None:
    now = now_ms()
    for i in range(SESSIONS_PER_TOKEN + 1):  # the first is the least recently seen
        await store.console.create_session(f"sid-{i}", a_session(now + i))
    await store.console.create_session("other-token", a_session(now, token_id="tok_2"))
    await store.console.create_session("a-link", a_session(now, token_id=None))
    assert await store.console.session("sid-0", now) is None
    assert await store.console.session("sid-1", now) is not None
    assert await store.console.session(f"sid-{SESSIONS_PER_TOKEN}", now) is not None
    assert await store.console.session("other-token", now) is not None
    assert await store.console.session("a-link", now) is not None
