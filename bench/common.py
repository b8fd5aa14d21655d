"""Shared by the benchmark's processes: the ~1 KiB event, the envelope, small helpers."""

from __future__ import annotations

import asyncio
import socket
import uuid
from typing import Any

import orjson
from aiohttp import web

EVENT_NAME = "ProductCreated"
SCOPE = "READ:PRODUCT"


def payload() -> dict[str, Any]:
    """A product payload that makes a ~1 KiB event."""
    return {
        "productUuid": "c5a3c4f0-2a4e-11ec-9d64-0242ac130003",
        "name": "Benchmark espresso blend, 1 kg bag",
        "description": "A medium roast with notes of cocoa and hazelnut. " * 8,
        "variants": [
            {"uuid": str(uuid.UUID(int=i)), "sku": f"ESP-{i:04d}", "price": 1990 + i}
            for i in range(4)
        ],
        "vatPercentage": "12.0",
        "unitName": "bag",
    }


def event(org: str, message_id: str | None = None) -> dict[str, Any]:
    """One ingest event for org (a messageId only when given)."""
    out: dict[str, Any] = {"eventName": EVENT_NAME, "organizationUuid": org, "payload": payload()}
    if message_id is not None:
        out["messageId"] = message_id
    return out


def envelope(org: str, message_id: str) -> bytes:
    """The body pusherd sends for such an event (SPEC §6)."""
    return orjson.dumps(
        {
            "organizationUuid": org,
            "messageUuid": str(uuid.uuid1()),
            "eventName": EVENT_NAME,
            "messageId": message_id,
            "payload": orjson.dumps(payload()).decode(),
            "timestamp": "2026-11-22T14:30:00.123Z",
        }
    )


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def serve_forever(apps: list[tuple[web.Application, int]]) -> None:
    """Serve each app on 127.0.0.1:port, print "ready" for the bench, and run until killed."""
    for app, port in apps:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print("ready", flush=True)
    await asyncio.Event().wait()
