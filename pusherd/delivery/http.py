"""The delivery HTTP/1.1 client: pooled keep-alive connections, one POST per exchange.

A delivery is one request whose answer we only need the status, `Retry-After` and the first KiB of
the body of, so the client is small: a request is written with a single `transport.write` and the
answer is read in bounds by a `Connection` (`pusherd.delivery.connection`, httptools). Compared
with aiohttp's ClientSession this costs about a third of the CPU per request, and because a
request on an idle connection is written synchronously, the dispatcher decides the order requests
leave in.

Connections are opened only to vetted addresses (`GuardedResolver`, `check_connect_host`), racing
the addresses of a name as RFC 8305 says; redirects are never followed (an answer is an answer),
TLS verifies certificates against the system store. An idle connection is reused for KEEPALIVE_S at
most, and a timer closes it then: receivers commonly close idle keep-alive connections after 5 s,
and a request written into one that is closing is lost.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from functools import lru_cache

import aiohappyeyeballs
from aiohappyeyeballs import AddrInfoType as AddrInfo
from aiohttp.abc import AbstractResolver
from yarl import URL

from pusherd.delivery.connection import (
    BODY_KEEP,
    Answer,
    Connection,
    ConnectionLostError,
    PoolKey,
    ProtocolError,
)
from pusherd.delivery.netguard import GuardedResolver, check_connect_host, looks_like_ip_literal

__all__ = [
    "BODY_KEEP",
    "Answer",
    "Connection",
    "ConnectionLostError",
    "HttpClient",
    "ProtocolError",
    "Target",
    "target",
]

KEEPALIVE_S = 4.0
IDLE_SWEEP_MIN_S = 0.25  # the idle-close timer runs at most this often
HAPPY_EYEBALLS_DELAY_S = 0.25  # RFC 8305 "Connection Attempt Delay"
DNS_TTL_S = 10.0


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


class HttpClient:
    """Connections per origin (scheme, host, port); opens only to vetted addresses."""

    def __init__(
        self,
        allow_private: bool,
        max_idle: int,
        tls: ssl.SSLContext | None = None,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self.allow_private = allow_private
        self.max_idle = max_idle
        # `resolver` replaces the system's (tests); its answers are vetted all the same.
        self._resolver = GuardedResolver(allow_private=allow_private, inner=resolver)
        self._idle: dict[PoolKey, list[Connection]] = {}  # oldest first, per origin
        self._idle_count = 0
        self._sweep: asyncio.TimerHandle | None = None
        self._dns: dict[tuple[str, int], tuple[float, list[AddrInfo]]] = {}
        # Whether each origin's last answer left its connection open for the next request.
        self._keeps_alive: dict[PoolKey, bool] = {}
        self._tls = tls  # default: the system's trust store, with host name checks
        self._closed = False

    def idle(self, t: Target) -> Connection | None:
        """A live idle connection to t's origin, if one is pooled (most recently used first)."""
        conns = self._idle.get(t.key)
        while conns:
            conn = conns.pop()
            self._idle_count -= 1
            idle_for = conn.loop.time() - conn.idle_since
            if not conn.closed and idle_for < KEEPALIVE_S:
                conn.reused = True
                conn.idle_for = idle_for
                return conn
            conn.close()
        return None

    def release(self, conn: Connection) -> None:
        """Pool a connection whose exchange is complete, or close it."""
        if len(self._keeps_alive) > 4096:
            self._keeps_alive.clear()
        self._keeps_alive[conn.key] = conn.reusable
        if conn.closed or not conn.reusable or self._closed:
            conn.close()
            return
        if self._idle_count >= self.max_idle:
            self._make_room()
        conn.idle_since = conn.loop.time()
        conns = self._idle.get(conn.key)
        if conns is None:
            conns = self._idle[conn.key] = []
        conns.append(conn)
        self._idle_count += 1
        if self._sweep is None:
            self._sweep = conn.loop.call_at(conn.idle_since + KEEPALIVE_S, self._close_expired)

    def keeps_alive(self, key: PoolKey) -> bool:
        """Whether the origin's last answer left its connection open for reuse: its next
        requests may then be written on connections the receiver already reads."""
        return self._keeps_alive.get(key, False)

    def _close_expired(self) -> None:
        """The idle timer: close what has been idle KEEPALIVE_S, wake again for the next one."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        next_due = self._drop_expired(now)
        if next_due is not None and not self._closed:
            self._sweep = loop.call_at(max(next_due, now + IDLE_SWEEP_MIN_S), self._close_expired)

    def _drop_expired(self, now: float) -> float | None:
        """Close pooled connections that are closed or expired; when the next one expires."""
        next_due: float | None = None
        for key, conns in list(self._idle.items()):
            live: list[Connection] = []
            for c in conns:
                if c.closed or now - c.idle_since >= KEEPALIVE_S:
                    c.close()
                else:
                    live.append(c)
            self._idle_count -= len(conns) - len(live)
            if live:
                self._idle[key] = live
                due = live[0].idle_since + KEEPALIVE_S
                if next_due is None or due < next_due:
                    next_due = due
            else:
                del self._idle[key]
        return next_due

    def _make_room(self) -> None:
        """Drop closed and expired idle connections; if none were, the longest idle one."""
        if self._drop_expired(asyncio.get_running_loop().time()) is None:
            return
        if self._idle_count < self.max_idle:
            return
        oldest = min((conns[0] for conns in self._idle.values()), key=lambda c: c.idle_since)
        self._idle[oldest.key].pop(0)
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
        async with asyncio.timeout(timeout_s):
            if t.literal:
                check_connect_host(t.host, self.allow_private)
                addresses = _numeric(t.host, t.port)
            else:
                addresses = await self._resolve(t.host, t.port)
            tls: ssl.SSLContext | None = None
            if t.tls:
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                tls = self._tls
            # RFC 8305: the next address is tried 250 ms after the previous one without waiting
            # for it to fail, so a black-holed address (a broken IPv6 route, say) costs 250 ms
            # per new connection, not a share of the timeout.
            sock = await aiohappyeyeballs.start_connection(
                addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY_S, interleave=1
            )
            try:
                _, conn = await loop.create_connection(
                    lambda: Connection(t.key, loop),
                    sock=sock,
                    ssl=tls,
                    server_hostname=t.host.rstrip(".") if tls else None,
                )
            except BaseException:
                sock.close()  # a no-op when the loop closed it already
                raise
        return conn

    async def _resolve(self, host: str, port: int) -> list[AddrInfo]:
        now = asyncio.get_running_loop().time()
        cached = self._dns.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        results = await self._resolver.resolve(host, port, socket.AF_UNSPEC)
        addresses: list[AddrInfo] = [
            (
                r["family"],
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (r["host"], r["port"], 0, 0)
                if r["family"] == socket.AF_INET6
                else (r["host"], r["port"]),
            )
            for r in results
        ]
        if len(self._dns) > 4096:
            self._dns.clear()
        self._dns[(host, port)] = (now + DNS_TTL_S, addresses)
        return addresses

    async def close(self) -> None:
        """Close every idle connection (in-flight ones close when their exchange ends)."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        self._idle_count = 0
        await self._resolver.close()


def _numeric(host: str, port: int) -> list[AddrInfo]:
    """The address of an IP-literal host (no lookup: AI_NUMERICHOST never blocks)."""
    return list(
        socket.getaddrinfo(
            host,
            port,
            type=socket.SOCK_STREAM,
            proto=socket.IPPROTO_TCP,
            flags=socket.AI_NUMERICHOST,
        )
    )
