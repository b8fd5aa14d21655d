"""The delivery queue's claim side (SQLite): what is due, leases, hand-backs, closing.

A claim reads the queues (one row per deliverable subscription with its next due time) through
their (origin, next_due_ms) index on the loop's quick reader: one seek per origin with pending
work, then up to the room of each origin with room; an idle poll writes nothing. Only when
something is due does it lease rows, per subscription in due order, in one write that also moves
those subscriptions' next due times.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection, Mapping, Sequence

from pusherd.clock import now_ms
from pusherd.store.changes import ChangeFeed
from pusherd.store.sqlite import queues
from pusherd.store.sqlite.db import Database
from pusherd.store.types import Claim, ClaimedDelivery

_ORIGINS_PER_READ = 200  # origins read in one compound statement (SQLite allows 500 terms)

# Every origin with pending work and its earliest next due time (a skip through the
# (origin, next_due_ms) index, one seek per origin), those with something due now only, then
# one row (NULL, the earliest due time after now).
_ORIGINS_DUE = (
    "WITH RECURSIVE o(origin) AS ("
    " SELECT (SELECT min(origin) FROM queues WHERE next_due_ms IS NOT NULL)"
    " UNION ALL SELECT (SELECT min(origin) FROM queues WHERE next_due_ms IS NOT NULL"
    " AND origin > o.origin) FROM o WHERE o.origin IS NOT NULL)"
    " SELECT * FROM (SELECT origin, (SELECT min(next_due_ms) FROM queues q"
    " WHERE q.origin = o.origin AND q.next_due_ms IS NOT NULL) AS first_due"
    " FROM o WHERE origin IS NOT NULL) WHERE first_due <= ?"
    " UNION ALL SELECT NULL, min(next_due_ms) FROM queues WHERE next_due_ms > ?"
)
# The same rows for named origins only (a json list), when no other origin may take rows: one
# seek each, rather than a walk over every origin with pending work (those without room too).
_NAMED_DUE = (
    "SELECT * FROM (SELECT j.value AS origin, (SELECT min(next_due_ms) FROM queues q"
    " WHERE q.origin = j.value AND q.next_due_ms IS NOT NULL) AS first_due"
    " FROM json_each(?) j) WHERE first_due <= ?"
    " UNION ALL SELECT NULL, min(next_due_ms) FROM queues WHERE next_due_ms > ?"
)
_NAMED_MAX = 16  # more origins with room than this: the walk (it only visits pending ones)
# Up to n due queues of one origin, in due order: its range of the same index.
_DUE_OF_ORIGIN = (
    "SELECT * FROM (SELECT subscription, origin FROM queues WHERE origin = ?"
    " AND next_due_ms <= ? ORDER BY next_due_ms LIMIT ?)"
)

# A row handed back without an attempt is due at once, and keeps its place in ingest order:
# a claim moved its due time to the lease's end, a row never attempted goes back to its creation
# time (one waiting for a retry keeps "now"). Both parameters are the current time.
_DUE_AGAIN = "CASE WHEN schedule_pos = 0 THEN min(created_ms, ?) ELSE ? END"


def subscriptions_of(conn: sqlite3.Connection, ids: Sequence[int]) -> list[str]:
    marks = ",".join("?" * len(ids))
    rows = conn.execute(
        f"SELECT DISTINCT subscription FROM deliveries WHERE id IN ({marks})", tuple(ids)
    ).fetchall()
    return [str(r[0]) for r in rows]


def _claim_rows(
    conn: sqlite3.Connection, owner: str, plan: Sequence[tuple[str, int]], now: int, until: int
) -> tuple[list[ClaimedDelivery], bool]:
    """Lease up to n due rows of each (subscription, n) in due order; (rows by id, whether
    some subscription gave all that was asked: it may have more)."""
    # First one row of every planned subscription, in one statement (the common case with many
    # small queues), then more rows of those that asked for more and still have some due.
    ids = [
        r[0]
        for r in conn.execute(
            "UPDATE deliveries SET lease_owner = ?, lease_until_ms = ?, due_ms = ?"
            " WHERE id IN (SELECT (SELECT d.id FROM deliveries d WHERE d.subscription = j.value"
            " AND d.status = 'pending' AND d.due_ms <= ? ORDER BY d.due_ms, d.id LIMIT 1)"
            " FROM json_each(?) j) RETURNING id",
            (owner, until, until, now, queues.id_list(sub for sub, _ in plan)),
        ).fetchall()
    ]
    queues.refresh(conn, [sub for sub, _ in plan])
    wanted = {sub: limit - 1 for sub, limit in plan if limit > 1}
    more = (
        conn.execute(
            "SELECT subscription FROM queues WHERE subscription IN (SELECT value FROM json_each(?))"
            " AND next_due_ms <= ?",
            (queues.id_list(wanted), now),
        ).fetchall()
        if wanted and ids
        else []
    )
    for (subscription,) in more:
        rows = conn.execute(
            "UPDATE deliveries SET lease_owner = ?, lease_until_ms = ?, due_ms = ?"
            " WHERE id IN (SELECT id FROM deliveries WHERE subscription = ?"
            " AND status = 'pending' AND due_ms <= ? ORDER BY due_ms, id LIMIT ?)"
            " RETURNING id",
            (owner, until, until, subscription, now, wanted[subscription]),
        ).fetchall()
        ids.extend(r[0] for r in rows)
    if more:
        queues.refresh(conn, [sub for (sub,) in more])
    # Whether a planned queue still has something due (claim again at once).
    full = bool(
        conn.execute(
            "SELECT 1 FROM queues WHERE subscription IN (SELECT value FROM json_each(?))"
            " AND next_due_ms <= ? LIMIT 1",
            (queues.id_list(sub for sub, _ in plan), now),
        ).fetchall()
    )
    if not ids:
        return [], full
    ids.sort()
    marks = ",".join("?" * len(ids))
    data = conn.execute(
        "SELECT d.id, d.subscription, d.attempts, d.schedule_pos, e.organization, e.uuid,"
        " e.event_name, e.message_id, e.payload, e.timestamp, s.destination, s.signing_key,"
        " s.prev_signing_key, s.prev_key_until_ms, s.status, s.deleted_ms"
        " FROM deliveries d JOIN events e ON e.seq = d.event_seq"
        " JOIN subscriptions s ON s.uuid = d.subscription"
        f" WHERE d.id IN ({marks}) ORDER BY d.id",
        ids,
    ).fetchall()
    out, dead = [], []
    for r in data:
        if r[14] == "DISABLED" or r[15] is not None:
            dead.append((now, now, r[0]))  # left pending for close_pending()
            continue
        keys = (r[11],) if r[12] is None or (r[13] or 0) <= now else (r[11], r[12])
        out.append(
            ClaimedDelivery(
                id=r[0],
                subscription=r[1],
                attempts=r[2],
                schedule_pos=r[3],
                organization=r[4],
                message_uuid=r[5],
                event_name=r[6],
                message_id=r[7],
                payload=r[8],
                timestamp=r[9],
                destination=r[10],
                signing_keys=keys,
            )
        )
    if dead:
        conn.executemany(
            f"UPDATE deliveries SET due_ms = {_DUE_AGAIN}, lease_owner = NULL,"
            " lease_until_ms = NULL WHERE id = ?",
            dead,
        )
    return out, full


class ClaimStore:
    """Claims, hand-backs and closing (mixed into SqliteStore)."""

    db: Database
    changes: ChangeFeed
    _data_version = -1  # the quick reader's, when the last claim read the queues

    async def due_at(self, blocked: Collection[str] = ()) -> int | None:
        """The earliest next due time of any queue whose origin is not blocked (None: none)."""
        marks = ",".join("?" * len(blocked))
        where = f" AND origin NOT IN ({marks})" if blocked else ""
        rows = self.db.read_now(
            f"SELECT min(next_due_ms) FROM queues WHERE next_due_ms IS NOT NULL{where}",
            tuple(blocked),
        )
        return None if rows[0][0] is None else int(rows[0][0])

    async def may_have_changed(self) -> bool:
        """Whether a commit (of this process or another) happened since the last claim read the
        queues: SQLite's data_version of the quick reader, one call that reads no page. Only a
        claim moves the mark, so a look that did not claim cannot lose a commit."""
        return self._version() != self._data_version

    def _version(self) -> int:
        return int(self.db.read_now("PRAGMA data_version")[0][0])

    async def origins_in_use(self, origins: Collection[str]) -> set[str]:
        """Those of these origins that some deliverable subscription points at."""
        if not origins:
            return set()
        # One index probe per origin, however many subscriptions point at it.
        rows = self.db.read_now(
            "SELECT value FROM json_each(?) WHERE EXISTS"
            " (SELECT 1 FROM queues WHERE origin = json_each.value)",
            (queues.id_list(origins),),
        )
        return {str(r[0]) for r in rows}

    async def claim(
        self,
        owner: str,
        room: Mapping[str, int],
        default_room: int,
        budget: int,
        lease_ms: int,
        default_total: int | None = None,
    ) -> Claim:
        """Lease due deliveries within each origin's room and the budget, oldest due first.

        Each origin with room names up to that many of its due subscriptions, earliest due first
        (a blocked origin's are not read); each gets a share of its origin's room, and its rows are
        taken from its range of the deliveries index in due order. Nothing is written when
        nothing is due.
        """
        now = now_ms()
        self._data_version = self._version()  # before the read: a later commit shows as a change
        plan, more, next_due = self._plan(now, room, default_room, max(budget, 0), default_total)
        if not plan:
            return Claim([], more, next_due)

        def fn(conn: sqlite3.Connection) -> tuple[list[ClaimedDelivery], bool]:
            return _claim_rows(conn, owner, plan, now, now + lease_ms)

        claimed, full = await self.db.write(fn, durable=False)
        return Claim(claimed, more or full, next_due)

    def _plan(
        self,
        now: int,
        room: Mapping[str, int],
        default_room: int,
        budget: int,
        default_total: int | None,
    ) -> tuple[list[tuple[str, int]], bool, int | None]:
        """(subscription, how many) to claim, whether due queues were left unread, and the
        earliest due time after now.

        The origins with pending work are found by skipping through the (origin, next_due_ms)
        index, one seek each; then each origin with something due and room gives up to its
        room of due queues from its own range. What is read follows what is taken, however
        many queues of origins without room are due (an idle poll is the walk and one seek).
        """
        unnamed = budget if default_total is None else default_total
        with_room = [origin for origin, n in room.items() if n > 0]
        if unnamed <= 0 and len(with_room) <= _NAMED_MAX:
            found = self.db.read_now(_NAMED_DUE, (queues.id_list(with_room), now, now))
        else:
            found = self.db.read_now(_ORIGINS_DUE, (now, now))
        after = [r[1] for r in found if r[0] is None and r[1] is not None]
        next_due = int(after[0]) if after else None
        wanted: list[tuple[str, int]] = []  # (origin, room), earliest due first
        more = False  # an origin with room and something due left for the next claim
        for origin, _ in sorted((r for r in found if r[0] is not None), key=lambda r: r[1]):
            named = origin in room
            left = room[origin] if named else min(default_room, unnamed)
            if left <= 0:
                continue
            if budget <= 0:
                more = True
                break
            left = min(left, budget)
            if not named:
                unnamed -= left
            wanted.append((origin, left))
            budget -= left
        plan: list[tuple[str, int]] = []
        for chunk in range(0, len(wanted), _ORIGINS_PER_READ):
            part = wanted[chunk : chunk + _ORIGINS_PER_READ]
            rows = self.db.read_now(
                " UNION ALL ".join([_DUE_OF_ORIGIN] * len(part)),
                [p for origin, left in part for p in (origin, now, left)],
            )
            by_origin: dict[str, list[str]] = {}
            for sub, origin in rows:
                by_origin.setdefault(origin, []).append(sub)
            for origin, left in part:
                subs = by_origin.get(origin, [])
                if not subs:
                    continue
                share = -(-left // len(subs))  # the origin's room, shared among its due queues
                for sub in subs:
                    n = min(share, left)
                    if n <= 0:
                        break
                    plan.append((sub, n))
                    left -= n
        return plan, more, next_due

    async def release(self, owner: str, ids: Sequence[int]) -> None:
        """Give leased deliveries back without spending an attempt, due at once."""
        if not ids:
            return

        def fn(conn: sqlite3.Connection) -> None:
            now = now_ms()
            conn.executemany(
                f"UPDATE deliveries SET lease_owner = NULL, lease_until_ms = NULL,"
                f" due_ms = {_DUE_AGAIN} WHERE id = ? AND status = 'pending' AND lease_owner = ?",
                [(now, now, i, owner) for i in ids],
            )
            queues.refresh(conn, subscriptions_of(conn, ids))

        await self.db.write(fn, urgent=False, durable=False)

    async def subscriptions_to_close(self) -> list[str]:
        """Deleted or DISABLED subscriptions that may still have pending deliveries."""
        # Walks the distinct subscriptions of the pending index (one seek each) rather than
        # every subscription: asked every minute, it costs what is pending, not the number of
        # subscriptions (a scan of 100,000 of them was most of an idle daemon's minute).
        rows = await self.db.read(
            "WITH RECURSIVE pending(sub) AS ("
            " SELECT (SELECT min(subscription) FROM deliveries WHERE status = 'pending')"
            " UNION ALL SELECT (SELECT min(subscription) FROM deliveries"
            " WHERE status = 'pending' AND subscription > pending.sub)"
            " FROM pending WHERE pending.sub IS NOT NULL)"
            " SELECT s.uuid FROM pending JOIN subscriptions s ON s.uuid = pending.sub"
            " WHERE s.deleted_ms IS NOT NULL OR s.status = 'DISABLED'"
        )
        return [str(r[0]) for r in rows]

    async def close_pending(self, subscription: str, batch: int) -> tuple[str, int]:
        """Finish up to `batch` pending deliveries of a deleted ("cancelled") or DISABLED
        ("failed") subscription: (that status, how many); 0 when none or it is live again."""

        def fn(conn: sqlite3.Connection) -> tuple[str, int]:
            row = conn.execute(
                "SELECT status, deleted_ms FROM subscriptions WHERE uuid = ?", (subscription,)
            ).fetchone()
            if row is None:
                return "", 0
            if row[1] is not None:
                status, error = "cancelled", "subscription deleted"
            elif row[0] == "DISABLED":
                status, error = "failed", "subscription disabled"
            else:
                return "", 0
            cur = conn.execute(
                "UPDATE deliveries SET status = ?, finished_ms = ?, last_error = ?,"
                " lease_owner = NULL, lease_until_ms = NULL"
                " WHERE id IN (SELECT id FROM deliveries WHERE subscription = ?"
                " AND status = 'pending' LIMIT ?)",
                (status, now_ms(), error, subscription, batch),
            )
            queues.refresh(conn, [subscription])
            return status, cur.rowcount

        return await self.db.write(fn)

    async def recover_leases(self, is_dead: Callable[[str], bool]) -> int:
        """Make rows leased or parked by dead owners due now; returns how many.

        Only rows due in the future are looked at (a range of the due index): rows whose lease
        has already run out are claimable anyway.
        """
        now = now_ms()
        owners = await self.db.read(
            "SELECT DISTINCT lease_owner FROM deliveries"
            " WHERE status = 'pending' AND due_ms > ? AND lease_owner IS NOT NULL",
            (now,),
        )
        dead = [str(r[0]) for r in owners if is_dead(str(r[0]))]
        if not dead:
            return 0

        def fn(conn: sqlite3.Connection) -> int:
            freed = 0
            for owner in dead:
                subs = conn.execute(
                    "SELECT DISTINCT subscription FROM deliveries WHERE status = 'pending'"
                    " AND due_ms > ? AND lease_owner = ?",
                    (now, owner),
                ).fetchall()
                cur = conn.execute(
                    f"UPDATE deliveries SET due_ms = {_DUE_AGAIN}, lease_owner = NULL,"
                    " lease_until_ms = NULL"
                    " WHERE id IN (SELECT id FROM deliveries WHERE status = 'pending'"
                    " AND due_ms > ? AND lease_owner = ?)",
                    (now, now, now, owner),
                )
                queues.refresh(conn, [str(r[0]) for r in subs])
                freed += cur.rowcount
            return freed

        return await self.db.write(fn)
