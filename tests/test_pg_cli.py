"""The CLI with PostgreSQL: `copy-storage --to URL` and `backup` refusing (SPEC §1), real server."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from pusherd.config import StorageConfig
from pusherd.store import open_store
from pusherd.store.postgres.migrate import migrate
from pusherd.store.types import NewEvent
from tests.service import run_cli_async, write_config
from tests.test_pg_copy import LIVE, ORG, installation


def config_with_url(path: Path, database: Path, url: str) -> Path:
    """A config whose [storage] has both path (the SQLite source) and url."""
    write_config(path, database)
    text = path.read_text().replace("[storage]\n", f'[storage]\nurl = "{url}"\n', 1)
    path.write_text(text)
    return path


async def test_copy_storage_moves_an_installation_that_then_serves(
    tmp_path: Path, pg_url: str
) -> None:
    db = await installation(tmp_path)  # one token, two subscriptions, deliveries in every state
    config = tmp_path / "pusherd.toml"
    code, secret, err = await run_cli_async(
        "token", "create", "--config", str(config), "--org", ORG, "--scope", "READ:PRODUCT"
    )
    assert code == 0, err
    code, out, err = await run_cli_async("copy-storage", "--config", str(config), "--to", pg_url)
    assert code == 0, err
    assert "2 tokens, 2 subscriptions, 4 events, 5 deliveries, 3 attempts" in out
    # The copy serves: the same token, subscriptions, log, and the pending rows go out.
    store = await open_store(StorageConfig(path=str(db), url=pg_url))
    try:
        token = await store.find_token(secret.strip())
        assert token is not None and token.organization == ORG
        assert [s.uuid for s in await store.list_subscriptions(ORG)] == [LIVE]
        view = await store.get_delivery(2, ORG)
        assert view is not None and view.status == "failed"
        assert [a.status_code for a in view.attempt_log] == [500]
        claimed = await store.claim("p", {}, 10, 10, 60_000)
        assert sorted(d.id for d in claimed.deliveries) == [3, 4]
        assert {d.signing_keys for d in claimed.deliveries} == {("whsec_k",)}
        (r,) = await store.ingest(
            [NewEvent(ORG, "ProductCreated", "{}", "msg-1", None)], lambda *_: True
        )
        assert r.duplicate  # idempotency keys came along
        (r,) = await store.ingest(
            [NewEvent(ORG, "ProductCreated", "{}", "fresh", None)], lambda *_: True
        )
        assert r.delivery_ids and min(r.delivery_ids) > 6  # no purged id handed out again
    finally:
        await store.close()
    # A second copy is refused: the target is not empty.
    code, out, err = await run_cli_async("copy-storage", "--config", str(config), "--to", pg_url)
    assert code == 1 and "not empty" in err


async def test_copy_storage_wants_a_postgresql_url(tmp_path: Path) -> None:
    config = tmp_path / "pusherd.toml"
    write_config(config, tmp_path / "db.sqlite3")
    code, _, err = await run_cli_async(
        "copy-storage", "--config", str(config), "--to", "mysql://x/y"
    )
    assert code == 1 and "postgresql://" in err


async def test_backup_with_storage_url_exits_2_pointing_at_pg_dump(
    tmp_path: Path, pg_url: str
) -> None:
    config = config_with_url(tmp_path / "pusherd.toml", tmp_path / "db.sqlite3", pg_url)
    code, out, err = await run_cli_async("backup", "--config", str(config), str(tmp_path / "b"))
    assert code == 2 and "pg_dump" in err and out == ""
    assert not (tmp_path / "b").exists()


async def test_storage_url_is_checked_and_its_password_masked(tmp_path: Path) -> None:
    config = config_with_url(
        tmp_path / "p.toml", tmp_path / "db.sqlite3", "postgresql://pusherd:s3cret@db:5432/p"
    )
    code, out, err = await run_cli_async("check-config", "--config", str(config))
    assert code == 0, err
    assert "s3cret" not in out and "postgresql://pusherd:********@db:5432/p" in out
    bad = config_with_url(tmp_path / "b.toml", tmp_path / "db.sqlite3", "mysql://db/p")
    code, _, err = await run_cli_async("check-config", "--config", str(bad))
    assert code == 2 and "storage.url" in err


async def test_serve_refuses_a_database_of_a_newer_schema(tmp_path: Path, pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await migrate(conn)
        await conn.execute("INSERT INTO pusherd_schema (version, applied_ms) VALUES (999, 0)")
    finally:
        await conn.close()
    config = config_with_url(tmp_path / "c.toml", tmp_path / "db.sqlite3", pg_url)
    code, _, err = await run_cli_async("serve", "--config", str(config))
    assert code != 0
    assert "database schema version 999 is newer than this pusherd supports" in err
    assert "Traceback" not in err
    code, _, err = await run_cli_async("token", "list", "--config", str(config))
    assert code == 1 and "newer than this pusherd supports" in err
