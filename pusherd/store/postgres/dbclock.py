"""The database's clock: the one clock every pusherd process on a database judges times by.

Processes on several machines have several clocks (SPEC §8: "on one machine or many"). A due
time written by one process is compared by another, so every time that goes into the queue
(a new row's due time, a retry's, a hand-back's) and every time read from it (the next due time
a dispatcher sleeps until) is on the database's clock. Statements that can use it directly do
(DB_NOW_MS); times computed in the process (a retry "in 5 s", in its own wall clock) are moved
by the offset between the two clocks, measured with a round trip and kept fresh: one machine
a minute ahead would otherwise hold its events back a minute, claim in a loop, and stretch its
retries by a minute, and one behind would retry at once (issue 12).
"""

from __future__ import annotations

import time

import asyncpg

from pusherd.clock import now_ms
from pusherd.store.postgres.pool import Pool

Executor = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy | Pool

# The database's time when the statement started, in unix milliseconds (one value for the
# whole statement, unlike clock_timestamp()).
DB_NOW_MS = "(extract(epoch FROM statement_timestamp()) * 1000)::bigint"

REMEASURE_S = 10.0  # clocks drift slowly, but NTP may step one: look again this often


class DbClock:
    """This process's view of the database's clock: its offset from the local wall clock."""

    def __init__(self) -> None:
        self.offset_ms = 0  # database time minus local time
        self._measured_at: float | None = None

    def stale(self) -> bool:
        """Whether the offset should be measured (again)."""
        return self._measured_at is None or time.monotonic() - self._measured_at >= REMEASURE_S

    async def measure(self, db: Executor) -> None:
        """Measure the offset: the database's time against the middle of the round trip."""
        before = now_ms()
        value = await db.fetchval("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
        after = now_ms()
        self.offset_ms = int(value) - (before + after) // 2
        self._measured_at = time.monotonic()

    def now_ms(self) -> int:
        """The database's time now, in unix milliseconds."""
        return now_ms() + self.offset_ms

    def to_db(self, local_ms: int) -> int:
        """A time of this process's wall clock on the database's clock."""
        return local_ms + self.offset_ms

    def to_local(self, db_ms: int) -> int:
        """A time of the database's clock on this process's wall clock."""
        return db_ms - self.offset_ms
