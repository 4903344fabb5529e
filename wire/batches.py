"""Increment batches: validation, then pre-aggregation by (series, UTC hour).

Both wire forms of ``inc`` end here. Row batches (``[[tenant, metric, tags|nil,
ts, value], ...]``, what any msgpack client can send) need one Python pass per
row; columnar batches (a series table plus little-endian ``i``/``ts``/``v``
arrays) are validated and aggregated with numpy and no per-increment Python.

Pre-aggregating before anything crosses a process boundary is what makes the
shard actors cheap: every Ray call costs CPU on both sides, so a shard should
receive one sum per (series, hour) rather than one entry per increment.

A batch is all or nothing (design guarantee 6): the first bad increment raises
``BadRow`` with its index, a broken structure raises ``BadBatch``, and nothing
is returned. "First" is in input order over every kind of problem, including
an aggregate whose running sum leaves int64: the row that takes it out is the
bad row, exactly, in both forms.

Both forms of the same increments give equal ``Batch`` objects: ``sids`` are
sorted, aggregates are ordered by (series index, hour), so the result does not
depend on the order of the input or of the columnar series table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tally.wire.registry import SeriesRegistry, Sids
from tally.wire.row_blocks import SERIES_PER_CONNECTION, RowBlock
from tally.wire.series import InvalidSeries, series_key
from tally.wire.timeslots import SECONDS_PER_HOUR, hour_start
from tally.wire.vocabulary import (  # INT64_*: re-exported, the server's modules import them here
    INT64_MAX,
    INT64_MIN,
    kind_of,
    ts_limit,
    ts_problem,
    value_problem,
)

# The exact overflow check keeps the low 32 bits of each value and cumulates
# them in int64, which is exact below 2**31 increments (16 GiB of columns).
MAX_INCREMENTS = 2**31 - 1

ROW_SHAPE = "a row is [tenant, metric, tags|nil, ts, value]"
SERIES_SHAPE = "a series is [tenant, metric, tags|nil]"


class BadRow(ValueError):
    """An increment breaks the data model; ``row`` is the index of the first bad one.

    Answered as ``bad_row`` with ``row``; the whole batch is refused.
    """

    code = "bad_row"

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row
        self.message = message


class BadBatch(ValueError):
    """The batch's structure is broken (not one increment can be blamed); ``bad_request``."""

    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# the int columns of a batch on a shard's socket, each as little-endian int32 when every
# entry fits (nearly always: hours since 1970, sums of a few increments, rows and counts of
# fewer than 2**31 increments), else int64; the length of its bytes says which
_WIRE_INTS = ("hours", "values", "first_row", "counts")
_I32 = np.iinfo(np.int32)


def _int_bytes(a: np.ndarray) -> bytes:
    """``a`` as little-endian int32 when every entry fits, else int64."""
    if not len(a) or (int(a.min()) >= _I32.min and int(a.max()) <= _I32.max):
        return a.astype("<i4").tobytes()
    return a.astype("<i8").tobytes()


def _int_column(c: Any, n: int) -> np.ndarray | None:
    """An int column ``_int_bytes`` made for ``n`` aggregates, as int64; None if not one."""
    if type(c) is not bytes:
        return None
    if len(c) == 4 * n:
        return np.frombuffer(c, "<i4").astype(np.int64)
    if len(c) == 8 * n:
        return np.frombuffer(c, "<i8").astype(np.int64)
    return None


@dataclass(slots=True, eq=False)
class Batch:
    """Sums per (series, UTC hour), pairs unique, ordered by (series, hour)."""

    # distinct series ids referenced by the aggregates, sorted; a batch over a connection's
    # series table holds them as ``Sids`` (wire/registry.py), owner shard by owner shard
    sids: list[str] | np.ndarray | Sids
    series: np.ndarray  # uint32 index into sids, one per aggregate
    hours: np.ndarray  # int64 absolute UTC hour (ts // 3600)
    values: np.ndarray  # int64 sum of the increments of that (series, hour)
    first_row: np.ndarray  # int64 index of the first input increment behind the aggregate
    counts: np.ndarray  # int64 number of input increments behind the aggregate
    increments: int  # number of input increments behind all aggregates (= counts.sum())
    # the gateway numbers of sids (wire/registry.py), once a gateway has them; a batch
    # built from a connection's series table has them from the start, and its sids are
    # grouped by owner shard rather than sorted (``_aggregate_numbered``)
    gn: np.ndarray | None = None
    gn_epoch: int = 0  # the registry's epoch those numbers are of

    @classmethod
    def empty(cls) -> Batch:
        i64 = np.empty(0, np.int64)
        return cls([], np.empty(0, np.uint32), i64, i64.copy(), i64.copy(), i64.copy(), 0)

    def __len__(self) -> int:
        return len(self.values)

    def select(self, mask: np.ndarray) -> Batch:
        """The aggregates where ``mask`` is True, with ``sids`` re-compacted.

        Used to split a batch per shard; ``counts`` let each part know how many
        input increments it carries, and ``first_row`` still points into the
        original batch, so a shard's refusal can name the client's row.
        """
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (len(self),):
            raise ValueError(f"mask must be a bool array of shape ({len(self)},)")
        series = self.series[mask]
        used, compact = np.unique(series, return_inverse=True)
        counts = self.counts[mask]
        return Batch(
            [self.sids[k] for k in used.tolist()],
            compact.astype(np.uint32).reshape(-1),
            self.hours[mask],
            self.values[mask],
            self.first_row[mask],
            counts,
            int(counts.sum()),
            None if self.gn is None else self.gn[used],
            self.gn_epoch,
        )

    def partition(self, owner: np.ndarray) -> dict[int, Batch]:
        """The batch cut by ``owner`` (an int per sid): what ``select`` gives for each
        owner's aggregates, with one sort for all parts rather than a pass per part."""
        used = np.zeros(len(self.sids), np.bool_)
        used[self.series] = True
        every = bool(used.all())  # (``select`` drops a sid no aggregate references)
        if every and len(owner) > 1 and bool((owner[1:] >= owner[:-1]).all()):
            return self._slices(owner)
        if len(owner) and int(owner.min()) >= 0 and int(owner.max()) < 1 << 16:
            owner = owner.astype(np.uint16)  # a stable sort of 16-bit keys is a radix sort
        per = owner[self.series]
        order = np.argsort(per, kind="stable")  # stable: (series, hour) order kept in a part
        per_sorted = per[order]
        cuts = np.flatnonzero(per_sorted[1:] != per_sorted[:-1]) + 1
        starts = np.concatenate(([0], cuts)).tolist()
        ends = [*cuts.tolist(), len(per)]
        if not every:  # a sid no aggregate references: ``select`` drops it
            return {int(per_sorted[a]): self.select(per == per_sorted[a]) for a in starts}
        # each sid's index among its owner's sids (kept in sorted order)
        by_owner = np.argsort(owner, kind="stable")
        grouped = owner[by_owner]
        local = np.empty(len(owner), np.int64)
        local[by_owner] = np.arange(len(owner)) - np.searchsorted(grouped, grouped)
        # (a ``Sids`` stays one: a connection table's batch keeps its sids so)
        as_array = not isinstance(self.sids, list)
        sids = (self.sids if as_array else np.array(self.sids, dtype=object))[by_owner]
        gn = None if self.gn is None else self.gn[by_owner]
        sid_starts = np.searchsorted(grouped, per_sorted[starts]).tolist()
        sid_ends = np.searchsorted(grouped, per_sorted[starts], side="right").tolist()
        series = local[self.series][order].astype(np.uint32)
        hours, values = self.hours[order], self.values[order]
        first_row, counts = self.first_row[order], self.counts[order]
        parts = {}
        for a, z, sa, sz in zip(starts, ends, sid_starts, sid_ends, strict=True):
            part_counts = counts[a:z]
            parts[int(per_sorted[a])] = Batch(
                sids[sa:sz] if as_array else sids[sa:sz].tolist(), series[a:z], hours[a:z],
                values[a:z], first_row[a:z],
                part_counts, int(part_counts.sum()), None if gn is None else gn[sa:sz],
                self.gn_epoch,
            )
        return parts

    def _slices(self, owner: np.ndarray) -> dict[int, Batch]:
        """``partition`` of a batch whose sids come owner by owner (``_aggregate_numbered``
        numbers them so): each part is a slice, with no sort and no copy of a column."""
        sid_starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        sid_ends = np.r_[sid_starts[1:], len(owner)]
        # (aggregates are in series order, so each owner's are a slice too)
        starts = np.searchsorted(self.series, sid_starts).tolist()
        ends = np.searchsorted(self.series, sid_ends).tolist()
        parts = {}
        for sa, sz, a, z in zip(sid_starts.tolist(), sid_ends.tolist(), starts, ends,
                                strict=True):
            counts = self.counts[a:z]
            parts[int(owner[sa])] = Batch(
                self.sids[sa:sz], (self.series[a:z] - sa).astype(np.uint32), self.hours[a:z],
                self.values[a:z], self.first_row[a:z], counts, int(counts.sum()),
                None if self.gn is None else self.gn[sa:sz], self.gn_epoch)
        return parts

    def to_wire(self, with_sids: bool = True) -> dict[str, Any]:
        """The batch as msgpack can carry it (a shard's socket, actors/channel.py);
        ``with_sids=False`` leaves the ids out for a caller that names them otherwise."""
        wire = {"series": self.series.astype("<u4").tobytes(),
                **{k: _int_bytes(getattr(self, k)) for k in _WIRE_INTS},
                "n": self.increments}
        if with_sids:
            wire["sids"] = self.sids if isinstance(self.sids, list) else self.sids.tolist()
        return wire

    @classmethod
    def from_wire(cls, msg: Any, gn: np.ndarray | None = None) -> Batch | None:
        """The batch ``to_wire`` made, or None if ``msg`` is not one. ``sids`` may be
        ``Sids`` (actors/channel_table.py), with their gateway numbers ``gn``."""
        if type(msg) is not dict or type(msg.get("n")) is not int:
            return None
        sids, series = msg.get("sids"), msg.get("series")
        if not isinstance(sids, Sids | np.ndarray) and (
                type(sids) is not list or (sids and set(map(type, sids)) != {str})):
            return None
        if type(series) is not bytes or len(series) % 4:
            return None
        n = len(series) // 4
        columns = [_int_column(msg.get(k), n) for k in _WIRE_INTS]
        if any(c is None for c in columns):
            return None
        index = np.frombuffer(series, "<u4").astype(np.uint32)
        if n and int(index.max()) >= len(sids):
            return None
        hours, values, first_row, counts = columns
        return cls(sids, index, hours, values, first_row, counts, msg["n"], gn)  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Batch):
            return NotImplemented
        return (
            list(self.sids) == list(other.sids)
            and self.increments == other.increments
            and all(
                a.dtype == b.dtype and np.array_equal(a, b)
                for a, b in (
                    (self.series, other.series),
                    (self.hours, other.hours),
                    (self.values, other.values),
                    (self.first_row, other.first_row),
                    (self.counts, other.counts),
                )
            )
        )


# -- messages (slow path only: the hot loops never format a string) -------------

def _bad_row(row: int, problem: str) -> BadRow:
    return BadRow(row, f"row {row}: {problem}")


def _diagnose_row(n: int, row: Any, limit: int) -> BadRow:
    """Why the hot loop stopped at row ``n``: the same checks, in the same order, with words."""
    if type(row) is not list and type(row) is not tuple:
        return _bad_row(n, f"{ROW_SHAPE}, not a {kind_of(row)}")
    if len(row) != 5:
        return _bad_row(n, f"has {len(row)} fields; {ROW_SHAPE}")
    tenant, metric, tags, ts, value = row
    try:
        series_key(tenant, metric, tags)
    except InvalidSeries as exc:
        return _bad_row(n, str(exc))
    problem = ts_problem(ts, limit) or value_problem(value)
    if problem is None:  # pragma: no cover - the loop and this function disagree
        problem = "invalid increment"
    return _bad_row(n, problem)


# -- aggregation ------------------------------------------------------------------


def _first_overflow(sidx: np.ndarray, hours: np.ndarray, v: np.ndarray) -> int | None:
    """Index of the first increment whose aggregate's running sum leaves int64, or None.

    Fast path: if max|v| * n fits in int64 no running sum can leave it, which is
    every realistic batch. Otherwise, exactly and without a Python loop: each
    value is split as ``hi * 2**32 + lo`` (lo in [0, 2**32)); per-aggregate
    running sums of hi and lo both fit in int64, and the running sum
    ``H * 2**32 + r`` (H = sum hi + carry of sum lo, 0 <= r < 2**32) is inside
    int64 exactly when -2**31 <= H < 2**31.
    """
    n = len(v)
    if n == 0:
        return None
    if max(int(v.max()), -int(v.min())) * n <= INT64_MAX:
        return None
    order = np.lexsort((hours, sidx))  # stable: one aggregate's increments stay in input order
    ss, hs, vs = sidx[order], hours[order], v[order]
    new = np.empty(n, np.bool_)
    new[0] = True
    np.not_equal(ss[1:], ss[:-1], out=new[1:])
    new[1:] |= hs[1:] != hs[:-1]
    lo = vs & 0xFFFFFFFF
    hi = vs >> 32
    clo = np.cumsum(lo)
    chi = np.cumsum(hi)
    starts = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    run_lo = clo - (clo - lo)[starts][group]
    run_hi = chi - (chi - hi)[starts][group]
    high = run_hi + (run_lo >> 32)
    out = (high < -(2**31)) | (high >= 2**31)
    if not out.any():
        return None
    return int(order[out].min())


def _check_overflow(sids: list[str], sidx: np.ndarray, hours: np.ndarray, v: np.ndarray) -> None:
    bad = _first_overflow(sidx, hours, v)
    if bad is not None:
        hour = int(hours[bad])
        raise _bad_row(
            bad,
            f"value {int(v[bad])} takes the total of series {sids[int(sidx[bad])]!r} in the hour "
            f"from {hour_start(hour).isoformat()} outside int64",
        )


def _aggregate(sids: list[str], sidx: np.ndarray, ts: np.ndarray, v: np.ndarray) -> Batch:
    """Sum valid increments per (series, hour); ``sidx`` indexes the sorted ``sids``.

    Two exact int64 strategies with the same output order: a dense table
    (``bincount``/``add.at``/``minimum.at``, linear in the increments, no sort)
    when series x hour-span is small, as it is for live traffic; a sort
    otherwise (backfills spread over months).
    """
    n = len(v)
    if n == 0:
        return Batch.empty()
    hours = ts // SECONDS_PER_HOUR
    _check_overflow(sids, sidx, hours, v)
    hmin = int(hours.min())
    span = int(hours.max()) - hmin + 1
    size = len(sids) * span
    if size <= max(2 * n, 1 << 16):
        key = sidx * span + (hours - hmin)
        counts = np.bincount(key, minlength=size)
        nz = np.flatnonzero(counts != 0)  # (cheaper than on the int64 counts themselves)
        sums = np.zeros(size, np.int64)
        np.add.at(sums, key, v)
        first = np.full(size, n, np.int64)
        np.minimum.at(first, key, np.arange(n, dtype=np.int64))
        return Batch(
            sids,
            (nz // span).astype(np.uint32),
            (nz % span + hmin).astype(np.int64),
            sums[nz],
            first[nz],
            counts[nz].astype(np.int64),
            n,
        )
    if size <= INT64_MAX:
        key = sidx * span + (hours - hmin)
        if size <= 1 << 32:
            key = key.astype(np.uint32)  # (a sort of 4-byte keys is the quicker)
        order = np.argsort(key)
        sk = key[order]
        brk = sk[1:] != sk[:-1]
    else:  # absurd hour spans (a far-future ``now``): compare both columns
        order = np.lexsort((hours, sidx))
        ss, hs = sidx[order], hours[order]
        brk = (ss[1:] != ss[:-1]) | (hs[1:] != hs[:-1])
    starts = np.flatnonzero(np.r_[True, brk])
    if len(starts) == n:  # every increment a slot of its own (wide batches): nothing to sum
        return Batch(sids, sidx[order].astype(np.uint32), hours[order], v[order],
                     order.astype(np.int64), np.ones(n, np.int64), n)
    rep = order[starts]
    counts = np.diff(np.append(starts, n)).astype(np.int64)
    if n - len(starts) <= n // 8:
        # Few slots repeat (a wide frame, nearly always): each aggregate is its first
        # increment, and only the repeats are added in, rather than reducing every run.
        # (The sort is not stable: an aggregate's first row is its least index.)
        vs = v[order]
        repeat = np.flatnonzero(~brk) + 1
        of = np.searchsorted(starts, repeat, side="right") - 1
        sums = vs[starts]
        np.add.at(sums, of, vs[repeat])
        first = rep.astype(np.int64)
        np.minimum.at(first, of, order[repeat])
        return Batch(sids, sidx[rep].astype(np.uint32), hours[rep], sums, first, counts, n)
    return Batch(
        sids,
        sidx[rep].astype(np.uint32),
        hours[rep],
        np.add.reduceat(v[order], starts),
        np.minimum.reduceat(order, starts).astype(np.int64),
        counts,
        n,
    )


def _by_sid(local_sids: list[str], local: list[int]) -> tuple[list[str], np.ndarray]:
    """Renumber first-seen series indexes into indexes of the sorted ``sids``."""
    k = len(local_sids)
    order = sorted(range(k), key=local_sids.__getitem__)
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(k, dtype=np.int64)
    return [local_sids[j] for j in order], rank[np.fromiter(local, np.int64, len(local))]


# -- row batches --------------------------------------------------------------------


class KnownSeries:
    """Series already validated on one server connection, keyed by their raw parts as
    they arrive (``(tenant, metric, *tag items)``, unsorted: no sort per row), so a
    producer that sends the same series frame after frame pays for validating each
    once. (The client's ``tally.client.validation.SeriesCache`` keys by sorted tags and keeps
    wire entries with their packed size; this one only needs the series id.) Only valid series
    enter (every part a str), so a key holding a non-str part never matches one.
    Bounded: it starts over when full."""

    __slots__ = ("sids", "limit")

    def __init__(self, limit: int = SERIES_PER_CONNECTION) -> None:
        self.sids: dict[Any, str] = {}
        self.limit = limit

    def remember(self, key: Any, sid: str) -> None:
        if len(self.sids) >= self.limit:
            self.sids.clear()
        self.sids[key] = sid


def rows_batch(rows: Any, now: float, known: KnownSeries | None = None,
               registry: SeriesRegistry | None = None) -> Batch:
    """Validate and aggregate ``[[tenant, metric, tags|nil, ts, value], ...]``.

    ``now`` is the server clock (Unix seconds). The loop body is kept to type
    checks and appends: a series is validated once per batch (once per
    connection with ``known``) and afterwards costs one dict lookup keyed by
    its raw parts, and error messages are only built once the loop has
    stopped at a bad row. A ``RowBlock`` (rows read by the frame decoder without a
    Python object per row) is aggregated with numpy, over ``registry``'s gateway
    numbers when there is one; one holding any bad row is decoded and goes through
    the loop, which names it.
    """
    if type(rows) is RowBlock:
        batch = _block_batch(rows, now, registry)
        if batch is not None:
            return batch
        rows = rows.rows()
    if type(rows) is not list:
        raise BadBatch(f"rows must be a list, not a {kind_of(rows)}")
    if len(rows) > MAX_INCREMENTS:
        raise BadBatch(f"{len(rows)} rows; at most {MAX_INCREMENTS} per batch")
    limit = ts_limit(now)
    lo, hi = INT64_MIN, INT64_MAX
    cache: dict[Any, int] = {}  # raw (tenant, metric, tag items) -> local series index
    local_of: dict[str, int] = {}  # sid -> local series index (tag order may differ)
    local_sids: list[str] = []
    sidx: list[int] = []
    tss: list[int] = []
    vals: list[int] = []
    add_s, add_t, add_v = sidx.append, tss.append, vals.append
    seen = known.sids if known is not None else {}
    for row in rows:
        kind = type(row)
        if kind is not list and kind is not tuple:
            break
        try:
            tenant, metric, tags, ts, value = row
        except ValueError:  # not 5 fields
            break
        if tags is None:
            key: Any = (tenant, metric)
        elif type(tags) is dict:
            key = (tenant, metric, *tags.items())
        else:
            break
        try:
            si = cache[key]
        except KeyError:
            sid = seen.get(key)
            if sid is None:
                try:
                    sid = series_key(tenant, metric, tags).sid
                except InvalidSeries:
                    break
                if known is not None:
                    known.remember(key, sid)
            si = local_of.get(sid)
            if si is None:
                si = local_of[sid] = len(local_sids)
                local_sids.append(sid)
            cache[key] = si
        except TypeError:  # unhashable part (a list or map): not a valid series
            break
        if type(ts) is not int or not 0 <= ts <= limit:
            break
        if type(value) is not int or not lo <= value <= hi:
            break
        add_s(si)
        add_t(ts)
        add_v(value)
    n = len(sidx)
    sids, sarr = _by_sid(local_sids, sidx)
    tarr = np.fromiter(tss, np.int64, n)
    varr = np.fromiter(vals, np.int64, n)
    if n < len(rows):
        # An overflow in an earlier row is the first bad row: check the prefix.
        _check_overflow(sids, sarr, tarr // SECONDS_PER_HOUR, varr)
        raise _diagnose_row(n, rows[n], limit)
    return _aggregate(sids, sarr, tarr, varr)


def _block_batch(block: RowBlock, now: float, registry: SeriesRegistry | None
                 ) -> Batch | None:
    """The batch of a block whose rows are all good, or None (the loop finds the bad one).
    Its series were validated as it was read. With ``registry``, the batch names its
    series by gateway number, in the connection's order (as ``table_batch`` does)."""
    ts = block.ts
    if len(block) > MAX_INCREMENTS or int(ts.min()) < 0 or int(ts.max()) > ts_limit(now):
        return None
    if registry is None:
        sids, index = block.by_sid()
        return _aggregate(sids, index, ts, block.v)
    gn = block.table.gateway_numbers(registry)[block.numbers]
    index = block.group
    if block.aliased:  # two byte strings of one series: one entry
        gn, back = np.unique(gn, return_inverse=True)
        index = back.reshape(-1)[index]
    batch = _aggregate_numbered(gn, index, ts, block.v, registry)
    batch.gn_epoch = registry.epoch
    return batch


def _aggregate_numbered(gn: np.ndarray, sidx: np.ndarray, ts: np.ndarray, v: np.ndarray,
                        registry: SeriesRegistry) -> Batch:
    """``_aggregate`` over series named by distinct gateway numbers ``gn`` (``sidx``
    indexes them): the batch's sids are theirs (``Sids``: no list is built), ``gn`` set.

    The sids are numbered owner shard by owner shard first (one radix sort of the
    distinct series' 16-bit owners), so the aggregates, in series order, come
    grouped by owner too: ``partition`` then cuts the batch into slices rather
    than sorting its aggregates again and gathering every column.
    """
    if len(gn) > 1 and registry.shards > 1 and registry.shards <= 1 << 16:
        owner = registry.owner[gn]
        if bool((owner[1:] < owner[:-1]).any()):
            order = np.argsort(owner.astype(np.uint16), kind="stable")
            rank = np.empty(len(gn), np.int64)
            rank[order] = np.arange(len(gn))
            gn, sidx = gn[order], rank[sidx]
    batch = _aggregate(registry.sids_of(gn), sidx, ts, v)
    batch.gn = gn if len(batch) else None
    return batch
