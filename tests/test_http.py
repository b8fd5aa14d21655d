"""The delivery HTTP client against raw loopback servers that answer exactly as scripted."""

from __future__ import annotations

import asyncio
import json
import resource
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme

from pusherd.delivery import http
from pusherd.delivery.http import HttpClient
from pusherd.delivery.sender import Sender
from pusherd.runtime import idle_connections
from tests.conftest import Harness
from tests.rawserver import OK, Handler, MakeServer, RawServer, answering, delivery, raw_servers


@pytest.fixture
async def raw() -> AsyncIterator[MakeServer]:
    async with raw_servers() as make:
        yield make


@pytest.fixture
async def sender() -> AsyncIterator[Sender]:
    client = HttpClient(allow_private=True, max_idle=16)
    yield Sender(client, timeout_s=2.0)
    await client.close()


async def test_request_line_headers_and_body_are_what_the_receiver_parses(
    raw: Callable[[Handler], Awaitable[RawServer]], sender: Sender
) -> None:
    server = await raw(answering())
    outcome = await sender.send(delivery(server.url("/in/hook?tenant=a%20b&x=1")))
    assert outcome.status_code == 200 and outcome.body == "ok" and outcome.error is None
    head, body = server.requests[0]
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /in/hook?tenant=a%20b&x=1 HTTP/1.1"
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("pusherd/")
    assert headers["accept-encoding"] == "identity"  # an answer's body is logged as text
    assert int(headers["content-length"]) == len(body)
    assert headers["webhook-id"] == "00000000-0000-1000-8000-000000000000"
    assert json.loads(body)["payload"] == '{"n": 1}'


async def test_keep_alive_connection_is_reused(
    raw: Callable[[Handler], Awaitable[RawServer]], sender: Sender
) -> None:
    server = await raw(answering())
    for i in range(5):
        outcome = await sender.send(delivery(server.url(), i))
        assert outcome.status_code == 200
    assert len(server.requests) == 5
    assert server.connections == 1


async def test_connection_close_answer_is_not_reused(
    raw: Callable[[Handler], Awaitable[RawServer]], sender: Sender
) -> None:
    closing = b"HTTP/1.1 202 Accepted\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

    async def once(
        srv: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await srv.read_request(reader)
        writer.write(closing)
        await writer.drain()
        await reader.read()  # wait for the client to close

    server = await raw(once)
    for i in range(3):
        assert (await sender.send(delivery(server.url(), i))).status_code == 202
    assert server.connections == 3


async def test_idle_connection_closed_by_the_receiver_is_retried_once_on_a_new_one(
    raw: Callable[[Handler], Awaitable[RawServer]], sender: Sender
) -> None:
    # The keep-alive race: the receiver answers, keeps the connection, and closes it when the
    # next request arrives, without reading it (as a server whose idle timeout just fired).
    async def one_per_connection(
        srv: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await srv.read_request(reader)
        writer.write(OK)
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request: drop the connection

    server = await raw(one_per_connection)
    first = await sender.send(delivery(server.url(), 1))
    await asyncio.sleep(http.KEEPALIVE_S / 4)  # idle long enough for a server to close it
    second = await sender.send(delivery(server.url(), 2))
    assert first.status_code == 200 and second.status_code == 200
    assert [json.loads(b)["messageId"] for _, b in server.requests] == ["m1", "m2"]
    assert server.connections == 2


async def test_a_reused_connection_dropped_after_the_request_was_read_is_not_retried(
    raw: Callable[[Handler], Awaitable[RawServer]], sender: Sender
) -> None:
    # Read, "processed", then the receiver dies without answering: sending again would
    # deliver twice, so this is a failed attempt (retried later, and recorded).
    async def dies_on_second(
        srv: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await srv.read_request(reader)
        writer.write(OK)
        await writer.drain()
        await srv.read_request(reader)
        await asyncio.sleep(0.2)

    server = await raw(dies_on_second)
    assert (await sender.send(delivery(server.url(), 1))).status_code == 200
    await asyncio.sleep(http.KEEPALIVE_S / 4)
    second = await sender.send(delivery(server.url(), 2))
    assert second.status_code is None
    assert second.error == "connection closed before the answer"
    assert [json.loads(b)["messageId"] for _, b in server.requests] == ["m1", "m2"]


async def test_sending_on_a_connection_the_receiver_closed_fails_at_once(
    raw: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    closed = asyncio.Event()

    async def at_its_limit(
        srv: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.close()  # accepts, then closes at once
        closed.set()

    server = await raw(at_its_limit)
    client = HttpClient(allow_private=True, max_idle=4)
    try:
        conn = await client.connect(http.target(server.url(), "t"))
        await asyncio.wait_for(closed.wait(), 2)
        for _ in range(100):  # until the close has reached the client
            if conn.closed:
                break
            await asyncio.sleep(0.01)
        answer = conn.send(b"POST / HTTP/1.1\r\n\r\n", asyncio.get_running_loop().time() + 5)
        assert answer.done()  # not left to the timeout
        assert isinstance(answer.exception(), http.ConnectionLostError)
    finally:
        await client.close()
    assert server.requests == []


async def test_lenient_answers_that_aiohttp_accepted_are_accepted(
    raw: Callable[[Handler], Awaitable[RawServer]], sender: Sender
) -> None:
    lf_only = b"HTTP/1.1 200 OK\nContent-Length : 2\nX-Odd: a\x01b\n\nok"
    chunk_space = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 \r\nok\r\n0\r\n\r\n"
    server = await raw(answering(lf_only, chunk_space))
    for i in range(2):
        outcome = await sender.send(delivery(server.url(), i))
        assert outcome.status_code == 200 and outcome.body == "ok", outcome


async def test_bytes_after_an_answer_keep_the_connection_out_of_the_pool(
    raw: Callable[[Handler], Awaitable[RawServer]], sender: Sender
) -> None:
    server = await raw(answering(OK + b"HTTP/1.1 2"))
    assert (await sender.send(delivery(server.url(), 1))).status_code == 200
    assert (await sender.send(delivery(server.url(), 2))).status_code == 200
    assert server.connections == 2


async def test_a_full_pool_makes_room_by_closing_the_longest_idle_connection(
    raw: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    a, b = await raw(answering()), await raw(answering())
    client = HttpClient(allow_private=True, max_idle=1)
    try:
        s = Sender(client, 2.0)
        assert (await s.send(delivery(a.url(), 1))).status_code == 200
        for i in range(3):
            assert (await s.send(delivery(b.url(), i))).status_code == 200
        assert b.connections == 1  # B's connection was pooled in place of A's
        assert client.idle(http.target(a.url(), "t")) is None
    finally:
        await client.close()


async def test_fresh_connection_closed_without_an_answer_is_a_failed_attempt(
    raw: Callable[[Handler], Awaitable[RawServer]], sender: Sender
) -> None:
    async def hang_up(
        srv: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await srv.read_request(reader)

    server = await raw(hang_up)
    outcome = await sender.send(delivery(server.url()))
    assert outcome.status_code is None
    assert outcome.error == "connection closed before the answer"
    assert len(server.requests) == 1  # not sent again: it may have been processed


async def test_large_answer_keeps_one_kib_and_drops_the_connection(
    raw: Callable[[Handler], Awaitable[RawServer]], sender: Sender
) -> None:
    big = b"x" * 4_000_000  # arrives in several reads: the rest is not waited for
    answer = b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)
    server = await raw(answering(answer, answer))
    for i in range(2):
        outcome = await sender.send(delivery(server.url(), i))
        assert outcome.status_code == 500 and outcome.body == "x" * http.BODY_KEEP
    assert server.connections == 2


async def test_chunked_answer_and_informational_answer(
    raw: Callable[[Handler], Awaitable[RawServer]], sender: Sender
) -> None:
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    )
    server = await raw(answering(chunked))
    outcome = await sender.send(delivery(server.url(), 1))
    assert outcome.status_code == 201 and outcome.body == "abcdefg"
    assert (await sender.send(delivery(server.url(), 2))).status_code == 200
    assert server.connections == 1


async def test_answer_without_length_ends_with_the_connection(
    raw: Callable[[Handler], Awaitable[RawServer]], sender: Sender
) -> None:
    async def until_close(
        srv: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 503 Busy\r\nRetry-After: 7\r\n\r\ncome back later")
        await writer.drain()

    server = await raw(until_close)
    outcome = await sender.send(delivery(server.url()))
    assert outcome.status_code == 503 and outcome.body == "come back later"
    assert outcome.retry_after_s == 7


async def test_garbage_answer_is_a_failed_attempt(
    raw: Callable[[Handler], Awaitable[RawServer]], sender: Sender
) -> None:
    server = await raw(answering(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"))
    outcome = await sender.send(delivery(server.url()))
    assert outcome.status_code is None
    assert outcome.error is not None and outcome.error.startswith("invalid HTTP answer")


async def test_silent_receiver_times_out_and_its_connection_is_dropped(
    raw: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    async def silent(
        srv: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await srv.read_request(reader)
        await reader.read()  # until the client gives up

    server = await raw(silent)
    client = HttpClient(allow_private=True, max_idle=4)
    try:
        outcome = await Sender(client, timeout_s=0.3).send(delivery(server.url()))
        assert outcome.error == "timeout after 0.3s" and 250 < outcome.duration_ms < 2000
        assert client.idle(http.target(server.url(), "t")) is None
    finally:
        await client.close()


async def test_connect_refused_and_blocked_literal_are_failed_attempts(
    raw: Callable[[Handler], Awaitable[RawServer]],
) -> None:
    server = await raw(answering())
    port = server.port
    assert server.server is not None
    server.server.close()
    await server.server.wait_closed()
    open_client = HttpClient(allow_private=True, max_idle=4)
    guarded = HttpClient(allow_private=False, max_idle=4)
    try:
        refused = await Sender(open_client, 1.0).send(delivery(f"http://127.0.0.1:{port}/"))
        assert refused.status_code is None and "ConnectionRefusedError" in (refused.error or "")
        blocked = await Sender(guarded, 1.0).send(delivery(f"http://127.0.0.1:{port}/"))
        assert blocked.status_code is None and "blocked address" in (blocked.error or "")
        named = await Sender(guarded, 1.0).send(delivery(f"http://localhost:{port}/"))
        assert named.status_code is None and "blocked addresses" in (named.error or "")
    finally:
        await open_client.close()
        await guarded.close()


async def test_stale_idle_connection_is_not_reused(
    raw: Callable[[Handler], Awaitable[RawServer]],
    sender: Sender,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await raw(answering())
    await sender.send(delivery(server.url(), 1))
    monkeypatch.setattr(http, "KEEPALIVE_S", 0.0)
    await sender.send(delivery(server.url(), 2))
    assert server.connections == 2


async def test_cancelled_attempt_drops_its_connection(
    raw: Callable[[Handler], Awaitable[RawServer]], sender: Sender
) -> None:
    arrived = asyncio.Event()

    async def slow(
        srv: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await srv.read_request(reader)
        arrived.set()
        await reader.read()  # returns when the client closes the connection

    server = await raw(slow)
    task = asyncio.ensure_future(sender.send(delivery(server.url())))
    await asyncio.wait_for(arrived.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sender.client.idle(http.target(server.url(), "t")) is None


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_https_verifies_the_certificate_and_the_host_name(
    raw: Callable[..., Awaitable[RawServer]], ca: trustme.CA
) -> None:
    certified = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(certified)
    server = await raw(answering(), tls=certified)
    port = server.port
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    clients = [
        HttpClient(allow_private=True, max_idle=4, tls=trusting),
        HttpClient(allow_private=True, max_idle=4),  # the system store does not know this CA
    ]
    try:
        good = await Sender(clients[0], 2.0).send(delivery(f"https://localhost:{port}/hook"))
        assert good.status_code == 200 and good.body == "ok"
        # Right CA, wrong name: 127.0.0.1 is not in the certificate.
        wrong_name = await Sender(clients[0], 2.0).send(delivery(f"https://127.0.0.1:{port}/"))
        assert wrong_name.status_code is None
        assert (wrong_name.error or "").startswith("TLS error")
        unknown_ca = await Sender(clients[1], 2.0).send(delivery(f"https://localhost:{port}/"))
        assert unknown_ca.status_code is None
        assert "CERTIFICATE_VERIFY_FAILED" in (unknown_ca.error or "")
    finally:
        for c in clients:
            await c.close()
    assert len(server.requests) == 1  # only the verified connection carried a request


async def test_ipv6_literal_destination_gets_a_bracketed_host_header(
    raw: Callable[..., Awaitable[RawServer]], sender: Sender
) -> None:
    try:
        server = await raw(answering(), host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    outcome = await sender.send(delivery(server.url("/v6?x=1")))
    assert outcome.status_code == 200
    head = server.requests[0][0]
    assert head.startswith(b"POST /v6?x=1 HTTP/1.1\r\n")
    assert f"\r\nHost: [::1]:{server.port}\r\n".encode() in head


@pytest.mark.parametrize(
    ("nofile", "pooled"),
    [
        (20000, 512),  # twice max_in_flight: 50 destinations x 8 connections stay pooled
        (1024, 512),
        (600, 256),  # never fewer than max_in_flight
        (resource.RLIM_INFINITY, 512),
    ],
)
def test_the_idle_pool_holds_twice_max_in_flight_within_the_descriptor_limit(
    monkeypatch: pytest.MonkeyPatch, nofile: int, pooled: int
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (nofile, resource.RLIM_INFINITY))
    assert idle_connections(256) == pooled


async def test_the_daemon_pools_more_idle_connections_than_max_in_flight(
    harness: Harness,
) -> None:
    max_in_flight = harness.config.delivery.max_in_flight
    assert harness.runtime._client is not None
    assert harness.runtime._client.max_idle == idle_connections(max_in_flight) > max_in_flight
