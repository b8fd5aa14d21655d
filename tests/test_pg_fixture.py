"""The PostgreSQL test server: real, fsync on, one fresh database per test, isolated."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from tests.pg import PgServer, launch_or_skip


async def test_connects_to_a_real_server_with_durable_commits(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        version = await conn.fetchval("SHOW server_version_num")
        assert int(version) >= 140000  # SPEC §8: PostgreSQL 14 or newer
        # Acknowledged means durable: the tests run against the settings production needs.
        assert await conn.fetchval("SHOW fsync") == "on"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        assert await conn.fetchval("SELECT inet_server_addr()::text") == "127.0.0.1/32"
    finally:
        await conn.close()


_used: list[str] = []


# Two tests writing the same table name: the second passes only if its database is fresh.
@pytest.mark.parametrize("marker", ["first", "second"])
async def test_each_test_gets_a_fresh_empty_database(
    pg_server: PgServer, pg_database: str, marker: str
) -> None:
    _used.append(pg_database)
    conn = await asyncpg.connect(pg_server.url(pg_database))
    try:
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        assert tables == []
        await conn.execute("CREATE TABLE leftover (marker text)")
        await conn.execute("INSERT INTO leftover VALUES ($1)", marker)
    finally:
        await conn.close()
    # Nothing connects to the template itself: CREATE DATABASE refuses a template that has
    # sessions, and a session's backend outlives its client by a moment. That the template
    # stays clean shows in the second run of this test finding no table.


def test_databases_are_dropped_after_their_test(pg_server: PgServer, pg_database: str) -> None:
    names = set(pg_server.psql("postgres", "SELECT datname FROM pg_database").split())
    assert pg_database in names
    assert len(_used) == 2  # the two tests above ran first, each in a database of its own
    assert len(set(_used)) == 2
    assert not names & set(_used)  # and theirs were dropped when they ended


def test_without_postgresql_the_tests_skip_saying_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSHERD_PG_BINDIR", str(tmp_path))  # no server binaries there
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install postgresql"):
        launch_or_skip()


def test_under_ci_a_missing_postgresql_fails_instead_of_skipping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUSHERD_PG_BINDIR", str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install postgresql.*CI=true"):
        launch_or_skip()
