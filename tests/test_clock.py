"""Time formatting: the cached iso_ms agrees with datetime across second boundaries."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pusherd.clock import iso_ms


@pytest.mark.parametrize(
    "ms",
    [0, 999, 1000, 1_763_821_799_999, 1_763_821_800_000, 1_763_821_800_123, 1_763_821_799_500],
)
def test_iso_ms_matches_datetime(ms: int) -> None:
    expected = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    assert iso_ms(ms) == expected.replace("+00:00", "Z")


def test_iso_ms_same_second_different_millis_and_back_again() -> None:
    assert iso_ms(1_700_000_000_001) == "2023-11-14T22:13:20.001Z"
    assert iso_ms(1_700_000_000_999) == "2023-11-14T22:13:20.999Z"
    assert iso_ms(1_700_000_001_000) == "2023-11-14T22:13:21.000Z"
    assert iso_ms(1_700_000_000_002) == "2023-11-14T22:13:20.002Z"
