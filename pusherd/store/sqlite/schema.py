"""The SQLite file's schema: PRAGMAs every connection sets, the schema version and migrations."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

import structlog

from pusherd.store.errors import SchemaTooNewError
from pusherd.store.migrations import read_migrations
from pusherd.store.sqlite.queues import register_functions

log = structlog.get_logger("pusherd.store")

BUSY_TIMEOUT_MS = 5000


def migrations() -> list[tuple[int, str]]:
    """Ordered (version, sql) pairs from store/sqlite/migrations/NNNN_name.sql."""
    return read_migrations("pusherd.store.sqlite")


def latest_version() -> int:
    """The schema version this pusherd writes."""
    return len(migrations())


def configure(conn: sqlite3.Connection) -> None:
    """PRAGMAs for every connection: WAL, full fsync on commit, a busy timeout."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")


def check_version(conn: sqlite3.Connection) -> int:
    """The file's schema version; SchemaTooNewError if a newer pusherd wrote it."""
    current = int(conn.execute("PRAGMA user_version").fetchone()[0])
    supported = latest_version()
    if current > supported:
        raise SchemaTooNewError(
            f"database schema version {current} is newer than this pusherd supports "
            f"({supported}); upgrade pusherd or restore a backup — the file was not changed"
        )
    return current


def migrate(conn: sqlite3.Connection, target: int | None = None) -> int:
    """Apply pending migrations in order (each in its own transaction); return the version."""
    steps = migrations()
    target = len(steps) if target is None else target
    current = check_version(conn)
    register_functions(conn)
    for version, sql in steps[current:target]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("schema_migrated", version=version)
    return max(current, target)


def _statements(sql: str) -> Iterable[str]:
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf
            buf = ""
    if buf.strip() and not buf.strip().startswith("--"):
        yield buf


def connect_sync(path: str | Path) -> sqlite3.Connection:
    """A configured, migrated autocommit connection (CLI commands and the writer use this)."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        # Before configure(): switching a newer file to WAL would already change it.
        check_version(conn)
        configure(conn)
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn
