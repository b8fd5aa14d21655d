"""Delivery (SPEC §6): envelope, signatures, retries, status changes, limits, circuit breaker."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from pusherd import __version__
from pusherd.store.types import DeliveryView
from tests.conftest import ORG, Harness, Receiver

HarnessFactory = Callable[..., Awaitable[Harness]]
ReceiverFactory = Callable[..., Awaitable[Receiver]]

ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def wait_until(check: Callable[[], Awaitable[bool]], limit_s: float = 10.0) -> None:
    """Poll an async condition until it holds or the deadline passes."""
    deadline = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


async def deliveries(h: Harness, sub: dict[str, Any], event_name: str) -> list[DeliveryView]:
    """The subscription's deliveries of one event type, oldest first, each with its attempts."""
    rows = await h.runtime.store.list_deliveries(sub["uuid"], None, 1000, None)
    out = []
    for row in sorted(rows, key=lambda r: r.id):
        if row.event_name == event_name:
            full = await h.runtime.store.get_delivery(row.id, ORG)
            assert full is not None
            out.append(full)
    return out


async def settled(h: Harness, sub: dict[str, Any], event_name: str) -> list[DeliveryView]:
    """Wait until no delivery of that event type is pending any more; return them."""

    async def done() -> bool:
        views = await deliveries(h, sub, event_name)
        return bool(views) and all(v.status != "pending" for v in views)

    await wait_until(done)
    return await deliveries(h, sub, event_name)


async def sub_status(h: Harness, token: str, sub: dict[str, Any]) -> str:
    resp = await h.api.get("/organizations/self/subscriptions", headers=h.auth(token))
    assert resp.status == 200
    for s in await resp.json():
        if s["uuid"] == sub["uuid"]:
            status: str = s["status"]
            return status
    raise AssertionError("subscription not listed")


async def subscribed(
    h: Harness, receiver: Receiver, event_names: list[str] | None = None
) -> tuple[str, dict[str, Any]]:
    """A token and a subscription to receiver whose TestMessage has been delivered."""
    token = h.token()
    sub = await h.subscribe(token, receiver.url, event_names)
    await receiver.wait_for(1, "TestMessage")
    await h.idle()
    return token, sub


def hold(release: asyncio.Event, status: int = 200) -> Callable[[web.Request], Awaitable[Any]]:
    """A scripted answer that waits for `release` (bounded) before answering."""

    async def answer(request: web.Request) -> web.StreamResponse:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 20)
        return web.Response(status=status, text="late")

    return answer


# -- envelope and signatures -------------------------------------------------------------------


async def test_envelope_headers_and_both_signatures_verify(
    harness: Harness, receiver: Receiver
) -> None:
    _, sub = await subscribed(harness, receiver)
    key = sub["signingKey"]
    payload = {"productUuid": "p-1", "name": "Kaffe ☕", "tags": [1, 2.5, None, True]}
    given = "2026-11-22T14:30:00.123Z"
    first = await harness.emit(payload=payload, messageId="with-ts", timestamp=given)
    second = await harness.emit(payload="just a string", messageId="no-ts")
    await receiver.wait_for(2, "ProductCreated")

    for req, answer in zip(receiver.requests[1:], (first, second), strict=True):
        body = req.json()
        assert set(body) == {
            "organizationUuid",
            "messageUuid",
            "eventName",
            "messageId",
            "payload",
            "timestamp",
        }
        assert body["organizationUuid"] == ORG
        assert body["messageUuid"] == answer["messageUuid"]
        assert body["messageId"] == answer["messageId"]
        assert body["eventName"] == "ProductCreated"
        assert isinstance(body["payload"], str)

        headers = {k.lower(): v for k, v in req.headers.items()}
        assert headers["content-type"] == "application/json"
        assert headers["user-agent"] == f"pusherd/{__version__}"
        assert headers["webhook-id"] == answer["messageUuid"]
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 30

        # Standard Webhooks, with the reference package; key = signingKey as UTF-8 bytes.
        assert Webhook(key.encode()).verify(req.body, req.headers) == body
        # The Zettle recipe: HMAC-SHA256(signingKey, timestamp + "." + payload), lowercase hex.
        message = (body["timestamp"] + "." + body["payload"]).encode()
        expected = hmac.new(key.encode(), message, hashlib.sha256).hexdigest()
        assert headers["x-izettle-signature"] == expected

    one, two = (r.json() for r in receiver.requests[1:])
    assert orjson.loads(one["payload"]) == payload
    assert one["timestamp"] == given
    assert orjson.loads(two["payload"]) == "just a string"
    assert ISO_MS.match(two["timestamp"]), two["timestamp"]


async def test_test_message_is_queued_to_a_new_subscription(
    harness: Harness, receiver: Receiver
) -> None:
    sub = await harness.subscribe(harness.token(), receiver.url)
    await receiver.wait_for(1, "TestMessage")
    body = receiver.events("TestMessage")[0]
    assert orjson.loads(body["payload"]) == {"data": "payload"}
    Webhook(sub["signingKey"].encode()).verify(
        receiver.requests[0].body, receiver.requests[0].headers
    )


# -- retries -----------------------------------------------------------------------------------


async def test_500_500_200_is_delivered_on_attempt_3_with_a_stable_webhook_id(
    harness: Harness, receiver: Receiver
) -> None:
    _, sub = await subscribed(harness, receiver)

    async def big_500(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text="E" * 5000)

    receiver.statuses = [big_500, 500, 200]
    answer = await harness.emit(messageId="retry-me")
    await receiver.wait_for(3, "ProductCreated")
    await harness.idle()

    ids = [
        r.headers["webhook-id"] for r in receiver.requests if r.json()["messageId"] == "retry-me"
    ]
    assert ids == [answer["messageUuid"]] * 3
    [d] = await deliveries(harness, sub, "ProductCreated")
    assert d.status == "delivered"
    assert d.attempts == 3
    assert [a.status_code for a in d.attempt_log] == [500, 500, 200]
    assert all(a.error is None for a in d.attempt_log)
    assert all(a.duration_ms > 0 for a in d.attempt_log)
    assert d.attempt_log[0].response_body == "E" * 1024
    assert d.attempt_log[1].response_body == "nope"
    assert d.attempt_log[2].response_body == "ok"
    starts = [a.started_ms for a in d.attempt_log]
    assert starts == sorted(starts)
    assert len(receiver.events("ProductCreated")) == 3  # nothing after the success


async def test_410_disables_the_subscription_at_once(harness: Harness, receiver: Receiver) -> None:
    token, sub = await subscribed(harness, receiver)
    receiver.statuses = [410]
    await harness.emit(messageId="gone-1")
    await receiver.wait_for(1, "ProductCreated")
    await wait_until(lambda: _is(harness, token, sub, "DISABLED"))
    await harness.idle()

    [d] = await deliveries(harness, sub, "ProductCreated")
    assert d.status == "failed"
    assert [a.status_code for a in d.attempt_log] == [410]
    later = await harness.emit(messageId="gone-2")
    assert later["deliveries"] == 0
    await harness.idle()
    assert len(receiver.events("ProductCreated")) == 1


async def test_410_stops_the_other_queued_deliveries_of_that_subscription(
    harness_factory: HarnessFactory, receiver: Receiver
) -> None:
    h = await harness_factory(delivery={"per_destination": 1})
    token, sub = await subscribed(h, receiver)
    receiver.statuses = [410]
    resp = await h.ingest.post(
        "/events",
        json=[
            {"eventName": "ProductCreated", "organizationUuid": ORG, "payload": i} for i in range(5)
        ],
    )
    assert resp.status == 202
    views = await settled(h, sub, "ProductCreated")
    assert [v.status for v in views] == ["failed"] * 5
    assert [v.attempts for v in views] == [1, 0, 0, 0, 0]
    assert len(receiver.events("ProductCreated")) == 1
    assert await sub_status(h, token, sub) == "DISABLED"


async def _is(h: Harness, token: str, sub: dict[str, Any], status: str) -> bool:
    return await sub_status(h, token, sub) == status


async def test_429_retry_after_delays_the_next_attempt(
    harness_factory: HarnessFactory, receiver: Receiver
) -> None:
    h = await harness_factory(delivery={"retry_schedule": ["50ms", "50ms"]})
    _, sub = await subscribed(h, receiver)
    receiver.headers = {"Retry-After": "1"}
    receiver.statuses = [429]
    await h.emit()
    await receiver.wait_for(2, "ProductCreated", timeout=5)
    first, second = receiver.requests[1:3]
    assert second.at - first.at >= 1.0
    await h.idle()
    [d] = await deliveries(h, sub, "ProductCreated")
    assert [a.status_code for a in d.attempt_log] == [429, 200]
    assert d.status == "delivered"


async def test_redirect_is_a_failure_and_is_not_followed(
    harness: Harness, receiver_factory: ReceiverFactory
) -> None:
    target = await receiver_factory()
    receiver = await receiver_factory()
    _, sub = await subscribed(harness, receiver)

    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": target.url})

    receiver.statuses = [redirect, 302, 200]
    await harness.emit()
    await receiver.wait_for(3, "ProductCreated")
    await harness.idle()
    [d] = await deliveries(harness, sub, "ProductCreated")
    assert [a.status_code for a in d.attempt_log] == [307, 302, 200]
    assert target.requests == []


async def test_timeout_is_a_failed_attempt_with_an_error(
    harness_factory: HarnessFactory, receiver: Receiver
) -> None:
    h = await harness_factory(delivery={"timeout": "300ms"})
    _, sub = await subscribed(h, receiver)
    release = asyncio.Event()
    receiver.statuses = [hold(release)]
    try:
        await h.emit()
        await receiver.wait_for(2, "ProductCreated", timeout=5)
        await h.idle()
    finally:
        release.set()
    [d] = await deliveries(h, sub, "ProductCreated")
    assert d.status == "delivered"
    timed_out, ok = d.attempt_log
    assert timed_out.status_code is None
    assert timed_out.error and "timeout" in timed_out.error.lower()
    assert 250 <= timed_out.duration_ms < 2000
    assert ok.status_code == 200


async def test_connection_refused_retries_until_the_schedule_is_exhausted(
    harness: Harness,
) -> None:
    # The TestMessage and this event fail too often for SPEC's 30s breaker pause to fit a test.
    harness.runtime.dispatcher.breaker_pause_s = 0.05
    token = harness.token()
    sub = await harness.subscribe(token, f"http://127.0.0.1:{closed_port()}/hook")
    await harness.emit()
    [d] = await settled(harness, sub, "ProductCreated")
    assert d.status == "failed"
    assert d.attempts == 4  # the first attempt and three retries (schedule of 3)
    assert all(a.status_code is None and a.error for a in d.attempt_log)
    assert d.last_error
    assert await sub_status(harness, token, sub) == "FAILING"


async def test_exhausted_schedule_fails_the_delivery_and_it_stays_failed(
    harness: Harness, receiver: Receiver
) -> None:
    _, sub = await subscribed(harness, receiver)
    receiver.default = 500
    await harness.emit()
    [d] = await settled(harness, sub, "ProductCreated")
    assert d.status == "failed"
    assert [a.status_code for a in d.attempt_log] == [500, 500, 500, 500]
    assert len(receiver.events("ProductCreated")) == 4


# -- subscription status -----------------------------------------------------------------------


async def test_status_goes_failing_on_a_failure_and_active_on_the_next_success(
    harness: Harness, receiver: Receiver
) -> None:
    token, sub = await subscribed(harness, receiver)
    assert await sub_status(harness, token, sub) == "ACTIVE"
    release = asyncio.Event()
    receiver.statuses = [500, hold(release)]
    try:
        await harness.emit()
        await receiver.wait_for(2, "ProductCreated")  # the retry is being answered (held)
        assert await sub_status(harness, token, sub) == "FAILING"
    finally:
        release.set()
    await harness.idle()
    assert await sub_status(harness, token, sub) == "ACTIVE"


async def test_continuous_failure_for_disable_after_disables(
    harness_factory: HarnessFactory, receiver_factory: ReceiverFactory
) -> None:
    h = await harness_factory(delivery={"disable_after": "200ms", "retry_schedule": ["150ms"] * 10})
    receiver = await receiver_factory(default=500)
    token = h.token()
    sub = await h.subscribe(token, receiver.url)
    await wait_until(lambda: _is(h, token, sub, "DISABLED"))
    await h.idle()
    attempts = len(receiver.requests)
    assert 2 <= attempts < 6  # the TestMessage gave up well before its schedule ran out
    later = await h.emit()
    assert later["deliveries"] == 0
    await h.idle()
    assert len(receiver.requests) == attempts


# -- limits ------------------------------------------------------------------------------------


async def test_hanging_destination_does_not_slow_a_healthy_one(
    harness_factory: HarnessFactory, receiver_factory: ReceiverFactory
) -> None:
    h = await harness_factory(delivery={"per_destination": 2, "timeout": "3s"})
    healthy, hanging = await receiver_factory(), await receiver_factory()
    release = asyncio.Event()
    hanging.statuses = [hold(release) for _ in range(100)]
    token = h.token()
    await h.subscribe(token, healthy.url)
    await h.subscribe(token, hanging.url)
    try:
        await healthy.wait_for(1, "TestMessage")
        start = time.monotonic()
        resp = await h.ingest.post(
            "/events",
            json=[
                {"eventName": "ProductCreated", "organizationUuid": ORG, "payload": i}
                for i in range(20)
            ],
        )
        assert resp.status == 202
        await healthy.wait_for(20, "ProductCreated", timeout=2.5)
        assert time.monotonic() - start < 2.5  # before the hanging attempts even time out
        # It has never answered: it holds one slot (slow start), not its two.
        assert len(hanging.requests) == 1
    finally:
        release.set()


# -- circuit breaker ---------------------------------------------------------------------------


async def test_circuit_breaker_pauses_an_origin_and_a_probe_closes_it(
    harness_factory: HarnessFactory, receiver: Receiver
) -> None:
    h = await harness_factory(
        delivery={"per_destination": 1, "retry_schedule": ["1500ms"], "jitter": 0.0}
    )
    h.runtime.dispatcher.breaker_pause_s = 1.0  # SPEC's 30s is too slow for a test
    _, sub = await subscribed(h, receiver)
    receiver.statuses = [500] * 5
    resp = await h.ingest.post(
        "/events",
        json=[
            {
                "eventName": "ProductCreated",
                "organizationUuid": ORG,
                "payload": i,
                "messageId": str(i),
            }
            for i in range(8)
        ],
    )
    assert resp.status == 202
    await receiver.wait_for(6, "ProductCreated", timeout=5)
    arrivals = receiver.requests[1:]
    pause = arrivals[5].at - arrivals[4].at
    assert pause >= 1.0, pause  # nothing went out while the circuit was open
    assert pause < 1.4, pause

    await receiver.wait_for(13, "ProductCreated", timeout=10)
    await h.idle()
    after_probe = [r.at for r in receiver.requests[7:9]]
    assert after_probe[1] - arrivals[5].at < 0.5  # the probe closed it: the rest go at once
    views = await deliveries(h, sub, "ProductCreated")
    assert [d.status for d in views] == ["delivered"] * 8
    # The five failures were spent on five deliveries; the others waited without an attempt.
    assert sorted(d.attempts for d in views) == [1, 1, 1, 2, 2, 2, 2, 2]
    assert len(receiver.events("ProductCreated")) == 13


async def test_the_probe_goes_when_the_pause_ends_with_nothing_written_meanwhile(
    harness_factory: HarnessFactory, receiver: Receiver
) -> None:
    # Retries an hour away: while the circuit is open nothing is committed anywhere, so the
    # idle poll (which skips its claim when nothing was committed) must not be what holds the
    # probe back; the pause's end alone starts it. The pause spans two polls.
    h = await harness_factory(delivery={"per_destination": 1, "retry_schedule": ["1h"]})
    h.runtime.dispatcher.breaker_pause_s = 2.5
    await subscribed(h, receiver)
    receiver.statuses = [500] * 5
    events = [
        {"eventName": "ProductCreated", "organizationUuid": ORG, "payload": i, "messageId": str(i)}
        for i in range(6)
    ]
    assert (await h.ingest.post("/events", json=events)).status == 202
    await receiver.wait_for(6, "ProductCreated", timeout=8)
    arrivals = [r.at for r in receiver.requests if r.json()["eventName"] == "ProductCreated"]
    pause = arrivals[5] - arrivals[4]
    assert 2.5 <= pause < 3.1, pause


def test_breaker_default_pause_is_spec_value() -> None:
    from pusherd.delivery.origins import BREAKER_FIRST_PAUSE_S, Breaker

    assert BREAKER_FIRST_PAUSE_S == 30.0
    assert Breaker().pause_s == 30.0


async def test_deliveries_of_a_subscription_share_one_message_uuid_per_event(
    harness: Harness, receiver_factory: ReceiverFactory
) -> None:
    a, b = await receiver_factory(), await receiver_factory()
    token = harness.token()
    await harness.subscribe(token, a.url)
    await harness.subscribe(token, b.url)
    answer = await harness.emit(messageId=str(uuid.uuid4()))
    assert answer["deliveries"] == 2
    await a.wait_for(1, "ProductCreated")
    await b.wait_for(1, "ProductCreated")
    assert a.events("ProductCreated")[0]["messageUuid"] == answer["messageUuid"]
    assert b.events("ProductCreated")[0]["messageUuid"] == answer["messageUuid"]


async def test_a_hanging_answer_on_a_new_connection_holds_the_next_request_briefly(
    harness_factory: HarnessFactory, receiver: Receiver
) -> None:
    # A request on a new connection to a keep-alive receiver holds the origin's next ones so
    # that they cannot overtake it (SPEC §5), until it is answered or 0.5 s have passed: a
    # receiver that hangs must not cut the origin to one attempt until its timeout (30 s).
    h = await harness_factory(delivery={"per_destination": 3})
    await subscribed(h, receiver)  # its TestMessage leaves a keep-alive connection pooled
    for i in range(2):  # successes raise the origin's slow start to 3 attempts
        await h.emit(messageId=f"ok{i}")
        await receiver.wait_for(1 + i, "ProductCreated", timeout=5)
    release = asyncio.Event()
    receiver.statuses = [hold(release)] * 3
    try:
        for i in range(3):  # one at a time: the first reuses the pooled connection
            await h.emit(messageId=f"m{i}")
            await receiver.wait_for(3 + i, "ProductCreated", timeout=5)
        at = [r.at for r in receiver.requests[3:]]
        # The second opened a new connection and hangs; the third went 0.5 s after it.
        assert 0.4 <= at[2] - at[1] < 1.5, at
    finally:
        release.set()
    await receiver.wait_for(6, timeout=5)
