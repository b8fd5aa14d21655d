"""Raw HTTP/1.1 requests over a plain socket: bytes no HTTP client library would send."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson

from tests.conftest import Harness


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def request(
    method: str, path: str, headers: bytes = b"", body: bytes = b"", length: bool = True
) -> bytes:
    """A request with `headers` (raw "Name: value\\r\\n" lines) inserted verbatim."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
    if length:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + headers + b"\r\n" + body


async def send(port: int, data: bytes, timeout: float = 10.0) -> RawAnswer:
    """Send `data` to 127.0.0.1:`port` and read the whole answer (the server closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawAnswer(int(status_line.split()[1]), headers, body)


def api_port(h: Harness) -> int:
    """The port of the harness's API listener."""
    port = h.api.server.port
    assert port is not None
    return port


def ingest_port(h: Harness) -> int:
    """The port of the harness's ingest listener."""
    port = h.ingest.server.port
    assert port is not None
    return port
