"""Operator commands on the database file (replay, backup), as plain synchronous functions.

The CLI runs them through `connect_sync` next to a running daemon: SQLite's locking and WAL make
that safe, and the daemon's dispatcher picks re-queued rows up on its next poll.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from pusherd.store.db import transaction
from pusherd.store.deliveries import requeue_finished


@dataclass(frozen=True)
class SubscriptionState:
    """What replay needs to know about a subscription."""

    uuid: str
    organization: str
    status: str


@dataclass(frozen=True)
class BackupSummary:
    """What `pusherd backup` reports."""

    path: str
    size_bytes: int
    schema_version: int
    subscriptions: int
    events: int
    deliveries: int
    pending: int


def find_subscription(conn: sqlite3.Connection, uuid: str) -> SubscriptionState | None:
    """A subscription that is not deleted, or None."""
    row = conn.execute(
        "SELECT uuid, organization, status FROM subscriptions"
        " WHERE uuid = ? AND deleted_ms IS NULL",
        (uuid,),
    ).fetchone()
    return None if row is None else SubscriptionState(row[0], row[1], row[2])


def replay_deliveries(
    conn: sqlite3.Connection, subscription: str, since_ms: int | None, status: str | None
) -> int:
    """Re-queue a subscription's finished deliveries in a transaction of its own."""
    with transaction(conn):
        count = requeue_finished(conn, subscription, since_ms, status)
    return count


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
