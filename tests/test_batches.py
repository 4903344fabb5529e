"""Increment batches: validation, exact pre-aggregation, and the two wire forms agreeing.

A Python oracle that applies increments one by one (running sums, stop at the
first bad increment) is the specification; both forms must match it exactly,
including which row is blamed.
"""

from __future__ import annotations

import pickle
import random
import time
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.actors.router import Router
from tally.wire.batches import (
    INT64_MAX,
    INT64_MIN,
    BadBatch,
    BadRow,
    Batch,
    KnownSeries,
    rows_batch,
)
from tally.wire.columnar import columnar_batch
from tally.wire.series import series_id, shard_of
from tally.wire.timeslots import FUTURE_TOLERANCE

NOW = 1_764_000_000.5  # 2025-11-24, a fractional clock on purpose
T = 1_764_000_000


def columns(
    series: list, idx: list[int], ts: list[int], v: list[int]
) -> tuple[list, bytes, bytes, bytes]:
    return (
        series,
        np.asarray(idx, "<u4").tobytes(),
        np.asarray(ts, "<i8").tobytes(),
        np.asarray(v, "<i8").tobytes(),
    )


def bad_row(rows: Any, now: float = NOW) -> BadRow:
    with pytest.raises(BadRow) as info:
        rows_batch(rows, now)
    assert info.value.code == "bad_row"
    assert info.value.message.startswith(f"row {info.value.row}: ")
    return info.value


def bad_col_row(series: list, idx: list[int], ts: list[int], v: list[int]) -> BadRow:
    with pytest.raises(BadRow) as info:
        columnar_batch(*columns(series, idx, ts, v), NOW)
    assert info.value.code == "bad_row"
    assert info.value.message.startswith(f"row {info.value.row}: ")
    return info.value


def ok(k: int = 1) -> list:
    return [["acme", "messages.received", {"channel": "twitter"}, T - 60, k]]


# -- row batches: each kind of bad row -------------------------------------------------


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ("acme", "a row is [tenant, metric, tags|nil, ts, value], not a string"),
        ({"tenant": "acme"}, "not a map"),
        (None, "not a nil"),
        (["acme", "m", None, T], "has 4 fields"),
        (["acme", "m", None, T, 1, 2], "has 6 fields"),
        (["Acme", "m", None, T, 1], "tenant 'Acme' is invalid"),
        ([["acme"], "m", None, T, 1], "tenant ['acme'] is invalid"),
        (["acme", "", None, T, 1], "metric '' is invalid"),
        (["acme", "m/x", None, T, 1], "metric 'm/x' is invalid"),
        (["acme", "m", ["a", "b"], T, 1], "tags must be a map or nil"),
        (["acme", "m", {"A": "x"}, T, 1], "tag key 'A' is invalid"),
        (["acme", "m", {"a": 1}, T, 1], "tag 'a' has a int value"),
        (["acme", "m", {"a": ["x"]}, T, 1], "tag 'a' has a list value"),
        (["acme", "m", {"a": "x" * 201}, T, 1], "201 characters"),
        (["acme", "m", {f"k{n}": "x" for n in range(17)}, T, 1], "17 tags"),
        (["acme", "m", None, float(T), 1], "is a float; timestamps are integer Unix seconds"),
        (["acme", "m", None, True, 1], "ts True is a bool"),
        (["acme", "m", None, str(T), 1], "is a string"),
        (["acme", "m", None, None, 1], "ts None is a nil"),
        (["acme", "m", None, -1, 1], "ts -1 is negative"),
        (["acme", "m", None, T + FUTURE_TOLERANCE + 1, 1], "3601 s ahead of the server clock"),
        (["acme", "m", None, 2**64 - 1, 1], "ahead of the server clock"),
        (["acme", "m", None, T, 1.5], "value 1.5 is a float; values are int64"),
        (["acme", "m", None, T, 1.0], "value 1.0 is a float"),
        (["acme", "m", None, T, True], "value True is a bool"),
        (["acme", "m", None, T, "1"], "value '1' is a string"),
        (["acme", "m", None, T, None], "value None is a nil"),
        (["acme", "m", None, T, b"\x01"], "is a binary"),
        (["acme", "m", None, T, 2**63], f"value {2**63} is outside int64"),
        (["acme", "m", None, T, 2**64 - 1], "outside int64"),
        (["acme", "m", None, T, INT64_MIN - 1], "outside int64"),
    ],
)
def test_bad_row_kinds(row: Any, words: str) -> None:
    rows = ok() * 3 + [row] + ok() * 2
    err = bad_row(rows)
    assert err.row == 3
    assert words in err.message, err.message


def test_bad_row_survives_msgpack() -> None:
    # msgpack turns 2**63 into a uint64 and 1.5 into a float64: still refused.
    rows = msgpack.unpackb(msgpack.packb(ok() + [["acme", "m", None, T, 2**63]]))
    assert bad_row(rows).row == 1


def test_timestamp_bounds() -> None:
    limit = T + FUTURE_TOLERANCE  # NOW is T + 0.5: the limit is an exact integer
    assert rows_batch([["acme", "m", None, limit, 1], ["acme", "m", None, 0, 1]], NOW).increments
    assert bad_row([["acme", "m", None, limit + 1, 1]]).row == 0


def test_value_bounds_are_accepted() -> None:
    batch = rows_batch(
        [["acme", "m", None, T, INT64_MAX], ["acme", "m", None, T - 3600, INT64_MIN]], NOW
    )
    assert sorted(batch.values.tolist()) == [INT64_MIN, INT64_MAX]


def test_running_sum_overflow_blames_the_row_that_overflows() -> None:
    rows = [
        ["acme", "a", None, T, INT64_MAX - 5],
        ["acme", "b", None, T, 100],  # another series: no effect
        ["acme", "a", None, T - 3600, 100],  # another hour: no effect
        ["acme", "a", None, T, 5],  # exactly INT64_MAX: fine
        ["acme", "a", None, T, 1],  # leaves int64
        ["acme", "a", None, T, -10],  # would bring it back: too late
    ]
    err = bad_row(rows)
    assert err.row == 4
    assert "outside int64" in err.message and "acme|a|" in err.message
    assert (
        bad_col_row(
            [["acme", "a", None], ["acme", "b", None]],
            [0, 1, 0, 0, 0, 0],
            [T, T, T - 3600, T, T, T],
            [INT64_MAX - 5, 100, 100, 5, 1, -10],
        ).row
        == 4
    )


def test_exact_check_accepts_sums_that_stay_inside() -> None:
    # max|v| * n leaves int64, so the exact path runs; no running sum does
    rows = [["acme", "a", None, T, v] for v in (INT64_MAX, INT64_MIN, INT64_MAX, -1, 1)]
    batch = rows_batch(rows, NOW)
    assert batch.values.tolist() == [INT64_MAX - 1]
    assert batch.counts.tolist() == [5]


def test_negative_overflow() -> None:
    rows = [["acme", "a", None, T, INT64_MIN], ["acme", "a", None, T, -1]]
    assert bad_row(rows).row == 1


def test_an_earlier_overflow_wins_over_a_later_bad_row() -> None:
    rows = [
        ["acme", "a", None, T, INT64_MAX],
        ["acme", "a", None, T, 1],
        ["acme", "a", None, T, 1.5],
    ]
    assert bad_row(rows).row == 1
    rows[1][4] = 0
    assert "float" in bad_row(rows).message


def test_rows_must_be_a_list() -> None:
    for rows in ({"a": 1}, None, "rows", (1, 2)):
        with pytest.raises(BadBatch) as info:
            rows_batch(rows, NOW)
        assert info.value.code == "bad_request"
        assert "rows must be a list" in info.value.message


def test_empty_rows() -> None:
    batch = rows_batch([], NOW)
    assert len(batch) == 0
    assert batch.increments == 0
    assert batch == Batch.empty()
    assert batch.series.dtype == np.uint32


def test_row_aggregation_by_series_and_hour() -> None:
    rows = [
        ["acme", "m", {"b": "2", "a": "1"}, T, 3],
        ["acme", "m", {"a": "1", "b": "2"}, T - 3600, 4],  # same series, tags in another order
        ["acme", "m", None, T, 5],
        ["acme", "m", {}, T, 6],  # {} and nil are the same series
        ("acme", "m", {"a": "1", "b": "2"}, T + 1, 1),  # tuples accepted
    ]
    batch = rows_batch(rows, NOW)
    h = T // 3600
    assert batch.sids == ["acme|m|", "acme|m|a=1,b=2"]
    assert batch.series.tolist() == [0, 1, 1]
    assert batch.hours.tolist() == [h, h - 1, h]
    assert batch.values.tolist() == [11, 4, 4]
    assert batch.first_row.tolist() == [2, 1, 0]
    assert batch.counts.tolist() == [2, 1, 2]
    assert batch.increments == 5 and len(batch) == 3
    assert [a.dtype for a in (batch.hours, batch.values, batch.first_row, batch.counts)] == [
        np.int64
    ] * 4


# -- columnar batches --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("series", "i", "ts", "v", "words"),
    [
        ({"a": 1}, b"", b"", b"", "series must be a list"),
        ([], "", b"", b"", "i must be binary"),
        ([], b"", [1], b"", "ts must be binary"),
        ([], b"\x00" * 3, b"", b"", "i is 3 bytes, not a multiple of 4"),
        ([], b"", b"\x00" * 7, b"", "ts is 7 bytes, not a multiple of 8"),
        ([], b"", b"", b"\x00" * 9, "v is 9 bytes, not a multiple of 8"),
        ([], b"\x00" * 8, b"\x00" * 8, b"\x00" * 8, "i has 2 entries, ts 1, v 1"),
    ],
)
def test_columnar_structure(series: Any, i: Any, ts: Any, v: Any, words: str) -> None:
    with pytest.raises(BadBatch) as info:
        columnar_batch(series, i, ts, v, NOW)
    assert info.value.code == "bad_request"
    assert words in info.value.message


def test_columnar_bad_rows() -> None:
    good = ["acme", "m", None]
    err = bad_col_row([good], [0, 0, 1, 2], [T] * 4, [1] * 4)
    assert err.row == 2 and "i 1 is out of range: series has 1 entries" in err.message
    err = bad_col_row([good], [0, 2**32 - 1], [T] * 2, [1] * 2)
    assert err.row == 1 and f"i {2**32 - 1} is out of range" in err.message
    err = bad_col_row([good, ["Bad", "m", None]], [0, 0, 0, 1, 1], [T] * 5, [1] * 5)
    assert err.row == 3 and "series[1] is invalid: tenant 'Bad'" in err.message
    err = bad_col_row([good, ["acme", "m"]], [0, 1], [T] * 2, [1] * 2)
    assert err.row == 1 and "a series is [tenant, metric, tags|nil]" in err.message
    err = bad_col_row([good], [0, 0, 0], [T, -5, T], [1] * 3)
    assert err.row == 1 and "ts -5 is negative" in err.message
    err = bad_col_row([good], [0, 0, 0], [T, T, T + FUTURE_TOLERANCE + 1], [1] * 3)
    assert err.row == 2 and "ahead of the server clock" in err.message
    # the first bad increment whatever its kind
    err = bad_col_row([good, ["Bad", "m", None]], [0, 0, 5, 1], [T, -1, T, T], [1] * 4)
    assert err.row == 1
    err = bad_col_row([], [0], [T], [1])
    assert err.row == 0 and "series has 0 entries" in err.message


def test_columnar_unreferenced_bad_series_still_refuses() -> None:
    with pytest.raises(BadBatch) as info:
        columnar_batch(*columns([["acme", "m", None], ["acme", "m", {"a": 1}]], [0], [T], [1]), NOW)
    assert "series[1] is invalid: tag 'a'" in info.value.message
    assert "no increment references it" in info.value.message
    with pytest.raises(BadBatch):
        columnar_batch(*columns([["acme"]], [], [], []), NOW)


def test_columnar_merges_duplicate_series_and_drops_unreferenced() -> None:
    series = [
        ["zeta", "m", None],  # unreferenced
        ["acme", "m", {"b": "2", "a": "1"}],
        ["acme", "m", {"a": "1", "b": "2"}],
        ("acme", "m", None),
    ]
    batch = columnar_batch(*columns(series, [1, 2, 3], [T, T, T], [1, 2, 3]), NOW)
    assert batch.sids == ["acme|m|", "acme|m|a=1,b=2"]
    assert batch.values.tolist() == [3, 3]
    assert batch.first_row.tolist() == [2, 0]
    assert batch.counts.tolist() == [1, 2]


def test_columnar_accepts_memoryview_and_bytearray() -> None:
    _, i, ts, v = columns([], [0, 0], [T, T], [1, 2])
    batch = columnar_batch([["acme", "m", None]], bytearray(i), memoryview(ts), v, NOW)
    assert batch.values.tolist() == [3]


def test_empty_columnar() -> None:
    assert columnar_batch([["acme", "m", None]], b"", b"", b"", NOW) == Batch.empty()


# -- the oracle ------------------------------------------------------------------------

POOL = [
    ("acme", "a", None),
    ("acme", "a", {}),  # same series as nil tags
    ("acme", "b.c:d-e", {"x": "1"}),
    ("beta", "a", {"x": "1", "y": "2"}),
    ("beta", "a", {"y": "2", "x": "1"}),  # same series, other tag order
    ("beta", "a", {"x": "%,=|"}),  # characters escaped in the series id
    ("gamma", "a", {"z": ""}),
]

Inc = tuple[int, int, int]  # (pool index, ts, value)


def oracle(incs: list[Inc], now: float) -> dict | int:
    """Apply increments one by one: the bad row's index, or {(sid, hour): (sum, first, count)}."""
    limit = int(now) + FUTURE_TOLERANCE
    aggs: dict[tuple[str, int], list[int]] = {}
    for n, (p, ts, value) in enumerate(incs):
        if not 0 <= ts <= limit:
            return n
        key = (series_id(*POOL[p]), ts // 3600)
        agg = aggs.setdefault(key, [0, n, 0])
        agg[0] += value
        agg[2] += 1
        if not INT64_MIN <= agg[0] <= INT64_MAX:
            return n
    return {k: tuple(a) for k, a in aggs.items()}


def as_dict(batch: Batch) -> dict:
    """Check the Batch invariants, then flatten it for comparison with the oracle."""
    n = len(batch)
    for arr, dtype in (
        (batch.series, np.uint32),
        (batch.hours, np.int64),
        (batch.values, np.int64),
        (batch.first_row, np.int64),
        (batch.counts, np.int64),
    ):
        assert arr.dtype == dtype and arr.shape == (n,)
    assert batch.sids == sorted(set(batch.sids))
    assert set(batch.series.tolist()) == set(range(len(batch.sids)))  # all referenced
    pairs = list(zip(batch.series.tolist(), batch.hours.tolist(), strict=True))
    assert pairs == sorted(set(pairs))  # unique, ordered by (series, hour)
    assert batch.increments == int(batch.counts.sum())
    return {
        (batch.sids[s], h): (v, f, c)
        for s, h, v, f, c in zip(
            batch.series.tolist(),
            batch.hours.tolist(),
            batch.values.tolist(),
            batch.first_row.tolist(),
            batch.counts.tolist(),
            strict=True,
        )
    }


def run_both(incs: list[Inc], now: float, rnd: random.Random) -> Batch | int:
    """Both forms of the same increments; they must agree (equal Batches or the same bad row)."""
    rows = [[*POOL[p][:2], POOL[p][2], ts, v] for p, ts, v in incs]
    # a shuffled series table with duplicates, so table order cannot matter
    order = [*range(len(POOL)), *range(len(POOL))]
    rnd.shuffle(order)
    table = [list(POOL[k]) for k in order]
    slots: dict[int, list[int]] = {}
    for j, k in enumerate(order):
        slots.setdefault(k, []).append(j)
    idx = [rnd.choice(slots[p]) for p, _, _ in incs]
    cols = columns(table, idx, [ts for _, ts, _ in incs], [v for _, _, v in incs])
    try:
        from_rows: Batch | int = rows_batch(rows, now)
    except BadRow as exc:
        from_rows = exc.row
    try:
        from_cols: Batch | int = columnar_batch(*cols, now)
    except BadRow as exc:
        from_cols = exc.row
    assert from_rows == from_cols
    return from_rows


timestamps = st.one_of(
    st.integers(T - 3 * 3600, T + FUTURE_TOLERANCE + 5),  # live: dense path, some too far ahead
    st.integers(0, T),  # backfills over decades: sort path
    st.integers(-3, 2),
)
values = st.one_of(
    st.integers(-10, 10),
    st.integers(INT64_MIN, INT64_MAX),
    st.sampled_from([INT64_MAX, INT64_MIN, 2**62, -(2**62)]),
)
incs_strategy = st.lists(st.tuples(st.integers(0, len(POOL) - 1), timestamps, values), max_size=60)


@given(incs_strategy, st.randoms(use_true_random=False))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_aggregation_matches_the_oracle(incs: list[Inc], rnd: random.Random) -> None:
    got = run_both(incs, NOW, rnd)
    want = oracle(incs, NOW)
    if isinstance(want, int):
        assert got == want
    else:
        assert isinstance(got, Batch)
        assert as_dict(got) == want
        assert got.increments == len(incs)


@given(
    st.lists(st.tuples(st.integers(0, len(POOL) - 1), st.integers(0, 5), st.integers(-3, 3))),
    st.randoms(use_true_random=False),
)
@settings(max_examples=100)
def test_small_values_never_take_the_exact_overflow_path(incs: list, rnd: random.Random) -> None:
    incs = [(p, T - h * 3600, v) for p, h, v in incs]
    got = run_both(incs, NOW, rnd)
    assert isinstance(got, Batch) and as_dict(got) == oracle(incs, NOW)


def test_huge_hour_span_with_many_series() -> None:
    # series x hour span beyond int64: the lexsort path
    now = float(INT64_MAX - FUTURE_TOLERANCE)
    rows = []
    for k in range(4000):
        rows.append([f"t{k}", "m", None, INT64_MAX - FUTURE_TOLERANCE, 1])
        rows.append([f"t{k}", "m", None, k % 1000, 2])
        rows.append([f"t{k}", "m", None, k % 1000 + 1, 3])
    batch = rows_batch(rows, now)
    assert len(batch) == 8000
    assert batch.sids == sorted(f"t{k}|m|" for k in range(4000))
    got = as_dict(batch)
    assert got[("t7|m|", 0)] == (5, 22, 2)
    assert got[("t7|m|", (INT64_MAX - FUTURE_TOLERANCE) // 3600)] == (1, 21, 1)


def test_dense_and_sort_paths_agree() -> None:
    rnd = random.Random(7)
    incs = [
        (rnd.randrange(len(POOL)), T - rnd.randrange(48 * 3600), rnd.randrange(5))
        for _ in range(5000)
    ]
    live = run_both(incs, NOW, rnd)  # 48-hour span: dense table
    spread = [(p, ts - 10**8 * (n % 2), v) for n, (p, ts, v) in enumerate(incs)]
    backfill = run_both(spread, NOW, rnd)  # 3-year span: sort
    assert isinstance(live, Batch) and isinstance(backfill, Batch)
    assert as_dict(live) == oracle(incs, NOW)
    assert as_dict(backfill) == oracle(spread, NOW)


# -- select ------------------------------------------------------------------------


@given(incs_strategy, st.integers(1, 5), st.randoms(use_true_random=False))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_select_partitions_exactly(incs: list[Inc], shards: int, rnd: random.Random) -> None:
    batch = run_both(incs, NOW, rnd)
    if isinstance(batch, int):
        return
    shard = np.array([shard_of(batch.sids[s], shards) for s in batch.series.tolist()], np.int64)
    parts = [batch.select(shard == k) for k in range(shards)]
    merged: dict = {}
    for k, part in enumerate(parts):
        flat = as_dict(part)  # invariants hold for every part
        assert all(shard_of(sid, shards) == k for sid in part.sids)
        assert not merged.keys() & flat.keys()
        merged.update(flat)
    assert merged == as_dict(batch)
    assert sum(p.increments for p in parts) == batch.increments == len(incs)
    assert batch.select(np.ones(len(batch), bool)) == batch
    assert batch.select(np.zeros(len(batch), bool)) == Batch.empty()


@given(incs_strategy, st.integers(1, 5), st.randoms(use_true_random=False))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
def test_router_split_equals_a_select_per_shard(incs: list[Inc], shards: int,
                                               rnd: random.Random) -> None:
    # Router.split cuts with one sort (Batch.partition); each part must be exactly the
    # batch ``select`` gives, sids order and dtypes included.
    batch = run_both(incs, NOW, rnd)
    if isinstance(batch, int) or not len(batch):
        return
    owner = np.array([shard_of(sid, shards) for sid in batch.sids], np.int32)
    per = owner[batch.series]
    expected = {int(k): batch.select(per == k) for k in np.unique(per)}
    assert Router(shards).split(batch) == expected
    # a sid no aggregate references (``select`` drops it) takes the slower way, same parts
    extra = Batch([*batch.sids, "zz|unused"], batch.series, batch.hours,
                  batch.values, batch.first_row, batch.counts, batch.increments)
    assert batch.partition(owner) == expected
    owner_extra = np.array([shard_of(sid, shards) for sid in extra.sids], np.int32)
    assert extra.partition(owner_extra) == expected


def test_router_split_of_a_large_batch_equals_a_select_per_shard() -> None:
    # large enough that an unstable sort would reorder a part's aggregates
    rnd = random.Random(11)
    rows = [["acme", "m", {"k": f"v{rnd.randrange(3000)}"}, T - rnd.randrange(48 * 3600),
             rnd.randrange(1, 9)] for _ in range(20_000)]
    batch = rows_batch(rows, NOW)
    owner = np.array([shard_of(sid, 4) for sid in batch.sids], np.int32)
    per = owner[batch.series]
    parts = Router(4).split(batch)
    assert parts == {k: batch.select(per == k) for k in range(4)}
    assert sum(p.increments for p in parts.values()) == 20_000


def test_select_wants_a_bool_mask_of_the_right_length() -> None:
    batch = rows_batch(ok() + [["acme", "x", None, T, 1]], NOW)
    with pytest.raises(ValueError):
        batch.select(np.array([0, 1]))
    with pytest.raises(ValueError):
        batch.select(np.array([True]))


def test_batch_pickles() -> None:
    # Batches cross process boundaries (Ray): they must survive pickling.
    batch = rows_batch(ok() * 3 + [["acme", "x", None, T - 7200, 4]], NOW)
    assert pickle.loads(pickle.dumps(batch)) == batch
    assert batch != rows_batch(ok(), NOW)


# -- throughput (printed, never asserted) ------------------------------------------------


def test_throughput_report(capsys: pytest.CaptureFixture[str]) -> None:
    rnd = random.Random(1)
    pool = [
        ["acme", f"messages.m{k % 20}", {"channel": f"c{k % 7}", "agent": f"agent{k}"}]
        for k in range(1000)
    ]
    n = 100_000
    lines = []
    for label, span in (("48 h", 48 * 3600), ("1 h", 3600), ("1 year", 365 * 24 * 3600)):
        picks = [rnd.randrange(1000) for _ in range(n)]
        ts = [T - rnd.randrange(span) for _ in range(n)]
        rows = msgpack.unpackb(  # fresh objects, as decoded from the wire
            msgpack.packb([[*pool[p], t, 1] for p, t in zip(picks, ts, strict=True)])
        )
        untagged = [[r[0], r[1], None, r[3], r[4]] for r in rows]
        cols = columns(pool, picks, ts, [1] * n)
        for name, fn in (
            ("rows_batch, 2 tags", lambda rows=rows: rows_batch(rows, NOW)),
            ("rows_batch, no tags", lambda rows=untagged: rows_batch(rows, NOW)),
            ("columnar_batch", lambda cols=cols: columnar_batch(*cols, NOW)),
        ):
            fn()
            best = min(_timed(fn) for _ in range(5))
            lines.append(
                f"{name:22} {label:7} {n / best / 1e6:6.2f} M increments/s ({best * 1e3:.1f} ms)"
            )
    with capsys.disabled():
        print("\nthroughput, 100k increments over 1,000 series:\n  " + "\n  ".join(lines))


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_a_connection_series_cache_changes_nothing_but_the_cost() -> None:
    """Frames of one connection share validated series; answers are the same as without."""
    cache = KnownSeries(limit=3)
    t0 = int(NOW) // 3600 * 3600 - 7200
    frames = [
        [["acme", "m", {"b": "2", "a": "1"}, t0, 1], ["acme", "m", {"a": "1", "b": "2"}, t0, 2],
         ["acme", "m", None, t0, 3], ["acme", "m", {}, t0 + 3600, 4]],
        [["acme", "m", {"a": "1", "b": "2"}, t0, 5], ["globex", "n", None, t0, 6],
         ["acme", "m", {"a": 1, "b": "2"}, t0, 7]],  # an int tag value: a bad row
    ]
    assert rows_batch(frames[0], NOW, cache) == rows_batch(frames[0], NOW)
    assert 0 < len(cache.sids) <= 3
    with pytest.raises(BadRow) as cached:
        rows_batch(frames[1], NOW, cache)
    with pytest.raises(BadRow) as plain:
        rows_batch(frames[1], NOW)
    assert cached.value.row == plain.value.row == 2
    assert str(cached.value) == str(plain.value)
    assert all(all(type(p) is str for p in key[:2]) for key in cache.sids)
    assert len(cache.sids) <= 3  # bounded: it starts over when full


def test_columnar_series_tables_are_validated_once_per_connection(monkeypatch):
    """A producer sends the same series table frame after frame; with the connection's
    KnownSeries the second frame validates none of it, and answers the same."""
    import numpy as np

    import tally.wire.columnar as columnar
    from tally.wire.batches import KnownSeries

    now = 1_795_000_000
    series = [["acme", "m", {"b": "2", "a": "1"}], ["acme", "m", None], ["acme", "n", {}]]
    i = np.array([0, 1, 2, 0], "<u4").tobytes()
    ts = np.array([now - 60] * 4, "<i8").tobytes()
    v = np.array([1, 2, 3, 4], "<i8").tobytes()
    plain = columnar_batch(series, i, ts, v, now)
    known = KnownSeries()
    first = columnar_batch(series, i, ts, v, now, known)
    assert len(known.sids) == 3

    def no_validation(*args):  # type: ignore[no-untyped-def]
        raise AssertionError("validated again")

    monkeypatch.setattr(columnar, "series_key", no_validation)
    second = columnar_batch(series, i, ts, v, now, known)
    for b in (first, second):
        assert b.sids == plain.sids and b.values.tolist() == plain.values.tolist()
        assert b.series.tolist() == plain.series.tolist()
    monkeypatch.undo()
    # an invalid entry is still refused (and never remembered), valid ones around it or not
    bad = [*series, ["acme", "m", {"Bad Key": "x"}]]
    with pytest.raises(BadRow, match=r"row 0: series\[3\] is invalid"):
        columnar_batch(bad, np.array([3], "<u4").tobytes(), ts[:8], v[:8], now, known)
    with pytest.raises(BadRow, match=r"series\[0\] is invalid"):
        columnar_batch([["acme", "m", {"a": ["x"]}]], np.array([0], "<u4").tobytes(),
                       ts[:8], v[:8], now, known)
    assert len(known.sids) == 3


@pytest.mark.parametrize("value", [1, -5, 2**31 - 1, 2**31, -(2**31) - 1, 2**62])
def test_a_batch_crosses_a_shards_socket_exactly(value: int) -> None:
    """A part goes to its shard with each int column as int32 when it fits, else int64,
    and comes back equal; a column of neither width is not a batch."""
    now = 1_800_000_000
    batch = rows_batch([["t", "m", None, now - 7200, value], ["t", "m", {"a": "b"}, now, 3]],
                       now)
    wire = msgpack.unpackb(msgpack.packb(batch.to_wire()), raw=False)
    assert Batch.from_wire(wire) == batch
    fits = -(2**31) <= value < 2**31
    assert len(wire["values"]) == (4 if fits else 8) * len(batch)
    assert len(wire["hours"]) == 4 * len(batch)
    wire["hours"] = wire["hours"][:-1]
    assert Batch.from_wire(wire) is None


def test_a_wide_batch_with_a_few_repeated_slots_sums_them_exactly() -> None:
    # Increments spread over years of hours, a few of them landing on a slot another
    # already holds: the sort path sums only the repeats. Each aggregate's count, sum and
    # first row must be those of all its increments, whichever of them the sort put first.
    rnd = random.Random(11)
    incs = [(rnd.randrange(len(POOL)), T - rnd.randrange(3 * 365 * 24) * 3600, rnd.randrange(-5, 9))
            for _ in range(3000)]
    incs += [incs[rnd.randrange(len(incs))] for _ in range(150)]  # repeats, anywhere after
    rnd.shuffle(incs)
    got = run_both(incs, NOW, rnd)
    assert isinstance(got, Batch) and len(got) < len(incs) - 100
    assert as_dict(got) == oracle(incs, NOW)
