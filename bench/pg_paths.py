"""pusherd's own PostgreSQL paths, before the store is wired in: ingest and claim + record.

Usage: python bench/pg_paths.py [--events N] [--runs N]

Starts its own PostgreSQL (tests/pg.py: fsync and synchronous_commit on) and measures, on
uvloop in this one process:
- ingest: 64 tasks each writing one ~1 KiB event at a time through store/postgres/ingest.py's
  GroupWriter (one statement per group), each event fanning out to one of 50 subscriptions;
- drain, few queues: N pending deliveries of one subscription (per_destination 8): 2 claimers
  call pusherd_claim and record each claimed batch with one finish_many;
- drain, many queues: 10,000 subscriptions over 50 origins with 2 pending deliveries each, the
  same claimers (budget 128), and then the cost of a claim when nothing is due.
Figures: rate of wall time, this process's CPU per event (the server's is not counted), claim
latency percentiles, rows per claim. The machine is shared: compare runs of the same moment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

import orjson
import structlog
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import payload  # noqa: E402

from pusherd.store.postgres.claims import Outcome, claim, finish_many  # noqa: E402
from pusherd.store.postgres.ingest import EventIn, GroupWriter  # noqa: E402
from pusherd.store.postgres.migrate import migrate_url  # noqa: E402
from pusherd.store.postgres.pool import Pool  # noqa: E402
from tests.pg import PgServer, launch  # noqa: E402

ORG = "5a0b9c1e-1d2f-4a3b-8c4d-111111111111"

_FILL = """
INSERT INTO subscriptions (uuid, organization, transport, event_names, scopes, destination,
    status, signing_key, created_ms, updated_ms)
SELECT 's' || i, 'org', 'WEBHOOK', '[]', '[]', 'https://o' || (i % {origins}) || '.example/h',
    'ACTIVE', 'k', 0, 0 FROM generate_series(1, {subs}) i;
INSERT INTO events (uuid, organization, event_name, message_id, payload, timestamp, created_ms)
SELECT 'u' || i, 'org', 'E', 'm' || i, '{{}}', 'ts', 0 FROM generate_series(1, {rows}) i;
INSERT INTO deliveries (event_seq, subscription, origin, status, due_ms, created_ms)
SELECT seq, 's' || (1 + seq % {subs}),
    'https://o' || ((1 + seq % {subs}) % {origins}) || '.example:443', 'pending', seq, 0
FROM events;
INSERT INTO queues
SELECT uuid, 'https://o' || (substr(uuid, 2)::int % {origins}) || '.example:443',
    (SELECT min(due_ms) FROM deliveries WHERE subscription = uuid)
FROM subscriptions;
ANALYZE;
"""


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def ingest(url: str, n: int) -> str:
    pool = Pool(url, max_size=4)
    await pool.open()
    try:
        subs = [(f"s{i}", f"https://o{i % 10}.example:443") for i in range(50)]
        for sub, origin in subs:
            await pool.execute("INSERT INTO queues VALUES ($1, $2, NULL)", sub, origin)
        body = orjson.dumps(payload()).decode()
        writer = GroupWriter(pool)
        left = iter(range(n))

        async def producer() -> None:
            for i in left:
                await writer.write(
                    [EventIn(ORG, "ProductCreated", body, None, None, [subs[i % 50]])]
                )

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(64)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        return (
            f"ingest 64x1      {n / wall:9,.0f} events/s  {cpu / n * 1e6:5.1f} us CPU/event"
            f"  {n / writer.groups_written:.1f} events/group"
        )
    finally:
        await pool.close()


async def drain(url: str, label: str, budget: int) -> str:
    pool = Pool(url, max_size=4)
    await pool.open()
    try:
        done, claims, latencies = 0, 0, []

        async def claimer(owner: str) -> None:
            nonlocal done, claims
            while True:
                t = time.perf_counter()
                got = await claim(pool, owner, {}, 8, budget, 8, None, 30_000)
                latencies.append(time.perf_counter() - t)
                claims += 1
                if not got.rows:
                    if not got.more:
                        return
                    continue
                now = int(time.time() * 1000)
                ok = Outcome("delivered", 0, None, now, 1.0, 200, None)
                await finish_many(pool, owner, [(r["id"], r["lease_token"], ok) for r in got.rows])
                done += len(got.rows)

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(claimer("p1"), claimer("p2"))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        line = (
            f"drain {label:10} {done / wall:9,.0f} deliveries/s  {cpu / done * 1e6:5.1f} us CPU/del"
            f"  claim p50 {pct(latencies, 0.5) * 1e3:.1f} ms"
            f" p99 {pct(latencies, 0.99) * 1e3:.1f} ms"
            f"  {done / claims:.1f} rows/claim"
        )
        t = time.perf_counter()
        for _ in range(50):
            await claim(pool, "idle", {}, 8, budget, 8, None, 30_000)
        return line + f"  idle claim {(time.perf_counter() - t) / 50 * 1e3:.2f} ms"
    finally:
        await pool.close()


async def run(server: PgServer, n: int) -> None:
    for kind in ("ingest", "few", "many"):
        db = server.create_database()
        url = server.url(db)
        try:
            await migrate_url(url)
            if kind == "ingest":
                print(await ingest(url, n), flush=True)
            elif kind == "few":
                server.psql(db, _FILL.format(subs=1, origins=1, rows=n))
                print(await drain(url, "1 queue", 64), flush=True)
            else:
                server.psql(db, _FILL.format(subs=10_000, origins=50, rows=20_000))
                print(await drain(url, "10k queues", 128), flush=True)
        finally:
            server.drop_database(db)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    server = launch()
    try:
        for _ in range(args.runs):
            uvloop.run(run(server, args.events))
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
