"""Several `pusherd serve` processes on one PostgreSQL database (SPEC §8), end to end; the
three-process tests of issue 12 are in test_pg_multi.py, with these helpers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from tests.conftest import ALL_SCOPES, ORG
from tests.service import Service, run_cli_async, start_service
from tests.test_pg_cli import config_with_url

SUB = "0c1d2e3f-1d2f-4a3b-8c4d-333333333333"


@contextlib.asynccontextmanager
async def serving(config: Path, text: str) -> AsyncIterator[Service]:
    """A `pusherd serve` on the ports of config (whose text is given), healthy, killed at the
    end whatever happens."""
    api = int(text.split('[api]\nlisten = "127.0.0.1:')[1].split('"')[0])
    ingest = int(text.split('[ingest]\nlisten = "127.0.0.1:')[1].split('"')[0])
    service = start_service(config, api, ingest)
    try:
        await asyncio.to_thread(service.wait_healthy)
        yield service
    finally:
        await asyncio.to_thread(service.kill)


async def admin_auth(config: Path) -> dict[str, str]:
    """The Authorization header of a new token with every event scope (made by the CLI)."""
    scopes = [arg for scope in ALL_SCOPES for arg in ("--scope", scope)]
    code, token, err = await run_cli_async(
        "token", "create", "--config", str(config), "--org", ORG, *scopes
    )
    assert code == 0, err
    return {"Authorization": f"Bearer {token.strip()}"}


async def subscribe(
    session: aiohttp.ClientSession, api: str, auth: dict[str, str], destination: str
) -> None:
    """Subscribe `destination` to ProductCreated as SUB through the Zettle dialect."""
    body = {
        "uuid": SUB,
        "transportName": "WEBHOOK",
        "eventNames": ["ProductCreated"],
        "destination": destination,
        "contactEmail": "ops@example.com",
    }
    url = api + "/organizations/self/subscriptions"
    async with session.post(url, json=body, headers=auth) as resp:
        assert resp.status == 200, await resp.text()


async def test_rate_limits_count_across_processes(tmp_path: Path, pg_url: str) -> None:
    texts = []
    for name in ("one", "two"):
        config = config_with_url(tmp_path / f"{name}.toml", tmp_path / f"{name}.sqlite3", pg_url)
        text = config.read_text() + "[ratelimit]\nper_minute = 4\nper_hour = 100\n"
        config.write_text(text)
        texts.append((config, text))
    auth = await admin_auth(texts[0][0])
    async with (
        serving(*texts[0]) as first,
        serving(*texts[1]) as second,
        aiohttp.ClientSession() as session,
    ):
        # The windows are the clock's minutes: not across a minute's turn.
        if time.time() % 60 > 50:
            await asyncio.sleep(61 - time.time() % 60)  # a clock boundary, not synchronisation
        answers = []
        for svc in (first, second, first, second, first, second):
            url = svc.api + "/organizations/self/subscriptions"
            async with session.get(url, headers=auth) as resp:
                answers.append((resp.status, resp.headers["X-RateLimit-Remaining"]))
                if resp.status == 429:
                    assert 1 <= int(resp.headers["Retry-After"]) <= 60
        # Four in the minute for the organization, whichever process counts them.
        assert answers == [(200, "3"), (200, "2"), (200, "1"), (200, "0"), (429, "0"), (429, "0")]
        assert await asyncio.to_thread(first.stop) == 0
        assert await asyncio.to_thread(second.stop) == 0
