"""ClickHouse beside tally: ``tally bench --peer clickhouse``.

The peer is ClickHouse running in-process through chDB (PyPI ``chdb``, the ``bench``
extra). It receives the bench's batches exactly as tally's columnar frames carry them
(a series table, ``i`` indexing it, ``ts`` and ``v``), answers the same questions, and
an :class:`Oracle` computes the exact answers from the same arrays with numpy, so the
bench checks the peer and tally against one truth.

The schema is what a ClickHouse user would build for counters of tagged series (it is
the shape of ClickHouse's own TimeSeries engine, a tags table beside a data table):

- ``series``: one row per series, ``id`` (64 bits of blake2b over the canonical series
  id of ``tally.wire.series``), tenant and metric as ``LowCardinality(String)``, the
  canonical id and the tags as a ``Map``; ORDER BY (tenant, metric, sid).
- ``raw``: a MergeTree of the increments as they came, ORDER BY (tenant, metric, id, ts).
- ``hourly``: the (tenant, metric, id, hour) slots' sums, kept by ClickHouse itself:
  by default an AggregatingMergeTree of ``SimpleAggregateFunction(sum, Int64)``, which
  keeps the sums a SummingMergeTree keeps and took half the time to insert into here
  (``hourly_engine="summing"`` for the SummingMergeTree). Either collapses equal keys
  when a part is written and when parts merge, lazily, so every query ``sum()``s and
  groups: it never relies on a merge having happened.

chDB runs one embedded ClickHouse per process, at one path: one peer at a time (close
it before opening another on another workdir; ``reset`` between cells).

Each batch becomes one Arrow table whose tenant and metric are dictionary arrays over
the batch's own names (the frame's dictionary encoding, handed over as it is) and whose
``id``, ``ts`` and ``v`` are numpy arrays; ``INSERT … SELECT … FROM Python(table)``
reads it without a copy into Python objects. That is chDB's fastest documented insert
path (``VALUES`` text, or a DataFrame, measured slower). pyarrow arrives with chdb (it
is one of chdb's own requirements) and is imported only beside it.

Like tally, the peer resolves a frame's series table with one dict lookup per entry
(an entry seen before costs no validation and no hashing), and inserts a series into
``series`` the first time it is seen. That shared work is timed once and counted in
both ``insert_seconds["raw"]`` and ``insert_seconds["hourly"]``: each figure is what it
costs to land a batch in that table alone.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from datetime import date, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from tally.wire.series import series_key
from tally.wire.timeslots import SECONDS_PER_HOUR, month_hours

INSTALL_HINT = "pip install 'tally[bench]'"


class PeerUnavailable(RuntimeError):
    """The ClickHouse peer was asked for but chDB is not installed."""


def _chdb() -> tuple[Any, Any]:
    """chdb's session module and pyarrow, imported only when the peer is asked for."""
    try:
        import pyarrow
        from chdb import session
    except ImportError as exc:
        raise PeerUnavailable(
            f"--peer clickhouse needs chDB (ClickHouse in-process), which is not installed "
            f"({exc}); install it with: {INSTALL_HINT}"
        ) from exc
    return session, pyarrow


# ---- time: hours, days in a zone, months --------------------------------------------

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def _day(text: str) -> date:
    if not isinstance(text, str) or not _DAY.fullmatch(text):
        raise ValueError(f"day {text!r} is not YYYY-MM-DD")
    return date.fromisoformat(text)


def _utc_hour(d: date) -> int:
    """The absolute UTC hour at which UTC day ``d`` starts."""
    return (d - date(1970, 1, 1)).days * 24


@lru_cache(maxsize=4096)
def local_day_hours(first_day: str, last_day: str, tz: str) -> tuple[int, int, tuple[str, ...]]:
    """The absolute UTC hours [h0, h1) whose local date in ``tz`` is one of the days
    [first_day, last_day], and those days as labels.

    Storage resolution is the UTC hour, so a day in a zone is an exact sum of hours only
    where the zone's offset is a whole number of hours: any other offset inside the range
    is refused (ValueError naming it), as tally refuses it. Hours are tested one by one
    with zoneinfo, so a DST change at any time of day, midnight included, is exact; the
    answer is cached, so a question asked again costs no zoneinfo.
    """
    first, last = _day(first_day), _day(last_day)
    if first > last:
        raise ValueError(f"first day {first_day} is after last day {last_day}")
    zone = ZoneInfo(tz)
    # local days lie within 26 hours of the UTC day of the same date, whatever the zone
    lo, hi = _utc_hour(first) - 26, _utc_hour(last + timedelta(days=1)) + 26
    inside: list[int] = []
    for h in range(lo, hi):
        local = datetime.fromtimestamp(h * SECONDS_PER_HOUR, zone)
        offset = local.utcoffset()
        if offset is not None and offset.total_seconds() % SECONDS_PER_HOUR:
            raise ValueError(
                f"time zone {tz} is at UTC{local.strftime('%z')} on {local.date()}: "
                "days are sums of UTC hours only in zones whose offset is a whole hour"
            )
        if first <= local.date() <= last:
            inside.append(h)
    days = tuple((first + timedelta(days=k)).isoformat() for k in range((last - first).days + 1))
    return inside[0], inside[-1] + 1, days


def utc_day_hours(first_day: str, last_day: str) -> tuple[int, int]:
    """[h0, h1) absolute UTC hours of the UTC days [first_day, last_day]."""
    first, last = _day(first_day), _day(last_day)
    if first > last:
        raise ValueError(f"first day {first_day} is after last day {last_day}")
    return _utc_hour(first), _utc_hour(last + timedelta(days=1))


def _month_hours(month: str) -> tuple[int, int]:
    if not isinstance(month, str) or not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", month):
        raise ValueError(f"month {month!r} is not YYYY-MM")
    return month_hours(month)


# ---- series: the frame's series table, resolved once per entry ------------------------


def _entry_key(entry: Any) -> Any:
    """A frame's series entry as it arrives ([tenant, metric, tags|None], tags unsorted):
    the key a producer's repeated series table is recognised by, without validating."""
    tenant, metric, tags = entry
    return (tenant, metric) if not tags else (tenant, metric, *tags.items())


class _Registry:
    """Every series seen: index -> canonical sid, its 64-bit id, tenant and metric codes.

    Entries naming one series twice (tags in another order) resolve to one index."""

    def __init__(self) -> None:
        self.by_key: dict[Any, int] = {}
        self.by_sid: dict[str, int] = {}
        self.keys: list = []  # index -> SeriesKey
        self.sids: list[str] = []  # index -> canonical series id
        self.ids = np.empty(0, np.uint64)
        self.tenant_code = np.empty(0, np.int32)
        self.metric_code = np.empty(0, np.int32)
        self.tenants: list[str] = []
        self.metrics: list[str] = []
        self._tenant_of: dict[str, int] = {}
        self._metric_of: dict[str, int] = {}

    def resolve(self, series: list[list]) -> tuple[np.ndarray, list[int]]:
        """(registry index of each entry, indexes of the series new to the registry)."""
        get = self.by_key.get
        try:  # _entry_key inlined: this line is the per-entry cost of every batch
            found = [get((t, m, *tags.items()) if tags else (t, m)) for t, m, tags in series]
        except (TypeError, ValueError, AttributeError):  # not [tenant, metric, tags]: below
            found = [None] * len(series)
        new: list[int] = []
        if None in found:
            ids, tcodes, mcodes = [], [], []
            for j, entry in enumerate(series):
                if found[j] is not None:
                    continue
                key = series_key(*entry)  # validates: InvalidSeries names the bad part
                sid = key.sid
                k = self.by_sid.get(sid)
                if k is None:
                    k = len(self.keys)
                    self.by_sid[sid] = k
                    self.keys.append(key)
                    self.sids.append(sid)
                    new.append(k)
                    digest = hashlib.blake2b(sid.encode(), digest_size=8).digest()
                    ids.append(int.from_bytes(digest, "little"))
                    tcodes.append(self._code(self._tenant_of, self.tenants, key.tenant))
                    mcodes.append(self._code(self._metric_of, self.metrics, key.metric))
                self.by_key[_entry_key(entry)] = k
                found[j] = k
            self.ids = np.concatenate([self.ids, np.array(ids, np.uint64)])
            self.tenant_code = np.concatenate([self.tenant_code, np.array(tcodes, np.int32)])
            self.metric_code = np.concatenate([self.metric_code, np.array(mcodes, np.int32)])
        return np.array(found, np.int64), new

    @staticmethod
    def _code(codes: dict[str, int], names: list[str], name: str) -> int:
        code = codes.get(name)
        if code is None:
            code = codes[name] = len(names)
            names.append(name)
        return code

    def matching(self, tenant: str, metric: str, where: dict[str, str]) -> list[int]:
        """Indexes of the series of a metric whose tags include every ``where`` pair."""
        pairs = where.items()
        return [k for k, key in enumerate(self.keys)
                if key.tenant == tenant and key.metric == metric
                and pairs <= dict(key.tags).items()]


def _columns(i: np.ndarray, ts: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, ...]:
    i = np.asarray(i)
    ts = np.asarray(ts)
    v = np.asarray(v)
    if not (i.ndim == ts.ndim == v.ndim == 1 and len(i) == len(ts) == len(v)):
        raise ValueError("i, ts and v must be 1-d arrays of one length")
    return i.astype(np.int64, copy=False), ts.astype(np.int64, copy=False), v.astype(np.int64)


# ---- the oracle -----------------------------------------------------------------------


class Oracle:
    """The exact answers to the peer's questions, from the same batches, with numpy.

    Each batch is pre-aggregated to (series, UTC hour) sums (a sort and ``reduceat``, in
    int64: exact, where ``bincount``'s float weights would round past 2**53); the sums
    are consolidated when asked. Days in a zone are the hours whose local date (zoneinfo,
    hour by hour) is that day; the answers are the peer's, tally's, and the bench's truth.
    """

    _HOUR_BITS = 26  # hours since 1970 stay below 2**26 until the year 9625

    def __init__(self) -> None:
        self._series = _Registry()
        self._keys = np.empty(0, np.int64)  # series index << 26 | hour, sorted, unique
        self._sums = np.empty(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_len = 0

    def insert(self, series: list[list], i: np.ndarray, ts: np.ndarray, v: np.ndarray) -> None:
        i, ts, v = _columns(i, ts, v)
        if len(i) and (i.min() < 0 or i.max() >= len(series)):
            raise ValueError(f"i indexes outside the {len(series)} series entries")
        if len(ts) and ts.min() < 0:
            raise ValueError("a timestamp before 1970")
        entry_index, _ = self._series.resolve(series)
        keys = (entry_index[i] << self._HOUR_BITS) | (ts // SECONDS_PER_HOUR)
        self._pending.append(_sum_by_key(keys, v))
        self._pending_len += len(self._pending[-1][0])
        if self._pending_len > max(len(self._keys), 1 << 20):
            self._consolidate()

    def _consolidate(self) -> None:
        if self._pending:
            keys = np.concatenate([self._keys, *(k for k, _ in self._pending)])
            sums = np.concatenate([self._sums, *(s for _, s in self._pending)])
            self._keys, self._sums = _sum_by_key(keys, sums)
            self._pending, self._pending_len = [], 0

    def _slots(self, members: list[int], h0: int, h1: int) -> tuple[np.ndarray, np.ndarray]:
        """(hours, sums) of the slots of ``members`` in [h0, h1), one entry per slot."""
        self._consolidate()
        series = self._keys >> self._HOUR_BITS
        hours = self._keys & ((1 << self._HOUR_BITS) - 1)
        keep = np.isin(series, np.array(members, np.int64)) & (hours >= h0) & (hours < h1)
        return hours[keep], self._sums[keep]

    def series_by_day(self, tenant: str, metric: str, tags: dict[str, str],
                      first_day: str, last_day: str, tz: str) -> list[tuple[str, int]]:
        """Per local day of ``tz`` (every day of the range, zeros included), the sum over
        the series of the metric whose tags include every pair of ``tags``."""
        h0, h1, days = local_day_hours(first_day, last_day, tz)
        hours, sums = self._slots(self._series.matching(tenant, metric, tags), h0, h1)
        zone = ZoneInfo(tz)
        totals = dict.fromkeys(days, 0)
        distinct, back = np.unique(hours, return_inverse=True)
        per_hour = np.zeros(len(distinct), np.int64)
        np.add.at(per_hour, back, sums)
        for h, x in zip(distinct.tolist(), per_hour.tolist(), strict=True):
            label = datetime.fromtimestamp(h * SECONDS_PER_HOUR, zone).date().isoformat()
            if label in totals:
                totals[label] += x
        return list(totals.items())

    def breakdown(self, tenant: str, metric: str, by: str,
                  first_day: str, last_day: str) -> dict[str | None, int]:
        """Totals per value of tag ``by`` over UTC days; series without the tag under
        None; groups totalling zero left out (tally's breakdown groups)."""
        h0, h1 = utc_day_hours(first_day, last_day)
        members = self._series.matching(tenant, metric, {})
        self._consolidate()
        series = self._keys >> self._HOUR_BITS
        hours = self._keys & ((1 << self._HOUR_BITS) - 1)
        keep = np.isin(series, np.array(members, np.int64)) & (hours >= h0) & (hours < h1)
        per_series = np.zeros(len(self._series.keys), np.int64)
        np.add.at(per_series, series[keep], self._sums[keep])
        out: dict[str | None, int] = {}
        for k in members:
            value = dict(self._series.keys[k].tags).get(by)
            out[value] = out.get(value, 0) + int(per_series[k])
        return {value: total for value, total in out.items() if total}

    def month_total(self, tenant: str, metric: str, month: str) -> int:
        h0, h1 = _month_hours(month)
        _, sums = self._slots(self._series.matching(tenant, metric, {}), h0, h1)
        return int(sums.sum())


def _sum_by_key(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys, sorted; the int64 sum of the values of each)."""
    if not len(keys):
        return keys.astype(np.int64), values.astype(np.int64)
    order = np.argsort(keys, kind="stable")
    k, x = keys[order], values[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    return k[starts], np.add.reduceat(x, starts)


# ---- the peer -------------------------------------------------------------------------

_SCHEMA = (
    """CREATE TABLE series (
        id UInt64,
        tenant LowCardinality(String),
        metric LowCardinality(String),
        sid String,
        tags Map(LowCardinality(String), String)
    ) ENGINE = MergeTree ORDER BY (tenant, metric, sid)""",
    """CREATE TABLE raw (
        tenant LowCardinality(String),
        metric LowCardinality(String),
        id UInt64,
        ts DateTime('UTC'),
        v Int64
    ) ENGINE = MergeTree ORDER BY (tenant, metric, id, ts)""",
    # hourly: see HOURLY_ENGINES
)

# The hour slots' table, two ways ClickHouse keeps running sums: the textbook
# SummingMergeTree, or an AggregatingMergeTree of SimpleAggregateFunction(sum) (the same
# sums; ClickHouse's docs offer it as the general form). Both collapse equal keys when a
# part is written and when parts merge; queries sum() and group either way.
HOURLY_ENGINES = {
    "summing": ("v Int64", "SummingMergeTree(v)"),
    "aggregating": ("v SimpleAggregateFunction(sum, Int64)", "AggregatingMergeTree"),
}


DEFAULT_HOURLY_ENGINE = "aggregating"  # measured about twice as fast to insert into


def _hourly_ddl(engine: str) -> str:
    if engine not in HOURLY_ENGINES:
        raise ValueError(f"hourly engine {engine!r}: one of {', '.join(HOURLY_ENGINES)}")
    column, table_engine = HOURLY_ENGINES[engine]
    return f"""CREATE TABLE hourly (
        tenant LowCardinality(String),
        metric LowCardinality(String),
        id UInt64,
        hour DateTime('UTC'),
        {column}
    ) ENGINE = {table_engine} ORDER BY (tenant, metric, id, hour)"""


class ClickHousePeer:
    """ClickHouse (chDB, in-process) fed the bench's batches; see the module docstring.

    ``insert_seconds`` accumulates, per table, the seconds ``insert`` spent landing the
    batches in it (the shared series resolution counted in each); ``series_seconds`` is
    that shared part alone.
    """

    def __init__(self, workdir: Path, hourly_engine: str = DEFAULT_HOURLY_ENGINE) -> None:
        session, self._pa = _chdb()
        self.hourly_engine = hourly_engine
        _hourly_ddl(hourly_engine)  # a bad name fails before anything is created
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._session = session.Session(str(self.workdir / "chdb"))
        self.reset()

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> ClickHousePeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, sql: str, params: dict[str, Any] | None = None) -> list[list[Any]]:
        out = self._session.query(sql, "JSONCompact", params=params or {})
        text = out.data() if hasattr(out, "data") else str(out)
        return json.loads(text)["data"] if text.strip() else []

    def reset(self) -> None:
        """Drop and recreate the tables: a new cell starts from nothing."""
        for table in ("series", "raw", "hourly"):
            self._query(f"DROP TABLE IF EXISTS {table} SYNC")
        for ddl in (*_SCHEMA, _hourly_ddl(self.hourly_engine)):
            self._query(ddl)
        self._registry = _Registry()
        self.insert_seconds = {"raw": 0.0, "hourly": 0.0}
        self.series_seconds = 0.0
        self.increments = 0

    def insert(self, series: list[list], i: np.ndarray, ts: np.ndarray, v: np.ndarray) -> None:
        """One batch, as tally receives it in a columnar frame: series[k] = [tenant,
        metric, {tag: value}], i (uint32) indexes series, ts int64 unix seconds, v int64.
        Inserted into BOTH tables (raw MergeTree of increments and the hour slots' table),
        each timed separately in ``insert_seconds``."""
        pa = self._pa
        started = time.perf_counter()
        entry_index, new = self._registry.resolve(series)
        if new:
            self._insert_series(new)
        reg = self._registry
        rows = entry_index[np.asarray(i, np.int64)]
        ts = np.asarray(ts)
        if len(ts) and (ts.min() < 0 or ts.max() >= 2**32):
            raise ValueError("a timestamp outside DateTime's range (1970 to 2106)")
        table = pa.table({  # noqa: F841 (read by name: chDB's Python(table) finds the local)
            "tenant": pa.DictionaryArray.from_arrays(reg.tenant_code[rows], reg.tenants),
            "metric": pa.DictionaryArray.from_arrays(reg.metric_code[rows], reg.metrics),
            "id": reg.ids[rows],
            "ts": ts.astype(np.uint32),
            "v": np.asarray(v, np.int64),
        })
        shared = time.perf_counter() - started

        started = time.perf_counter()
        self._session.query("INSERT INTO raw SELECT tenant, metric, id, ts, v FROM Python(table)")
        raw = time.perf_counter() - started

        started = time.perf_counter()
        self._session.query(
            "INSERT INTO hourly SELECT tenant, metric, id,"
            " toStartOfHour(toDateTime(ts, 'UTC')) AS hour, v FROM Python(table)"
        )
        hourly = time.perf_counter() - started

        self.series_seconds += shared
        self.insert_seconds["raw"] += shared + raw
        self.insert_seconds["hourly"] += shared + hourly
        self.increments += len(ts)

    def _insert_series(self, new: list[int]) -> None:
        pa = self._pa
        keys = [self._registry.keys[k] for k in new]
        offsets = np.zeros(len(keys) + 1, np.int32)
        offsets[1:] = np.cumsum([len(k.tags) for k in keys])
        tags = pa.MapArray.from_arrays(
            offsets,
            pa.array([tag for k in keys for tag, _ in k.tags], pa.string()),
            pa.array([value for k in keys for _, value in k.tags], pa.string()),
        )
        table = pa.table({  # noqa: F841 (read by name: chDB's Python(table) finds the local)
            "id": self._registry.ids[new],
            "tenant": [k.tenant for k in keys],
            "metric": [k.metric for k in keys],
            "sid": [self._registry.sids[k] for k in new],
            "tags": tags,
        })
        self._session.query("INSERT INTO series SELECT * FROM Python(table)")

    # ---- questions: sum() and GROUP BY over the SummingMergeTree, never its merges ----

    @staticmethod
    def _where_tags(where: dict[str, str], params: dict[str, Any]) -> str:
        clauses = []
        for n, (key, value) in enumerate(sorted(where.items())):
            params[f"k{n}"], params[f"v{n}"] = key, value
            clauses.append(f" AND mapContains(tags, {{k{n}:String}})"
                           f" AND tags[{{k{n}:String}}] = {{v{n}:String}}")
        return "".join(clauses)

    def series_by_day(self, tenant: str, metric: str, tags: dict[str, str],
                      first_day: str, last_day: str, tz: str) -> list[tuple[str, int]]:
        """Per day of ``tz`` in [first_day, last_day] (zeros included), the sum over the
        series of the metric whose tags include every pair of ``tags`` (tally's
        ``where``: with a series' whole tag set, that series)."""
        h0, h1, days = local_day_hours(first_day, last_day, tz)
        params: dict[str, Any] = {"tenant": tenant, "metric": metric, "tz": tz, "h0": h0 * 3600,
                                  "h1": h1 * 3600, "first": first_day, "last": last_day}
        rows = self._query(
            "SELECT toDate(hour, {tz:String}) AS day, sum(v) FROM hourly"
            " WHERE tenant = {tenant:String} AND metric = {metric:String}"
            " AND id IN (SELECT id FROM series"
            "   WHERE tenant = {tenant:String} AND metric = {metric:String}"
            + self._where_tags(tags, params) + ")"
            " AND hour >= toDateTime({h0:UInt32}) AND hour < toDateTime({h1:UInt32})"
            " AND day BETWEEN {first:Date} AND {last:Date}"
            " GROUP BY day ORDER BY day",
            params,
        )
        totals = dict.fromkeys(days, 0)
        for day, total in rows:
            totals[day] += int(total)
        return list(totals.items())

    def breakdown(self, tenant: str, metric: str, by: str,
                  first_day: str, last_day: str) -> dict[str | None, int]:
        """Totals per value of tag ``by`` over the UTC days [first_day, last_day]; series
        without the tag under None; groups totalling zero left out."""
        h0, h1 = utc_day_hours(first_day, last_day)
        # per series first (one scan of the slots, in key order), then one row per series
        # joined to its tag: twice as fast here as joining every slot
        rows = self._query(
            "SELECT s.has, s.value, sum(h.total) AS total FROM ("
            "   SELECT id, sum(v) AS total FROM hourly"
            "   WHERE tenant = {tenant:String} AND metric = {metric:String}"
            "   AND hour >= toDateTime({h0:UInt32}) AND hour < toDateTime({h1:UInt32})"
            "   GROUP BY id) AS h"
            " INNER JOIN (SELECT id, mapContains(tags, {by:String}) AS has,"
            "   tags[{by:String}] AS value FROM series"
            "   WHERE tenant = {tenant:String} AND metric = {metric:String}) AS s"
            " ON h.id = s.id"
            " GROUP BY s.has, s.value HAVING total != 0",
            {"tenant": tenant, "metric": metric, "by": by, "h0": h0 * 3600, "h1": h1 * 3600},
        )
        return {(value if has else None): int(total) for has, value, total in rows}

    def month_total(self, tenant: str, metric: str, month: str) -> int:
        """The metric's total over the UTC month ``month`` ("YYYY-MM")."""
        h0, h1 = _month_hours(month)
        rows = self._query(
            "SELECT sum(v) FROM hourly WHERE tenant = {tenant:String} AND metric = {metric:String}"
            " AND hour >= toDateTime({h0:UInt32}) AND hour < toDateTime({h1:UInt32})",
            {"tenant": tenant, "metric": metric, "h0": h0 * 3600, "h1": h1 * 3600},
        )
        return int(rows[0][0]) if rows else 0


# ---- latency --------------------------------------------------------------------------


def latency(fn: Any, n: int, warmup: int = 5) -> tuple[float, float]:
    """(p50, p99) in milliseconds of ``n`` calls of ``fn()``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    took = np.empty(n)
    for k in range(n):
        started = time.perf_counter()
        fn()
        took[k] = time.perf_counter() - started
    ms = took * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


__all__ = ["INSTALL_HINT", "ClickHousePeer", "Oracle", "PeerUnavailable", "latency",
           "local_day_hours", "utc_day_hours"]
