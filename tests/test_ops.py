"""Operator commands against real processes: replay, backup under load, upgrades of the schema."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pusherd.store.sqlite.schema import latest_version, migrate
from tests.conftest import ALL_SCOPES, ORG, Harness, Receiver
from tests.service import Service, run_cli_async, start_service, write_config

HarnessFactory = Callable[..., Awaitable[Harness]]
ReceiverFactory = Callable[..., Awaitable[Receiver]]


def _config_for(tmp_path: Path, harness: Harness) -> Path:
    path = tmp_path / "cli.toml"
    path.write_text(f'[storage]\npath = "{harness.config.storage.path}"\n')
    return path


async def _metrics(harness: Harness, token: str) -> dict[str, Any]:
    resp = await harness.api.get("/api/webhooks/metrics", headers=harness.auth(token))
    assert resp.status == 200, await resp.text()
    data: dict[str, Any] = (await resp.json())["data"]
    return data


# -- replay ----------------------------------------------------------------------------------


async def _wait_metrics(harness: Harness, token: str, failed: int, delivered: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        m = await _metrics(harness, token)
        if (m["failed"], m["delivered"], m["pending"]) == (failed, delivered, 0):
            return
        assert time.monotonic() < deadline, m
        await asyncio.sleep(0.02)


async def test_replay_of_failed_deliveries_reaches_a_recovered_receiver(
    tmp_path: Path, harness_factory: HarnessFactory, receiver_factory: ReceiverFactory
) -> None:
    # No retries: each delivery fails for good at its first attempt (and the circuit stays shut).
    harness = await harness_factory(delivery={"retry_schedule": []})
    receiver = await receiver_factory(default=500)
    token = harness.token()
    sub = await harness.subscribe(token, receiver.url)
    await harness.emit(messageId="a")
    await harness.emit(messageId="b")
    await _wait_metrics(harness, token, failed=3, delivered=0)  # TestMessage + 2 events

    receiver.default = 200
    seen = len(receiver.requests)
    config = _config_for(tmp_path, harness)
    code, out, err = await run_cli_async(
        "replay", "--config", str(config), "--subscription", sub["uuid"], "--status", "failed"
    )
    replayed_at = time.monotonic()
    assert code == 0, err
    assert "queued 3 " in out

    # The command tells the daemon serving the file (store/sqlite/wake.py): no wait for a poll.
    await receiver.wait_for(seen + 3, timeout=10)
    assert receiver.requests[-1].at - replayed_at < 3.0
    replayed = [r.json()["messageId"] for r in receiver.requests[seen:]]
    assert {"a", "b"} <= set(replayed)
    await _wait_metrics(harness, token, failed=0, delivered=3)

    # Nothing failed is left; --since excludes older deliveries.
    code, out, _ = await run_cli_async(
        "replay", "--config", str(config), "--subscription", sub["uuid"], "--status", "failed"
    )
    assert (code, "queued 0 " in out) == (0, True)
    code, out, _ = await run_cli_async(
        "replay", "--config", str(config), "--subscription", sub["uuid"], "--since", "1ms"
    )
    assert (code, "queued 0 " in out) == (0, True)
    assert len(receiver.requests) == seen + 3


async def test_replay_of_an_unknown_subscription_fails(tmp_path: Path, harness: Harness) -> None:
    config = _config_for(tmp_path, harness)
    unknown = "0b0b0b0b-1d2f-4a3b-8c4d-111111111111"
    code, out, err = await run_cli_async(
        "replay", "--config", str(config), "--subscription", unknown
    )
    assert code == 1
    assert out == ""
    assert f"no such subscription: {unknown}" in err
    code, _, err = await run_cli_async(
        "replay", "--config", str(config), "--subscription", "not-a-uuid"
    )
    assert code == 1
    assert "not a UUID" in err


# -- backup ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _serving(config: Path, ports: tuple[int, int]) -> AsyncIterator[Service]:
    service = start_service(config, *ports)
    try:
        await asyncio.to_thread(service.wait_healthy)
        yield service
    finally:
        await asyncio.to_thread(service.kill)


async def _load(
    session: aiohttp.ClientSession, url: str, acked: dict[str, str], stop: asyncio.Event
) -> None:
    """Ingest single events and small batches until stopped; record what was acknowledged."""
    n = 0
    while not stop.is_set():
        batch = [
            {
                "eventName": "ProductCreated",
                "organizationUuid": ORG,
                "payload": {"n": n + i},
                "messageId": f"m-{n + i}",
            }
            for i in range(1 + n % 5)
        ]
        n += len(batch)
        async with session.post(url, json=batch if len(batch) > 1 else batch[0]) as resp:
            assert resp.status == 202, await resp.text()
            answer = await resp.json()
        for item, result in zip(batch, answer if len(batch) > 1 else [answer], strict=True):
            acked[item["messageId"]] = result["messageUuid"]


async def test_backup_under_load_restores_into_a_working_daemon(
    tmp_path: Path, receiver: Receiver
) -> None:
    config = tmp_path / "live.toml"
    ports = write_config(config, tmp_path / "live.sqlite3")
    scopes = [arg for scope in ALL_SCOPES for arg in ("--scope", scope)]
    code, token, err = await run_cli_async(
        "token", "create", "--config", str(config), "--org", ORG, *scopes
    )
    assert code == 0, err
    auth = {"Authorization": f"Bearer {token.strip()}"}
    backup = tmp_path / "backup.sqlite3"

    async with _serving(config, ports) as live, aiohttp.ClientSession() as session:
        body = {
            "uuid": "0c1d2e3f-1d2f-4a3b-8c4d-111111111111",
            "transportName": "WEBHOOK",
            "eventNames": ["ProductCreated"],
            "destination": receiver.url,
            "contactEmail": "ops@example.com",
        }
        async with session.post(
            live.api + "/organizations/self/subscriptions", json=body, headers=auth
        ) as resp:
            assert resp.status == 200, await resp.text()

        acked: dict[str, str] = {}
        stop = asyncio.Event()
        loader = asyncio.create_task(_load(session, live.ingest + "/events", acked, stop))
        deadline = time.monotonic() + 20
        while len(acked) < 200:
            assert time.monotonic() < deadline and not loader.done(), "ingest made no progress"
            await asyncio.sleep(0.01)
        acked_before = dict(acked)
        code, out, err = await run_cli_async("backup", "--config", str(config), str(backup))
        stop.set()
        await loader
        assert code == 0, err
        assert out.startswith(f"backed up {tmp_path / 'live.sqlite3'} to {backup}: ")
        assert len(out.strip().splitlines()) == 1
        assert live.proc.poll() is None

        digest = hashlib.sha256(backup.read_bytes()).hexdigest()
        code, _, err = await run_cli_async("backup", "--config", str(config), str(backup))
        assert code == 1
        assert "already exists" in err
        assert hashlib.sha256(backup.read_bytes()).hexdigest() == digest
        assert await asyncio.to_thread(live.stop) == 0

    with contextlib.closing(sqlite3.connect(backup)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]

    restored = tmp_path / "restored.toml"
    restored_ports = write_config(restored, backup)
    async with _serving(restored, restored_ports) as svc, aiohttp.ClientSession() as session:
        async with session.get(svc.api + "/organizations/self/subscriptions", headers=auth) as resp:
            assert resp.status == 200
            assert [s["uuid"] for s in await resp.json()] == [body["uuid"]]
        # Every event acknowledged before the backup began is in it: ingesting it again is a
        # duplicate answering with the original messageUuid.
        items = [
            {"eventName": "ProductCreated", "organizationUuid": ORG, "payload": {}, "messageId": m}
            for m in acked_before
        ]
        for start in range(0, len(items), 1000):
            chunk = items[start : start + 1000]
            async with session.post(svc.ingest + "/events", json=chunk) as resp:
                assert resp.status == 202, await resp.text()
                answer = await resp.json()
            for item, result in zip(chunk, answer, strict=True):
                assert result.get("duplicate") is True, item["messageId"]
                assert result["messageUuid"] == acked_before[item["messageId"]]
        async with session.post(
            svc.ingest + "/events",
            json={"eventName": "ProductCreated", "organizationUuid": ORG, "payload": {}},
        ) as resp:
            assert resp.status == 202
            assert (await resp.json())["deliveries"] == 1
        assert await asyncio.to_thread(svc.stop) == 0


async def test_backup_refuses_a_missing_directory(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{tmp_path / "db.sqlite3"}"\n')
    code, out, err = await run_cli_async(
        "backup", "--config", str(config), str(tmp_path / "nowhere" / "b.sqlite3")
    )
    assert code == 1
    assert "is not a directory" in err
    assert out == ""


# -- upgrades --------------------------------------------------------------------------------


async def test_serve_migrates_a_database_of_an_older_schema(tmp_path: Path) -> None:
    database = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as conn:
        assert migrate(conn, target=latest_version() - 1) == latest_version() - 1
    config = tmp_path / "c.toml"
    ports = write_config(config, database)
    async with _serving(config, ports) as svc:
        assert await asyncio.to_thread(svc.stop) == 0
    assert '"schema_migrated"' in svc.log()
    with contextlib.closing(sqlite3.connect(database)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == latest_version()


@pytest.mark.parametrize("wal", [False, True])
async def test_serve_refuses_a_database_of_a_newer_schema(tmp_path: Path, wal: bool) -> None:
    database = tmp_path / "new.sqlite3"
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as conn:
        if wal:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE from_the_future (x)")
        conn.execute("PRAGMA user_version = 999")
    digest = hashlib.sha256(database.read_bytes()).hexdigest()
    config = tmp_path / "c.toml"
    write_config(config, database)
    code, _, err = await run_cli_async("serve", "--config", str(config))
    assert code != 0
    assert "database schema version 999 is newer than this pusherd supports" in err
    assert "Traceback" not in err
    assert hashlib.sha256(database.read_bytes()).hexdigest() == digest
