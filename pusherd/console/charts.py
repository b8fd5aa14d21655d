"""Charts drawn on the server as SVG geometry (no JavaScript, nothing fetched).

Pure functions: counts in, coordinates out; the template draws them, so every text in a chart
goes through the template's autoescaping like the rest of the page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from pusherd.store.console import MinuteCount

WIDTH = 720
HEIGHT = 220
LEFT = 44  # room for the y-axis labels
RIGHT = 8
TOP = 10
BOTTOM = 24  # room for the time labels


@dataclass(frozen=True)
class Tick:
    x: float
    y: float
    text: str


@dataclass(frozen=True)
class Chart:
    """One deliveries-per-minute chart: two area paths (delivered, failed) and axis labels."""

    title: str
    width: int
    height: int
    delivered_path: str
    failed_path: str
    x_ticks: tuple[Tick, ...]
    y_ticks: tuple[Tick, ...]
    delivered: int
    failed: int
    peak: int
    summary: str  # the chart in words, for screen readers and for tests

    @property
    def has_data(self) -> bool:
        return self.delivered + self.failed > 0


def _nice_max(value: int) -> int:
    """A round axis maximum at or above value (1, 2 or 5 times a power of 10)."""
    if value <= 1:
        return 1
    exp = int(10 ** math.floor(math.log10(value)))
    for step in (1, 2, 5, 10):
        if step * exp >= value:
            return step * exp
    return 10 * exp


def _area(values: list[float], y_max: int) -> str:
    """A closed path under a stepless line through the values (one point per bucket)."""
    if not values:
        return ""
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    base = TOP + plot_h
    step = plot_w / max(1, len(values) - 1)
    points = [
        f"{LEFT + i * step:.1f},{base - v / y_max * plot_h:.1f}" for i, v in enumerate(values)
    ]
    return f"M{LEFT:.1f},{base:.1f} L" + " L".join(points) + f" L{LEFT + plot_w:.1f},{base:.1f} Z"


def minute_chart(
    title: str, counts: list[MinuteCount], tick_every_ms: int, bucket_minutes: int = 1
) -> Chart:
    """Deliveries per minute, delivered and failed, over the buckets given (oldest first).

    Buckets longer than a minute are drawn as their average per minute.
    """
    delivered = [c.delivered / bucket_minutes for c in counts]
    failed = [c.failed / bucket_minutes for c in counts]
    peak = max([c.delivered + c.failed for c in counts], default=0)
    y_max = _nice_max(math.ceil(max([*delivered, *failed], default=0)))
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    step = plot_w / max(1, len(counts) - 1)
    x_ticks = []
    for i, c in enumerate(counts):
        # a label too close to either edge would be cut off
        if c.minute_ms % tick_every_ms == 0 and 16 < i * step < plot_w - 16:
            when = datetime.fromtimestamp(c.minute_ms / 1000, tz=UTC).strftime("%H:%M")
            x_ticks.append(Tick(LEFT + i * step, HEIGHT - 6, when))
    y_ticks = tuple(
        Tick(LEFT - 6, TOP + plot_h - frac * plot_h, f"{y_max * frac:g}")
        for frac in (0.0, 0.5, 1.0)
    )
    total_ok, total_bad = sum(c.delivered for c in counts), sum(c.failed for c in counts)
    span = "minute" if bucket_minutes == 1 else f"{bucket_minutes} minutes"
    summary = (
        f"{title}: {total_ok} delivered and {total_bad} failed; busiest {span}: {peak} deliveries."
    )
    return Chart(
        title=title,
        width=WIDTH,
        height=HEIGHT,
        delivered_path=_area(delivered, y_max),
        failed_path=_area(failed, y_max),
        x_ticks=tuple(x_ticks),
        y_ticks=y_ticks,
        delivered=total_ok,
        failed=total_bad,
        peak=peak,
        summary=summary,
    )
