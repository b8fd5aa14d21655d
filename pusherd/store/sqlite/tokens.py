"""API tokens: created by the CLI, stored as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets
import sqlite3

import orjson

from pusherd.clock import now_ms
from pusherd.store.changes import Change, ChangeFeed
from pusherd.store.sqlite.db import Database
from pusherd.store.types import Token

TOKEN_PREFIX = "pshd_"
_COLUMNS = "id, organization, scopes, name, created_ms, expires_ms, revoked_ms"


def hash_token(secret: str) -> str:
    """The stored form of a token secret."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _row(row: tuple[object, ...]) -> Token:
    tid, org, scopes, name, created, expires, revoked = row
    return Token(
        id=str(tid),
        organization=str(org),
        scopes=tuple(orjson.loads(str(scopes))),
        name=str(name),
        created_ms=int(created),  # type: ignore[call-overload]
        expires_ms=None if expires is None else int(expires),  # type: ignore[call-overload]
        revoked_ms=None if revoked is None else int(revoked),  # type: ignore[call-overload]
    )


def create_token(
    conn: sqlite3.Connection,
    organization: str,
    scopes: tuple[str, ...],
    name: str = "",
    expires_ms: int | None = None,
) -> tuple[Token, str]:
    """Insert a new token; returns it and its secret (shown once, never stored)."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = Token(
        id="tok_" + secrets.token_hex(6),
        organization=organization,
        scopes=scopes,
        name=name,
        created_ms=now_ms(),
        expires_ms=expires_ms,
        revoked_ms=None,
    )
    conn.execute(
        "INSERT INTO tokens (id, hash, organization, scopes, name, created_ms, expires_ms)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            token.id,
            hash_token(secret),
            organization,
            orjson.dumps(list(scopes)).decode(),
            name,
            token.created_ms,
            expires_ms,
        ),
    )
    return token, secret


def list_tokens(conn: sqlite3.Connection) -> list[Token]:
    """Every token, oldest first."""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM tokens ORDER BY created_ms, id").fetchall()
    return [_row(r) for r in rows]


def revoke_token(conn: sqlite3.Connection, token_id: str) -> bool:
    """Revoke by id; False when no such token (or already revoked)."""
    cur = conn.execute(
        "UPDATE tokens SET revoked_ms = ? WHERE id = ? AND revoked_ms IS NULL",
        (now_ms(), token_id),
    )
    return cur.rowcount > 0


class TokenStore:
    """API tokens (mixed into SqliteStore)."""

    db: Database
    changes: ChangeFeed

    async def find_token(self, secret: str) -> Token | None:
        """The token with this secret, whatever its state (the caller checks expiry/revocation).

        Read from the file on every request (one indexed probe): a token revoked by the CLI, in
        another process, stops working at once.
        """
        rows = self.db.read_now(
            f"SELECT {_COLUMNS} FROM tokens WHERE hash = ?", (hash_token(secret),)
        )
        return _row(rows[0]) if rows else None

    async def create_token(
        self, organization: str, scopes: tuple[str, ...], name: str, expires_ms: int | None
    ) -> tuple[Token, str]:
        """A new token and its secret (shown once, never stored)."""
        token, secret = await self.db.write(
            lambda conn: create_token(conn, organization, scopes, name, expires_ms)
        )
        self.changes.announce(Change("token_created", organization, token=token.id))
        return token, secret

    async def list_tokens(self) -> list[Token]:
        """Every token, oldest first."""
        rows = await self.db.read(f"SELECT {_COLUMNS} FROM tokens ORDER BY created_ms, id")
        return [_row(tuple(r)) for r in rows]

    async def revoke_token(self, token_id: str) -> bool:
        """Revoke by id; False when no such token (or already revoked)."""
        done = await self.db.write(lambda conn: revoke_token(conn, token_id))
        if done:
            self.changes.announce(Change("token_revoked", token=token_id))
        return done
