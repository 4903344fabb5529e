"""The one UTC month calendar (wire/timeslots.py): numbers and names agree with datetime."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime

import numpy as np
import pytest

from tally.wire.timeslots import (
    day_and_hour,
    month_days,
    month_first_hour,
    month_hours,
    month_name,
    month_number,
    month_of,
    month_of_hour,
    months_between,
    months_of_hours,
    next_month,
)


@pytest.mark.parametrize("n", [0, 1, 65, 1000])
@pytest.mark.parametrize("spread", [48, 24 * 400, 24 * 365 * 300])
def test_months_of_hours_match_the_calendar(n: int, spread: int) -> None:
    # a batch's few days are converted once each; a long span converts every hour
    rng = np.random.default_rng(n + spread)
    hours = (int(rng.integers(0, 24 * 365 * 60)) + rng.integers(0, spread, n)).astype(np.int64)
    hours[:1] = 24 * 31 - 1  # 1970-01-31T23: the last hour of a month
    expected = (hours * 3600).astype("datetime64[s]").astype("datetime64[M]").astype(np.int64)
    got = months_of_hours(hours)
    assert got.dtype == np.int64 and got.tolist() == expected.tolist()
    assert [month_of(h) for h in hours.tolist()] == expected.tolist()


@pytest.mark.parametrize("year", [1970, 1999, 2000, 2024, 2026, 2100, 2400, 4800])
def test_numbers_and_names_are_one_calendar(year: int) -> None:
    for mon in range(1, 13):
        name = f"{year:04d}-{mon:02d}"
        mno = month_number(name)
        assert month_name(mno) == name
        first = calendar.timegm((year, mon, 1, 0, 0, 0)) // 3600
        days = calendar.monthrange(year, mon)[1]
        assert month_days(mno) == (first // 24, first // 24 + days)
        assert month_first_hour(name) == first
        assert month_hours(name) == (first, first + 24 * days)
        for h in (first, first + 24 * days - 1):
            assert month_of(h) == mno and month_of_hour(h) == name
            assert month_of_hour(h) == datetime.fromtimestamp(h * 3600, UTC).strftime("%Y-%m")
        assert day_and_hour(first + 24 * days - 1, first) == (days, 23)
        following = f"{year + 1:04d}-01" if mon == 12 else f"{year:04d}-{mon + 1:02d}"
        assert next_month(name) == following
        assert months_between(first, first + 24 * days + 1) == [name, following]
    assert months_between(5, 5) == []
