"""Delivery history written straight into a pusherd SQLite file, for the console's charts.

Used by the browser tests (a day of history behind the overview) and, as a script, to build a
large file and time the console's page views on it:

    python -m tests.console_seed FILE --deliveries 1000000 --span 24h

History in the past cannot be made through the store interface (it stamps rows with the present),
so seed_history writes the SQLite file's tables directly: the one SQLite-specific part of the
console's tests (a PostgreSQL run of them needs a seeder of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
import uuid
from dataclasses import dataclass

import orjson

from pusherd.clock import iso_ms, now_ms
from pusherd.store.sqlite.schema import connect_sync
from pusherd.units import parse_duration

FAIL_EVERY = 20  # one delivery in 20 fails


@dataclass(frozen=True)
class Seeded:
    delivered: int
    failed: int
    failed_id: int  # one failed delivery's id


def seed_history(
    path: str,
    subscriptions: list[str],
    organization: str,
    *,
    deliveries: int = 3000,
    span_ms: int = 24 * 3600 * 1000,
    batch: int = 50_000,
) -> Seeded:
    """Finished deliveries (with one attempt each) spread evenly over the last span_ms."""
    rng = random.Random(7)
    conn = connect_sync(path)
    # inside the console's windows: from a few minutes after "span ago" to a minute ago
    end = now_ms() - 60_000
    start = end - span_ms + 20 * 60_000
    width = end - start
    delivered = failed = 0
    failed_id = 0
    try:
        seq = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
        did = conn.execute("SELECT coalesce(max(id), 0) FROM deliveries").fetchone()[0]
        aid = conn.execute("SELECT coalesce(max(id), 0) FROM attempts").fetchone()[0]
        done = 0
        while done < deliveries:
            n = min(batch, deliveries - done)
            events, rows, attempts = [], [], []
            for i in range(done, done + n):
                seq, did, aid = seq + 1, did + 1, aid + 1
                # busier in the (UTC) afternoon than at night, as shops are
                frac = i / deliveries
                at = start + int(width * (frac - 0.08 * math.sin(2 * math.pi * frac)))
                ok = i % FAIL_EVERY != FAIL_EVERY - 1
                payload = orjson.dumps({"sku": f"SKU-{i}", "qty": i % 7}).decode()
                events.append(
                    (
                        seq,
                        str(uuid.uuid4()),
                        organization,
                        "ProductCreated",
                        f"m-{seq}",
                        payload,
                        iso_ms(at),
                        at,
                    )
                )
                sub = subscriptions[i % len(subscriptions)]
                duration = rng.lognormvariate(3.5, 0.6)
                status, code = ("delivered", 200) if ok else ("failed", 500)
                error = None if ok else "HTTP 500"
                rows.append((did, seq, sub, status, at, at, at + int(duration), at, code, error))
                attempts.append((aid, did, at, duration, code, error, "ok" if ok else "nope"))
                if ok:
                    delivered += 1
                else:
                    failed += 1
                    failed_id = did
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO events (seq, uuid, organization, event_name, message_id, payload,"
                " timestamp, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                events,
            )
            conn.executemany(
                "INSERT INTO deliveries (id, event_seq, subscription, status, attempts, due_ms,"
                " created_ms, finished_ms, last_attempt_ms, last_status_code, last_error)"
                " VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            conn.executemany(
                "INSERT INTO attempts (id, delivery_id, started_ms, duration_ms, status_code,"
                " error, response_body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                attempts,
            )
            conn.execute("COMMIT")
            done += n
    finally:
        conn.close()
    return Seeded(delivered, failed, failed_id)


async def time_page_views(path: str, organization: str, subscription: str) -> dict[str, float]:
    """Milliseconds the store spends on each console page view (the queries a page runs)."""
    from pusherd.console.rollup import Rollup
    from pusherd.store import open_store
    from pusherd.store.console import LogFilter

    store = await open_store(path)
    c = store.console
    hour, day, now = 3600_000, 86_400_000, now_ms()
    out: dict[str, float] = {}
    try:
        for org in (organization, None):
            who = "tenant" if org else "admin"

            hourly, daily = Rollup(lambda: c, 60_000, hour), Rollup(lambda: c, 600_000, day)

            async def overview(
                org: str | None = org, hourly: Rollup = hourly, daily: Rollup = daily
            ) -> None:
                subs = await c.subscriptions(org)
                await hourly.window(None if org is None else {s.uuid for s in subs})
                await daily.window(None if org is None else {s.uuid for s in subs})
                await c.latency(org, now - hour)
                await c.queue(org)

            async def subscriptions(org: str | None = org, daily: Rollup = daily) -> None:
                subs = await c.subscriptions(org)
                await daily.window(None if org is None else {s.uuid for s in subs})

            t = time.perf_counter()
            await overview()  # the first view of a process counts the day once
            out[f"first_overview_{who}_ms"] = (time.perf_counter() - t) * 1000
            for name, fn in (("overview", overview), ("subscriptions", subscriptions)):
                t = time.perf_counter()
                await fn()
                out[f"{name}_{who}_ms"] = (time.perf_counter() - t) * 1000
        for name, flt in (
            ("log_page", LogFilter()),
            ("log_page_failed", LogFilter(status="failed")),
            ("log_page_since_1h", LogFilter(since_ms=now - hour)),
            ("log_page_rare_event", LogFilter(event_name="NoSuchEvent")),
        ):
            await c.log_page(subscription, flt, 50)
            t = time.perf_counter()
            page = await c.log_page(subscription, flt, 50)
            out[f"{name}_ms"] = (time.perf_counter() - t) * 1000
            assert page is not None
        last = (await c.log_page(subscription, LogFilter(), 1)).rows[0].id
        t = time.perf_counter()
        await c.delivery(None, last)
        out["delivery_ms"] = (time.perf_counter() - t) * 1000
    finally:
        await store.close()
    return out


async def _subscriptions(path: str, organization: str, n: int) -> tuple[list[str], int]:
    """The file's subscriptions (n new ones, made through the store, when it has none) and how
    many deliveries it holds."""
    from pusherd.store import open_store
    from pusherd.store.types import NewSubscription

    store = await open_store(path, background=False)
    try:
        subs = [s.uuid for s in await store.list_subscriptions(organization)]
        for _ in range(0 if subs else n):
            u = str(uuid.uuid4())
            new = NewSubscription(
                u, organization, "WEBHOOK", (), (), f"https://hooks.example.com/{u}", None, "k" * 64
            )
            subs.append((await store.create_subscription(new, None)).uuid)
        counts = await store.delivery_counts(subs)
    finally:
        await store.close()
    return subs, counts.total


def main() -> None:
    """Build a file of N deliveries (if it has none yet) and time the console's page views."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file")
    parser.add_argument("--deliveries", type=int, default=1_000_000)
    parser.add_argument("--span", default="24h", help="history spread over this (default 24h)")
    parser.add_argument("--subscriptions", type=int, default=20)
    args = parser.parse_args()
    org = "5a0b9c1e-1d2f-4a3b-8c4d-333333333333"
    subs, count = asyncio.run(_subscriptions(args.file, org, args.subscriptions))
    if count == 0:
        t = time.perf_counter()
        seeded = seed_history(
            args.file,
            subs,
            org,
            deliveries=args.deliveries,
            span_ms=int(parse_duration(args.span) * 1000),
        )
        print(f"seeded {seeded} in {time.perf_counter() - t:.1f}s")
    for name, ms in asyncio.run(time_page_views(args.file, org, subs[0])).items():
        print(f"{name}\t{ms:.1f}")


if __name__ == "__main__":
    main()
