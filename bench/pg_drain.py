"""Diagnose PostgreSQL delivery: drains and e2e runs in one daemon, with the tables' dead rows.

Usage: flock /tmp/pusherd-bench.lock python bench/pg_drain.py [--runs N] [--n N] [--e2e N]

Starts its own PostgreSQL (tests/pg.py), one receiver and one `pusherd serve` as bench/pg.py
does, then runs N e2e runs at 1,000 events/s and N drains of --n events, printing after each the
rate or latency and pg_stat_user_tables' live/dead tuples and HOT updates of deliveries and
queues: a rate that falls run after run next to growing dead tuples points at bloat, one that
falls with few of them at the daemon's own state.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import pg  # noqa: E402
import run  # noqa: E402

STATS = (
    "SELECT relname, n_live_tup, n_dead_tup, n_tup_upd, n_tup_hot_upd, autovacuum_count"
    " FROM pg_stat_user_tables WHERE relname IN ('deliveries', 'queues') ORDER BY relname"
)


def tables(server: pg.PgServer, db: str) -> str:
    """One line per table: live, dead, updates (HOT), autovacuums."""
    out = []
    for line in server.psql(db, STATS).strip().splitlines():
        name, live, dead, upd, hot, vac = line.split("|")
        out.append(f"{name} live {live} dead {dead} upd {upd} (hot {hot}) autovac {vac}")
    return "; ".join(out)


def main(r: ModuleType = run) -> int:
    """Run the drains and e2e runs; print one line per run."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--n", type=int, default=pg.PG_DELIVER_N)
    p.add_argument("--e2e", type=int, default=2000, help="events per e2e run (0: none)")
    a = p.parse_args()
    procs = r.Procs()
    res = r.Results()
    server = pg.launch()
    try:
        with r.workspace() as workdir:
            url = pg.database(server, "delivery")
            recv = r.Receiver(procs, ports=1)
            port = recv.ports[0]
            daemon = r.Daemon(procs, workdir, "pg-drain", pg.DELIVERY, storage_url=url)
            org = str(uuid.uuid4())
            daemon.subscribe(daemon.token(org), recv.url(port))
            # Warm-up as bench/pg.py: the origin proven, its connections open.
            r.loadgen("e2e", "--url", daemon.events_url, "--org", org, "--n", "300",
                      "--prefix", "warm", "--rate", "1000")  # fmt: skip
            recv.wait_count(port, 300, 60)
            if a.e2e:
                for i in range(a.runs):
                    r.e2e_run(daemon, recv, port, org, a.e2e, f"e2e{i}", 1000.0, res, "pg_")
                    print(tables(server, "delivery"), flush=True)
            for i in range(a.runs):
                rate = r.drain_run(daemon, recv, port, org, a.n, f"dl{i}", 300)
                print(f"drain {i + 1}: {rate:.0f}/s; {tables(server, 'delivery')}", flush=True)
    finally:
        procs.stop_all()
        server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
