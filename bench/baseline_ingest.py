"""Ingest baseline: a bare aiohttp + uvloop + orjson handler that parses the event, answers 202.

Nothing is stored: this is what the hardware and the HTTP stack allow without any durability.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

import orjson
import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import serve_forever


async def post_events(request: web.Request) -> web.Response:
    """Parse the event and acknowledge it without storing it."""
    body = orjson.loads(await request.read())
    items = body if isinstance(body, list) else [body]
    answers = [
        {
            "messageUuid": str(uuid.uuid1()),
            "messageId": item.get("messageId") or str(uuid.uuid4()),
            "deliveries": 1,
        }
        for item in items
    ]
    out = answers if isinstance(body, list) else answers[0]
    return web.Response(body=orjson.dumps(out), status=202, content_type="application/json")


async def main(port: int) -> None:
    """Serve until killed."""
    app = web.Application(client_max_size=1024**2)
    app.router.add_post("/events", post_events)
    await serve_forever([(app, port)])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    uvloop.run(main(p.parse_args().port))
