"""Per-organization rate limits shared by every process (SPEC §4), one round trip a request.

The windows are fixed and aligned to the clock (minute and hour boundaries), so that every
process counts into the same rows; see pusherd_rate_hit in migrations/0001_initial.sql.
"""

from __future__ import annotations

from dataclasses import dataclass

from pusherd.store.postgres.pool import Pool


@dataclass(frozen=True)
class RateCount:
    """The outcome of one request against both windows."""

    allowed: bool
    minute_hits: int  # requests counted in the current minute window (this one included)
    minute_start_ms: int
    hour_hits: int
    hour_start_ms: int


async def hit(
    pool: Pool, organization: str, now_ms: int, per_minute: int, per_hour: int
) -> RateCount:
    """Count one request if both windows have room; say whether it may proceed."""
    rows = await pool.fetch(
        "SELECT * FROM pusherd_rate_hit($1, $2, $3, $4)", organization, now_ms, per_minute, per_hour
    )
    r = rows[0]
    return RateCount(
        bool(r["allowed"]),
        int(r["minute_hits"]),
        int(r["minute_start_ms"]),
        int(r["hour_hits"]),
        int(r["hour_start_ms"]),
    )
