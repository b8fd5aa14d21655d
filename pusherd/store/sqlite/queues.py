"""The claim queues: one row per deliverable subscription with its next due time (SQLite).

Every write that adds, claims, records, releases, requeues or closes deliveries, or that makes a
subscription deliverable or not, keeps `queues` exact in the same transaction: for a live, not
DISABLED subscription, next_due_ms = min(due_ms) of its pending deliveries (NULL: none).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

import orjson
from yarl import URL

_NEXT_DUE = (
    "(SELECT min(due_ms) FROM deliveries WHERE subscription = queues.subscription"
    " AND status = 'pending')"
)


def origin_of(destination: str) -> str:
    """scheme://host:port of a destination: the unit of per-destination limits and breaking."""
    try:
        u = URL(destination)
        return f"{u.scheme}://{u.host}:{u.port}"
    except (ValueError, TypeError):
        return destination


def register_functions(conn: sqlite3.Connection) -> None:
    """SQL functions migrations use (pusherd_origin)."""
    conn.create_function("pusherd_origin", 1, origin_of, deterministic=True)


def id_list(items: Iterable[object]) -> str:
    """A JSON array for `IN (SELECT value FROM json_each(?))`: one statement for any number."""
    return orjson.dumps(list(dict.fromkeys(items))).decode()


def refresh(conn: sqlite3.Connection, subscriptions: Iterable[str]) -> None:
    """Recompute next_due_ms of these subscriptions' queues (no-op for undeliverable ones)."""
    conn.execute(
        f"UPDATE queues SET next_due_ms = {_NEXT_DUE}"
        " WHERE subscription IN (SELECT value FROM json_each(?))",
        (id_list(subscriptions),),
    )


def fresh_rows(conn: sqlite3.Connection, subscriptions: Iterable[str], due_ms: int) -> None:
    """New pending rows due at due_ms were added to these subscriptions."""
    conn.execute(
        "UPDATE queues SET next_due_ms = ?1 WHERE subscription IN (SELECT value FROM json_each(?2))"
        " AND (next_due_ms IS NULL OR next_due_ms > ?1)",
        (due_ms, id_list(subscriptions)),
    )


def sync(conn: sqlite3.Connection, subscription: str) -> None:
    """Create, update or drop a subscription's queue after the subscription itself changed."""
    row = conn.execute(
        "SELECT destination, status, deleted_ms FROM subscriptions WHERE uuid = ?",
        (subscription,),
    ).fetchone()
    if row is None or row[2] is not None or row[1] == "DISABLED":
        conn.execute("DELETE FROM queues WHERE subscription = ?", (subscription,))
        return
    conn.execute(
        "INSERT INTO queues (subscription, origin, next_due_ms) VALUES (?1, ?2,"
        " (SELECT min(due_ms) FROM deliveries WHERE subscription = ?1 AND status = 'pending'))"
        " ON CONFLICT (subscription) DO UPDATE SET origin = excluded.origin,"
        " next_due_ms = excluded.next_due_ms",
        (subscription, origin_of(row[0])),
    )
