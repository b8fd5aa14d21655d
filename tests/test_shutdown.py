"""SIGTERM (SPEC §1): in-flight attempts finish within shutdown_grace, exit 0, rest goes later."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import ORG, Receiver
from tests.service import free_port
from tests.test_crash import Daemon, daemons, start_receiver

__all__ = ["daemons"]  # the fixture, imported for pytest


def slow(seconds: float, release: asyncio.Event) -> Callable[[web.Request], Awaitable[Any]]:
    """A scripted answer: 200 after `seconds`, or sooner once `release` is set."""

    async def answer(request: web.Request) -> web.StreamResponse:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), seconds)
        return web.Response(status=200, text="slow ok")

    return answer


async def ingest(daemon: Daemon, count: int) -> list[str]:
    """Post `count` ProductCreated events in one batch; return their messageUuids in order."""
    batch = [
        {"eventName": "ProductCreated", "organizationUuid": ORG, "payload": {"n": i}}
        for i in range(count)
    ]
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{daemon.ingest}/events", json=batch) as resp,
    ):
        assert resp.status == 202
        return [r["messageUuid"] for r in await resp.json()]


@contextlib.asynccontextmanager
async def busy_daemon(
    tmp_path: Path,
    daemons: list[Daemon],
    grace: str,
    answer_after_s: float,
    count: int,
) -> AsyncIterator[tuple[Daemon, Receiver, list[str]]]:
    """A serving daemon (per_destination 2, lease 30s) with `count` events ingested and both its
    slots held by answers `answer_after_s` away; yields (daemon, receiver, messageUuids)."""
    daemon = Daemon(
        tmp_path, {"per_destination": "2", "shutdown_grace": f'"{grace}"', "lease": '"30s"'}
    )
    daemons.append(daemon)
    daemon.write_config()
    token = await daemon.token()
    await daemon.start()
    receiver = Receiver()
    server = await start_receiver(free_port(), receiver)
    release = asyncio.Event()
    try:
        await daemon.subscribe(token, receiver.url)
        await receiver.wait_for(1, "TestMessage")
        receiver.statuses = [slow(answer_after_s, release), slow(answer_after_s, release)]
        sent = await ingest(daemon, count)
        await receiver.wait_for(2, "ProductCreated")
        yield daemon, receiver, sent
    finally:
        release.set()
        await server.close()


def uuids(receiver: Receiver) -> list[str]:
    return [e["messageUuid"] for e in receiver.events("ProductCreated")]


async def test_sigterm_lets_in_flight_attempts_finish_and_the_rest_goes_after_restart(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    async with busy_daemon(tmp_path, daemons, "5s", 1.0, 6) as (daemon, receiver, sent):
        in_flight = uuids(receiver)

        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
        took = time.monotonic() - started
        assert 0.8 <= took < 5.0, took  # it waited for the slow answers, not for the grace
        assert uuids(receiver) == in_flight  # nothing new was started after SIGTERM

        await daemon.start()
        await receiver.wait_for(6, "ProductCreated", timeout=10)  # far sooner than the lease
        await asyncio.sleep(0)
        got = uuids(receiver)
        assert sorted(got) == sorted(sent)  # the two finished attempts were not sent again
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0


async def test_attempts_longer_than_the_grace_are_cut_and_sent_again_after_restart(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    async with busy_daemon(tmp_path, daemons, "1s", 20.0, 4) as (daemon, receiver, sent):
        cut = uuids(receiver)

        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
        assert time.monotonic() - started < 6.0  # the grace, not the 20s answers

        await daemon.start()
        # Handed back at shutdown, not left to their 30s lease: they go out again at once.
        await receiver.wait_for(6, "ProductCreated", timeout=10)
        got = uuids(receiver)
        assert set(got) == set(sent)
        assert all(got.count(u) == 2 for u in cut)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
