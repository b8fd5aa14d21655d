"""sd_notify against a real datagram socket: READY=1, WATCHDOG=1, reload on SIGHUP, STOPPING=1."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pusherd.systemd import SystemdNotifier
from tests.conftest import ALL_SCOPES, ORG
from tests.service import Service, http, run_cli, start_service, write_config


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    # AF_UNIX paths are limited to ~107 bytes; tmp_path may be deep, so bind relative to it.
    path = tmp_path / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    yield sock, str(path)
    sock.close()


def receive(sock: socket.socket, want: str, timeout: float = 20.0) -> list[str]:
    """Datagrams until one contains the line `want`; all of them, in order."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {want!r} within {timeout}s; got {got}")
        sock.settimeout(remaining)
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            continue
        got.append(message)
        if want in message.splitlines():
            return got


def test_ready_watchdog_reload_and_stopping(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, address = notify_socket
    config = tmp_path / "pusherd.toml"
    database = tmp_path / "pusherd.sqlite3"
    ports = write_config(config, database, "[ratelimit]\nper_minute = 1000\nper_hour = 5000\n")
    token = run_cli(
        "token", "create", "--config", str(config), "--org", ORG, *_scopes()
    ).stdout.strip()
    service = start_service(config, *ports, NOTIFY_SOCKET=address, WATCHDOG_USEC="200000")
    try:
        before = receive(sock, "READY=1")
        # READY=1 means serving: both listeners answer at that moment, and nothing came earlier.
        assert service.healthy()
        assert before == [m for m in before if "READY=1" in m]
        assert "STATUS=serving" in before[-1].splitlines()

        # WATCHDOG_USEC=200ms: pings at half the interval, so several within a second.
        start = time.monotonic()
        for _ in range(3):
            receive(sock, "WATCHDOG=1", timeout=2.0)
        assert time.monotonic() - start < 2.0

        _reload_changes_the_rate_limit(service, config, token)

        service.proc.send_signal(signal.SIGTERM)
        receive(sock, "STOPPING=1")
        assert service.proc.wait(20) == 0
    finally:
        service.kill()


def _scopes() -> list[str]:
    return [arg for scope in ALL_SCOPES for arg in ("--scope", scope)]


def _rate_limit(service: Service, token: str) -> str:
    status, headers, body = http(
        "GET",
        service.api + "/organizations/self/subscriptions",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert status == 200, body
    return headers["X-RateLimit-Limit"]


def _reload_changes_the_rate_limit(service: Service, config: Path, token: str) -> None:
    assert _rate_limit(service, token) == "1000"
    text = config.read_text().replace("per_minute = 1000", "per_minute = 777")
    config.write_text(text)
    service.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while _rate_limit(service, token) != "777":
        assert time.monotonic() < deadline, "SIGHUP did not apply the new rate limit"
        time.sleep(0.05)
    assert service.proc.poll() is None
    assert service.healthy()


def test_no_notify_socket_means_no_notifications() -> None:
    notifier = SystemdNotifier(None, 200_000)
    assert notifier.ready() is False
    assert notifier.start_watchdog() is None


def test_notifier_sends_to_an_abstract_socket() -> None:
    name = f"pusherd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = SystemdNotifier("@" + name)
        assert notifier.stopping() is True
        sock.settimeout(5)
        assert sock.recv(100) == b"STOPPING=1"


def test_watchdog_is_off_when_meant_for_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert SystemdNotifier.from_env().watchdog_s is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert SystemdNotifier.from_env().watchdog_s == 30.0


def test_a_vanished_notify_socket_does_not_break_the_daemon(tmp_path: Path) -> None:
    config = tmp_path / "pusherd.toml"
    ports = write_config(config, tmp_path / "db.sqlite3")
    service = start_service(config, *ports, NOTIFY_SOCKET=str(tmp_path / "gone.sock"))
    try:
        service.wait_healthy()
        assert service.stop() == 0
    finally:
        service.kill()
    assert "sd_notify_failed" in service.log()
