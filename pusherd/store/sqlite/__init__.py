"""The SQLite backend: one file, one group-committing writer, migrations/*.sql, plain SQL."""

from __future__ import annotations

import sqlite3

from pusherd.store.changes import Change, ChangeFeed
from pusherd.store.console import ConsoleStore
from pusherd.store.errors import StoreError
from pusherd.store.ids import IdSource
from pusherd.store.sqlite.claims import ClaimStore
from pusherd.store.sqlite.console import SqliteConsoleStore
from pusherd.store.sqlite.db import Database
from pusherd.store.sqlite.deliveries import DeliveryStore
from pusherd.store.sqlite.events import EventStore
from pusherd.store.sqlite.ops import BackupStore
from pusherd.store.sqlite.records import RecordStore
from pusherd.store.sqlite.subscriptions import SubscriptionStore
from pusherd.store.sqlite.tokens import TokenStore
from pusherd.store.sqlite.wake import WakeListener, send_wake


class SqliteStore(
    TokenStore, EventStore, SubscriptionStore, ClaimStore, RecordStore, DeliveryStore, BackupStore
):
    """The SQLite implementation of Store."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.ids = IdSource()
        self.targets_cache = {}
        self.ingest_group = None
        self.taker = None
        self._records = []
        self.changes = ChangeFeed()  # in-process on SQLite (and a wake-up across, wake.py)
        self._wake: WakeListener | None = None
        self.console: ConsoleStore = SqliteConsoleStore(db)
        # Writes of this process forget cached fan-out targets inside the write itself (a later
        # write of the same group commit must not see a stale list); the feed does it for the
        # rest, as it will for changes made by another process on PostgreSQL.
        self.changes.subscribe(self._changed)

    def _changed(self, change: Change) -> None:
        if change.kind.startswith("subscription_") and change.organization:
            self.targets_cache.pop(change.organization, None)

    def subscriptions_changed(self, organization: str) -> None:
        """Forget an organization's cached fan-out targets (inside the write that changed it)."""
        self.targets_cache.pop(organization, None)

    def connect_processes(self) -> None:
        """Carry deliveries queued by one process to the daemon serving the file: the daemon's
        store (background) listens, a command's store tells it (see wake.py)."""
        if self.db.background:
            self._wake = WakeListener(
                self.db.path, lambda: self.changes.announce(Change("deliveries_queued"))
            )
        else:
            path = self.db.path
            self.changes.subscribe(
                lambda c: send_wake(path) if c.kind == "deliveries_queued" else None
            )

    async def close(self) -> None:
        """Flush and close the database."""
        if self._wake is not None:
            self._wake.close()
        await self.db.close()


async def open_sqlite(path: str, *, background: bool = True) -> SqliteStore:
    """Open (creating and migrating if needed) the SQLite file."""
    db = Database(path, background=background)
    try:
        await db.open()
    except StoreError:
        await db.close()
        raise
    except (sqlite3.Error, OSError) as exc:
        await db.close()
        raise StoreError(f"cannot open database {path}: {exc}") from None
    store = SqliteStore(db)
    store.connect_processes()
    return store


__all__ = ["Database", "SqliteStore", "open_sqlite"]
