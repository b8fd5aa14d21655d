"""Wake-ups between processes on one SQLite file (the change feed beyond one process).

`pusherd replay` queues deliveries from a process of its own; without a word from it the daemon
would only find them at its next poll, and an idle daemon polls seldom (each wake-up of an idle
process costs it CPU). So the daemon listens on a Unix datagram socket in Linux's abstract
namespace, named after the database file's real path (no file to leave behind, no path length
limit), and a command's store sends one datagram after it committed deliveries. Where that is
not possible (another network namespace, not Linux, another daemon already listening) nothing
fails: the poll finds the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import Callable

import structlog

log = structlog.get_logger("pusherd.store")


def address(path: str) -> str:
    """The abstract socket name of a database file."""
    digest = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32]
    return f"\0pusherd-wake-{digest}"


class WakeListener:
    """The daemon's end: calls on_wake for every datagram (its content is not trusted)."""

    def __init__(self, path: str, on_wake: Callable[[], None]) -> None:
        self._on_wake = on_wake
        self._sock: socket.socket | None = None
        self._loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError as exc:
            log.info("wake_socket_unavailable", error=str(exc))
            return
        try:
            sock.setblocking(False)
            sock.bind(address(path))
        except OSError as exc:  # another daemon serves this file, or no abstract namespace
            sock.close()
            log.info("wake_socket_unavailable", error=str(exc))
            return
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._read)

    def _read(self) -> None:
        assert self._sock is not None
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:  # drain: many datagrams make one wake-up
                self._sock.recv(64)
        self._on_wake()

    def close(self) -> None:
        """Stop listening."""
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


def send_wake(path: str) -> None:
    """Tell the daemon serving this file that deliveries were queued (best effort)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(b"deliveries_queued", address(path))
    except OSError:
        pass  # nobody listening (or full): the daemon's poll finds the rows
