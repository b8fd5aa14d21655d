"""copy-storage: a real SQLite installation moved into PostgreSQL, whole, or not at all."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import asyncpg
import pytest

from pusherd.config import StorageConfig
from pusherd.store import open_store
from pusherd.store.console import link_hash
from pusherd.store.postgres.copy import CopyRefusedError, copy_sqlite
from tests.service import run_cli_async, write_config

ORG = "5a0b9c1e-1d2f-4a3b-8c4d-111111111111"
LIVE = "11111111-1111-4111-8111-111111111111"
GONE = "22222222-2222-4222-8222-222222222222"
USABLE_LINK = "pcl_still-usable"


async def installation(tmp_path: Path) -> Path:
    """An SQLite database made by pusherd itself (the CLI creates and migrates it), holding a
    token, two subscriptions, and deliveries delivered, failed, pending and leased."""
    db = tmp_path / "pusherd.sqlite3"
    config = tmp_path / "pusherd.toml"
    write_config(config, db)
    code, _, err = await run_cli_async(
        "token", "create", "--config", str(config), "--org", ORG, "--scope", "READ:PRODUCT"
    )
    assert code == 0, err
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    for uuid, dest, status, deleted in (
        (LIVE, "https://shop.example:8443/hooks", "ACTIVE", None),
        (GONE, "https://old.example/x", "ACTIVE", 5),
    ):
        conn.execute(
            "INSERT INTO subscriptions (uuid, organization, transport, event_names, scopes,"
            " destination, status, signing_key, created_ms, updated_ms, deleted_ms)"
            " VALUES (?, ?, 'WEBHOOK', '[\"ProductCreated\"]', '[\"READ:PRODUCT\"]', ?, ?,"
            " 'whsec_k', 1, 1, ?)",
            (uuid, ORG, dest, status, deleted),
        )
    for seq in range(1, 5):
        conn.execute(
            "INSERT INTO events (seq, uuid, organization, event_name, message_id, payload,"
            " timestamp, created_ms) VALUES (?, ?, ?, 'ProductCreated', ?, '{\"n\": 1}', 'ts', 10)",
            (seq, f"uuid-{seq}", ORG, f"msg-{seq}"),
        )
    rows = [  # (event_seq, subscription, status, due_ms, lease_owner, lease_until_ms)
        (1, LIVE, "delivered", 10, None, None),
        (2, LIVE, "failed", 10, None, None),
        (3, LIVE, "pending", 500, None, None),
        (4, LIVE, "pending", 900, "dead-process", 900),
        (4, GONE, "cancelled", 10, None, None),
        (1, LIVE, "delivered", 10, None, None),  # deleted below: its id must stay used
    ]
    for seq, sub, status, due, owner, until in rows:
        conn.execute(
            "INSERT INTO deliveries (event_seq, subscription, status, due_ms, lease_owner,"
            " lease_until_ms, created_ms, attempts) VALUES (?, ?, ?, ?, ?, ?, 10, 1)",
            (seq, sub, status, due, owner, until),
        )
    conn.execute("DELETE FROM deliveries WHERE id = 6")  # retention purged the newest one
    for delivery, code in ((1, 200), (2, 500), (3, 503)):
        conn.execute(
            "INSERT INTO attempts (delivery_id, started_ms, duration_ms, status_code, error,"
            " response_body) VALUES (?, 20, 12.5, ?, NULL, 'ok')",
            (delivery, code),
        )
    # One-time console sign-in links: usable, used, expired; and a signed-in console session.
    now = int(time.time() * 1000)
    for digest, used, expires in (
        (link_hash(USABLE_LINK), None, now + 3_600_000),
        (link_hash("pcl_used"), now - 5, now + 3_600_000),
        (link_hash("pcl_expired"), None, now - 5),
    ):
        conn.execute(
            "INSERT INTO console_links (hash, organization, created_ms, expires_ms, used_ms)"
            " VALUES (?, ?, ?, ?, ?)",
            (digest, ORG, now - 10, expires, used),
        )
    conn.execute(
        "INSERT INTO console_sessions (hash, organization, home, label, token_id, csrf,"
        " created_ms, last_seen_ms, expires_ms) VALUES ('h', ?, ?, 'l', NULL, 'c', ?, ?, ?)",
        (ORG, ORG, now, now, now + 3_600_000),
    )
    conn.execute("COMMIT")
    conn.close()
    return db


async def test_everything_is_copied_with_its_ids_and_state(tmp_path: Path, pg_url: str) -> None:
    db = await installation(tmp_path)
    copied = await copy_sqlite(db, pg_url)
    assert copied == {
        "tokens": 1,
        "subscriptions": 2,
        "events": 4,
        "deliveries": 5,
        "attempts": 3,
        "console_links": 1,  # the usable one: a used or expired link signs nobody in
    }
    src = sqlite3.connect(db)
    pg = await asyncpg.connect(pg_url)
    try:
        for table, key in (("tokens", "id"), ("subscriptions", "uuid"), ("events", "seq")):
            columns = [r[1] for r in src.execute(f"PRAGMA table_info({table})")]
            want = src.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {key}")
            got = await pg.fetch(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {key}")
            assert [tuple(r) for r in got] == want.fetchall(), table
        deliveries = await pg.fetch(
            "SELECT id, subscription, origin, status, due_ms, lease_owner, attempts"
            " FROM deliveries ORDER BY id"
        )
        assert [tuple(r) for r in deliveries] == [
            (1, LIVE, "https://shop.example:8443", "delivered", 10, None, 1),
            (2, LIVE, "https://shop.example:8443", "failed", 10, None, 1),
            (3, LIVE, "https://shop.example:8443", "pending", 500, None, 1),
            # The stopped daemon's lease is dropped; the row is due when it would have ended.
            (4, LIVE, "https://shop.example:8443", "pending", 900, None, 1),
            (5, GONE, "https://old.example:443", "cancelled", 10, None, 1),
        ]
        attempts = await pg.fetch(
            "SELECT delivery_id, status_code, duration_ms, response_body FROM attempts ORDER BY id"
        )
        assert [tuple(r) for r in attempts] == [
            (1, 200, 12.5, "ok"),
            (2, 500, 12.5, "ok"),
            (3, 503, 12.5, "ok"),
        ]
        # Only the live subscription has a queue, due at its oldest pending row.
        queues = await pg.fetch("SELECT subscription, origin, next_due_ms FROM queues")
        assert [tuple(r) for r in queues] == [(LIVE, "https://shop.example:8443", 500)]
        # New public ids go on past every id SQLite ever gave (6 was purged, not free).
        new_id = await pg.fetchval(
            "INSERT INTO deliveries (event_seq, subscription, origin, status, due_ms, created_ms)"
            " VALUES (1, $1, 'o', 'pending', 0, 0) RETURNING id",
            LIVE,
        )
        assert new_id == 7
        assert (
            await pg.fetchval(
                "INSERT INTO events (uuid, organization, event_name, message_id, payload,"
                " timestamp, created_ms) VALUES ('u', $1, 'e', 'new', '{}', 'ts', 0)"
                " RETURNING seq",
                ORG,
            )
            == 5
        )
        # Sessions stay behind: whoever was signed in signs in again.
        assert await pg.fetchval("SELECT count(*) FROM console_sessions") == 0
    finally:
        src.close()
        await pg.close()
    # A tenant handed a link before the move signs in with it after, once.
    store = await open_store(StorageConfig(path=str(db), url=pg_url))
    try:
        assert await store.console.redeem_link(USABLE_LINK) == ORG
        assert await store.console.redeem_link(USABLE_LINK) is None
        assert await store.console.link_state("pcl_used") is None
    finally:
        await store.close()


async def test_a_non_empty_target_is_refused_untouched(tmp_path: Path, pg_url: str) -> None:
    db = await installation(tmp_path)
    await copy_sqlite(db, pg_url)
    with pytest.raises(CopyRefusedError, match="not empty"):
        await copy_sqlite(db, pg_url)
    pg = await asyncpg.connect(pg_url)
    try:
        assert await pg.fetchval("SELECT count(*) FROM deliveries") == 5
    finally:
        await pg.close()


async def test_a_failed_copy_leaves_nothing_behind(tmp_path: Path, pg_url: str) -> None:
    db = await installation(tmp_path)
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE attempts ADD COLUMN from_the_future TEXT")  # copied last
    conn.commit()
    conn.close()
    with pytest.raises(CopyRefusedError, match="from_the_future"):
        await copy_sqlite(db, pg_url)
    pg = await asyncpg.connect(pg_url)
    try:
        for table in ("tokens", "subscriptions", "events", "deliveries"):
            assert await pg.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    finally:
        await pg.close()
