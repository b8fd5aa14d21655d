"""Tests for pusherd.delivery.netguard (SSRF guard); no network beyond loopback is used."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import ResolveResult
from aiohttp.test_utils import TestServer

from pusherd.delivery.http import HttpClient, target
from pusherd.delivery.netguard import (
    DestinationError,
    GuardedResolver,
    check_connect_host,
    check_url,
    is_blocked_ip,
    vet_destination,
)

BLOCKED = [
    # IPv4
    "0.0.0.0",
    "0.1.2.3",
    "10.0.0.1",
    "100.64.0.1",
    "100.127.255.254",
    "127.0.0.1",
    "127.255.255.255",
    "169.254.169.254",
    "172.16.0.1",
    "172.31.255.255",
    "192.0.0.1",
    "192.0.0.9",
    "192.0.2.10",
    "192.168.1.1",
    "198.18.0.1",
    "198.19.255.255",
    "198.51.100.7",
    "203.0.113.5",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    # IPv6
    "::",
    "::1",
    "::127.0.0.1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:100.64.0.1",
    "64:ff9b::127.0.0.1",
    "64:ff9b::10.1.2.3",
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # teredo, client 127.0.0.1
    "2001:db8::1",
    "100::1",
    "fc00::1",
    "fd12:3456:789a::1",
    "fe80::1",
    "fe80::1%1",
    "fec0::1",
    "ff02::1",
    "ff0e::1",
]

ALLOWED = [
    "1.1.1.1",
    "8.8.8.8",
    "93.184.216.34",
    "100.63.255.255",
    "100.128.0.1",
    "172.32.0.1",
    "198.20.0.1",
    "2606:4700::1",
    "2a00:1450:4001:80b::200e",
    "::ffff:93.184.216.34",
    "64:ff9b::93.184.216.34",
]


@pytest.mark.parametrize("address", BLOCKED)
def test_blocked_ips(address: str) -> None:
    assert is_blocked_ip(ipaddress.ip_address(address)) is True


@pytest.mark.parametrize("address", ALLOWED)
def test_allowed_ips(address: str) -> None:
    assert is_blocked_ip(ipaddress.ip_address(address)) is False


@pytest.mark.parametrize(
    ("url", "allow_http", "message"),
    [
        ("http://example.com/hook", False, "absolute https:// URL"),
        ("ftp://example.com/hook", True, "absolute http:// or https:// URL"),
        ("example.com/hook", False, "absolute https:// URL"),
        ("/hook", False, "absolute https:// URL"),
        ("", False, "absolute https:// URL"),
        ("https://", False, "absolute https:// URL"),
        ("https:///hook", False, "absolute https:// URL"),
        ("https://[::1/hook", False, "absolute https:// URL"),
        ("https://example.com:99999/", False, "absolute https:// URL"),
        ("https://example.com:0/", False, "invalid port"),
        ("https://user:pw@example.com/hook", False, "credentials"),
        ("https://user@example.com/hook", False, "credentials"),
        ("https://2130706433/hook", False, "not a valid IP address"),
        ("https://127.1/hook", False, "not a valid IP address"),
        ("https://exa mple.com/hook", False, "not a valid host name"),
        ("https://a..b/hook", False, "not a valid host name"),
        ("https://-a.example.com/hook", False, "not a valid host name"),
    ],
)
def test_check_url_errors(url: str, allow_http: bool, message: str) -> None:
    with pytest.raises(DestinationError, match=message):
        check_url(url, allow_http=allow_http)


@pytest.mark.parametrize(
    ("url", "allow_http"),
    [
        ("https://example.com/hook", False),
        ("https://bücher.example/hook", False),
        ("https://my_host.example.com.:8443/hook", False),
        ("HTTPS://Example.COM:8443/hook?x=1", False),
        ("http://example.com/hook", True),
        ("https://[2606:4700::1]/hook", False),
        ("https://93.184.216.34/hook", False),
    ],
)
def test_check_url_accepts(url: str, allow_http: bool) -> None:
    parsed = check_url(url, allow_http=allow_http)
    assert parsed.absolute
    assert parsed.scheme in ("http", "https")


def test_destination_error_is_value_error() -> None:
    assert issubclass(DestinationError, ValueError)


@pytest.mark.parametrize(
    "url",
    [
        "https://localhost/hook",
        "https://LOCALHOST./hook",
        "https://api.localhost/hook",
        "https://127.0.0.1/hook",
        "https://127.0.0.1:8443/hook",
        "https://[::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://100.64.0.1/hook",
    ],
)
async def test_vet_destination_blocks(url: str) -> None:
    with pytest.raises(DestinationError, match="blocked address"):
        await vet_destination(url, allow_http=False, allow_private=False)


async def test_vet_destination_checks_form_first() -> None:
    with pytest.raises(DestinationError, match="https://"):
        await vet_destination("http://localhost/", allow_http=False, allow_private=True)


@pytest.mark.parametrize(
    "url", ["https://localhost/hook", "https://127.0.0.1/hook", "http://[::1]:8080/"]
)
async def test_vet_destination_allow_private(url: str) -> None:
    await vet_destination(url, allow_http=True, allow_private=True)


async def test_vet_destination_public_literal() -> None:
    await vet_destination("https://93.184.216.34/hook", allow_http=False, allow_private=False)


@pytest.mark.usefixtures("leaves_loopback")  # the name is answered by the tests' guard, unlooked-up
async def test_vet_destination_unresolvable_is_accepted() -> None:
    await vet_destination("https://nonexistent.invalid/hook", allow_http=False, allow_private=False)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "10.0.0.1", "fe80::1", "2130706433", "127.1"])
def test_check_connect_host_blocks_literals(host: str) -> None:
    with pytest.raises(DestinationError):
        check_connect_host(host, False)


@pytest.mark.parametrize("host", ["93.184.216.34", "2606:4700::1", "example.com", "localhost"])
def test_check_connect_host_passes(host: str) -> None:
    # Names are left to GuardedResolver; only literals are judged here.
    check_connect_host(host, False)


def test_check_connect_host_allow_private() -> None:
    check_connect_host("127.0.0.1", True)


async def test_guarded_resolver_refuses_localhost() -> None:
    resolver = GuardedResolver(allow_private=False)
    try:
        with pytest.raises(OSError, match="blocked addresses"):
            await resolver.resolve("localhost", 443)
    finally:
        await resolver.close()


async def test_guarded_resolver_allow_private() -> None:
    resolver = GuardedResolver(allow_private=True)
    try:
        results = await resolver.resolve("localhost", 443)
    finally:
        await resolver.close()
    assert results
    assert all(ipaddress.ip_address(r["host"]).is_loopback for r in results)


async def test_guarded_resolver_filters_mixed_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    def result(host: str) -> ResolveResult:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return {
            "hostname": "rebind.example",
            "host": host,
            "port": 443,
            "family": family,
            "proto": 0,
            "flags": 0,
        }

    async def fake_resolve(
        self: aiohttp.ThreadedResolver,
        host: str,
        port: int = 0,
        family: socket.AddressFamily = socket.AF_INET,
    ) -> list[ResolveResult]:
        return [result("127.0.0.1"), result("93.184.216.34"), result("fd00::1"), result("::1")]

    monkeypatch.setattr(aiohttp.ThreadedResolver, "resolve", fake_resolve)
    resolver = GuardedResolver(allow_private=False)
    try:
        results = await resolver.resolve("rebind.example", 443)
    finally:
        await resolver.close()
    assert [r["host"] for r in results] == ["93.184.216.34"]


@pytest.fixture
async def loopback_server() -> AsyncIterator[TestServer]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


async def test_client_refuses_a_name_that_resolves_to_loopback(
    loopback_server: TestServer,
) -> None:
    client = HttpClient(allow_private=False, max_idle=1)
    try:
        with pytest.raises(OSError, match="blocked addresses"):
            await client.connect(target(f"http://localhost:{loopback_server.port}/hook", "t"))
    finally:
        await client.close()


async def test_client_allow_private_connects_by_name(loopback_server: TestServer) -> None:
    client = HttpClient(allow_private=True, max_idle=1)
    try:
        conn = await client.connect(target(f"http://localhost:{loopback_server.port}/hook", "t"))
        conn.close()
    finally:
        await client.close()


async def test_client_checks_ip_literals_without_the_resolver(
    loopback_server: TestServer,
) -> None:
    # The resolver never sees an IP literal, so the client checks it before connecting.
    client = HttpClient(allow_private=False, max_idle=1)
    try:
        with pytest.raises(DestinationError, match="blocked address"):
            await client.connect(target(f"http://127.0.0.1:{loopback_server.port}/hook", "t"))
    finally:
        await client.close()
