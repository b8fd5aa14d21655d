"""The only package that speaks SQL. API and delivery code use `Store` (a Protocol)."""

from __future__ import annotations

from pusherd.store.base import Store
from pusherd.store.console_sqlite import SqliteConsoleStore
from pusherd.store.db import Database, SchemaTooNewError, StoreError
from pusherd.store.deliveries import DeliveryStore
from pusherd.store.events import EventStore
from pusherd.store.ids import IdSource
from pusherd.store.subscriptions import SubscriptionStore, UuidTakenError
from pusherd.store.tokens import TokenStore


class SqliteStore(TokenStore, EventStore, SubscriptionStore, DeliveryStore):
    """The SQLite implementation of Store."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.console = SqliteConsoleStore(db)
        self.ids = IdSource()
        self.targets_cache = {}
        self.ingest_group = None
        self._records = []

    async def close(self) -> None:
        """Flush and close the database."""
        await self.db.close()


async def open_store(path: str) -> SqliteStore:
    """Open (creating and migrating if needed) the SQLite file."""
    db = Database(path)
    await db.open()
    return SqliteStore(db)


__all__ = [
    "Database",
    "SchemaTooNewError",
    "SqliteStore",
    "Store",
    "StoreError",
    "UuidTakenError",
    "open_store",
]
