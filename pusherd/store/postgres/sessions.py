"""Console sessions and the purge of sign-in links on PostgreSQL (SPEC §9, §8).

Every statement is one autocommit round trip by primary key, so a session made, ended or given
a message by one process is what every other process reads next.
"""

from __future__ import annotations

from collections.abc import Sequence

from pusherd.store.console import (
    SESSION_COLUMNS,
    SESSIONS_PER_TOKEN,
    SessionRecord,
    flash_json,
    flash_of,
    session_hash,
    session_record,
)
from pusherd.store.postgres.pool import Pool


class PostgresSessions:
    """The session half of PostgresConsoleStore."""

    pool: Pool

    async def create_session(self, sid: str, record: SessionRecord) -> None:
        """Store a new session under the hash of its cookie id."""
        r = record
        async with self.pool.transaction() as conn:
            await conn.execute(
                f"INSERT INTO console_sessions (hash, {SESSION_COLUMNS})"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                session_hash(sid),
                r.organization,
                r.home,
                r.label,
                r.token_id,
                r.csrf,
                r.created_ms,
                r.last_seen_ms,
                r.expires_ms,
                flash_json(r.flash),
            )
            if r.token_id is not None:
                await conn.execute(
                    "DELETE FROM console_sessions WHERE token_id = $1 AND hash NOT IN"
                    " (SELECT hash FROM console_sessions WHERE token_id = $1"
                    " ORDER BY last_seen_ms DESC LIMIT $2)",
                    r.token_id,
                    SESSIONS_PER_TOKEN,
                )

    async def session(self, sid: str, now_ms: int) -> SessionRecord | None:
        """The session of this cookie id, unless unknown or expired."""
        rows = await self.pool.fetch(
            f"SELECT {SESSION_COLUMNS} FROM console_sessions WHERE hash = $1 AND expires_ms > $2",
            session_hash(sid),
            now_ms,
        )
        if not rows:
            return None
        return session_record(rows[0])

    async def touch_session(self, sid: str, now_ms: int, expires_ms: int) -> None:
        """Seen now: the idle expiry starts again (never moved backwards)."""
        await self.pool.execute(
            "UPDATE console_sessions SET last_seen_ms = greatest(last_seen_ms, $2),"
            " expires_ms = greatest(expires_ms, $3) WHERE hash = $1",
            session_hash(sid),
            now_ms,
            expires_ms,
        )

    async def end_session(self, sid: str) -> bool:
        """Sign out: the row goes; False when there was none."""
        status = await self.pool.execute(
            "DELETE FROM console_sessions WHERE hash = $1", session_hash(sid)
        )
        return status != "DELETE 0"

    async def add_flash(self, sid: str, messages: Sequence[str]) -> None:
        """Keep messages for the session's next page (appended in one statement)."""
        if not messages:
            return
        await self.pool.execute(
            "UPDATE console_sessions SET flash = (flash::jsonb || $2::jsonb)::text WHERE hash = $1",
            session_hash(sid),
            flash_json(messages),
        )

    async def take_flash(self, sid: str) -> list[str]:
        """The session's waiting messages, emptied in the same statement (row-locked, so two
        processes never both take them)."""
        taken = await self.pool.fetchval(
            "UPDATE console_sessions s SET flash = '[]' FROM (SELECT hash, flash"
            " FROM console_sessions WHERE hash = $1 AND flash <> '[]' FOR UPDATE) old"
            " WHERE s.hash = old.hash RETURNING old.flash",
            session_hash(sid),
        )
        return list(flash_of(taken))

    async def purge_sessions(self, now_ms: int) -> int:
        """Delete expired sessions and expired sign-in links (ranges of their expiry indexes)."""
        async with self.pool.transaction() as conn:
            sessions = await conn.fetchval(
                "WITH gone AS (DELETE FROM console_sessions WHERE expires_ms <= $1 RETURNING 1)"
                " SELECT count(*) FROM gone",
                now_ms,
            )
            links = await conn.fetchval(
                "WITH gone AS (DELETE FROM console_links WHERE expires_ms <= $1 RETURNING 1)"
                " SELECT count(*) FROM gone",
                now_ms,
            )
        return int(sessions) + int(links)
