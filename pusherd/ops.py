"""Operator commands: `pusherd replay` and `pusherd backup` (SPEC §1)."""

from __future__ import annotations

import argparse
import uuid as uuidlib
from pathlib import Path

from pusherd.cli import CliError, with_store
from pusherd.clock import now_ms
from pusherd.config import Config, parse_duration
from pusherd.store import Store, StoreError
from pusherd.store.types import BackupSummary


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
