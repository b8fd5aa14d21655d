"""LISTEN/NOTIFY on one dedicated connection per process, reconnecting by itself.

New work and changes made by other processes arrive here (SPEC §8, "Wakeups"): the store sends
`pg_notify(channel, payload)` inside the transaction that made the change, so a notification
is only ever seen for committed work, and PostgreSQL delivers one notification per distinct
(channel, payload) per transaction — a group commit of a thousand rows wakes each process once.

The connection is not taken from the pool: a pooled connection is handed to other work between
statements, and a LISTEN must stay registered for the life of the process. When the connection
is lost (database restart, network, `pg_terminate_backend`), notifications sent meanwhile are
gone for good, so every (re)connection calls `on_connect`: whoever listens must then catch up
(reload what it caches, look for due work) instead of trusting that it missed nothing. Reconnect
attempts back off exponentially with full jitter, so that the processes of a fleet do not all
reconnect in the same instant after a database restart. A periodic ping notices a connection
that died without a word (a partition, a dropped NAT entry).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Mapping

import asyncpg
import structlog

log = structlog.get_logger("pusherd.store")

Handler = Callable[[str], None]  # called with the payload, on the event loop


class Listener:
    """The process's one LISTEN connection: handlers per channel, reconnects on its own."""

    def __init__(
        self,
        url: str,
        handlers: Mapping[str, Handler],
        on_connect: Callable[[], None] = lambda: None,
        *,
        min_backoff_s: float = 0.05,
        max_backoff_s: float = 5.0,
        ping_s: float = 10.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.url = url
        self.handlers = dict(handlers)
        self.on_connect = on_connect
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.ping_s = ping_s
        self._rng = rng
        self.connected = asyncio.Event()  # set while LISTENing (tests and health checks)
        self.backend_pid: int | None = None  # the server process serving the connection
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._was_up = False

    def start(self) -> None:
        """Start connecting and listening in the background (returns at once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop listening and close the connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.connected.clear()

    def backoff_s(self, failures: int) -> float:
        """Delay before reconnect attempt number `failures` (0-based): full jitter."""
        ceiling = min(self.max_backoff_s, self.min_backoff_s * 2.0**failures)
        return ceiling * self._rng()

    async def _run(self) -> None:
        failures = 0
        while True:
            self._was_up = False
            try:
                await self._listen()
            except Exception as exc:  # any failure means: reconnect later, never give up
                log.warning("pg_listen_failed", error=f"{type(exc).__name__}: {exc}")
            if self._was_up:
                failures = 0  # it was up: a new loss starts the back-off from the bottom
            await asyncio.sleep(self.backoff_s(failures))
            failures += 1

    async def _listen(self) -> None:
        self._lost.clear()
        conn = await asyncpg.connect(
            self.url, timeout=self.ping_s, server_settings={"application_name": "pusherd-listen"}
        )
        try:
            conn.add_termination_listener(lambda _conn: self._lost.set())
            for channel in self.handlers:
                await conn.add_listener(channel, self._notified)
            self._conn = conn
            self.backend_pid = conn.get_server_pid()
            self.connected.set()
            self._was_up = True
            log.info("pg_listen_connected", channels=sorted(self.handlers))
            try:
                self.on_connect()
            except Exception:
                log.exception("pg_listen_on_connect_failed")
            while not self._lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), self.ping_s)
                if not self._lost.is_set():
                    await conn.fetchval("SELECT 1", timeout=self.ping_s)
            log.warning("pg_listen_lost")
        finally:
            self.connected.clear()
            self._conn = None
            conn.terminate()

    def _notified(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        handler = self.handlers.get(channel)
        if handler is None:
            return
        try:
            handler(str(payload))
        except Exception:
            # A handler's bug must not take the listener down with it.
            log.exception("pg_notification_failed", channel=channel)
