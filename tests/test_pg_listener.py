"""The LISTEN connection: notifications arrive, coalesce per transaction, survive losses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator

import asyncpg
import pytest

from pusherd.store.postgres.listener import Listener
from tests.pg import PgServer, launch_or_skip


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for condition() with a deadline (polling, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class Recorder:
    def __init__(self) -> None:
        self.payloads: list[tuple[str, str]] = []
        self.connects = 0

    def handlers(self, *channels: str) -> dict[str, Callable[[str], None]]:
        return {c: (lambda p, c=c: self.payloads.append((c, p))) for c in channels}

    def connected(self) -> None:
        self.connects += 1


@pytest.fixture
async def listening(pg_url: str) -> AsyncIterator[tuple[Listener, Recorder]]:
    rec = Recorder()
    listener = Listener(pg_url, rec.handlers("pusherd_wake", "pusherd_change"), rec.connected)
    listener.start()
    await asyncio.wait_for(listener.connected.wait(), 10)
    yield listener, rec
    await listener.close()


async def test_notifications_reach_their_handlers(
    pg_url: str, listening: tuple[Listener, Recorder]
) -> None:
    _, rec = listening
    assert rec.connects == 1
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("SELECT pg_notify('pusherd_change', 'subscription:abc')")
        await conn.execute("SELECT pg_notify('pusherd_wake', '')")
        await conn.execute("SELECT pg_notify('elsewhere', 'not ours')")
    finally:
        await conn.close()
    await until(lambda: len(rec.payloads) >= 2)
    assert rec.payloads == [("pusherd_change", "subscription:abc"), ("pusherd_wake", "")]


async def test_a_transaction_wakes_each_process_once_per_distinct_payload(
    pg_url: str, listening: tuple[Listener, Recorder]
) -> None:
    # A group commit of many rows notifies per row it wrote; the listener sees one wake.
    _, rec = listening
    conn = await asyncpg.connect(pg_url)
    try:
        async with conn.transaction():
            for _ in range(500):
                await conn.execute("SELECT pg_notify('pusherd_wake', '')")
            await conn.execute("SELECT pg_notify('pusherd_change', 'token')")
        await conn.execute("SELECT pg_notify('pusherd_change', 'done')")  # a later marker
    finally:
        await conn.close()
    await until(lambda: ("pusherd_change", "done") in rec.payloads)
    assert rec.payloads == [
        ("pusherd_wake", ""),
        ("pusherd_change", "token"),
        ("pusherd_change", "done"),
    ]


async def test_a_killed_connection_is_replaced_and_the_listener_told_to_catch_up(
    pg_url: str, listening: tuple[Listener, Recorder]
) -> None:
    listener, rec = listening
    old_pid = listener.backend_pid
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", old_pid)
        # on_connect again: notifications sent while it was away are lost, so it must resync.
        await until(lambda: rec.connects == 2 and listener.connected.is_set())
        assert listener.backend_pid != old_pid
        await conn.execute("SELECT pg_notify('pusherd_wake', 'after')")
    finally:
        await conn.close()
    await until(lambda: ("pusherd_wake", "after") in rec.payloads)


@pytest.fixture
def own_server() -> Iterator[PgServer]:
    """A server of this test's own, to restart without disturbing the others."""
    server = launch_or_skip()
    yield server
    server.cleanup()


async def test_a_database_restart_is_ridden_out(own_server: PgServer) -> None:
    rec = Recorder()
    url = own_server.url()
    listener = Listener(url, rec.handlers("pusherd_wake"), rec.connected, max_backoff_s=0.5)
    listener.start()
    try:
        await asyncio.wait_for(listener.connected.wait(), 10)
        await asyncio.to_thread(own_server.restart, "immediate")  # as after a crash
        await until(lambda: rec.connects == 2 and listener.connected.is_set(), timeout=30)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("SELECT pg_notify('pusherd_wake', 'back')")
        finally:
            await conn.close()
        await until(lambda: ("pusherd_wake", "back") in rec.payloads)
    finally:
        await listener.close()


def test_reconnect_delays_back_off_with_full_jitter() -> None:
    top = Listener("postgresql://unused", {}, rng=lambda: 1.0, min_backoff_s=0.05, max_backoff_s=5)
    assert [top.backoff_s(n) for n in range(0, 10, 3)] == [0.05, 0.4, 3.2, 5.0]
    bottom = Listener("postgresql://unused", {}, rng=lambda: 0.0)
    assert bottom.backoff_s(7) == 0.0  # spread down to zero: a fleet does not reconnect at once
