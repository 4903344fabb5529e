"""The frame codec and the protocol envelope (wire protocol v1).

The decoder is fed hostile and arbitrarily split input here because on a real
socket chunk boundaries are arbitrary and the peer may be anything.
"""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.wire.frames import (
    DEFAULT_MAX_FRAME,
    Events,
    FrameDecoder,
    FrameError,
    Hello,
    Inc,
    Ping,
    ProtocolError,
    encode_frame,
    parse_message,
)


def frame_of(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def decode_error(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> FrameError:
    with pytest.raises(FrameError) as info:
        FrameDecoder(max_frame).feed(data)
    return info.value


# -- framing -------------------------------------------------------------------------


def test_encode_frame_is_big_endian_length_and_msgpack() -> None:
    msg = {"op": "inc", "seq": 1, "i": b"\x01\x00\x00\x00"}
    data = encode_frame(msg)
    body = msgpack.packb(msg, use_bin_type=True)
    assert data == len(body).to_bytes(4, "big") + body
    assert FrameDecoder().feed(data) == [msg]
    assert type(FrameDecoder().feed(data)[0]["i"]) is bytes  # bin stays bytes


def test_many_frames_in_one_chunk_in_order() -> None:
    msgs = [{"op": "ping", "n": k} for k in range(50_000)]
    decoder = FrameDecoder()
    assert decoder.feed(b"".join(encode_frame(m) for m in msgs)) == msgs
    assert decoder.pending == 0


def test_byte_at_a_time_and_pending() -> None:
    data = encode_frame({"op": "ping"}) + encode_frame({"op": "hello", "v": 1})
    first_len = len(encode_frame({"op": "ping"}))
    decoder = FrameDecoder()
    out = []
    for k in range(len(data)):
        out += decoder.feed(data[k : k + 1])
        consumed = k + 1
        expected = consumed if consumed < first_len else consumed - first_len
        if consumed == len(data):
            expected = 0
        assert decoder.pending == expected
    assert out == [{"op": "ping"}, {"op": "hello", "v": 1}]


def test_accepts_bytearray_and_memoryview_chunks() -> None:
    data = encode_frame({"op": "ping"}) * 3
    decoder = FrameDecoder()
    assert decoder.feed(bytearray(data[:5])) == []
    assert decoder.feed(memoryview(data)[5:]) == [{"op": "ping"}] * 3


def test_non_string_keys_are_kept() -> None:
    assert FrameDecoder().feed(frame_of(msgpack.packb({1: "x", "op": "ping"}))) == [
        {1: "x", "op": "ping"}
    ]


def test_zero_length_frame_is_bad_frame() -> None:
    err = decode_error(b"\x00\x00\x00\x00")
    assert err.code == "bad_frame"
    assert "0 bytes" in err.message


def test_too_large_from_the_prefix_alone() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameError) as info:
        decoder.feed(struct.pack(">I", 2**31))  # claims 2 GiB, not one body byte sent
    assert info.value.code == "too_large"
    assert str(2**31) in info.value.message
    assert decoder.pending == 0


def test_too_large_when_the_prefix_arrives_in_pieces() -> None:
    decoder = FrameDecoder(max_frame=100)
    prefix = struct.pack(">I", 101)
    for k in range(3):
        assert decoder.feed(prefix[k : k + 1]) == []
    assert decoder.pending == 3
    with pytest.raises(FrameError) as info:
        decoder.feed(prefix[3:] + b"x" * 50)
    assert info.value.code == "too_large"
    assert decoder.pending == 0


def test_max_frame_is_inclusive() -> None:
    body = msgpack.packb({"op": "ping", "pad": "x" * 20})
    assert FrameDecoder(max_frame=len(body)).feed(frame_of(body)) == [msgpack.unpackb(body)]
    assert decode_error(frame_of(body), max_frame=len(body) - 1).code == "too_large"


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b"\xc1", "not valid msgpack"),  # never-used type byte
        (b"\x81\xa2op", "not valid msgpack"),  # truncated map
        (msgpack.packb({"op": "ping"}) + b"\x00", "after its msgpack map"),
        (msgpack.packb([1, 2]), "list"),
        (msgpack.packb(7), "int"),
        (msgpack.packb("op"), "str"),
        (msgpack.packb({"op": msgpack.ExtType(5, b"ab")}), "ext types"),
        (msgpack.packb({"op": msgpack.Timestamp(1, 0)}), "ext types"),
        (b"\x81\xa2op\xa2\xff\xfe", "not UTF-8"),
        (b"\x81\xa2\xff\xfe\xa4ping", "not UTF-8"),  # key too
        (b"\x81\x91\x01\x02", "not valid msgpack"),  # unhashable (array) key
        (b"\x91" * 5000, "not valid msgpack"),  # nesting beyond msgpack's stack
        (b"\xdd\xff\xff\xff\xff", "not valid msgpack"),  # array claiming 4 G entries
    ],
)
def test_bad_payloads_are_bad_frame(payload: bytes, words: str) -> None:
    err = decode_error(frame_of(payload))
    assert err.code == "bad_frame"
    assert words in err.message


def test_after_an_error_the_decoder_refuses_input() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameError):
        decoder.feed(frame_of(b"\xc1"))
    with pytest.raises(FrameError) as info:
        decoder.feed(encode_frame({"op": "ping"}))
    assert info.value.code == "bad_frame"


def test_messages_before_the_bad_frame_travel_with_the_error() -> None:
    good = [{"op": "ping"}, {"op": "inc", "seq": 1, "rows": []}]
    data = b"".join(encode_frame(m) for m in good) + frame_of(b"\xc1") + encode_frame(good[0])
    with pytest.raises(FrameError) as info:
        FrameDecoder().feed(data)
    assert info.value.messages == good
    assert info.value.frame() == {
        "op": "error",
        "seq": None,
        "code": "bad_frame",
        "message": info.value.message,
    }


def test_decoder_rejects_a_silly_max_frame() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame=0)
    with pytest.raises(ValueError):
        FrameDecoder(max_frame=2**32)


# -- property tests --------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
keys = st.text(max_size=8) | st.integers(-(2**63), 2**64 - 1)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
messages = st.dictionaries(keys, values, max_size=6)


@st.composite
def split_stream(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@given(st.lists(messages, max_size=8), st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_at_arbitrary_chunk_boundaries(msgs: list[dict], data: st.DataObject) -> None:
    frames = [encode_frame(m) for m in msgs]
    stream = b"".join(frames)
    ends = []
    total = 0
    for f in frames:
        total += len(f)
        ends.append(total)
    decoder = FrameDecoder()
    out: list[dict] = []
    consumed = 0
    for chunk in data.draw(split_stream(stream)):
        out += decoder.feed(chunk)
        consumed += len(chunk)
        last_end = max([e for e in ends if e <= consumed], default=0)
        assert decoder.pending == consumed - last_end
    assert out == msgs
    assert decoder.pending == 0


def _feed_all(chunks: list[bytes], max_frame: int = DEFAULT_MAX_FRAME) -> None:
    decoder = FrameDecoder(max_frame)
    try:
        for chunk in chunks:
            for msg in decoder.feed(chunk):
                assert type(msg) is dict
    except FrameError as exc:
        assert exc.code in ("bad_frame", "too_large")
        with pytest.raises(FrameError):
            decoder.feed(b"")


@given(st.binary(max_size=300), st.data())
@settings(max_examples=500)
def test_arbitrary_bytes_raise_only_frame_error(raw: bytes, data: st.DataObject) -> None:
    _feed_all(data.draw(split_stream(raw)), max_frame=data.draw(st.integers(1, 400)))


@given(st.lists(st.binary(min_size=1, max_size=60), max_size=6), st.data())
@settings(max_examples=500)
def test_arbitrary_payloads_raise_only_frame_error(payloads: list[bytes], d: st.DataObject) -> None:
    # Well-framed garbage reaches the msgpack decoder far more often than raw bytes.
    _feed_all(d.draw(split_stream(b"".join(frame_of(p) for p in payloads))))


@given(messages, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
@settings(max_examples=500)
def test_mutated_frames_raise_only_frame_error(msg: dict, flips: list[tuple[int, int]]) -> None:
    data = bytearray(encode_frame(msg))
    for at, byte in flips:
        data[4 + at % max(1, len(data) - 4)] = byte
    _feed_all([bytes(data)])


# -- the protocol envelope ---------------------------------------------------------------


def bad_request(msg: dict) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_message(msg)
    assert info.value.code == "bad_request"
    return info.value


def test_hello() -> None:
    assert parse_message({"op": "hello", "v": 1, "token": "s3", "producer": "p"}) == Hello(
        1, "s3", "p"
    )
    assert parse_message({"op": "hello", "v": 1, "producer": "p"}) == Hello(1, None, "p")
    assert parse_message({"op": "hello", "v": 1, "token": None, "producer": "x" * 200}).producer


@pytest.mark.parametrize(
    ("msg", "words"),
    [
        ({"v": 2, "producer": "p"}, "unsupported protocol version 2"),
        ({"v": True, "producer": "p"}, "unsupported protocol version"),
        ({"v": 1.0, "producer": "p"}, "unsupported protocol version"),
        ({"producer": "p"}, "unsupported protocol version"),
        ({"v": 1, "token": 5, "producer": "p"}, "token"),
        ({"v": 1}, "producer"),
        ({"v": 1, "producer": ""}, "producer"),
        ({"v": 1, "producer": b"p"}, "producer"),
        ({"v": 1, "producer": "x" * 201}, "producer is 201 characters"),
    ],
)
def test_bad_hello(msg: dict, words: str) -> None:
    err = bad_request({"op": "hello", **msg})
    assert words in err.message
    assert err.seq is None


def test_inc_rows_and_ack() -> None:
    rows = [["acme", "m", None, 1, 1]]
    assert parse_message({"op": "inc", "seq": 0, "rows": rows}) == Inc(
        0, "received", rows, None, None, None, None
    )
    msg = parse_message({"op": "inc", "seq": 7, "ack": "durable", "rows": []})
    assert isinstance(msg, Inc)
    assert (msg.seq, msg.ack, msg.rows) == (7, "durable", [])
    assert parse_message({"op": "inc", "seq": 7, "ack": None, "rows": []}).ack == "received"


def test_inc_columnar() -> None:
    msg = parse_message(
        {"op": "inc", "seq": 3, "series": [["a", "m", None]], "i": b"", "ts": b"", "v": b""}
    )
    assert msg == Inc(3, "received", None, [["a", "m", None]], b"", b"", b"")


@pytest.mark.parametrize(
    ("msg", "words", "seq"),
    [
        ({"rows": []}, "seq is missing", None),
        ({"seq": -1, "rows": []}, "seq -1", None),
        ({"seq": True, "rows": []}, "seq True", None),
        ({"seq": 1.0, "rows": []}, "seq 1.0", None),
        ({"seq": "1", "rows": []}, "seq '1'", None),
        ({"seq": 2**63, "rows": []}, "seq", None),
        ({"seq": 4, "ack": "eventually", "rows": []}, "ack 'eventually'", 4),
        ({"seq": 4, "ack": 1, "rows": []}, "ack 1", 4),
        ({"seq": 4}, "needs rows", 4),
        ({"seq": 4, "rows": {"a": 1}}, "rows must be a list", 4),
        ({"seq": 4, "rows": [], "series": []}, "both rows and columnar series", 4),
        ({"seq": 4, "series": [], "i": b"", "ts": b""}, "lacks v", 4),
        ({"seq": 4, "i": "", "ts": b"", "v": b""}, "i must be msgpack bin", 4),
        ({"seq": 4, "series": {}, "i": b"", "ts": b"", "v": b""}, "series must be a list", 4),
        ({"seq": 4, "series": [], "i": "", "ts": b"", "v": b""}, "i must be msgpack bin", 4),
        ({"seq": 4, "series": [], "i": b"", "ts": b"", "v": [1]}, "v must be msgpack bin", 4),
    ],
)
def test_bad_inc(msg: dict, words: str, seq: int | None) -> None:
    err = bad_request({"op": "inc", **msg})
    assert words in err.message
    assert err.seq == seq
    assert err.frame()["seq"] == seq


def test_events() -> None:
    events = [{"type": "message.received", "tenant": "acme", "ts": 1}]
    assert parse_message({"op": "event", "seq": 2, "events": events}) == Events(
        2, "received", events
    )
    assert "events is missing" in bad_request({"op": "event", "seq": 2}).message
    err = bad_request({"op": "event", "seq": 2, "events": {"type": "x"}})
    assert "not a list" in err.message
    assert err.seq == 2


def test_ping() -> None:
    assert parse_message({"op": "ping"}) == Ping()
    assert isinstance(parse_message({"op": "ping", "extra": 1}), Ping)


def test_op_errors_carry_a_readable_seq() -> None:
    err = bad_request({"seq": 5})
    assert (err.message, err.seq) == ("frame has no op", 5)
    assert "op must be a string" in bad_request({"op": 1}).message
    err = bad_request({"op": "incr", "seq": 9})
    assert "unknown op 'incr'" in err.message
    assert err.seq == 9
    assert bad_request({"op": "incr", "seq": -9}).seq is None


def test_protocol_error_frame() -> None:
    err = ProtocolError("bad_row", "row 3: value 1.5 is a float; values are int64", 12, row=3)
    assert err.frame() == {
        "op": "error",
        "seq": 12,
        "code": "bad_row",
        "message": "row 3: value 1.5 is a float; values are int64",
        "row": 3,
    }
    assert str(err) == err.message
    assert ProtocolError("x", "y", op="z").frame()["op"] == "error"
