"""`pusherd copy-storage`: an SQLite installation moved into an empty PostgreSQL database.

Everything is copied with its ids (tokens, subscriptions, events, deliveries in whatever state,
their attempts, and the console's sign-in links that can still be used), in one PostgreSQL
transaction: the target gets all of it or nothing. Console sessions are not copied: whoever
was signed in signs in again (their cookies name rows of the old database). The
SQLite file is only read. Run with the daemon stopped: leases it held are dropped (their rows
stay due when the lease would have ended), and the claim queues are built from the copied
rows. Public ids go on where SQLite's left off, never handing one out twice.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
from yarl import URL

from pusherd.clock import now_ms
from pusherd.store import StoreError
from pusherd.store.postgres.migrate import migrate

TABLES = ("tokens", "subscriptions", "events", "deliveries", "attempts", "console_links")
# Rows not worth moving: a used or expired sign-in link signs nobody in any more.
WHERE = {"console_links": "used_ms IS NULL AND expires_ms > :now"}
# Identity columns, moved past the largest id SQLite gave (its AUTOINCREMENT high-water mark
# included: a purged delivery's id must not come back).
IDENTITIES = {"events": "seq", "deliveries": "id", "attempts": "id"}
BATCH = 5_000


class CopyRefusedError(StoreError):
    """The target is not empty, or the source holds something this pusherd cannot copy."""


def origin_of(destination: str) -> str:
    """scheme://host:port of a destination: the same rule as the dispatcher's origins."""
    try:
        u = URL(destination)
        return f"{u.scheme}://{u.host}:{u.port}"
    except (ValueError, TypeError):
        return destination


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "bigint": int,
    "integer": int,
    "double precision": float,
    "text": str,
}


async def _pg_columns(conn: asyncpg.Connection, table: str) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = $1",
        table,
    )
    return {r["column_name"]: r["data_type"] for r in rows}


def _rows(
    src: sqlite3.Connection, table: str, columns: list[str], convert: list[Callable[[Any], Any]]
) -> Iterator[list[tuple[Any, ...]]]:
    where = f" WHERE {WHERE[table]}" if table in WHERE else ""
    cur = src.execute(
        f"SELECT {', '.join(columns)} FROM {table}{where} ORDER BY rowid",
        {"now": now_ms()} if where else {},
    )
    while batch := cur.fetchmany(BATCH):
        yield [
            tuple(None if v is None else f(v) for v, f in zip(row, convert, strict=True))
            for row in batch
        ]


async def copy_sqlite(source: str | Path, url: str) -> dict[str, int]:
    """Copy the SQLite database at source into the (empty) PostgreSQL database at url.

    Returns the number of rows copied per table. CopyRefusedError if the target holds any
    pusherd data, or the source has a table or column PostgreSQL has no place for.
    """
    src = sqlite3.connect(f"file:{Path(source)}?mode=ro", uri=True)
    try:
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
            return await _copy(src, conn)
        finally:
            await conn.close()
    finally:
        src.close()


async def _copy(src: sqlite3.Connection, conn: asyncpg.Connection) -> dict[str, int]:
    known = {r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    origins = {
        uuid: origin_of(destination)
        for uuid, destination in src.execute("SELECT uuid, destination FROM subscriptions")
    }
    copied: dict[str, int] = {}
    async with conn.transaction():
        # Two copies into one database at once: the second waits, then finds it not empty.
        await conn.execute(
            "LOCK TABLE tokens, subscriptions, events, deliveries, console_links IN EXCLUSIVE MODE"
        )
        for table in (*TABLES, "queues"):
            if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
                raise CopyRefusedError(
                    f"the target database is not empty (table {table} has rows); "
                    "copy-storage only copies into an empty database"
                )
        for table in TABLES:
            if table not in known:
                copied[table] = 0
                continue
            pg = await _pg_columns(conn, table)
            columns = [r[1] for r in src.execute(f"PRAGMA table_info({table})")]
            missing = [c for c in columns if c not in pg]
            if missing:
                raise CopyRefusedError(
                    f"the SQLite table {table} has columns this pusherd cannot copy: {missing}"
                    " (is the file from a newer pusherd?)"
                )
            targets = list(columns)
            convert = [_CONVERT.get(pg[c], lambda v: v) for c in columns]
            if table == "deliveries":
                targets.append("origin")
                convert.append(str)
            copied[table] = 0
            for batch in _rows(src, table, columns, convert[: len(columns)]):
                if table == "deliveries":
                    sub = columns.index("subscription")
                    batch = [(*row, origins.get(row[sub], "")) for row in batch]
                await conn.copy_records_to_table(table, records=batch, columns=targets)
                copied[table] += len(batch)
        await _after_copy(src, conn)
    return copied


async def _after_copy(src: sqlite3.Connection, conn: asyncpg.Connection) -> None:
    # The daemon is stopped: nobody holds a lease any more. Rows keep their due time (a leased
    # row's is its lease's end), so they go out as they would have after a restart.
    await conn.execute(
        "UPDATE deliveries SET lease_owner = NULL, lease_until_ms = NULL"
        " WHERE lease_owner IS NOT NULL"
    )
    try:
        high_water = dict(src.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
    except sqlite3.OperationalError:  # no AUTOINCREMENT table has had a row yet
        high_water = {}
    for table, column in IDENTITIES.items():
        top = max(
            int(await conn.fetchval(f"SELECT coalesce(max({column}), 0) FROM {table}")),
            int(high_water.get(table, 0) or 0),
        )
        if top > 0:
            await conn.execute(
                "SELECT setval(pg_get_serial_sequence($1, $2), $3)", table, column, top
            )
    subs = await conn.fetch(
        "SELECT uuid, destination FROM subscriptions"
        " WHERE deleted_ms IS NULL AND status <> 'DISABLED'"
    )
    await conn.executemany(
        "INSERT INTO queues (subscription, origin, next_due_ms) VALUES ($1, $2,"
        " (SELECT min(due_ms) FROM deliveries WHERE subscription = $1 AND status = 'pending'))",
        [(r["uuid"], origin_of(r["destination"])) for r in subs],
    )
