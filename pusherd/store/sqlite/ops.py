"""Backups of the database file (SQLite's online backup API, off the event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from pathlib import Path

from pusherd.store.errors import StoreError
from pusherd.store.sqlite.db import Database
from pusherd.store.sqlite.schema import BUSY_TIMEOUT_MS
from pusherd.store.types import BackupSummary


class BackupStore:
    """Backups (mixed into SqliteStore)."""

    db: Database

    async def backup(self, dest: str | os.PathLike[str]) -> BackupSummary:
        """A consistent copy of the database at dest (FileExistsError rather than overwrite)."""
        return await asyncio.to_thread(_backup, self.db.path, dest)


def _backup(path: str, dest: str | os.PathLike[str]) -> BackupSummary:
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            return backup_to(conn, dest)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(str(exc)) from None


def backup_to(conn: sqlite3.Connection, dest: str | os.PathLike[str]) -> BackupSummary:
    """Copy the database to dest with SQLite's online backup; never overwrites dest.

    The copy is taken in one step, i.e. from one read snapshot: in WAL mode the daemon keeps
    writing meanwhile, and the copy is exactly the state of one moment. It is written next to
    dest under a temporary name, synced, and then hard-linked into place, which fails
    (FileExistsError) instead of replacing a file that appeared in the meantime.
    """
    target = Path(dest)
    if target.exists() or target.is_symlink():
        raise FileExistsError(str(target))
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    try:
        out = sqlite3.connect(str(partial), isolation_level=None)
        try:
            conn.backup(out, pages=-1)
            # A self-contained single file: no -wal beside it is needed to read it.
            out.execute("PRAGMA journal_mode = DELETE")
            summary = _summarise(out, target)
        finally:
            out.close()
        with open(partial, "rb") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(partial, target)
        except FileExistsError:
            raise
        except OSError:
            # No hard links on this file system: a rename, after one last check.
            if target.exists():
                raise FileExistsError(str(target)) from None
            os.rename(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    _fsync_dir(target.parent)
    return BackupSummary(**{**summary.__dict__, "size_bytes": target.stat().st_size})


def _summarise(conn: sqlite3.Connection, target: Path) -> BackupSummary:
    def count(sql: str) -> int:
        return int(conn.execute(sql).fetchone()[0])

    return BackupSummary(
        path=str(target),
        size_bytes=0,
        schema_version=count("PRAGMA user_version"),
        subscriptions=count("SELECT count(*) FROM subscriptions WHERE deleted_ms IS NULL"),
        events=count("SELECT count(*) FROM events"),
        deliveries=count("SELECT count(*) FROM deliveries"),
        pending=count("SELECT count(*) FROM deliveries WHERE status = 'pending'"),
    )


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
