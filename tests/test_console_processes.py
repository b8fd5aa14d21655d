"""Console sessions kept by the store (SPEC §8, §9): one session whichever process a request
reaches on PostgreSQL, and a session that outlives a restart of the daemon on SQLite."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

import aiohttp
from yarl import URL

from tests.conftest import ORG, Receiver
from tests.service import run_cli_async, start_service, write_config
from tests.test_console import csrf_of
from tests.test_pg_cli import config_with_url
from tests.test_pg_serve import SUB, admin_auth, serving, subscribe

COOKIE = "pusherd_console"


def browser() -> aiohttp.ClientSession:
    """A client that keeps cookies as a browser does (for 127.0.0.1 too: every port shares them)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(client: aiohttp.ClientSession, base: str, token: str) -> str:
    """Sign in through the form (its CSRF value from the page and its cookie); the cookie's id."""
    async with client.get(base + "/console/signin") as page:
        assert page.status == 200
        csrf = csrf_of(await page.text())
    async with client.post(
        base + "/console/signin", data={"csrf": csrf, "token": token}, allow_redirects=False
    ) as resp:
        assert resp.status == 303, await resp.text()
    cookie = client.cookie_jar.filter_cookies(URL(base + "/console/"))[COOKIE]
    return cookie.value


async def status_with(cookie: str, url: str, method: str = "GET", **kw: object) -> int:
    """The status of one request carrying only this session cookie (no redirects followed)."""
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as plain,
        plain.request(
            method, url, headers={"Cookie": f"{COOKIE}={cookie}"}, allow_redirects=False, **kw
        ) as resp,
    ):
        return resp.status


async def test_one_session_across_two_processes_on_postgres(
    tmp_path: Path, pg_url: str, receiver: Receiver
) -> None:
    one = config_with_url(tmp_path / "one.toml", tmp_path / "one.sqlite3", pg_url)
    two = config_with_url(tmp_path / "two.toml", tmp_path / "two.sqlite3", pg_url)
    auth = await admin_auth(one)
    token = auth["Authorization"].removeprefix("Bearer ")
    async with (
        serving(one, one.read_text()) as first,
        serving(two, two.read_text()) as second,
        browser() as client,
    ):
        await subscribe(client, first.api, auth, receiver.url)
        cookie = await sign_in(client, first.api, token)
        # Signed in through the first process: the second knows the session.
        async with client.get(second.api + "/console/", allow_redirects=False) as home:
            assert home.status == 200 and ORG in await home.text()
        # An action through the second, with the CSRF token of a page the second served.
        action = f"/console/subscriptions/{SUB}/test"
        async with client.get(second.api + action) as confirm:
            assert confirm.status == 200
            csrf = csrf_of(await confirm.text())
        async with client.post(
            second.api + action, data={"csrf": csrf}, allow_redirects=False
        ) as done:
            assert done.status == 303, await done.text()
            location = done.headers["Location"]
        # Its message is shown once, by whichever process serves the next page.
        async with client.get(first.api + location) as page:
            assert "A test event was queued as delivery #" in await page.text()
        async with client.get(second.api + location) as page:
            assert "A test event was queued" not in await page.text()
        await receiver.wait_for(1, "test.event", timeout=10)
        # Signing out through the second ends the session in the first too.
        async with client.get(second.api + "/console/") as home:
            csrf = csrf_of(await home.text())
        async with client.post(
            second.api + "/console/signout", data={"csrf": csrf}, allow_redirects=False
        ) as out:
            assert out.status == 303
        assert await status_with(cookie, first.api + "/console/") == 303
        assert await status_with(cookie, second.api + "/console/") == 303
        assert await status_with(cookie, first.api + action, "POST", data={"csrf": csrf}) == 403

        # Revoking the token (the CLI, on the shared database) ends its sessions everywhere.
        cookie = await sign_in(client, second.api, token)
        assert await status_with(cookie, first.api + "/console/") == 200
        code, out_text, err = await run_cli_async("token", "list", "--config", str(one))
        assert code == 0, err
        (token_id,) = re.findall(r"tok_[0-9a-f]+", out_text)
        code, _, err = await run_cli_async("token", "revoke", "--config", str(one), token_id)
        assert code == 0, err
        assert await status_with(cookie, first.api + "/console/") == 303
        assert await status_with(cookie, second.api + "/console/") == 303


async def test_a_session_outlives_a_restart_on_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "pusherd.sqlite3"
    config = tmp_path / "pusherd.toml"
    api, ingest = write_config(config, db)
    code, token, err = await run_cli_async(
        "token", "create", "--config", str(config), "--org", ORG, "--scope", "READ:PRODUCT"
    )
    assert code == 0, err
    service = start_service(config, api, ingest)
    try:
        await asyncio.to_thread(service.wait_healthy)
        async with browser() as client:
            cookie = await sign_in(client, service.api, token.strip())
        assert await status_with(cookie, service.api + "/console/") == 200
        assert await asyncio.to_thread(service.stop) == 0
        # Only a hash of the cookie's id is in the file: reading it signs nobody in.
        conn = sqlite3.connect(db)
        rows = conn.execute("SELECT * FROM console_sessions").fetchall()
        conn.close()
        assert len(rows) == 1 and not any(cookie in str(v) for v in rows[0])
        service = start_service(config, api, ingest)
        await asyncio.to_thread(service.wait_healthy)
        assert await status_with(cookie, service.api + "/console/") == 200
        assert await status_with(cookie + "x", service.api + "/console/") == 303
    finally:
        await asyncio.to_thread(service.kill)
