"""Raw loopback servers that answer exactly as scripted, for tests of the delivery client."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

from pusherd.store.models import ClaimedDelivery

Handler = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
MakeServer = Callable[..., Awaitable["RawServer"]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RawServer:
    """Counts connections and requests; each connection is served by a scripted handler."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.server = await asyncio.start_server(self._serve, host, 0, ssl=tls)
        self.port = self.server.sockets[0].getsockname()[1]
        self.authority = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.scheme = "https" if tls else "http"

    def url(self, path: str = "/hook") -> str:
        return f"{self.scheme}://{self.authority}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(self, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        body = await reader.readexactly(int(length.group(1)) if length else 0)
        self.requests.append((head, body))
        return head


@contextlib.asynccontextmanager
async def raw_servers() -> AsyncIterator[MakeServer]:
    """A factory of RawServers, all closed on exit."""
    servers: list[RawServer] = []

    async def make(
        handler: Handler, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
    ) -> RawServer:
        s = RawServer(handler)
        await s.start(host, tls)
        servers.append(s)
        return s

    try:
        yield make
    finally:
        for s in servers:
            assert s.server is not None
            s.server.close()


def delivery(url: str, i: int = 0) -> ClaimedDelivery:
    """A claimed delivery of a small ProductCreated event to url."""
    return ClaimedDelivery(
        id=i,
        subscription="sub",
        attempts=0,
        schedule_pos=0,
        organization="11111111-1111-4111-8111-111111111111",
        message_uuid=f"00000000-0000-1000-8000-{i:012d}",
        event_name="ProductCreated",
        message_id=f"m{i}",
        payload='{"n": 1}',
        timestamp="2026-11-22T14:30:00.123Z",
        destination=url,
        signing_keys=("k" * 32,),
    )


def answering(*answers: bytes) -> Handler:
    """Serve requests on a connection with these raw answers in turn, then keep serving OK."""

    async def handle(
        srv: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        i = 0
        while True:
            await srv.read_request(reader)
            writer.write(answers[i] if i < len(answers) else OK)
            await writer.drain()
            i += 1

    return handle
