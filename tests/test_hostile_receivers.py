"""The delivery client against receivers that misbehave on purpose (SPEC §6 "Receivers are
strangers"): raw loopback servers sending header bombs, endless heads, endless interim answers,
protocol switches and stalled bodies, names whose first address is black-holed, and idle
connections the client must close by itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import uvloop
from aiohttp.abc import AbstractResolver, ResolveResult

from pusherd.delivery import connection, http
from pusherd.delivery.http import HttpClient
from pusherd.delivery.retry import Outcome
from pusherd.delivery.sender import Sender
from tests.rawserver import OK, MakeServer, RawServer, answering, delivery, raw_servers

TIMEOUT_S = 5.0  # far above what a refused head or a stalled body may take
FAST_MS = 2500  # an attempt cut by a limit ends well before the timeout
TOO_LARGE = "response head too large"

Stream = asyncio.StreamReader
Writer = asyncio.StreamWriter

loops = pytest.mark.parametrize("on_uvloop", [False, True], ids=["asyncio", "uvloop"])


@pytest.fixture
async def raw() -> AsyncIterator[MakeServer]:
    async with raw_servers() as make:
        yield make


async def attempt(url: str, *, on_uvloop: bool = False, timeout_s: float = TIMEOUT_S) -> Outcome:
    """One delivery attempt with a fresh client; on uvloop (as `pusherd serve` runs) in a thread
    of its own, against the servers of the test's loop."""

    async def run() -> Outcome:
        client = HttpClient(allow_private=True, max_idle=4)
        try:
            return await Sender(client, timeout_s).send(delivery(url))
        finally:
            await client.close()

    if on_uvloop:
        return await asyncio.to_thread(uvloop.run, run())
    return await run()


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def streaming(first: bytes, chunk: bytes, state: dict[str, bool]) -> Callable[..., Awaitable[None]]:
    """Answer with `first`, then `chunk` over and over until the client hangs up."""

    async def handle(srv: RawServer, reader: Stream, writer: Writer) -> None:
        await srv.read_request(reader)
        writer.write(first)
        try:
            while True:
                writer.write(chunk)
                await writer.drain()
        finally:
            state["hung_up"] = True

    return handle


@contextlib.contextmanager
def no_loop_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing may reach the loop's exception handler ("Fatal error on transport")."""
    with caplog.at_level(logging.ERROR):
        yield
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


# -- the answer's head --------------------------------------------------------------------


@loops
async def test_a_ten_megabyte_header_line_is_refused_unparsed(
    raw: MakeServer, on_uvloop: bool, caplog: pytest.LogCaptureFixture
) -> None:
    bomb = b"HTTP/1.1 200 OK\r\nX-Bomb: " + b"a" * 10_000_000 + b"\r\nContent-Length: 0\r\n\r\n"
    server = await raw(answering(bomb))
    with no_loop_errors(caplog):
        outcome = await attempt(server.url(), on_uvloop=on_uvloop)
    assert outcome.status_code is None and outcome.error == TOO_LARGE  # not delivered
    assert outcome.duration_ms < FAST_MS


@loops
async def test_an_endless_header_line_is_cut_at_the_cap_not_at_the_timeout(
    raw: MakeServer, on_uvloop: bool
) -> None:
    state: dict[str, bool] = {}
    server = await raw(streaming(b"HTTP/1.1 200 OK\r\nX-Endless: ", b"a" * 65536, state))
    outcome = await attempt(server.url(), on_uvloop=on_uvloop)
    assert outcome.error == TOO_LARGE and outcome.duration_ms < FAST_MS
    await until(lambda: state.get("hung_up", False))  # the client closed the connection


async def test_a_hundred_thousand_headers_are_refused(raw: MakeServer) -> None:
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(100_000))
    server = await raw(answering(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n"))
    outcome = await attempt(server.url())
    assert outcome.status_code is None and outcome.error == TOO_LARGE
    assert outcome.duration_ms < FAST_MS


@pytest.mark.parametrize(
    ("extra_fields", "value_bytes", "delivered"),
    [
        (98, 0, True),  # 100 fields with Content-Length and X-Big
        (99, 0, False),
        (0, 60_000, True),  # under 64 KiB of head
        (0, 66_000, False),
    ],
)
async def test_the_head_limits_are_100_fields_and_64_kib(
    raw: MakeServer, extra_fields: int, value_bytes: int, delivered: bool
) -> None:
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(extra_fields))
    head = b"HTTP/1.1 200 OK\r\n" + fields + b"X-Big: " + b"b" * value_bytes + b"\r\n"
    server = await raw(answering(head + b"Content-Length: 2\r\n\r\nok"))
    outcome = await attempt(server.url())
    if delivered:
        assert outcome.status_code == 200 and outcome.body == "ok"
    else:
        assert outcome.status_code is None and outcome.error == TOO_LARGE


@loops
async def test_an_endless_stream_of_100_continue_is_cut_after_five(
    raw: MakeServer, on_uvloop: bool
) -> None:
    state: dict[str, bool] = {}
    continues = b"HTTP/1.1 100 Continue\r\n\r\n"
    server = await raw(streaming(b"", continues * 64, state))
    outcome = await attempt(server.url(), on_uvloop=on_uvloop)
    assert outcome.error == TOO_LARGE and outcome.duration_ms < FAST_MS
    await until(lambda: state.get("hung_up", False))


@pytest.mark.parametrize(("interim", "delivered"), [(5, True), (6, False)])
async def test_five_interim_answers_are_allowed_before_the_answer(
    raw: MakeServer, interim: int, delivered: bool
) -> None:
    # Written one at a time, as a receiver sending progress would.
    async def progress(srv: RawServer, reader: Stream, writer: Writer) -> None:
        await srv.read_request(reader)
        for i in range(interim):
            writer.write(b"HTTP/1.1 %d Info\r\nX-Step: %d\r\n\r\n" % (100 + i % 4 * 2, i))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(OK)
        await writer.drain()
        await reader.read()

    server = await raw(progress)
    outcome = await attempt(server.url())
    assert (outcome.status_code, outcome.error) == ((200, None) if delivered else (None, TOO_LARGE))


@loops
@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"\x81\x05hello",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
    ids=["upgrade", "bare"],
)
async def test_switching_protocols_is_a_failed_attempt_with_a_clear_error(
    raw: MakeServer, on_uvloop: bool, answer: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async def switch(srv: RawServer, reader: Stream, writer: Writer) -> None:
        await srv.read_request(reader)
        writer.write(answer)
        await writer.drain()
        await reader.read()  # holds the connection as a websocket server would

    server = await raw(switch)
    with no_loop_errors(caplog):
        outcome = await attempt(server.url(), on_uvloop=on_uvloop)
    assert outcome.status_code is None and not outcome.ok
    assert outcome.error is not None and "101 Switching Protocols" in outcome.error
    assert outcome.duration_ms < FAST_MS


# -- the body after a final head ----------------------------------------------------------


@loops
@pytest.mark.parametrize("status", [200, 500])
async def test_a_stalled_body_ends_the_attempt_with_the_status_soon_after_the_head(
    raw: MakeServer, on_uvloop: bool, status: int
) -> None:
    closed = asyncio.Event()

    async def stall(srv: RawServer, reader: Stream, writer: Writer) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 100\r\n\r\npartial" % status)
        await writer.drain()
        await reader.read()  # returns when the client closes the connection
        closed.set()

    server = await raw(stall)
    outcome = await attempt(server.url(), on_uvloop=on_uvloop)
    assert (outcome.status_code, outcome.error, outcome.body) == (status, None, "partial")
    assert outcome.ok is (status == 200)
    grace_ms = connection.BODY_GRACE_S * 1000
    assert grace_ms * 0.9 < outcome.duration_ms < grace_ms + 1500  # not the 5 s timeout
    await asyncio.wait_for(closed.wait(), 5)  # not pooled half-read


@pytest.mark.parametrize(
    "rest",
    [
        b"Content-Length: 100\r\n\r\ncut short",  # then the connection closes
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\ncut short",  # an invalid chunk size
    ],
    ids=["closed", "garbled"],
)
async def test_a_2xx_head_is_delivered_whatever_happens_to_the_body(
    raw: MakeServer, rest: bytes
) -> None:
    async def broken_body(srv: RawServer, reader: Stream, writer: Writer) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 202 Accepted\r\n" + rest)
        await writer.drain()

    server = await raw(broken_body)
    outcome = await attempt(server.url())
    assert outcome.ok and outcome.status_code == 202 and outcome.error is None
    assert outcome.body.startswith("cut short") or outcome.body == ""


async def test_endless_trailers_after_a_2xx_head_are_not_read(
    raw: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "BODY_GRACE_S", 60.0)  # the byte limit must end it
    state: dict[str, bool] = {}
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: "
    server = await raw(streaming(head, b"t" * 65536, state))
    outcome = await attempt(server.url())
    assert (outcome.status_code, outcome.body) == (200, "ok")
    assert outcome.duration_ms < FAST_MS
    await until(lambda: state.get("hung_up", False))


@pytest.mark.parametrize(("size", "connections"), [(60_000, 1), (70_000, 2)])
async def test_a_body_up_to_64_kib_is_read_to_reuse_the_connection(
    raw: MakeServer, size: int, connections: int
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (size, b"y" * size)
    server = await raw(answering(answer, answer))
    client = HttpClient(allow_private=True, max_idle=4)
    try:
        sender = Sender(client, TIMEOUT_S)
        for i in range(2):
            outcome = await sender.send(delivery(server.url(), i))
            assert outcome.status_code == 200 and outcome.body == "y" * connection.BODY_KEEP
    finally:
        await client.close()
    assert server.connections == connections


# -- connections --------------------------------------------------------------------------


class FixedResolver(AbstractResolver):
    """A name server that answers every name with these IPv4 addresses, in this order."""

    def __init__(self, *hosts: str, port: int) -> None:
        self.hosts = hosts
        self.port = port

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host, host=h, port=self.port, family=socket.AF_INET, proto=0, flags=0
            )
            for h in self.hosts
        ]

    async def close(self) -> None:
        pass


@contextlib.contextmanager
def black_hole(host: str, port: int) -> Iterator[None]:
    """A listening socket whose accept queue is full: the kernel drops further SYNs, so a
    connection attempt to it neither succeeds nor fails (a black-holed route, on loopback)."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind((host, port))
        listener.listen(0)
        filler.connect((host, port))  # takes the only place in the queue
        yield


async def test_the_addresses_of_a_name_are_raced_past_a_black_holed_first_one(
    raw: MakeServer,
) -> None:
    server = await raw(answering())
    with black_hole("127.0.0.2", server.port):
        resolver = FixedResolver("127.0.0.2", "127.0.0.1", port=server.port)
        client = HttpClient(allow_private=True, max_idle=4, resolver=resolver)
        try:
            url = f"http://receiver.example:{server.port}/hook"
            outcome = await Sender(client, TIMEOUT_S).send(delivery(url))
        finally:
            await client.close()
    assert outcome.status_code == 200
    # The second address went out 250 ms after the first (RFC 8305), not after a share of the
    # timeout spent waiting on the first.
    delay_ms = http.HAPPY_EYEBALLS_DELAY_S * 1000
    assert delay_ms * 0.9 < outcome.duration_ms < delay_ms + 1000
    assert server.connections == 1


async def test_every_address_of_a_name_is_vetted(raw: MakeServer) -> None:
    server = await raw(answering())
    resolver = FixedResolver("10.1.2.3", "127.0.0.1", port=server.port)
    client = HttpClient(allow_private=False, max_idle=4, resolver=resolver)
    try:
        url = f"http://receiver.example:{server.port}/hook"
        outcome = await Sender(client, TIMEOUT_S).send(delivery(url))
    finally:
        await client.close()
    assert outcome.status_code is None and "blocked addresses" in (outcome.error or "")
    assert server.connections == 0


async def test_an_idle_connection_is_closed_by_a_timer(
    raw: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "KEEPALIVE_S", 0.3)
    answered: list[float] = []
    closed: list[float] = []

    async def one(srv: RawServer, reader: Stream, writer: Writer) -> None:
        await srv.read_request(reader)
        writer.write(OK)
        await writer.drain()
        answered.append(time.monotonic())
        await reader.read()  # the client's close, with nothing else going on
        closed.append(time.monotonic())

    server = await raw(one)
    client = HttpClient(allow_private=True, max_idle=4)
    try:
        assert (await Sender(client, TIMEOUT_S).send(delivery(server.url()))).ok
        await until(lambda: bool(closed))
        assert closed[0] - answered[0] >= 0.25
        assert client.idle(http.target(server.url(), "t")) is None
    finally:
        await client.close()
