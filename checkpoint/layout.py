"""The month-document layout, shared by every store, free of I/O.

Each backend turns a checkpoint's deltas into its own writes; the checks and
the MongoDB document shape live here once, so the pymongo store and the
mongomock store cannot drift apart (mongomock has to issue the very same
filter and update documents one by one) and so the SQLite store refuses
exactly what the others refuse.
"""

from __future__ import annotations

import functools
import operator
import re
from collections import defaultdict
from typing import Any

from bson.int64 import Int64

from checkpoint.store import MonthDoc, MonthKey
from wire.series import SeriesKey, check_tag_key, check_tag_value, parse_series_id, series_key
from wire.timeslots import day_and_hour, month_hours

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_MONTH_RE = re.compile(r"\d{4}-(0[1-9]|1[0-2])")


def check_month(month: Any) -> str:
    """A ``YYYY-MM`` string; anything else would make a document id no reader can find."""
    if not isinstance(month, str) or not _MONTH_RE.fullmatch(month):
        raise ValueError(f"month {month!r} is invalid: expected YYYY-MM")
    return month


@functools.lru_cache(maxsize=65536)  # the same series come back every checkpoint
def check_sid(sid: str) -> SeriesKey:
    """The series a canonical series id names; ValueError for anything else.

    A malformed or non-canonical id (tags out of order, say) would be stored
    under a key that no query computes, so it is refused before any write.
    """
    try:
        parsed = parse_series_id(sid)
        key = series_key(parsed.tenant, parsed.metric, dict(parsed.tags))
    except ValueError as e:  # InvalidSeries included
        raise ValueError(f"series id {sid!r} is invalid: {e}") from None
    if key.sid != sid:
        raise ValueError(f"series id {sid!r} is not canonical; expected {key.sid!r}")
    return key


def month_deltas(key: MonthKey, hours: dict[int, int]) -> list[tuple[int, int]]:
    """The non-zero ``(absolute hour, delta)`` pairs of one document, sorted by hour.

    Raises ValueError before anything is written when the checkpoint is wrong:
    an hour outside the key's month would land in another month's slot while
    the ``ck`` guard of this month's document decides whether it is applied,
    and a value outside int64 would be wrapped or turned into a float by some
    backends. A day whose deltas add up to more than int64 is refused too:
    the document's day total (``d``) could not take it, and every store must
    refuse the same checkpoints. ``operator.index`` accepts numpy integers
    (what shard state may hand over) and refuses floats and strings.
    """
    sid, month = key
    check_sid(sid)
    first, end = month_hours(check_month(month))
    out: list[tuple[int, int]] = []
    for raw_hour, raw_delta in hours.items():
        hour = operator.index(raw_hour)
        if not first <= hour < end:
            raise ValueError(
                f"checkpoint delta for {sid!r} in {month}: hour {hour} is outside the month "
                f"(hours {first}..{end - 1})"
            )
        try:
            delta = operator.index(raw_delta)
        except TypeError:
            raise ValueError(
                f"checkpoint delta for {sid!r} in {month}, hour {hour}: "
                f"{type(raw_delta).__name__} {raw_delta!r} is not an integer"
            ) from None
        if not INT64_MIN <= delta <= INT64_MAX:
            raise ValueError(
                f"checkpoint delta for {sid!r} in {month}, hour {hour}: {delta} is outside int64"
            )
        if delta:
            out.append((hour, delta))
    out.sort()
    day_totals: dict[int, int] = defaultdict(int)
    for hour, delta in out:
        day_totals[(hour - first) // 24 + 1] += delta
    for day, total in sorted(day_totals.items()):
        if not INT64_MIN <= total <= INT64_MAX:
            raise ValueError(
                f"checkpoint deltas for {sid!r} in {month}: day {day} adds up to {total}, "
                "outside int64"
            )
    return out


def check_where(where: dict[str, str]) -> dict[str, str]:
    """Tag filters, validated because their keys become MongoDB field paths."""
    return {check_tag_key(k): check_tag_value(k, v) for k, v in where.items()}


def month_doc_id(key: MonthKey) -> str:
    sid, month = key
    return f"{sid}|{month}"


def month_update(key: MonthKey, hours: dict[int, int], ck: int) -> tuple[dict, dict] | None:
    """``(filter, update)`` applying one document's deltas at most once, or None if all are zero.

    The filter's ``ck < cp.ck`` guard is what makes a replayed checkpoint a
    no-op: a document that already took this checkpoint (or a newer one) does
    not match, and the upsert then collides with the existing ``_id``
    (duplicate key, code 11000), which callers treat as "already applied".
    Every number is an explicit Int64 so a field never starts as int32 and
    all stores hold the same BSON types.
    """
    pairs = month_deltas(key, hours)
    if not pairs:
        return None
    sid, month = key
    series = check_sid(sid)
    first, _ = month_hours(month)
    inc: dict[str, Int64] = {}
    day_totals: dict[int, int] = defaultdict(int)
    for hour, delta in pairs:
        day, hour_of_day = day_and_hour(hour, first)
        inc[f"h.{day}.{hour_of_day}"] = Int64(delta)
        day_totals[day] += delta
    for day, total in sorted(day_totals.items()):
        if total:  # $inc by 0 would only create a field that says nothing
            inc[f"d.{day}"] = Int64(total)
    update = {
        "$inc": inc,
        "$set": {"ck": Int64(ck)},
        "$setOnInsert": {
            "tenant": series.tenant,
            "metric": series.metric,
            "tags": dict(series.tags),
            "month": month,
        },
    }
    return {"_id": month_doc_id(key), "ck": {"$lt": Int64(ck)}}, update


def series_upsert(sid: str) -> tuple[dict, dict]:
    """``(filter, update)`` recording a series in the catalog; a no-op when it is there."""
    series = check_sid(sid)
    return {"_id": sid}, {
        "$setOnInsert": {
            "tenant": series.tenant,
            "metric": series.metric,
            "tags": dict(series.tags),
        }
    }


def month_doc_from_document(doc: dict) -> MonthDoc:
    """A stored month document back in absolute hours; ``d`` is derived, so only ``h`` is read."""
    sid, month = doc["_id"].rsplit("|", 1)
    first, _ = month_hours(month)
    hours: dict[int, int] = {}
    for day, by_hour in doc.get("h", {}).items():
        base = first + (int(day) - 1) * 24
        for hour_of_day, value in by_hour.items():
            if value:
                hours[base + int(hour_of_day)] = int(value)
    return MonthDoc(sid=sid, month=month, hours=hours, ck=int(doc.get("ck", 0)))
