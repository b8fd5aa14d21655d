"""The dispatcher's scheduling (SPEC §3, §4, §6): subscription changes while deliveries are queued,
fresh deliveries handed over at ingest, dead owners' leases, prompt retries."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from pusherd.delivery.dispatcher import Dispatcher
from pusherd.store.models import ClaimedDelivery, NewEvent
from tests.conftest import ORG, Harness, Receiver
from tests.service import free_port
from tests.test_crash import Daemon, start_receiver

HarnessFactory = Callable[..., Awaitable[Harness]]
ReceiverFactory = Callable[..., Awaitable[Receiver]]

QUEUE_DEPTH = re.compile(r"^pusherd_queue_depth (\S+)$", re.MULTILINE)


class Gate:
    """Receiver answers that hold every request until the test opens the gate."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()

    async def answer(self, request: web.Request) -> web.Response:
        await self.opened.wait()
        return web.Response(text="ok")

    def block(self, receiver: Receiver, n: int = 1000) -> None:
        """Make the receiver's next n requests wait for the gate."""
        receiver.statuses[:] = [self.answer] * n


@pytest.fixture
async def gate(receiver_factory: ReceiverFactory) -> AsyncIterator[Gate]:
    """A gate opened at teardown whatever happened (before the receivers close)."""
    g = Gate()
    yield g
    g.opened.set()


async def wait_until(check: Callable[[], Any], limit_s: float = 10.0, what: str = "") -> None:
    """Poll a (sync or async) condition until it holds or the deadline passes."""
    deadline = time.monotonic() + limit_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met before the deadline: {what}")
        await asyncio.sleep(0.01)


def query(h: Harness, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Read the daemon's SQLite file directly, as an operator with sqlite3 would."""
    with contextlib.closing(sqlite3.connect(h.config.storage.path)) as conn:
        return conn.execute(sql, params).fetchall()


def statuses(h: Harness, sub_uuid: str, event_name: str = "ProductCreated") -> list[str]:
    """The statuses of a subscription's deliveries of one event type, in ingest order."""
    rows = query(
        h,
        "SELECT d.status FROM deliveries d JOIN events e ON e.seq = d.event_seq"
        " WHERE d.subscription = ? AND e.event_name = ? ORDER BY d.id",
        (sub_uuid, event_name),
    )
    return [r[0] for r in rows]


def message_ids(receiver: Receiver, event_name: str = "ProductCreated") -> list[str]:
    return [e["messageId"] for e in receiver.events(event_name)]


def zettle_signature(key: str, envelope: dict[str, Any]) -> str:
    """X-iZettle-Signature as the Zettle docs compute it: HMAC-SHA256(key, timestamp.payload)."""
    message = f"{envelope['timestamp']}.{envelope['payload']}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


async def emit_batch(h: Harness, ids: list[str]) -> None:
    body = [
        {
            "eventName": "ProductCreated",
            "organizationUuid": ORG,
            "payload": {"i": i},
            "messageId": i,
        }
        for i in ids
    ]
    resp = await h.ingest.post("/events", json=body)
    assert resp.status == 202, await resp.text()


async def queue_depth(h: Harness) -> float:
    resp = await h.ingest.get("/metrics")
    assert resp.status == 200
    found = QUEUE_DEPTH.search(await resp.text())
    assert found is not None, "pusherd_queue_depth missing from /metrics"
    return float(found.group(1))


async def register(h: Harness, token: str, url: str) -> dict[str, Any]:
    """A PayStell webhook for ProductCreated; its data (with secretKey)."""
    resp = await h.api.post(
        "/api/webhooks/register",
        json={"url": url, "eventTypes": ["ProductCreated"]},
        headers=h.auth(token),
    )
    assert resp.status == 201, await resp.text()
    data: dict[str, Any] = (await resp.json())["data"]
    return data


async def blocked_backlog(
    h: Harness, receiver: Receiver, gate: Gate, ids: list[str], one_by_one: bool = True
) -> None:
    """Queue `ids` behind a receiver that holds the first of them (per_destination=1)."""
    await receiver.wait_for(1, "TestMessage")
    await h.idle()
    gate.block(receiver)
    if one_by_one:
        for i in ids:
            await h.emit(messageId=i)
    else:
        await emit_batch(h, ids)
    await receiver.wait_for(1, "ProductCreated")
    assert message_ids(receiver) == [ids[0]]


async def test_new_destination_gets_every_delivery_not_yet_started(
    harness_factory: HarnessFactory, receiver_factory: ReceiverFactory, gate: Gate
) -> None:
    h = await harness_factory(delivery={"per_destination": 1})
    old, new = await receiver_factory(), await receiver_factory()
    token = h.token()
    sub = await h.subscribe(token, old.url)
    ids = [f"move-{i}" for i in range(10)]
    await blocked_backlog(h, old, gate, ids)

    resp = await h.api.put(
        f"/organizations/self/subscriptions/{sub['uuid']}",
        json={"destination": new.url},
        headers=h.auth(token),
    )
    assert resp.status == 200, await resp.text()
    seen_by_old = len(old.requests)
    gate.opened.set()  # the attempt in flight finishes at the old destination

    await new.wait_for(len(ids) - 1, "ProductCreated")
    await h.idle()
    assert len(old.requests) == seen_by_old
    assert message_ids(old) == ids[:1]
    assert message_ids(new) == ids[1:]  # in ingest order
    await wait_until(lambda: set(statuses(h, sub["uuid"])) == {"delivered"}, what="delivered")


async def test_rotated_secret_signs_deliveries_queued_before_the_rotation(
    harness_factory: HarnessFactory, receiver_factory: ReceiverFactory, gate: Gate
) -> None:
    h = await harness_factory(delivery={"per_destination": 1})
    receiver = await receiver_factory()
    token = h.token()
    hook = await register(h, token, receiver.url)
    old_key = hook["secretKey"]
    before = [f"rot-{i}" for i in range(6)]
    await blocked_backlog(h, receiver, gate, before)

    resp = await h.api.post("/api/webhooks/generate-secret", headers=h.auth(token))
    assert resp.status == 200, await resp.text()
    new_key = (await resp.json())["data"]["secret"]
    assert new_key != old_key
    after = ["rot-after-0", "rot-after-1"]
    for i in after:
        await h.emit(messageId=i)
    gate.opened.set()

    await receiver.wait_for(len(before) + len(after), "ProductCreated")
    by_id = {
        r.json()["messageId"]: r
        for r in receiver.requests
        if r.json()["eventName"] == "ProductCreated"
    }
    first = by_id.pop(before[0])  # on the wire before the rotation
    assert first.headers["X-iZettle-Signature"] == zettle_signature(old_key, first.json())
    assert set(by_id) == set(before[1:] + after)
    for req in by_id.values():
        assert req.headers["X-iZettle-Signature"] == zettle_signature(new_key, req.json())
        # Standard Webhooks carries both keys during the overlap: either one verifies.
        assert len(req.headers["webhook-signature"].split()) == 2
        for key in (new_key, old_key):
            Webhook(key.encode()).verify(req.body, req.headers)


async def test_delete_cancels_a_blocked_backlog(
    harness_factory: HarnessFactory, receiver_factory: ReceiverFactory, gate: Gate
) -> None:
    h = await harness_factory(delivery={"per_destination": 1})
    receiver = await receiver_factory()
    token = h.token()
    sub = await h.subscribe(token, receiver.url)
    ids = [f"del-{i}" for i in range(200)]
    await blocked_backlog(h, receiver, gate, ids, one_by_one=False)
    assert await queue_depth(h) == 200

    resp = await h.api.delete(
        f"/organizations/self/subscriptions/{sub['uuid']}", headers=h.auth(token)
    )
    assert resp.status == 204
    seen = len(receiver.requests)
    await wait_until(
        lambda: statuses(h, sub["uuid"]) == ["cancelled"] * 200, what="all 200 cancelled"
    )
    assert await queue_depth(h) == 0

    gate.opened.set()  # the one attempt in flight gets its answer: it stays cancelled
    await h.idle()
    assert len(receiver.requests) == seen
    assert statuses(h, sub["uuid"]) == ["cancelled"] * 200
    assert await queue_depth(h) == 0


async def test_deactivated_webhook_fails_its_backlog_and_reactivation_resumes(
    harness_factory: HarnessFactory, receiver_factory: ReceiverFactory, gate: Gate
) -> None:
    h = await harness_factory(delivery={"per_destination": 1})
    receiver = await receiver_factory()
    token = h.token()
    hook = await register(h, token, receiver.url)
    ids = [f"off-{i}" for i in range(20)]
    await blocked_backlog(h, receiver, gate, ids, one_by_one=False)

    resp = await h.api.put(
        "/api/webhooks/register", json={"isActive": False}, headers=h.auth(token)
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["data"]["isActive"] is False
    seen = len(receiver.requests)
    await wait_until(lambda: statuses(h, hook["id"]) == ["failed"] * 20, what="all failed")
    errors = query(
        h,
        "SELECT DISTINCT last_error FROM deliveries WHERE subscription = ? AND status = 'failed'",
        (hook["id"],),
    )
    assert errors == [("subscription disabled",)]

    gate.opened.set()
    await h.idle()
    assert len(receiver.requests) == seen
    assert statuses(h, hook["id"]) == ["failed"] * 20

    resp = await h.api.put("/api/webhooks/register", json={"isActive": True}, headers=h.auth(token))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["data"]["isActive"] is True
    for i in ("on-0", "on-1", "on-2"):
        await h.emit(messageId=i)
    await receiver.wait_for(1 + 3, "ProductCreated")
    assert message_ids(receiver) == ["off-0", "on-0", "on-1", "on-2"]
    await h.idle()
    assert statuses(h, hook["id"]) == ["failed"] * 20 + ["delivered"] * 3


async def test_fresh_deliveries_arrive_in_ingest_order_with_one_attempt_each(
    harness: Harness, receiver: Receiver
) -> None:
    h = harness
    sub = await h.subscribe(h.token(), receiver.url)
    await receiver.wait_for(1, "TestMessage")
    ids = [f"seq-{i}" for i in range(50)]
    for i in ids:
        await h.emit(messageId=i)
    await receiver.wait_for(50, "ProductCreated")
    assert message_ids(receiver) == ids
    await h.idle()
    rows = query(
        h,
        "SELECT d.status, d.attempts, (SELECT count(*) FROM attempts a WHERE a.delivery_id = d.id)"
        " FROM deliveries d WHERE d.subscription = ? ORDER BY d.id",
        (sub["uuid"],),
    )
    assert rows == [("delivered", 1, 1)] * 51


async def subscribed_and_idle(h: Harness, receiver: Receiver) -> tuple[dict[str, Any], Dispatcher]:
    """Subscribe the receiver, let its TestMessage go out; the subscription and dispatcher."""
    sub = await h.subscribe(h.token(), receiver.url)
    await receiver.wait_for(1, "TestMessage")
    await h.idle()
    return sub, h.runtime.dispatcher


async def test_rows_an_ingest_left_in_the_table_wait_for_the_ones_it_hands_over(
    harness: Harness, receiver: Receiver
) -> None:
    # An ingest hands the first rows of a subscription to the dispatcher and leaves the rest
    # in the table (no room). Between its commit and the hand-over, a slot frees up: the
    # claim loop must not send a row of the table ahead of the rows being handed over.
    h = harness
    sub, d = await subscribed_and_idle(h, receiver)
    origin = d._sub_origin[sub["uuid"]]
    origin.promised += 1  # one slot held, as by an attempt in flight
    taking = d.taking()
    events = [NewEvent(ORG, "ProductCreated", "{}", f"gap-{i}", None) for i in range(40)]
    handed: list[ClaimedDelivery] = []
    try:
        results = await h.runtime.store.ingest(events, h.runtime.catalogue.matches, taking)
        handed = [x for r in results for x in r.handed]
        assert 0 < len(handed) < 40  # some handed over, the rest left in the table
        origin.promised -= 1  # the slot frees up before the hand-over
        d.wake()
        await asyncio.sleep(0.3)  # the claim loop runs meanwhile
    finally:
        d.accept(taking, handed)
    await receiver.wait_for(40, "ProductCreated")
    assert message_ids(receiver) == [f"gap-{i}" for i in range(40)]


async def test_a_hand_over_given_up_on_before_its_write_holds_nothing_back(
    harness: Harness, receiver: Receiver
) -> None:
    # An ingest handler cancelled before its group commit ran: accept() comes first, then the
    # shared write asks wants(). Nothing may stay promised, or the subscription would never
    # be claimed from again.
    h = harness
    sub, d = await subscribed_and_idle(h, receiver)
    taking = d.taking()
    d.accept(taking, [])
    assert not taking.wants(sub["uuid"])
    assert sub["uuid"] not in d._handing
    assert d._sub_origin[sub["uuid"]].promised == 0
    await h.emit(messageId="after")
    await receiver.wait_for(1, "ProductCreated")


async def test_large_batch_to_a_slow_receiver_arrives_complete_and_in_order(
    harness_factory: HarnessFactory, receiver_factory: ReceiverFactory
) -> None:
    h = await harness_factory(delivery={"per_destination": 2})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.02)  # a receiver that takes 20ms per request
        return web.Response(text="ok")

    receiver = await receiver_factory()
    sub = await h.subscribe(h.token(), receiver.url)
    await receiver.wait_for(1, "TestMessage")
    receiver.statuses[:] = [slow] * 400
    ids = [f"slow-{i:03d}" for i in range(300)]
    await emit_batch(h, ids)
    # Fresh events while the backlog drains must queue behind it, not jump ahead.
    later = [f"slow-later-{i}" for i in range(10)]
    for i in later:
        await h.emit(messageId=i)
    assert len(receiver.events("ProductCreated")) < 300, "the backlog was gone too soon"
    await receiver.wait_for(310, "ProductCreated", timeout=30)
    assert message_ids(receiver) == ids + later
    await h.idle()
    assert statuses(h, sub["uuid"]) == ["delivered"] * 310


async def test_short_retry_is_attempted_on_time(
    harness_factory: HarnessFactory, receiver_factory: ReceiverFactory
) -> None:
    h = await harness_factory(delivery={"retry_schedule": ["300ms"]})
    receiver = await receiver_factory()
    await h.subscribe(h.token(), receiver.url)
    await receiver.wait_for(1, "TestMessage")
    await h.idle()
    receiver.statuses[:] = [500, 200]
    await h.emit(messageId="retry-once")
    await receiver.wait_for(2, "ProductCreated", timeout=5)
    first, second = (r.at for r in receiver.requests if r.json()["eventName"] == "ProductCreated")
    assert 0.29 <= second - first < 0.9


# -- a daemon killed while it holds leases ------------------------------------------------------


@pytest.fixture
async def daemons() -> AsyncIterator[list[Daemon]]:
    """Daemons the test starts; killed at teardown whatever happened."""
    made: list[Daemon] = []
    yield made
    for d in made:
        await d.kill()


class Hanging:
    """A receiver that accepts each request and never answers it."""

    def __init__(self) -> None:
        self.requests = 0
        self.arrived = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                self.requests += 1
                self.arrived.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away (killed)
        finally:
            writer.close()


async def test_leases_of_a_killed_daemon_are_recovered_at_start(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    daemon = Daemon(tmp_path, {"lease": '"30s"', "timeout": '"60s"', "retry_schedule": '["1s"]'})
    daemons.append(daemon)
    daemon.write_config()
    token = await daemon.token()
    port = free_port()
    hanging = Hanging()
    server = await asyncio.start_server(hanging.handle, "127.0.0.1", port)
    try:
        await daemon.start()
        await daemon.subscribe(token, f"http://127.0.0.1:{port}/hook")
        ids = [f"lease-{i}" for i in range(5)]
        async with aiohttp.ClientSession() as session:
            for i in ids:
                event = {
                    "eventName": "ProductCreated",
                    "organizationUuid": ORG,
                    "payload": {"i": i},
                    "messageId": i,
                }
                async with session.post(f"{daemon.ingest}/events", json=event) as resp:
                    assert resp.status == 202, await resp.text()
        # The TestMessage is on the wire, waiting for an answer (an origin that has not answered
        # yet gets one attempt at a time); the events are pending, some of them claimed.
        deadline = time.monotonic() + 10
        while hanging.requests < 1:
            assert time.monotonic() < deadline, f"only {hanging.requests} requests arrived"
            hanging.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hanging.arrived.wait(), 0.5)
        await daemon.kill()
    finally:
        server.close()
        await server.wait_closed()

    with contextlib.closing(sqlite3.connect(tmp_path / "pusherd.sqlite3")) as conn:
        leased = conn.execute(
            "SELECT count(*) FROM deliveries WHERE status = 'pending' AND lease_owner IS NOT NULL"
            " AND lease_until_ms > ?",
            (int(time.time() * 1000) + 20_000,),
        ).fetchone()[0]
    assert leased >= 1  # without recovery they would wait ~30s

    receiver = Receiver()
    healthy = await start_receiver(port, receiver)
    try:
        await daemon.start()
        await receiver.wait_for(len(ids), "ProductCreated", timeout=8)
        await receiver.wait_for(1, "TestMessage", timeout=2)
        assert sorted(message_ids(receiver)) == ids
    finally:
        await daemon.kill()
        await healthy.close()
