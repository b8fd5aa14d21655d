"""Per-origin scheduling state: limits and the circuit breaker (pure state, no I/O)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pusherd.store.models import ClaimedDelivery

QUEUE_FACTOR = 3  # claimed rows ready behind an origin's in-flight attempts, per slot
BREAKER_THRESHOLD = 5
BREAKER_FIRST_PAUSE_S = 30.0
BREAKER_MAX_PAUSE_S = 600.0


@dataclass
class Breaker:
    """Per-origin circuit breaker: open after 5 consecutive failures, 30s doubling to 10m."""

    first_pause_s: float = BREAKER_FIRST_PAUSE_S
    failures: int = 0
    pause_s: float = BREAKER_FIRST_PAUSE_S
    open_until: float = 0.0  # monotonic
    probing: bool = False

    def __post_init__(self) -> None:
        self.pause_s = self.first_pause_s

    def tripped(self) -> bool:
        """Open or half-open: only a probe may go."""
        return self.failures >= BREAKER_THRESHOLD

    def paused(self, now: float) -> bool:
        """Whether the pause itself is running."""
        return self.tripped() and now < self.open_until

    def record(self, success: bool, now: float) -> bool:
        """Count an attempt's result; True when this opened the circuit."""
        was_probe, self.probing = self.probing, False
        if success:
            self.failures, self.pause_s = 0, self.first_pause_s
            return False
        self.failures += 1
        if was_probe:
            self.pause_s = min(self.pause_s * 2, BREAKER_MAX_PAUSE_S)
        if self.failures >= BREAKER_THRESHOLD:
            self.open_until = now + self.pause_s
            return True
        return False


@dataclass
class Origin:
    """Scheduling state of one destination origin."""

    name: str
    breaker: Breaker
    in_flight: int = 0
    promised: int = 0  # fresh deliveries an ingest is handing over (not committed yet)
    sending: int = 0  # attempts started whose request is not on the wire yet
    waiting: deque[ClaimedDelivery] = field(default_factory=deque)
    subscriptions: list[str] = field(default_factory=list)
    turn: int = 0  # round-robin start among its subscriptions
    in_flight_gauge: Any = None  # this origin's children of the labelled gauges
    circuit_gauge: Any = None

    def room(self, per_destination: int, now: float) -> int:
        """How many more rows to claim for it now."""
        if self.breaker.tripped():
            if self.breaker.paused(now) or self.breaker.probing or self.in_flight or self.waiting:
                return 0
            return 1  # the pause is over: one probe
        if len(self.waiting) >= per_destination:
            return 0  # enough ready: top up in batches, not one row per finished attempt
        return self.free(per_destination)

    def free(self, per_destination: int) -> int:
        """Room left for rows in flight, ready, or being handed over."""
        held = self.in_flight + len(self.waiting) + self.promised
        return per_destination * (1 + QUEUE_FACTOR) - held
