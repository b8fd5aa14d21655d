"""PayStell dialect (/api/webhooks, SPEC §4) through real HTTP, real SQLite and real receivers."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from standardwebhooks import Webhook

from tests.conftest import OTHER_ORG, Harness, Received, Receiver

ReceiverFactory = Callable[..., Awaitable[Receiver]]
HarnessFactory = Callable[..., Awaitable[Harness]]
WEBHOOK_FIELDS = {"id", "url", "eventTypes", "isActive", "contactEmail", "createdAt", "updatedAt"}
EVENT_FIELDS = {
    "id",
    "webhookId",
    "eventType",
    "status",
    "attempts",
    "createdAt",
    "deliveredAt",
    "lastStatusCode",
    "lastError",
    "nextAttemptAt",
}
UNKNOWN_UUID = "0b3f6c2e-9a51-11ee-8c90-0242ac120002"


async def call(
    h: Harness, method: str, path: str, token: str, body: Any = None, **params: str
) -> tuple[int, Any]:
    """One API request; (status, parsed JSON body or None)."""
    kwargs: dict[str, Any] = {"headers": h.auth(token), "params": params}
    if body is not None:
        kwargs["data"] = body if isinstance(body, bytes) else orjson.dumps(body)
    resp = await h.api.request(method, path, **kwargs)
    raw = await resp.read()
    return resp.status, orjson.loads(raw) if raw else None


def assert_error(status: int, body: Any, expected: int) -> None:
    assert status == expected, body
    assert body["status"] == "error"
    assert isinstance(body["message"], str) and body["message"]


async def register(
    h: Harness, token: str, url: str, event_types: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    """POST /api/webhooks/register and return `data` (asserting 201)."""
    body = {"url": url, "eventTypes": ["ProductCreated"] if event_types is None else event_types}
    status, answer = await call(h, "POST", "/api/webhooks/register", token, {**body, **extra})
    assert status == 201, answer
    assert answer["status"] == "success"
    data: dict[str, Any] = answer["data"]
    return data


async def eventually(
    check: Callable[[], Awaitable[Any]], deadline_s: float = 10.0, what: str = "condition"
) -> Any:
    """Poll `check` until it returns something truthy (a deadline, not a fixed sleep)."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def event_in(h: Harness, token: str, event_id: str, *statuses: str) -> dict[str, Any]:
    """Wait until the delivery has one of `statuses` (and no attempt is running), return it."""

    async def check() -> dict[str, Any] | None:
        status, body = await call(h, "GET", f"/api/webhooks/events/{event_id}", token)
        assert status == 200, body
        data: dict[str, Any] = body["data"]
        return data if data["status"] in statuses else None

    result: dict[str, Any] = await eventually(check, what=f"event {event_id} in {statuses}")
    return result


def verify_standard(received: Received, key: str) -> None:
    """Standard Webhooks verification with the standardwebhooks package (raises on mismatch)."""
    Webhook(key.encode()).verify(received.body, received.headers)


def zettle_signature_ok(received: Received, key: str) -> bool:
    envelope = received.json()
    message = f"{envelope['timestamp']}.{envelope['payload']}".encode()
    expected = hmac.new(key.encode(), message, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, received.headers["X-iZettle-Signature"])


# -- register ---------------------------------------------------------------------------------


async def test_register_returns_201_with_secret_and_queues_signed_test_message(
    harness: Harness, receiver: Receiver
) -> None:
    token = harness.token()
    data = await register(harness, token, receiver.url, contactEmail="ops@example.com")
    assert set(data) == WEBHOOK_FIELDS | {"secretKey"}
    assert data["url"] == receiver.url
    assert data["eventTypes"] == ["ProductCreated"]
    assert data["isActive"] is True
    assert data["contactEmail"] == "ops@example.com"
    assert data["createdAt"].endswith("Z") and data["updatedAt"].endswith("Z")
    secret = data["secretKey"]
    assert len(secret) == 64 and secret.isalnum()

    await receiver.wait_for(1, "TestMessage")
    got = receiver.requests[0]
    verify_standard(got, secret)
    assert zettle_signature_ok(got, secret)

    # The Zettle dialect sees the same subscription.
    resp = await harness.api.get("/organizations/self/subscriptions", headers=harness.auth(token))
    [sub] = await resp.json()
    assert sub["uuid"] == data["id"] and sub["status"] == "ACTIVE"
    assert sub["signingKey"] == secret


async def test_register_with_own_secret_signs_with_it(harness: Harness, receiver: Receiver) -> None:
    token = harness.token()
    secret = "s3cr3t-" + "x" * 25
    data = await register(harness, token, receiver.url, [], secretKey=secret)
    assert data["secretKey"] == secret
    assert data["eventTypes"] == [] and data["contactEmail"] is None
    await receiver.wait_for(1, "TestMessage")
    verify_standard(receiver.requests[0], secret)


@pytest.mark.parametrize(
    "body",
    [
        [],
        "a string",
        {"eventTypes": ["ProductCreated"]},
        {"url": "https://example.com/hook"},
        {"url": 42, "eventTypes": ["ProductCreated"]},
        {"url": "ftp://example.com/hook", "eventTypes": ["ProductCreated"]},
        {"url": "not a url", "eventTypes": ["ProductCreated"]},
        {"url": "https://example.com/hook", "eventTypes": "ProductCreated"},
        {"url": "https://example.com/hook", "eventTypes": ["NoSuchEvent"]},
        {"url": "https://example.com/hook", "eventTypes": [1]},
        {"url": "https://example.com/hook", "eventTypes": [], "secretKey": "x" * 31},
        {"url": "https://example.com/hook", "eventTypes": [], "secretKey": 12345},
        {"url": "https://example.com/hook", "eventTypes": [], "contactEmail": "nope"},
        {"url": "https://example.com/hook", "eventTypes": [], "contactEmail": 7},
    ],
)
async def test_register_rejects_invalid_input_with_400(harness: Harness, body: Any) -> None:
    token = harness.token()
    status, answer = await call(harness, "POST", "/api/webhooks/register", token, body)
    assert_error(status, answer, 400)
    status, answer = await call(harness, "GET", "/api/webhooks", token)
    assert answer["data"] == []


async def test_register_rejects_bad_json_blocked_url_scope_and_auth(
    harness_factory: HarnessFactory,
) -> None:
    h = await harness_factory(delivery={"allow_private_destinations": False})
    token = h.token()
    status, answer = await call(h, "POST", "/api/webhooks/register", token, b"{not json")
    assert_error(status, answer, 400)
    body = {"url": "https://127.0.0.1/hook", "eventTypes": ["ProductCreated"]}
    status, answer = await call(h, "POST", "/api/webhooks/register", token, body)
    assert_error(status, answer, 400)
    assert "127.0.0.1" in answer["message"] or "private" in answer["message"].lower()

    product_only = h.token(scopes=("READ:PRODUCT",))
    body = {"url": "https://example.com/hook", "eventTypes": ["PaymentCreated"]}
    status, answer = await call(h, "POST", "/api/webhooks/register", product_only, body)
    assert_error(status, answer, 403)

    resp = await h.api.post("/api/webhooks/register", json=body)
    assert_error(resp.status, await resp.json(), 401)


# -- the id rule, get, update, delete, list -----------------------------------------------------


async def test_id_rule_for_get_put_delete(harness: Harness, receiver: Receiver) -> None:
    token = harness.token()
    for method in ("GET", "PUT", "DELETE"):
        status, answer = await call(harness, method, "/api/webhooks/register", token)
        assert_error(status, answer, 404)

    first = await register(harness, token, receiver.url)
    status, answer = await call(harness, "GET", "/api/webhooks/register", token)
    assert status == 200 and answer["status"] == "success"
    assert answer["data"]["id"] == first["id"]
    assert set(answer["data"]) == WEBHOOK_FIELDS  # no secret outside register/generate-secret

    second = await register(harness, token, receiver.url, ["ProductUpdated"])
    for method in ("GET", "PUT", "DELETE"):
        status, answer = await call(harness, method, "/api/webhooks/register", token)
        assert_error(status, answer, 409)
        assert "id" in answer["message"]
    status, answer = await call(harness, "GET", "/api/webhooks/register", token, id=second["id"])
    assert status == 200 and answer["data"]["eventTypes"] == ["ProductUpdated"]

    for bad in (UNKNOWN_UUID, "not-a-uuid"):
        for method in ("GET", "PUT", "DELETE"):
            status, answer = await call(harness, method, "/api/webhooks/register", token, id=bad)
            assert_error(status, answer, 404)

    # Another organization's webhook is invisible.
    other = harness.token(org=OTHER_ORG)
    for method in ("GET", "PUT", "DELETE"):
        status, answer = await call(
            harness, method, "/api/webhooks/register", other, id=first["id"]
        )
        assert_error(status, answer, 404)
    status, answer = await call(harness, "GET", "/api/webhooks", other)
    assert answer["data"] == []


async def test_update_changes_fields_and_is_active_maps_to_status(
    harness: Harness, receiver_factory: ReceiverFactory
) -> None:
    token = harness.token()
    old = await receiver_factory()
    new = await receiver_factory()
    hook = await register(harness, token, old.url)
    await old.wait_for(1, "TestMessage")

    body = {
        "url": new.url,
        "eventTypes": ["ProductUpdated"],
        "contactEmail": "new@example.com",
        "unknownField": True,
    }
    status, answer = await call(harness, "PUT", "/api/webhooks/register", token, body)
    assert status == 200, answer
    assert answer["status"] == "success" and answer["message"]
    data = answer["data"]
    assert set(data) == WEBHOOK_FIELDS
    assert data["url"] == new.url
    assert data["eventTypes"] == ["ProductUpdated"]
    assert data["contactEmail"] == "new@example.com"
    assert data["isActive"] is True
    assert data["updatedAt"] >= hook["updatedAt"]

    await harness.emit("ProductUpdated")
    await new.wait_for(1, "ProductUpdated")

    status, answer = await call(
        harness, "PUT", "/api/webhooks/register", token, {"isActive": False}
    )
    assert status == 200 and answer["data"]["isActive"] is False
    resp = await harness.api.get("/organizations/self/subscriptions", headers=harness.auth(token))
    assert (await resp.json())[0]["status"] == "DISABLED"
    assert (await harness.emit("ProductUpdated"))["deliveries"] == 0

    status, answer = await call(harness, "PUT", "/api/webhooks/register", token, {"isActive": True})
    assert status == 200 and answer["data"]["isActive"] is True
    resp = await harness.api.get("/organizations/self/subscriptions", headers=harness.auth(token))
    assert (await resp.json())[0]["status"] == "ACTIVE"
    assert (await harness.emit("ProductUpdated"))["deliveries"] == 1
    await new.wait_for(2, "ProductUpdated")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ([1, 2], 400),
        ({"isActive": "no"}, 400),
        ({"eventTypes": ["NoSuchEvent"]}, 400),
        ({"eventTypes": "ProductCreated"}, 400),
        ({"url": ""}, 400),
        ({"url": "gopher://example.com/"}, 400),
        ({"url": None}, 400),
        ({"contactEmail": "not-an-address"}, 400),
        ({"eventTypes": ["PaymentCreated"]}, 403),
    ],
)
async def test_update_rejects_invalid_input(
    harness: Harness, receiver: Receiver, body: Any, code: int
) -> None:
    token = harness.token(scopes=("READ:PRODUCT",))
    hook = await register(harness, token, receiver.url)
    status, answer = await call(harness, "PUT", "/api/webhooks/register", token, body)
    assert_error(status, answer, code)
    status, answer = await call(harness, "GET", "/api/webhooks/register", token)
    assert answer["data"]["url"] == hook["url"]
    assert answer["data"]["eventTypes"] == hook["eventTypes"]


async def test_delete_and_list(harness: Harness, receiver: Receiver) -> None:
    token = harness.token()
    a = await register(harness, token, receiver.url)
    zettle = await harness.subscribe(token, receiver.url, ["ProductUpdated"])
    status, answer = await call(harness, "GET", "/api/webhooks", token)
    assert status == 200 and answer["status"] == "success"
    assert [w["id"] for w in answer["data"]] == [a["id"], zettle["uuid"]]
    assert all(set(w) == WEBHOOK_FIELDS for w in answer["data"])

    status, answer = await call(harness, "DELETE", "/api/webhooks/register", token, id=a["id"])
    assert status == 200 and answer == {
        "status": "success",
        "message": "Webhook deleted successfully",
    }
    status, answer = await call(harness, "GET", "/api/webhooks/register", token, id=a["id"])
    assert_error(status, answer, 404)
    # Only one is left, so no id is needed any more.
    status, answer = await call(harness, "DELETE", "/api/webhooks/register", token)
    assert status == 200
    status, answer = await call(harness, "GET", "/api/webhooks", token)
    assert answer["data"] == []


# -- generate-secret ------------------------------------------------------------------------------


async def test_generate_secret_without_webhook_only_returns_it(harness: Harness) -> None:
    token = harness.token()
    status, answer = await call(harness, "POST", "/api/webhooks/generate-secret", token)
    assert status == 200 and answer["status"] == "success"
    secret = answer["data"]["secret"]
    assert len(secret) >= 32 and secret.isalnum()
    status, answer = await call(harness, "GET", "/api/webhooks", token)
    assert answer["data"] == []


async def test_generate_secret_rotates_and_old_key_keeps_signing(
    harness: Harness, receiver: Receiver
) -> None:
    token = harness.token()
    hook = await register(harness, token, receiver.url)
    old = hook["secretKey"]
    await receiver.wait_for(1, "TestMessage")

    status, answer = await call(harness, "POST", "/api/webhooks/generate-secret", token)
    assert status == 200, answer
    new = answer["data"]["secret"]
    assert new != old and len(new) == 64

    await harness.emit("ProductCreated")
    await receiver.wait_for(1, "ProductCreated")
    got = receiver.requests[-1]
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    verify_standard(got, new)
    verify_standard(got, old)
    assert zettle_signature_ok(got, new)
    assert not zettle_signature_ok(got, old)

    # The secret is not shown by GET, only by the Zettle dialect (which always shows it).
    status, answer = await call(harness, "GET", "/api/webhooks/register", token)
    assert "secretKey" not in answer["data"]
    resp = await harness.api.get("/organizations/self/subscriptions", headers=harness.auth(token))
    assert (await resp.json())[0]["signingKey"] == new


async def test_generate_secret_id_rule(harness: Harness, receiver: Receiver) -> None:
    token = harness.token()
    a = await register(harness, token, receiver.url)
    await register(harness, token, receiver.url)
    status, answer = await call(harness, "POST", "/api/webhooks/generate-secret", token)
    assert_error(status, answer, 409)
    status, answer = await call(
        harness, "POST", "/api/webhooks/generate-secret", token, id=UNKNOWN_UUID
    )
    assert_error(status, answer, 404)
    status, answer = await call(harness, "POST", "/api/webhooks/generate-secret", token, id=a["id"])
    assert status == 200
    resp = await harness.api.get("/organizations/self/subscriptions", headers=harness.auth(token))
    keys = {s["uuid"]: s["signingKey"] for s in await resp.json()}
    assert keys[a["id"]] == answer["data"]["secret"]


# -- test sends -----------------------------------------------------------------------------------


async def test_test_send_reaches_every_active_webhook(
    harness: Harness, receiver_factory: ReceiverFactory
) -> None:
    token = harness.token()
    recs = [await receiver_factory() for _ in range(3)]
    hooks = [
        await register(harness, token, recs[0].url, ["ProductCreated"]),
        await register(harness, token, recs[1].url, ["PaymentCreated"]),
        await register(harness, token, recs[2].url, ["ProductCreated"]),
    ]
    status, _ = await call(
        harness, "PUT", "/api/webhooks/register", token, {"isActive": False}, id=hooks[2]["id"]
    )
    assert status == 200

    status, answer = await call(harness, "POST", "/api/webhooks/test", token)
    assert status == 200, answer
    assert answer["status"] == "success"
    events = answer["data"]["events"]
    assert [e["webhookId"] for e in events] == [hooks[0]["id"], hooks[1]["id"]]
    assert answer["data"]["eventId"] == events[0]["eventId"]
    assert all(isinstance(e["eventId"], str) and e["eventId"].isdigit() for e in events)

    for r in recs[:2]:
        await r.wait_for(1, "test.event")
        [envelope] = r.events("test.event")
        assert orjson.loads(envelope["payload"]) == {"test": True}
    for e in events:
        done = await event_in(harness, token, e["eventId"], "delivered")
        assert done["eventType"] == "test.event"
    assert recs[2].events("test.event") == []

    status, answer = await call(
        harness, "POST", "/api/webhooks/test", token, {"eventType": "order.paid_v2-x"}
    )
    assert status == 200 and len(answer["data"]["events"]) == 2
    await recs[0].wait_for(1, "order.paid_v2-x")


async def test_test_send_to_one_webhook(
    harness: Harness, receiver_factory: ReceiverFactory
) -> None:
    token = harness.token()
    r1 = await receiver_factory()
    r2 = await receiver_factory()
    h1 = await register(harness, token, r1.url)
    await register(harness, token, r2.url)
    status, answer = await call(
        harness, "POST", f"/api/webhooks/{h1['id']}/test", token, {"eventType": "ping"}
    )
    assert status == 200, answer
    assert answer["data"]["events"] == [
        {"webhookId": h1["id"], "eventId": answer["data"]["eventId"]}
    ]
    await r1.wait_for(1, "ping")
    await event_in(harness, token, answer["data"]["eventId"], "delivered")
    assert r2.events("ping") == []

    status, answer = await call(harness, "POST", f"/api/webhooks/{UNKNOWN_UUID}/test", token)
    assert_error(status, answer, 404)
    status, answer = await call(harness, "POST", "/api/webhooks/nope/test", token)
    assert_error(status, answer, 404)
    other = harness.token(org=OTHER_ORG)
    status, answer = await call(harness, "POST", f"/api/webhooks/{h1['id']}/test", other)
    assert_error(status, answer, 404)


@pytest.mark.parametrize(
    "body",
    [
        {"eventType": "has space"},
        {"eventType": "x" * 101},
        {"eventType": 5},
        {"eventType": ""},
        [1],
    ],
)
async def test_test_send_rejects_bad_event_type(
    harness: Harness, receiver: Receiver, body: Any
) -> None:
    token = harness.token()
    hook = await register(harness, token, receiver.url)
    for path in ("/api/webhooks/test", f"/api/webhooks/{hook['id']}/test"):
        status, answer = await call(harness, "POST", path, token, body)
        assert_error(status, answer, 400)


async def test_test_send_without_active_webhook_is_404(harness: Harness) -> None:
    token = harness.token()
    status, answer = await call(harness, "POST", "/api/webhooks/test", token)
    assert_error(status, answer, 404)


# -- delivery log, one event, retry, metrics ------------------------------------------------------


async def test_event_log_pagination_filter_and_fields(
    harness: Harness, receiver_factory: ReceiverFactory
) -> None:
    # The TestMessage fails for good (4 attempts); everything after it is delivered.
    receiver = await receiver_factory(statuses=[500, 500, 500, 500])
    token = harness.token()
    hook = await register(harness, token, receiver.url)
    first = await call(harness, "GET", f"/api/webhooks/{hook['id']}/events", token)
    test_id = first[1]["data"]["events"][0]["id"]
    failed = await event_in(harness, token, test_id, "failed")
    assert failed["attempts"] == 4 and failed["lastStatusCode"] == 500
    assert failed["deliveredAt"] is None and failed["nextAttemptAt"] is None
    for _ in range(4):
        await harness.emit("ProductCreated")
    await receiver.wait_for(4, "ProductCreated")

    path = f"/api/webhooks/{hook['id']}/events"

    async def all_delivered() -> bool:
        _, body = await call(harness, "GET", path, token, status="delivered")
        return len(body["data"]["events"]) == 4

    await eventually(all_delivered, what="4 delivered events")

    status, answer = await call(harness, "GET", path, token)
    assert status == 200 and answer["status"] == "success"
    events = answer["data"]["events"]
    assert answer["data"]["nextCursor"] is None
    assert len(events) == 5
    assert [int(e["id"]) for e in events] == sorted((int(e["id"]) for e in events), reverse=True)
    assert events[-1]["id"] == test_id
    newest = events[0]
    assert set(newest) == EVENT_FIELDS
    assert newest["eventType"] == "ProductCreated" and newest["status"] == "delivered"
    assert newest["attempts"] == 1 and newest["lastStatusCode"] == 200
    assert newest["deliveredAt"].endswith("Z") and newest["lastError"] is None

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        status, answer = await call(harness, "GET", path, token, **params)
        assert status == 200
        assert len(answer["data"]["events"]) <= 2
        seen += [e["id"] for e in answer["data"]["events"]]
        cursor = answer["data"]["nextCursor"]
        if cursor is None:
            break
    assert seen == [e["id"] for e in events]

    status, answer = await call(harness, "GET", path, token, status="failed")
    assert [e["id"] for e in answer["data"]["events"]] == [test_id]
    status, answer = await call(harness, "GET", path, token, status="pending")
    assert answer["data"] == {"events": [], "nextCursor": None}

    for bad in ({"status": "cancelled"}, {"limit": "0"}, {"limit": "201"}, {"limit": "x"}):
        status, answer = await call(harness, "GET", path, token, **bad)
        assert_error(status, answer, 400)
    status, answer = await call(harness, "GET", path, token, cursor="abc")
    assert_error(status, answer, 400)
    status, answer = await call(harness, "GET", path, token, limit="200")
    assert status == 200

    status, answer = await call(harness, "GET", f"/api/webhooks/{UNKNOWN_UUID}/events", token)
    assert_error(status, answer, 404)
    other = harness.token(org=OTHER_ORG)
    status, answer = await call(harness, "GET", path, other)
    assert_error(status, answer, 404)


async def test_one_event_with_attempt_log(
    harness: Harness, receiver_factory: ReceiverFactory
) -> None:
    receiver = await receiver_factory(statuses=[503])
    token = harness.token()
    hook = await register(harness, token, receiver.url)
    _, listing = await call(harness, "GET", f"/api/webhooks/{hook['id']}/events", token)
    event_id = listing["data"]["events"][0]["id"]
    data = await event_in(harness, token, event_id, "delivered")
    assert set(data) == EVENT_FIELDS | {"attemptLog"}
    assert data["eventType"] == "TestMessage" and data["attempts"] == 2
    failed, ok = data["attemptLog"]
    assert failed["statusCode"] == 503 and failed["responseBody"] == "nope"
    assert ok["statusCode"] == 200 and ok["responseBody"] == "ok" and ok["error"] is None
    assert failed["startedAt"] <= ok["startedAt"] and ok["startedAt"].endswith("Z")
    assert isinstance(ok["durationMs"], int | float) and ok["durationMs"] >= 0
    assert len(receiver.requests) == 2

    for bad in ("abc", "1.5", "-1", "99999999999999999999999", str(int(event_id) + 1000)):
        status, answer = await call(harness, "GET", f"/api/webhooks/events/{bad}", token)
        assert_error(status, answer, 404)
    other = harness.token(org=OTHER_ORG)
    status, answer = await call(harness, "GET", f"/api/webhooks/events/{event_id}", other)
    assert_error(status, answer, 404)


async def test_retry_failed_then_delivered(
    harness: Harness, receiver_factory: ReceiverFactory
) -> None:
    receiver = await receiver_factory(statuses=[500, 500, 500, 500])
    token = harness.token()
    hook = await register(harness, token, receiver.url)
    _, listing = await call(harness, "GET", f"/api/webhooks/{hook['id']}/events", token)
    event_id = listing["data"]["events"][0]["id"]
    await event_in(harness, token, event_id, "failed")
    assert len(receiver.requests) == 4

    # The receiver answers 200 now: the retry arrives and the delivery is delivered.
    status, answer = await call(harness, "POST", f"/api/webhooks/events/{event_id}/retry", token)
    assert status == 202, answer
    assert answer["status"] == "success" and answer["message"]
    assert answer["data"] == {"jobId": event_id, "status": "pending"}
    await receiver.wait_for(5, "TestMessage")
    done = await event_in(harness, token, event_id, "delivered")
    assert done["attempts"] == 5 and done["lastStatusCode"] == 200
    first_uuid = receiver.requests[0].json()["messageUuid"]
    assert receiver.requests[4].json()["messageUuid"] == first_uuid

    # A delivered one can be replayed too.
    status, answer = await call(harness, "POST", f"/api/webhooks/events/{event_id}/retry", token)
    assert status == 202
    await receiver.wait_for(6, "TestMessage")
    await event_in(harness, token, event_id, "delivered")

    for bad in ("abc", "999999"):
        status, answer = await call(harness, "POST", f"/api/webhooks/events/{bad}/retry", token)
        assert_error(status, answer, 404)
    other = harness.token(org=OTHER_ORG)
    status, answer = await call(harness, "POST", f"/api/webhooks/events/{event_id}/retry", other)
    assert_error(status, answer, 404)


async def test_retry_while_pending_is_409(
    harness_factory: HarnessFactory, receiver_factory: ReceiverFactory
) -> None:
    h = await harness_factory(delivery={"retry_schedule": ["1h"]})
    receiver = await receiver_factory(default=500)
    token = h.token()
    hook = await register(h, token, receiver.url)
    await receiver.wait_for(1, "TestMessage")
    _, listing = await call(h, "GET", f"/api/webhooks/{hook['id']}/events", token)
    event = listing["data"]["events"][0]
    pending = await event_in(h, token, event["id"], "pending")

    async def attempted() -> dict[str, Any] | None:
        data = await event_in(h, token, event["id"], "pending")
        return data if data["attempts"] == 1 else None

    pending = await eventually(attempted, what="first attempt recorded")
    assert pending["nextAttemptAt"] is not None and pending["lastStatusCode"] == 500
    status, answer = await call(h, "POST", f"/api/webhooks/events/{event['id']}/retry", token)
    assert_error(status, answer, 409)


async def test_metrics_per_organization_and_webhook(
    harness: Harness, receiver_factory: ReceiverFactory
) -> None:
    token = harness.token()
    status, answer = await call(harness, "GET", "/api/webhooks/metrics", token)
    assert status == 200
    assert answer["data"] == {
        "total": 0,
        "delivered": 0,
        "failed": 0,
        "pending": 0,
        "deliveryRate": 0,
    }

    good = await receiver_factory()
    bad = await receiver_factory(default=500)
    a = await register(harness, token, good.url, ["ProductCreated"])
    b = await register(harness, token, bad.url, ["PaymentCreated"])
    for _ in range(2):
        await harness.emit("ProductCreated")
    await good.wait_for(2, "ProductCreated")

    async def settled() -> dict[str, Any] | None:
        _, body = await call(harness, "GET", "/api/webhooks/metrics", token)
        data: dict[str, Any] = body["data"]
        return data if data["pending"] == 0 else None

    data = await eventually(settled, what="no pending deliveries")
    # a: TestMessage + 2 events delivered; b: its TestMessage failed for good after 4 attempts.
    assert data == {"total": 4, "delivered": 3, "failed": 1, "pending": 0, "deliveryRate": 75.0}
    assert len(bad.requests) == 4
    status, answer = await call(harness, "GET", "/api/webhooks/metrics", token, id=a["id"])
    assert answer["data"] == {
        "total": 3,
        "delivered": 3,
        "failed": 0,
        "pending": 0,
        "deliveryRate": 100,
    }
    status, answer = await call(harness, "GET", "/api/webhooks/metrics", token, id=b["id"])
    assert answer["data"]["deliveryRate"] == 0 and answer["data"]["failed"] == 1

    await harness.emit("ProductCreated")
    await good.wait_for(3, "ProductCreated")
    data = await eventually(settled, what="no pending deliveries")
    assert data["deliveryRate"] == round(4 / 5 * 100, 2) == 80.0

    status, answer = await call(harness, "GET", "/api/webhooks/metrics", token, id=UNKNOWN_UUID)
    assert_error(status, answer, 404)
    other = harness.token(org=OTHER_ORG)
    status, answer = await call(harness, "GET", "/api/webhooks/metrics", other)
    assert answer["data"]["total"] == 0


async def test_unknown_routes_and_wrong_methods_use_the_error_body(harness: Harness) -> None:
    token = harness.token()
    status, answer = await call(harness, "PATCH", "/api/webhooks/register", token, {})
    assert_error(status, answer, 405)
    status, answer = await call(harness, "GET", "/api/webhooks/a/b/c", token)
    assert_error(status, answer, 404)
    status, answer = await call(harness, "DELETE", "/api/webhooks/metrics", token)
    assert_error(status, answer, 405)


# -- the shapes real clients send (SPEC §3, §4) ---------------------------------------------------


async def test_every_route_answers_with_a_trailing_slash_and_ignores_bodies_on_get_and_delete(
    harness: Harness, receiver: Receiver
) -> None:
    token = harness.token()
    status, answer = await call(
        harness,
        "POST",
        "/api/webhooks/register/",
        token,
        {"url": receiver.url, "eventTypes": ["ProductCreated"]},
    )
    assert status == 201, answer
    hook = answer["data"]
    status, answer = await call(harness, "GET", "/api/webhooks/", token, b"[]")
    assert status == 200 and [w["id"] for w in answer["data"]] == [hook["id"]]
    status, answer = await call(harness, "GET", "/api/webhooks/register/", token, b"[]")
    assert status == 200 and answer["data"]["id"] == hook["id"]
    status, answer = await call(
        harness, "PUT", "/api/webhooks/register/", token, {"eventTypes": ["ProductUpdated"]}
    )
    assert status == 200 and answer["data"]["eventTypes"] == ["ProductUpdated"]
    status, answer = await call(harness, "POST", f"/api/webhooks/{hook['id']}/test/", token, {})
    assert status == 200, answer
    event_id = answer["data"]["eventId"]
    await event_in(harness, token, event_id, "delivered")
    status, answer = await call(harness, "GET", f"/api/webhooks/{hook['id']}/events/", token)
    assert status == 200 and answer["data"]["events"]
    status, answer = await call(harness, "GET", f"/api/webhooks/events/{event_id}/", token, b"[]")
    assert status == 200 and answer["data"]["id"] == event_id
    status, answer = await call(harness, "POST", f"/api/webhooks/events/{event_id}/retry/", token)
    assert status == 202, answer
    status, answer = await call(harness, "GET", "/api/webhooks/metrics/", token, b"[]")
    assert status == 200 and answer["data"]["total"] >= 2
    status, answer = await call(harness, "POST", "/api/webhooks/test/", token, {})
    assert status == 200, answer
    status, answer = await call(harness, "POST", "/api/webhooks/generate-secret/", token)
    assert status == 200 and answer["data"]["webhookId"] == hook["id"]
    status, answer = await call(harness, "DELETE", "/api/webhooks/register/", token, b"[]")
    assert status == 200, answer
    status, answer = await call(harness, "GET", "/api/webhooks/", token)
    assert answer["data"] == []
    status, answer = await call(harness, "PATCH", "/api/webhooks/register/", token)
    assert_error(status, answer, 405)


async def test_a_url_over_2048_characters_is_400(harness_factory: HarnessFactory) -> None:
    h = await harness_factory()
    await h.runtime.dispatcher.stop(0)  # nothing is sent: the destination is a public address
    token = h.token()
    public = "https://93.184.216.34/hook"
    at_limit = public + "/" + "a" * (2048 - len(public) - 1)
    over = at_limit + "a"
    status, answer = await call(
        h, "POST", "/api/webhooks/register", token, {"url": over, "eventTypes": []}
    )
    assert_error(status, answer, 400)
    assert "2048" in answer["message"]
    hook = await register(h, token, at_limit)
    assert hook["url"] == at_limit
    status, answer = await call(h, "PUT", "/api/webhooks/register", token, {"url": over})
    assert_error(status, answer, 400)
    status, answer = await call(h, "GET", "/api/webhooks/register", token)
    assert answer["data"]["url"] == at_limit
