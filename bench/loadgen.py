"""Load generators run as their own processes by bench/run.py (never inside the daemon).

- `fill`: ingest N events in batches (unique messageIds) as fast as the daemon takes them.
- `e2e`: single-event requests at a fixed offered rate; per messageId the CLOCK_MONOTONIC times the
  request started and its 202 came back.
- `deliver`: the deliver baseline: a bare aiohttp ClientSession POSTing the envelope N times at a
  given concurrency.
Each prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import envelope, event

JSON = {"Content-Type": "application/json"}


async def fill(url: str, org: str, n: int, batch: int, concurrency: int, prefix: str) -> None:
    """POST n events in batches; fail loudly on anything but 202."""
    bodies = [
        orjson.dumps([event(org, f"{prefix}-{i}") for i in range(start, min(n, start + batch))])
        for start in range(0, n, batch)
    ]
    queue = list(reversed(bodies))
    start = time.monotonic()
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                async with session.post(url, data=body, headers=JSON) as resp:
                    text = await resp.read()
                    if resp.status != 202:
                        raise SystemExit(f"fill: {resp.status} {text[:200]!r}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    print(orjson.dumps({"elapsed": time.monotonic() - start, "events": n}).decode())


async def e2e(url: str, org: str, rate: float, n: int, prefix: str) -> None:
    """Open-loop single-event requests at `rate`/s; record start and 202 times per messageId."""
    times: dict[str, tuple[float, float]] = {}
    bodies = [(f"{prefix}-{i}", orjson.dumps(event(org, f"{prefix}-{i}"))) for i in range(n)]
    errors = 0
    # The producer's own garbage collections would land between a request's start time and its
    # write, and count as pusherd's latency: the timed loop runs without them (n requests leave
    # little garbage in cycles).
    gc.collect()
    gc.freeze()
    gc.disable()
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(mid: str, body: bytes) -> None:
            nonlocal errors
            t0 = time.monotonic()
            async with session.post(url, data=body, headers=JSON) as resp:
                await resp.read()
                t1 = time.monotonic()
            if resp.status == 202:
                times[mid] = (t0, t1)
            else:
                errors += 1

        tasks = []
        begin = time.monotonic() + 0.05
        for i, (mid, body) in enumerate(bodies):
            delay = begin + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(mid, body)))
        await asyncio.gather(*tasks)
        achieved = n / (time.monotonic() - begin)
    print(orjson.dumps({"times": times, "errors": errors, "achieved_rate": achieved}).decode())


async def deliver(url: str, org: str, n: int, concurrency: int, prefix: str) -> None:
    """POST the same-size envelope n times with `concurrency` workers; count 2xx."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "pusherd/0.0.0",
        "X-iZettle-Signature": "0" * 64,
        "webhook-id": "00000000-0000-1000-8000-000000000000",
        "webhook-timestamp": str(int(time.time())),
        "webhook-signature": "v1," + "A" * 43 + "=",
    }
    next_i = 0
    ok = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal next_i, ok
            while next_i < n:
                i = next_i
                next_i += 1
                body = envelope(org, f"{prefix}-{i}")
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    ok += 200 <= resp.status < 300

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - start
    print(orjson.dumps({"elapsed": elapsed, "ok": ok, "start": start}).decode())


def main() -> None:
    """Parse the sub-command and run it on uvloop."""
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fill")
    f.add_argument("--batch", type=int, default=1000)
    f.add_argument("--concurrency", type=int, default=4)
    e = sub.add_parser("e2e")
    e.add_argument("--rate", type=float, default=1000.0)
    d = sub.add_parser("deliver")
    d.add_argument("--concurrency", type=int, default=8)
    for s in (f, e, d):
        s.add_argument("--url", required=True)
        s.add_argument("--org", required=True)
        s.add_argument("--n", type=int, required=True)
        s.add_argument("--prefix", required=True)
    a = p.parse_args()
    coro: Any
    if a.cmd == "fill":
        coro = fill(a.url, a.org, a.n, a.batch, a.concurrency, a.prefix)
    elif a.cmd == "e2e":
        coro = e2e(a.url, a.org, a.rate, a.n, a.prefix)
    else:
        coro = deliver(a.url, a.org, a.n, a.concurrency, a.prefix)
    uvloop.run(coro)


if __name__ == "__main__":
    main()
