"""Destinations that never answer cannot starve healthy ones, and per-origin state does not
outlive its subscriptions (SPEC §5 metrics, §6 Scheduling)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from tests.conftest import ORG, Harness, Receiver
from tests.test_metrics import origin, scrape

HarnessFactory = Callable[..., Awaitable[Harness]]
ReceiverFactory = Callable[..., Awaitable[Receiver]]


class Silent:
    """A raw loopback server that accepts connections, reads whatever comes and never answers."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.handlers: set[asyncio.Task[Any]] = set()
        self.url = ""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        if self.handlers:
            await asyncio.wait(self.handlers, timeout=5)


@pytest.fixture
async def silent_factory() -> AsyncIterator[Callable[[], Awaitable[Silent]]]:
    servers: list[Silent] = []

    async def make() -> Silent:
        s = Silent()
        await s.start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        await s.close()


async def test_fifty_silent_destinations_do_not_delay_a_healthy_one(
    silent_factory: Callable[[], Awaitable[Silent]],
    harness_factory: HarnessFactory,
    receiver_factory: ReceiverFactory,
) -> None:
    # Default max_in_flight (256) and per_destination (8): 50 origins x 8 would take 400 slots.
    h = await harness_factory(delivery={"timeout": "10s"})
    token = h.token()
    dead = [await silent_factory() for _ in range(50)]
    for s in dead:
        await h.subscribe(token, s.url)
    healthy = await receiver_factory()
    await h.subscribe(token, healthy.url)  # last: the origin table's least favoured place
    await healthy.wait_for(1, "TestMessage", timeout=4)

    start = time.monotonic()
    batch = [
        {"eventName": "ProductCreated", "organizationUuid": ORG, "payload": i} for i in range(100)
    ]
    resp = await h.ingest.post("/events", json=batch)
    assert resp.status == 202
    assert {a["deliveries"] for a in await resp.json()} == {51}  # a backlog at every origin
    await healthy.wait_for(100, "ProductCreated", timeout=4)
    assert time.monotonic() - start < 4  # well before any silent attempt times out (10s)

    m = await scrape(h)
    timeouts = m[("pusherd_delivery_attempts_total", (("outcome", "timeout"),))]
    assert timeouts == 0, "a timeout was observed: the test ran too slowly to mean anything"
    # Origins not proven healthy hold one attempt each (slow start), half of max_in_flight at most.
    assert all(s.connections <= 1 for s in dead), [s.connections for s in dead]
    held = sum(m[("pusherd_destination_in_flight", (("origin", origin(s.url)),))] for s in dead)
    assert held <= 50


async def silent_backlogs(
    silent_factory: Callable[[], Awaitable[Silent]],
    harness_factory: HarnessFactory,
    receiver_factory: ReceiverFactory,
) -> tuple[Any, Any, set[str]]:
    """A daemon with 50 silent origins, each holding its one attempt with rows waiting behind
    it, and a healthy receiver subscribed to ProductCreated: (harness, healthy, silent origins)."""
    h = await harness_factory(delivery={"timeout": "10s"})
    token = h.token()
    dead = [await silent_factory() for _ in range(50)]
    for s in dead:
        await h.subscribe(token, s.url, ["PaymentCreated"])
    healthy = await receiver_factory()
    await h.subscribe(token, healthy.url, ["ProductCreated"])
    await healthy.wait_for(1, "TestMessage", timeout=4)
    resp = await h.ingest.post(
        "/events",
        json=[
            {"eventName": "PaymentCreated", "organizationUuid": ORG, "payload": i}
            for i in range(20)
        ],
    )
    assert resp.status == 202
    dispatcher: Any = h.runtime.dispatcher
    dead_origins = {origin(s.url) for s in dead}

    def backlog_everywhere() -> bool:
        held = {o.name for o in dispatcher._origins.values() if o.in_flight and o.waiting}
        return dead_origins <= held

    deadline = time.monotonic() + 4
    while not backlog_everywhere():
        assert time.monotonic() < deadline, "the silent origins did not all get their rows"
        await asyncio.sleep(0.01)
    return h, healthy, dead_origins


async def deliver_healthy(h: Any, healthy: Any, n: int) -> None:
    """Ingest n ProductCreated events and wait until the healthy receiver has all of them."""
    resp = await h.ingest.post(
        "/events",
        json=[
            {"eventName": "ProductCreated", "organizationUuid": ORG, "payload": i} for i in range(n)
        ],
    )
    assert resp.status == 202
    await healthy.wait_for(n, "ProductCreated", timeout=8)


async def test_an_attempt_next_to_silent_origins_with_rows_waiting_does_not_visit_them(
    silent_factory: Callable[[], Awaitable[Silent]],
    harness_factory: HarnessFactory,
    receiver_factory: ReceiverFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every silent origin holds its one attempt with rows waiting behind it.
    h, healthy, dead_origins = await silent_backlogs(
        silent_factory, harness_factory, receiver_factory
    )

    from pusherd.delivery.origins import Origin

    visits = 0
    real = Origin.may_start

    def counted(self: Origin, per_destination: int) -> bool:
        nonlocal visits
        if self.name in dead_origins:
            visits += 1
        return real(self, per_destination)

    monkeypatch.setattr(Origin, "may_start", counted)
    n = 300
    await deliver_healthy(h, healthy, n)
    # A finished attempt looks at its own origin; the silent ones are looked at when rows come
    # in (a claim, the ingest's hand-over), not twice per attempt of another origin (17,600).
    assert visits <= len(dead_origins), visits


@contextlib.contextmanager
def refusing_ports(n: int) -> Iterator[list[int]]:
    """n loopback ports that are bound by this test and refuse every connection (no listen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        yield [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


async def test_origin_state_is_freed_when_its_subscriptions_are_deleted(
    harness: Harness, receiver: Receiver
) -> None:
    token = harness.token()
    kept = await harness.subscribe(token, receiver.url)
    with refusing_ports(300) as ports:
        subs = []
        for port in ports:
            subs.append(await harness.subscribe(token, f"http://127.0.0.1:{port}/hook"))
        for sub in subs:
            resp = await harness.api.delete(
                f"/organizations/self/subscriptions/{sub['uuid']}", headers=harness.auth(token)
            )
            assert resp.status == 204

        def series(m: dict[Any, float]) -> set[str]:
            return {
                dict(labels)["origin"]
                for name, labels in m
                if name in ("pusherd_destination_in_flight", "pusherd_circuit_open")
            }

        deadline = time.monotonic() + 15
        while len(series(await scrape(harness))) > 1:
            assert time.monotonic() < deadline, f"{len(series(await scrape(harness)))} series left"
            await asyncio.sleep(0.05)
    assert series(await scrape(harness)) == {origin(kept["destination"])}
    dispatcher = harness.runtime.dispatcher
    assert len(dispatcher._origins) == 1  # the claim cycle walks only live ones
    # Nothing in flight: the shares' counts came back to zero through every change of tier.
    assert (dispatcher._limits.unproven, dispatcher._limits.failing) == (0, 0)
    await harness.emit()
    await receiver.wait_for(1, "ProductCreated")


async def test_claims_next_to_silent_origins_with_backlogs_do_not_walk_their_queues(
    silent_factory: Callable[[], Awaitable[Silent]],
    harness_factory: HarnessFactory,
    receiver_factory: ReceiverFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every silent origin holds its one attempt, rows claimed behind it and more due in the
    # store: it has no room, and its queue is due.
    h, healthy, _ = await silent_backlogs(silent_factory, harness_factory, receiver_factory)
    dispatcher: Any = h.runtime.dispatcher

    from pusherd.store.sqlite import claims as sqlite_claims

    store = dispatcher.store
    walks = claims = idle = 0
    read_now, claim = store.db.read_now, store.claim

    def counted_read(sql: str, *args: Any) -> Any:
        nonlocal walks
        walks += sql == sqlite_claims._ORIGINS_DUE  # every origin with pending work, one by one
        return read_now(sql, *args)

    async def counted_claim(*args: Any, **kwargs: Any) -> Any:
        nonlocal claims, idle
        got = await claim(*args, **kwargs)
        claims += 1
        idle += not got.deliveries
        return got

    monkeypatch.setattr(store.db, "read_now", counted_read)
    monkeypatch.setattr(store, "claim", counted_claim)
    n = 300
    start = time.monotonic()
    await deliver_healthy(h, healthy, n)
    polls = int(time.monotonic() - start) + 1
    # The ingest (and the poll) look for origins not known yet; the other claims ask only the
    # origins with room for rows, and a cycle where none has room asks the store nothing.
    # A claim that took the whole budget also looks for them (rows may have been left for lack
    # of room), and a loaded machine makes more of those: a walk per claim is what must not be.
    assert claims > 1
    assert walks <= 4 + polls or 3 * walks <= claims, (walks, claims)
    assert idle <= 4 + polls, (idle, claims)
