"""The only package that speaks SQL. The rest of pusherd uses `Store` (store/interface.py), the
types of store/types.py and the errors of store/errors.py; `open_store` picks the backend."""

from __future__ import annotations

from pusherd.config import StorageConfig
from pusherd.store.changes import Change, ChangeFeed
from pusherd.store.errors import SchemaTooNewError, StoreError, UuidTakenError
from pusherd.store.interface import Store


async def open_store(config: StorageConfig | str, *, background: bool = True) -> Store:
    """Open the configured backend: the SQLite file at `storage.path` (the only one so far).

    `config` is the [storage] section (or a path, for tools and tests). `background=False` for
    a short-lived command (token, replay, backup) run next to a daemon: no upkeep of its own.
    """
    if isinstance(config, str):
        path = config
    else:
        if getattr(config, "url", None):
            raise StoreError(
                "storage.url is set, but this pusherd has no PostgreSQL backend yet;"
                " remove storage.url to use the SQLite file at storage.path"
            )
        path = config.path
    from pusherd.store.sqlite import open_sqlite

    return await open_sqlite(path, background=background)


__all__ = [
    "Change",
    "ChangeFeed",
    "SchemaTooNewError",
    "Store",
    "StoreError",
    "UuidTakenError",
    "open_store",
]
