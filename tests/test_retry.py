"""Tests for pusherd.delivery.retry: outcome classification, schedule, jitter, Retry-After."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from pusherd.delivery.retry import Decision, Outcome, RetryPolicy, parse_retry_after

SCHEDULE = (5.0, 300.0, 1800.0)
NOW_MS = 1_800_000_000_000
NOW_S = NOW_MS / 1000


def _outcome(
    status: int | None, *, error: str | None = None, retry_after_s: float | None = None
) -> Outcome:
    return Outcome(
        status_code=status, error=error, duration_ms=12.5, body="", retry_after_s=retry_after_s
    )


def _policy(schedule: tuple[float, ...] = SCHEDULE, jitter: float = 0.0) -> RetryPolicy:
    return RetryPolicy(schedule, jitter, random.Random(1234))


@pytest.mark.parametrize(
    ("status", "ok"),
    [
        (None, False),
        (199, False),
        (200, True),
        (204, True),
        (299, True),
        (300, False),
        (404, False),
        (500, False),
    ],
)
def test_outcome_ok(status: int | None, ok: bool) -> None:
    assert _outcome(status).ok is ok


@pytest.mark.parametrize(
    ("outcome", "attempts", "expected"),
    [
        (_outcome(200), 1, Decision("delivered", None)),
        (_outcome(201), 4, Decision("delivered", None)),
        (_outcome(204), 10, Decision("delivered", None)),
        (_outcome(301), 1, Decision("retry", NOW_MS + 5_000)),
        (_outcome(302), 2, Decision("retry", NOW_MS + 300_000)),
        (_outcome(400), 1, Decision("retry", NOW_MS + 5_000)),
        (_outcome(404), 3, Decision("retry", NOW_MS + 1_800_000)),
        (_outcome(500), 1, Decision("retry", NOW_MS + 5_000)),
        (_outcome(502), 2, Decision("retry", NOW_MS + 300_000)),
        (_outcome(None, error="timeout"), 1, Decision("retry", NOW_MS + 5_000)),
        (_outcome(None, error="connect error"), 2, Decision("retry", NOW_MS + 300_000)),
        (_outcome(410), 1, Decision("gone", None)),
        (_outcome(410), 4, Decision("gone", None)),
        # Exhaustion: len(schedule) + 1 attempts at most.
        (_outcome(500), 4, Decision("failed", None)),
        (_outcome(None, error="timeout"), 4, Decision("failed", None)),
        (_outcome(404), 5, Decision("failed", None)),
        (_outcome(429, retry_after_s=60.0), 4, Decision("failed", None)),
    ],
    ids=lambda v: repr(v) if isinstance(v, int) else None,
)
def test_decide_table(outcome: Outcome, attempts: int, expected: Decision) -> None:
    assert _policy().decide(attempts, outcome, NOW_MS) == expected


@pytest.mark.parametrize(
    ("status", "retry_after_s", "attempts", "expected_delay_ms"),
    [
        # Retry-After longer than the schedule wins.
        (429, 120.0, 1, 120_000),
        (503, 120.0, 1, 120_000),
        # Shorter Retry-After never advances the schedule.
        (429, 1.0, 2, 300_000),
        (503, 0.0, 1, 5_000),
        # Capped at 24h.
        (429, 200_000.0, 1, 86_400_000),
        (503, 10**9, 3, 86_400_000),
        # Other statuses ignore Retry-After.
        (500, 120.0, 1, 5_000),
        (301, 120.0, 1, 5_000),
        # No header: plain schedule.
        (429, None, 1, 5_000),
        (503, None, 2, 300_000),
    ],
)
def test_decide_retry_after(
    status: int, retry_after_s: float | None, attempts: int, expected_delay_ms: int
) -> None:
    decision = _policy().decide(attempts, _outcome(status, retry_after_s=retry_after_s), NOW_MS)
    assert decision == Decision("retry", NOW_MS + expected_delay_ms)


def test_default_schedule_allows_ten_attempts() -> None:
    nine = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0)
    policy = _policy(nine)
    assert policy.max_attempts == 10
    for attempts in range(1, 10):
        assert policy.decide(attempts, _outcome(500), NOW_MS).kind == "retry"
    assert policy.decide(10, _outcome(500), NOW_MS).kind == "failed"


def test_empty_schedule_means_single_attempt() -> None:
    policy = _policy(())
    assert policy.decide(1, _outcome(500), NOW_MS) == Decision("failed", None)
    assert policy.decide(1, _outcome(200), NOW_MS) == Decision("delivered", None)
    assert policy.decide(1, _outcome(410), NOW_MS) == Decision("gone", None)


@pytest.mark.parametrize("jitter", [0.1, 0.2, 0.5])
@pytest.mark.parametrize("attempts", [1, 2, 3])
def test_jitter_bounds(jitter: float, attempts: int) -> None:
    policy = RetryPolicy(SCHEDULE, jitter, random.Random(42))
    base_ms = SCHEDULE[attempts - 1] * 1000
    delays = []
    for _ in range(500):
        decision = policy.decide(attempts, _outcome(500), NOW_MS)
        assert decision.kind == "retry"
        assert decision.next_attempt_ms is not None
        delays.append(decision.next_attempt_ms - NOW_MS)
    low, high = base_ms * (1 - jitter), base_ms * (1 + jitter)
    assert all(low - 1 <= d <= high + 1 for d in delays)
    # The jitter is actually applied, on both sides of the nominal delay.
    assert min(delays) < base_ms < max(delays)


def test_jitter_is_deterministic_with_seeded_rng() -> None:
    a = RetryPolicy(SCHEDULE, 0.2, random.Random(7))
    b = RetryPolicy(SCHEDULE, 0.2, random.Random(7))
    for attempts in (1, 2, 3):
        assert a.decide(attempts, _outcome(500), NOW_MS) == b.decide(
            attempts, _outcome(500), NOW_MS
        )


def _http_date(offset_s: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW_S + offset_s, UTC), usegmt=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("-5", 0.0),
        ("100000", 86400.0),
        (_http_date(90), 90.0),
        (_http_date(-90), 0.0),
        (_http_date(3 * 86400), 86400.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("Wed, 99 Foo 2015 07:28:00 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    result = parse_retry_after(value, NOW_S)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


def test_parse_retry_after_naive_date_is_utc() -> None:
    # "-0000" yields a naive datetime; RFC 9110 dates are GMT.
    value = format_datetime(datetime.fromtimestamp(NOW_S + 30, UTC)).replace("+0000", "-0000")
    assert parse_retry_after(value, NOW_S) == pytest.approx(30.0)
