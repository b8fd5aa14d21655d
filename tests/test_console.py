"""The console's access rules and pages over plain HTTP (the browser tests are in
test_console_browser.py): sessions, CSRF, ADMIN, console-link, rate limit, escaping, 404s."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import ORG, OTHER_ORG, Harness, Receiver
from tests.service import run_cli_async

CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page."""
    match = CSRF_RE.search(html)
    assert match, html
    return match.group(1)


async def sign_in(client: TestClient[web.Request, web.Application], token: str) -> None:
    """Sign in through the form, as a browser does (CSRF value from the page and its cookie)."""
    page = await client.get("/console/signin")
    assert page.status == 200
    resp = await client.post(
        "/console/signin",
        data={"csrf": csrf_of(await page.text()), "token": token},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"] == "/console/"


async def test_pages_need_a_session_and_carry_a_csp(harness: Harness) -> None:
    resp = await harness.api.get("/console/", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/console/signin"
    page = await harness.api.get("/console/signin")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert (await harness.api.get("/console", allow_redirects=False)).status == 308
    # POSTs without a session are refused, not redirected
    resp = await harness.api.post("/console/subscriptions/x/rotate", data={"csrf": "x"})
    assert resp.status == 403


async def test_session_cookie_flags_and_sign_out(harness: Harness) -> None:
    token = harness.token()
    page = await harness.api.get("/console/signin")
    resp = await harness.api.post(
        "/console/signin",
        data={"csrf": csrf_of(await page.text()), "token": token},
        allow_redirects=False,
    )
    cookie = next(v for v in resp.headers.getall("Set-Cookie") if v.startswith("pusherd_console="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # plain http here; https requests get Secure
    home = await harness.api.get("/console/")
    html = await home.text()
    assert home.status == 200 and ORG in html
    assert token not in html  # the token is never written to a page
    resp = await harness.api.post(
        "/console/signout", data={"csrf": csrf_of(html)}, allow_redirects=False
    )
    assert resp.status == 303
    assert (await harness.api.get("/console/", allow_redirects=False)).status == 303


async def test_a_bad_token_is_refused(harness: Harness) -> None:
    page = await harness.api.get("/console/signin")
    resp = await harness.api.post(
        "/console/signin", data={"csrf": csrf_of(await page.text()), "token": "pshd_nope"}
    )
    assert resp.status == 401
    assert "not valid" in await resp.text()


async def test_sign_in_without_csrf_is_refused(harness: Harness) -> None:
    token = harness.token()
    await harness.api.get("/console/signin")
    resp = await harness.api.post("/console/signin", data={"token": token})
    assert resp.status == 403


async def test_state_changing_post_without_csrf_is_refused(
    harness: Harness, receiver: Receiver
) -> None:
    token = harness.token()
    sub = await harness.subscribe(token, receiver.url)
    await sign_in(harness.api, token)
    before = await harness.runtime.store.get_subscription(ORG, sub["uuid"])
    assert before is not None
    for data in ({}, {"csrf": "wrong"}):
        resp = await harness.api.post(f"/console/subscriptions/{sub['uuid']}/rotate", data=data)
        assert resp.status == 403
    after = await harness.runtime.store.get_subscription(ORG, sub["uuid"])
    assert after is not None and after.signing_key == before.signing_key


async def test_other_organizations_are_404_and_admin_sees_all(
    harness: Harness, receiver: Receiver
) -> None:
    mine, theirs = harness.token(), harness.token(org=OTHER_ORG)
    await harness.subscribe(mine, receiver.url)
    other = await harness.subscribe(theirs, receiver.url + "?other")
    await harness.idle()
    log = await harness.api.get(
        f"/api/webhooks/{other['uuid']}/events", headers=harness.auth(theirs)
    )
    other_delivery = (await log.json())["data"]["events"][0]["id"]
    await sign_in(harness.api, mine)
    assert (await harness.api.get(f"/console/subscriptions/{other['uuid']}")).status == 404
    assert (await harness.api.get(f"/console/deliveries/{other_delivery}")).status == 404
    listing = await (await harness.api.get("/console/subscriptions")).text()
    assert "?other" not in listing and receiver.url in listing

    admin = harness.token(scopes=("ADMIN",))
    harness.api.session.cookie_jar.clear()
    await sign_in(harness.api, admin)
    listing = await (await harness.api.get("/console/subscriptions")).text()
    assert "?other" in listing and OTHER_ORG in listing
    assert (await harness.api.get(f"/console/deliveries/{other_delivery}")).status == 200


async def test_admin_token_may_name_any_organization_in_api_paths(
    harness: Harness, receiver: Receiver
) -> None:
    theirs = harness.token(org=OTHER_ORG)
    await harness.subscribe(theirs, receiver.url)
    admin = harness.token(scopes=("ADMIN", "READ:PRODUCT"))
    resp = await harness.api.get(
        f"/organizations/{OTHER_ORG}/subscriptions", headers=harness.auth(admin)
    )
    assert resp.status == 200 and len(await resp.json()) == 1
    plain = harness.token(scopes=("READ:PRODUCT",))
    resp = await harness.api.get(
        f"/organizations/{OTHER_ORG}/subscriptions", headers=harness.auth(plain)
    )
    assert resp.status == 403


async def test_console_link_signs_in_once(harness: Harness) -> None:
    code, out, err = await run_cli_async(
        "console-link", "--org", ORG, env={"PUSHERD_CONFIG": _config_file(harness)}
    )
    assert code == 0, err
    url = out.strip()
    assert url.startswith("http://127.0.0.1:") and "/console/link?t=" in url
    path = url[url.index("/console/") :]
    first = await harness.api.get(path)
    assert first.status == 200 and ORG in await first.text()
    assert (await harness.api.get("/console/")).status == 200
    harness.api.session.cookie_jar.clear()
    second = await harness.api.get(path)
    assert second.status == 403
    assert (await harness.api.get("/console/", allow_redirects=False)).status == 303


async def test_an_expired_console_link_is_refused(harness: Harness) -> None:
    code, out, err = await run_cli_async(
        "console-link",
        "--org",
        ORG,
        "--expires-in",
        "1ms",
        env={"PUSHERD_CONFIG": _config_file(harness)},
    )
    assert code == 0, err
    path = out.strip()[out.index("/console/") :]
    assert (await harness.api.get(path)).status == 403


async def test_console_requests_count_against_the_rate_limit(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(ratelimit={"per_minute": 3, "per_hour": 100})
    token = h.token()
    await sign_in(h.api, token)  # the sign-in pages themselves are not counted
    statuses = [(await h.api.get("/console/subscriptions")).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    resp = await h.api.get("/organizations/self/subscriptions", headers=h.auth(token))
    assert resp.status == 429  # the API shares the organization's budget


async def test_console_disabled_is_404(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(console={"enabled": False})
    assert (await h.api.get("/console/signin")).status == 404
    assert (await h.api.get("/console/")).status == 404


async def test_hostile_payload_is_escaped(harness: Harness, receiver: Receiver) -> None:
    token = harness.token()
    await harness.subscribe(token, receiver.url)
    hostile: dict[str, Any] = {"html": "<script>alert(1)</script><img src=x onerror=alert(2)>"}
    answer = await harness.emit(payload=hostile)
    assert answer["deliveries"] == 1
    await harness.idle()
    await sign_in(harness.api, token)
    sub = (await harness.runtime.store.list_subscriptions(ORG))[0]
    log = await (await harness.api.get(f"/console/subscriptions/{sub.uuid}")).text()
    ids = re.findall(r'/console/deliveries/(\d+)"', log)
    page = await (await harness.api.get(f"/console/deliveries/{max(map(int, ids))}")).text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert sub.signing_key not in page  # headers are rebuilt, the key is not shown


def _config_file(harness: Harness) -> str:
    """A TOML file pointing the CLI at the harness's database."""
    from pathlib import Path

    path = Path(harness.config.storage.path).with_name("console.toml")
    path.write_text(f'[storage]\npath = "{harness.config.storage.path}"\n')
    return str(path)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PUSHERD_CONFIG", raising=False)


async def test_sessions_end_after_12_hours_idle(harness: Harness) -> None:
    from pusherd.console.session import IDLE_S, TOUCH_EVERY_MS, Sessions

    store = harness.runtime.store.console
    now = [1_000_000]
    sessions = Sessions(lambda: store, clock_ms=lambda: now[0])
    s = await sessions.create(ORG, ORG, "test", None)
    idle_ms = int(IDLE_S * 1000)
    now[0] += idle_ms - 1
    assert (await sessions.get(s.id)) is not None  # use keeps it alive
    now[0] += idle_ms - 1
    again = await sessions.get(s.id)
    assert again is not None and again.csrf == s.csrf and again.organization == ORG
    # Seen again within a minute: no write, so the expiry still counts from the last touch.
    now[0] += TOUCH_EVERY_MS - 1
    assert (await sessions.get(s.id)) is not None
    record = await store.session(s.id, now[0])
    assert record is not None and record.last_seen_ms == now[0] - TOUCH_EVERY_MS + 1
    now[0] += idle_ms + 1
    assert await sessions.get(s.id) is None
    assert await sessions.get("made-up") is None


async def test_cookie_is_secure_when_served_over_https(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(console={"base_url": "https://hooks.example.com"})
    page = await h.api.get("/console/signin")
    pre = next(v for v in page.headers.getall("Set-Cookie") if v.startswith("pusherd_console_pre"))
    assert "Secure" in pre and "HttpOnly" in pre and "SameSite=Strict" in pre


async def test_a_revoked_token_ends_its_session(harness: Harness) -> None:
    from pusherd.store import open_store

    token = harness.token()
    await sign_in(harness.api, token)
    assert (await harness.api.get("/console/", allow_redirects=False)).status == 200
    # revoked as `pusherd token revoke` does it: its own store on the same file, not the daemon's
    cli_store = await open_store(harness.config.storage.path, background=False)
    try:
        assert await cli_store.revoke_token((await cli_store.list_tokens())[0].id)
    finally:
        await cli_store.close()
    assert (await harness.api.get("/console/", allow_redirects=False)).status == 303
