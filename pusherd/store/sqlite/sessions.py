"""Console sessions and the purge of sign-in links on SQLite (SPEC §9).

A lookup is one primary-key read on the loop's quick connection (a page view never waits for a
commit or a thread hop); writes go through the group-committing writer. A touch and a flash
message are not worth an fsync of their own: at worst a power loss forgets them.
"""

from __future__ import annotations

import sqlite3
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
from pusherd.store.sqlite.db import Database


class SqliteSessions:
    """The session half of SqliteConsoleStore."""

    db: Database

    async def create_session(self, sid: str, record: SessionRecord) -> None:
        """Store a new session under the hash of its cookie id."""
        r = record
        values = (session_hash(sid), r.organization, r.home, r.label, r.token_id, r.csrf)
        times = (r.created_ms, r.last_seen_ms, r.expires_ms, flash_json(r.flash))

        def fn(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO console_sessions (hash, {SESSION_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*values, *times),
            )
            if r.token_id is not None:
                conn.execute(
                    "DELETE FROM console_sessions WHERE token_id = ?1 AND hash NOT IN"
                    " (SELECT hash FROM console_sessions WHERE token_id = ?1"
                    " ORDER BY last_seen_ms DESC LIMIT ?2)",
                    (r.token_id, SESSIONS_PER_TOKEN),
                )

        await self.db.write(fn)

    async def session(self, sid: str, now_ms: int) -> SessionRecord | None:
        """The session of this cookie id, unless unknown or expired."""
        rows = self.db.read_now(
            f"SELECT {SESSION_COLUMNS} FROM console_sessions WHERE hash = ? AND expires_ms > ?",
            (session_hash(sid), now_ms),
        )
        if not rows:
            return None
        return session_record(rows[0])

    async def touch_session(self, sid: str, now_ms: int, expires_ms: int) -> None:
        """Seen now: the idle expiry starts again (never moved backwards)."""

        def fn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE console_sessions SET last_seen_ms = max(last_seen_ms, ?),"
                " expires_ms = max(expires_ms, ?) WHERE hash = ?",
                (now_ms, expires_ms, session_hash(sid)),
            )

        await self.db.write(fn, durable=False)

    async def end_session(self, sid: str) -> bool:
        """Sign out: the row goes; False when there was none."""

        def fn(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM console_sessions WHERE hash = ?", (session_hash(sid),))
            return cur.rowcount > 0

        ended: bool = await self.db.write(fn)
        return ended

    async def add_flash(self, sid: str, messages: Sequence[str]) -> None:
        """Keep messages for the session's next page."""
        if not messages:
            return
        digest = session_hash(sid)

        def fn(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT flash FROM console_sessions WHERE hash = ?", (digest,)
            ).fetchone()
            if row is not None:
                kept = [*flash_of(row[0]), *messages]
                conn.execute(
                    "UPDATE console_sessions SET flash = ? WHERE hash = ?",
                    (flash_json(kept), digest),
                )

        await self.db.write(fn, durable=False)

    async def take_flash(self, sid: str) -> list[str]:
        """The session's waiting messages, emptied in the same transaction."""
        digest = session_hash(sid)

        def fn(conn: sqlite3.Connection) -> list[str]:
            row = conn.execute(
                "SELECT flash FROM console_sessions WHERE hash = ?", (digest,)
            ).fetchone()
            taken = list(flash_of(row[0])) if row is not None else []
            if taken:
                conn.execute("UPDATE console_sessions SET flash = '[]' WHERE hash = ?", (digest,))
            return taken

        result: list[str] = await self.db.write(fn, durable=False)
        return result

    async def purge_sessions(self, now_ms: int) -> int:
        """Delete expired sessions and expired sign-in links (ranges of their expiry indexes)."""

        def fn(conn: sqlite3.Connection) -> int:
            gone = conn.execute("DELETE FROM console_sessions WHERE expires_ms <= ?", (now_ms,))
            links = conn.execute("DELETE FROM console_links WHERE expires_ms <= ?", (now_ms,))
            return gone.rowcount + links.rowcount

        removed: int = await self.db.write(fn, urgent=False)
        return removed
