"""Retention: finished deliveries older than storage.retention, and events left without
deliveries, are purged in batches; pending and recent rows stay."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pusherd import runtime as runtime_module
from pusherd.app import create_app
from pusherd.keys import INGEST_APP, RUNTIME
from pusherd.runtime import PURGE_BATCH, PURGE_EVERY_S, next_purge_wait
from pusherd.store import Change, StoreError
from tests.conftest import ORG, Harness, Receiver, make_config

ReceiverFactory = Callable[..., Awaitable[Receiver]]
HarnessFactory = Callable[..., Awaitable[Harness]]
HOUR_MS = 3600 * 1000


@contextmanager
def database(h: Harness) -> Iterator[sqlite3.Connection]:
    """A second connection to the daemon's SQLite file, as an operator's sqlite3 shell would be."""
    conn = sqlite3.connect(h.config.storage.path, isolation_level=None, timeout=5)
    try:
        yield conn
    finally:
        conn.close()


def count(conn: sqlite3.Connection, sql: str, *params: Any) -> int:
    return int(conn.execute(sql, params).fetchone()[0])


async def test_purge_removes_old_finished_deliveries_and_keeps_pending_and_recent(
    harness_factory: HarnessFactory, receiver_factory: ReceiverFactory
) -> None:
    h = await harness_factory(storage={"retention": "1h"}, delivery={"retry_schedule": ["1h"]})
    good = await receiver_factory()
    down = await receiver_factory(default=500)  # its deliveries wait an hour: pending
    token = h.token()
    auth = h.auth(token)
    await h.subscribe(token, good.url, ["ProductCreated"])
    stuck = await h.subscribe(token, down.url, ["PaymentCreated"])
    old_product = await h.emit("ProductCreated")
    new_product = await h.emit("ProductCreated")
    old_payment = await h.emit("PaymentCreated")
    unmatched = await h.emit("InvoiceCreated")  # no subscriber: an event without deliveries
    assert unmatched["deliveries"] == 0
    await good.wait_for(2, "ProductCreated")
    await down.wait_for(1, "PaymentCreated")
    await h.idle()

    old_ms = int(time.time() * 1000) - 2 * HOUR_MS
    with database(h) as conn:
        aged = [old_product["messageUuid"], old_payment["messageUuid"], unmatched["messageUuid"]]
        marks = ",".join("?" * len(aged))
        conn.execute(f"UPDATE events SET created_ms = ? WHERE uuid IN ({marks})", (old_ms, *aged))
        conn.execute(
            "UPDATE deliveries SET created_ms = ?, finished_ms = CASE WHEN status != 'pending'"
            " THEN ? END WHERE event_seq IN (SELECT seq FROM events WHERE created_ms = ?)",
            (old_ms, old_ms, old_ms),
        )
        old_id = conn.execute(
            "SELECT d.id FROM deliveries d JOIN events e ON e.seq = d.event_seq WHERE e.uuid = ?",
            (old_product["messageUuid"],),
        ).fetchone()[0]
        assert count(conn, "SELECT count(*) FROM attempts WHERE delivery_id = ?", old_id) == 1
        pending_before = count(conn, "SELECT count(*) FROM deliveries WHERE status = 'pending'")
        assert pending_before == 2  # the down receiver's TestMessage and PaymentCreated

    removed = await h.runtime.purge_once()
    assert removed == 3  # the old delivery, its event, the unmatched event

    with database(h) as conn:
        assert count(conn, "SELECT count(*) FROM deliveries WHERE id = ?", old_id) == 0
        assert count(conn, "SELECT count(*) FROM attempts WHERE delivery_id = ?", old_id) == 0
        uuids = {r[0] for r in conn.execute("SELECT uuid FROM events")}
        assert old_product["messageUuid"] not in uuids
        assert unmatched["messageUuid"] not in uuids
        # An old event whose delivery is still pending stays, and so does a recent one.
        assert {old_payment["messageUuid"], new_product["messageUuid"]} <= uuids
        assert count(conn, "SELECT count(*) FROM deliveries WHERE status = 'pending'") == 2

    resp = await h.api.get(f"/api/webhooks/events/{old_id}", headers=auth)
    assert resp.status == 404
    resp = await h.api.get(f"/api/webhooks/{stuck['uuid']}/events", headers=auth)
    events = (await resp.json())["data"]["events"]
    assert [e["status"] for e in events] == ["pending", "pending"]

    # Nothing left to purge: a second pass removes nothing.
    assert await h.runtime.purge_once() == 0


async def test_purge_works_through_many_batches(
    tmp_path: Path, aiohttp_client: Any, receiver: Receiver
) -> None:
    # No dispatcher: the test decides which deliveries are finished, and when.
    cfg = make_config(tmp_path, storage={"retention": "1h"})
    app = create_app(cfg, dispatch=False)
    h = Harness(cfg, await aiohttp_client(app), await aiohttp_client(app[INGEST_APP]), app[RUNTIME])
    await h.subscribe(h.token(), receiver.url, ["ProductCreated"])
    total = 2 * PURGE_BATCH + 100
    batch = [
        {"eventName": "ProductCreated", "organizationUuid": ORG, "payload": i} for i in range(total)
    ]
    for start in range(0, total, 1000):
        resp = await h.ingest.post("/events", json=batch[start : start + 1000])
        assert resp.status == 202

    old_ms = int(time.time() * 1000) - 2 * HOUR_MS
    keep_pending = 30
    with database(h) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM deliveries ORDER BY id")]
        assert len(ids) == total + 1  # with the TestMessage
        finished, pending = ids[:-keep_pending], ids[-keep_pending:]
        conn.execute("BEGIN")
        conn.execute("UPDATE events SET created_ms = ?", (old_ms,))
        conn.executemany(
            "UPDATE deliveries SET status = ?, finished_ms = ?, created_ms = ? WHERE id = ?",
            [("delivered" if i % 2 else "failed", old_ms, old_ms, i) for i in finished],
        )
        conn.executemany(
            "INSERT INTO attempts (delivery_id, started_ms, duration_ms, status_code, error,"
            " response_body) VALUES (?, ?, 1.0, 200, NULL, 'ok')",
            [(i, old_ms) for i in ids],
        )
        conn.execute("COMMIT")

    removed = await h.runtime.purge_once()
    assert removed == 2 * len(finished)  # each finished delivery and its event

    with database(h) as conn:
        left = [r[0] for r in conn.execute("SELECT id FROM deliveries ORDER BY id")]
        assert left == pending
        assert count(conn, "SELECT count(*) FROM deliveries WHERE status = 'pending'") == 30
        assert count(conn, "SELECT count(*) FROM events") == keep_pending
        attempts = {r[0] for r in conn.execute("SELECT delivery_id FROM attempts")}
        assert attempts == set(pending)
    assert receiver.requests == []


def test_the_retention_pass_backs_off_while_it_finds_nothing() -> None:
    waits = [PURGE_EVERY_S]
    for _ in range(6):
        waits.append(next_purge_wait(waits[-1], found=False))
    assert waits == [60.0, 120.0, 240.0, 480.0, 600.0, 600.0, 600.0]
    assert next_purge_wait(600.0, found=True) == PURGE_EVERY_S  # something old: every minute


async def counted_passes(
    harness_factory: HarnessFactory,
    monkeypatch: pytest.MonkeyPatch,
    idle_max_s: float,
    fail_pass: int = 0,
) -> list[int]:
    """A daemon whose retention passes come every 0.05 s while they find something (up to
    idle_max_s while they find nothing); a one-item list counting the passes, the fail_pass-th
    of which the database refuses."""
    monkeypatch.setattr(runtime_module, "PURGE_EVERY_S", 0.05)
    monkeypatch.setattr(runtime_module, "PURGE_IDLE_MAX_S", idle_max_s)
    h = await harness_factory()
    passes = [0]
    look = h.runtime.store.subscriptions_to_close

    async def counted() -> list[str]:
        passes[0] += 1
        if passes[0] == fail_pass:
            raise StoreError("could not read: disk I/O error")
        return await look()

    monkeypatch.setattr(h.runtime.store, "subscriptions_to_close", counted)
    return passes


async def test_an_idle_daemons_retention_pass_wakes_it_less_and_less(
    harness_factory: HarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each pass wakes an idle daemon (milliseconds of CPU on a virtual machine); with nothing
    # to purge, a pass a minute would be most of its idle CPU after the poll.
    passes = await counted_passes(harness_factory, monkeypatch, idle_max_s=0.4)
    await asyncio.sleep(1.6)
    assert 1 <= passes[0] <= 8, passes  # a pass every 0.05 s would have made 32


async def test_a_failed_look_for_subscriptions_to_close_does_not_end_the_retention_passes(
    harness_factory: HarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database refused one pass (disk full, I/O error, a lost PostgreSQL connection): the
    # passes go on, and with them the purge and the closing of deleted subscriptions' rows.
    passes = await counted_passes(harness_factory, monkeypatch, idle_max_s=0.05, fail_pass=2)
    deadline = time.monotonic() + 5
    while passes[0] < 4:
        assert time.monotonic() < deadline, f"the passes stopped after {passes[0]}"
        await asyncio.sleep(0.02)


async def test_a_feed_that_lost_its_changes_makes_the_daemon_close_deleted_rows_at_once(
    harness_factory: HarnessFactory, receiver_factory: ReceiverFactory
) -> None:
    # On PostgreSQL, what was announced while the LISTEN connection was down is lost, and the
    # reconnection announces that anything may have changed (a change without ids). A delete
    # made meanwhile by another process must not wait for the retention pass to be finished.
    h = await harness_factory(delivery={"retry_schedule": ["1h"]})
    down = await receiver_factory(default=500)
    token = h.token()
    sub = await h.subscribe(token, down.url, ["ProductCreated"])
    await h.emit("ProductCreated")
    await down.wait_for(1, "ProductCreated")
    await h.idle()
    with database(h) as conn:  # deleted by "another process", its announcement lost
        conn.execute(
            "UPDATE subscriptions SET deleted_ms = ? WHERE uuid = ?",
            (int(time.time() * 1000), sub["uuid"]),
        )
        pending = "SELECT count(*) FROM deliveries WHERE subscription = ? AND status = 'pending'"
        assert count(conn, pending, sub["uuid"]) == 2  # its TestMessage and the event
        h.runtime.store.changes.announce(Change("subscription_changed"))
        deadline = time.monotonic() + 5
        while count(conn, pending, sub["uuid"]):
            assert time.monotonic() < deadline, "the deleted subscription's rows stayed pending"
            await asyncio.sleep(0.05)
