"""Malformed requests against a running pusherd: a 400, and never a token in any log (SPEC §1, §2).

aiohttp's own parser logs the header line it choked on; these tests send, over a raw socket, what
an HTTP client library would refuse to send, and read everything logging wrote: the JSON lines of
pusherd's configured output, pytest's caplog of every stdlib logger, and structlog's own events.
"""

from __future__ import annotations

import io
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import orjson
import pytest
import structlog

import pusherd.log
from pusherd.log import configure_logging
from tests.conftest import ORG, Harness
from tests.rawhttp import api_port, ingest_port, request, send
from tests.service import run_cli, start_service, write_config

HarnessFactory = Callable[..., Awaitable[Harness]]
BASE = "/organizations/self/subscriptions"
INGEST_TOKEN = "ingest-secret-4f1c2b9e7d"


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """pusherd's logging configured as `serve` does (JSON lines, level debug) into a buffer;
    the previous configuration is put back afterwards."""
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    info = pusherd.log.info_enabled()
    buffer = io.StringIO()
    configure_logging("debug", "json", buffer)
    try:
        yield buffer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**config)
        pusherd.log._info_enabled = info


def _bad_headers(secret: str) -> list[bytes]:
    token = secret.encode()
    return [
        b"Authorization: Bearer " + token + b"\x00\r\n",  # NUL after the token
        b"Authorization: Bearer " + token + b"\r\n  folded\r\n",  # an obs-fold follows it
        b"X-Note: a\r\n Authorization: Bearer " + token + b"\r\n",  # the token on a folded line
        b"Authorization: Bearer " + token + b"\r\n\x00: x\r\n",  # a NUL in the next name
    ]


@pytest.mark.parametrize("case", range(4))
async def test_a_token_in_a_malformed_header_is_answered_400_and_never_logged(
    harness_factory: HarnessFactory,
    output: io.StringIO,
    caplog: pytest.LogCaptureFixture,
    case: int,
) -> None:
    caplog.set_level(logging.DEBUG)
    h = await harness_factory(ingest={"token": INGEST_TOKEN})
    token = h.token()
    with structlog.testing.capture_logs() as events:
        api = await send(api_port(h), request("GET", BASE, _bad_headers(token)[case]))
        ingest = await send(
            ingest_port(h), request("POST", "/events", _bad_headers(INGEST_TOKEN)[case], b"{}")
        )
        # the same listeners still serve a good request afterwards
        good = await send(
            api_port(h), request("GET", BASE, f"Authorization: Bearer {token}\r\n".encode())
        )
    assert api.status == 400 and ingest.status == 400
    assert good.status == 200
    written = (
        output.getvalue()
        + caplog.text
        + repr(events)
        + repr([(r.getMessage(), r.exc_info, r.exc_text) for r in caplog.records])
    )
    assert token not in written
    assert INGEST_TOKEN not in written
    # what is logged instead: one line naming the error, not the request
    lines = [orjson.loads(line) for line in output.getvalue().splitlines()]
    rejected = [line for line in lines if line["event"] == "http_request_rejected"]
    assert len(rejected) == 2, lines
    assert {line["level"] for line in rejected} == {"info"}
    assert {line["status"] for line in rejected} == {400}


async def test_undecodable_bodies_are_400_and_log_no_error(
    harness_factory: HarnessFactory, output: io.StringIO
) -> None:
    h = await harness_factory()
    for coding, body in (("gzip", b"not gzip at all"), ("deflate", b"\xff\x00\x13")):
        answer = await send(
            ingest_port(h),
            request("POST", "/events", f"Content-Encoding: {coding}\r\n".encode(), body),
        )
        assert answer.status == 400, answer
        assert answer.json()["status"] == "error"
    lines = [orjson.loads(line) for line in output.getvalue().splitlines()]
    assert [line for line in lines if line["level"] in ("error", "critical")] == []


def test_stdlib_records_render_exc_info_as_a_traceback(output: io.StringIO) -> None:
    def fail() -> None:
        raise ConnectionResetError("peer went away")

    try:
        fail()
    except ConnectionResetError:
        # what uvloop does with a transport error: the asyncio logger, exc_info=True
        logging.getLogger("asyncio").error("Fatal error on transport", exc_info=sys.exc_info())
    (line,) = [orjson.loads(x) for x in output.getvalue().splitlines() if "Fatal error" in x]
    assert line["level"] == "error" and line["logger"] == "asyncio"
    assert "exc_info" not in line
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert "in fail" in line["exception"]
    assert line["exception"].rstrip().endswith("ConnectionResetError: peer went away")
    assert "<traceback object" not in output.getvalue()


def _blocking_status(port: int, data: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_a_serving_daemon_writes_no_token_it_could_not_parse(tmp_path: Path) -> None:
    """The whole process, logging as `pusherd serve` configures it, over real sockets."""
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
        for header in _bad_headers(token):
            assert _blocking_status(api, request("GET", BASE, header)) == 400
        good = f"Authorization: Bearer {token}\r\n".encode()
        assert _blocking_status(api, request("GET", BASE, good)) == 200
    finally:
        assert service.stop() == 0
    log = service.log()
    assert token not in log
    assert log.count('"http_request_rejected"') == len(_bad_headers(token)), log
