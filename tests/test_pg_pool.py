"""The store's pool: durable sessions, and a lost database as StoreError until it is back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import asyncpg
import pytest

from pusherd.store import StoreError
from pusherd.store.postgres.pool import Pool
from tests.pg import PgServer, launch_or_skip


async def test_sessions_commit_durably_whatever_the_database_default(
    pg_server: PgServer, pg_database: str
) -> None:
    # An operator (or a managed service) may default synchronous_commit to off: an ingest
    # acknowledged by pusherd must still be on disk.
    pg_server.psql("postgres", f"ALTER DATABASE {pg_database} SET synchronous_commit = off")
    raw = await asyncpg.connect(pg_server.url(pg_database))
    assert await raw.fetchval("SHOW synchronous_commit") == "off"
    await raw.close()
    pool = Pool(pg_server.url(pg_database), max_size=2)
    await pool.open()
    try:
        assert await pool.fetchval("SHOW synchronous_commit") == "on"
        async with pool.transaction() as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
        names = await pool.fetch(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
        )
        assert {r[0] for r in names} == {"pusherd"}
    finally:
        await pool.close()


async def test_a_failed_transaction_is_rolled_back(pg_url: str) -> None:
    pool = Pool(pg_url)
    await pool.open()
    try:
        await pool.execute("CREATE TABLE t (v integer PRIMARY KEY)")
        with pytest.raises(asyncpg.UniqueViolationError):
            async with pool.transaction() as conn:
                await conn.execute("INSERT INTO t VALUES (1)")
                await conn.execute("INSERT INTO t VALUES (1)")
        assert await pool.fetchval("SELECT count(*) FROM t") == 0
    finally:
        await pool.close()


@pytest.fixture
def own_server() -> Iterator[PgServer]:
    """A server of this test's own, to stop and start without disturbing the others."""
    server = launch_or_skip()
    yield server
    server.cleanup()


async def test_a_lost_database_is_store_error_and_the_pool_recovers_by_itself(
    own_server: PgServer,
) -> None:
    pool = Pool(own_server.url(), max_size=4)
    await pool.open(connect_timeout_s=2)
    try:
        await asyncio.gather(*(pool.fetchval("SELECT pg_sleep(0.05)") for _ in range(4)))
        await asyncio.to_thread(own_server.stop)
        # Down: every statement fails as StoreError (-> 503), promptly, never a raw driver error.
        for _ in range(3):
            t = time.monotonic()
            with pytest.raises(StoreError, match="database unavailable"):
                await pool.fetchval("SELECT 1")
            assert time.monotonic() - t < 5
        with pytest.raises(StoreError):
            async with pool.transaction() as conn:
                await conn.execute("SELECT 1")
        await asyncio.to_thread(own_server.run)
        # Back: the same pool serves again, without being reopened.
        deadline = time.monotonic() + 20
        while True:
            try:
                assert await pool.fetchval("SELECT 41 + 1") == 42
                break
            except StoreError:
                assert time.monotonic() < deadline, "the pool never recovered"
                await asyncio.sleep(0.05)
        results = await asyncio.gather(*(pool.fetchval("SELECT 1") for _ in range(8)))
        assert results == [1] * 8
    finally:
        await pool.close()


async def test_opening_without_a_database_is_store_error(own_server: PgServer) -> None:
    await asyncio.to_thread(own_server.stop)
    pool = Pool(own_server.url())
    with pytest.raises(StoreError, match="database unavailable"):
        await pool.open(connect_timeout_s=2)
