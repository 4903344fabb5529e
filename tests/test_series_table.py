"""A connection's series table (the ``series`` op): defined once, indexed by ``inc`` frames.

Against the real TCP server (in-process shards over SQLite): exact totals,
the same aggregates as the per-frame table, and every refusal the protocol
documents, with the table unchanged after a refused definition.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inproc import InProcessTally, RawConnection

from tally.client import Connection, ServerError
from tally.wire.columnar import columnar_batch, table_batch
from tally.wire.frames import SeriesTable, parse_message
from tally.wire.registry import SeriesRegistry
from tally.wire.series import series_key

NOW = 1_800_000_000
SERIES = [["acme", "msgs", {"agent": f"a{k}", "channel": "chat"}] for k in range(6)]


def hello(conn: RawConnection, producer: str = "p1") -> None:
    assert conn.request({"op": "hello", "v": 1, "producer": producer})["op"] == "welcome"


def columns(i: list[int], ts: list[int], v: list[int]) -> dict:
    return {"i": np.array(i, "<u4").tobytes(), "ts": np.array(ts, "<i8").tobytes(),
            "v": np.array(v, "<i8").tobytes()}


def test_parse_series_op() -> None:
    assert parse_message({"op": "series", "base": 0, "series": []}) == SeriesTable(0, [])
    for msg, words in [({"op": "series", "series": []}, "base None"),
                       ({"op": "series", "base": -1, "series": []}, "base -1"),
                       ({"op": "series", "base": 0}, "series is missing"),
                       ({"op": "series", "base": 0, "series": {}}, "a dict, not a list")]:
        with pytest.raises(Exception, match=words):
            parse_message(msg)


def test_defined_then_indexed_counts_exactly(tally: InProcessTally) -> None:
    now = int(time.time())
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    with RawConnection(tally.tcp_port) as conn:
        hello(conn)
        assert conn.request({"op": "series", "base": 0, "series": SERIES[:4]}) == {
            "op": "defined", "base": 0, "count": 4}
        assert conn.request({"op": "series", "base": 4, "series": SERIES[4:]})["count"] == 6
        ack = conn.request({"op": "inc", "seq": 1, **columns(
            [0, 5, 5, 2], [now, now, now - 1, now], [1, 10, 100, 1000])})
        assert ack == {"op": "ack", "seq": 1, "rows": 4}
    assert tally.total("acme", "msgs", day) == 1111
    assert tally.total("acme", "msgs", day, where="agent:a5") == 110


def test_refusals_leave_the_table_unchanged(tally: InProcessTally) -> None:
    now = int(time.time())
    with RawConnection(tally.tcp_port) as conn:
        hello(conn)
        # an inc over a table never defined
        err = conn.request({"op": "inc", "seq": 1, **columns([0], [now], [1])})
        assert err["code"] == "bad_request" and "defined no series table" in err["message"]
        # a bad entry refuses the whole definition, naming it
        err = conn.request({"op": "series", "base": 0,
                            "series": [SERIES[0], ["acme", "bad metric!", None]]})
        assert (err["code"], err["row"]) == ("bad_row", 1)
        assert "series[1] is invalid" in err["message"]
        err = conn.request({"op": "series", "base": 0, "series": [SERIES[0], "x"]})
        assert (err["code"], err["row"]) == ("bad_row", 1)
        # base must be the table's length: still 0, nothing was defined
        err = conn.request({"op": "series", "base": 1, "series": [SERIES[1]]})
        assert err["code"] == "bad_request" and "(0 entries)" in err["message"]
        assert conn.request({"op": "series", "base": 0, "series": SERIES[:2]})["count"] == 2
        # an index past the table names its row; a ts too far ahead too
        err = conn.request({"op": "inc", "seq": 2, **columns([0, 1, 2], [now] * 3, [1] * 3)})
        assert (err["code"], err["row"]) == ("bad_row", 2)
        assert "table has 2 entries" in err["message"]
        err = conn.request({"op": "inc", "seq": 3, **columns([1, 0], [now, now + 7200], [1, 1])})
        assert (err["code"], err["row"]) == ("bad_row", 1)
        assert conn.request({"op": "inc", "seq": 4, **columns([1], [now], [5])})["op"] == "ack"
    assert tally.total("acme", "msgs", time.strftime("%Y-%m-%d", time.gmtime(now))) == 5


def test_each_connection_has_its_own_table(tally: InProcessTally) -> None:
    now = int(time.time())
    with RawConnection(tally.tcp_port) as a, RawConnection(tally.tcp_port) as b:
        hello(a, "pa")
        hello(b, "pb")
        a.request({"op": "series", "base": 0, "series": [SERIES[0]]})
        b.request({"op": "series", "base": 0, "series": [SERIES[3], SERIES[0]]})
        assert a.request({"op": "inc", "seq": 1, **columns([0], [now], [7])})["op"] == "ack"
        assert b.request({"op": "inc", "seq": 1, **columns([0, 1], [now] * 2, [1, 2])})[
            "op"] == "ack"
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    assert tally.total("acme", "msgs", day, where="agent:a0") == 9
    assert tally.total("acme", "msgs", day, where="agent:a3") == 1


def test_the_client_connection_defines_and_indexes_its_table(tally: InProcessTally) -> None:
    now = int(time.time())
    with Connection("127.0.0.1", tally.tcp_port, producer="script") as conn:
        assert conn.define_series(SERIES[:3])["count"] == 3
        assert conn.define_series(SERIES[3:])["count"] == 6
        assert conn.send_columnar(None, [5, 0, 5], [now] * 3, [1, 2, 3])["rows"] == 3
        with pytest.raises(ServerError) as refused:  # a bad entry: the table stays as it was
            conn.define_series([["acme", "msgs", {"Bad": "x"}]])
        assert refused.value.code == "bad_row" and conn.table_size == 6
        assert conn.send_columnar([SERIES[2]], [0], [now], [10])["rows"] == 1  # its own table
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    assert tally.total("acme", "msgs", day) == 16
    assert tally.total("acme", "msgs", day, where="agent:a5") == 4


@settings(max_examples=60, deadline=None)
@given(
    table=st.lists(st.integers(0, 5), min_size=1, max_size=8),  # may name a series twice
    incs=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3 * 86400),
                            st.integers(-5, 5)), max_size=40),
)
def test_table_batch_equals_the_per_frame_table(table: list[int], incs: list) -> None:
    """The same increments aggregate to the same sums per (series, hour) either way."""
    incs = [(k % len(table), t, v) for k, t, v in incs]
    i = np.array([k for k, _, _ in incs], "<u4").tobytes()
    ts = np.array([NOW - t for _, t, _ in incs], "<i8").tobytes()
    v = np.array([x for _, _, x in incs], "<i8").tobytes()
    entries = [SERIES[k] for k in table]
    expected = columnar_batch(entries, i, ts, v, NOW)
    registry = SeriesRegistry(shards=3)
    gn = registry.numbers([series_key(*e).sid for e in entries])
    got = table_batch(gn, len(set(gn.tolist())) == len(gn), registry, i, ts, v, NOW)

    def sums(b) -> dict:
        return {(b.sids[int(s)], int(h)): (int(x), int(c), int(f)) for s, h, x, c, f in
                zip(b.series, b.hours, b.values, b.counts, b.first_row, strict=True)}

    assert sums(got) == sums(expected)
    assert got.increments == expected.increments == len(incs)
    if len(got):
        assert registry.sids_of(got.gn).tolist() == list(got.sids)
        # numbered owner shard by owner shard, so a split is slices, equal to selects
        owner = registry.owner[got.gn]
        assert bool((owner[1:] >= owner[:-1]).all())
        per = owner[got.series]
        assert got.partition(owner) == {int(k): got.select(per == k) for k in np.unique(per)}
