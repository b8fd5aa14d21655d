"""The connection pool of the PostgreSQL store, and what a lost database looks like to callers.

Every statement runs on a pooled autocommit connection (a single statement is its own
transaction: one round trip, one WAL flush) or inside `transaction()`. When the database cannot
be reached — restarting, shut down, network gone, too many connections — the caller gets
StoreError, the same error the SQLite store raises when it cannot commit: ingest answers 503,
delivery pauses. Nothing is retried here, because only the caller knows whether a statement is
safe to repeat; once the server is back the pool opens fresh connections by itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import structlog

from pusherd.store import StoreError

log = structlog.get_logger("pusherd.store")

# Every session pusherd opens: acknowledged means committed to disk (SPEC §8), whatever the
# server's or the role's default, and pusherd's connections are recognisable in pg_stat_activity.
SERVER_SETTINGS = {"application_name": "pusherd", "synchronous_commit": "on"}

# "The database is not there right now", as opposed to "this statement is wrong".
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable
    TimeoutError,  # connect or statement timeout
    asyncpg.PostgresConnectionError,  # class 08, and a connection closed mid-statement
    asyncpg.exceptions.OperatorInterventionError,  # 57P: shutting down, starting up, terminated
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.InterfaceError,  # the connection was closed under us
    # The driver lost track of the connection's protocol state: seen when the server's
    # "terminating connection" arrives as a statement starts (a restart). The connection is
    # dropped (see Pool._connection), so the next statement gets a fresh one.
    asyncpg.exceptions.InternalClientError,
)


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Turn the database being unreachable into StoreError (503, not 500)."""
    try:
        yield
    except UNAVAILABLE as exc:
        log.warning("pg_unavailable", error=f"{type(exc).__name__}: {exc}")
        raise StoreError(f"database unavailable: {exc}") from exc


async def _keep_session(_conn: object) -> None:
    """Release without asyncpg's reset query (RESET ALL, UNLISTEN *, unlock all, ...): it
    would cost a round trip per statement, and pusherd leaves no session state behind
    (advisory locks are transaction-scoped; LISTEN has a connection of its own)."""


class Pool:
    """The store's pooled connections (asyncpg)."""

    # min_size 0: connections open on demand and stay open while used. With a floor, asyncpg
    # logs a traceback for every failed attempt to restore it while the database is down.
    def __init__(self, url: str, *, min_size: int = 0, max_size: int = 10) -> None:
        self.url = url
        self.min_size = min_size
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None

    async def open(self, connect_timeout_s: float = 5.0) -> None:
        """Connect (StoreError when the database cannot be reached)."""
        with translated():
            pool = await asyncpg.create_pool(
                self.url,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=connect_timeout_s,
                server_settings=SERVER_SETTINGS,
                reset=_keep_session,
            )
            try:
                await pool.fetchval("SELECT 1")  # fail now, not at the first request
            except BaseException:
                await pool.close()
                raise
            self._pool = pool

    async def close(self) -> None:
        """Close every connection (waits for statements in progress)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("database is not open")
        return self._pool

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        """A pooled connection, dropped instead of reused when a statement on it failed for
        any reason but a plain SQL error: its state is then unknown, and asyncpg's release
        (without the reset query) would hand it to the next statement as it is."""
        with translated():
            async with self.pool.acquire() as conn:
                try:
                    yield conn
                except BaseException as exc:
                    if not isinstance(exc, asyncpg.PostgresError) or isinstance(exc, UNAVAILABLE):
                        conn.terminate()
                    raise

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Rows of one autocommit statement."""
        async with self._connection() as conn:
            return list(await conn.fetch(sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row of one autocommit statement."""
        async with self._connection() as conn:
            return await conn.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> str:
        """One autocommit statement; its status tag ("UPDATE 3")."""
        async with self._connection() as conn:
            return await conn.execute(sql, *args)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        """A connection inside BEGIN … COMMIT (ROLLBACK on error)."""
        async with self._connection() as conn, conn.transaction():
            yield conn
