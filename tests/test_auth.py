"""Tokens, organizations and scopes (SPEC §2) through real HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import structlog

from pusherd.store.db import connect_sync
from pusherd.store.tokens import list_tokens, revoke_token
from tests.conftest import ORG, OTHER_ORG, Harness
from tests.rawhttp import api_port, ingest_port, request, send

BASE = "/organizations/self/subscriptions"
PUBLIC = "https://93.184.216.34/hook"

HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def harness(harness_factory: HarnessFactory) -> Harness:
    """These tests never deliver (destinations are public IP literals)."""
    h = await harness_factory()
    await h.runtime.dispatcher.stop(0)
    return h


def body(**overrides: Any) -> dict[str, Any]:
    return {
        "uuid": str(uuid.uuid1()),
        "transportName": "WEBHOOK",
        "eventNames": ["ProductCreated"],
        "destination": PUBLIC,
        "contactEmail": "ops@example.com",
        **overrides,
    }


async def status_of(h: Harness, method: str, path: str, headers: dict[str, str]) -> int:
    json = body() if method == "POST" else ({} if method == "PUT" else None)
    resp = await h.api.request(method, path, json=json, headers=headers)
    if resp.status >= 400:
        data = await resp.json()
        assert data["status"] == "error" and data["message"], data
    return resp.status


def _endpoints(sub_uuid: str, org: str = "self") -> list[tuple[str, str]]:
    base = f"/organizations/{org}/subscriptions"
    return [
        ("GET", base),
        ("POST", base),
        ("PUT", f"{base}/{sub_uuid}"),
        ("DELETE", f"{base}/{sub_uuid}"),
    ]


def _revoke(h: Harness, name: str) -> None:
    conn = connect_sync(h.config.storage.path)
    try:
        (token_id,) = [t.id for t in list_tokens(conn) if t.name == name]
        conn.execute("BEGIN IMMEDIATE")
        assert revoke_token(conn, token_id)
        conn.execute("COMMIT")
    finally:
        conn.close()


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token abc",
        "pshd_nothing",
        "Bearer two words",
        "Bearer pshd_unknown_token_value",
    ],
)
async def test_401_for_missing_malformed_or_unknown_tokens(
    harness: Harness, header: str | None
) -> None:
    good = harness.token()
    sub = await harness.subscribe(good, PUBLIC)
    headers = {} if header is None else {"Authorization": header}
    for method, path in _endpoints(sub["uuid"]):
        assert await status_of(harness, method, path, headers) == 401, (method, path)
    resp = await harness.api.get(BASE, headers=headers)
    assert resp.headers.get("WWW-Authenticate", "").startswith("Bearer")
    # nothing changed
    listed = await (await harness.api.get(BASE, headers=harness.auth(good))).json()
    assert [s["uuid"] for s in listed] == [sub["uuid"]]


async def test_valid_token_is_accepted_and_scheme_is_case_insensitive(harness: Harness) -> None:
    token = harness.token()
    for scheme in ("Bearer", "bearer", "BEARER"):
        resp = await harness.api.get(BASE, headers={"Authorization": f"{scheme} {token}"})
        assert resp.status == 200


async def test_revoked_token_is_401_at_once(harness: Harness) -> None:
    token = harness.token(name="to-revoke")
    sub = await harness.subscribe(token, PUBLIC)
    assert (await harness.api.get(BASE, headers=harness.auth(token))).status == 200
    _revoke(harness, "to-revoke")
    for method, path in _endpoints(sub["uuid"]):
        assert await status_of(harness, method, path, harness.auth(token)) == 401
    # another token of the same organization still works and sees the subscription
    other = harness.token()
    listed = await (await harness.api.get(BASE, headers=harness.auth(other))).json()
    assert [s["uuid"] for s in listed] == [sub["uuid"]]


async def test_expired_token_is_401(harness: Harness) -> None:
    past = int(time.time() * 1000) - 1000
    token = harness.token(expires_ms=past)
    for method, path in _endpoints(str(uuid.uuid1())):
        assert await status_of(harness, method, path, harness.auth(token)) == 401


async def test_token_stops_working_when_it_expires(harness: Harness) -> None:
    token = harness.token(expires_ms=int(time.time() * 1000) + 400)
    assert (await harness.api.get(BASE, headers=harness.auth(token))).status == 200
    deadline = time.monotonic() + 10
    while (await harness.api.get(BASE, headers=harness.auth(token))).status == 200:
        assert time.monotonic() < deadline, "token never expired"
        await asyncio.sleep(0.05)
    resp = await harness.api.get(BASE, headers=harness.auth(token))
    assert resp.status == 401


async def test_token_with_a_future_expiry_works(harness: Harness) -> None:
    token = harness.token(expires_ms=int(time.time() * 1000) + 3_600_000)
    assert (await harness.api.get(BASE, headers=harness.auth(token))).status == 200


async def test_another_organization_in_the_path_is_403(harness: Harness) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, PUBLIC)
    for org in (OTHER_ORG, "00000000-0000-0000-0000-000000000000", "someone", "SELF"):
        for method, path in _endpoints(sub["uuid"], org):
            assert await status_of(harness, method, path, harness.auth(token)) == 403, (
                org,
                method,
            )
    listed = await (await harness.api.get(BASE, headers=harness.auth(token))).json()
    assert [s["uuid"] for s in listed] == [sub["uuid"]]


async def test_own_organization_by_uuid_in_any_case(harness: Harness) -> None:
    token = harness.token()
    for org in ("self", ORG, ORG.upper()):
        resp = await harness.api.get(
            f"/organizations/{org}/subscriptions", headers=harness.auth(token)
        )
        assert resp.status == 200, org


async def test_other_organizations_subscriptions_are_invisible(harness: Harness) -> None:
    mine = harness.token()
    theirs = harness.token(org=OTHER_ORG)
    a = await harness.subscribe(mine, PUBLIC)
    b = await harness.subscribe(theirs, PUBLIC)
    mine_list = await (await harness.api.get(BASE, headers=harness.auth(mine))).json()
    their_list = await (await harness.api.get(BASE, headers=harness.auth(theirs))).json()
    assert [s["uuid"] for s in mine_list] == [a["uuid"]]
    assert [s["uuid"] for s in their_list] == [b["uuid"]]
    resp = await harness.api.put(
        f"{BASE}/{b['uuid']}", json={"contactEmail": "x@example.com"}, headers=harness.auth(mine)
    )
    assert resp.status == 404
    resp = await harness.api.delete(f"{BASE}/{b['uuid']}", headers=harness.auth(mine))
    assert resp.status == 404
    their_list = await (await harness.api.get(BASE, headers=harness.auth(theirs))).json()
    assert their_list == [b]


async def test_scope_denial_on_create_and_update(harness: Harness) -> None:
    finance = harness.token(scopes=("READ:FINANCE",))
    resp = await harness.api.post(
        BASE, json=body(eventNames=["ProductCreated"]), headers=harness.auth(finance)
    )
    assert resp.status == 403
    sub = await harness.subscribe(finance, PUBLIC, ["PaymentCreated"])
    resp = await harness.api.put(
        f"{BASE}/{sub['uuid']}",
        json={"eventNames": ["PaymentCreated", "OrganizationUpdated"]},
        headers=harness.auth(finance),
    )
    assert resp.status == 403
    resp = await harness.api.put(
        f"{BASE}/{sub['uuid']}",
        json={"eventNames": ["InvoiceCreated"]},
        headers=harness.auth(finance),
    )
    assert resp.status == 200


async def test_healthz_needs_no_token(harness: Harness) -> None:
    resp = await harness.api.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_tokens_are_stored_hashed(harness: Harness) -> None:
    token = harness.token(name="hashed")
    conn = sqlite3.connect(harness.config.storage.path)
    try:
        rows = conn.execute("SELECT * FROM tokens").fetchall()
        dump = "\n".join(conn.iterdump())
    finally:
        conn.close()
    assert len(rows) == 1
    assert token not in repr(rows)
    assert token not in dump
    assert hashlib.sha256(token.encode()).hexdigest() in repr(rows)


async def test_logs_never_carry_a_token_or_signing_key(harness: Harness) -> None:
    token = harness.token()
    with structlog.testing.capture_logs() as logs:
        sub = await harness.subscribe(token, PUBLIC)
        await harness.api.get(BASE, headers=harness.auth(token))
        await harness.api.get(BASE, headers={"Authorization": "Bearer pshd_wrong_secret"})
        await harness.api.put(
            f"{BASE}/{sub['uuid']}", json={"eventNames": []}, headers=harness.auth(token)
        )
    text = repr(logs)
    assert logs, "expected request log lines"
    assert token not in text
    assert "pshd_wrong_secret" not in text
    assert sub["signingKey"] not in text


@pytest.mark.parametrize(
    "value",
    [
        b"Bearer \xff\xfe{token}",  # bytes before a valid token
        b"Bearer {token}\xe9",  # a Latin-1 byte after it
        b"Bearer \xed\xa0\x80",  # an encoded surrogate
        b"\xc3\x28 {token}",  # an invalid scheme
    ],
)
async def test_authorization_bytes_that_are_not_utf8_are_401(
    harness_factory: HarnessFactory, value: bytes
) -> None:
    h = await harness_factory(ingest={"token": "ingest-token-value"})
    await h.runtime.dispatcher.stop(0)
    token = h.token()
    sub = await h.subscribe(token, PUBLIC)
    header = b"Authorization: " + value.replace(b"{token}", token.encode()) + b"\r\n"
    with structlog.testing.capture_logs() as logs:
        for method, path in _endpoints(sub["uuid"]):
            answer = await send(api_port(h), request(method, path, header, b"{}"))
            assert answer.status == 401, (method, path, answer)
            assert answer.json()["status"] == "error"
            assert answer.headers["www-authenticate"].startswith("Bearer")
        ingest_header = value.replace(b"{token}", b"ingest-token-value")
        answer = await send(
            ingest_port(h),
            request("POST", "/events", b"Authorization: " + ingest_header + b"\r\n", b"{}"),
        )
        assert answer.status == 401, answer
        assert answer.json()["status"] == "error"
    assert [e for e in logs if e["log_level"] == "error"] == []
    # the subscription is untouched
    listed = await (await h.api.get(BASE, headers=h.auth(token))).json()
    assert [s["uuid"] for s in listed] == [sub["uuid"]]
