"""asyncpg vs psycopg 3 (with psycopg_pool) on pusherd's two PostgreSQL hot paths.

Usage: python bench/pg_drivers.py [--events N] [--runs N] [--only asyncpg|psycopg|psycopg-b]

Starts its own PostgreSQL (tests/pg.py: installed server binaries, a temporary directory, fsync
and synchronous_commit on) with pusherd's PostgreSQL schema, and measures each driver on uvloop,
in this one process, with the same SQL text:

- ingest: concurrent tasks each submit events (1 per request from 64 tasks, or 100 per request from
  8 tasks) to a group writer; whatever is waiting when a pool connection is free is written by ONE
  autocommit statement (one round trip, one transaction, one WAL flush): a CTE that inserts the
  events from arrays (`unnest`, ON CONFLICT (organization, message_id) DO NOTHING), their
  deliveries, and marks their queues due. Up to 4 groups are in flight at once.
- roundtrip: 5,000 sequential `SELECT $1 + 1` from one task: latency and CPU per round trip.
- claim: 20,000 pending deliveries over 50 subscriptions; 4 tasks each claim up to 8 due rows
  of a subscription (`UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 8)
  RETURNING`, joined to the events for the payload) and record them delivered with one fenced
  UPDATE, until the queue is empty.

asyncpg's pool runs a reset query (RESET ALL, UNLISTEN *, ...) on every release by default: one
more round trip per statement. pusherd leaves no session state on pooled connections (advisory
locks are transaction-scoped, LISTEN has its own connection), so the pool is made without it.
psycopg runs in two ways: its default text-format parameters, and binary both ways (psycopg-b).

Figures: events (or deliveries) per second of wall time, and this process's CPU per event, which
is what the driver costs the daemon (the server's CPU is the same SQL for both). Median of --runs,
the drivers interleaved run by run so that a noisy neighbour hurts both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import payload  # noqa: E402

from pusherd.store.ids import IdSource  # noqa: E402
from tests.pg import PgServer, launch  # noqa: E402

ORG = "5a0b9c1e-1d2f-4a3b-8c4d-111111111111"
ORIGIN = "http://127.0.0.1:9"
SUBS = [f"00000000-0000-4000-8000-{i:012d}" for i in range(50)]
POOL_SIZE = 4
SCHEMA = ROOT / "pusherd/store/postgres/migrations/0001_initial.sql"

INGEST_SQL = """
WITH new_events AS (
    INSERT INTO events (uuid, organization, event_name, message_id, payload, timestamp, created_ms)
    SELECT u, o, n, m, p, t, $7 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
        $5::text[], $6::text[]) AS x(u, o, n, m, p, t)
    ON CONFLICT (organization, message_id) DO NOTHING
    RETURNING seq, organization, message_id
), new_deliveries AS (
    INSERT INTO deliveries (event_seq, subscription, origin, status, due_ms, created_ms)
    SELECT e.seq, f.s, f.g, 'pending', $7, $7
    FROM unnest($8::text[], $9::text[], $10::text[], $11::text[]) AS f(o, m, s, g)
    JOIN new_events e ON e.organization = f.o AND e.message_id = f.m
    RETURNING id, event_seq
), due AS (
    UPDATE queues SET next_due_ms = $7
    WHERE subscription = ANY($10::text[]) AND (next_due_ms IS NULL OR next_due_ms > $7)
)
SELECT e.seq, e.message_id, d.id FROM new_events e LEFT JOIN new_deliveries d ON d.event_seq = e.seq
"""

CLAIM_SQL = """
WITH claimed AS (
    UPDATE deliveries
    SET lease_owner = $1, lease_token = nextval('lease_tokens'), lease_until_ms = $2, due_ms = $2
    WHERE id IN (
        SELECT id FROM deliveries
        WHERE subscription = $3 AND status = 'pending' AND due_ms <= $4
        ORDER BY due_ms, id LIMIT $5
        FOR UPDATE SKIP LOCKED
    )
    RETURNING id, event_seq, subscription, attempts, schedule_pos, lease_token
)
SELECT c.id, c.subscription, c.attempts, c.schedule_pos, c.lease_token, e.organization, e.uuid,
    e.event_name, e.message_id, e.payload, e.timestamp
FROM claimed c JOIN events e ON e.seq = c.event_seq ORDER BY c.id
"""

RECORD_SQL = """
WITH done AS (
    UPDATE deliveries d SET status = 'delivered', attempts = d.attempts + 1, finished_ms = $3,
        last_attempt_ms = $3, last_status_code = 200, lease_owner = NULL, lease_token = NULL,
        lease_until_ms = NULL
    FROM unnest($1::bigint[], $2::bigint[]) AS r(id, token)
    WHERE d.id = r.id AND d.lease_token = r.token
    RETURNING d.id
)
INSERT INTO attempts (delivery_id, started_ms, duration_ms, status_code)
SELECT id, $3, 1.0, 200 FROM done
"""

Runner = Callable[[str, Sequence[Any]], Awaitable[list[Sequence[Any]]]]


class Driver:
    """A pool of autocommit connections that runs one statement and returns its rows."""

    name = ""
    module = ""

    async def open(self, url: str) -> None:
        raise NotImplementedError

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Sequence[Any]]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class Asyncpg(Driver):
    name = "asyncpg"
    module = "asyncpg"

    async def open(self, url: str) -> None:
        import asyncpg

        async def keep_session(con: Any) -> None:
            """Release without asyncpg's reset query (RESET ALL, UNLISTEN *, unlock all...):
            a round trip per release, for session state pusherd never leaves behind."""

        self.pool = await asyncpg.create_pool(
            url, min_size=POOL_SIZE, max_size=POOL_SIZE, reset=keep_session
        )

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Sequence[Any]]:
        async with self.pool.acquire() as con:
            return list(await con.fetch(sql, *args))

    async def close(self) -> None:
        await self.pool.close()


class Psycopg(Driver):
    name = "psycopg"
    module = "psycopg_pool"
    placeholder = "s"  # text-format parameters (psycopg's default)
    binary = False

    async def open(self, url: str) -> None:
        import psycopg_pool

        # $n placeholders are asyncpg's; psycopg takes %s (the same statements otherwise).
        self.pool = psycopg_pool.AsyncConnectionPool(
            url,
            min_size=POOL_SIZE,
            max_size=POOL_SIZE,
            kwargs={"autocommit": True, "prepare_threshold": 0},
            open=False,
        )
        await self.pool.open(wait=True)
        self._sql: dict[str, str] = {}

    def _text(self, sql: str) -> str:
        text = self._sql.get(sql)
        if text is None:
            import re

            text = self._sql[sql] = re.sub(
                r"\$(\d+)", lambda m: f"%(p{m.group(1)}){self.placeholder}", sql
            )
        return text

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Sequence[Any]]:
        params = {f"p{i}": v for i, v in enumerate(args, start=1)}
        async with self.pool.connection() as con:
            cur = await con.execute(self._text(sql), params, binary=self.binary)
            return list(await cur.fetchall()) if cur.description else []

    async def close(self) -> None:
        await self.pool.close()


class PsycopgBinary(Psycopg):
    """psycopg with parameters (%b) and results in binary format, as asyncpg always does."""

    name = "psycopg-b"
    placeholder = "b"
    binary = True


class GroupWriter:
    """Writes whatever is waiting as one statement when a connection is free (group commit)."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.ids = IdSource()
        self.waiting: list[tuple[list[str], asyncio.Future[int]]] = []
        self.slots = asyncio.Semaphore(POOL_SIZE)
        self.flush_scheduled = False
        self.groups = 0
        self.tasks: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references

    async def submit(self, payloads: list[str]) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting.append((payloads, fut))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            task = asyncio.get_running_loop().create_task(self._flush())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return await fut

    async def _flush(self) -> None:
        async with self.slots:
            # Everything that queued while we waited for a free connection goes together.
            batch, self.waiting = self.waiting, []
            self.flush_scheduled = False
            now = int(time.time() * 1000)
            events = [
                (p, self.ids.uuid7(), SUBS[i % len(SUBS)])
                for i, p in enumerate(p for payloads, _ in batch for p in payloads)
            ]
            n = len(events)
            args = (
                [self.ids.uuid1() for _ in range(n)],
                [ORG] * n,
                ["ProductCreated"] * n,
                [m for _, m, _ in events],
                [p for p, _, _ in events],
                ["2026-11-22T14:30:00.123Z"] * n,
                now,
                [ORG] * n,
                [m for _, m, _ in events],
                [s for _, _, s in events],
                [ORIGIN] * n,
            )
            try:
                rows = await self.driver.fetch(INGEST_SQL, args)
            except BaseException as exc:
                for _, fut in batch:
                    fut.set_exception(exc)
                raise
            self.groups += 1
            assert len(rows) == n, (len(rows), n)
            for payloads, fut in batch:
                fut.set_result(len(payloads))


async def ingest_run(driver: Driver, total: int, tasks: int, per_request: int) -> dict[str, float]:
    writer = GroupWriter(driver)
    body = orjson.dumps(payload()).decode()
    left = itertools.count()

    async def producer() -> None:
        while next(left) * per_request < total:
            await writer.submit([body] * per_request)

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(producer() for _ in range(tasks)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    n = total
    return {"eps": n / wall, "cpu_us": cpu / n * 1e6, "per_group": n / max(1, writer.groups)}


async def claim_run(driver: Driver, tasks: int, limit: int) -> dict[str, float]:
    subs = itertools.cycle(SUBS)
    empty: set[str] = set()
    latencies: list[float] = []
    delivered = 0

    async def claimer(owner: str) -> None:
        nonlocal delivered
        while len(empty) < len(SUBS):
            sub = next(subs)
            if sub in empty:
                continue
            now = int(time.time() * 1000)
            t = time.perf_counter()
            rows = await driver.fetch(CLAIM_SQL, (owner, now + 30_000, sub, now, limit))
            latencies.append(time.perf_counter() - t)
            if not rows:
                empty.add(sub)
                continue
            await driver.fetch(RECORD_SQL, ([r[0] for r in rows], [r[4] for r in rows], now))
            delivered += len(rows)

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(claimer(f"bench-{i}") for i in range(tasks)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    latencies.sort()
    return {
        "dps": delivered / wall,
        "cpu_us": cpu / delivered * 1e6,
        "claim_p50_ms": latencies[len(latencies) // 2] * 1e3,
        "claim_p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3,
    }


async def roundtrip_run(driver: Driver, n: int) -> dict[str, float]:
    """Sequential one-row SELECTs: the driver's own latency and CPU per round trip, no fsync."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        await driver.fetch("SELECT $1::bigint + 1", (i,))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"rtt_us": wall / n * 1e6, "cpu_us": cpu / n * 1e6}


def fill(server: PgServer, db: str, n: int) -> None:
    """n pending deliveries spread over SUBS, with their events (server-side, driver-neutral)."""
    body = orjson.dumps(payload()).decode().replace("'", "''")
    server.psql(
        db,
        "INSERT INTO events (uuid, organization, event_name, message_id, payload, timestamp,"
        f" created_ms) SELECT gen_random_uuid()::text, '{ORG}', 'ProductCreated', 'm' || i,"
        f" '{body}', '2026-11-22T14:30:00.123Z', 0 FROM generate_series(1, {n}) i;"
        " INSERT INTO deliveries (event_seq, subscription, origin, status, due_ms, created_ms)"
        f" SELECT seq, '00000000-0000-4000-8000-' || lpad((seq % {len(SUBS)})::text, 12, '0'),"
        f" '{ORIGIN}', 'pending', 0, 0 FROM events",
    )
    server.psql(db, "VACUUM ANALYZE")


async def measure(driver: Driver, server: PgServer, kind: str, n: int) -> dict[str, float]:
    db = server.create_database("pusherd_bench")
    try:
        if kind == "claim":
            fill(server, db, n)
        await driver.open(server.url(db))
        try:
            if kind == "roundtrip":
                return await roundtrip_run(driver, n // 4)
            if kind == "ingest1":
                return await ingest_run(driver, n, tasks=64, per_request=1)
            if kind == "ingest100":
                return await ingest_run(driver, n, tasks=8, per_request=100)
            return await claim_run(driver, tasks=4, limit=8)
        finally:
            await driver.close()
    finally:
        server.drop_database(db)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=["asyncpg", "psycopg", "psycopg-b"])
    args = parser.parse_args()
    drivers: list[type[Driver]] = []
    for d in (Asyncpg, Psycopg, PsycopgBinary):
        if args.only not in (None, d.name):
            continue
        if importlib.util.find_spec(d.module) is None:
            # asyncpg is pusherd's; psycopg is only here to be compared with.
            print(f"{d.name}: not installed (pip install 'psycopg[binary]' psycopg_pool)")
            continue
        drivers.append(d)
    server = launch()
    try:
        server.psql("postgres", "CREATE DATABASE pusherd_bench")
        server.psql("pusherd_bench", SCHEMA.read_text())
        server.psql(
            "pusherd_bench",
            "INSERT INTO queues (subscription, origin, next_due_ms) SELECT s, "
            f"'{ORIGIN}', NULL FROM unnest(ARRAY{SUBS!r}::text[]) s",
        )
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for run in range(args.runs):
            for kind in ("roundtrip", "ingest1", "ingest100", "claim"):
                for cls in drivers:
                    r = uvloop.run(measure(cls(), server, kind, args.events))
                    results.setdefault((kind, cls.name), []).append(r)
                    print(f"run {run + 1} {kind:9} {cls.name:8} {fmt(r)}", flush=True)
        print("\nmedians:")
        for (kind, name), rs in results.items():
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            print(f"{kind:9} {name:8} {fmt(med)}")
    finally:
        server.cleanup()


def fmt(r: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:,.1f}" for k, v in r.items())


if __name__ == "__main__":
    main()
