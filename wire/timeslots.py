"""Time slots: storage resolution is the UTC hour, counted from the epoch.

An absolute hour index (``ts // 3600``) is the one time coordinate inside
tally; UTC months, days of the month and hours of the day are derived from it
only where the month-document layout needs them.
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime

SECONDS_PER_HOUR = 3600
FUTURE_TOLERANCE = 3600  # a timestamp more than this ahead of the server clock is a bad row


def hour_of(ts: int) -> int:
    return ts // SECONDS_PER_HOUR


def hour_start(hour: int) -> datetime:
    return datetime.fromtimestamp(hour * SECONDS_PER_HOUR, UTC)


def month_of_hour(hour: int) -> str:
    dt = hour_start(hour)
    return f"{dt.year:04d}-{dt.month:02d}"


def month_first_hour(month: str) -> int:
    year, mon = int(month[:4]), int(month[5:7])
    return calendar.timegm((year, mon, 1, 0, 0, 0)) // SECONDS_PER_HOUR


def next_month(month: str) -> str:
    year, mon = int(month[:4]), int(month[5:7])
    return f"{year + 1:04d}-01" if mon == 12 else f"{year:04d}-{mon + 1:02d}"


def month_hours(month: str) -> tuple[int, int]:
    """[first, end) absolute hours of a UTC month."""
    return month_first_hour(month), month_first_hour(next_month(month))


def months_between(h0: int, h1: int) -> list[str]:
    """UTC months overlapping the hour range [h0, h1)."""
    if h1 <= h0:
        return []
    out = []
    month, last = month_of_hour(h0), month_of_hour(h1 - 1)
    while True:
        out.append(month)
        if month == last:
            return out
        month = next_month(month)


def day_and_hour(hour: int, month_start: int) -> tuple[int, int]:
    """(day of month from 1, hour of day) of an absolute hour inside its month."""
    offset = hour - month_start
    return offset // 24 + 1, offset % 24
