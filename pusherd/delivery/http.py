"""The delivery HTTP/1.1 client: pooled keep-alive connections, one POST per exchange.

A delivery is one request whose answer we only need the status, `Retry-After` and the first KiB of
the body of, so the client is small: a request is written with a single `transport.write` and the
answer is read by httptools (llhttp, the parser of Node.js) in an `asyncio.Protocol`. Compared with
aiohttp's ClientSession this costs about a third of the CPU per request, and because a request on
an idle connection is written synchronously, the dispatcher decides the order requests leave in.

Connections are opened only to vetted addresses (`GuardedResolver`, `check_connect_host`),
redirects are never followed (an answer is an answer), TLS verifies certificates against the
system store. An idle connection is reused for KEEPALIVE_S at most: receivers commonly close idle
keep-alive connections after 5 s, and a request written into one that is closing is lost.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import cast

import httptools
from yarl import URL

from pusherd.delivery.netguard import GuardedResolver, check_connect_host, looks_like_ip_literal

BODY_KEEP = 1024  # bytes of the answer's body kept for the attempt log
KEEPALIVE_S = 4.0
DNS_TTL_S = 10.0

PoolKey = tuple[str, str, int]


class ProtocolError(Exception):
    """The destination's answer was not valid HTTP/1.x."""


class ConnectionLostError(ConnectionError):
    """The connection closed before an answer arrived."""

    def __init__(self, before_answer: bool) -> None:
        super().__init__("connection closed before the answer" if before_answer else "reset")
        self.before_answer = before_answer  # not a byte of the answer arrived


@dataclass(slots=True)
class Answer:
    """What a destination answered."""

    status: int
    retry_after: str | None
    body: bytes  # at most BODY_KEEP bytes


@dataclass(frozen=True, slots=True)
class Target:
    """A destination URL, parsed once: where to connect and the fixed start of its requests."""

    key: PoolKey
    host: str  # for DNS, the IP check and TLS server_hostname (IPv6 without brackets)
    port: int
    tls: bool
    head: bytes  # request line and the headers that never change

    @property
    def literal(self) -> bool:
        return looks_like_ip_literal(self.host)


@lru_cache(maxsize=4096)
def target(url: str, user_agent: str) -> Target:
    """Parse a destination (already vetted by check_url) into a Target."""
    u = URL(url)
    host = u.raw_host or ""
    port = u.port or (443 if u.scheme == "https" else 80)
    host_header = f"[{host}]" if ":" in host else host
    if port != (443 if u.scheme == "https" else 80):
        host_header += f":{port}"
    head = (
        f"POST {u.raw_path_qs or '/'} HTTP/1.1\r\n"
        f"Host: {host_header}\r\n"
        f"User-Agent: {user_agent}\r\n"
        "Accept: */*\r\n"
        "Accept-Encoding: identity\r\n"  # the attempt log keeps the answer's text as sent
        "Content-Type: application/json\r\n"
    ).encode("ascii")
    return Target((u.scheme, host, port), host, port, u.scheme == "https", head)


class Connection(asyncio.Protocol):
    """One keep-alive connection; at most one exchange at a time."""

    def __init__(self, key: PoolKey, loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # As lenient as aiohttp's parser is with answers: bare LF line ends, a space before a
        # header's colon or after a chunk size. Receivers like that processed the request.
        self.parser.set_dangerous_leniencies(
            lenient_headers=True,
            lenient_optional_cr_before_lf=True,
            lenient_spaces_after_chunk_size=True,
        )
        self.closed = False
        self.reusable = False
        self.reused = False  # has carried an exchange before this one
        self.idle_since = 0.0
        self.idle_for = 0.0  # how long it had been idle when this exchange took it
        self.sent_at = 0.0  # loop time the current request was written
        self._waiter: asyncio.Future[Answer] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._got_bytes = False
        self._headers_done = False
        self._status = 0
        self._retry_after: str | None = None
        self._body = b""

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            self.close()  # bytes nobody asked for: the connection is in an unknown state
            return
        self._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"invalid HTTP answer: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._waiter is not None:
            if self._headers_done:
                # An answer without a length ends with the connection.
                self._finish()
            else:
                self._fail(ConnectionLostError(before_answer=not self._got_bytes))

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # The start of an answer nobody asked for, in the same read as the last one.
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self._retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._status = self.parser.get_status_code()
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        if self._waiter is None:
            return
        if len(self._body) < BODY_KEEP:
            self._body += body[: BODY_KEEP - len(self._body)]
        elif body:
            # More than we keep: not worth reading to the end to reuse the connection.
            self._finish()
            self.close()

    def on_message_complete(self) -> None:
        if self._waiter is None:
            return
        if self._status < 200:  # 1xx: the real answer follows
            self._headers_done = False
            self._retry_after = None
            return
        self.reusable = self.parser.should_keep_alive()
        self._finish()

    # -- one exchange ----------------------------------------------------------------------

    def send(self, data: bytes, deadline: float) -> asyncio.Future[Answer]:
        """Write one request now; the future gets the answer, or TimeoutError at deadline.

        On a connection the peer has already closed nothing is written and the future fails
        at once with ConnectionLostError.
        """
        assert self._waiter is None
        waiter = self._waiter = self.loop.create_future()
        self._got_bytes = self._headers_done = self.reusable = False
        self._status, self._retry_after, self._body = 0, None, b""
        if self.closed or self.transport is None or self.transport.is_closing():
            self._fail(ConnectionLostError(before_answer=True))
            return waiter
        self._timer = self.loop.call_at(deadline, self._timed_out)
        self.sent_at = self.loop.time()
        self.transport.write(data)
        return waiter

    def _finish(self) -> None:
        waiter, self._waiter = self._waiter, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if waiter is not None and not waiter.done():
            waiter.set_result(Answer(self._status, self._retry_after, self._body))

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        self.reusable = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(TimeoutError())
        self.close()

    def abandon(self) -> None:
        """The exchange's waiter was cancelled: this connection cannot be trusted again."""
        self._fail(asyncio.CancelledError())
        self.close()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()


class HttpClient:
    """Connections per origin (scheme, host, port); opens only to vetted addresses."""

    def __init__(
        self, allow_private: bool, max_idle: int, tls: ssl.SSLContext | None = None
    ) -> None:
        self.allow_private = allow_private
        self.max_idle = max_idle
        self._resolver = GuardedResolver(allow_private=allow_private)
        self._idle: dict[PoolKey, list[Connection]] = {}
        self._idle_count = 0
        self._dns: dict[tuple[str, int], tuple[float, list[tuple[str, int, int]]]] = {}
        self._tls = tls  # default: the system's trust store, with host name checks
        self._closed = False

    def idle(self, t: Target) -> Connection | None:
        """A live idle connection to t's origin, if one is pooled (most recently used first)."""
        conns = self._idle.get(t.key)
        if not conns:
            return None
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            self._idle_count -= 1
            if not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                conn.reused = True
                conn.idle_for = now - conn.idle_since
                return conn
            conn.close()
        return None

    def release(self, conn: Connection) -> None:
        """Pool a connection whose exchange is complete, or close it."""
        if conn.closed or not conn.reusable or self._closed:
            conn.close()
            return
        if self._idle_count >= self.max_idle:
            self._make_room()
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        self._idle_count += 1

    def _make_room(self) -> None:
        """Drop closed and expired idle connections; if none were, the longest idle one."""
        now = time.monotonic()
        oldest: Connection | None = None
        for key, conns in list(self._idle.items()):
            live = [c for c in conns if not c.closed and now - c.idle_since < KEEPALIVE_S]
            for c in conns:
                if c not in live:
                    c.close()
            self._idle_count -= len(conns) - len(live)
            if live:
                self._idle[key] = live
                if oldest is None or live[0].idle_since < oldest.idle_since:
                    oldest = live[0]
            else:
                del self._idle[key]
        if self._idle_count >= self.max_idle and oldest is not None:
            self._idle[oldest.key].remove(oldest)
            if not self._idle[oldest.key]:
                del self._idle[oldest.key]
            self._idle_count -= 1
            oldest.close()

    async def connect(self, t: Target, timeout_s: float = 30.0) -> Connection:
        """Open a new connection to a vetted address of t within timeout_s (raises OSError,
        DestinationError or TimeoutError)."""
        if self._closed:
            raise ConnectionError("client is closed")
        loop = asyncio.get_running_loop()
        if t.literal:
            check_connect_host(t.host, self.allow_private)
            addresses = [(t.host, t.port, 0)]
        else:
            addresses = await self._resolve(t.host, t.port)
        tls: ssl.SSLContext | None = None
        if t.tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        last: OSError | None = None
        deadline = loop.time() + timeout_s
        for i, (host, port, family) in enumerate(addresses):
            # An address that does not answer (a broken IPv6 route, say) must not use up the
            # whole timeout: each gets an equal share of what is left.
            share = (deadline - loop.time()) / (len(addresses) - i)
            try:
                async with asyncio.timeout(share):
                    _, conn = await loop.create_connection(
                        lambda: Connection(t.key, loop),
                        host,
                        port,
                        family=family,
                        ssl=tls,
                        server_hostname=t.host.rstrip(".") if tls else None,
                    )
            except TimeoutError:
                if i == len(addresses) - 1:
                    raise
                last = OSError(f"connect to {host} port {port} timed out")
                continue
            except OSError as exc:
                last = exc
                continue
            return conn
        assert last is not None
        raise last

    async def _resolve(self, host: str, port: int) -> list[tuple[str, int, int]]:
        now = time.monotonic()
        cached = self._dns.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        results = await self._resolver.resolve(host, port, socket.AF_UNSPEC)
        addresses = [(r["host"], r["port"], int(r["family"])) for r in results]
        if len(self._dns) > 4096:
            self._dns.clear()
        self._dns[(host, port)] = (now + DNS_TTL_S, addresses)
        return addresses

    async def close(self) -> None:
        """Close every idle connection (in-flight ones close when their exchange ends)."""
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        self._idle_count = 0
        await self._resolver.close()
