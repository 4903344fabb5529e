"""Row frames read by the scanner (wire/row_blocks.py) answer exactly as the general
decoder does: the same batch, or the same refusal naming the same row.

The property test encodes rows by hand with every msgpack encoding a client may
pick (not only the shortest: a str 16 holding one byte, a uint64 holding 1), puts
0x95 bytes (a row's first byte) inside strings and integers, and mixes in what
either path must refuse: floats, bins, ext types, bytes that are not UTF-8, rows
of the wrong length, invalid series, timestamps in the future, values past int64.
"""

from __future__ import annotations

import itertools
import struct
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inproc import RawConnection

from tally.bench.workload import Workload, frame
from tally.wire import frames as wire_frames
from tally.wire import row_blocks as wire_row_blocks
from tally.wire.batches import BadBatch, BadRow, KnownSeries, rows_batch
from tally.wire.frames import FrameDecoder, FrameError
from tally.wire.registry import SeriesRegistry
from tally.wire.row_blocks import RowBlock
from tally.wire.timeslots import FUTURE_TOLERANCE

NOW = 1_764_000_000.5
T = 0x6923_9500  # 2025-11-24: its bytes hold a 0x95


# -- a msgpack encoder that may choose any valid encoding ----------------------------


def enc_str(s: str | bytes, how: int) -> bytes:
    raw = s if isinstance(s, bytes) else s.encode()  # bytes: possibly not UTF-8
    n = len(raw)
    if how == 0 and n < 32:
        return bytes([0xA0 | n]) + raw
    if how <= 1 and n < 256:
        return b"\xd9" + bytes([n]) + raw
    if how <= 2 and n < 65536:
        return b"\xda" + struct.pack(">H", n) + raw
    return b"\xdb" + struct.pack(">I", n) + raw


def enc_int(x: int, how: int) -> bytes:
    """The ``how``-th encoding of ``x`` among those that hold it, shortest first."""
    ways = []
    if 0 <= x < 128:
        ways.append(bytes([x]))
    if -32 <= x < 0:
        ways.append(struct.pack(">b", x))
    for code, fmt, lo, hi in ((0xCC, ">B", 0, 255), (0xCD, ">H", 0, 65535),
                              (0xCE, ">I", 0, 2**32 - 1), (0xCF, ">Q", 0, 2**64 - 1),
                              (0xD0, ">b", -128, 127), (0xD1, ">h", -(2**15), 2**15 - 1),
                              (0xD2, ">i", -(2**31), 2**31 - 1),
                              (0xD3, ">q", -(2**63), 2**63 - 1)):
        if lo <= x <= hi:
            ways.append(bytes([code]) + struct.pack(fmt, x))
    return ways[how % len(ways)]


def enc(x: Any, how: int, str32: bool = True) -> bytes:
    """``x`` in msgpack, each value in an encoding picked by ``how``; ``str32``: a str 32
    (which the scanner leaves to the general decoder) is among the choices."""
    if isinstance(x, bool) or x is None or isinstance(x, float):
        return msgpack.packb(x)
    if isinstance(x, int):
        return enc_int(x, how)
    if isinstance(x, str):
        return enc_str(x, how % 4 if str32 else how % 3)
    if isinstance(x, Raw):
        return x.data
    if isinstance(x, dict):
        items = b"".join(enc(k, how, str32) + enc(v, how + 1, str32) for k, v in x.items())
        n = len(x)
        head = bytes([0x80 | n]) if n < 16 and how % 2 == 0 else b"\xde" + struct.pack(">H", n)
        return head + items
    if isinstance(x, list):
        return array_head(len(x), how) + b"".join(
            enc(e, how + k, str32) for k, e in enumerate(x))
    raise TypeError(x)


class Raw:
    """Bytes put into the encoding as they are (a bin, an ext, a string that is not UTF-8)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def array_head(n: int, how: int) -> bytes:
    if n < 16 and how % 3 == 0:
        return bytes([0x90 | n])
    if n < 65536 and how % 3 != 2:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


def inc_frame(rows_bytes: bytes, extra: bytes = b"", keys: int = 2, seq: int = 7,
              layout: int = 0) -> bytes:
    """``extra`` holds ``keys - 2`` more map entries; ``layout`` puts the rows last (0),
    first (1), or before an ``ack`` and a value full of row-start bytes (2)."""
    head = msgpack.packb("op") + msgpack.packb("inc") + msgpack.packb("seq") \
        + msgpack.packb(seq) + extra
    rows = msgpack.packb("rows") + rows_bytes
    if layout == 0:
        body = bytes([0x80 | (keys + 1)]) + head + rows
    elif layout == 1:
        body = bytes([0x80 | (keys + 1)]) + rows + head
    else:
        tail = msgpack.packb("ack") + msgpack.packb("durable") + msgpack.packb("note") \
            + msgpack.packb(b"\x95\xa4acme\xa1m\xc0\x01\x01" * 3)
        body = bytes([0x80 | (keys + 3)]) + head + rows + tail
    return len(body).to_bytes(4, "big") + body


# -- the comparison -------------------------------------------------------------------


def outcome(msg_or_error: Any, now: float = NOW) -> Any:
    """What a server makes of a decoded frame: the envelope and the batch, or the error."""
    if isinstance(msg_or_error, FrameError):
        return ("frame", msg_or_error.code, msg_or_error.message)
    msg = dict(msg_or_error)
    rows = msg.pop("rows", None)
    try:
        batch = rows_batch(rows, now, KnownSeries())
    except (BadRow, BadBatch) as e:
        return (msg, type(e).__name__, e.message, getattr(e, "row", None))
    return (msg, batch.sids, batch.series.tolist(), batch.hours.tolist(),
            batch.values.tolist(), batch.first_row.tolist(), batch.counts.tolist())


def decode(data: bytes, scan: bool, chunk: int | None = None) -> Any:
    decoder = FrameDecoder(scan_rows=scan)
    try:
        if chunk is None:
            (msg,) = decoder.feed(data)
        else:
            got = [m for k in range(0, len(data), chunk) for m in decoder.feed(data[k:k + chunk])]
            (msg,) = got
        return msg
    except FrameError as e:
        return e


def by_series(msg_or_error: Any, registry: SeriesRegistry | None = None, now: float = NOW
              ) -> Any:
    """What a server makes of a decoded frame, in an order-free form: the envelope and
    each (series, hour)'s value, first row and count; or the error. ``registry``: as a
    gateway builds it (series by gateway number, in the connection's order)."""
    if isinstance(msg_or_error, FrameError):
        return ("frame", msg_or_error.code, msg_or_error.message)
    msg = dict(msg_or_error)
    rows = msg.pop("rows", None)
    try:
        batch = rows_batch(rows, now, KnownSeries(), registry)
    except (BadRow, BadBatch) as e:
        return (msg, type(e).__name__, e.message, getattr(e, "row", None))
    if registry is not None and batch.gn is not None:
        assert list(batch.sids) == list(registry.sids_of(batch.gn))
    sids = list(batch.sids)
    assert len(set(sids)) == len(sids)
    return (msg, batch.increments, {
        (sids[s], h): (v, f, c) for s, h, v, f, c in zip(
            batch.series.tolist(), batch.hours.tolist(), batch.values.tolist(),
            batch.first_row.tolist(), batch.counts.tolist(), strict=True)})


def same_answer(data: bytes, chunk: int | None = None) -> Any:
    """Decode both ways; assert the same outcome, and the same aggregates when the
    gateway's registry names the series; the scanner's message."""
    scanned, plain = decode(data, True, chunk), decode(data, False)
    assert outcome(scanned) == outcome(plain)
    assert by_series(scanned, SeriesRegistry(4)) == by_series(plain)
    return scanned


@pytest.fixture
def scan_every_frame(monkeypatch) -> Iterator[None]:
    """Small frames too (the server scans only frames of 4 KiB and more)."""
    monkeypatch.setattr(wire_frames, "SCAN_ROWS_FROM", 0)
    yield


# -- properties ------------------------------------------------------------------------

VALID_TENANTS = ["acme", "x" * 40, "a-b_c", "t" * 64]
VALID_METRICS = ["m", "orders.created", "y" * 33, "Z:z-9"]
TAG_KEYS = ["channel", "agent", "region", "_k"]
TAG_VALUES = ["email", "\u0095", "z" * 31, "w" * 200, "", "a|b", "caf\u00e9"]
VALID_TAGS = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(TAG_KEYS), st.sampled_from(TAG_VALUES), max_size=4),
    st.dictionaries(st.from_regex(r"t[0-9]{1,2}", fullmatch=True), st.just("v"),
                    min_size=15, max_size=16),
)
VALID_TS = st.one_of(st.just(T), st.integers(0, int(NOW) + FUTURE_TOLERANCE))
VALID_VALUES = st.one_of(st.integers(0, 3), st.just(0x95), st.just(-0x95),
                         st.integers(-(2**63), 2**63 - 1))


def valid_row(draw: Any) -> list:
    return [draw(st.sampled_from(VALID_TENANTS)), draw(st.sampled_from(VALID_METRICS)),
            draw(VALID_TAGS), draw(VALID_TS), draw(VALID_VALUES)]


def any_row(draw: Any) -> list:
    """Mostly valid; any part may be a bad one."""
    row = valid_row(draw)
    k = draw(st.integers(0, 9))
    if k < 5:
        row[k] = draw(st.sampled_from([
            ["", "bad tenant!", "t" * 300, "caf\u00e9"],
            ["m\u0095", "m" * 70000, ""],
            [{"K": "v"}, {"k\u0095": "v"}, {f"t{n}": "v" for n in range(17)},
             {"k": "v" * 201}],
            [int(NOW) + FUTURE_TOLERANCE + 1, -1, 2**63],
            [2**63, 2**64 - 1],
        ][k]))
    return row


ODD_ROWS = [
    ["acme", "m", None, float(T), 1],  # float ts
    ["acme", "m", None, T, 1.0],  # float value
    [Raw(msgpack.packb(b"acme")), "m", None, T, 1],  # bin tenant
    [Raw(b"\xa2\xff\xfe"), "m", None, T, 1],  # not UTF-8
    ["acme", "m", {"k": Raw(b"\xa1\x80")}, T, 1],  # a tag value that is not UTF-8
    ["acme", "m", None, Raw(b"\xd6\xff\x00\x00\x00\x00"), 1],  # the timestamp ext
    ["acme", "m", None, T],  # 4 fields
    ["acme", "m", None, T, 1, 2],  # 6 fields
    ["acme", "m", [], T, 1],  # tags a list
    ["acme", "m", {"k": 1}, T, 1],  # a tag value an int
    ["acme", "m", {Raw(msgpack.packb(1)): "v"}, T, 1],  # a tag key an int
    ["acme", "m", None, True, 1],  # bool ts
    Raw(msgpack.packb("not a row")),
    Raw(b"\xc1"),  # never used in msgpack
]


def encoded(draw: Any, rows: list, scannable: bool) -> bytes:
    """``scannable``: each row a fixarray (as every msgpack library writes 5 items) and no
    str 32; otherwise any encoding."""
    rows = rows * draw(st.integers(1, 3))
    how = draw(st.integers(0, 11))

    def row(r: Any, how: int) -> bytes:
        if isinstance(r, Raw):
            return r.data
        if scannable:
            return b"\x95" + b"".join(enc(e, how + k, False) for k, e in enumerate(r))
        return enc(r, how)

    return inc_frame(array_head(len(rows), how) + b"".join(
        row(r, how + k * draw(st.integers(0, 3))) for k, r in enumerate(rows)),
        layout=draw(st.integers(0, 2)))


@st.composite
def valid_frames(draw: Any) -> bytes:
    """Good rows in any encoding the scanner reads."""
    return encoded(draw, [valid_row(draw) for _ in range(draw(st.integers(1, 12)))], True)


@st.composite
def any_frames(draw: Any) -> bytes:
    rows = [any_row(draw) for _ in range(draw(st.integers(1, 12)))]
    if draw(st.booleans()):
        rows.insert(draw(st.integers(0, len(rows))), draw(st.sampled_from(ODD_ROWS)))
    return encoded(draw, rows, draw(st.booleans()))


PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def scanning_every_frame(test: Any) -> Any:
    """The property tests' own form of the fixture (hypothesis runs them many times)."""
    def run(data: bytes) -> None:
        wire_frames.SCAN_ROWS_FROM, before = 0, wire_frames.SCAN_ROWS_FROM
        try:
            test(data)
        finally:
            wire_frames.SCAN_ROWS_FROM = before
    run.__name__ = test.__name__
    return run


@PROPERTY
@given(valid_frames())
@scanning_every_frame
def test_good_rows_in_any_encoding_are_read_as_a_block_with_the_same_batch(data: bytes) -> None:
    assert type(same_answer(data)["rows"]) is RowBlock


@PROPERTY
@given(any_frames())
@scanning_every_frame
def test_any_rows_answer_as_decoded_ones(data: bytes) -> None:
    same_answer(data)


# -- what takes the fast path, and what it gives ---------------------------------------


def test_a_frame_of_good_rows_is_read_as_a_block_with_the_same_batch(scan_every_frame) -> None:
    rows = [["acme", "orders", {"channel": "email", "k": "\u0095"}, T - k * 3000, k % 5]
            for k in range(300)]
    rows += [["acme", "orders", None, T, 2**40], ["b-e", "m", {}, 0x95, 0x95]]
    msg = same_answer(inc_frame(msgpack.packb(rows)))
    assert type(msg["rows"]) is RowBlock
    assert len(msg["rows"]) == 302
    assert msg["rows"].rows() == rows


def test_tags_in_another_order_are_one_series(scan_every_frame) -> None:
    rows = [["acme", "m", {"a": "1", "b": "2"}, T, 1], ["acme", "m", {"b": "2", "a": "1"}, T, 2]]
    msg = same_answer(inc_frame(msgpack.packb(rows)))
    block = msg["rows"]
    assert type(block) is RowBlock and block.sids == ["acme|m|a=1,b=2"]
    assert rows_batch(block, NOW).values.tolist() == [3]
    numbered = rows_batch(block, NOW, registry=SeriesRegistry(4))
    assert list(numbered.sids) == ["acme|m|a=1,b=2"] and numbered.values.tolist() == [3]


def test_the_bench_frames_are_blocks_and_agree(scan_every_frame) -> None:
    work = Workload(300, now=int(NOW))
    for seq, chunk in enumerate(work.row_chunks(2000, distinct=2), 1):
        assert type(same_answer(frame(chunk, seq))["rows"]) is RowBlock


def test_a_frame_arriving_in_pieces_is_read_the_same(scan_every_frame) -> None:
    rows = [["acme", "m", {"k": str(k % 7)}, T, 1] for k in range(500)]
    data = inc_frame(msgpack.packb(rows))
    for chunk in (1, 1000, len(data) - 1):
        assert type(same_answer(data, chunk)["rows"]) is RowBlock


def test_refusals_name_the_same_row(scan_every_frame) -> None:
    good = [["acme", "m", {"k": "v"}, T, 1]] * 50
    cases = {
        "future ts": ["acme", "m", None, int(NOW) + FUTURE_TOLERANCE + 1, 1],
        "negative ts": ["acme", "m", None, -1, 1],
        "bad tenant": ["no spaces allowed", "m", None, T, 1],
        "value past int64": ["acme", "m", None, T, 2**64 - 1],
    }
    for name, bad in cases.items():
        got = outcome(same_answer(inc_frame(msgpack.packb([*good, bad, *good]))))
        assert got[1] == "BadRow" and got[3] == 50, (name, got)
    overflow = [["acme", "m", None, T, 2**62]] * 3  # the second takes the hour past int64
    msg = same_answer(inc_frame(msgpack.packb([*good, *overflow])))
    assert type(msg["rows"]) is RowBlock  # found by the block's own aggregation
    got = outcome(msg)
    assert got[1:] == ("BadRow", got[2], 51) and "outside int64" in got[2]


def test_bytes_after_the_frames_map_are_the_same_bad_frame(scan_every_frame) -> None:
    # the scanner finds where the rows end; whatever follows must still be read whole
    rows = msgpack.packb([["acme", "m", None, T, 1]] * 3)
    for layout in (0, 1, 2):
        good = inc_frame(rows, layout=layout)
        body = good[4:] + b"\x95"  # one more byte after the map: a row's first byte
        scanned = same_answer(len(body).to_bytes(4, "big") + body)
        assert isinstance(scanned, FrameError) and scanned.code == "bad_frame"
        assert type(same_answer(good)["rows"]) is RowBlock


def test_a_row_hidden_inside_a_bad_first_row_is_not_read(scan_every_frame) -> None:
    """Row 0's tenant is a bin holding the start of a row which, read on into row 0's own
    metric, tags, ts and value, ends exactly where row 1 begins."""
    hidden = b"\x95" + enc_str("acme", 0)
    row0 = b"\x95" + b"\xc4" + bytes([len(hidden)]) + hidden + enc(["m", None, T, 1], 0)[1:]
    rest = b"".join(enc(["acme", "m", None, T, 2], 0) for _ in range(3))
    got = outcome(same_answer(inc_frame(b"\x94" + row0 + rest)))
    assert got[1:] == ("BadRow", got[2], 0) and "tenant" in got[2], got


def test_broken_msgpack_is_the_same_bad_frame(scan_every_frame) -> None:
    good = enc([["acme", "m", None, T, 1]] * 3, 0)[1:]
    for rows in (b"\x94" + good,  # a row fewer than said
                 b"\x94" + good + enc_str(b"\xff", 0),  # not UTF-8, outside any row
                 b"\x93" + good + b"\x00"):  # a byte after the map
        got = outcome(same_answer(inc_frame(rows)))
        assert got[0] == "frame" and got[1] == "bad_frame", got


def test_a_second_rows_key_and_rows_that_are_not_a_list(scan_every_frame) -> None:
    rows = msgpack.packb([["acme", "m", None, T, 1]])
    twice = inc_frame(rows, msgpack.packb("rows") + rows, keys=3)
    assert outcome(same_answer(twice))[1] == ["acme|m|"]
    assert same_answer(inc_frame(msgpack.packb("rows!")))["rows"] == "rows!"


def test_series_seen_before_and_equal_hashes_of_other_bytes(monkeypatch,
                                                            scan_every_frame) -> None:
    """With every hash equal to the length, series of one length collide: the bytes decide."""
    monkeypatch.setattr(wire_row_blocks, "_MIX", np.zeros_like(wire_row_blocks._MIX))
    decoder = FrameDecoder(scan_rows=True)
    known = KnownSeries()
    totals: dict[str, int] = {}
    for seq in range(1, 4):
        rows = [["acme", "m", {"k": f"v{(k * seq) % 10}"}, T, k] for k in range(40)]
        (msg,) = decoder.feed(inc_frame(msgpack.packb(rows)))
        assert type(msg["rows"]) is RowBlock
        batch = rows_batch(msg["rows"], NOW, known)
        assert batch == rows_batch(rows, NOW)
        for sid, value in zip(batch.sids, np.bincount(batch.series, batch.values,
                                                      len(batch.sids)).tolist(), strict=True):
            totals[sid] = totals.get(sid, 0) + int(value)
    assert sum(totals.values()) == 3 * sum(range(40))
    # one series per frame: no collision inside a frame, so each is kept by its hash,
    # and the next frame's series of the same length finds the other's entry
    for seq, value in enumerate("abcd", 10):
        rows = [["acme", "m", {"k": value}, T, seq]] * 3
        (msg,) = decoder.feed(inc_frame(msgpack.packb(rows)))
        assert rows_batch(msg["rows"], NOW, known).sids == [f"acme|m|k={value}"]


def test_series_new_to_a_connection_come_out_as_the_general_path_gives_them(
        scan_every_frame) -> None:
    # frames that bring series sorting before, between and after known ones give the
    # general path's batch, and by gateway number the same aggregates, while the
    # registry, filled by other connections too, starts over (its holders number their
    # series again)
    decoder = FrameDecoder(scan_rows=True)
    registry = SeriesRegistry(4, limit=600)
    rnd = np.random.default_rng(5)
    for seq in range(1, 9):
        registry.numbers([f"other|m|k=v{seq}-{n}" for n in range(90)])
        names = rnd.choice(400, 60, replace=False) * 7 % 401
        rows = [["acme", "m", {"k": f"v{n}", "z": "1" if n % 3 else "2"}, T, int(n % 5)]
                for n in names.tolist() * 2]
        (msg,) = decoder.feed(inc_frame(msgpack.packb(rows), seq=seq))
        assert type(msg["rows"]) is RowBlock
        batch = rows_batch(msg["rows"], NOW)
        assert batch.sids == sorted(batch.sids)
        assert batch == rows_batch(rows, NOW)
        assert by_series(msg, registry) == by_series({**msg, "rows": rows})
        numbered = rows_batch(msg["rows"], NOW, registry=registry)
        assert numbered.gn_epoch == registry.epoch
        assert list(registry.sids_of(numbered.gn)) == list(numbered.sids)
    assert registry.epoch >= 2


class CountingDict(dict):
    gets = 0

    def get(self, *args: Any) -> Any:
        CountingDict.gets += 1
        return super().get(*args)


def test_known_series_are_found_by_the_table_without_a_python_step(scan_every_frame) -> None:
    # the second frame names the same series with other ts and values: every one is
    # found in the numpy table (hashes of its bytes alone), none by the dict
    decoder = FrameDecoder(scan_rows=True)
    tags = [{"agent": f"a{n:03d}", "channel": "email" if n % 2 else "sms"} for n in range(50)]
    for seq, ts in ((1, T - 3600), (2, T - 7)):
        rows = [["acme", "m", tags[n % 50], ts - n, n % 7 + 200 * seq] for n in range(300)]
        if seq == 2:
            decoder._series.by_bytes = CountingDict(decoder._series.by_bytes)  # noqa: SLF001
        (msg,) = decoder.feed(inc_frame(msgpack.packb(rows), seq=seq))
        assert rows_batch(msg["rows"], NOW) == rows_batch(rows, NOW)
    assert CountingDict.gets == 0


def test_long_series_and_a_full_cache(scan_every_frame) -> None:
    decoder = FrameDecoder(scan_rows=True)
    decoder._series.limit = 3  # noqa: SLF001 - start over mid-stream
    registry = SeriesRegistry(4)
    for seq in range(1, 5):
        # series of ~10, ~130 (hashed, not kept in the table) and ~310 bytes (by dict)
        rows = [["acme", "m", {"k": "v" * n, "j": "w" * n}, T, 1]
                for n in (1, 60, 150, 1, seq, 150)]
        (msg,) = decoder.feed(inc_frame(msgpack.packb(rows)))
        assert type(msg["rows"]) is RowBlock
        assert rows_batch(msg["rows"], NOW) == rows_batch(rows, NOW)
        assert by_series(msg, registry) == by_series({**msg, "rows": rows})


def test_one_series_in_ever_new_tag_orders_does_not_grow_the_cache(scan_every_frame) -> None:
    decoder = FrameDecoder(scan_rows=True)
    decoder._series.limit = 10  # noqa: SLF001
    keys = [f"k{n}" for n in range(4)]
    for order in itertools.permutations(keys):  # 24 orders of the same tags
        tags = {k: "v" for k in order}
        (msg,) = decoder.feed(inc_frame(msgpack.packb([["acme", "m", tags, T, 1]] * 20)))
        assert rows_batch(msg["rows"], NOW).sids == ["acme|m|" + ",".join(
            f"{k}=v" for k in keys)]
        assert len(decoder._series.by_bytes) <= 10  # noqa: SLF001


def test_strings_full_of_row_start_bytes_go_to_the_general_decoder(scan_every_frame) -> None:
    """0x95 starts a row; U+5555 is e5 95 95 in UTF-8: a candidate row at each 0x95 of
    such a tag value would cost more memory than the frame is worth, so the general
    decoder reads it."""
    rows = [["acme", "m", {"k": "\u5555" * 60}, T, 1]] * 30
    msg = same_answer(inc_frame(msgpack.packb(rows)))
    assert type(msg["rows"]) is list


def test_small_frames_and_other_ops_are_decoded_as_they_were() -> None:
    small = inc_frame(msgpack.packb([["acme", "m", None, T, 1]]))
    assert type(decode(small, True)["rows"]) is list
    big_event = wire_frames.encode_frame({"op": "event", "seq": 1, "events": [],
                                          "rows": [["acme", "m", None, T, 1]] * 400})
    assert type(decode(big_event, True)["rows"]) is list


# -- through a server ---------------------------------------------------------------------


def test_a_server_counts_scanned_frames_exactly_and_names_a_bad_row(tally) -> None:
    now = int(time.time())
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    rows = [["acme", "scan.rows", {"k": str(k % 13), "x": "\u0095"}, now - 60, 1 + k % 3]
            for k in range(3000)]
    expected = sum(r[4] for r in rows)
    bad = [*rows[:2000], ["acme", "scan.rows", None, now + 10 * FUTURE_TOLERANCE, 1], *rows]
    with RawConnection(tally.tcp_port) as c:
        assert c.request({"op": "hello", "v": 1, "token": None, "producer": "p"})["op"] \
            == "welcome"
        data = inc_frame(msgpack.packb(rows))
        c.send(data[:5000])
        c.send(data[5000:])
        assert c.receive() == {"op": "ack", "seq": 7, "rows": 3000}
        answer = c.request(inc_frame(msgpack.packb(bad), seq=8))
        assert answer["op"] == "error" and answer["code"] == "bad_row" and answer["row"] == 2000
    assert tally.total("acme", "scan.rows", day) == expected
