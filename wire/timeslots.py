"""Time slots and the UTC month calendar: the one place hours, days and months convert.

Storage resolution is the UTC hour, counted from the epoch: an absolute hour
index (``ts // 3600``) is the one time coordinate inside tally. UTC days
(``hour // 24``) and months are derived from it only where the month-document
layout needs them.

A UTC month has two forms. Its *number*, months since 1970-01, is what a shard
computes with: array arithmetic over a batch's hours, small dict keys. Its
*name*, ``"YYYY-MM"``, is what month documents, the store and the wire carry.
Both forms live here, over one calendar (the proleptic Gregorian one that
both ``datetime`` and numpy's ``datetime64`` implement), so no other module
does calendar arithmetic of its own: a name is always ``month_name`` of a
number, a month's hours always come from ``month_days``.

This is the lowest layer (the client uses it too): standard library and numpy
only.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

import numpy as np

SECONDS_PER_HOUR = 3600
FUTURE_TOLERANCE = 3600  # a timestamp more than this ahead of the server clock is a bad row

_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()  # day 0 as a proleptic Gregorian ordinal


def hour_of(ts: int) -> int:
    return ts // SECONDS_PER_HOUR


def hour_start(hour: int) -> datetime:
    return datetime.fromtimestamp(hour * SECONDS_PER_HOUR, UTC)


# ---- month numbers (months since 1970-01) ---------------------------------


def month_name(mno: int) -> str:
    """``"YYYY-MM"`` of a month number."""
    return f"{1970 + mno // 12:04d}-{mno % 12 + 1:02d}"


def month_number(month: str) -> int:
    """The month number of a ``"YYYY-MM"`` name."""
    return (int(month[:4]) - 1970) * 12 + int(month[5:7]) - 1


def month_of(hour: int) -> int:
    """The month number of one absolute hour (``months_of_hours`` for arrays)."""
    d = date.fromordinal(_EPOCH_ORDINAL + hour // 24)
    return (d.year - 1970) * 12 + d.month - 1


def _first_day(mno: int) -> int:
    year, month = divmod(mno, 12)
    return date(1970 + year, month + 1, 1).toordinal() - _EPOCH_ORDINAL


def month_days(mno: int) -> tuple[int, int]:
    """[first, end) UTC days (since 1970-01-01) of a month number."""
    return _first_day(mno), _first_day(mno + 1)


def months_of_hours(hours: np.ndarray) -> np.ndarray:
    """Month numbers of absolute UTC hours (vectorised, int64).

    numpy's calendar conversion is per element and dear next to the rest of
    an ingest, while a batch spans few days: when the days are fewer than the
    hours, each day is converted once and the hours look theirs up.
    """
    days = hours // 24
    if len(days) > 64:
        lo, hi = int(days.min()), int(days.max())
        if hi - lo < len(days):
            months = np.arange(lo, hi + 1).astype("datetime64[D]").astype("datetime64[M]")
            return months.astype(np.int64)[days - lo]
    return days.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)


# ---- month names ("YYYY-MM") ----------------------------------------------


def month_of_hour(hour: int) -> str:
    return month_name(month_of(hour))


def month_first_hour(month: str) -> int:
    return _first_day(month_number(month)) * 24


def next_month(month: str) -> str:
    return month_name(month_number(month) + 1)


def month_hours(month: str) -> tuple[int, int]:
    """[first, end) absolute hours of a UTC month."""
    first, end = month_days(month_number(month))
    return first * 24, end * 24


def months_between(h0: int, h1: int) -> list[str]:
    """UTC months overlapping the hour range [h0, h1)."""
    if h1 <= h0:
        return []
    return [month_name(m) for m in range(month_of(h0), month_of(h1 - 1) + 1)]


def day_and_hour(hour: int, month_start: int) -> tuple[int, int]:
    """(day of month from 1, hour of day) of an absolute hour inside its month."""
    offset = hour - month_start
    return offset // 24 + 1, offset % 24
