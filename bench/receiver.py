"""Benchmark receiver: aiohttp + uvloop, one process, several ports.

Run as a separate process by bench/run.py. Each `--port` answers 200 to every POST and records, per
port, the CLOCK_MONOTONIC arrival time of every distinct messageId (TestMessages are answered, not
counted). Each `--hang-port` accepts the request and never answers (the sender's timeout ends it).
`--control-port` serves the bench: GET /stats?port=P[&at=K] -> {count, first, last, at},
GET /arrivals?port=P -> {messageId: t}, POST /reset?port=P.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import serve_forever


@dataclass
class PortLog:
    """Arrivals on one port: distinct messageIds and their arrival times, in order."""

    seen: dict[str, float] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    requests: int = 0


def make_hook(logs: dict[int, PortLog], port: int) -> object:
    """The 200 handler of one port (looks its log up per request, so /reset can replace it)."""

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic()
        log = logs[port]
        log.requests += 1
        try:
            env = orjson.loads(body)
            if env.get("eventName") != "TestMessage":
                mid = env["messageId"]
                if mid not in log.seen:
                    log.seen[mid] = now
                    log.times.append(now)
        except (orjson.JSONDecodeError, KeyError, AttributeError, TypeError):
            pass
        return web.Response(status=200, text="ok")

    return hook


async def hang(request: web.Request) -> web.Response:
    """Never answer: the sender has to time out."""
    await request.read()
    await asyncio.sleep(3600)
    return web.Response(status=200)


def control_app(logs: dict[int, PortLog]) -> web.Application:
    """Stats and arrivals for the orchestrator."""

    async def stats(request: web.Request) -> web.Response:
        log = logs[int(request.query["port"])]
        at = int(request.query.get("at", "0"))
        times = log.times
        out = {
            "count": len(times),
            "requests": log.requests,
            "first": times[0] if times else None,
            "last": times[-1] if times else None,
            "at": times[at - 1] if 0 < at <= len(times) else None,
        }
        return web.Response(body=orjson.dumps(out), content_type="application/json")

    async def arrivals(request: web.Request) -> web.Response:
        log = logs[int(request.query["port"])]
        return web.Response(body=orjson.dumps(log.seen), content_type="application/json")

    async def reset(request: web.Request) -> web.Response:
        logs[int(request.query["port"])] = PortLog()
        return web.Response(body=b"{}", content_type="application/json")

    app = web.Application()
    app.router.add_get("/stats", stats)
    app.router.add_get("/arrivals", arrivals)
    app.router.add_post("/reset", reset)
    return app


async def main(ports: list[int], hang_ports: list[int], control_port: int) -> None:
    """Serve until killed."""
    logs: dict[int, PortLog] = {}
    control = control_app(logs)
    runners = []
    for port in ports:
        logs[port] = PortLog()
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", make_hook(logs, port))  # type: ignore[arg-type]
        runners.append((app, port))
    for port in hang_ports:
        app = web.Application()
        app.router.add_post("/{tail:.*}", hang)
        runners.append((app, port))
    runners.append((control, control_port))
    await serve_forever(runners)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, action="append", default=[])
    p.add_argument("--hang-port", type=int, action="append", default=[])
    p.add_argument("--control-port", type=int, required=True)
    a = p.parse_args()
    uvloop.run(main(a.port, a.hang_port, a.control_port))
