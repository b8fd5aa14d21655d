"""The only package that speaks SQL. The rest of pusherd uses `Store` (store/interface.py), the
types of store/types.py and the errors of store/errors.py; `open_store` picks the backend."""

from __future__ import annotations

from pusherd.config import StorageConfig
from pusherd.store.changes import Change, ChangeFeed
from pusherd.store.errors import SchemaTooNewError, StoreError, UuidTakenError
from pusherd.store.interface import Store

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


async def open_store(
    config: StorageConfig | str, *, background: bool = True, per_destination: int | None = None
) -> Store:
    """Open the configured backend: PostgreSQL when `storage.url` is set (SPEC §8), else the
    SQLite file at `storage.path`.

    `config` is the [storage] section (or a path, for tools and tests). `background=False` for
    a short-lived command (token, replay, backup) run next to a daemon: no upkeep of its own
    (on PostgreSQL: no LISTEN connection). `per_destination` is the limit PostgreSQL holds
    across every process (SQLite's one process holds it in its dispatcher).
    """
    if isinstance(config, str):
        path = config
    else:
        url = config.url
        if url:
            if not url.startswith(POSTGRES_SCHEMES):
                raise StoreError(f"storage.url must start with postgresql:// (got {url!r})")
            from pusherd.store.postgres.store import open_postgres

            return await open_postgres(url, background=background, per_destination=per_destination)
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
