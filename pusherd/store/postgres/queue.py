"""Ingest and the delivery queue on PostgreSQL: fan-out, claims, records, hand-backs, closing.

Ingest matches events to subscriptions here (a per-organization cache of fan-out targets,
dropped by the change feed, which other processes' changes reach through NOTIFY) and hands the
rest to the GroupWriter. Claims are pusherd_claim (claims.py): per_destination held across every
process. Each claimed row's fencing token is remembered here, so that record_attempt
(records.py) finishes it only while this process's lease is the current one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import orjson

from pusherd.store.changes import Change, ChangeFeed
from pusherd.store.postgres import claims
from pusherd.store.postgres.copy import origin_of
from pusherd.store.postgres.dbclock import DbClock
from pusherd.store.postgres.directory import refresh_queues
from pusherd.store.postgres.feed import QUEUED
from pusherd.store.postgres.ingest import EventIn, EventOut, GroupWriter
from pusherd.store.postgres.pool import Pool
from pusherd.store.types import (
    Claim,
    ClaimedDelivery,
    IngestResult,
    Matcher,
    NewEvent,
    Taker,
)

# A row handed back without an attempt is due at once and keeps its place in ingest order.
_DUE_AGAIN = "CASE WHEN schedule_pos = 0 THEN least(created_ms, $1) ELSE $1 END"


@dataclass(frozen=True)
class Target:
    """A subscription events of its organization may fan out to."""

    uuid: str
    origin: str
    event_names: list[str]
    scopes: list[str]


def _result(out: EventOut) -> IngestResult:
    if out.duplicate:
        return IngestResult(out.message_uuid, out.message_id, out.delivery_count, True)
    return IngestResult(
        out.message_uuid, out.message_id, len(out.delivery_ids), False, out.delivery_ids
    )


# Rows an origin's attempts may have claimed and ready behind them, per slot (the dispatcher's
# QUEUE_FACTOR); and the most any claim counts (a PostgreSQL integer).
READY_FACTOR = 3
# A row keeps its lease until its record commits, after its slot is free: as many rows again may
# be being recorded as the dispatcher holds in flight and ready (issue 12: counted against the
# rows ready, they left the attempts without rows behind them while a group commit ran).
RECORDING_FACTOR = 2
UNLIMITED_LEASES = 2**31 - 1


class Queue:
    """Ingest and the dispatcher's side (mixed into PostgresStore)."""

    pool: Pool
    clock: DbClock
    changes: ChangeFeed
    sender: str
    writer: GroupWriter
    per_destination: int
    targets_cache: dict[str, list[Target]]
    leases: dict[int, int]  # delivery id -> fencing token of this process's current lease
    taker: Taker | None

    # -- ingest --------------------------------------------------------------------------------

    async def _targets(self, organization: str) -> list[Target]:
        cached = self.targets_cache.get(organization)
        if cached is not None:
            return cached
        rows = await self.pool.fetch(
            "SELECT uuid, destination, event_names, scopes FROM subscriptions"
            " WHERE organization = $1 AND deleted_ms IS NULL AND status <> 'DISABLED'"
            " ORDER BY created_ms, uuid",
            organization,
        )
        found = [
            Target(r[0], origin_of(r[1]), orjson.loads(r[2]), orjson.loads(r[3])) for r in rows
        ]
        self.targets_cache[organization] = found
        return found

    async def ingest(self, events: Sequence[NewEvent], matches: Matcher) -> list[IngestResult]:
        """Store events and a delivery per matching subscription, in the next group commit."""
        batch = []
        for e in events:
            targets = await self._targets(e.organization)
            wanted = [
                (t.uuid, t.origin)
                for t in targets
                if matches(e.event_name, t.event_names, t.scopes)
            ]
            batch.append(
                EventIn(e.organization, e.event_name, e.payload, e.message_id, e.timestamp, wanted)
            )
        outs = await self.writer.write(batch)
        # Deliveries handed over leased need no claim: only the others wake the dispatcher.
        if any(len(o.delivery_ids) > o.handed for o in outs if not o.duplicate):
            self.changes.announce(QUEUED)
        return [_result(o) for o in outs]

    async def send_to(self, event: NewEvent, subscriptions: Sequence[str]) -> IngestResult:
        """Store one event addressed to the given subscriptions only (test sends)."""
        rows = await self.pool.fetch(
            "SELECT uuid, destination FROM subscriptions WHERE uuid = ANY($1::text[])",
            list(subscriptions),
        )
        origins = {r[0]: origin_of(r[1]) for r in rows}
        wanted = [(s, origins[s]) for s in subscriptions if s in origins]
        e = EventIn(
            event.organization, event.event_name, event.payload, event.message_id,
            event.timestamp, wanted,
        )  # fmt: skip
        (result,) = [_result(o) for o in await self.writer.write([e])]
        if result.deliveries:
            self.changes.announce(Change("deliveries_queued", event.organization))
        return result

    async def take_fresh(self, taker: Taker | None) -> None:
        """From now on, ingests of this process hand fresh deliveries to taker (None: stop)."""
        self.taker = taker
        self.writer.taker = taker

    # -- claims --------------------------------------------------------------------------------

    async def due_at(self, blocked: Collection[str] = ()) -> int | None:
        """The earliest next due time of any queue whose origin is not blocked (on this
        process's clock, as the dispatcher compares it)."""
        value = await self.pool.fetchval(
            "SELECT min(next_due_ms) FROM queues WHERE next_due_ms IS NOT NULL"
            " AND NOT (origin = ANY($1::text[]))",
            list(blocked),
        )
        return None if value is None else self.clock.to_local(int(value))

    async def may_have_changed(self) -> bool:
        """Always True: other processes' commits reach this one through LISTEN/NOTIFY, whose
        loss the poll is there to cover, so the poll always looks."""
        return True

    async def origins_in_use(self, origins: Collection[str]) -> set[str]:
        """Those of these origins that some deliverable subscription points at."""
        if not origins:
            return set()
        rows = await self.pool.fetch(
            "SELECT DISTINCT origin FROM queues WHERE origin = ANY($1::text[])", list(origins)
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
        """Lease due deliveries (pusherd_claim), judged by the database's clock; the next due
        time comes back on this process's clock (a dispatcher whose clock runs ahead would
        otherwise find it past, and claim in a loop)."""
        if self.clock.stale():
            await self.clock.measure(self.pool)
        # Not while an ingest of this process hands rows over: its queue rows and origin
        # locks would make the claim skip them (and it comes back only when woken again).
        async with self.writer.handing:
            got = await self._claim(owner, room, default_room, budget, lease_ms, default_total)
        now = self.clock.now_ms()  # prev_key_until_ms is on the database's clock
        out = []
        for r in got.rows:
            self.leases[int(r["id"])] = int(r["lease_token"])
            keys = claims.signing_keys(
                r["signing_key"], r["prev_signing_key"], r["prev_key_until_ms"], now
            )
            out.append(
                ClaimedDelivery(
                    id=int(r["id"]),
                    subscription=r["subscription"],
                    attempts=int(r["attempts"]),
                    schedule_pos=int(r["schedule_pos"]),
                    organization=r["organization"],
                    message_uuid=r["message_uuid"],
                    event_name=r["event_name"],
                    message_id=r["message_id"],
                    payload=r["payload"],
                    timestamp=r["timestamp"],
                    destination=r["destination"],
                    signing_keys=keys,
                )
            )
        next_due = None if got.next_due_ms is None else self.clock.to_local(got.next_due_ms)
        return Claim(out, got.more, next_due)

    async def _claim(
        self,
        owner: str,
        room: Mapping[str, int],
        default_room: int,
        budget: int,
        lease_ms: int,
        default_total: int | None,
    ) -> claims.Claimed:
        return await claims.claim(
            self.pool,
            owner,
            room,
            default_room,
            max(budget, 0),
            self.per_destination,
            None,
            lease_ms,
            default_total,
            # Alone on an origin, rows ready behind the attempts in flight, as the dispatcher
            # asks for (its own per_destination keeps the attempts within the limit), and those
            # being recorded.
            min(self.per_destination * (1 + READY_FACTOR) * RECORDING_FACTOR, UNLIMITED_LEASES),
        )

    # -- hand-backs and closing ----------------------------------------------------------------

    async def release(self, owner: str, ids: Sequence[int]) -> None:
        """Give leased deliveries back without spending an attempt, due at once."""
        if not ids:
            return
        async with self.pool.transaction() as conn:
            rows = await conn.fetch(
                "UPDATE deliveries SET lease_owner = NULL, lease_token = NULL,"
                f" lease_until_ms = NULL, due_ms = {_DUE_AGAIN}"
                " WHERE id = ANY($2::bigint[]) AND status = 'pending' AND lease_owner = $3"
                " RETURNING subscription",
                self.clock.now_ms(),
                list(ids),
                owner,
            )
            await refresh_queues(conn, (r[0] for r in rows))
        for i in ids:
            self.leases.pop(i, None)

    async def recover_leases(self, is_dead: Callable[[str], bool]) -> int:
        """Make rows leased by dead owners due now; how many. (On PostgreSQL a lease also
        runs out by itself: its row is due again at the lease's end, for any process.)"""
        now = self.clock.now_ms()
        owners = await self.pool.fetch(
            "SELECT DISTINCT lease_owner FROM deliveries"
            " WHERE status = 'pending' AND lease_owner IS NOT NULL AND lease_until_ms > $1",
            now,
        )
        dead = [str(r[0]) for r in owners if is_dead(str(r[0]))]
        if not dead:
            return 0
        async with self.pool.transaction() as conn:
            rows = await conn.fetch(
                "UPDATE deliveries SET lease_owner = NULL, lease_token = NULL,"
                f" lease_until_ms = NULL, due_ms = {_DUE_AGAIN}"
                " WHERE status = 'pending' AND lease_owner = ANY($2::text[])"
                " AND lease_until_ms > $1 RETURNING subscription",
                now,
                dead,
            )
            await refresh_queues(conn, (r[0] for r in rows))
        return len(rows)

    async def subscriptions_to_close(self) -> list[str]:
        """Deleted or DISABLED subscriptions that may still have pending deliveries."""
        rows = await self.pool.fetch(
            "SELECT uuid FROM subscriptions s WHERE (deleted_ms IS NOT NULL OR status = 'DISABLED')"
            " AND EXISTS (SELECT 1 FROM deliveries d WHERE d.subscription = s.uuid"
            " AND d.status = 'pending')"
        )
        return [str(r[0]) for r in rows]

    async def close_pending(self, subscription: str, batch: int) -> tuple[str, int]:
        """Finish up to `batch` pending deliveries of a deleted ("cancelled") or DISABLED
        ("failed") subscription: (that status, how many)."""
        async with self.pool.transaction() as conn:
            row = await conn.fetchrow(
                "SELECT status, deleted_ms FROM subscriptions WHERE uuid = $1", subscription
            )
            if row is None:
                return "", 0
            if row[1] is not None:
                status, error = "cancelled", "subscription deleted"
            elif row[0] == "DISABLED":
                status, error = "failed", "subscription disabled"
            else:
                return "", 0
            n = await conn.fetchval(
                "WITH done AS (UPDATE deliveries SET status = $1, finished_ms = $2,"
                " last_error = $3, lease_owner = NULL, lease_token = NULL, lease_until_ms = NULL"
                " WHERE id IN (SELECT id FROM deliveries WHERE subscription = $4"
                " AND status = 'pending' ORDER BY id LIMIT $5 FOR UPDATE SKIP LOCKED)"
                " RETURNING 1) SELECT count(*) FROM done",
                status,
                self.clock.now_ms(),
                error,
                subscription,
                batch,
            )
            await refresh_queues(conn, [subscription])
        return status, int(n)
