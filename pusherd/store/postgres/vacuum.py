"""Vacuuming the delivery queue as it drains, instead of waiting for autovacuum.

Every claim and every record rewrites a delivery row, and neither update can be HOT (both change
indexed columns: due_ms, the lease, status), so each delivery leaves two dead row versions and
their entries in every index of `deliveries`. The claim and the record read the front of a
subscription's range of `deliveries_due` and an origin's range of `deliveries_leased`, which is
exactly where those dead entries pile up: until a vacuum removes them every claim steps over all
of them (issue 12: one daemon drained 3,030, 1,829, 1,187 then 779 deliveries/s in four runs of
10,000, with 95,000 dead versions and no autovacuum yet; autovacuum visits a database once per
`autovacuum_naptime`, a minute by default, and then by a fraction of the table's size).

So the process that records vacuums those tables itself once it has finished VACUUM_EVERY
deliveries since its last vacuum, one vacuum at a time, SKIP_LOCKED (another process's vacuum
or autovacuum already at it: nothing to do), and never more than a tenth of the time: after a
vacuum that took t seconds, the next waits at least 9 t. A vacuum does not block claims,
records or ingests (it takes no lock they conflict with), and a failure only logs.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from pusherd.store.errors import StoreError
from pusherd.store.postgres.pool import Pool

log = structlog.get_logger("pusherd.store")

VACUUM_EVERY = 3_000  # deliveries finished by this process between two vacuums
BUSY_SHARE = 0.1  # at most this share of the time spent vacuuming
# TRUNCATE false: giving empty pages at the end back to the system takes a brief exclusive lock
# on the table, which would stall every claim and ingest for a moment (and replicas with them).
VACUUM = "VACUUM (SKIP_LOCKED, ANALYZE, TRUNCATE false) deliveries, queues"


class Vacuum:
    """Counts finished deliveries and vacuums the queue's tables behind them."""

    def __init__(self, pool: Pool, every: int = VACUUM_EVERY) -> None:
        self.pool = pool
        self.every = every
        self.runs = 0  # vacuums completed (for tests and the bench)
        self._finished = 0
        self._not_before = 0.0  # monotonic
        self._task: asyncio.Task[None] | None = None

    def finished(self, n: int) -> None:
        """n more deliveries were finished (delivered, failed or rescheduled) by this process."""
        self._finished += n
        if self._finished < self.every or time.monotonic() < self._not_before:
            return
        if self._task is not None and not self._task.done():
            return
        self._finished = 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        started = time.monotonic()
        try:
            await self.pool.execute(VACUUM)
        except (StoreError, OSError) as exc:
            log.warning("vacuum_failed", error=str(exc))
        except Exception as exc:  # a permission or server error must not reach the recorder
            log.warning("vacuum_failed", error=f"{type(exc).__name__}: {exc}")
        else:
            self.runs += 1
        took = time.monotonic() - started
        self._not_before = time.monotonic() + took * (1 - BUSY_SHARE) / BUSY_SHARE

    async def close(self) -> None:
        """Stop a vacuum under way (close() of the store): the next one starts over."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
