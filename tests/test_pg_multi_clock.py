"""Processes on several machines have several clocks (SPEC §8 "on one machine or many"): a
`pusherd serve` whose clock is a minute off, run under Debian's `faketime` (libfaketime, which
moves the process's wall clock and leaves its monotonic clock alone), neither delays events,
steals live leases, spins, nor shortens or stretches retries (issue 12)."""

from __future__ import annotations

import asyncio
import glob
import os
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import Receiver
from tests.pg import unavailable
from tests.service import Service
from tests.test_pg_multi import (
    PROCESSES,
    all_delivered,
    configs,
    in_force_everywhere,
    post_event,
    serving_all,
    stop_all,
    until,
)
from tests.test_pg_serve import admin_auth, subscribe

INSTALL_HINT = "libfaketime not found: install it with `apt-get install faketime`"


def skewed(offset: str) -> dict[str, str]:
    """The environment that runs a process with its wall clock moved by offset ("+60s")."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        unavailable(INSTALL_HINT)  # skips locally, fails under CI=true
    return {
        "LD_PRELOAD": found[0],
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # timeouts and the event loop keep real time
    }


def clock_offset_s(svc: Service) -> float:
    """How far the process's wall clock is from ours: its first log line's time against now."""
    first = orjson.loads(svc.log().splitlines()[0])
    logged = datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00")).timestamp()
    return logged - time.time()


def cpu_s(svc: Service) -> float:
    """User and system CPU seconds the process has used."""
    fields = Path(f"/proc/{svc.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_a_process_a_minute_off_neither_delays_steals_nor_spins(
    tmp_path: Path, pg_url: str, receiver: Receiver
) -> None:
    envs = [{}, skewed("+60s"), skewed("-60s")]  # on time, a minute ahead, a minute behind
    lease_s = 8
    paths = configs(tmp_path, pg_url, f'lease = "{lease_s}s"\ntimeout = "6s"\n')
    auth = await admin_auth(paths[0])
    async with serving_all(paths, envs) as procs, aiohttp.ClientSession() as session:
        # The processes do run a minute off (their log lines carry their own wall clock).
        assert 50 <= clock_offset_s(procs[1]) <= 70 and -70 <= clock_offset_s(procs[2]) <= -50
        await subscribe(session, procs[0].api, auth, receiver.url)
        # Ingested through each process, each event is due at once, by the database's clock
        # (ahead, the event would wait a minute).
        await in_force_everywhere(session, procs)
        await until(all_delivered(pg_url, "probe-", PROCESSES), 5, "an event was held back")
        # Attempts in flight, leased for lease_s: the process ahead must not take them over
        # (its clock says the leases ran out long ago), nor claim in a loop meanwhile (the next
        # due time, a lease's end, is in the past for it).
        answer = asyncio.Event()

        async def hang(request: web.Request) -> web.StreamResponse:
            await answer.wait()
            return web.Response(status=200)

        base = len(receiver.requests)
        receiver.statuses = [hang] * 100
        for i in range(PROCESSES):
            await post_event(session, procs[i], f"s-{i}")
        await receiver.wait_for(base + PROCESSES, timeout=5)
        cpu_before, started = cpu_s(procs[1]), time.monotonic()
        window_s = 2.0  # two claim polls: a stealer would have sent them again by now
        while time.monotonic() - started < window_s:
            assert len(receiver.requests) == base + PROCESSES, "a live lease was taken over"
            await asyncio.sleep(0.05)
        spent = cpu_s(procs[1]) - cpu_before
        assert spent < 0.1 * window_s, f"the process ahead spent {spent:.2f}s CPU idle"
        receiver.statuses.clear()
        answer.set()
        await until(all_delivered(pg_url, "s-", PROCESSES), 5, "not delivered")
        assert len(receiver.requests) == base + PROCESSES  # each sent once
        await stop_all(procs)


@pytest.mark.parametrize("offset", ["+60s", "-60s"])
async def test_a_retry_keeps_its_schedule_whatever_the_recording_process_clock(
    tmp_path: Path, pg_url: str, receiver: Receiver, offset: str
) -> None:
    (path,) = configs(tmp_path, pg_url, 'retry_schedule = ["3s", "3s"]\njitter = 0.0\n', n=1)
    auth = await admin_auth(path)
    async with serving_all([path], [skewed(offset)]) as procs, aiohttp.ClientSession() as session:
        await subscribe(session, procs[0].api, auth, receiver.url)
        await receiver.wait_for(1, timeout=5)  # the welcome message
        receiver.statuses = [500]
        await post_event(session, procs[0], "r-0")
        # Behind, the retry would go at once; ahead, a minute late.
        await receiver.wait_for(3, timeout=10)
        first, retry = receiver.requests[1].at, receiver.requests[2].at
        assert 2.5 <= retry - first <= 5, retry - first
        await stop_all(procs)
