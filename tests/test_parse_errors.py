"""Requests aiohttp's parser rejects get pusherd's JSON error body (SPEC §4), never their bytes.

aiohttp answers such a request by itself, before any application code, with a text quoting the
line it choked on: `Authorization: Bearer <token>` echoed to whoever sent it. pusherd.httpserver
replaces that answer on both listeners; these tests send what no HTTP client library would send
over raw sockets, to a real `pusherd serve` and to the same runner wiring in process.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, InvalidHeader, LineTooLong

from pusherd.httpserver import AppRunner, rejection_message
from tests.conftest import ORG, Harness
from tests.rawhttp import RawAnswer, api_port, ingest_port, request, send
from tests.service import run_cli, start_service, write_config

HarnessFactory = Callable[..., Awaitable[Harness]]
BASE = "/organizations/self/subscriptions"

INVALID_HEADER = "malformed request: invalid header"
INVALID_LINE = "malformed request: invalid request line"


def _hostile(token: str) -> list[tuple[bytes, str]]:
    """(raw request, expected message): the token sits in the bytes the parser rejects."""
    secret = token.encode()
    auth = b"Authorization: Bearer " + secret
    return [
        (request("GET", BASE, auth + b"\x00\r\n"), INVALID_HEADER),  # NUL after the token
        (request("GET", BASE, auth + b"\r\n  folded\r\n"), INVALID_HEADER),  # obs-fold
        (request("GET", BASE, b"Authorization Bearer " + secret + b"\r\n"), INVALID_HEADER),
        (request("GET", BASE, auth + b"\r\nX Bad(Name: 1\r\n"), INVALID_HEADER),
        (b"GET " + BASE.encode() + b"?token=" + secret + b" HTTP/1.1 x\r\n\r\n", INVALID_LINE),
    ]


def _assert_json_error(raw: bytes, status: int, message: str, token: str) -> None:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert int(lines[0].split()[1]) == status, raw
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    assert headers["content-type"].startswith("application/json"), raw
    assert orjson.loads(body) == {"status": "error", "message": message}
    assert token.encode() not in raw


def _exchange(port: int, data: bytes) -> bytes:
    """Send `data` and read until the server closes (it does after a parser error)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def test_serve_answers_unparseable_requests_with_the_json_error_body(tmp_path: Path) -> None:
    """The whole process, both listeners as `pusherd serve` runs them, over real sockets."""
    config = tmp_path / "pusherd.toml"
    api, ingest = write_config(config, tmp_path / "pusherd.sqlite3")
    created = run_cli(
        "token", "create", "--config", str(config), "--org", ORG, "--scope", "READ:PRODUCT"
    )
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    service = start_service(config, api, ingest)
    try:
        service.wait_healthy()
        for port in (api, ingest):
            for data, message in _hostile(token):
                _assert_json_error(_exchange(port, data), 400, message, token)
        good = request("GET", BASE, f"Authorization: Bearer {token}\r\n".encode())
        assert _exchange(api, good).startswith(b"HTTP/1.1 200 ")
    finally:
        assert service.stop() == 0
    log = service.log()
    assert token not in log
    assert log.count('"http_request_rejected"') == 2 * len(_hostile(token)), log


HARNESS_TOKEN = "pz_secret_0123456789abcdef"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        *_hostile(HARNESS_TOKEN),
        (
            request("GET", BASE, b"X-Pad: " + HARNESS_TOKEN.encode() + b"a" * 20_000 + b"\r\n"),
            "malformed request: request line or header too long",
        ),
        (
            request("GET", BASE, b"".join(b"X-%d: %s\r\n" % (i, b"t") for i in range(200))),
            "malformed request: too many headers",
        ),
        (
            request("GET", BASE, b"Content-Length: 1" + HARNESS_TOKEN.encode() + b"\r\n", b"x"),
            "malformed request: invalid Content-Length",
        ),
        (
            b"\x16\x03\x01\x00\xa5\x01\x00" + HARNESS_TOKEN.encode(),
            "malformed request: invalid method",
        ),
    ],
    ids=["nul", "obs-fold", "no-colon", "bad-name", "request-line", "long", "many", "cl", "tls"],
)
async def test_both_listeners_answer_parser_errors_with_the_json_error_body(
    harness_factory: HarnessFactory, data: bytes, message: str
) -> None:
    h = await harness_factory()
    for port in (api_port(h), ingest_port(h)):
        answer: RawAnswer = await send(port, data)
        assert answer.status == 400
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.json() == {"status": "error", "message": message}
        assert HARNESS_TOKEN.encode() not in answer.body
        assert all(HARNESS_TOKEN not in v for v in answer.headers.values())


async def test_an_error_escaping_the_app_is_a_json_500_too() -> None:
    """aiohttp's other self-made answer (a handler crash outside any middleware)."""

    async def crash(request: web.Request) -> web.Response:
        raise RuntimeError("boom " + HARNESS_TOKEN)

    app = web.Application()
    app.router.add_get("/", crash)
    runner = AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        answer = await send(port, request("GET", "/"))
    finally:
        await runner.cleanup()
    assert answer.status == 500
    assert answer.json() == {"status": "error", "message": "internal error"}


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (InvalidHeader(b"Authorization: Bearer " + HARNESS_TOKEN.encode()), INVALID_HEADER),
        (
            LineTooLong(HARNESS_TOKEN.encode(), 8190),
            "malformed request: request line or header too long",
        ),
        (BadStatusLine(HARNESS_TOKEN), INVALID_LINE),
        # llhttp's reason comes first; a word in the quoted request must not choose the kind
        (BadHttpMessage(f"Paused:\n\n  b'url header {HARNESS_TOKEN}'\n  ^"), "malformed request"),
        (BadHttpMessage(HARNESS_TOKEN), "malformed request"),
    ],
)
def test_rejection_messages_are_built_from_constants_only(exc: BaseException, message: str) -> None:
    assert rejection_message(400, exc) == message
