"""PostgreSQL schema: migrating from zero, the SQLite columns, refusing newer, concurrent starts."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import sys
import time
from pathlib import Path

import asyncpg
import pytest

import pusherd.store
from pusherd.store import SchemaTooNewError
from pusherd.store.postgres.migrate import (
    MIGRATION_LOCK,
    latest_version,
    migrate,
    migrations,
    schema_version,
)

TABLES = {
    "tokens",
    "subscriptions",
    "events",
    "deliveries",
    "attempts",
    "queues",
    "rate_windows",
    "console_links",
    "console_sessions",
}


async def _tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r[0] for r in rows}


def test_migrations_are_numbered_without_gaps() -> None:
    steps = migrations()
    assert [v for v, _ in steps] == list(range(1, len(steps) + 1))
    assert latest_version() == len(steps) >= 1


async def test_migrating_from_zero_creates_the_schema_once(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        assert await schema_version(conn) == 0
        assert await migrate(conn) == latest_version()
        assert await schema_version(conn) == latest_version()
        assert await _tables(conn) == TABLES | {"pusherd_schema"}
        # A second start finds nothing to do and changes nothing.
        assert await migrate(conn) == latest_version()
        versions = [r[0] for r in await conn.fetch("SELECT version FROM pusherd_schema")]
        assert sorted(versions) == list(range(1, latest_version() + 1))
    finally:
        await conn.close()


def _sqlite_columns(tmp_path: Path) -> dict[str, set[str]]:
    """Columns of the SQLite schema, built from its own migration files (wherever they live)."""
    root = Path(pusherd.store.__file__).parent
    files = sorted(
        (p for p in root.glob("**/migrations/*.sql") if "postgres" not in p.parts),
        key=lambda p: p.name,
    )
    assert files
    db = sqlite3.connect(tmp_path / "schema.sqlite3")
    # Registered by the SQLite store's migrating connection; its value does not matter here.
    db.create_function("pusherd_origin", 1, lambda destination: destination)
    for f in files:
        db.executescript(f.read_text())
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    out = {
        t: {r[1] for r in db.execute(f"PRAGMA table_info({t})")}
        for t in names
        if not t.startswith("sqlite_")
    }
    db.close()
    return out


async def test_schema_holds_every_sqlite_column(pg_url: str, tmp_path: Path) -> None:
    # copy-storage moves every row of every SQLite table across: each column needs a home.
    conn = await asyncpg.connect(pg_url)
    try:
        await migrate(conn)
        rows = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public'"
        )
    finally:
        await conn.close()
    pg: dict[str, set[str]] = {}
    for table, column in rows:
        pg.setdefault(table, set()).add(column)
    for table, columns in _sqlite_columns(tmp_path).items():
        assert table in pg, table
        assert columns <= pg[table], (table, columns - pg[table])


async def test_a_newer_schema_is_refused_untouched(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "CREATE TABLE pusherd_schema (version integer PRIMARY KEY, applied_ms bigint NOT NULL);"
            f" INSERT INTO pusherd_schema VALUES ({latest_version() + 1}, 0)"
        )
        with pytest.raises(SchemaTooNewError, match="newer than this pusherd supports"):
            await migrate(conn)
        assert await _tables(conn) == {"pusherd_schema"}  # nothing was created
        # The lock was given back: another process is not left waiting for it.
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK)
    finally:
        await conn.close()


_MIGRATE = """
import asyncio, sys
from pusherd.store.postgres.migrate import migrate_url
print(asyncio.run(migrate_url(sys.argv[1])))
"""


async def _waiting_for_lock(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    )


async def test_processes_starting_at_once_migrate_exactly_once(pg_url: str) -> None:
    holder = await asyncpg.connect(pg_url)
    procs: list[asyncio.subprocess.Process] = []
    try:
        # Hold the lock so that both processes are surely inside migrate() at the same time.
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        for _ in range(2):
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    _MIGRATE,
                    pg_url,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            )
        deadline = time.monotonic() + 30
        while await _waiting_for_lock(holder) < 2:
            assert time.monotonic() < deadline, "the processes never waited for the lock"
            await asyncio.sleep(0.02)
        assert await _tables(holder) == set()  # neither went ahead without the lock
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
        for p, (out, err) in zip(procs, outputs, strict=True):
            assert p.returncode == 0, err.decode()
            assert out.decode().split()[-1] == str(latest_version())
        # One process applied each file; the other found the work done (structlog's stdout).
        applied = sum(out.decode().count("schema_migrated") for out, _ in outputs)
        assert applied == latest_version()
        assert await _tables(holder) == TABLES | {"pusherd_schema"}
        rows = await holder.fetch("SELECT version FROM pusherd_schema ORDER BY version")
        assert [r[0] for r in rows] == list(range(1, latest_version() + 1))
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await holder.close()


def _plan_text(rows: list[asyncpg.Record]) -> str:
    return re.sub(r"\s+", " ", " ".join(r[0] for r in rows))


async def test_claiming_in_due_order_is_an_index_range(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await migrate(conn)
        await conn.execute("SET enable_seqscan = off")  # an empty table: ask for what is usable
        queues = await conn.fetch(
            "EXPLAIN SELECT subscription FROM queues WHERE next_due_ms <= 1"
            " ORDER BY next_due_ms, subscription LIMIT 10 FOR UPDATE SKIP LOCKED"
        )
        assert "queues_due" in _plan_text(queues)
        assert "Sort" not in _plan_text(queues)  # due order comes from the index itself
        due = await conn.fetch(
            "EXPLAIN SELECT id FROM deliveries WHERE subscription = 's' AND status = 'pending'"
            " AND due_ms <= 1 ORDER BY due_ms, id LIMIT 8 FOR UPDATE SKIP LOCKED"
        )
        assert "deliveries_due" in _plan_text(due)
        assert "Sort" not in _plan_text(due)
        leased = await conn.fetch(
            "EXPLAIN SELECT count(*) FROM deliveries WHERE origin = 'o' AND status = 'pending'"
            " AND lease_owner IS NOT NULL AND lease_until_ms > 1"
        )
        assert "deliveries_leased" in _plan_text(leased)
    finally:
        await conn.close()
