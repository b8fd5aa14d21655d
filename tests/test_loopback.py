"""The tests' loopback guard (tests/loopback.py): nothing the tests run leaves loopback.

A daemon of the tests that delivers to a public destination meets a refused connection, and
the real connect is never called for it; the same holds on uvloop and in `pusherd serve`
subprocesses, and names other than localhost are never looked up.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop

from pusherd.delivery.http import HttpClient, target
from tests import loopback
from tests.conftest import ORG, Harness
from tests.test_spec_audit2 import serving, subscribe

PUBLIC = "https://93.184.216.34/hook"  # a public IP literal: valid without DNS
HarnessFactory = Callable[..., Awaitable[Harness]]
# Every test here tries to leave loopback on purpose, to see the guard refuse it.
pytestmark = pytest.mark.usefixtures("leaves_loopback")


async def wait_for(check: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Poll a condition until it holds or the deadline passes."""
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.02)


@pytest.fixture
def reached(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every address that got past the guard to the real socket connect."""
    seen: list[Any] = []
    real = loopback._real_connect

    def spy(sock: socket.socket, address: Any) -> None:
        seen.append((sock.family, address))
        real(sock, address)

    monkeypatch.setattr(loopback, "_real_connect", spy)
    return seen


def only_loopback(reached: list[Any]) -> bool:
    return all(
        family not in (socket.AF_INET, socket.AF_INET6) or loopback.is_loopback_host(addr[0])
        for family, addr in reached
    )


async def test_a_harness_delivering_to_a_public_address_meets_a_refused_connection(
    harness_factory: HarnessFactory, reached: list[Any]
) -> None:
    h = await harness_factory(delivery={"allow_http": False, "allow_private_destinations": False})
    before = len(loopback.attempts())
    sub = await h.subscribe(h.token(), PUBLIC)

    async def first_attempt() -> Any:
        deadline = time.monotonic() + 10
        while True:
            rows = await h.runtime.store.list_deliveries(sub["uuid"], None, 10, None)
            for row in rows:
                view = await h.runtime.store.get_delivery(row.id, ORG)
                if view is not None and view.event_name == "TestMessage" and view.attempt_log:
                    return view.attempt_log[0]
            assert time.monotonic() < deadline, "the TestMessage was never attempted"
            await asyncio.sleep(0.02)

    attempt = await first_attempt()
    assert attempt.status_code is None
    assert attempt.error.startswith("ConnectionRefusedError: [Errno 111]"), attempt.error
    assert "loopback guard" in attempt.error
    assert loopback.Attempt("connect", "93.184.216.34", 443) in loopback.attempts()[before:]
    assert reached, "the spy saw no connect at all (the API client's own are loopback)"
    assert only_loopback(reached), reached


def test_the_guard_holds_on_uvloop(reached: list[Any]) -> None:
    # `pusherd serve` runs on uvloop, whose sock_connect, getaddrinfo and create_connection are
    # its own.
    async def connect() -> None:
        client = HttpClient(allow_private=False, max_idle=1)
        try:
            with pytest.raises(OSError):
                await client.connect(target("https://hooks.example.net/hook", "t"), 5)
            with pytest.raises(ConnectionRefusedError):
                await asyncio.get_running_loop().create_connection(
                    asyncio.Protocol, "93.184.216.34", 25
                )
            await client.connect(target("https://93.184.216.34:8443/hook", "t"), 5)
        finally:
            await client.close()

    before = len(loopback.attempts())
    with pytest.raises(ConnectionRefusedError):
        uvloop.run(connect())
    assert loopback.attempts()[before:] == [
        loopback.Attempt("getaddrinfo", "hooks.example.net", 443),
        loopback.Attempt("connect", "93.184.216.34", 25),
        loopback.Attempt("connect", "93.184.216.34", 8443),
    ]
    assert only_loopback(reached), reached


async def test_a_name_is_not_looked_up_and_connect_ex_is_guarded(reached: list[Any]) -> None:
    before = len(loopback.attempts())
    client = HttpClient(allow_private=False, max_idle=1)
    try:
        with pytest.raises(OSError):
            await client.connect(target("https://hooks.example.net/hook", "t"), 5)
    finally:
        await client.close()
    with socket.socket() as s:
        assert s.connect_ex(("1.1.1.1", 443)) == errno.ECONNREFUSED
    assert loopback.attempts()[before:] == [
        loopback.Attempt("getaddrinfo", "hooks.example.net", 443),
        loopback.Attempt("connect", "1.1.1.1", 443),
    ]
    assert only_loopback(reached), reached
    # localhost and numeric hosts are still answered
    assert socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)
    assert socket.getaddrinfo("93.184.216.34", 80, type=socket.SOCK_STREAM)


@pytest.mark.parametrize(
    ("host", "inside"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("api.localhost", True),
        ("93.184.216.34", False),
        ("10.0.0.1", False),
        ("0.0.0.0", False),
        ("::ffff:10.0.0.1", False),
        ("fe80::1%lo", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_what_counts_as_loopback(host: str, inside: bool) -> None:
    assert loopback.is_loopback_host(host) is inside


async def test_a_pusherd_serve_subprocess_is_guarded(tmp_path: Path, loopback_guard: Path) -> None:
    # The daemon (its own process, on uvloop) accepts the public literal and sends it the
    # TestMessage: the guard installed there by tests/loopback_site refuses it and says so.
    wanted = loopback.Attempt("connect", "93.184.216.34", 443)
    before = len(loopback.read_log(str(loopback_guard)))
    here = len(loopback.attempts())
    async with serving(tmp_path) as (service, token), aiohttp.ClientSession() as session:
        await subscribe(session, service, token, PUBLIC)
        await wait_for(lambda: wanted in loopback.read_log(str(loopback_guard))[before:])
        assert wanted not in loopback.attempts()[here:]  # refused over there, not in this process


def test_a_test_that_leaves_loopback_without_saying_so_fails(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The autouse check of tests/conftest.py, on a test that forgot `leaves_loopback`.
    root = str(Path(__file__).resolve().parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, os.environ["PYTHONPATH"]]))
    pytester.makeconftest("pytest_plugins = ['tests.conftest']")
    pytester.makepyfile(
        """
        import socket

        def test_public():
            with socket.socket() as s:
                assert s.connect_ex(("93.184.216.34", 443)) != 0

        def test_declared(leaves_loopback):
            with socket.socket() as s:
                assert s.connect_ex(("93.184.216.34", 443)) != 0

        def test_loopback_only():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                s.listen()
                with socket.create_connection(s.getsockname()):
                    pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_public*", "*tried to leave loopback*"])
