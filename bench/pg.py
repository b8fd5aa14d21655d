"""The PostgreSQL phases of bench/run.py (`--storage postgres`), on a server of the bench's own.

The server is tests/pg.py's: the installed binaries in a temporary directory, 127.0.0.1, fsync
and synchronous_commit on (as root, the cluster belongs to the `postgres` user). Each phase gets
a fresh database; `pusherd serve` runs with `[storage] url = ...`, everything else as in run.py.

- pg_ingest_rps: 64 connections of single-event requests, as ingest_rps. pg_ingest_baseline_rps:
  the same load against bench/baseline_pg_ingest.py: bare aiohttp + asyncpg answering 202 once the
  event is committed by a group-committed multi-row INSERT (its own database, pusherd's schema).
- pg_batch_eps: 100-event batches, 8 connections (no target: it shows the group writer's ceiling).
- pg_deliver_rps: drain_run as deliver_rps (PG_DELIVER_N events in quick mode), over the same bare
  aiohttp client baseline at concurrency 8.
- pg_e2e_start_p99_ms: request start -> receiver at a fixed 1,000 events/s.
- pg_two_process_ratio: the drain rate with a second `pusherd serve` on the same database (started
  before, stopped after each such run) over the rate of the first alone, runs alternating.
"""

from __future__ import annotations

import os
import statistics
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from common import event, free_port  # noqa: E402

from tests.pg import PgServer, launch  # noqa: E402

PG_KEYS = (
    "pg_ingest_rps",
    "pg_ingest_baseline_rps",
    "pg_ingest_ratio",
    "pg_batch_eps",
    "pg_deliver_rps",
    "pg_deliver_baseline_rps",
    "pg_deliver_ratio",
    "pg_e2e_start_p99_ms",
    "pg_two_process_ratio",
)
PG_TARGETS: dict[str, tuple[str, float]] = {
    "pg_ingest_ratio": (">=", 0.5),
    "pg_deliver_ratio": (">=", 0.5),
    "pg_e2e_start_p99_ms": ("<=", 20.0),
    "pg_two_process_ratio": (">=", 0.9),
}
PG_DELIVER_N = 10_000  # per drain in quick mode (PostgreSQL drains are slower than SQLite's)
DELIVERY = {"timeout": "300s", "lease": "600s"}


def database(server: PgServer, name: str) -> str:
    """A new empty database; its URL (pusherd migrates it at start)."""
    server.psql("postgres", f"CREATE DATABASE {name}")
    return server.url(name)


def phase_pg(s: Any, procs: Any, workdir: Path, res: Any, run: ModuleType) -> None:
    """Every PostgreSQL figure, on one throwaway server."""
    run.say("postgres: starting a PostgreSQL server")
    server = launch()
    try:
        pg_intake(s, procs, workdir, res, run, server)
        pg_delivery(s, procs, workdir, res, run, server)
    finally:
        server.cleanup()


def pg_intake(
    s: Any, procs: Any, workdir: Path, res: Any, run: ModuleType, server: PgServer
) -> None:
    """pg_ingest_rps against the asyncpg group-commit baseline, and pg_batch_eps."""
    base_url = database(server, "pusherd_baseline")
    schema = ROOT / "pusherd/store/postgres/migrations/0001_initial.sql"
    server.psql("pusherd_baseline", schema.read_text())
    daemon = run.Daemon(procs, workdir, "pg-intake", {}, storage_url=database(server, "intake"))
    base_port = free_port()
    baseline = procs.start(
        [run.PY, str(HERE / "baseline_pg_ingest.py"), "--port", str(base_port), "--url", base_url],
        ready_line=True,
    )
    try:
        org = str(uuid.uuid4())
        daemon.subscribe(daemon.token(org), f"http://127.0.0.1:{free_port()}/down")
        single = workdir / "pg-single.json"
        single.write_bytes(orjson.dumps(event(org)))
        batch = workdir / "pg-batch.json"
        batch.write_bytes(orjson.dumps([event(org) for _ in range(100)]))
        base_events = f"http://127.0.0.1:{base_port}/events"
        load = run.http_load
        run.say("postgres intake: warm-up")
        load(daemon.events_url, single, 64, 1.0, workdir)
        load(base_events, single, 64, 1.0, workdir)
        for i in range(s.runs):
            res.add("pg_ingest_rps", load(daemon.events_url, single, 64, s.load_s, workdir))
            res.add("pg_ingest_baseline_rps", load(base_events, single, 64, s.load_s, workdir))
            res.add("pg_batch_eps", 100 * load(daemon.events_url, batch, 8, s.load_s, workdir))
            last = {k: v[-1] for k, v in res.samples.items() if k.startswith("pg_")}
            run.say(
                f"postgres intake run {i + 1}: ingest {last['pg_ingest_rps']:.0f}/s,"
                f" baseline {last['pg_ingest_baseline_rps']:.0f}/s,"
                f" batches {last['pg_batch_eps']:.0f} ev/s"
            )
    finally:
        daemon.stop()
        procs.stop(baseline)


def pg_delivery(
    s: Any, procs: Any, workdir: Path, res: Any, run: ModuleType, server: PgServer
) -> None:
    """e2e at 1,000 events/s, pg_deliver_rps against the bare client, then two processes."""
    url = database(server, "delivery")
    recv = run.Receiver(procs, ports=1)
    port = recv.ports[0]
    daemon = run.Daemon(procs, workdir, "pg-delivery", DELIVERY, storage_url=url)
    n = min(PG_DELIVER_N, s.deliver_n) if s.load_s <= run.QUICK.load_s else s.deliver_n
    try:
        org = str(uuid.uuid4())
        daemon.subscribe(daemon.token(org), recv.url(port))
        n_e2e = int(s.e2e_rate * s.e2e_s)
        run.loadgen("e2e", "--url", daemon.events_url, "--org", org, "--n", "300",
                    "--prefix", "pg-warm", "--rate", str(s.e2e_rate))  # fmt: skip
        recv.wait_count(port, 300, 60)  # all warm-up deliveries in before the first reset
        for i in range(s.runs):
            run.e2e_run(daemon, recv, port, org, n_e2e, f"pg-e2e{i}", s.e2e_rate, res, "pg_")
        for i in range(s.runs):
            rate = run.drain_run(daemon, recv, port, org, n, f"pg-dl{i}", 300)
            res.add("pg_deliver_rps", rate)
            recv.reset(port)
            out = run.loadgen("deliver", "--url", recv.url(port), "--org", org, "--n", str(n),
                              "--prefix", f"pg-base{i}", "--concurrency", "8")  # fmt: skip
            if out["ok"] != n:
                raise RuntimeError(f"deliver baseline: {out['ok']} of {n} answered 2xx")
            res.add("pg_deliver_baseline_rps", n / float(out["elapsed"]))
            run.say(
                f"postgres deliver run {i + 1}: pusherd {rate:.0f}/s,"
                f" baseline {res.samples['pg_deliver_baseline_rps'][-1]:.0f}/s"
            )
        # Two processes on one database: the second is started before and stopped after each
        # of its runs, so that one-process and two-process runs alternate on this shared box.
        for i in range(s.runs):
            one = run.drain_run(daemon, recv, port, org, n, f"pg-one{i}", 300)
            second = run.Daemon(procs, workdir, f"pg-second{i}", DELIVERY, storage_url=url)
            try:
                two = run.drain_run(daemon, recv, port, org, n, f"pg-two{i}", 300)
            finally:
                second.stop()
            res.add("pg_one_process_rps", one)
            res.add("pg_two_process_rps", two)
            run.say(f"postgres two-process run {i + 1}: one {one:.0f}/s, two {two:.0f}/s")
    finally:
        daemon.stop()
        procs.stop(recv.proc)


def pg_figures(res: Any) -> dict[str, float]:
    """The figures of PG_KEYS: medians of runs, ratios of medians."""

    def m(key: str) -> float:
        return float(statistics.median(res.samples[key]))

    out = {k: m(k) for k in PG_KEYS if k in res.samples}
    out["pg_ingest_ratio"] = out["pg_ingest_rps"] / out["pg_ingest_baseline_rps"]
    out["pg_deliver_ratio"] = out["pg_deliver_rps"] / out["pg_deliver_baseline_rps"]
    out["pg_two_process_ratio"] = m("pg_two_process_rps") / m("pg_one_process_rps")
    return {k: round(out[k], 3) for k in PG_KEYS}


def pg_table(fig: dict[str, float], res: Any, s: Any, run: ModuleType, elapsed: float) -> str:
    """The human-readable report of the PostgreSQL figures."""
    m = res.med
    lines = [
        f"pusherd benchmark, PostgreSQL storage ({'quick' if s is run.QUICK else 'full'},"
        f" median of {s.runs} runs, {os.cpu_count()} CPUs, fsync and synchronous_commit on,"
        f" {elapsed:.0f}s)",
        f"{'figure':<22}{'value':>12}  {'target':<10}{'':<6}runs",
        *run.rows(fig, res, PG_KEYS, PG_TARGETS),
        "",
        f"  e2e 202 -> receiver p50/p99 ms: {m('pg_e2e_p50_ms'):.2f} / {m('pg_e2e_p99_ms'):.2f}",
        f"  e2e request start -> receiver p50 ms: {m('pg_e2e_start_p50_ms'):.2f}",
        f"  e2e offered rate (achieved): {m('pg_e2e_achieved_rate'):.0f}/s",
        f"  drain rate one / two processes: {m('pg_one_process_rps'):.0f}/s"
        f" / {m('pg_two_process_rps'):.0f}/s",
        "  baseline ingest = aiohttp + asyncpg, one group-committed multi-row INSERT per free"
        " connection (bench/baseline_pg_ingest.py); see bench/pg.py's docstring.",
    ]
    return "\n".join(lines)
