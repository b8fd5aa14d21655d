"""Schema migrations: step by step equals fresh, user_version, refusing newer files, PRAGMAs."""

from __future__ import annotations

import hashlib
import re
import sqlite3
from pathlib import Path

import pytest

from pusherd.store.errors import SchemaTooNewError
from pusherd.store.sqlite import SqliteStore
from pusherd.store.sqlite.schema import (
    configure,
    connect_sync,
    latest_version,
    migrate,
    migrations,
)
from tests.conftest import Harness
from tests.service import run_cli_async


def _schema(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    rows = conn.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type, name"
    ).fetchall()
    return [(t, n, re.sub(r"\s+", " ", s).strip()) for t, n, s in rows]


def _plain(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), isolation_level=None)


def test_migrations_are_numbered_without_gaps() -> None:
    steps = migrations()
    assert [v for v, _ in steps] == list(range(1, len(steps) + 1))
    assert latest_version() == len(steps) >= 1


def test_step_by_step_equals_fresh(tmp_path: Path) -> None:
    fresh = _plain(tmp_path / "fresh.sqlite3")
    configure(fresh)
    assert migrate(fresh) == latest_version()

    stepped = _plain(tmp_path / "stepped.sqlite3")
    configure(stepped)
    for k in range(1, latest_version() + 1):
        assert migrate(stepped, target=k) == k
        assert stepped.execute("PRAGMA user_version").fetchone()[0] == k
    assert _schema(stepped) == _schema(fresh)
    assert {n for t, n, _ in _schema(fresh) if t == "table"} >= {
        "tokens",
        "subscriptions",
        "events",
        "deliveries",
    }
    fresh.close()
    stepped.close()


def test_the_queues_of_an_older_file_are_filled_when_it_is_migrated(tmp_path: Path) -> None:
    conn = _plain(tmp_path / "old.sqlite3")
    configure(conn)
    migrate(conn, target=2)
    for uuid, status, deleted, destination in [
        ("live", "ACTIVE", None, "https://Live.example/hook"),
        ("idle", "FAILING", None, "http://idle.example:8080/x"),
        ("off", "DISABLED", None, "https://off.example/"),
        ("gone", "ACTIVE", 5, "https://gone.example/"),
    ]:
        conn.execute(
            "INSERT INTO subscriptions (uuid, organization, transport, event_names, scopes,"
            " destination, status, signing_key, created_ms, updated_ms, deleted_ms)"
            " VALUES (?, 'org', 'WEBHOOK', '[]', '[]', ?, ?, 'k', 1, 1, ?)",
            (uuid, destination, status, deleted),
        )
    conn.execute(
        "INSERT INTO events (uuid, organization, event_name, message_id, payload, timestamp,"
        " created_ms) VALUES ('e', 'org', 'ProductCreated', 'm', '{}', 't', 1)"
    )
    for sub, status, due in [
        ("live", "pending", 300),
        ("live", "pending", 200),
        ("live", "delivered", 100),
        ("idle", "failed", 100),
        ("off", "pending", 100),
    ]:
        conn.execute(
            "INSERT INTO deliveries (event_seq, subscription, status, due_ms, created_ms)"
            " VALUES (1, ?, ?, ?, 1)",
            (sub, status, due),
        )
    assert migrate(conn) == latest_version()
    rows = conn.execute(
        "SELECT subscription, origin, next_due_ms FROM queues ORDER BY 1"
    ).fetchall()
    assert rows == [
        ("idle", "http://idle.example:8080", None),
        ("live", "https://live.example:443", 200),
    ]
    conn.close()


def test_migrate_is_idempotent(tmp_path: Path) -> None:
    conn = connect_sync(tmp_path / "db.sqlite3")
    before = _schema(conn)
    assert migrate(conn) == latest_version()
    assert _schema(conn) == before
    assert conn.execute("PRAGMA user_version").fetchone()[0] == latest_version()
    conn.close()
    again = connect_sync(tmp_path / "db.sqlite3")
    assert _schema(again) == before
    again.close()


def _newer_db(path: Path) -> str:
    conn = _plain(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE future (x)")
    conn.execute(f"PRAGMA user_version = {latest_version() + 1}")
    conn.close()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _newer_rollback_db(path: Path) -> str:
    conn = _plain(path)
    conn.execute("CREATE TABLE future (x)")
    conn.execute(f"PRAGMA user_version = {latest_version() + 1}")
    conn.close()
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("make", [_newer_db, _newer_rollback_db])
def test_newer_schema_is_refused_and_the_file_unchanged(tmp_path: Path, make: object) -> None:
    path = tmp_path / "newer.sqlite3"
    digest = make(path)  # type: ignore[operator]
    with pytest.raises(SchemaTooNewError, match=str(latest_version() + 1)):
        connect_sync(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    conn = _plain(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == latest_version() + 1
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["future"]
    conn.close()


async def test_cli_on_a_newer_database_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "newer.sqlite3"
    digest = _newer_db(path)
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{path}"\n')
    code, out, err = await run_cli_async("token", "list", "--config", str(config))
    assert code != 0
    assert "id\torganization" not in out
    assert "newer" in err
    assert str(latest_version() + 1) in err
    assert "Traceback" not in err
    code, _, err = await run_cli_async(
        "token", "create", "--config", str(config), "--org", "new", "--scope", "READ:PRODUCT"
    )
    assert code != 0
    assert "newer" in err
    assert "Traceback" not in err
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


async def test_serve_on_a_newer_database_exits_non_zero(tmp_path: Path) -> None:
    path = tmp_path / "newer.sqlite3"
    digest = _newer_db(path)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[storage]\npath = "{path}"\n[api]\nlisten = "127.0.0.1:0"\n'
        '[ingest]\nlisten = "127.0.0.1:0"\n'
    )
    code, _, err = await run_cli_async("serve", "--config", str(config))
    assert code != 0
    assert "newer" in err
    assert "Traceback" not in err
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


async def test_writer_uses_wal_and_synchronous_full(harness: Harness) -> None:
    store = harness.runtime.store
    assert isinstance(store, SqliteStore)
    writer = store.db.writer
    assert writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert writer.execute("PRAGMA user_version").fetchone()[0] == latest_version()
    # a second connection sees WAL too: it is a property of the file
    other = _plain(Path(harness.config.storage.path))
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()


def test_cli_connection_uses_wal_and_synchronous_full(tmp_path: Path) -> None:
    conn = connect_sync(tmp_path / "cli.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    conn.close()
