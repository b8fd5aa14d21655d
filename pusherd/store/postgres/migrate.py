"""Schema migrations on PostgreSQL: plain SQL files applied in order under an advisory lock.

Several pusherd processes may start at once on one database. Each takes the same session-level
advisory lock before it reads the schema version, so exactly one of them applies the pending
files while the others wait, then find nothing left to do. A file and the row recording its
version commit together, so a crash mid-migration leaves the previous version intact. A database
written by a newer pusherd is refused untouched, as with SQLite.
"""

from __future__ import annotations

import time

import asyncpg
import structlog

from pusherd.store import SchemaTooNewError
from pusherd.store.migrations import read_migrations

log = structlog.get_logger("pusherd.store")

# The advisory lock key (any bigint agreed by every pusherd): the first 8 bytes of
# sha256("pusherd.migrations") as a signed integer, far from the small keys applications pick.
MIGRATION_LOCK = -3223229714890082916

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS pusherd_schema (
    version     integer PRIMARY KEY,
    applied_ms  bigint NOT NULL
)
"""


def migrations() -> list[tuple[int, str]]:
    """Ordered (version, sql) pairs from store/postgres/migrations/NNNN_name.sql."""
    return read_migrations("pusherd.store.postgres")


def latest_version() -> int:
    """The schema version this pusherd writes."""
    return len(migrations())


async def schema_version(conn: asyncpg.Connection) -> int:
    """The database's schema version (0: nothing of pusherd's there yet)."""
    exists = await conn.fetchval("SELECT to_regclass('pusherd_schema') IS NOT NULL")
    if not exists:
        return 0
    version = await conn.fetchval("SELECT coalesce(max(version), 0) FROM pusherd_schema")
    return int(version)


async def migrate(conn: asyncpg.Connection, target: int | None = None) -> int:
    """Apply pending migrations in order (each in its own transaction); return the version.

    Raises SchemaTooNewError, changing nothing, when a newer pusherd wrote the database.
    """
    steps = migrations()
    target = len(steps) if target is None else target
    # Session-level, not transaction-level: it must span the version check and every file.
    # If this process dies while holding it, the server releases it with the connection.
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        current = await schema_version(conn)
        if current > len(steps):
            raise SchemaTooNewError(
                f"database schema version {current} is newer than this pusherd supports "
                f"({len(steps)}); upgrade pusherd or restore a backup — nothing was changed"
            )
        if current < target:
            await conn.execute(_VERSION_TABLE)
        for version, sql in steps[current:target]:
            async with conn.transaction():
                await conn.execute(sql)  # no arguments: the simple protocol runs every statement
                await conn.execute(
                    "INSERT INTO pusherd_schema (version, applied_ms) VALUES ($1, $2)",
                    version,
                    time.time_ns() // 1_000_000,
                )
            log.info("schema_migrated", version=version)
        return max(current, target)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


async def migrate_url(url: str) -> int:
    """Connect to url, migrate, disconnect: what start-up and every CLI command run first."""
    conn = await asyncpg.connect(url)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
