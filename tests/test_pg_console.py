"""The web console over HTTP against a pusherd on PostgreSQL: sign in with a token, the overview,
a subscription's log and a delivery's page (the queries themselves: test_store_contract_console)."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from pusherd.store.postgres.migrate import migrate
from tests.conftest import ALL_SCOPES, ORG, Harness, Receiver, make_config
from tests.test_console import sign_in


async def test_console_pages_on_postgres(
    tmp_path: Path,
    pg_url: str,
    harness_factory: Callable[..., Awaitable[Harness]],
    receiver: Receiver,
) -> None:
    harness = await harness_factory(make_config(tmp_path, storage={"url": pg_url}))
    _, token = await harness.runtime.store.create_token(ORG, ALL_SCOPES, "console", None)
    # A new subscription gets a TestMessage: its delivery is the one the pages show (no
    # dependence on how fast an ingested event is claimed, which is the dispatcher's business).
    sub = await harness.subscribe(token, receiver.url)
    deadline = time.monotonic() + 10
    while True:
        log = await harness.api.get(
            f"/api/webhooks/{sub['uuid']}/events", headers=harness.auth(token)
        )
        events: list[dict[str, Any]] = (await log.json())["data"]["events"]
        done = [e for e in events if e["status"] == "delivered"]
        if done:
            break
        assert time.monotonic() < deadline, events
        await harness.idle()

    await sign_in(harness.api, token)
    overview = await harness.api.get("/console/")
    assert overview.status == 200, await overview.text()
    assert receiver.url in await overview.text()
    page = await harness.api.get(f"/console/subscriptions/{sub['uuid']}")
    assert page.status == 200
    assert "TestMessage" in await page.text()
    delivery = await harness.api.get(f"/console/deliveries/{done[0]['id']}")
    assert delivery.status == 200
    text = await delivery.text()
    assert "TestMessage" in text and receiver.url in text and "200" in text


def _plan_text(rows: list[asyncpg.Record]) -> str:
    return re.sub(r"\s+", " ", " ".join(r[0] for r in rows))


async def test_console_windows_are_index_ranges(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await migrate(conn)
        await conn.execute("SET enable_seqscan = off")  # an empty table: ask for what is usable
        counts = await conn.fetch(
            "EXPLAIN SELECT finished_ms / 60000 * 60000 AS k, subscription, count(*)"
            " FROM deliveries WHERE finished_ms IS NOT NULL AND finished_ms >= 1"
            " AND finished_ms < 2 AND status IN ('delivered', 'failed') GROUP BY k, subscription"
        )
        assert "deliveries_finished" in _plan_text(counts)
        window = await conn.fetch(
            "EXPLAIN SELECT id FROM deliveries WHERE subscription = 's' AND id < 9 AND id >= 0"
            " ORDER BY id DESC LIMIT 5000"
        )
        assert "deliveries_by_subscription" in _plan_text(window)
        assert "Sort" not in _plan_text(window)  # newest first comes from the index itself
    finally:
        await conn.close()
