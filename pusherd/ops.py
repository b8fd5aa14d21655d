"""Operator commands: `pusherd replay` and `pusherd backup` (SPEC §1)."""

from __future__ import annotations

import argparse
import sqlite3
import uuid as uuidlib
from pathlib import Path

from pusherd.cli import CliError, _open
from pusherd.clock import now_ms
from pusherd.config import Config, parse_duration
from pusherd.store.ops import backup_to, find_subscription, replay_deliveries


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
    conn = _open(config)
    try:
        sub = find_subscription(conn, sub_uuid)
        if sub is None:
            raise CliError(f"no such subscription: {sub_uuid}")
        if sub.status == "DISABLED":
            raise CliError(
                f"subscription {sub_uuid} is DISABLED; set it ACTIVE again first "
                '(PUT it with {"status": "ACTIVE"} or {"isActive": true}), then replay'
            )
        queued = replay_deliveries(conn, sub_uuid, since_ms, args.status)
    except sqlite3.Error as exc:
        raise CliError(f"replay failed: {exc}") from None
    finally:
        conn.close()
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
    conn = _open(config)
    try:
        summary = backup_to(conn, dest)
    except FileExistsError:
        raise CliError(
            f"{dest} already exists; choose a new file name (backup never overwrites)"
        ) from None
    except (sqlite3.Error, OSError) as exc:
        raise CliError(f"backup to {dest} failed: {exc}") from None
    finally:
        conn.close()
    print(
        f"backed up {config.storage.path} to {summary.path}: {summary.size_bytes} bytes,"
        f" schema version {summary.schema_version}, {summary.subscriptions} subscriptions,"
        f" {summary.events} events, {summary.deliveries} deliveries ({summary.pending} pending)"
    )
    return 0
