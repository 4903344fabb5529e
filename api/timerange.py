"""Query planning for ``GET /v1/series``: from/to/granularity/tz/compare -> UTC hour buckets.

tally stores counts by absolute UTC hour (``unix_ts // 3600``, see ``wire.timeslots``).
Everything a user asks for -- local days, ISO weeks, months, local hours, in any IANA
zone -- must therefore be expressed as a sequence of half-open ranges of whole UTC
hours.  This module does exactly that and nothing else: it is sans I/O (strings in, a
:class:`Plan` out; a numpy array of hourly counts in, ``[[label, value], ...]`` out), so
the HTTP handler stays a thin shell and every calendar rule is unit-testable.

Rules, and why:

* A local day is exact as a sum of UTC hours only if the zone's UTC offset is a whole
  number of hours.  A zone with a fractional offset anywhere in the range (Asia/Kolkata
  +05:30, Asia/Kathmandu +05:45, Australia/Adelaide +09:30/+10:30, America/St_Johns) is
  refused with a :class:`QueryError` rather than answered approximately.  The same goes
  for the rare clock change that happens inside a UTC hour *and* moves a stretch of time
  into another bucket (America/Goose_Bay's 00:01 fall-backs before 2011): a UTC hour
  that belongs to two local days cannot be split.
* DST days are simply 23 or 25 UTC hours long; a local date that does not exist at all
  (Pacific/Apia skipped 2011-12-30) is an empty bucket, still present with value 0.
* A bucket starts at the first instant whose local date belongs to it, so a day whose
  midnight is skipped by a clock change starts at the first instant that exists.
* Offsets are found by sampling the zone once per day and bisecting to the second
  where two samples differ.  Every zone in tzdata keeps an offset for more than six
  days after 1970, so daily samples see every change; the cost is about one zoneinfo
  call per day of range instead of one per hour.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

__all__ = ["GRANULARITIES", "Plan", "QueryError", "bucket_points", "compare_plan", "plan_range"]

GRANULARITIES = ("hour", "day", "week", "month")
COMPARE_MODES = ("previous_period", "previous_year")

_HOUR = 3600
_DAY = 86400
_EPOCH_DATE = date(1970, 1, 1)
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_SECOND = timedelta(seconds=1)
# Keeps every date computation (to + 1 day, window margins, compare shifts) inside
# datetime's range; nothing tally stores is anywhere near it.
_MAX_YEAR = 9998
_SAMPLE = _DAY
_MARGIN = 2 * _DAY  # wider than any UTC offset, so wall-time lookups stay inside the window
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DATETIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}.*")
# Names zoneinfo loads that are not zones a client can mean: "localtime" is whatever the
# server is configured with, "right/" zones count leap seconds that Unix time does not.
_NOT_ZONES = ("localtime", "posixrules")


class QueryError(ValueError):
    """An invalid query parameter; the HTTP layer answers 400 ``bad_request`` with the message.

    Messages name the parameter and what is wrong, because they are shown to the caller
    as they are.
    """


@dataclass(frozen=True)
class Plan:
    """A resolved range: what to read (UTC hours ``[h0, h1)``) and how to bucket it.

    ``from_label``/``to_label`` are the normalized inputs echoed in the answer: a date
    ``YYYY-MM-DD`` stays a date; a datetime becomes the start of its (floored) hour in
    ``tz``, with offset.  ``buckets`` are ``(label, bucket_h0, bucket_h1)`` in order,
    clipped to ``[h0, h1)``, contiguous, one per bucket of the range (zeros included).
    """

    tz: str
    granularity: str
    from_label: str
    to_label: str
    h0: int
    h1: int
    buckets: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class _Endpoint:
    """One parsed ``from``/``to``: exactly one of the three fields is set."""

    day: date | None = None  # a whole local date
    wall: datetime | None = None  # naive local wall time in tz, floored to the hour
    instant: int | None = None  # UTC seconds, floored to the hour (input had an offset)


# --------------------------------------------------------------------------- public API


def plan_range(
    from_s: str,
    to_s: str,
    granularity: str = "day",
    tz: str = "UTC",
    *,
    max_days: int = 3660,
    max_hour_buckets: int = 24 * 366,
) -> Plan:
    """Resolve ``from``/``to`` in ``tz`` into UTC hours and ``granularity`` buckets.

    ``from`` and ``to`` are each either a date ``YYYY-MM-DD`` or an ISO datetime:

    * a date ``from`` starts at local midnight of that date; a date ``to`` is inclusive,
      so the range ends at local midnight after it;
    * a datetime is floored to its hour and that hour is included, for ``to`` as well;
      with an offset (``+01:00``, ``Z``) it is that instant, without one it is local
      time in ``tz``.  A local time repeated by a fall-back resolves to its first
      occurrence for ``from`` and its last for ``to`` (so ``01:00`` to ``01:00`` covers
      both hours); a local time skipped by a spring-forward starts ``from`` at the first
      instant after the gap and ends ``to`` just before it.

    Mixing the two is allowed, each end keeps its own meaning (``from=2026-11-01`` with
    ``to=2026-11-01T11:00`` is local midnight through the 11:00 hour).

    Raises :class:`QueryError` for a malformed value, an unknown or fractional-offset
    zone, ``from`` after ``to``, a range starting before 1970-01-01T00:00Z, more than
    ``max_days`` days, or (granularity ``hour``) more than ``max_hour_buckets`` buckets.

    A plan depends on nothing but these arguments (zone rules are fixed for the
    process's life), and a dashboard asks for the same few ranges over and over:
    plans of up to ``CACHED_BUCKETS`` buckets are kept (the last ``CACHED_PLANS``),
    which takes a large share of a one-series query's own time away.
    """
    key = (from_s, to_s, granularity, tz, max_days, max_hour_buckets)
    plan = _plans.get(key)
    if plan is not None:
        _plans.move_to_end(key)
        return plan
    plan = _plan_range(from_s, to_s, granularity, tz, max_days=max_days,
                       max_hour_buckets=max_hour_buckets)
    if len(plan.buckets) <= CACHED_BUCKETS:  # a bounded memory, whatever the queries
        _plans[key] = plan
        if len(_plans) > CACHED_PLANS:
            _plans.popitem(last=False)
    return plan


CACHED_PLANS = 256
CACHED_BUCKETS = 1000  # a year by day, a month by hour: ~200 KB a plan at most
_plans: OrderedDict[tuple, Plan] = OrderedDict()


def _plan_range(
    from_s: str, to_s: str, granularity: str, tz: str, *, max_days: int, max_hour_buckets: int
) -> Plan:
    gran = _check_granularity(granularity)
    zone = _zone(tz)
    start = _parse_endpoint("from", from_s)
    end = _parse_endpoint("to", to_s)
    return _build(
        start,
        end,
        gran,
        tz,
        zone,
        str(from_s).strip(),
        str(to_s).strip(),
        max_days=max_days,
        max_hour_buckets=max_hour_buckets,
    )


def compare_plan(plan: Plan, mode: str) -> Plan:
    """The plan of the comparison range for ``compare=mode``, same tz and granularity.

    * ``previous_period``: for a date range of n days, the n days just before ``from``
      (``from - n`` .. ``from - 1``); otherwise the same number of UTC hours just
      before the range.
    * ``previous_year``: the same dates (or local wall times) one year earlier, Feb 29
      becoming Feb 28; the result may be a day or an hour shorter or longer.

    The comparison range is about as long as ``plan``, so the size limits are not
    applied again; every other rule is (a comparison reaching before 1970 is refused).
    """
    if mode not in COMPARE_MODES:
        raise QueryError(f"compare {mode!r} is not one of {', '.join(COMPARE_MODES)}")
    zone = _zone(plan.tz)
    as_wall = mode == "previous_year"
    start = _parse_label(plan.from_label, as_wall=as_wall)
    end = _parse_label(plan.to_label, as_wall=as_wall)
    if mode == "previous_year":
        start, end = _year_earlier(start), _year_earlier(end)
    elif start.day is not None and end.day is not None:
        n = (end.day - start.day).days + 1
        start = _Endpoint(day=start.day - timedelta(days=n))
        end = _Endpoint(day=end.day - timedelta(days=n))
    else:
        n = plan.h1 - plan.h0
        start = _Endpoint(instant=(plan.h0 - n) * _HOUR)
        end = _Endpoint(instant=(plan.h0 - 1) * _HOUR)
    try:
        return _build(
            start,
            end,
            plan.granularity,
            plan.tz,
            zone,
            _endpoint_text(start),
            _endpoint_text(end),
            max_days=None,
            max_hour_buckets=None,
        )
    except QueryError as e:
        raise QueryError(f"compare={mode}: {e}") from None


def bucket_points(plan: Plan, hourly: Any) -> list[list[Any]]:
    """Sum hourly counts into the plan's buckets: ``[[label, int], ...]``, one per bucket.

    ``hourly[k]`` is the count of UTC hour ``plan.h0 + k``.  Sums are differences of a
    cumulative sum, so a ten-year daily query costs two numpy passes, not a Python loop
    over 87,840 hours.  The running sum is int64 when it provably cannot overflow
    (max |count| times hours < 2**63) and Python ints otherwise, so a total is exact
    even past int64 and never silently wrapped.
    """
    arr = np.asarray(hourly)
    n = plan.h1 - plan.h0
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"hourly has shape {arr.shape}; the plan covers {n} hours")
    if arr.dtype.kind not in "iuO":
        raise ValueError(f"hourly must hold integers, not {arr.dtype}")
    if plan.granularity == "hour":
        return [[label, int(v)]
                for (label, _, _), v in zip(plan.buckets, arr.tolist(), strict=True)]
    bound = max(abs(int(arr.min())), abs(int(arr.max()))) * n if n else 0
    if bound < 2**63 and arr.dtype != object:
        csum = np.cumsum(arr.astype(np.int64, copy=False), dtype=np.int64)
        zero: Any = np.zeros(1, dtype=np.int64)
    else:
        csum = np.cumsum(arr.astype(object))
        zero = np.zeros(1, dtype=object)
    c = np.concatenate((zero, csum))
    lo = np.fromiter((b0 - plan.h0 for _, b0, _ in plan.buckets), dtype=np.int64)
    hi = np.fromiter((b1 - plan.h0 for _, _, b1 in plan.buckets), dtype=np.int64)
    values = (c[hi] - c[lo]).tolist()
    return [[label, int(v)] for (label, _, _), v in zip(plan.buckets, values, strict=True)]


# ------------------------------------------------------------------------------ parsing


def _check_granularity(granularity: Any) -> str:
    if granularity not in GRANULARITIES:
        raise QueryError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    return str(granularity)


def _zone(tz: Any) -> ZoneInfo:
    """Load an IANA zone; every way zoneinfo can fail becomes a QueryError naming it."""
    if not isinstance(tz, str) or not tz:
        raise QueryError(f"tz {tz!r} is not an IANA time zone name (e.g. Europe/London)")
    if tz in _NOT_ZONES or tz.startswith("right/"):
        raise QueryError(f"tz {tz!r} is not an IANA time zone name (e.g. Europe/London)")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise QueryError(
            f"tz {tz!r} is not a known IANA time zone name (e.g. Europe/London; names are "
            "case-sensitive)"
        ) from None


def _parse_endpoint(param: str, value: Any) -> _Endpoint:
    """A date or an ISO datetime; errors name the parameter and echo the value."""
    if not isinstance(value, str) or not value.strip():
        raise QueryError(f"{param} is required: a date YYYY-MM-DD or an ISO datetime")
    s = value.strip()
    if _DATE_RE.fullmatch(s):
        try:
            d = date.fromisoformat(s)
        except ValueError as e:
            raise QueryError(f"{param} {s!r} is not a valid date: {e}") from None
        _check_year(param, s, d.year)
        return _Endpoint(day=d)
    if not _DATETIME_RE.fullmatch(s):
        raise QueryError(
            f"{param} {s!r} is not a date YYYY-MM-DD "
            "or an ISO datetime YYYY-MM-DDTHH:MM[:SS][+HH:MM]"
        )
    try:
        dt = datetime.fromisoformat(s)
    except ValueError as e:
        hint = ""
        if re.search(r"[0-9] [0-9]{2}:?[0-9]{2}$", s):
            hint = " (a '+' in a query string must be sent as %2B, or it arrives as a space)"
        raise QueryError(f"{param} {s!r} is not a valid ISO datetime: {e}{hint}") from None
    _check_year(param, s, dt.year)
    if dt.tzinfo is None:
        return _Endpoint(wall=dt.replace(minute=0, second=0, microsecond=0))
    seconds = (dt - _EPOCH_UTC) // _ONE_SECOND
    return _Endpoint(instant=seconds - seconds % _HOUR)


def _check_year(param: str, s: str, year: int) -> None:
    if year < 1969:  # any zone's local 1968 is before the epoch; 1969 is checked exactly
        raise QueryError(f"{param} {s} is before 1970-01-01; tally has no counts before then")
    if year > _MAX_YEAR:
        raise QueryError(f"{param} {s} is out of range: years up to {_MAX_YEAR} are supported")


def _parse_label(label: str, *, as_wall: bool) -> _Endpoint:
    """Invert Plan.from_label/to_label: dates stay dates; a datetime (written in the
    plan's zone, with its local offset) becomes that instant, or with ``as_wall`` its
    local wall time."""
    if _DATE_RE.fullmatch(label):
        return _Endpoint(day=date.fromisoformat(label))
    dt = datetime.fromisoformat(label)
    if as_wall or dt.tzinfo is None:
        return _Endpoint(wall=dt.replace(tzinfo=None))
    return _Endpoint(instant=(dt - _EPOCH_UTC) // _ONE_SECOND)


def _year_earlier(ep: _Endpoint) -> _Endpoint:
    """Same calendar position one year back.  A datetime keeps its local wall time, not
    its offset, so 09:00 in summer compares with 09:00 the summer before."""
    if ep.day is not None:
        return _Endpoint(day=_minus_year(ep.day))
    assert ep.wall is not None, "previous_year reads labels as wall times"
    return _Endpoint(wall=datetime.combine(_minus_year(ep.wall.date()), ep.wall.time()))


def _minus_year(d: date) -> date:
    if d.month == 2 and d.day == 29:
        return date(d.year - 1, 2, 28)
    return d.replace(year=d.year - 1)


def _endpoint_text(ep: _Endpoint) -> str:
    """How an endpoint is named in error messages of a derived (compare) range."""
    if ep.day is not None:
        return ep.day.isoformat()
    if ep.wall is not None:
        return ep.wall.isoformat()
    assert ep.instant is not None
    return datetime.fromtimestamp(ep.instant, UTC).isoformat()


# ----------------------------------------------------------------------------- planning


def _build(
    start: _Endpoint,
    end: _Endpoint,
    gran: str,
    tzname: str,
    zone: ZoneInfo,
    from_text: str,
    to_text: str,
    *,
    max_days: int | None,
    max_hour_buckets: int | None,
) -> Plan:
    d0, d1 = start.day, end.day
    both_dates = d0 is not None and d1 is not None
    if d0 is not None and d1 is not None and d0 > d1:
        raise QueryError(f"from {from_text} is after to {to_text}")

    # Cheap bounds before any zone work, so an absurd range costs nothing.  Walls and
    # dates are treated as if they were UTC: off by at most a day, hence the slack.
    a0 = _approx_seconds(start, end_of_range=False)
    a1 = _approx_seconds(end, end_of_range=True)
    if a0 < -_MARGIN:
        raise QueryError(f"from {from_text} is before 1970-01-01; tally has no counts before then")
    if max_days is not None:
        if d0 is not None and d1 is not None:
            _check_days((d1 - d0).days + 1, max_days, from_text, to_text)
        elif (a1 - a0) > (max_days + 2) * _DAY:
            _check_days(-(-(a1 - a0) // _DAY), max_days, from_text, to_text)

    timeline = _Timeline(zone, min(a0, a1) - _MARGIN, max(a0, a1) + _MARGIN)
    start_s = _resolve(start, timeline, end_of_range=False)
    end_s = _resolve(end, timeline, end_of_range=True)
    # A datetime's hour is included whole; a date's bounds must already be whole hours.
    h0 = start_s // _HOUR
    h1 = -(-end_s // _HOUR)
    if h1 <= h0 or end_s <= start_s:
        if start.instant is None and end.instant is None and _wall_order(start, end) <= 0:
            raise QueryError(
                f"from {from_text} to {to_text} is empty in {tzname}: "
                "a clock change skips those local times"
            )
        raise QueryError(f"from {from_text} is after to {to_text}")
    if start_s < 0:
        raise QueryError(
            f"from {from_text} in {tzname} starts at {_iso_utc(start_s)}, before "
            "1970-01-01T00:00:00Z; tally has no counts before then"
        )
    timeline.check_whole_hours(tzname, h0 * _HOUR, h1 * _HOUR)
    for s, ep in ((start_s, start), (end_s, end)):
        if ep.day is not None and s % _HOUR:
            raise _split_hour_error(tzname, s, "a day boundary")
    if max_days is not None and not both_dates:
        _check_days(-(-(h1 - h0) // 24), max_days, from_text, to_text)
    if gran == "hour" and max_hour_buckets is not None and h1 - h0 > max_hour_buckets:
        raise QueryError(
            f"granularity=hour from {from_text} to {to_text} is {h1 - h0} buckets; at most "
            f"{max_hour_buckets} hourly buckets per query (use granularity=day or a shorter range)"
        )

    if gran == "hour":
        labels = timeline.hour_labels(h0, h1)
        buckets = tuple((label, h, h + 1) for h, label in enumerate(labels, start=h0))
    else:
        timeline.check_clean_hours(tzname, gran, h0 * _HOUR, h1 * _HOUR)
        first_day = start.day if start.day is not None else timeline.local_date(h0 * _HOUR)
        last_day = end.day if end.day is not None else timeline.local_date((h1 - 1) * _HOUR)
        buckets = _calendar_buckets(timeline, tzname, gran, first_day, last_day, h0, h1)

    from_label = start.day.isoformat() if start.day is not None else timeline.iso_local(h0 * _HOUR)
    to_label = end.day.isoformat() if end.day is not None else timeline.iso_local((h1 - 1) * _HOUR)
    return Plan(tzname, gran, from_label, to_label, h0, h1, buckets)


def _approx_seconds(ep: _Endpoint, *, end_of_range: bool) -> int:
    if ep.instant is not None:
        return ep.instant + (_HOUR if end_of_range else 0)
    if ep.wall is not None:
        return _wall_seconds(ep.wall) + (_HOUR if end_of_range else 0)
    assert ep.day is not None
    return _date_seconds(ep.day) + (_DAY if end_of_range else 0)


def _resolve(ep: _Endpoint, timeline: _Timeline, *, end_of_range: bool) -> int:
    """UTC seconds where the range starts (or, for ``to``, ends exclusive)."""
    if ep.instant is not None:
        return ep.instant + (_HOUR if end_of_range else 0)
    if ep.wall is not None:
        # The last instant whose wall time is <= to's hour ends just before the first
        # instant at or after the next local hour.
        return timeline.first_instant(_wall_seconds(ep.wall) + (_HOUR if end_of_range else 0))
    assert ep.day is not None
    return timeline.first_instant(_date_seconds(ep.day) + (_DAY if end_of_range else 0))


def _wall_order(start: _Endpoint, end: _Endpoint) -> int:
    """Compare two local endpoints by their wall clock (dates as local midnight)."""
    a = _approx_seconds(start, end_of_range=False)
    b = _approx_seconds(end, end_of_range=False)
    return (a > b) - (a < b)


def _check_days(days: int, max_days: int, from_text: str, to_text: str) -> None:
    if days > max_days:
        raise QueryError(
            f"from {from_text} to {to_text} is {days} days; at most {max_days} days per query"
        )


def _calendar_buckets(
    timeline: _Timeline,
    tzname: str,
    gran: str,
    first_day: date,
    last_day: date,
    h0: int,
    h1: int,
) -> tuple[tuple[str, int, int], ...]:
    """Day/week/month buckets from the one containing first_day to the one containing
    last_day, each starting at the first instant of its local start date, clipped."""
    starts = _bucket_starts(gran, first_day, last_day)
    walls = [_date_seconds(d) for d in starts]
    instants = timeline.first_instants(walls)
    lo, hi = h0 * _HOUR, h1 * _HOUR
    edges = []
    for t in instants:
        if lo < t < hi and t % _HOUR:
            raise _split_hour_error(tzname, t, f"a {gran} boundary")
        edges.append(min(max(t, lo), hi) // _HOUR)
    edges[0], edges[-1] = h0, h1
    label = _month_label if gran == "month" else date.isoformat
    return tuple((label(starts[i]), edges[i], edges[i + 1]) for i in range(len(starts) - 1))


def _bucket_starts(gran: str, first_day: date, last_day: date) -> list[date]:
    """Start dates of every bucket touching [first_day, last_day], plus the next one."""
    if gran == "day":
        n = (last_day - first_day).days + 2
        return [first_day + timedelta(days=i) for i in range(n)]
    if gran == "week":
        monday = first_day - timedelta(days=first_day.weekday())
        n = (last_day - monday).days // 7 + 2
        return [monday + timedelta(weeks=i) for i in range(n)]
    y, m = first_day.year, first_day.month
    out = []
    while True:
        out.append(date(y, m, 1))
        if (y, m) > (last_day.year, last_day.month):
            return out
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)


def _bucket_key(gran: str, d: date) -> date:
    if gran == "week":
        return d - timedelta(days=d.weekday())
    if gran == "month":
        return d.replace(day=1)
    return d


def _month_label(d: date) -> str:
    return f"{d.year:04d}-{d.month:02d}"


def _split_hour_error(tzname: str, t: int, what: str) -> QueryError:
    return QueryError(
        f"tz {tzname} puts {what} at {_iso_utc(t)}, inside a UTC hour; tally stores counts "
        f"by whole UTC hours, so days in {tzname} cannot be summed exactly around then"
    )


# ----------------------------------------------------------------------------- the zone


class _Timeline:
    """The zone's UTC offsets over a window of UTC seconds, as constant segments.

    ``starts[i]`` is where ``offsets[i]`` begins (``starts[0]`` is the window start);
    a segment lasts until the next start, the last one forever.  With the segments,
    wall time <-> UTC is arithmetic, so thousands of day boundaries cost no zone calls.
    """

    def __init__(self, zone: ZoneInfo, t0: int, t1: int) -> None:
        self.zone = zone
        off0 = self._offset(t0)
        self.starts = [t0]
        self.offsets = [off0]
        prev_t, prev_o = t0, off0
        t = t0
        while t < t1:
            t = min(t + _SAMPLE, t1)
            o = self._offset(t)
            if o != prev_o:
                self._split(prev_t, prev_o, t, o)
            prev_t, prev_o = t, o

    def _offset(self, t: int) -> int:
        off = datetime.fromtimestamp(t, self.zone).utcoffset()
        assert off is not None
        return off // _ONE_SECOND

    def _split(self, a: int, oa: int, b: int, ob: int) -> None:
        """Append, in order, every change between a (offset oa) and b (offset ob != oa)."""
        if b - a == 1:
            self.starts.append(b)
            self.offsets.append(ob)
            return
        m = (a + b) // 2
        om = self._offset(m)
        if om != oa:
            self._split(a, oa, m, om)
        if om != ob:
            self._split(m, om, b, ob)

    def offset_at(self, t: int) -> int:
        return self.offsets[max(bisect_right(self.starts, t) - 1, 0)]

    def local_date(self, t: int) -> date:
        return _EPOCH_DATE + timedelta(days=(t + self.offset_at(t)) // _DAY)

    def iso_local(self, t: int) -> str:
        tzinfo = timezone(timedelta(seconds=self.offset_at(t)))
        return datetime.fromtimestamp(t, tzinfo).isoformat(timespec="seconds")

    def hour_labels(self, h0: int, h1: int) -> list[str]:
        """Local ISO labels of UTC hours [h0, h1) (``2026-10-25T01:00:00+01:00``), built
        with numpy: a year of hourly buckets would otherwise be 8,784 datetime objects."""
        t = np.arange(h0, h1, dtype=np.int64) * _HOUR
        i = np.maximum(np.searchsorted(np.array(self.starts), t, side="right") - 1, 0)
        offsets = np.array(self.offsets, dtype=np.int64)[i]
        walls = np.datetime_as_string((t + offsets).astype("datetime64[s]"), unit="s")
        suffix = {o: _fmt_offset(o) for o in set(self.offsets)}
        return [w + suffix[o] for w, o in zip(walls.tolist(), offsets.tolist(), strict=True)]

    def first_instant(self, wall: int) -> int:
        return self.first_instants([wall])[0]

    def first_instants(self, walls: list[int]) -> list[int]:
        """For ascending local wall times (seconds, as if UTC), the first instant whose
        wall time is at or after each one -- the start of a local day even when its
        midnight is skipped or repeated.  One merge pass over the segments."""
        out = []
        i, n = 0, len(self.starts)
        for wall in walls:
            while True:
                t = max(self.starts[i], wall - self.offsets[i])
                if i + 1 == n or t < self.starts[i + 1]:
                    out.append(t)
                    break
                i += 1
        return out

    def check_whole_hours(self, tzname: str, lo: int, hi: int) -> None:
        """Refuse a fractional offset anywhere in [lo, hi)."""
        i = max(bisect_right(self.starts, lo) - 1, 0)
        while i < len(self.starts) and self.starts[i] < hi:
            off = self.offsets[i]
            if off % _HOUR:
                raise QueryError(
                    f"tz {tzname} is at UTC{_fmt_offset(off)} during this range; tally stores "
                    f"counts by whole UTC hours, so days in {tzname} cannot be summed exactly "
                    "(zones whose UTC offset is a whole number of hours are supported)"
                )
            i += 1

    def check_clean_hours(self, tzname: str, gran: str, lo: int, hi: int) -> None:
        """Refuse a clock change in [lo, hi) that puts one UTC hour in two buckets.

        Between changes the wall clock runs forward in whole-hour steps from whole hours,
        so only a change can do this: by stepping back over a bucket boundary, or by
        happening mid-hour (00:01 local) with the two parts of the hour in different
        buckets.  Usual changes (at a whole UTC hour, within a day) pass.
        """
        key = _bucket_key
        for t in self.starts[1:]:
            if not lo < t < hi:
                continue
            before, after = key(gran, self.local_date(t - 1)), key(gran, self.local_date(t))
            split = False
            if t % _HOUR:
                hour = t - t % _HOUR
                first = key(gran, self.local_date(max(hour, lo)))
                last = key(gran, self.local_date(min(hour + _HOUR, hi) - 1))
                split = first != last
            if after < before or split:
                raise QueryError(
                    f"tz {tzname} changes its UTC offset at {_iso_utc(t)} so that one UTC "
                    f"hour falls in two local {gran}s; tally stores counts by whole UTC "
                    f"hours, so {gran}s in {tzname} cannot be summed exactly around then "
                    "(granularity=hour works)"
                )


def _fmt_offset(seconds: int) -> str:
    sign = "-" if seconds < 0 else "+"
    h, rest = divmod(abs(seconds), _HOUR)
    m, s = divmod(rest, 60)
    return f"{sign}{h:02d}:{m:02d}" + (f":{s:02d}" if s else "")


def _iso_utc(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _date_seconds(d: date) -> int:
    return (d - _EPOCH_DATE).days * _DAY


def _wall_seconds(dt: datetime) -> int:
    return (dt - datetime(1970, 1, 1)) // _ONE_SECOND
