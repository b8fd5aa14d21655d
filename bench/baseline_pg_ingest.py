"""PostgreSQL ingest baseline: bare aiohttp + uvloop + orjson + asyncpg, group-committed inserts.

POST /events parses the event(s) and hands them to bench/pg_drivers.py's GroupWriter: whatever is
waiting when one of its 4 pooled connections is free is written by ONE multi-row statement (the
events, a delivery each, their queues marked due), and the 202 is sent once it has committed. This
is what the hardware, the HTTP stack and PostgreSQL allow for durable intake, without pusherd.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson
import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import serve_forever
from pg_drivers import Asyncpg, GroupWriter


def make_app(writer: GroupWriter) -> web.Application:
    """The one route, writing through writer."""

    async def post_events(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        items = body if isinstance(body, list) else [body]
        await writer.submit([orjson.dumps(item["payload"]).decode() for item in items])
        out = [{"deliveries": 1} for _ in items]
        return web.json_response(
            out if isinstance(body, list) else out[0],
            status=202,
            dumps=lambda o: orjson.dumps(o).decode(),
        )

    app = web.Application(client_max_size=1024**2)
    app.router.add_post("/events", post_events)
    return app


async def main(port: int, url: str) -> None:
    """Open the pool and serve until killed."""
    driver = Asyncpg()
    await driver.open(url)
    await serve_forever([(make_app(GroupWriter(driver)), port)])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--url", required=True)
    a = p.parse_args()
    uvloop.run(main(a.port, a.url))
