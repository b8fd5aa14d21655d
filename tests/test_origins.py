"""Per-origin state (SPEC §6 Scheduling): the breaker, slow start and shares, by tables."""

from __future__ import annotations

import pytest

from pusherd.delivery.origins import (
    BREAKER_MAX_PAUSE_S,
    FAILING,
    HEALTHY,
    NEW,
    PROVEN_FOR_S,
    QUEUE_FACTOR,
    Breaker,
    Claims,
    Limits,
    Origin,
    prune,
)

# -- breaker -----------------------------------------------------------------------------------

# Steps: "F" failure, "S" success, "P" a failure of the probe (started once the pause is over).
# Expected: per step, whether it opened the circuit, and the pause in force after it.
BREAKER_TABLE = [
    ("FFFF", [False] * 4, [10.0] * 4),
    ("FFFFF", [False] * 4 + [True], [10.0] * 5),
    # attempts already under way fail after it opened: counted, the circuit is not opened again
    ("FFFFFFFF", [False] * 4 + [True] + [False] * 3, [10.0] * 8),
    ("FFFFFP", [False] * 4 + [True, True], [10.0] * 5 + [20.0]),
    ("FFFFFPP", [False] * 4 + [True, True, True], [10.0] * 5 + [20.0, 40.0]),
    ("FFFFFPS", [False] * 4 + [True, True, False], [10.0] * 5 + [20.0, 10.0]),
    ("FFFFSFFFFF", [False] * 4 + [False] * 5 + [True], [10.0] * 10),
]


@pytest.mark.parametrize(("steps", "opened", "pauses"), BREAKER_TABLE)
def test_breaker_opens_on_transitions_only(
    steps: str, opened: list[bool], pauses: list[float]
) -> None:
    b = Breaker(first_pause_s=10.0)
    got_opened, got_pauses = [], []
    now = 0.0
    for step in steps:
        now += 1.0
        if step == "P":
            assert b.tripped() and not b.paused(now + 1000)
            b.probing = True
        opened_at = b.open_until
        result = b.record(step == "S", now)
        got_opened.append(result)
        got_pauses.append(b.pause_s)
        if result:
            assert b.open_until == now + b.pause_s
        else:
            assert b.open_until == opened_at  # the pause is never pushed out
    assert (got_opened, got_pauses) == (opened, pauses)


def test_breaker_pause_doubles_up_to_ten_minutes() -> None:
    b = Breaker(first_pause_s=30.0)
    for _ in range(5):
        b.record(False, 0.0)
    pauses = []
    for _ in range(8):
        b.probing = True
        assert b.record(False, 0.0)
        pauses.append(b.pause_s)
    assert pauses == [60.0, 120.0, 240.0, 480.0, 600.0, 600.0, 600.0, 600.0]
    assert BREAKER_MAX_PAUSE_S == 600.0


# -- slow start and tiers ----------------------------------------------------------------------


def make_origin(limits: Limits, name: str = "http://127.0.0.1:1") -> Origin:
    return Origin(name, Breaker(first_pause_s=30.0), limits, subscriptions=["s"])


# outcomes -> (limit, tier) after each
SLOW_START_TABLE = [
    ("", []),
    ("S", [(2, HEALTHY)]),
    ("SSSSSSSSSS", [(n, HEALTHY) for n in (2, 3, 4, 5, 6, 7, 8, 8, 8, 8)]),
    ("F", [(1, FAILING)]),
    ("SSSF", [(2, HEALTHY), (3, HEALTHY), (4, HEALTHY), (1, FAILING)]),
    ("FS", [(1, FAILING), (2, HEALTHY)]),
    ("FFS", [(1, FAILING), (1, FAILING), (2, HEALTHY)]),
]


@pytest.mark.parametrize(("outcomes", "expected"), SLOW_START_TABLE)
def test_slow_start(outcomes: str, expected: list[tuple[int, int]]) -> None:
    o = make_origin(Limits(per_destination=8, max_in_flight=256))
    assert (o.limit, o.tier(), o.cap(8)) == (1, NEW, 1)
    got = []
    for step in outcomes:
        o.record(step == "S", 1.0)
        got.append((o.limit, o.tier()))
    assert got == expected


def test_limit_never_exceeds_per_destination() -> None:
    o = make_origin(Limits(per_destination=3, max_in_flight=256))
    for _ in range(10):
        o.record(True, 1.0)
    assert o.limit == 3 and o.cap(3) == 3


def test_an_old_success_no_longer_proves_an_origin() -> None:
    o = make_origin(Limits(per_destination=8, max_in_flight=256))
    for _ in range(7):
        o.record(True, 100.0)
    o.settle(100.0 + PROVEN_FOR_S)
    assert (o.tier(), o.limit) == (HEALTHY, 8)
    o.settle(100.0 + PROVEN_FOR_S + 1)
    assert (o.tier(), o.limit) == (NEW, 1)


# max_in_flight, in flight of unproven / failing origins, tier -> may it start one more
ADMITS_TABLE = [
    (256, 0, 0, NEW, True),
    (256, 127, 0, NEW, True),
    (256, 128, 0, NEW, False),
    (256, 128, 0, HEALTHY, True),
    (256, 100, 63, FAILING, True),
    (256, 100, 64, FAILING, False),
    (256, 100, 64, NEW, True),  # first-timers still find room next to the failing
    (1, 0, 0, FAILING, True),  # a share is never empty
    (1, 1, 1, NEW, False),
    (2, 1, 0, NEW, False),
    (2, 1, 0, HEALTHY, True),
]


@pytest.mark.parametrize(("max_in_flight", "unproven", "failing", "tier", "ok"), ADMITS_TABLE)
def test_shares_of_max_in_flight(
    max_in_flight: int, unproven: int, failing: int, tier: int, ok: bool
) -> None:
    limits = Limits(8, max_in_flight, unproven=unproven, failing=failing)
    assert limits.admits(tier) is ok


def test_counts_follow_an_origin_between_tiers() -> None:
    limits = Limits(per_destination=8, max_in_flight=256)
    o = make_origin(limits)
    o.begin()
    assert (limits.unproven, limits.failing) == (1, 0)
    o.record(True, 1.0)  # proven, while its attempt still holds the slot
    assert (limits.unproven, limits.failing) == (0, 0)
    o.end()
    for _ in range(3):
        o.begin()
    o.record(False, 2.0)  # one failed: the other two now count as failing
    assert (limits.unproven, limits.failing) == (3, 3)
    o.end()
    o.end()
    assert (limits.unproven, limits.failing) == (1, 1)
    o.record(True, 3.0)
    o.end()
    assert (limits.unproven, limits.failing, o.in_flight) == (0, 0, 0)


def test_may_start_within_cap_and_share() -> None:
    limits = Limits(per_destination=8, max_in_flight=4)  # unproven share 2, failing share 1
    a, b, c = (make_origin(limits, f"http://127.0.0.1:{i}") for i in (1, 2, 3))
    assert a.may_start(8)
    a.begin()
    assert not a.may_start(8)  # slow start: one at a time until it succeeds
    assert b.may_start(8)
    b.begin()
    assert not c.may_start(8)  # the unproven share (2 of 4) is taken
    a.record(True, 1.0)
    a.end()
    assert a.may_start(8)  # proven: cap 2, outside the unproven share
    a.begin()
    a.begin()
    assert not a.may_start(8)  # at its cap of 2
    b.record(False, 1.0)
    b.end()
    assert b.may_start(8)  # failing share (1 of 4) is free
    b.begin()
    assert c.may_start(8)  # unproven: b's one attempt of 2
    assert not b.may_start(8)


# -- claims ------------------------------------------------------------------------------------


def held(limits: Limits, name: str, rows: int, failures: int = 0, proven: bool = False) -> Origin:
    """An origin holding `rows` rows (being handed over) in a given state."""
    o = make_origin(limits, name)
    o.promised = rows
    o.breaker.failures = failures
    o.proven = proven
    o.limit = 8 if proven else 1
    return o


def test_claims_keep_room_for_healthy_and_new_origins_next_to_failing_ones() -> None:
    # max_in_flight 8: 32 rows may be held; 16 by unproven origins, 8 of those by failing ones.
    limits = Limits(per_destination=8, max_in_flight=8)
    failing = [held(limits, f"http://f{i}:1", 1, failures=1) for i in range(10)]
    new = held(limits, "http://new:1", 0)
    healthy = held(limits, "http://ok:1", 0, proven=True)
    claims = Claims([*failing, new, healthy], limits, budget=32 - 10, now=1.0)
    assert [claims.room(o) for o in failing] == [0] * 10  # their share is over-full
    assert claims.room(new) == 1 * (1 + QUEUE_FACTOR)  # cap 1, and ready rows behind it
    claims.take(new, 4)
    assert claims.room(healthy) == 32 - 10 - 4  # the rest of the process's budget
    claims.take(healthy, 18)
    assert claims.room(healthy) == 0  # the process's budget is spent


def test_claims_bound_the_rows_of_any_number_of_new_origins() -> None:
    limits = Limits(per_destination=8, max_in_flight=8)
    many = [held(limits, f"http://n{i}:1", 0) for i in range(100)]
    claims = Claims(many, limits, budget=32, now=1.0)
    total = 0
    for o in many:
        room = claims.room(o)
        if room > 0:
            claims.take(o, room)
            total += room
    assert total == 16  # half the budget
    healthy = held(limits, "http://ok:1", 0, proven=True)
    assert claims.room(healthy) == 16


def test_prune_forgets_only_idle_origins_without_subscriptions() -> None:
    limits = Limits(per_destination=8, max_in_flight=8)
    table = {}
    for name, subs, in_flight, promised in [
        ("http://a:1", ["s"], 0, 0),
        ("http://b:1", [], 0, 0),
        ("http://c:1", [], 1, 0),
        ("http://d:1", [], 0, 1),
    ]:
        o = make_origin(limits, name)
        o.subscriptions, o.in_flight, o.promised = subs, in_flight, promised
        table[name] = o
    assert prune(table) == ["http://b:1"]
    assert sorted(table) == ["http://a:1", "http://c:1", "http://d:1"]
