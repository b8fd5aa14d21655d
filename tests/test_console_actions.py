"""The console's actions (the API's own rules behind forms), its delivery log and its counts."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Awaitable, Callable

from pusherd.console.rollup import Rollup
from pusherd.store.console import LogFilter
from tests.conftest import ORG, Harness, Receiver
from tests.console_seed import seed_history
from tests.test_console import csrf_of, sign_in


async def post_form(harness: Harness, page_path: str, data: dict[str, str] | None = None) -> str:
    """Open a confirmation (or any) page, post its form with its CSRF token, return the result."""
    page = await harness.api.get(page_path)
    assert page.status == 200, await page.text()
    html = await page.text()
    action = re.search(r'<form method="post" action="([^"]+)" class="card', html)
    target = action.group(1) if action else page_path
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', html))
    body = {**hidden, "csrf": csrf_of(html), **(data or {})}
    resp = await harness.api.post(target, data=body)
    return await resp.text()


async def test_send_test_event_and_rotate_key(harness: Harness, receiver: Receiver) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, receiver.url)
    await sign_in(harness.api, token)
    base = f"/console/subscriptions/{sub['uuid']}"
    confirm = await (await harness.api.get(base + "/test")).text()
    assert "Yes, send it" in confirm and receiver.url in confirm
    done = await post_form(harness, base + "/test")
    assert "A test event was queued as delivery #" in done
    await receiver.wait_for(1, "test.event")
    assert receiver.events("test.event")[0]["payload"] == '{"test":true}'

    page = await (await harness.api.get(base)).text()
    resp = await harness.api.post(base + "/rotate", data={"csrf": csrf_of(page)})
    shown = re.search(r'<pre class="secret" id="secret">([A-Za-z0-9]{64})</pre>', await resp.text())
    assert shown
    stored = await harness.runtime.store.get_subscription(ORG, sub["uuid"])
    assert stored is not None and stored.signing_key == shown.group(1)
    assert shown.group(1) not in await (await harness.api.get(base)).text()  # shown once


async def test_re_enable_replay_and_the_rules_they_share(
    harness: Harness, receiver_factory: Callable[..., Awaitable[Receiver]]
) -> None:
    token = harness.token()
    rec = await receiver_factory(default=410)
    sub = await harness.subscribe(token, rec.url)
    store = harness.runtime.store
    deadline = time.monotonic() + 10
    while (s := await store.get_subscription(ORG, sub["uuid"])) is None or s.status != "DISABLED":
        assert time.monotonic() < deadline
        await harness.idle()
    await sign_in(harness.api, token)
    base = f"/console/subscriptions/{sub['uuid']}"
    # the PayStell rule: no test send to a webhook that is not active
    page = await (await harness.api.get(base + "/test")).text()
    refused = await harness.api.post(base + "/test", data={"csrf": csrf_of(page)})
    assert refused.status == 409
    assert "not active" in await refused.text()

    page = await (await harness.api.get(base)).text()
    assert 'id="enable"' in page
    resp = await harness.api.post(base + "/enable", data={"csrf": csrf_of(page)})
    assert "ACTIVE again" in await resp.text()
    enabled = await store.get_subscription(ORG, sub["uuid"])
    assert enabled is not None and enabled.status == "ACTIVE"

    rec.default = 200
    done = await post_form(harness, base + "/replay?since=1h")
    assert "1 failed deliveries since" in done  # the TestMessage that met the 410
    await rec.wait_for(2, "TestMessage")


async def test_retry_of_a_pending_delivery_is_refused(
    harness_factory: Callable[..., Awaitable[Harness]],
    receiver_factory: Callable[..., Awaitable[Receiver]],
) -> None:
    h = await harness_factory(delivery={"retry_schedule": ["1h"]})
    rec = await receiver_factory(default=500)
    token = h.token()
    sub = await h.subscribe(token, rec.url)
    await rec.wait_for(1)
    await h.idle()
    views = await h.runtime.store.list_deliveries(sub["uuid"], "pending", 1, None)
    assert views and views[0].attempts == 1  # waiting an hour for its next attempt
    await sign_in(h.api, token)
    path = f"/console/deliveries/{views[0].id}/retry"
    page = await (await h.api.get(path)).text()
    resp = await h.api.post(path, data={"csrf": csrf_of(page)})
    assert resp.status == 409 and "still pending" in await resp.text()


async def test_delivery_log_filters_and_pages(harness: Harness, receiver: Receiver) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, receiver.url, ["ProductCreated", "ProductUpdated"])
    for i in range(60):
        await harness.emit("ProductUpdated" if i % 3 == 0 else "ProductCreated")
    await harness.idle()
    await sign_in(harness.api, token)
    base = f"/console/subscriptions/{sub['uuid']}"
    first = await (await harness.api.get(base)).text()
    ids = [int(i) for i in re.findall(r'class="delivery-link">#(\d+)<', first)]
    assert len(ids) == 50 and ids == sorted(ids, reverse=True)
    older = re.search(r'href="\?([^"]+)" id="older"', first)
    assert older
    second = await (await harness.api.get(base + "?" + older.group(1).replace("&amp;", "&"))).text()
    rest = [int(i) for i in re.findall(r'class="delivery-link">#(\d+)<', second)]
    assert len(rest) == 11 and max(rest) < min(ids)  # 60 events and the TestMessage
    updated = await (await harness.api.get(base + "?event=ProductUpdated")).text()
    assert len(re.findall(r'class="delivery-link"', updated)) == 20
    assert (await harness.api.get(base + "?since=1h&until=2000-01-01T00:00")).status == 200
    none = await (await harness.api.get(base + "?until=2000-01-01T00:00")).text()
    assert "No deliveries match." in none
    assert (await harness.api.get(base + "?since=yesterday")).status == 400


async def test_log_page_stops_after_its_scan_window(harness: Harness, receiver: Receiver) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, receiver.url)
    seed_history(harness.config.storage.path, [sub["uuid"]], ORG, deliveries=6000)
    console = harness.runtime.store.console
    page = await console.log_page(sub["uuid"], LogFilter(event_name="NoSuchEvent"), 50)
    assert page.rows == () and page.next_before_id is not None  # "search further back"
    rest = await console.log_page(
        sub["uuid"], LogFilter(event_name="NoSuchEvent", before_id=page.next_before_id), 50
    )
    assert rest.rows == () and rest.next_before_id is None


async def test_counts_kept_in_memory_match_a_direct_count(
    harness: Harness, receiver: Receiver
) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, receiver.url)
    await receiver.wait_for(1)
    await harness.idle()
    path = harness.config.storage.path
    seed_history(path, [sub["uuid"]], ORG, deliveries=2000)
    day = Rollup(lambda: harness.runtime.store.console, 600_000, 24 * 3600 * 1000)
    hour = Rollup(lambda: harness.runtime.store.console, 60_000, 3600 * 1000)

    def direct(window_ms: int) -> tuple[int, int]:
        conn = sqlite3.connect(path)
        try:
            row = conn.execute(
                "SELECT sum(status = 'delivered'), sum(status = 'failed') FROM deliveries"
                " WHERE finished_ms >= ?",
                (int(time.time() * 1000) - window_ms,),
            ).fetchone()
        finally:
            conn.close()
        return int(row[0]), int(row[1])

    for rollup in (day, hour):
        first = await rollup.window(None)
        counts = first.by_subscription[sub["uuid"]]
        assert (counts.delivered, counts.failed) == direct(rollup.window_ms)
    for _ in range(5):  # finishes after the buckets were counted
        await harness.emit()
    await harness.idle()
    for rollup in (day, hour):
        again = await rollup.window({sub["uuid"]})
        counts = again.by_subscription[sub["uuid"]]
        assert (counts.delivered, counts.failed) == direct(rollup.window_ms)
        total = sum(b.delivered for b in again.buckets)
        assert total <= counts.delivered  # the partial first bucket is left out of the chart
    other = await day.window({"no-such-subscription"})
    assert other.by_subscription == {} and sum(b.delivered for b in other.buckets) == 0
