"""PostgresStore: the Store interface on PostgreSQL, shared by any number of processes (SPEC §8).

One asyncpg pool for statements, one dedicated LISTEN connection for wake-ups and changes
made by other processes, migrations applied at open under an advisory lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import asyncpg

from pusherd.ratelimit import Verdict, shared_verdict
from pusherd.store.changes import Change, ChangeFeed
from pusherd.store.console import ConsoleStore
from pusherd.store.errors import StoreError
from pusherd.store.ids import IdSource
from pusherd.store.postgres import ratelimit
from pusherd.store.postgres.console import PostgresConsoleStore
from pusherd.store.postgres.dbclock import DbClock
from pusherd.store.postgres.directory import Directory
from pusherd.store.postgres.feed import CHANGE_CHANNEL, WAKE_CHANNEL, RemoteChanges
from pusherd.store.postgres.ingest import GroupWriter
from pusherd.store.postgres.listener import Listener
from pusherd.store.postgres.log import Log
from pusherd.store.postgres.migrate import migrate
from pusherd.store.postgres.pool import Pool, translated
from pusherd.store.postgres.queue import Queue, Target
from pusherd.store.postgres.records import PendingRecord, Records
from pusherd.store.postgres.vacuum import Vacuum
from pusherd.store.types import Taker

# With no per_destination given (tools, tests), the claim caps nothing beyond the caller's room.
UNLIMITED = 2**31 - 1
LISTEN_WAIT_S = 5.0


class PostgresStore(Directory, Queue, Records, Log):
    """The PostgreSQL implementation of Store."""

    def __init__(self, pool: Pool, *, per_destination: int = UNLIMITED) -> None:
        self.pool = pool
        self.clock = DbClock()  # every time in the queue is on the database's clock
        # Names this store in its notifications: its own echo is ignored.
        self.sender = secrets.token_hex(8)
        self.ids = IdSource()
        self.writer = GroupWriter(pool, self.ids, self.sender)
        self.per_destination = self.writer.per_destination = per_destination
        self.targets_cache: dict[str, list[Target]] = {}
        self.leases: dict[int, int] = {}
        self._records: list[PendingRecord] = []
        self._recorder: asyncio.Task[None] | None = None
        self.vacuum = Vacuum(pool)
        self.taker: Taker | None = None
        self.changes = ChangeFeed()
        self.changes.subscribe(self._changed)
        self.listener: Listener | None = None
        self._console = PostgresConsoleStore(pool)

    @property
    def console(self) -> ConsoleStore:
        """The web console's reads and sign-in links (store/postgres/console.py)."""
        return self._console

    def _changed(self, change: Change) -> None:
        # Fan-out targets of an organization change with its subscriptions; a change without
        # an organization (a reconnect of the listener) drops them all.
        if change.kind.startswith("subscription_"):
            if change.organization:
                self.targets_cache.pop(change.organization, None)
            else:
                self.targets_cache.clear()

    async def listen(self) -> None:
        """Start the LISTEN connection; returns once it listens (or after LISTEN_WAIT_S, the
        listener then keeps trying on its own)."""
        remote = RemoteChanges(self.sender, self.changes)
        self.listener = Listener(
            self.pool.url,
            {CHANGE_CHANNEL: remote.on_change, WAKE_CHANNEL: remote.on_wake},
            remote.on_connect,
        )
        self.listener.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.listener.connected.wait(), LISTEN_WAIT_S)

    async def rate_hit(self, organization: str, per_minute: int, per_hour: int) -> Verdict:
        """One API request against the organization's limits, counted for every process."""
        # The windows are the database clock's minutes and hours, the same for every process.
        now = self.clock.now_ms()
        c = await ratelimit.hit(self.pool, organization, now, per_minute, per_hour)
        return shared_verdict(
            now,
            c.allowed,
            (
                (per_minute, c.minute_hits, c.minute_start_ms, 60_000),
                (per_hour, c.hour_hits, c.hour_start_ms, 3_600_000),
            ),
        )

    async def close(self) -> None:
        """Finish the records in progress, stop listening and close the pool."""
        if self._recorder is not None:
            await asyncio.gather(self._recorder, return_exceptions=True)
        await self.vacuum.close()
        if self.listener is not None:
            await self.listener.close()
            self.listener = None
        await self.pool.close()


async def open_postgres(
    url: str, *, background: bool = True, per_destination: int | None = None
) -> PostgresStore:
    """Connect, migrate (under the migrations lock) and, for a daemon, listen."""
    try:
        with translated():
            conn = await asyncpg.connect(url)
            try:
                await migrate(conn)
            finally:
                await conn.close()
    except asyncpg.PostgresError as exc:
        raise StoreError(f"cannot open database: {exc}") from None
    pool = Pool(url)
    await pool.open()
    store = PostgresStore(pool, per_destination=per_destination or UNLIMITED)
    try:
        await store.clock.measure(pool)
    except BaseException:
        await pool.close()
        raise
    if background:
        await store.listen()
    return store
