"""The Zettle Pusher dialect (SPEC §3) through real HTTP: every status code of every endpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import ClientResponse, web

from pusherd.config import EventType
from tests.conftest import ALL_SCOPES, ORG, OTHER_ORG, Harness, Receiver, make_config
from tests.rawhttp import api_port, request, send

BASE = "/organizations/self/subscriptions"
PUBLIC = "https://93.184.216.34/hook"  # a public IP literal: valid without DNS

HarnessFactory = Callable[..., Awaitable[Harness]]
ReceiverFactory = Callable[..., Awaitable[Receiver]]


def body(**overrides: Any) -> dict[str, Any]:
    """A valid create body, with some fields replaced (None removes a field)."""
    data: dict[str, Any] = {
        "uuid": str(uuid.uuid1()),
        "transportName": "WEBHOOK",
        "eventNames": ["ProductCreated"],
        "destination": PUBLIC,
        "contactEmail": "ops@example.com",
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


async def error(resp: Any, status: int) -> str:
    """Assert the status and the JSON error body; return the message."""
    text = await resp.text()
    assert resp.status == status, text
    assert resp.content_type == "application/json", text
    data = await resp.json()
    assert data["status"] == "error"
    assert isinstance(data["message"], str) and data["message"]
    return str(data["message"])


async def quiet(factory: HarnessFactory, **sections: dict[str, Any]) -> Harness:
    """A harness whose dispatcher is stopped: nothing is ever sent (destinations may be public)."""
    h = await factory(**sections)
    await h.runtime.dispatcher.stop(0)
    return h


async def guarded(
    factory: HarnessFactory, allow_http: bool = False, allow_private: bool = False
) -> tuple[Harness, str]:
    """A quiet harness with the destination checks of a production config, and a token."""
    h = await quiet(
        factory,
        delivery={"allow_http": allow_http, "allow_private_destinations": allow_private},
    )
    return h, h.token()


async def create_to(h: Harness, token: str, destination: str) -> ClientResponse:
    """POST a valid subscription to `destination`."""
    return await h.api.post(BASE, json=body(destination=destination), headers=h.auth(token))


@pytest.fixture
async def harness(harness_factory: HarnessFactory) -> Harness:
    """API tests in this module never deliver: they use public IP literals as destinations."""
    return await quiet(harness_factory)


@pytest.fixture
async def live(harness_factory: HarnessFactory) -> Harness:
    """A harness that delivers (to loopback receivers only)."""
    return await harness_factory()


async def wait_until(check: Callable[[], Any], within_s: float = 10.0) -> None:
    """Poll a (sync or async) condition with a deadline."""
    deadline = time.monotonic() + within_s
    while not ((await r) if asyncio.iscoroutine(r := check()) else r):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# -- create ---------------------------------------------------------------------------------


async def test_create_returns_the_subscription(harness: Harness) -> None:
    token = harness.token()
    sent = body(eventNames=["ProductCreated", "PurchaseCreated"])
    resp = await harness.api.post(BASE, json=sent, headers=harness.auth(token))
    assert resp.status == 200, await resp.text()
    data = await resp.json()
    assert data["uuid"] == sent["uuid"]
    assert data["transportName"] == "WEBHOOK"
    assert data["eventNames"] == ["ProductCreated", "PurchaseCreated"]
    assert data["destination"] == PUBLIC
    assert data["contactEmail"] == "ops@example.com"
    assert data["status"] == "ACTIVE"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", data["updated"])
    assert re.fullmatch(r"[A-Za-z0-9]{64}", data["signingKey"])


async def test_signing_keys_differ_between_subscriptions(harness: Harness) -> None:
    token = harness.token()
    keys = set()
    for _ in range(3):
        resp = await harness.api.post(BASE, json=body(), headers=harness.auth(token))
        assert resp.status == 200
        key = (await resp.json())["signingKey"]
        assert re.fullmatch(r"[A-Za-z0-9]{64}", key)
        keys.add(key)
    assert len(keys) == 3


async def test_any_rfc4122_uuid_is_accepted(harness: Harness) -> None:
    token = harness.token()
    for value in (str(uuid.uuid4()), str(uuid.uuid1()).upper()):
        resp = await harness.api.post(BASE, json=body(uuid=value), headers=harness.auth(token))
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["uuid"].lower() == value.lower()


async def test_explicit_organization_in_path(harness: Harness) -> None:
    token = harness.token()
    resp = await harness.api.post(
        f"/organizations/{ORG}/subscriptions", json=body(), headers=harness.auth(token)
    )
    assert resp.status == 200, await resp.text()


async def test_unknown_fields_are_ignored(harness: Harness) -> None:
    token = harness.token()
    resp = await harness.api.post(
        BASE, json=body(extra={"x": 1}, status="DISABLED"), headers=harness.auth(token)
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["status"] == "ACTIVE"


@pytest.mark.parametrize(
    ("overrides", "word"),
    [
        ({"uuid": None}, "uuid"),
        ({"transportName": None}, "transportName"),
        ({"eventNames": None}, "eventNames"),
        ({"uuid": "not-a-uuid"}, "uuid"),
        ({"uuid": ""}, "uuid"),
        ({"transportName": "EMAIL"}, "WEBHOOK"),
        ({"transportName": "webhook"}, "WEBHOOK"),
        ({"eventNames": ["ProductCreated", "NoSuchEvent"]}, "NoSuchEvent"),
        ({"eventNames": ["TestMessage"]}, "TestMessage"),
        # wrong JSON types: 400 for every field but destination/contactEmail
        ({"uuid": 12345}, "uuid"),
        ({"transportName": 1}, "transportName"),
        ({"eventNames": "ProductCreated"}, "eventNames"),
        ({"eventNames": [1, 2]}, "eventNames"),
        ({"eventNames": {"a": 1}}, "eventNames"),
    ],
)
async def test_create_400(harness: Harness, overrides: dict[str, Any], word: str) -> None:
    token = harness.token()
    sent = body()
    for key, value in overrides.items():
        if value is None:
            sent.pop(key)
        else:
            sent[key] = value
    resp = await harness.api.post(BASE, json=sent, headers=harness.auth(token))
    assert word in await error(resp, 400)
    listed = await harness.api.get(BASE, headers=harness.auth(token))
    assert await listed.json() == []


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"42", b"null", b"[{}]"])
async def test_create_body_not_an_object_is_400(harness: Harness, raw: bytes) -> None:
    token = harness.token()
    headers = {**harness.auth(token), "Content-Type": "application/json"}
    resp = await harness.api.post(BASE, data=raw, headers=headers)
    await error(resp, 400)


@pytest.mark.parametrize("raw", [b"{", b"{'uuid': 1}", b"not json", b'{"a":1}}', b"\xff\xfe"])
async def test_create_malformed_json_is_400(harness: Harness, raw: bytes) -> None:
    token = harness.token()
    headers = {**harness.auth(token), "Content-Type": "application/json"}
    resp = await harness.api.post(BASE, data=raw, headers=headers)
    await error(resp, 400)


async def test_create_empty_body_counts_as_empty_object(harness: Harness) -> None:
    token = harness.token()
    resp = await harness.api.post(BASE, headers=harness.auth(token))
    assert "uuid" in await error(resp, 400)


async def test_uuid_already_used_is_400_also_across_organizations(harness: Harness) -> None:
    token = harness.token()
    other = harness.token(org=OTHER_ORG)
    sent = body()
    assert (await harness.api.post(BASE, json=sent, headers=harness.auth(token))).status == 200
    again = await harness.api.post(BASE, json=body(uuid=sent["uuid"]), headers=harness.auth(token))
    await error(again, 400)
    by_other = await harness.api.post(
        BASE, json=body(uuid=sent["uuid"]), headers=harness.auth(other)
    )
    await error(by_other, 400)
    # the other organization did not get a subscription, and ours is unchanged
    assert await (await harness.api.get(BASE, headers=harness.auth(other))).json() == []
    mine = await (await harness.api.get(BASE, headers=harness.auth(token))).json()
    assert [s["uuid"] for s in mine] == [sent["uuid"]]


async def test_uuid_of_a_deleted_subscription_stays_taken(harness: Harness) -> None:
    token = harness.token()
    sent = body()
    assert (await harness.api.post(BASE, json=sent, headers=harness.auth(token))).status == 200
    resp = await harness.api.delete(f"{BASE}/{sent['uuid']}", headers=harness.auth(token))
    assert resp.status == 204
    again = await harness.api.post(BASE, json=body(uuid=sent["uuid"]), headers=harness.auth(token))
    await error(again, 400)


@pytest.mark.parametrize(
    ("overrides", "word"),
    [
        ({"destination": None}, "destination"),
        ({"contactEmail": None}, "contactEmail"),
        ({"destination": ""}, "destination"),
        ({"destination": "/relative/hook"}, "destination"),
        ({"destination": "93.184.216.34/hook"}, "destination"),
        ({"destination": "ftp://93.184.216.34/hook"}, "destination"),
        ({"destination": "https://"}, "destination"),
        ({"destination": "http://93.184.216.34/hook"}, "destination"),
        ({"destination": 42}, "destination"),
        ({"destination": ["https://93.184.216.34/"]}, "destination"),
        ({"contactEmail": "not-an-address"}, "contactEmail"),
        ({"contactEmail": "a@"}, "contactEmail"),
        ({"contactEmail": "@example.com"}, "contactEmail"),
        ({"contactEmail": "two@@example.com"}, "contactEmail"),
        ({"contactEmail": "a" * 501 + "@example.com"}, "contactEmail"),
        ({"contactEmail": ""}, "contactEmail"),
        ({"contactEmail": 7}, "contactEmail"),
        ({"contactEmail": {"a": "b"}}, "contactEmail"),
    ],
)
async def test_create_422(
    harness_factory: HarnessFactory, overrides: dict[str, Any], word: str
) -> None:
    h, token = await guarded(harness_factory)
    sent = body()
    for key, value in overrides.items():
        if value is None:
            sent.pop(key)
        else:
            sent[key] = value
    resp = await h.api.post(BASE, json=sent, headers=h.auth(token))
    assert word in await error(resp, 422)
    assert await (await h.api.get(BASE, headers=h.auth(token))).json() == []


async def test_contact_email_of_exactly_512_chars_is_accepted(harness: Harness) -> None:
    token = harness.token()
    email = "a" * (512 - len("@example.com")) + "@example.com"
    assert len(email) == 512
    ok = await harness.api.post(BASE, json=body(contactEmail=email), headers=harness.auth(token))
    assert ok.status == 200, await ok.text()
    too_long = await harness.api.post(
        BASE, json=body(contactEmail="b" + email), headers=harness.auth(token)
    )
    await error(too_long, 422)


async def test_http_destination_allowed_only_with_allow_http(
    harness_factory: HarnessFactory,
) -> None:
    h, token = await guarded(harness_factory, allow_http=True)
    resp = await create_to(h, token, "http://93.184.216.34/hook")
    assert resp.status == 200, await resp.text()
    # allow_http does not open private networks
    resp = await create_to(h, token, "http://127.0.0.1:9/hook")
    await error(resp, 422)


@pytest.mark.parametrize(
    "destination",
    [
        "https://127.0.0.1/hook",
        "https://127.9.9.9:8443/hook",
        "https://10.1.2.3/hook",
        "https://172.16.0.5/hook",
        "https://192.168.1.1/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://100.64.0.1/hook",
        "https://0.0.0.0/hook",
        "https://224.0.0.1/hook",
        "https://[::1]/hook",
        "https://[fe80::1]/hook",
        "https://[fd00::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://localhost/hook",
    ],
)
async def test_private_destination_refused(
    harness_factory: HarnessFactory, destination: str
) -> None:
    h, token = await guarded(harness_factory)
    resp = await create_to(h, token, destination)
    await error(resp, 422)


async def test_private_destination_allowed_with_allow_private(
    harness_factory: HarnessFactory,
) -> None:
    h, token = await guarded(harness_factory, allow_private=True)
    resp = await create_to(h, token, "https://127.0.0.1/hook")
    assert resp.status == 200, await resp.text()


async def test_create_403_when_scope_missing(harness: Harness) -> None:
    token = harness.token(scopes=("READ:PRODUCT",))
    resp = await harness.api.post(
        BASE,
        json=body(eventNames=["ProductCreated", "PurchaseCreated"]),
        headers=harness.auth(token),
    )
    assert "READ:PURCHASE" in await error(resp, 403)
    assert await (await harness.api.get(BASE, headers=harness.auth(token))).json() == []


async def test_any_scope_events_need_some_scope(harness: Harness) -> None:
    token = harness.token(scopes=("READ:PRODUCT",))
    resp = await harness.api.post(
        BASE,
        json=body(eventNames=["ApplicationConnectionRemoved", "PersonalAssertionDeleted"]),
        headers=harness.auth(token),
    )
    assert resp.status == 200, await resp.text()


async def test_create_403_for_another_organization_in_path(harness: Harness) -> None:
    token = harness.token()
    for org in (OTHER_ORG, "not-a-uuid"):
        resp = await harness.api.post(
            f"/organizations/{org}/subscriptions", json=body(), headers=harness.auth(token)
        )
        await error(resp, 403)
    other = harness.token(org=OTHER_ORG)
    assert await (await harness.api.get(BASE, headers=harness.auth(other))).json() == []


async def test_create_from_query_parameters(harness: Harness) -> None:
    token = harness.token()
    repeated = str(uuid.uuid1())
    resp = await harness.api.post(
        BASE,
        params=[
            ("uuid", repeated),
            ("transportName", "WEBHOOK"),
            ("eventNames", "ProductCreated"),
            ("eventNames", "ProductUpdated"),
            ("destination", PUBLIC),
            ("contactEmail", "ops@example.com"),
        ],
        headers=harness.auth(token),
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["eventNames"] == ["ProductCreated", "ProductUpdated"]

    comma = str(uuid.uuid1())
    resp = await harness.api.post(
        BASE,
        params={
            "uuid": comma,
            "transportName": "WEBHOOK",
            "eventNames": "ProductCreated,PurchaseCreated",
            "destination": PUBLIC,
            "contactEmail": "ops@example.com",
        },
        headers=harness.auth(token),
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["eventNames"] == ["ProductCreated", "PurchaseCreated"]


async def test_body_field_wins_over_query_parameter(harness: Harness) -> None:
    token = harness.token()
    sent = body(eventNames=["ProductUpdated"])
    resp = await harness.api.post(
        BASE,
        json={k: v for k, v in sent.items() if k != "destination"},
        params={"eventNames": "PurchaseCreated", "destination": PUBLIC},
        headers=harness.auth(token),
    )
    assert resp.status == 200, await resp.text()
    data = await resp.json()
    assert data["eventNames"] == ["ProductUpdated"]
    assert data["destination"] == PUBLIC


async def test_query_parameter_with_unknown_event_is_400(harness: Harness) -> None:
    token = harness.token()
    sent = body()
    sent.pop("eventNames")
    resp = await harness.api.post(
        BASE, json=sent, params={"eventNames": "ProductCreated,Bogus"}, headers=harness.auth(token)
    )
    assert "Bogus" in await error(resp, 400)


async def test_new_subscription_gets_a_test_message(live: Harness, receiver: Receiver) -> None:
    token = live.token()
    sub = await live.subscribe(token, receiver.url, ["ProductCreated"])
    await receiver.wait_for(1, "TestMessage")
    envelope = receiver.events("TestMessage")[0]
    assert envelope["payload"] == '{"data":"payload"}'
    assert envelope["organizationUuid"] == ORG
    assert receiver.requests[0].headers["X-iZettle-Signature"]
    assert sub["signingKey"] not in receiver.requests[0].body.decode()


# -- list -----------------------------------------------------------------------------------


async def test_list_self_and_explicit_org(harness: Harness) -> None:
    token = harness.token()
    other = harness.token(org=OTHER_ORG)
    a = await harness.subscribe(token, PUBLIC.replace("/hook", "/a"), ["ProductCreated"])
    b = await harness.subscribe(token, PUBLIC.replace("/hook", "/b"), [])
    await harness.subscribe(other, PUBLIC, ["ProductCreated"])
    for path in (BASE, f"/organizations/{ORG}/subscriptions"):
        resp = await harness.api.get(path, headers=harness.auth(token))
        assert resp.status == 200
        listed = await resp.json()
        assert [s["uuid"] for s in listed] == [a["uuid"], b["uuid"]]
        assert listed[0] == a
        assert listed[1]["eventNames"] == []
        assert set(listed[1]) == {
            "uuid",
            "transportName",
            "eventNames",
            "updated",
            "destination",
            "contactEmail",
            "status",
            "signingKey",
        }


async def test_list_other_org_is_403(harness: Harness) -> None:
    token = harness.token()
    resp = await harness.api.get(
        f"/organizations/{OTHER_ORG}/subscriptions", headers=harness.auth(token)
    )
    await error(resp, 403)


async def test_list_empty(harness: Harness) -> None:
    token = harness.token()
    resp = await harness.api.get(BASE, headers=harness.auth(token))
    assert resp.status == 200
    assert await resp.json() == []


# -- update ---------------------------------------------------------------------------------


async def _one(h: Harness, token: str) -> dict[str, Any]:
    listed = await (await h.api.get(BASE, headers=h.auth(token))).json()
    assert len(listed) == 1
    item: dict[str, Any] = listed[0]
    return item


async def test_update_partial_200_empty_body(harness: Harness) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, PUBLIC, ["ProductCreated"])
    resp = await harness.api.put(
        f"{BASE}/{sub['uuid']}",
        json={"eventNames": ["ProductUpdated", "PurchaseCreated"], "ignored": True},
        headers=harness.auth(token),
    )
    assert resp.status == 200
    assert await resp.read() == b""
    now = await _one(harness, token)
    assert now["eventNames"] == ["ProductUpdated", "PurchaseCreated"]
    assert now["destination"] == PUBLIC
    assert now["contactEmail"] == "ops@example.com"
    assert now["signingKey"] == sub["signingKey"]
    assert now["updated"] >= sub["updated"]

    other_dest = "https://93.184.216.35/other"
    resp = await harness.api.put(
        f"/organizations/{ORG}/subscriptions/{sub['uuid']}",
        json={"destination": other_dest, "contactEmail": "new@example.org"},
        headers=harness.auth(token),
    )
    assert resp.status == 200
    now = await _one(harness, token)
    assert now["destination"] == other_dest
    assert now["contactEmail"] == "new@example.org"
    assert now["eventNames"] == ["ProductUpdated", "PurchaseCreated"]


async def test_update_from_query_parameters(harness: Harness) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, PUBLIC, ["ProductCreated"])
    resp = await harness.api.put(
        f"{BASE}/{sub['uuid']}",
        params={"eventNames": "ProductDeleted,ProductUpdated"},
        headers=harness.auth(token),
    )
    assert resp.status == 200, await resp.text()
    assert (await _one(harness, token))["eventNames"] == ["ProductDeleted", "ProductUpdated"]


async def test_update_empty_body_changes_nothing(harness: Harness) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, PUBLIC, ["ProductCreated"])
    resp = await harness.api.put(f"{BASE}/{sub['uuid']}", headers=harness.auth(token))
    assert resp.status == 200
    now = await _one(harness, token)
    assert {k: v for k, v in now.items() if k != "updated"} == {
        k: v for k, v in sub.items() if k != "updated"
    }


@pytest.mark.parametrize(
    "change",
    [
        {"eventNames": ["NoSuchEvent"]},
        {"eventNames": "ProductCreated"},
        {"transportName": "SMS"},
        {"status": "DISABLED"},
    ],
)
async def test_update_400(harness: Harness, change: dict[str, Any]) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, PUBLIC, ["ProductCreated"])
    resp = await harness.api.put(f"{BASE}/{sub['uuid']}", json=change, headers=harness.auth(token))
    await error(resp, 400)
    assert (await _one(harness, token))["eventNames"] == ["ProductCreated"]


async def test_update_body_not_an_object_or_malformed_is_400(harness: Harness) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, PUBLIC, ["ProductCreated"])
    headers = {**harness.auth(token), "Content-Type": "application/json"}
    for raw in (b"[]", b"{"):
        resp = await harness.api.put(f"{BASE}/{sub['uuid']}", data=raw, headers=headers)
        await error(resp, 400)


@pytest.mark.parametrize(
    "change",
    [
        {"destination": ""},
        {"destination": "   "},
        {"destination": "not a url"},
        {"destination": "http://93.184.216.34/hook"},
        {"destination": "https://10.0.0.1/hook"},
        {"destination": 5},
        {"destination": None},
        {"contactEmail": ""},
        {"contactEmail": "nope"},
        {"contactEmail": "x" * 600 + "@example.com"},
        {"contactEmail": 5},
    ],
)
async def test_update_422(harness_factory: HarnessFactory, change: dict[str, Any]) -> None:
    h, token = await guarded(harness_factory)
    sub = await h.subscribe(token, PUBLIC, ["ProductCreated"])
    resp = await h.api.put(f"{BASE}/{sub['uuid']}", json=change, headers=h.auth(token))
    await error(resp, 422)
    now = await _one(h, token)
    assert now["destination"] == PUBLIC
    assert now["contactEmail"] == "ops@example.com"


async def test_update_403_scope(harness: Harness) -> None:
    token = harness.token(scopes=("READ:PRODUCT",))
    sub = await harness.subscribe(token, PUBLIC, ["ProductCreated"])
    resp = await harness.api.put(
        f"{BASE}/{sub['uuid']}",
        json={"eventNames": ["InvoiceCreated"]},
        headers=harness.auth(token),
    )
    assert "READ:FINANCE" in await error(resp, 403)
    assert (await _one(harness, token))["eventNames"] == ["ProductCreated"]


async def test_update_403_other_org_in_path(harness: Harness) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, PUBLIC, ["ProductCreated"])
    resp = await harness.api.put(
        f"/organizations/{OTHER_ORG}/subscriptions/{sub['uuid']}",
        json={"eventNames": ["ProductUpdated"]},
        headers=harness.auth(token),
    )
    await error(resp, 403)


async def test_update_404(harness: Harness) -> None:
    token = harness.token()
    other = harness.token(org=OTHER_ORG)
    theirs = await harness.subscribe(other, PUBLIC, ["ProductCreated"])
    for target in (str(uuid.uuid1()), "not-a-uuid", theirs["uuid"]):
        resp = await harness.api.put(
            f"{BASE}/{target}", json={"eventNames": ["ProductUpdated"]}, headers=harness.auth(token)
        )
        await error(resp, 404)
    assert (await _one(harness, other))["eventNames"] == ["ProductCreated"]


async def test_update_deleted_subscription_is_404(harness: Harness) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, PUBLIC, ["ProductCreated"])
    assert (
        await harness.api.delete(f"{BASE}/{sub['uuid']}", headers=harness.auth(token))
    ).status == 204
    resp = await harness.api.put(
        f"{BASE}/{sub['uuid']}", json={"eventNames": []}, headers=harness.auth(token)
    )
    await error(resp, 404)


async def test_put_on_collection_is_405(harness: Harness) -> None:
    token = harness.token()
    resp = await harness.api.put(BASE, json={}, headers=harness.auth(token))
    await error(resp, 405)
    assert "POST" in resp.headers.get("Allow", "")


async def test_status_active_reenables_a_disabled_subscription(
    live: Harness, receiver_factory: ReceiverFactory
) -> None:
    rec = await receiver_factory(statuses=[410])
    token = live.token()
    sub = await live.subscribe(token, rec.url, ["ProductCreated"])
    await rec.wait_for(1, "TestMessage")

    async def disabled() -> bool:
        found = await live.runtime.store.get_subscription(ORG, sub["uuid"])
        return found is not None and found.status == "DISABLED"

    await wait_until(disabled)
    assert (await _one(live, token))["status"] == "DISABLED"
    answer = await live.emit("ProductCreated")
    assert answer["deliveries"] == 0

    resp = await live.api.put(
        f"{BASE}/{sub['uuid']}", json={"status": "ACTIVE"}, headers=live.auth(token)
    )
    assert resp.status == 200, await resp.text()
    assert (await _one(live, token))["status"] == "ACTIVE"
    answer = await live.emit("ProductCreated")
    assert answer["deliveries"] == 1
    await rec.wait_for(1, "ProductCreated")


# -- delete ---------------------------------------------------------------------------------


async def test_delete_204_then_404(harness: Harness) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, PUBLIC, ["ProductCreated"])
    resp = await harness.api.delete(f"{BASE}/{sub['uuid']}", headers=harness.auth(token))
    assert resp.status == 204
    assert await resp.read() == b""
    assert await (await harness.api.get(BASE, headers=harness.auth(token))).json() == []
    again = await harness.api.delete(f"{BASE}/{sub['uuid']}", headers=harness.auth(token))
    await error(again, 404)
    for target in (str(uuid.uuid1()), "nope"):
        resp = await harness.api.delete(f"{BASE}/{target}", headers=harness.auth(token))
        await error(resp, 404)


async def test_delete_other_orgs_subscription_is_404(harness: Harness) -> None:
    token = harness.token()
    other = harness.token(org=OTHER_ORG)
    theirs = await harness.subscribe(other, PUBLIC, ["ProductCreated"])
    resp = await harness.api.delete(f"{BASE}/{theirs['uuid']}", headers=harness.auth(token))
    await error(resp, 404)
    resp = await harness.api.delete(
        f"/organizations/{OTHER_ORG}/subscriptions/{theirs['uuid']}", headers=harness.auth(token)
    )
    await error(resp, 403)
    assert [
        s["uuid"] for s in await (await harness.api.get(BASE, headers=harness.auth(other))).json()
    ] == [theirs["uuid"]]


async def test_delete_cancels_pending_deliveries(
    harness_factory: HarnessFactory, receiver_factory: ReceiverFactory
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=200)

    h = await harness_factory(delivery={"per_destination": 1})
    rec = await receiver_factory(statuses=[slow])
    token = h.token()
    sub = await h.subscribe(token, rec.url, ["ProductCreated"])
    await rec.wait_for(1, "TestMessage")  # in flight, holding the only slot
    for _ in range(3):
        assert (await h.emit("ProductCreated"))["deliveries"] == 1
    await asyncio.sleep(0)  # let the dispatcher see the new rows (they must wait for the slot)
    resp = await h.api.delete(f"{BASE}/{sub['uuid']}", headers=h.auth(token))
    assert resp.status == 204
    release.set()
    await h.idle()
    assert rec.events("ProductCreated") == []
    assert len(rec.requests) == 1


# -- errors of aiohttp itself -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("GET", "/organizations/self/subscriptions/x/y", 404),
        ("POST", f"{BASE}/{uuid.uuid1()}", 405),
        ("PATCH", f"{BASE}/uuid/{uuid.uuid1()}/", 405),
        ("PUT", f"{BASE}/", 405),
        ("GET", f"{BASE}//", 404),
        ("PATCH", BASE, 405),
        ("PUT", BASE, 405),
    ],
)
async def test_router_errors_use_the_json_error_body(
    harness: Harness, method: str, path: str, status: int
) -> None:
    token = harness.token()
    for headers in ({}, harness.auth(token)):
        resp = await harness.api.request(method, path, headers=headers)
        await error(resp, status)


# -- eventNames: [] -----------------------------------------------------------------------


async def test_empty_event_names_follow_the_token_scopes(live: Harness, receiver: Receiver) -> None:
    token = live.token(scopes=("READ:PRODUCT",))
    sub = await live.subscribe(token, receiver.url, [])
    assert sub["eventNames"] == []
    await receiver.wait_for(1, "TestMessage")
    purchase = await live.emit("PurchaseCreated")
    product = await live.emit("ProductCreated")
    removed = await live.emit("ApplicationConnectionRemoved")
    assert purchase["deliveries"] == 0
    assert product["deliveries"] == 1
    assert removed["deliveries"] == 1
    await receiver.wait_for(1, "ApplicationConnectionRemoved")
    await live.idle()
    assert [e["eventName"] for e in receiver.events()] == [
        "TestMessage",
        "ProductCreated",
        "ApplicationConnectionRemoved",
    ]
    assert (await _one(live, token))["eventNames"] == []


async def test_empty_event_names_use_the_scopes_of_the_last_updating_token(
    live: Harness, receiver: Receiver
) -> None:
    narrow = live.token(scopes=("READ:PRODUCT",))
    wide = live.token(scopes=ALL_SCOPES)
    sub = await live.subscribe(narrow, receiver.url, [])
    assert (await live.emit("PurchaseCreated"))["deliveries"] == 0
    resp = await live.api.put(
        f"{BASE}/{sub['uuid']}", json={"eventNames": []}, headers=live.auth(wide)
    )
    assert resp.status == 200
    assert (await live.emit("PurchaseCreated"))["deliveries"] == 1
    await receiver.wait_for(1, "PurchaseCreated")


async def test_empty_event_names_include_event_types_added_later(
    tmp_path: Any, harness_factory: HarnessFactory, receiver: Receiver
) -> None:
    first = await harness_factory()
    token = first.token(scopes=("READ:PRODUCT",))
    await first.subscribe(token, receiver.url, [])
    await receiver.wait_for(1, "TestMessage")
    await first.idle()
    await first.ingest.close()
    await first.api.close()

    config = dataclasses.replace(
        make_config(tmp_path),
        events=(
            EventType("stock.counted", "READ:PRODUCT"),
            EventType("transaction.created", "READ:FINANCE"),
        ),
    )
    second = await harness_factory(config)
    assert (await second.emit("transaction.created"))["deliveries"] == 0
    counted = await second.emit("stock.counted", payload={"sku": "A1"})
    assert counted["deliveries"] == 1
    await receiver.wait_for(1, "stock.counted")
    assert receiver.events("stock.counted")[0]["payload"] == '{"sku":"A1"}'
    await second.idle()
    assert receiver.events("transaction.created") == []


# -- the shapes real clients send (SPEC §3) ---------------------------------------------------


async def test_get_one_subscription(harness: Harness) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, PUBLIC, ["ProductCreated"])
    resp = await harness.api.get(f"{BASE}/{sub['uuid']}", headers=harness.auth(token))
    assert resp.status == 200
    assert await resp.json() == sub
    theirs = await harness.subscribe(harness.token(org=OTHER_ORG), PUBLIC)
    for target in (theirs["uuid"], str(uuid.uuid1()), "nope"):
        await error(await harness.api.get(f"{BASE}/{target}", headers=harness.auth(token)), 404)


async def test_the_woocommerce_plugin_lifecycle_over_a_raw_socket(harness: Harness) -> None:
    """Create, list, read, update and delete as the PayPal POS plugin's SDK does: trailing
    slashes, the seed's `/uuid/{uuid}` form, and a `[]` body on GET and DELETE."""
    token = harness.token()
    auth = f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n".encode()
    port = api_port(harness)
    created = body()
    sub_uuid = created["uuid"]
    answer = await send(port, request("POST", BASE + "/", auth, orjson.dumps(created)))
    assert answer.status == 200, answer
    assert answer.json()["uuid"] == sub_uuid
    answer = await send(port, request("GET", BASE + "/", auth, b"[]"))
    assert answer.status == 200 and [s["uuid"] for s in answer.json()] == [sub_uuid]
    for path in (f"{BASE}/uuid/{sub_uuid}", f"{BASE}/uuid/{sub_uuid}/", f"{BASE}/{sub_uuid}/"):
        answer = await send(port, request("GET", path, auth, b"[]"))
        assert answer.status == 200, (path, answer)
        assert answer.json()["uuid"] == sub_uuid
    for i, path in enumerate((f"{BASE}/uuid/{sub_uuid}", f"{BASE}/uuid/{sub_uuid}/")):
        change = orjson.dumps({"destination": f"{PUBLIC}/{i}"})
        answer = await send(port, request("PUT", path, auth, change))
        assert answer.status == 200, (path, answer)
        assert (await _one(harness, token))["destination"] == f"{PUBLIC}/{i}"
    answer = await send(port, request("DELETE", f"{BASE}/uuid/{sub_uuid}", auth, b"[]"))
    assert answer.status == 204, answer
    assert await harness.runtime.store.get_subscription(ORG, sub_uuid) is None
    for path in (f"{BASE}/uuid/{sub_uuid}", f"{BASE}/uuid/{sub_uuid}/", f"{BASE}/{sub_uuid}/"):
        for method in ("GET", "DELETE"):
            answer = await send(port, request(method, path, auth, b"[]"))
            assert answer.status == 404, (method, path)
            assert answer.json()["status"] == "error"


@pytest.mark.parametrize("slash", ["", "/"])
async def test_trailing_slash_forms_of_create_update_and_delete(
    harness: Harness, slash: str
) -> None:
    token = harness.token()
    resp = await harness.api.post(BASE + slash, json=body(), headers=harness.auth(token))
    assert resp.status == 200
    sub = await resp.json()
    path = f"{BASE}/{sub['uuid']}{slash}"
    resp = await harness.api.put(path, json={"eventNames": []}, headers=harness.auth(token))
    assert resp.status == 200
    assert (await _one(harness, token))["eventNames"] == []
    resp = await harness.api.delete(path, data=b"[]", headers=harness.auth(token))
    assert resp.status == 204


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("PUT", f"{BASE}/", 405),
        ("DELETE", f"{BASE}/", 404),  # seed 000: a DELETE without a subscriptionUuid
        ("POST", f"{BASE}/uuid/{uuid.uuid1()}/", 405),
        ("GET", f"{BASE}//", 404),
        ("GET", f"{BASE}/uuid/", 404),
        ("GET", f"{BASE}/uuid/x/y", 404),
        ("GET", "/organizations/self/subscriptions/x/y/", 404),
    ],
)
async def test_wrong_methods_and_unknown_forms_use_the_error_body(
    harness: Harness, method: str, path: str, status: int
) -> None:
    token = harness.token()
    resp = await harness.api.request(method, path, headers=harness.auth(token))
    await error(resp, status)
    if status == 405:
        assert resp.headers["Allow"]


async def test_a_destination_over_2048_characters_is_422(harness: Harness) -> None:
    token = harness.token()
    at_limit = PUBLIC + "/" + "a" * (2048 - len(PUBLIC) - 1)
    over = at_limit + "a"
    for huge in (over, PUBLIC + "/" + "b" * 1_000_000):
        resp = await harness.api.post(
            BASE, json=body(destination=huge), headers=harness.auth(token)
        )
        assert "2048" in await error(resp, 422)
    sub = await harness.subscribe(token, at_limit)
    assert sub["destination"] == at_limit
    resp = await harness.api.put(
        f"{BASE}/{sub['uuid']}", json={"destination": over}, headers=harness.auth(token)
    )
    await error(resp, 422)
    assert (await _one(harness, token))["destination"] == at_limit
