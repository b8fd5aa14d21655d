"""GET /metrics on the ingest listener, read with prometheus_client's own text parser (SPEC §5)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from pusherd.app import create_app
from pusherd.keys import INGEST_APP, RUNTIME
from tests.conftest import Harness, Receiver, make_config

ReceiverFactory = Callable[..., Awaitable[Receiver]]
HarnessFactory = Callable[..., Awaitable[Harness]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(h: Harness) -> Samples:
    """Every sample of GET /metrics, keyed by (name, sorted labels)."""
    resp = await h.ingest.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return parse(await resp.text())


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def origin(url: str) -> str:
    u = URL(url)
    return f"{u.scheme}://{u.host}:{u.port}"


async def until(check: Callable[[], Awaitable[bool]], what: str, deadline_s: float = 10.0) -> None:
    """Poll an async condition with a deadline."""
    deadline = time.monotonic() + deadline_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_metrics_match_what_the_receivers_saw(
    harness: Harness, receiver_factory: ReceiverFactory
) -> None:
    token = harness.token()
    good = await receiver_factory(statuses=[500, 500])  # two failures, then 200s
    bad = await receiver_factory(default=500)
    await harness.subscribe(token, good.url, ["ProductCreated"])
    await harness.subscribe(token, bad.url, ["PaymentCreated"])  # gets only its TestMessage
    for _ in range(2):
        await harness.emit("ProductCreated")

    async def settled() -> bool:
        samples = await scrape(harness)
        finished = sum(
            v for (n, _), v in samples.items() if n == "pusherd_deliveries_finished_total"
        )
        return finished == 4

    await until(settled, "4 finished deliveries")
    m = await scrape(harness)

    # good: TestMessage + 2 events = 3 deliveries, 5 attempts (2 failed); bad: 4 failed attempts.
    assert len(good.requests) == 5 and len(bad.requests) == 4
    assert m[("pusherd_events_ingested_total", ())] == 2
    attempts = {
        dict(labels)["outcome"]: v
        for (n, labels), v in m.items()
        if n == "pusherd_delivery_attempts_total"
    }
    assert attempts["success"] == 3
    assert attempts["http_error"] == 2 + 4
    assert attempts.get("network_error", 0) == 0 and attempts.get("timeout", 0) == 0
    assert m[("pusherd_deliveries_finished_total", (("status", "delivered"),))] == 3
    assert m[("pusherd_deliveries_finished_total", (("status", "failed"),))] == 1
    assert m[("pusherd_attempt_duration_seconds_count", ())] == 9
    assert m[("pusherd_attempt_duration_seconds_bucket", (("le", "+Inf"),))] == 9
    assert m[("pusherd_attempt_duration_seconds_sum", ())] > 0
    assert m[("pusherd_queue_depth", ())] == 0
    assert m[("pusherd_oldest_pending_age_seconds", ())] == 0
    for url in (good.url, bad.url):
        assert m[("pusherd_destination_in_flight", (("origin", origin(url)),))] == 0
        assert m[("pusherd_circuit_open", (("origin", origin(url)),))] == 0

    # Duplicates are not counted as ingested.
    await harness.emit("ProductCreated", messageId="m-1")
    await harness.emit("ProductCreated", messageId="m-1")
    m = await scrape(harness)
    assert m[("pusherd_events_ingested_total", ())] == 3


async def test_in_flight_and_circuit_per_origin(
    harness: Harness, receiver_factory: ReceiverFactory
) -> None:
    gate = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response(text="ok")

    slow = await receiver_factory(statuses=[held])
    dead = await receiver_factory(default=500)
    token = harness.token()
    await harness.subscribe(token, slow.url, ["ProductCreated"])
    await slow.wait_for(1, "TestMessage")
    key = ("pusherd_destination_in_flight", (("origin", origin(slow.url)),))
    m = await scrape(harness)
    assert m[key] == 1
    gate.set()

    async def drained() -> bool:
        return (await scrape(harness))[key] == 0

    await until(drained, "in-flight back to 0")

    # 5 consecutive failures open the breaker: TestMessage (4 attempts) + one event.
    await harness.subscribe(token, dead.url, ["PaymentCreated"])
    await dead.wait_for(4, "TestMessage")
    await harness.emit("PaymentCreated")
    await dead.wait_for(1, "PaymentCreated")
    circuit = ("pusherd_circuit_open", (("origin", origin(dead.url)),))

    async def opened() -> bool:
        return (await scrape(harness)).get(circuit) == 1

    await until(opened, "circuit open")
    m = await scrape(harness)
    assert m[("pusherd_circuit_open", (("origin", origin(slow.url)),))] == 0


async def test_queue_depth_and_oldest_pending_age(
    tmp_path: Path, aiohttp_client: Any, receiver: Receiver
) -> None:
    # No dispatcher: deliveries stay pending and due.
    cfg = make_config(tmp_path)
    app = create_app(cfg, dispatch=False)
    api = await aiohttp_client(app)
    ingest = await aiohttp_client(app[INGEST_APP])
    h = Harness(cfg, api, ingest, app[RUNTIME])
    token = h.token()
    await h.subscribe(token, receiver.url, ["ProductCreated"])
    for _ in range(3):
        await h.emit("ProductCreated")

    async def aged() -> bool:
        return (await scrape(h))[("pusherd_oldest_pending_age_seconds", ())] > 0.05

    await until(aged, "the oldest pending delivery to age")
    m = await scrape(h)
    assert m[("pusherd_queue_depth", ())] == 4  # TestMessage + 3 events
    assert m[("pusherd_events_ingested_total", ())] == 3
    assert receiver.requests == []
