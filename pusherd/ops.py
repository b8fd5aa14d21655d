"""Operator commands: `pusherd replay`, `pusherd backup` and `pusherd copy-storage` (SPEC §1)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid as uuidlib
from pathlib import Path

from pusherd.cli import EXIT_USAGE, CliError, with_store
from pusherd.clock import now_ms
from pusherd.config import Config
from pusherd.store import Store, StoreError
from pusherd.store.types import BackupSummary
from pusherd.units import parse_duration


def cmd_replay(args: argparse.Namespace, config: Config) -> int:
    """Re-queue a subscription's finished deliveries; a running daemon sends them within 1s."""
    try:
        sub_uuid = str(uuidlib.UUID(args.subscription))
    except ValueError:
        raise CliError(f"--subscription: not a UUID: {args.subscription!r}") from None
    since_ms = None
    if args.since is not None:
        try:
            since_ms = now_ms() - int(parse_duration(args.since) * 1000)
        except ValueError as exc:
            raise CliError(f"--since: {exc}") from None

    async def replay(store: Store) -> int:
        sub = await store.find_subscription(sub_uuid)
        if sub is None:
            raise CliError(f"no such subscription: {sub_uuid}")
        if sub.status == "DISABLED":
            raise CliError(
                f"subscription {sub_uuid} is DISABLED; set it ACTIVE again first "
                '(PUT it with {"status": "ACTIVE"} or {"isActive": true}), then replay'
            )
        try:
            return await store.replay(sub_uuid, since_ms, args.status)
        except StoreError as exc:
            raise CliError(f"replay failed: {exc}") from None

    queued = with_store(config, replay)
    what = f"{args.status} " if args.status else ""
    print(f"queued {queued} {what}deliveries of subscription {sub_uuid} for delivery")
    return 0


def cmd_backup(args: argparse.Namespace, config: Config) -> int:
    """Consistent online copy of the database to DEST_FILE (never overwrites a file)."""
    if config.storage.url:
        print(
            "pusherd: storage.url is set: pusherd backup copies the SQLite file only;"
            " back up the PostgreSQL database with pg_dump (for instance:"
            " pg_dump --format=custom --file=pusherd.dump DBNAME)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    dest = Path(args.dest)
    if dest.exists() or dest.is_symlink():
        raise CliError(
            f"{dest} already exists; choose a new file name (backup never overwrites)"
        ) from None
    if not dest.parent.is_dir():
        raise CliError(f"{dest.parent} is not a directory")

    async def backup(store: Store) -> BackupSummary:
        try:
            return await store.backup(dest)
        except FileExistsError:
            raise CliError(
                f"{dest} already exists; choose a new file name (backup never overwrites)"
            ) from None
        except (StoreError, OSError) as exc:
            raise CliError(f"backup to {dest} failed: {exc}") from None

    summary = with_store(config, backup)
    print(
        f"backed up {config.storage.path} to {summary.path}: {summary.size_bytes} bytes,"
        f" schema version {summary.schema_version}, {summary.subscriptions} subscriptions,"
        f" {summary.events} events, {summary.deliveries} deliveries ({summary.pending} pending)"
    )
    return 0


def cmd_copy_storage(args: argparse.Namespace, config: Config) -> int:
    """Copy the configured SQLite database into an empty PostgreSQL database (daemon stopped)."""
    from pusherd.store import POSTGRES_SCHEMES
    from pusherd.store.postgres.copy import copy_sqlite

    url: str = args.to
    if not url.startswith(POSTGRES_SCHEMES):
        raise CliError(f"--to: not a PostgreSQL URL (postgresql://...): {url!r}")
    source = Path(config.storage.path)
    if not source.is_file():
        raise CliError(f"no SQLite database at storage.path {source}")
    try:
        copied = asyncio.run(copy_sqlite(source, url))
    except StoreError as exc:  # CopyRefusedError, SchemaTooNewError, database unreachable
        raise CliError(f"copy-storage refused: {exc}") from None
    except (OSError, Exception) as exc:  # asyncpg's connection and SQL errors
        raise CliError(f"copy-storage failed, nothing was copied: {exc}") from None
    counts = ", ".join(f"{n} {table}" for table, n in copied.items())
    print(f"copied {source} to PostgreSQL: {counts}")
    print("set storage.url to this URL in every pusherd's config, then start them")
    return 0
