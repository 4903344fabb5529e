"""Columnar batches: a series table (the frame's own, or a connection's) and three
little-endian arrays, validated and aggregated with numpy and no Python per increment.

The row form and what both forms aggregate into (``Batch``) are in wire/batches.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tally.wire.batches import (
    MAX_INCREMENTS,
    SERIES_SHAPE,
    BadBatch,
    Batch,
    KnownSeries,
    _aggregate,
    _aggregate_numbered,
    _bad_row,
    _check_overflow,
)
from tally.wire.registry import SeriesRegistry
from tally.wire.series import InvalidSeries, series_key
from tally.wire.timeslots import SECONDS_PER_HOUR
from tally.wire.vocabulary import kind_of, short_repr, ts_limit, ts_problem

# -- columnar batches -----------------------------------------------------------------

_COLUMNS = (
    ("i", 4, "little-endian uint32"),
    ("ts", 8, "little-endian int64"),
    ("v", 8, "little-endian int64"),
)


def _column_bytes(name: str, buf: Any, width: int, kind: str) -> int:
    if not isinstance(buf, bytes | bytearray | memoryview):
        raise BadBatch(f"{name} must be binary ({kind} per increment), not a {kind_of(buf)}")
    nbytes = memoryview(buf).nbytes
    if nbytes % width:
        raise BadBatch(
            f"{name} is {nbytes} bytes, not a multiple of {width} ({kind} per increment)"
        )
    return nbytes // width


def _arrays(i: Any, ts: Any, v: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three columns as arrays, once their sizes agree."""
    n_i, n_t, n_v = (
        _column_bytes(name, buf, width, kind)
        for (name, width, kind), buf in zip(_COLUMNS, (i, ts, v), strict=True)
    )
    if not n_i == n_t == n_v:
        raise BadBatch(
            f"i has {n_i} entries, ts {n_t}, v {n_v}; the columns hold one entry per increment"
        )
    if n_i > MAX_INCREMENTS:
        raise BadBatch(f"{n_i} increments; at most {MAX_INCREMENTS} per batch")
    ia = np.frombuffer(i, "<u4")
    ta = np.frombuffer(ts, "<i8").astype(np.int64, copy=False)
    va = np.frombuffer(v, "<i8").astype(np.int64, copy=False)
    return ia, ta, va


def _first(mask: np.ndarray) -> int | None:
    hit = int(np.argmax(mask)) if len(mask) else 0
    return hit if len(mask) and mask[hit] else None


def columnar_batch(
    series: Any, i: Any, ts: Any, v: Any, now: float, known: KnownSeries | None = None
) -> Batch:
    """Validate and aggregate the columnar form, with numpy only.

    ``series`` is ``[[tenant, metric, tags|nil], ...]``; ``i`` (uint32), ``ts``
    and ``v`` (int64) are little-endian arrays with one entry per increment.
    An invalid series entry blames the first increment that references it
    (``BadRow``); one that nothing references still refuses the batch
    (``BadBatch``), but only when no increment is bad, since a row index is
    the more useful answer. Entries naming the same series (tags in another
    order) are merged. With ``known`` (the connection's), an entry seen before on
    the connection costs one dict lookup instead of a validation: a producer
    sends the same series table frame after frame.
    """
    if type(series) is not list:
        raise BadBatch(f"series must be a list, not a {kind_of(series)}")
    ia, ta, va = _arrays(i, ts, v)

    # The series table: one Python step per entry, none per increment.
    count = len(series)
    entry_sids: list[str | None] = []
    problems: dict[int, str] = {}
    seen = known.sids if known is not None else {}
    for j, entry in enumerate(series):
        sid = None
        if (type(entry) is list or type(entry) is tuple) and len(entry) == 3:
            tenant, metric, tags = entry
            # keyed as rows_batch keys them: raw parts, tags unsorted
            key: Any = (tenant, metric) if tags is None else (
                (tenant, metric, *tags.items()) if type(tags) is dict else None)
            try:
                sid = seen.get(key)
            except TypeError:  # an unhashable part: not a valid series, validated below
                key = None
            if sid is None:
                try:
                    sid = series_key(tenant, metric, tags).sid
                except InvalidSeries as exc:
                    problems[j] = str(exc)
                else:
                    if known is not None and key is not None:
                        known.remember(key, sid)
        else:
            problems[j] = f"{SERIES_SHAPE}, not {short_repr(entry)}"
        entry_sids.append(sid)
    distinct = sorted({s for s in entry_sids if s is not None})
    pos = {sid: k for k, sid in enumerate(distinct)}
    lut = np.empty(count + 1, np.int64)  # entry -> sorted sid index; -1 invalid, -2 out of range
    lut[:count] = [-1 if s is None else pos[s] for s in entry_sids]
    lut[count] = -2
    mapped = lut[np.minimum(ia, count)]

    limit = ts_limit(now)
    firsts = [x for x in (_first(mapped < 0), _first((ta < 0) | (ta > limit))) if x is not None]
    if firsts:
        bad = min(firsts)
        # An overflow in an earlier increment is the first bad row.
        _check_overflow(distinct, mapped[:bad], ta[:bad] // SECONDS_PER_HOUR, va[:bad])
        entry = int(ia[bad])
        if mapped[bad] == -2:
            raise _bad_row(bad, f"i {entry} is out of range: series has {count} entries")
        if mapped[bad] == -1:
            raise _bad_row(bad, f"series[{entry}] is invalid: {problems[entry]}")
        raise _bad_row(bad, ts_problem(int(ta[bad]), limit) or "invalid ts")
    if problems:
        # a bad row, if any, is the more useful answer (an overflowing running sum)
        _check_overflow(distinct, mapped, ta // SECONDS_PER_HOUR, va)
        j = min(problems)
        raise BadBatch(f"series[{j}] is invalid: {problems[j]} (no increment references it)")

    used = np.bincount(mapped, minlength=len(distinct)) > 0
    if not used.all():
        renumber = np.cumsum(used) - 1
        mapped = renumber[mapped]
        distinct = [s for s, u in zip(distinct, used.tolist(), strict=True) if u]
    return _aggregate(distinct, mapped, ta, va)


def table_batch(
    entries: np.ndarray, distinct: bool, registry: SeriesRegistry,
    i: Any, ts: Any, v: Any, now: float,
) -> Batch:
    """Validate and aggregate a columnar batch whose ``i`` indexes a connection's table.

    ``entries`` are the gateway numbers (wire/registry.py) of the table's
    entries in ``registry``, ``distinct`` whether no two name the same series.
    Every entry was validated when it was defined, so a frame costs numpy alone:
    no step per series or increment. The batch's sids come owner shard by owner
    shard (``_aggregate_numbered``), with ``gn`` set.
    """
    ia, ta, va = _arrays(i, ts, v)
    count = len(entries)
    limit = ts_limit(now)
    firsts = [x for x in (_first(ia >= count), _first((ta < 0) | (ta > limit))) if x is not None]
    if firsts:
        bad = min(firsts)
        ahead = entries[ia[:bad]]
        uniq, local = np.unique(ahead, return_inverse=True)
        _check_overflow(registry.sids_of(uniq), local.reshape(-1), ta[:bad] // SECONDS_PER_HOUR,
                        va[:bad])
        if int(ia[bad]) >= count:
            raise _bad_row(bad, f"i {int(ia[bad])} is out of range: the connection's series "
                                f"table has {count} entries")
        raise _bad_row(bad, ts_problem(int(ta[bad]), limit) or "invalid ts")
    if distinct:
        # (a scatter of True and a gather by index: quicker than a count and a mask)
        used = np.zeros(count, np.bool_)
        used[ia] = True
        gn = entries[np.flatnonzero(used)]
        sidx = (np.cumsum(used) - 1)[ia]
    else:
        gn, sidx = np.unique(entries[ia], return_inverse=True)
        sidx = sidx.reshape(-1)
    return _aggregate_numbered(gn, sidx, ta, va, registry)
