"""Fuzzing the ingest path in-process: junk is refused cleanly, valid batches count exactly.

Design guarantee 6 ("bad input is refused, not absorbed; a batch is applied
all or nothing") and guarantee 3 (a resent seq is never applied twice), checked
against models written from DESIGN.md alone (the data model's regular
expressions, the wire protocol's error codes), not from the code under test:

- the row and columnar validators (``wire.batches``) only ever raise ``BadRow``
  or ``BadBatch`` on arbitrary msgpack-able junk, blame exactly the first bad
  row, and aggregate valid rows exactly;
- a protocol connection (``tally.api.tcp.Connection``, no sockets) over in-process
  shards answers every decoded message with a well-formed frame, and the live
  totals equal the increments of the batches it acknowledged with a new seq.

The codec below the messages (bytes -> maps) is fuzzed in tests/test_frames.py.
No Ray, no subprocess; every test is derandomized.
"""

from __future__ import annotations

import asyncio
import calendar
import os
import re
import shutil
import struct
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
)

from tally.actors.clients import LocalShards
from tally.api.service import Service
from tally.api.tcp import Connection
from tally.checkpoint.sqlite import SqliteStore
from tally.wire.batches import BadBatch, BadRow, Batch, rows_batch
from tally.wire.columnar import columnar_batch
from tally.wire.series import parse_series_id

NOW = calendar.timegm((2026, 11, 20, 12, 0, 0))
CLOCK = NOW + 0.75  # a fractional server clock: the ts limit is floor(clock) + 3600
LIMIT = NOW + 3600  # the latest accepted timestamp (DESIGN: "more than one hour ahead")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_SEQ = 2**63 - 1
CODES = {"bad_frame", "too_large", "bad_request", "unauthorized", "bad_row", "overloaded",
         "internal"}
REPLY_OPS = {"welcome", "ack", "error", "pong"}

FAST = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the data model, from DESIGN.md ("Data model") --------------------------------------

TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
METRIC = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
TAG_KEY = re.compile(r"[a-z_][a-z0-9_]{0,63}")

Key = tuple[str, str, tuple[tuple[str, str], ...]]


def ref_series(tenant: Any, metric: Any, tags: Any) -> Key | None:
    """The identity of a valid series (tags sorted; nil and {} are the same), else None."""
    if type(tenant) is not str or not TENANT.fullmatch(tenant):
        return None
    if type(metric) is not str or not METRIC.fullmatch(metric):
        return None
    if tags is None:
        tags = {}
    if type(tags) is not dict or len(tags) > 16:
        return None
    for k, v in tags.items():
        if type(k) is not str or not TAG_KEY.fullmatch(k):
            return None
        if type(v) is not str or len(v) > 200:
            return None
    return tenant, metric, tuple(sorted(tags.items()))


def is_int64(x: Any) -> bool:
    return type(x) is int and INT64_MIN <= x <= INT64_MAX


class Agg:
    """Brute-force aggregation: one increment at a time, running sums checked."""

    def __init__(self) -> None:
        self.slots: dict[tuple[Key, int], list[int]] = {}  # -> [sum, first row, count]

    def add(self, n: int, key: Key, ts: int, value: int) -> bool:
        slot = self.slots.setdefault((key, ts // 3600), [0, n, 0])
        slot[0] += value
        slot[2] += 1
        return INT64_MIN <= slot[0] <= INT64_MAX


# Outcomes of the reference validators: ("ok", Agg), ("row", index), ("batch", None).


def ref_rows(rows: Any, limit: int = LIMIT) -> tuple[str, Any]:
    if type(rows) is not list:
        return "batch", None
    agg = Agg()
    for n, row in enumerate(rows):
        if type(row) not in (list, tuple) or len(row) != 5:
            return "row", n
        key = ref_series(*row[:3])
        ts, value = row[3], row[4]
        if key is None or type(ts) is not int or not 0 <= ts <= limit or not is_int64(value):
            return "row", n
        if not agg.add(n, key, ts, value):
            return "row", n
    return "ok", agg


def ref_columnar(
    series: Any, i: Any, ts: Any, v: Any, limit: int = LIMIT,
) -> tuple[str, Any]:
    """The columnar verdict, from the design alone."""
    if type(series) is not list:
        return "batch", None
    for col, width in ((i, 4), (ts, 8), (v, 8)):
        if type(col) is not bytes or len(col) % width:
            return "batch", None
    n = len(i) // 4
    if len(ts) // 8 != n or len(v) // 8 != n:
        return "batch", None
    idx = struct.unpack(f"<{n}I", i)
    tss = struct.unpack(f"<{n}q", ts)
    vals = struct.unpack(f"<{n}q", v)
    keys = [
        ref_series(*e) if type(e) in (list, tuple) and len(e) == 3 else None for e in series
    ]
    unreferenced_bad = any(key is None for key in keys)
    agg = Agg()
    for k in range(n):
        j = idx[k]
        if j >= len(keys) or keys[j] is None or not 0 <= tss[k] <= limit:
            return "row", k
        if not agg.add(k, keys[j], tss[k], vals[k]):
            return "row", k
    if unreferenced_bad:
        return "batch", None  # an invalid series entry that no increment references
    return "ok", agg


def flatten(batch: Batch) -> dict[tuple[Key, int], list[int]]:
    """A Batch as {(series identity, hour): [sum, first row, count]}; sids must parse back."""
    out = {}
    assert batch.sids == sorted(set(batch.sids))
    for s, h, v, f, c in zip(batch.series.tolist(), batch.hours.tolist(), batch.values.tolist(),
                             batch.first_row.tolist(), batch.counts.tolist(), strict=True):
        k = parse_series_id(batch.sids[s])
        out[((k.tenant, k.metric, k.tags), h)] = [v, f, c]
    assert len(out) == len(batch)
    return out


def outcome(call: Any) -> tuple[str, Any]:
    """Run a validator; anything but a Batch, BadRow or BadBatch propagates and fails."""
    try:
        return "ok", call()
    except BadRow as e:
        assert e.code == "bad_row"
        assert e.message.startswith(f"row {e.row}: "), e.message
        return "row", e.row
    except BadBatch as e:
        assert e.code == "bad_request" and e.message
        return "batch", None


def agree(got: tuple[str, Any], want: tuple[str, Any], n: int) -> None:
    assert got[0] == want[0], (got, want)
    if want[0] == "row":
        assert got[1] == want[1]
    elif want[0] == "ok":
        batch = got[1]
        assert flatten(batch) == want[1].slots
        assert batch.increments == n == int(batch.counts.sum())


# -- strategies ---------------------------------------------------------------------------

odd_ints = st.sampled_from([INT64_MAX, INT64_MIN, 2**63, 2**64 - 1, -(2**63) - 1, 2**100,
                            -(2**100), 0, -1, NOW, LIMIT, LIMIT + 1])
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | odd_ints
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
map_keys = st.none() | st.booleans() | st.integers() | st.text(max_size=6) | st.binary(max_size=4)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(map_keys, inner, max_size=5),
    max_leaves=20,
)

# Short names mostly (generating 200-character names is slow), and the longest allowed.
tenants = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,8}", fullmatch=True) | st.just("t" + "_-9" * 21)
metrics = st.from_regex(r"[A-Za-z0-9_.:-]{1,12}", fullmatch=True) | st.just("M.:-_9" * 33 + "xy")
tag_keys = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True) | st.just("k" * 64)
tag_values = (st.text(max_size=12) | st.sampled_from(["%", ",", "=", "|", "a%2Cb", "%25,=|"])
              | st.just("é|" * 100))
tag_maps = st.none() | st.dictionaries(tag_keys, tag_values, max_size=16)
valid_series = st.tuples(tenants, metrics, tag_maps)
recent_ts = st.integers(NOW - 3 * 365 * 86400, LIMIT)
small_values = st.integers(-1000, 1000)

# Parts that break a row (each makes the row invalid on its own, whatever the rest).
bad_tenants = st.sampled_from(["", "Acme", "-acme", "a" * 65, "acme corp", "ac|me", "é"]) | st.just(
    None) | st.integers() | st.lists(st.text(max_size=3), max_size=2)
bad_metrics = st.sampled_from(["", "m/x", "m x", "m|x", "x" * 201, "m\n"]) | st.none() | st.binary(
    max_size=3)
bad_tags = (
    st.sampled_from([[], "a=b", 0, {"A": "x"}, {"a": 1}, {"a": None}, {"a": "x" * 201},
                     {"": "x"}, {"1a": "x"}, {f"k{n}": "v" for n in range(17)}, {"a": ["x"]}])
)
bad_ts = st.sampled_from([-1, LIMIT + 1, 2**63, 2**64 - 1, float(NOW), True, None, str(NOW),
                          -(2**70), b"\x00"]) | st.floats()
bad_values = st.sampled_from([2**63, 2**64 - 1, INT64_MIN - 1, 1.0, 1.5, True, False, None,
                              "1", b"\x01", [1], {"v": 1}]) | st.floats()


@st.composite
def valid_rows(draw: st.DrawFn, max_size: int = 30, min_size: int = 0) -> list[list]:
    """Rows over a few series (tag maps in varying key order), recent timestamps, small values."""
    pool = draw(st.lists(valid_series, min_size=1, max_size=4))
    rnd = draw(st.randoms(use_true_random=False))
    rows = []
    for _ in range(draw(st.integers(min_size, max_size))):
        tenant, metric, tags = rnd.choice(pool)
        if tags is not None:
            items = list(tags.items())
            rnd.shuffle(items)
            tags = dict(items)
        rows.append([tenant, metric, tags, draw(recent_ts), draw(small_values)])
    return rows


@st.composite
def corrupt(draw: st.DrawFn, row: list) -> Any:
    """``row`` made invalid by exactly one kind of damage."""
    how = draw(st.sampled_from(["tenant", "metric", "tags", "ts", "value", "shape", "junk"]))
    row = list(row)
    if how == "tenant":
        row[0] = draw(bad_tenants)
    elif how == "metric":
        row[1] = draw(bad_metrics)
    elif how == "tags":
        row[2] = draw(bad_tags)
    elif how == "ts":
        row[3] = draw(bad_ts)
    elif how == "value":
        row[4] = draw(bad_values)
    elif how == "shape":
        cut = draw(st.integers(0, 7))
        row = row[:cut] if cut < 5 else row + [0] * (cut - 4)
    else:
        row = draw(junk.filter(lambda x: not (type(x) is list and len(x) == 5)))
    assert ref_rows([row])[0] == "row"
    return row


@st.composite
def near_valid_rows(draw: st.DrawFn) -> list:
    """Mostly valid rows, some damaged, some junk, values anywhere in (and beyond) int64."""
    rows = draw(valid_rows(max_size=12))
    for n in range(len(rows)):
        if draw(st.integers(0, 9)) == 0:
            rows[n] = draw(corrupt(rows[n]))
        elif draw(st.integers(0, 5)) == 0:
            rows[n][4] = draw(st.integers(INT64_MIN, INT64_MAX) | odd_ints)
    return rows


def to_columns(rows: list[list], rnd: Any) -> tuple[list, bytes, bytes, bytes]:
    """The columnar form of valid rows: a shuffled series table with duplicate entries."""
    table: list[list] = []
    where: dict[Key, list[int]] = defaultdict(list)
    for tenant, metric, tags, _, _ in rows:
        key = ref_series(tenant, metric, tags)
        assert key is not None
        if key not in where or rnd.random() < 0.2:
            where[key].append(len(table))
            table.append([tenant, metric, tags])
    order = list(range(len(table)))
    rnd.shuffle(order)
    pos = {old: new for new, old in enumerate(order)}
    table = [table[old] for old in order]
    idx = [pos[rnd.choice(where[ref_series(*r[:3])])] for r in rows]
    return (
        table,
        np.asarray(idx, "<u4").tobytes(),
        np.asarray([r[3] for r in rows], "<i8").tobytes(),
        np.asarray([r[4] for r in rows], "<i8").tobytes(),
    )


# -- the validators ----------------------------------------------------------------------


def check_blame(rows: list, row: int) -> None:
    """Every row before the blamed one passes; adding the blamed one fails, blaming it."""
    assert 0 <= row < len(rows)
    prefix = rows_batch(rows[:row], CLOCK)
    assert prefix.increments == row
    assert outcome(lambda: rows_batch(rows[: row + 1], CLOCK)) == ("row", row)


@given(junk | st.lists(junk | near_valid_rows().map(lambda r: r[0] if r else []), max_size=8)
       | near_valid_rows())
@settings(FAST, max_examples=500)
def test_rows_refuse_junk_with_bad_row_or_bad_batch_only(rows: Any) -> None:
    """Arbitrary rows raise only BadRow/BadBatch; the blamed row is the first bad one."""
    got = outcome(lambda: rows_batch(rows, CLOCK))
    want = ref_rows(rows)
    agree(got, want, len(rows) if type(rows) is list else 0)
    if got[0] == "row":
        check_blame(rows, got[1])


columns_junk = st.one_of(
    junk,
    st.binary(max_size=40),
    st.sampled_from([b"", b"\x00" * 4, b"\x00" * 8, b"\xff" * 8, bytearray(8)]),
)


@given(junk | st.lists(junk | valid_series.map(list), max_size=5), columns_junk, columns_junk,
       columns_junk)
@settings(FAST, max_examples=400)
def test_columnar_refuses_junk_with_bad_row_or_bad_batch_only(
    series: Any, i: Any, ts: Any, v: Any
) -> None:
    """Arbitrary series tables and columns raise only BadRow/BadBatch, never a crash."""
    got = outcome(lambda: columnar_batch(series, i, ts, v, CLOCK))
    want = ref_columnar(series, i, ts, v)
    if type(i) is bytearray or type(ts) is bytearray or type(v) is bytearray:
        return  # accepted as binary too (not msgpack's type): only the no-crash half applies
    agree(got, want, len(i) // 4 if want[0] == "ok" else 0)


@st.composite
def columnar_near_valid(draw: st.DrawFn) -> tuple[list, bytes, bytes, bytes]:
    """Columns of valid rows, then a few entries of i, ts, v and the table overwritten."""
    rows = draw(valid_rows(max_size=12))
    series, i, ts, v = to_columns(rows, draw(st.randoms(use_true_random=False)))
    idx = list(struct.unpack(f"<{len(rows)}I", i))
    tss = list(struct.unpack(f"<{len(rows)}q", ts))
    vals = list(struct.unpack(f"<{len(rows)}q", v))
    for n in range(len(rows)):
        what = draw(st.integers(0, 12))
        if what == 0:
            idx[n] = draw(st.sampled_from([len(series), len(series) + 1, 2**32 - 1]))
        elif what == 1:
            tss[n] = draw(st.sampled_from([-1, LIMIT + 1, INT64_MIN, INT64_MAX]))
        elif what in (2, 3):
            vals[n] = draw(st.integers(INT64_MIN, INT64_MAX) | st.sampled_from(
                [INT64_MAX, INT64_MIN, 2**62]))
    if series and draw(st.integers(0, 4)) == 0:
        j = draw(st.integers(0, len(series) - 1))
        entry = list(series[j])
        entry[draw(st.integers(0, 2))] = draw(st.sampled_from(["Bad", "", 5, None, ["x"], {}]))
        series[j] = draw(st.sampled_from([entry, entry[:2], "x", None]))
    if draw(st.integers(0, 6)) == 0:
        series.append(draw(junk))
    return (series, struct.pack(f"<{len(idx)}I", *idx), struct.pack(f"<{len(tss)}q", *tss),
            struct.pack(f"<{len(vals)}q", *vals))


@given(columnar_near_valid())
@settings(FAST, max_examples=300)
def test_columnar_blames_the_first_bad_increment(cols: tuple[list, bytes, bytes, bytes]) -> None:
    """Damaged columnar batches: BadRow names the first bad increment, prefixes pass."""
    series, i, ts, v = cols
    got = outcome(lambda: columnar_batch(series, i, ts, v, CLOCK))
    n = len(i) // 4
    agree(got, ref_columnar(series, i, ts, v), n)
    if got[0] == "row":
        k = got[1]
        assert 0 <= k < n
        # the increments before it pass on their own (an unreferenced bad entry aside)
        pre = outcome(lambda: columnar_batch(series, i[: 4 * k], ts[: 8 * k], v[: 8 * k], CLOCK))
        assert pre[0] != "row"
        assert outcome(lambda: columnar_batch(
            series, i[: 4 * k + 4], ts[: 8 * k + 8], v[: 8 * k + 8], CLOCK)) == ("row", k)


@given(valid_rows(), st.randoms(use_true_random=False))
@settings(FAST, max_examples=200)
def test_valid_rows_round_trip_in_both_forms(rows: list[list], rnd: Any) -> None:
    """Valid rows aggregate to exact per-(series, hour) sums; the columnar form agrees."""
    want = ref_rows(rows)
    assert want[0] == "ok"
    from_rows = rows_batch(rows, CLOCK)
    assert flatten(from_rows) == want[1].slots
    assert from_rows.increments == len(rows)
    from_cols = columnar_batch(*to_columns(rows, rnd), CLOCK)
    assert from_cols == from_rows
    # the same rows through msgpack (what the wire delivers) give the same batch
    assert rows_batch(msgpack.unpackb(msgpack.packb(rows)), CLOCK) == from_rows


@given(valid_rows(min_size=1), st.data())
@settings(FAST, max_examples=300)
def test_one_corrupted_row_refuses_the_whole_batch(rows: list[list], data: st.DataObject) -> None:
    """One damaged row among valid ones: BadRow with exactly its index, in both forms."""
    k = data.draw(st.integers(0, len(rows) - 1), label="bad row")
    bad = list(rows)
    bad[k] = data.draw(corrupt(rows[k]), label="damaged")
    assert outcome(lambda: rows_batch(bad, CLOCK)) == ("row", k)
    # columnar: damage increment k through its index, its ts or its series entry
    series, i, ts, v = to_columns(rows, data.draw(st.randoms(use_true_random=False)))
    idx = list(struct.unpack(f"<{len(rows)}I", i))
    tss = list(struct.unpack(f"<{len(rows)}q", ts))
    how = data.draw(st.sampled_from(["i", "ts", "series"]), label="columnar damage")
    if how == "i":
        idx[k] = len(series) + data.draw(st.integers(0, 3))
    elif how == "ts":
        tss[k] = data.draw(st.sampled_from([-1, LIMIT + 1, INT64_MIN, INT64_MAX]))
    else:
        idx[k] = len(series)
        series = [*series, data.draw(st.tuples(bad_tenants, metrics, tag_maps).map(list))]
    got = outcome(lambda: columnar_batch(series, struct.pack(f"<{len(idx)}I", *idx),
                                         struct.pack(f"<{len(tss)}q", *tss), v, CLOCK))
    assert got == ("row", k)


def test_columnar_unreferenced_bad_entry_hides_an_overflow() -> None:
    """An overflowing increment is a bad row in both forms, whatever else the table holds.

    wire/batches.py promises "first is in input order over every kind of problem,
    including an aggregate whose running sum leaves int64", and an unreferenced
    bad entry only refuses the batch "when no increment is bad". Here increment 1
    takes its hour out of int64 and series[1] is invalid but unused: both forms
    say BadRow(1) (the columnar form once said BadBatch).
    """
    i = struct.pack("<2I", 0, 0)
    ts = struct.pack("<2q", NOW, NOW)
    v = struct.pack("<2q", INT64_MAX, 1)
    assert ref_columnar([["acme", "m", None], ["", "m", None]], i, ts, v) == (
        "row", 1)
    assert outcome(lambda: rows_batch([["acme", "m", None, NOW, INT64_MAX],
                                       ["acme", "m", None, NOW, 1]], CLOCK)) == ("row", 1)
    assert outcome(lambda: columnar_batch([["acme", "m", None]], i, ts, v, CLOCK)) == ("row", 1)
    got = outcome(lambda: columnar_batch([["acme", "m", None], ["", "m", None]], i, ts, v, CLOCK))
    assert got == ("row", 1)


# -- a protocol connection over in-process shards ------------------------------------------

POOL: list[tuple[str, str, dict | None]] = [
    ("acme", "hits", None),
    ("acme", "hits", {}),  # the same series as nil tags
    ("acme", "hits", {"channel": "a"}),
    ("acme", "hits", {"channel": "b", "agent": "x%,=|"}),
    ("acme", "hits", {"agent": "x%,=|", "channel": "b"}),  # the same series, other tag order
    ("acme", "other.metric", {"channel": "a"}),
    ("globex", "hits", {"channel": "a"}),
]
BIG = ("big", "m", None)  # the only series that gets values near the int64 limits
QUERIES = [("acme", "hits", {}), ("acme", "hits", {"channel": "a"}),
           ("acme", "hits", {"channel": "b"}), ("acme", "other.metric", {}),
           ("globex", "hits", {}), ("big", "m", {})]
PRODUCERS = ["p0", "p1"]
EARLIEST = NOW - 80 * 86400  # three UTC months, so checkpoints and evictions span several
H0, H1 = EARLIEST // 3600, LIMIT // 3600 + 1
tcp_ts = st.integers(EARLIEST, LIMIT) | st.sampled_from([EARLIEST, LIMIT, NOW - 1])
# a few hours of two days (one evicted to the store by checkpoint_and_evict), so sums pile up
big_ts = st.sampled_from([NOW - 3600, NOW - 7200, NOW - 7200 + 59, NOW - 20 * 3600,
                          EARLIEST + 3600, EARLIEST + 5 * 3600])
big_values = st.sampled_from([2**62, -(2**62), 3 * 2**61, -3 * 2**61, INT64_MAX, INT64_MIN,
                              2**58, 1, -1])


class Peer:
    """The model's view of one connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.producer: str | None = None  # set by an accepted hello
        self.epoch = 0
        self.closed = False


@st.composite
def tcp_rows(draw: st.DrawFn, big: bool) -> list[list]:
    """A few pool rows, with one or two increments near the int64 limits when ``big``."""
    rows = []
    for _ in range(draw(st.integers(0, 8))):
        tenant, metric, tags = draw(st.sampled_from(POOL))
        rows.append([tenant, metric, tags, draw(tcp_ts), draw(st.integers(-5, 100))])
    if big:
        for _ in range(draw(st.integers(1, 2))):
            rows.insert(draw(st.integers(0, len(rows))), [*BIG, draw(big_ts), draw(big_values)])
    damage = draw(st.integers(0, 9))
    if rows and damage == 0:
        k = draw(st.integers(0, len(rows) - 1))
        rows[k] = draw(corrupt(rows[k]))
    elif damage == 1:
        rows.insert(draw(st.integers(0, len(rows))), draw(junk))
    return rows


class ConnectionMachine(RuleBasedStateMachine):
    """Random message sequences on a few connections; a model predicts every reply.

    The model knows: the envelope rules of wire protocol v1, the data model
    (via the reference validators above), that a producer's newest hello fences
    its older connections, that a seq at or below the producer's highest applied
    seq is acknowledged but not applied, and that an increment taking an hour
    or a UTC day of a series out of int64 refuses the whole batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="tally-fuzz-"))
        self.store = SqliteStore(str(self.dir / "t.db"))
        self.shards = LocalShards(self.store, 3)
        self.service = Service(self.shards, self.store, clock=lambda: CLOCK)
        self.loop = asyncio.new_event_loop()
        self.peers: list[Peer] = []
        self.epochs: dict[str, int] = defaultdict(int)
        self.applied: dict[str, int] = {}  # producer -> highest applied seq
        self.acked: dict[str, list[int]] = defaultdict(list)
        self.durable: dict[str, int] = {}
        # False from a producer's hello until the gateway has seen a seq >= its highest
        # applied one; meanwhile the machine resends only that highest seq, see
        # test_resending_an_old_seq_after_hello_breaks_the_next_batch (a bug)
        self.synced: dict[str, bool] = {}
        self.hours: dict[tuple[Key, int], int] = defaultdict(int)  # the model's counters
        self.steps_ok = True

    def teardown(self) -> None:
        try:
            if self.steps_ok:  # after a failed step the model is behind: report that one
                self.check_totals()
        finally:
            self.loop.close()
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # ---- rules -----------------------------------------------------------

    @initialize()
    def first_connection(self) -> None:
        self.peers.append(Peer(Connection(self.service)))

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        """Mostly a message; now and then a new connection, a checkpoint or an eviction."""
        live = [p for p in self.peers if not p.closed]
        action = data.draw(st.sampled_from(
            ["send"] * 16 + ["connect", "connect", "checkpoint", "checkpoint_and_evict",
                             "check_totals"]),
            label="action")
        if action == "connect" or not live:
            if len(live) < 5:
                self.peers.append(Peer(Connection(self.service)))
        elif action == "send":
            self.send(data, data.draw(st.sampled_from(live), label="connection"))
        else:
            getattr(self, action)()

    def send(self, data: st.DataObject, peer: Peer) -> None:
        if peer.producer is None:
            msg, expect = self.draw_first(data)
        else:
            msg, expect = self.draw_next(data, peer)
        self.steps_ok = False
        reply = self.loop.run_until_complete(peer.conn.handle(msg))
        peer.conn.after_reply()
        self.check_reply(msg, reply)
        event(f"reply {reply['op']} {reply.get('code', '')}".strip())
        expect(peer, reply)
        assert peer.conn.close_after == peer.closed, (msg, reply)
        self.steps_ok = True

    def checkpoint(self) -> None:
        self.shards.checkpoint()
        self.durable.update(self.applied)

    def checkpoint_and_evict(self) -> None:
        """Past months leave shard memory: queries and overflow checks then use the store."""
        self.checkpoint()
        for state in self.shards.states:
            state.evict("2026-11", idle=0)

    def check_totals(self) -> None:
        """Live totals (shards and store merged) equal the model's, per hour and per series."""
        self.steps_ok = False
        run = self.loop.run_until_complete
        for tenant, metric, where in QUERIES:
            want_hours = [0] * (H1 - H0)
            want_series: dict[Key, int] = defaultdict(int)
            for (key, hour), total in self.hours.items():
                t, m, tags = key
                if (t, m) == (tenant, metric) and where.items() <= dict(tags).items():
                    want_hours[hour - H0] += total
                    want_series[key] += total
            got = run(self.service.hourly(tenant, metric, where, H0, H1))
            assert got.tolist() == want_hours, (tenant, metric, where)
            totals: dict[Key, int] = defaultdict(int)
            for sid, v in run(self.service.totals(tenant, metric, where, H0, H1)).items():
                k = parse_series_id(sid)
                totals[(k.tenant, k.metric, k.tags)] += v
            assert {s: v for s, v in totals.items() if v} == {
                s: v for s, v in want_series.items() if v}, (tenant, metric, where)
        self.steps_ok = True

    # ---- messages before hello --------------------------------------------

    def draw_first(self, data: st.DataObject) -> tuple[dict, Any]:
        kind = data.draw(st.sampled_from(
            ["hello"] * 5 + ["bad hello", "junk", "not hello"]), label="first frame")
        if kind == "hello":
            producer = data.draw(st.sampled_from(PRODUCERS), label="producer")
            token = data.draw(st.sampled_from([None, "secret"]))
            msg = {"op": "hello", "v": 1, "token": token, "producer": producer}
            if data.draw(st.booleans()):
                msg["extra"] = data.draw(junk)  # unknown keys are ignored

            def welcome(peer: Peer, reply: dict) -> None:
                assert reply == {"op": "welcome", "v": 1,
                                 "durable_seq": self.durable.get(producer, 0)}
                peer.producer = producer
                if self.durable.get(producer, 0):
                    event("model: welcome after a checkpoint")
                self.epochs[producer] += 1
                peer.epoch = self.epochs[producer]
                self.synced[producer] = False

            return msg, welcome
        if kind == "bad hello":
            msg = data.draw(bad_hellos)
            return msg, self.refused("bad_request", seq=None)
        if kind == "junk":
            # (a junk map that holds a valid seq gets it echoed, as any error does)
            return data.draw(junk_messages), self.refused("bad_request")
        msg = data.draw(st.sampled_from([
            {"op": "ping"},
            {"op": "inc", "seq": 1, "rows": []},
            {"op": "inc", "seq": 7, "rows": [["acme", "hits", None, NOW, 1]]},
        ]))
        return msg, self.refused("bad_request", seq=None, close=True)

    def refused(self, code: str, seq: Any = "any", close: bool = False,
                row: int | None = None) -> Any:
        def check(peer: Peer, reply: dict) -> None:
            assert reply["op"] == "error" and reply["code"] == code, reply
            if seq != "any":
                assert reply["seq"] == seq, reply
            if row is not None:
                assert reply["row"] == row, reply
            if close:
                peer.closed = True
        return check

    # ---- messages after hello ---------------------------------------------

    def draw_next(self, data: st.DataObject, peer: Peer) -> tuple[dict, Any]:
        kind = data.draw(st.sampled_from(
            ["inc"] * 12 + ["ping", "hello", "junk", "unknown op", "event"]), label="frame")
        if kind == "ping":
            return {"op": "ping"}, lambda peer, reply: self.expect(reply == {"op": "pong"}, reply)
        if kind == "hello":
            msg = data.draw(st.just({"op": "hello", "v": 1, "token": None, "producer": "p0"})
                            | bad_hellos)
            return msg, self.refused("bad_request")
        if kind == "junk":
            return data.draw(junk_messages), self.refused("bad_request")
        if kind == "unknown op":
            msg = data.draw(st.fixed_dictionaries(
                {"op": st.sampled_from(["incr", "INC", "", "durable", "ack", "welcome", "pong"])
                 | st.text(max_size=8).filter(lambda s: s not in ("ping", "hello", "inc",
                                                                  "event"))},
                optional={"seq": st.integers(0, 5), "rows": st.just([])}))
            return msg, self.refused("bad_request")
        if kind == "event":
            return self.draw_event(data, peer)
        return self.draw_inc(data, peer)

    @staticmethod
    def expect(ok: bool, reply: dict) -> None:
        assert ok, reply

    def draw_event(self, data: st.DataObject, peer: Peer) -> tuple[dict, Any]:
        """Events for a tenant nobody queries: refused by the built-in rules (a type no rule
        covers, or no channel/sentiment) unless the list is empty, then acknowledged."""
        producer = peer.producer
        assert producer is not None
        seq = self.applied.get(producer, 0) + data.draw(st.integers(1, 2))
        events = data.draw(st.none() | junk | st.lists(
            st.fixed_dictionaries({"type": st.sampled_from(["fuzz.nothing", "message.received"]),
                                   "tenant": st.just("evt"), "ts": tcp_ts}), max_size=3))
        msg = {"op": "event", "seq": seq, "events": events}
        fenced = peer.epoch != self.epochs[producer]

        def check(peer: Peer, reply: dict) -> None:
            if type(events) is not list:
                assert reply["op"] == "error" and reply["code"] == "bad_request", reply
            elif reply["op"] == "ack":  # an empty list: applied (0 increments), seq used
                assert not fenced
                self.applied[producer] = max(self.applied.get(producer, 0), seq)
                self.acked[producer].append(seq)
            else:
                assert reply["op"] == "error", reply
                assert reply["code"] in ("bad_request", "bad_row"), reply
                if fenced and reply["code"] == "bad_request" and "fenced" in reply["message"]:
                    peer.closed = True
            if reply["op"] == "error":
                assert reply["seq"] == seq, reply

        return msg, check

    def draw_inc(self, data: st.DataObject, peer: Peer) -> tuple[dict, Any]:
        producer = peer.producer
        assert producer is not None
        top = self.applied.get(producer, 0)
        seq_kind = data.draw(st.sampled_from(
            ["fresh"] * 12 + ["resend"] * 3 + ["older", "zero", "invalid", "missing"]),
            label="seq")
        if seq_kind in ("resend", "older") and top and not self.synced[producer]:
            seq: Any = top
        elif seq_kind == "resend" and self.acked[producer]:
            seq = data.draw(st.sampled_from(self.acked[producer]))
        elif seq_kind == "older" and top > 1:
            seq = data.draw(st.integers(1, top - 1))
        elif seq_kind == "zero":
            seq = 0
        elif seq_kind == "invalid":
            seq = data.draw(st.sampled_from([-1, 2**63, 2**64 - 1, True, 1.0, "3", [], None]))
        else:
            seq = top + data.draw(st.integers(1, 3))
        msg: dict[str, Any] = {"op": "inc"}
        if seq_kind != "missing":
            msg["seq"] = seq
        ack = data.draw(st.sampled_from(["absent"] * 4 + [None, "received", "durable", "durable"]
                                        + [data.draw(st.sampled_from(
                                            ["bogus", 1, b"received", ["received"]]))]),
                        label="ack")
        if ack != "absent":
            msg["ack"] = ack
        big = data.draw(st.integers(0, 4)) == 0
        rows = data.draw(tcp_rows(big), label="rows")
        form = data.draw(st.sampled_from(
            ["rows"] * 12 + ["columnar"] * 12
            + [data.draw(st.sampled_from(["both", "neither", "rows not a list", "column missing",
                                          "column not bin", "columns disagree"]))]),
            label="form")
        want: tuple[str, Any] = ("batch", None)
        if form in ("rows", "both"):
            msg["rows"] = rows
            want = ref_rows(rows)
        elif form == "rows not a list":
            msg["rows"] = data.draw(st.sampled_from([{}, "rows", 3, b"\x90"]))
        if form in ("columnar", "both", "column missing", "column not bin", "columns disagree"):
            good = [r for r in rows if ref_rows([r])[0] == "ok"]
            cols = to_columns(good, data.draw(st.randoms(use_true_random=False)))
            if form == "columnar" and good and data.draw(st.integers(0, 4)) == 0:
                cols = data.draw(columnar_damage(cols))
            msg.update(zip(("series", "i", "ts", "v"), cols, strict=True))
            want = ref_columnar(*cols)
            if form == "column missing":
                del msg[data.draw(st.sampled_from(["series", "i", "ts", "v"]))]
            elif form == "column not bin":
                msg[data.draw(st.sampled_from(["i", "ts", "v"]))] = [0, 1]
            elif form == "columns disagree":
                msg["v"] = msg["v"] + b"\x00" * 8
                want = ("batch", None)
        n = len(rows) if form == "rows" else len(msg.get("i", b"")) // 4

        envelope_ok = type(seq) is int and 0 <= seq <= MAX_SEQ and seq_kind != "missing"
        if not envelope_ok:
            return msg, self.refused("bad_request", seq=None)
        if ack not in ("absent", None, "received", "durable") or form not in ("rows", "columnar"):
            return msg, self.refused("bad_request", seq=seq)
        if seq == 0:
            return msg, self.refused("bad_request", seq=0)
        if want[0] == "batch":
            return msg, self.refused("bad_request", seq=seq)
        if want[0] == "row":
            return msg, self.refused("bad_row", seq=seq, row=want[1])
        agg: Agg = want[1]
        if peer.epoch != self.epochs[producer]:
            event("model: fenced")
            return msg, self.refused("bad_request", seq=seq, close=True)
        if seq <= top:
            event("model: resent seq")
            def resent(peer: Peer, reply: dict) -> None:
                assert reply == {"op": "ack", "seq": seq, "rows": n}, reply
                if seq == top:
                    self.synced[producer] = True
            return msg, resent
        overflows = self.overflows(agg)
        if overflows:
            event("model: slot overflow")
            return msg, self.refused("bad_row", seq=seq, row=overflows)

        def applied(peer: Peer, reply: dict) -> None:
            assert reply == {"op": "ack", "seq": seq, "rows": n}, reply
            for (key, hour), (total, _, _) in agg.slots.items():
                self.hours[(key, hour)] += total
            self.applied[producer] = seq
            self.acked[producer].append(seq)
            self.synced[producer] = True
            event("model: applied")

        return msg, applied

    def overflows(self, agg: Agg) -> Any:
        """The rows a shard may blame (first rows of aggregates that would leave int64)."""
        days: dict[tuple[Key, int], int] = defaultdict(int)
        for (key, hour), (total, _, _) in agg.slots.items():
            days[(key, hour // 24)] += total
        blamed = set()
        for (key, hour), (total, first, _) in agg.slots.items():
            day = hour // 24
            day_total = days[(key, day)] + sum(
                self.hours.get((key, h), 0) for h in range(day * 24, day * 24 + 24))
            if not (INT64_MIN <= self.hours.get((key, hour), 0) + total <= INT64_MAX
                    and INT64_MIN <= day_total <= INT64_MAX):
                blamed.add(first)
        return Blame(blamed) if blamed else None

    # ---- every reply --------------------------------------------------------

    @staticmethod
    def check_reply(msg: dict, reply: Any) -> None:
        assert type(reply) is dict, reply
        assert reply.get("op") in REPLY_OPS, reply
        if reply["op"] == "error":
            assert reply["code"] in CODES, reply
            assert type(reply["message"]) is str and reply["message"], reply
            assert reply["seq"] is None or reply["seq"] == msg.get("seq"), (msg, reply)
            assert reply["code"] != "internal", reply


class Blame(set):
    """A set of acceptable row indexes (``reply["row"] == Blame`` means membership)."""

    def __eq__(self, other: object) -> bool:
        return other in self

    __hash__ = None  # type: ignore[assignment]


@st.composite
def columnar_damage(draw: st.DrawFn, cols: tuple) -> tuple:
    """One increment made bad, or a bad series entry that nothing points at."""
    series, i, ts, v = cols
    n = len(i) // 4
    k = draw(st.integers(0, n - 1))
    idx = list(struct.unpack(f"<{n}I", i))
    tss = list(struct.unpack(f"<{n}q", ts))
    how = draw(st.sampled_from(["i", "ts", "series", "unreferenced"]))
    if how == "i":
        idx[k] = len(series) + draw(st.integers(0, 2))
    elif how == "ts":
        tss[k] = draw(st.sampled_from([-1, LIMIT + 1]))
    elif how == "series":
        idx[k] = len(series)
        series = [*series, ["acme", "hits", {"Bad": "x"}]]
    else:
        series = [*series, ["", "hits", None]]
    return series, struct.pack(f"<{n}I", *idx), struct.pack(f"<{n}q", *tss), v


bad_hellos = st.sampled_from([
    {"op": "hello", "v": 2, "token": None, "producer": "p0"},
    {"op": "hello", "token": None, "producer": "p0"},
    {"op": "hello", "v": "1", "token": None, "producer": "p0"},
    {"op": "hello", "v": True, "token": None, "producer": "p0"},
    {"op": "hello", "v": 1, "token": 5, "producer": "p0"},
    {"op": "hello", "v": 1, "token": None, "producer": ""},
    {"op": "hello", "v": 1, "token": None},
    {"op": "hello", "v": 1, "token": None, "producer": b"p0"},
    {"op": "hello", "v": 1, "token": None, "producer": "p" * 201},
])
junk_messages = st.dictionaries(
    map_keys.filter(lambda k: k != "op"), junk, max_size=5
) | st.fixed_dictionaries({"op": junk.filter(lambda x: type(x) is not str)},
                          optional={"seq": junk, "rows": junk})

# Shrinking a failing run of this machine replays thousands of sequences (minutes): off
# by default so a failure costs CI seconds; TALLY_FUZZ_SHRINK=1 shrinks it when debugging.
ConnectionMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=35, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
    phases=[Phase.explicit, Phase.generate]
    + ([Phase.shrink] if os.environ.get("TALLY_FUZZ_SHRINK") else []),
)
TestConnectionMachine = ConnectionMachine.TestCase
TestConnectionMachine.__doc__ = ConnectionMachine.__doc__


def test_resending_an_old_seq_after_hello_leaves_the_next_batch_alone(tmp_path: Path) -> None:
    """Guarantee 3 across a reconnect: a resent seq is acked, not applied, and nothing breaks.

    A producer applies seqs 1-3, reconnects (hello), resends seq 1 (acknowledged
    as a duplicate, as DESIGN.md says) and goes on with seq 4, which applies.
    (It was once refused as a shard gap: the duplicate's seq became the gateway's
    ``last_seq``, below the shards' marks.)
    """
    store = SqliteStore(str(tmp_path / "t.db"))
    service = Service(LocalShards(store, 3), store, clock=lambda: CLOCK)
    row = ["acme", "hits", None, NOW - 10, 1]

    async def scenario() -> tuple[list[dict], dict]:
        first, second = Connection(service), Connection(service)
        hello = {"op": "hello", "v": 1, "token": None, "producer": "p"}
        replies = [await first.handle(hello)]
        replies += [await first.handle({"op": "inc", "seq": q, "rows": [row]}) for q in (1, 2, 3)]
        replies.append(await second.handle(hello))
        replies.append(await second.handle({"op": "inc", "seq": 1, "rows": [row]}))
        replies.append(await second.handle({"op": "inc", "seq": 4, "rows": [row]}))
        return replies, await service.totals("acme", "hits", {}, H0, H1)

    try:
        replies, totals = asyncio.run(scenario())
    finally:
        store.close()
    assert replies[5] == {"op": "ack", "seq": 1, "rows": 1}  # a duplicate: acked again
    assert replies[6] == {"op": "ack", "seq": 4, "rows": 1}, replies[6]
    assert dict(totals) == {"acme|hits|": 4}


def test_a_day_total_leaving_int64_is_refused_and_checkpoints_go_on(tmp_path: Path) -> None:
    """An increment that would take a UTC day of a series out of int64 is a bad row.

    Month documents keep day totals (DESIGN.md, "Data model"), so a day is a slot
    too: acknowledging such a batch would make every later checkpoint of its
    shard fail (the store refuses the day total) and nothing would become
    durable again. Within one batch and across batches, checked at ingest.
    """
    store = SqliteStore(str(tmp_path / "t.db"))
    shards = LocalShards(store, 3)
    service = Service(shards, store, clock=lambda: CLOCK)
    h1, h2 = NOW - 7200, NOW - 3600  # two hours of one UTC day

    async def scenario() -> list[dict]:
        conn = Connection(service)
        out = [await conn.handle({"op": "hello", "v": 1, "token": None, "producer": "p"})]
        for seq, rows in enumerate([
            [[*BIG, h1, -1], [*BIG, h2, INT64_MIN]],  # the day leaves int64 within the batch
            [[*BIG, h2, INT64_MIN]],
            [["acme", "hits", None, h1, 5], [*BIG, h1, -1]],  # ... and across batches
            [[*BIG, h1, 7]],
        ], start=1):
            out.append(await conn.handle({"op": "inc", "seq": seq, "rows": rows}))
        return out

    try:
        replies = asyncio.run(scenario())
        assert [(r["op"], r.get("code"), r.get("row")) for r in replies[1:]] == [
            ("error", "bad_row", 1), ("ack", None, None), ("error", "bad_row", 1),
            ("ack", None, None)]
        shards.checkpoint()  # raises if a day total outside int64 reached the store
        run = asyncio.run
        assert run(service.totals("big", "m", {}, H0, H1)) == {"big|m|": INT64_MIN + 7}
        acme = run(service.totals("acme", "hits", {}, H0, H1))
        assert {sid: v for sid, v in acme.items() if v} == {}  # refused with its batch
    finally:
        store.close()
