"""Per-origin scheduling state: limits, slow start, shares and the circuit breaker (pure state).

Receivers are strangers, and some accept connections and never answer. An attempt to such an origin
holds a slot of `max_in_flight` until the timeout, so the slots an origin may hold are earned:

- Slow start: an origin with no recent success may have one attempt in flight; each success raises
  its limit by one towards `per_destination`; a failure or timeout drops it back to one.
- Shares: origins that are not proven healthy (no success in the last PROVEN_FOR_S, or a failure
  since the last success) together hold at most half of `max_in_flight`, and failing ones at most a
  quarter of it. Proven-healthy origins therefore always find room, however many dead origins there
  are, and an origin seen for the first time finds room next to any number of failing ones. (First
  attempts cannot be told apart before they answer: while more than half of `max_in_flight` worth of
  new origins all hang at once, another new one waits for their timeout.) The same shares apply to
  the rows an origin may hold claimed (in flight or ready behind).
- Breaker: after 5 consecutive failures the origin is paused (30s, doubling up to 10m on every
  failed probe); then one probe decides.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from pusherd.store.types import ClaimedDelivery

QUEUE_FACTOR = 3  # claimed rows ready behind an origin's in-flight attempts, per slot
BREAKER_THRESHOLD = 5
BREAKER_FIRST_PAUSE_S = 30.0
BREAKER_MAX_PAUSE_S = 600.0
PROVEN_FOR_S = 60.0  # an origin without a success for this long slow-starts again

HEALTHY, NEW, FAILING = (
    0,
    1,
    2,
)  # tiers: proven healthy / not proven yet / failed since its last success


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
        """Count an attempt's result; True when this opened the circuit.

        It opens on a transition only: the failure that reaches the threshold, or a failed probe
        (which doubles the pause). Attempts that were already under way when it opened and fail
        afterwards are counted but neither push the pause out nor open it again.
        """
        was_probe, self.probing = self.probing, False
        if success:
            self.failures, self.pause_s = 0, self.first_pause_s
            return False
        self.failures += 1
        if was_probe:
            self.pause_s = min(self.pause_s * 2, BREAKER_MAX_PAUSE_S)
        elif self.failures != BREAKER_THRESHOLD:
            return False
        self.open_until = now + self.pause_s
        return True


@dataclass
class Limits:
    """The process's limits and the attempts in flight of origins not proven healthy."""

    per_destination: int
    max_in_flight: int
    unproven: int = 0  # attempts in flight of NEW and FAILING origins
    failing: int = 0  # attempts in flight of FAILING origins
    tripped: int = 0  # origins whose breaker is open or half-open

    @property
    def max_unproven(self) -> int:
        """Attempts origins not proven healthy may hold together: half of max_in_flight."""
        return max(1, self.max_in_flight // 2)

    @property
    def max_failing(self) -> int:
        """Attempts failing origins may hold together: a quarter of max_in_flight."""
        return max(1, self.max_in_flight // 4)

    def admits(self, tier: int) -> bool:
        """Whether an origin of this tier may start one more attempt as far as shares go."""
        if tier == HEALTHY:
            return True
        if self.unproven >= self.max_unproven:
            return False
        return tier != FAILING or self.failing < self.max_failing

    def count(self, tier: int, attempts: int) -> None:
        """Add (or with a negative number remove) attempts in flight of a tier."""
        if tier != HEALTHY:
            self.unproven += attempts
        if tier == FAILING:
            self.failing += attempts


@dataclass
class Origin:
    """Scheduling state of one destination origin."""

    name: str
    breaker: Breaker
    limits: Limits
    in_flight: int = 0
    sending: int = 0  # attempts started whose request is not on the wire yet
    waiting: deque[ClaimedDelivery] = field(default_factory=deque)
    limit: int = 1  # slow start: attempts it may have in flight (up to per_destination)
    proven: bool = False  # its last attempt succeeded, within PROVEN_FOR_S
    last_success: float = 0.0  # monotonic
    in_flight_gauge: Any = None  # this origin's children of the labelled gauges
    circuit_gauge: Any = None

    def tier(self) -> int:
        """HEALTHY, NEW or FAILING: which share its attempts count against."""
        if self.breaker.failures:
            return FAILING
        return HEALTHY if self.proven else NEW

    def cap(self, per_destination: int) -> int:
        """Attempts it may have in flight now."""
        return min(self.limit, per_destination)

    def room(self, per_destination: int, now: float) -> int:
        """How many more rows to claim for it now."""
        if self.breaker.tripped():
            if self.breaker.paused(now) or self.breaker.probing or self.in_flight or self.waiting:
                return 0
            return 1  # the pause is over: one probe
        cap = self.cap(per_destination)
        if len(self.waiting) >= cap:
            return 0  # enough ready: top up in batches, not one row per finished attempt
        return self.free(per_destination)

    def free(self, per_destination: int) -> int:
        """Room left for rows in flight or ready."""
        return self.cap(per_destination) * (1 + QUEUE_FACTOR) - self.held()

    def held(self) -> int:
        """Rows it holds: in flight or ready."""
        return self.in_flight + len(self.waiting)

    def idle(self) -> bool:
        """It holds nothing: it may be forgotten once no subscription points at it."""
        return not self.held() and not self.sending

    def may_start(self, per_destination: int) -> bool:
        """Whether one more attempt may start (besides max_in_flight and the breaker)."""
        return self.in_flight < self.cap(per_destination) and self.limits.admits(self.tier())

    def begin(self) -> None:
        """An attempt started."""
        self.in_flight += 1
        self.limits.count(self.tier(), 1)

    def end(self) -> None:
        """An attempt's slot is free again."""
        self.in_flight -= 1
        self.limits.count(self.tier(), -1)

    def record(self, success: bool, now: float) -> bool:
        """Count an attempt's result (breaker and slow start); True when it opened the circuit."""
        before, was_tripped = self.tier(), self.breaker.tripped()
        opened = self.breaker.record(success, now)
        self.limits.tripped += self.breaker.tripped() - was_tripped
        if success:
            self.proven, self.last_success = True, now
            self.limit = min(self.limit + 1, self.limits.per_destination)
        else:
            self.proven, self.limit = False, 1
        self._moved(before)
        return opened

    def settle(self, now: float) -> None:
        """Forget a success older than PROVEN_FOR_S: the origin slow-starts again."""
        if self.proven and now - self.last_success > PROVEN_FOR_S:
            before = self.tier()
            self.proven, self.limit = False, 1
            self._moved(before)

    def _moved(self, before: int) -> None:
        after = self.tier()
        if after != before and self.in_flight:
            self.limits.count(before, -self.in_flight)
            self.limits.count(after, self.in_flight)


class Claims:
    """The room of one claim cycle: the process's budget of held rows and the shares in it."""

    def __init__(self, origins: Iterable[Origin], limits: Limits, budget: int, now: float) -> None:
        self.limits, self.budget, self.now = limits, budget, now
        total = limits.max_in_flight * (1 + QUEUE_FACTOR)
        unproven = failing = 0
        for origin in origins:
            origin.settle(now)
            tier = origin.tier()
            if tier != HEALTHY:
                unproven += origin.held()
            if tier == FAILING:
                failing += origin.held()
        self.unproven_left = max(1, total // 2) - unproven
        self.failing_left = max(1, total // 4) - failing

    def room(self, origin: Origin) -> int:
        """How many rows to claim for an origin now."""
        room = min(origin.room(self.limits.per_destination, self.now), self.budget)
        tier = origin.tier()
        if tier != HEALTHY:
            room = min(room, self.unproven_left)
        if tier == FAILING:
            room = min(room, self.failing_left)
        return max(room, 0)

    def take(self, origin: Origin, rows: int) -> None:
        """Rows are being claimed for an origin."""
        self.budget -= rows
        tier = origin.tier()
        if tier != HEALTHY:
            self.unproven_left -= rows
        if tier == FAILING:
            self.failing_left -= rows


def prune(origins: dict[str, Origin], in_use: Collection[str]) -> list[str]:
    """Drop origins that hold nothing and that no subscription points at (not in in_use);
    return their names."""
    gone = [name for name, origin in origins.items() if origin.idle() and name not in in_use]
    for name in gone:
        origin = origins.pop(name)
        origin.limits.tripped -= origin.breaker.tripped()
    return gone
