"""The client library (tally.client): exactly-once increments end to end.

Two layers, tested apart:

- ``ProducerCore`` is sans-I/O, so the bytes of a batch, seq order, the size,
  byte and linger triggers, the pending bound and every answer of the
  protocol are checked here as pure functions, with a fake clock.
- The shells (a thread, an asyncio task) are run against ``Peer``: a real
  TCP server in this file speaking wire protocol v1 through ``wire.frames``
  and validating batches with ``wire.batches``, as tally's gateway does. It
  deduplicates by (producer, seq) the way tally's shards do (a per-producer
  mark; a seq at or below it is acknowledged again, not applied; after an
  ``overloaded`` refusal, later seqs wait for the refused one), checkpoints,
  sends ``durable`` frames, and misbehaves on purpose: it drops connections
  before a frame, after applying it but before answering, halfway through an
  answer, refuses batches as overloaded, and crashes (losing what was not
  checkpointed). The client's totals must come out exact anyway.

Tests against a real ``tally serve`` (``ack: "durable"``, ``durable`` frames,
``welcome.durable_seq``) belong in test_e2e_serve.py once the server has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.client import (
    AsyncTallyClient,
    BatchRejected,
    ClientClosed,
    ClientFailed,
    ErrorCode,
    InvalidSeries,
    ProducerConflict,
    ProtocolMismatch,
    TallyClient,
    TallyTimeout,
    Unauthorized,
)
from tally.client.batching import FRAME_OVERHEAD
from tally.client.core import ProducerCore, backoff_delay, initial_seq
from tally.client.errors import Broken
from tally.client.validation import SeriesCache, prepare_event, prepare_increment
from tally.wire.batches import BadBatch, BadRow
from tally.wire.columnar import columnar_batch
from tally.wire.frames import (
    DEFAULT_MAX_FRAME,
    FrameDecoder,
    FrameError,
    Inc,
    ProtocolError,
    encode_frame,
    parse_message,
)
from tally.wire.series import series_id

NOW = int(time.time())
CACHE = SeriesCache()


def add(
    core: ProducerCore,
    tenant: str,
    metric: str,
    value: int = 1,
    ts: int | None = NOW,
    tags: dict[str, str] | None = None,
    now: float = 0.0,
) -> bool:
    return core.add(*prepare_increment(CACHE, tenant, metric, value, ts, tags, time.time()), now)


def decode(frame: bytes) -> dict[str, Any]:
    [msg] = FrameDecoder().feed(frame)
    return msg


def seq_of(frame: bytes) -> int:
    return decode(frame)["seq"]


def core_with(**kw: Any) -> ProducerCore:
    kw.setdefault("first_seq", 1)
    kw.setdefault("rng", random.Random(1))
    return ProducerCore("p", **kw)


def welcome(durable_seq: int = 0) -> dict[str, Any]:
    return {"op": "welcome", "v": 1, "durable_seq": durable_seq}


def connected(core: ProducerCore, durable_seq: int = 0, now: float = 0.0) -> None:
    core.connection_made(now)
    core.receive(welcome(durable_seq), now)


# ----------------------------------------------------------------- batches, as bytes


def test_a_batch_is_one_columnar_inc_frame_byte_for_byte() -> None:
    core = core_with(batch_size=10, first_seq=7)
    add(core, "acme", "m", 5, 1000, {"b": "2", "a": "1"})
    add(core, "globex", "m.x", -1, 2000, None)
    add(core, "acme", "m", 3, 3000, {"a": "1", "b": "2"})  # same series, other tag order
    add(core, "globex", "m.x", 2**63 - 1, 0, {})  # {} and None are the same series
    assert core.seal() == 7
    expected = encode_frame({
        "op": "inc",
        "seq": 7,
        "ack": "durable",
        "series": [["acme", "m", {"a": "1", "b": "2"}], ["globex", "m.x", None]],
        "i": np.array([0, 1, 0, 1], "<u4").tobytes(),
        "ts": np.array([1000, 2000, 3000, 0], "<i8").tobytes(),
        "v": np.array([5, -1, 3, 2**63 - 1], "<i8").tobytes(),
    })
    assert core.kept[7].frame == expected
    assert core.kept[7].increments == 4
    # The server's own codec and validation read it back as the same increments.
    parsed = parse_message(decode(expected))
    assert isinstance(parsed, Inc) and parsed.ack == "durable" and parsed.seq == 7
    batch = columnar_batch(parsed.series, parsed.i, parsed.ts, parsed.v, time.time())
    assert batch.increments == 4


def test_seqs_are_strictly_increasing_from_the_clock() -> None:
    before = time.time_ns() // 1000
    core = ProducerCore("p", batch_size=2)
    after = time.time_ns() // 1000
    assert before <= core.first_seq <= after
    for k in range(10):
        add(core, "acme", "m", k)
    seqs = list(core.kept)
    assert seqs == list(range(core.first_seq, core.first_seq + 5))
    assert core.last_seq == seqs[-1]
    assert [seq_of(b.frame) for b in core.kept.values()] == seqs
    assert initial_seq() >= after  # a later client with the same name starts above


def test_size_trigger_seals_at_batch_size_and_wakes_only_when_needed() -> None:
    core = core_with(batch_size=3)
    assert add(core, "acme", "m") is True  # a batch began: a new linger deadline
    assert add(core, "acme", "m") is False
    assert not core.kept
    assert add(core, "acme", "m") is True  # sealed
    assert list(core.kept) == [1] and core.builder.n == 0
    assert add(core, "acme", "m") is True
    assert core.pending == 4


def test_linger_trigger_seals_linger_seconds_after_the_first_increment() -> None:
    core = core_with(batch_size=1000, linger=0.5)
    assert core.linger_deadline() is None and core.deadline() is None
    add(core, "acme", "m", now=10.0)
    add(core, "acme", "m", now=10.4)  # later increments do not move the deadline
    assert core.linger_deadline() == 10.5 and core.deadline() == 10.5
    assert core.poll(10.49) is False and not core.kept
    assert core.poll(10.5) is True and list(core.kept) == [1]
    assert core.linger_deadline() is None and core.poll(99.0) is False


def test_linger_zero_seals_at_the_next_poll() -> None:
    core = core_with(linger=0)
    add(core, "acme", "m", now=3.0)
    assert core.poll(3.0) is True and core.kept[1].increments == 1


def test_linger_none_never_seals_on_time() -> None:
    core = core_with(linger=None)
    add(core, "acme", "m", now=3.0)
    assert core.linger_deadline() is None and core.deadline() is None
    assert core.poll(1e9) is False and not core.kept and core.pending == 1


def test_seal_at_a_chosen_seq_and_the_next_ones_follow() -> None:
    core = core_with(first_seq=100)
    assert core.seal(500) is None and core.last_seq == 99  # nothing open: no seq used
    add(core, "acme", "m")
    assert core.seal(500) == 500
    add(core, "acme", "m")
    add_event(core)
    assert core.seal(700) == 701 and list(core.kept) == [500, 700, 701]  # events after
    add(core, "acme", "m")
    assert core.seal() == 702
    add(core, "acme", "m")
    for bad in (702, 2**63, 703.0):
        with pytest.raises(ValueError, match="above the last seq"):
            core.seal(bad)  # type: ignore[arg-type]
    assert core.pending == 5 and core.builder.n == 1  # a refused seal keeps the batch open


def big_tags(n: int, width: int) -> dict[str, str]:
    return {f"k{j}": f"{n:08d}".ljust(width, "x") for j in range(16)}


def test_byte_cap_seals_before_a_frame_could_exceed_it() -> None:
    cap = 64 * 1024
    core = core_with(batch_size=1_000_000, max_batch_bytes=cap)
    for n in range(200):  # ~3.4 KB per series entry: about 18 per frame
        add(core, "acme", "m", n, tags=big_tags(n, 200))
    core.seal()
    assert len(core.kept) > 5
    assert sum(b.increments for b in core.kept.values()) == 200
    for b in core.kept.values():
        assert len(b.frame) <= cap
        msg = decode(b.frame)
        columnar_batch(msg["series"], msg["i"], msg["ts"], msg["v"], time.time())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 16), st.integers(0, 200)),
                min_size=1, max_size=400))
def test_byte_cap_holds_for_any_mix_of_series(incs: list[tuple[int, int, int]]) -> None:
    cap = 64 * 1024
    core = core_with(batch_size=1_000_000, max_batch_bytes=cap)
    for n, ntags, width in incs:
        tags = {f"k{j}": f"{n}".ljust(width, "\u00e9") for j in range(ntags)}  # 2-byte UTF-8
        add(core, f"t{n}", "m", n, tags=tags)
    core.seal()
    assert sum(b.increments for b in core.kept.values()) == len(incs)
    for b in core.kept.values():
        assert len(b.frame) <= cap
        assert len(b.frame) <= FRAME_OVERHEAD + len(msgpack.packb(decode(b.frame)["series"])) \
            + 20 * b.increments


def test_pending_counts_buffered_and_undurable_increments() -> None:
    core = core_with(batch_size=2, max_pending=5)
    for _ in range(5):
        add(core, "acme", "m")
    assert core.pending == 5 and len(core.kept) == 2 and core.builder.n == 1
    connected(core)
    core.take_frames(0.0)
    core.receive({"op": "ack", "seq": 1, "rows": 2}, 0.0)
    assert core.pending == 5  # acked is not durable: still kept
    core.receive({"op": "durable", "seq": 1}, 0.0)
    assert core.pending == 3 and list(core.kept) == [2]


def add_event(core: ProducerCore, n: int = 0, now: float = 0.0, **fields: Any) -> bool:
    event, size = prepare_event("acme", "message.received", NOW, {"n": n, **fields}, NOW)
    return core.add_event(event, size, now)


def test_events_are_batched_beside_increments_in_event_frames() -> None:
    core = core_with(batch_size=3, linger=0.5)
    assert add_event(core, 0, now=10.0) is True  # an event batch began
    assert add(core, "acme", "m", now=10.2) is True  # so did an increment batch
    assert add_event(core, 1, now=10.3) is False
    assert core.pending == 3 and not core.kept
    assert core.linger_deadline() == 10.5  # the older of the two open batches
    assert core.poll(10.5) is True  # linger seals both: increments first, then events
    first, second = core.kept.values()
    assert decode(first.frame)["op"] == "inc" and first.increments == 1
    msg = decode(second.frame)
    assert msg == {"op": "event", "seq": 2, "ack": "durable", "events": [
        {"type": "message.received", "tenant": "acme", "ts": NOW, "n": 0},
        {"type": "message.received", "tenant": "acme", "ts": NOW, "n": 1}]}
    assert second.increments == 2 and core.last_seq == 2
    for n in range(3):  # the size trigger seals an event batch on its own
        add_event(core, n)
    assert list(core.kept) == [1, 2, 3] and core.builder.n == 0


def test_the_byte_cap_holds_for_event_batches() -> None:
    cap = 64 * 1024
    core = core_with(batch_size=1_000_000, max_batch_bytes=cap)
    for n in range(100):
        add_event(core, n, note="x" * 2000)
    core.seal()
    assert len(core.kept) > 2 and sum(b.increments for b in core.kept.values()) == 100
    assert all(len(b.frame) <= cap for b in core.kept.values())
    with pytest.raises(ValueError, match="does not fit in max_batch_bytes"):
        add_event(core, 0, note="x" * cap)


def test_a_refused_event_batch_names_the_event() -> None:
    core = core_with(batch_size=2)
    add_event(core, 0)
    add_event(core, 1)
    connected(core)
    core.take_frames(0.0)
    core.receive({"op": "error", "seq": 1, "code": "bad_row", "row": 1,
                  "message": "event 1 (message.received): field 'channel' is missing"}, 0.0)
    [err] = core.rejections
    assert (err.row, err.increments, err.increment) == (1, 2, None)
    assert err.event == {"type": "message.received", "tenant": "acme", "ts": NOW, "n": 1}
    assert "the bad event:" in str(err)


# ------------------------------------------------------------ the protocol, as a state machine


def test_pipelining_durable_frames_and_resend_after_reconnect() -> None:
    core = core_with(batch_size=2, max_in_flight=2)
    for k in range(6):
        add(core, "acme", "m", k)
    frames = {b.seq: b.frame for b in core.kept.values()}
    hello = decode(core.connection_made(0.0))
    assert hello == {"op": "hello", "v": 1, "token": None, "producer": "p"}
    assert core.take_frames(0.0) == []  # not before welcome
    core.receive(welcome(0), 0.0)
    assert core.take_frames(0.0) == [frames[1], frames[2]]  # the in-flight window
    assert core.take_frames(0.0) == []
    core.receive({"op": "ack", "seq": 1, "rows": 2}, 0.1)
    assert core.take_frames(0.1) == [frames[3]]
    core.receive({"op": "durable", "seq": 1}, 0.2)
    assert list(core.kept) == [2, 3] and core.durable_seq == 1
    core.receive({"op": "ack", "seq": 2, "rows": 2}, 0.2)
    assert core.settled(2, durable=False) and not core.settled(2, durable=True)

    assert core.disconnected("test") > 0
    assert core.take_frames(1.0) == []
    core.connection_made(1.0)
    core.receive(welcome(2), 1.0)  # the server made 2 durable meanwhile
    assert list(core.kept) == [3]
    assert core.take_frames(1.0) == [frames[3]]  # the same seq, the same bytes
    assert core.stats["resends"] == 1


def test_a_reconnect_resends_acked_batches_too() -> None:
    """Acked is not durable: a crashed shard lost them, the resend restores them."""
    core = core_with(batch_size=1)
    add(core, "acme", "m")
    add(core, "acme", "m")
    connected(core)
    sent = core.take_frames(0.0)
    core.receive({"op": "ack", "seq": 1, "rows": 1}, 0.0)
    core.receive({"op": "ack", "seq": 2, "rows": 1}, 0.0)
    core.disconnected("crash")
    connected(core, durable_seq=0)
    assert core.take_frames(0.0) == sent


def test_overloaded_pauses_then_resends_the_refused_batch_and_those_after_it() -> None:
    core = core_with(batch_size=1, backoff=(1.0, 8.0))
    for _ in range(3):
        add(core, "acme", "m")
    frames = [b.frame for b in core.kept.values()]
    connected(core)
    assert core.take_frames(0.0) == frames
    core.receive({"op": "error", "seq": 1, "code": "overloaded", "message": "busy"}, 0.0)
    assert core.paused and core.take_frames(0.0) == []
    # tally refuses later seqs until the refused one is back
    core.receive({"op": "error", "seq": 2, "code": "overloaded", "message": "wait"}, 0.0)
    core.receive({"op": "error", "seq": 3, "code": "overloaded", "message": "wait"}, 0.0)
    assert core.deadline() == core.resume_at and 0.5 <= core.resume_at <= 1.0
    assert core.take_frames(core.resume_at - 0.01) == []
    assert core.take_frames(core.resume_at) == frames  # in seq order, unchanged
    assert core.pending == 3 and core.stats["overloaded"] == 3


def test_overloaded_waits_for_the_answers_in_flight_before_resending() -> None:
    core = core_with(batch_size=1, backoff=(0.01, 0.01))
    add(core, "acme", "m")
    add(core, "acme", "m")
    connected(core)
    core.take_frames(0.0)
    core.receive({"op": "error", "seq": 1, "code": "overloaded", "message": "busy"}, 0.0)
    assert core.take_frames(5.0) == []  # seq 2's answer is still due
    core.receive({"op": "ack", "seq": 2, "rows": 1}, 5.0)
    assert [seq_of(f) for f in core.take_frames(5.0)] == [1]


def test_bad_row_drops_the_batch_and_names_the_increment() -> None:
    core = core_with(batch_size=3)
    add(core, "acme", "a", 1, 100)
    add(core, "acme", "b", 2, 200, {"k": "v"})
    add(core, "acme", "c", 3, 300)
    add(core, "acme", "d", 4, 400)
    connected(core)
    core.take_frames(0.0)
    core.receive({"op": "error", "seq": 1, "code": "bad_row", "row": 1,
                  "message": "row 1: boom"}, 0.0)
    assert list(core.kept) == [] and core.pending == 1
    [err] = core.rejections
    assert (err.code, err.row, err.seq, err.increments) == ("bad_row", 1, 1, 3)
    assert err.increment == ("acme", "b", {"k": "v"}, 200, 2)
    assert "boom" in str(err) and "none applied" in str(err)
    assert core.settled(1, durable=True)  # refused batches are not waited for


def test_a_tenant_outside_the_token_rejects_that_batch_only() -> None:
    core = core_with(batch_size=2)
    add(core, "acme", "a", 1, 100)
    add(core, "globex", "b", 2, 200)
    add(core, "acme", "c", 3, 300)
    connected(core)
    core.take_frames(0.0)
    core.receive({"op": "error", "seq": 1, "code": "unauthorized", "row": 1,
                  "message": "row 1: token 't' has no access to tenant 'globex'"}, 0.0)
    assert core.fatal is None and list(core.kept) == [] and core.pending == 1
    [err] = core.rejections
    assert (err.code, err.row, err.increment) == ("unauthorized", 1, ("globex", "b", None, 200, 2))


def test_bad_request_for_a_batch_is_permanent_too() -> None:
    core = core_with(batch_size=1)
    add(core, "acme", "a")
    connected(core)
    core.take_frames(0.0)
    core.receive({"op": "error", "seq": 1, "code": "bad_request", "message": "no"}, 0.0)
    assert core.rejections[0].row is None and core.rejections[0].increment is None
    assert not core.kept


@pytest.mark.parametrize("msg,error", [
    ({"op": "error", "seq": None, "code": "unauthorized", "message": "bad token"}, Unauthorized),
    ({"op": "error", "seq": None, "code": "bad_request", "message": "v 2"}, ProtocolMismatch),
    ({"op": "welcome", "v": 1}, ProtocolMismatch),  # a server without durable acks
    ({"op": "welcome", "v": 1, "durable_seq": None}, ProtocolMismatch),
    ({"op": "welcome", "v": 1, "durable_seq": 10**15}, ProducerConflict),  # seqs we never sent
])
def test_handshake_answers_that_stop_the_client(msg: dict, error: type) -> None:
    core = core_with(first_seq=1000)
    core.connection_made(0.0)
    core.receive(msg, 0.0)
    assert isinstance(core.fatal, error), core.fatal
    assert not core.ready and core.take_frames(0.0) == []


def test_a_durable_seq_from_an_earlier_incarnation_is_fine() -> None:
    core = core_with(first_seq=1000)
    connected(core, durable_seq=999)
    assert core.fatal is None and core.ready


@pytest.mark.parametrize("msg,error", [
    ({"op": "error", "seq": None, "code": "unauthorized", "message": "revoked"}, Unauthorized),
    ({"op": "error", "seq": 1, "code": "too_large", "message": "big"}, ClientFailed),
    ({"op": "error", "seq": None, "code": "bad_frame", "message": "?"}, ClientFailed),
    ({"op": "durable", "seq": 5}, ProducerConflict),
])
def test_answers_that_stop_the_client(msg: dict, error: type) -> None:
    core = core_with(batch_size=1)
    add(core, "acme", "a")
    connected(core)
    core.take_frames(0.0)
    core.receive(msg, 0.0)
    assert isinstance(core.fatal, error), core.fatal


@pytest.mark.parametrize("msg", [
    {"op": "ack", "seq": 2, "rows": 1},  # out of order
    {"op": "error", "seq": 7, "code": "overloaded", "message": "x"},  # not the one due
    {"op": "pong"},
    {"op": "error", "seq": None, "code": "internal", "message": "x"},
    {"op": "durable", "seq": "1"},
])
def test_answers_that_break_the_connection(msg: dict) -> None:
    core = core_with(batch_size=1)
    add(core, "acme", "a")
    add(core, "acme", "a")
    connected(core)
    core.take_frames(0.0)
    with pytest.raises(Broken):
        core.receive(msg, 0.0)
    assert core.fatal is None


def test_nothing_in_flight_means_nothing_is_due() -> None:
    core = core_with()
    connected(core)
    with pytest.raises(Broken):
        core.receive({"op": "ack", "seq": 1, "rows": 1}, 0.0)


def test_timeout_of_the_oldest_frame_in_flight() -> None:
    core = core_with(batch_size=1, timeout=2.0)
    add(core, "acme", "a")
    core.connection_made(10.0)  # the hello is in flight too
    assert core.deadline() == 12.0 and not core.timed_out(11.9) and core.timed_out(12.0)
    core.receive(welcome(), 10.5)
    core.take_frames(11.0)
    assert core.deadline() == 13.0 and core.timed_out(13.0)


def test_garbage_before_welcome_is_not_a_tally_server() -> None:
    core = core_with()
    core.connection_made(0.0)
    try:
        FrameDecoder().feed(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    except FrameError as exc:
        core.garbage(exc)
    assert isinstance(core.fatal, ProtocolMismatch) and "HTTP port" in str(core.fatal)


def test_backoff_is_capped_exponential_with_jitter() -> None:
    rng = random.Random(3)
    for attempt in range(40):
        d = min(2.0, 0.1 * 2**attempt)
        delays = [backoff_delay(attempt, 0.1, 2.0, rng) for _ in range(50)]
        assert all(d / 2 <= x <= d for x in delays)
        assert len(set(delays)) > 1


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize("args,error,needle", [
    (("Acme", "m", 1, None, None), InvalidSeries, "tenant"),
    (("acme", "m m", 1, None, None), InvalidSeries, "metric"),
    (("acme", "m", 1, None, {"Bad": "x"}), InvalidSeries, "tag key"),
    (("acme", "m", 1, None, {"k": 1}), InvalidSeries, "tag 'k'"),
    (("acme", "m", 1, None, [("k", "v")]), InvalidSeries, "tags must be a map"),
    (("acme", "m", 1, None, {1: "x", "a": "y"}), InvalidSeries, "tag key"),
    (("acme", "m", 1.5, None, None), TypeError, "value"),
    (("acme", "m", True, None, None), TypeError, "value"),
    (("acme", "m", 2**63, None, None), ValueError, "int64"),
    (("acme", "m", 1, 1.0, None), TypeError, "ts"),
    (("acme", "m", 1, -1, None), ValueError, "negative"),
    (("acme", "m", 1, NOW + 7200, None), ValueError, "ahead"),
])
def test_inc_refuses_what_the_server_would(args: tuple, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle):
        prepare_increment(SeriesCache(), *args, time.time())


def test_inc_accepts_numpy_integers_and_defaults_ts_to_now() -> None:
    cache = SeriesCache()
    entry, ts, value = prepare_increment(
        cache, "acme", "m", np.int64(7), None, {"b": "1", "a": "2"}, 1234.9)
    assert (ts, value) == (1234, 7) and type(value) is int
    assert entry.wire == ("acme", "m", {"a": "2", "b": "1"})
    assert cache.lookup("acme", "m", {"a": "2", "b": "1"}) is entry  # one entry per series


def test_an_invalid_increment_is_not_buffered() -> None:
    with TallyClient("127.0.0.1", free_port(), linger=10) as client:
        with pytest.raises(InvalidSeries):
            client.inc("BAD", "m")
        assert client.pending == 0


# --------------------------------------------------------------------- the test peer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Conn:
    def __init__(self, sock: socket.socket, generation: int) -> None:
        self.sock = sock
        self.generation = generation
        self.write_lock = threading.Lock()
        self.producer: str | None = None
        self.epoch = 0
        self.refused: int | None = None


class Peer:
    """A wire protocol v1 peer with tally's dedup and durability rules, and chaos knobs.

    State: ``totals`` are the applied sums per (series id, UTC hour) -- what
    queries would see; ``checkpointed`` and ``durable_marks`` are what a
    checkpoint made durable; ``crash()`` goes back to them, as a restarted
    tally does. ``applied`` lists the (producer, seq) applied and not lost.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        drop_before: float = 0.0,
        drop_after_apply: float = 0.0,
        cut_answer: float = 0.0,
        overload: float = 0.0,
        checkpoint_every: float | None = 0.02,
        token: str | None = None,
        welcome_durable: bool = True,
        stall_connections: int = 0,
        port: int = 0,
    ) -> None:
        self.rng = random.Random(seed)
        self.drop_before = drop_before
        self.drop_after_apply = drop_after_apply
        self.cut_answer = cut_answer
        self.overload = overload
        self.token = token
        self.welcome_durable = welcome_durable
        self.stall_connections = stall_connections  # the first N connections never answer inc
        self.lock = threading.Lock()
        self.held = threading.Lock()  # held: the background checkpoints wait
        self.totals: Counter[tuple[str, int]] = Counter()
        self.checkpointed: Counter[tuple[str, int]] = Counter()
        self.marks: dict[str, int] = {}
        self.durable_marks: dict[str, int] = {}
        self.epochs: dict[str, int] = {}
        self.blocked: dict[str, int] = {}
        self.applied: list[tuple[str, int]] = []
        self.generation = 0
        self.accepted = 0
        self.crashes = 0
        self.lost = 0  # applied (and acked) batches a crash lost: the client must resend them
        self.conns: set[_Conn] = set()
        self.errors: list[BaseException] = []  # unexpected exceptions in peer threads
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.05)  # accept() wakes up to see stop()
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        if checkpoint_every is not None:
            self.threads.append(
                threading.Thread(target=self._checkpoints, args=(checkpoint_every,), daemon=True)
            )
        for t in list(self.threads):  # not the list: _accept appends to it once started
            t.start()

    # -- control from the test ---------------------------------------------------

    def checkpoint(self) -> None:
        with self.lock:
            self.checkpointed = Counter(self.totals)
            self.durable_marks = dict(self.marks)
            targets = [(c, self.durable_marks.get(c.producer or "", 0)) for c in self.conns]
        for conn, seq in targets:
            if seq > 0:
                self._send(conn, {"op": "durable", "seq": seq})

    def crash(self) -> None:
        """Lose everything not checkpointed and every connection, as a restart does."""
        with self.lock:
            self.generation += 1
            self.crashes += 1
            self.totals = Counter(self.checkpointed)
            self.marks = dict(self.durable_marks)
            self.blocked.clear()
            kept = [(p, s) for p, s in self.applied if s <= self.durable_marks.get(p, 0)]
            self.lost += len(self.applied) - len(kept)
            self.applied = kept
            conns = list(self.conns)
        for c in conns:
            _shutdown(c.sock)

    @contextlib.contextmanager
    def checkpoints_held(self) -> Iterator[None]:
        """No background checkpoint runs inside: what is applied meanwhile is not durable.

        The chaos pauses too. Without checkpoints nothing becomes durable, so every
        reconnect resends every batch since the last one, each through the chaos
        again: a long enough tail of them would rarely get through whole, and
        the client would reconnect for ever without reaching the batch it waits for.
        """
        knobs = ("drop_before", "drop_after_apply", "cut_answer", "overload")
        with self.held:
            with self.lock:
                saved = {k: getattr(self, k) for k in knobs}
                for k in knobs:
                    setattr(self, k, 0.0)
            try:
                yield
            finally:
                with self.lock:
                    for k, v in saved.items():
                        setattr(self, k, v)

    def kill_connections(self) -> None:
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            _shutdown(c.sock)

    def stop(self) -> None:
        self.stopping.set()
        self.listener.close()
        self.kill_connections()
        for t in self.threads:
            t.join(5)

    def expect_no_errors(self) -> None:
        assert not self.errors, self.errors

    # -- threads ---------------------------------------------------------------------

    def _checkpoints(self, every: float) -> None:
        while not self.stopping.wait(every):
            with self.held:
                self.checkpoint()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed by stop()
            sock.settimeout(None)
            with self.lock:
                self.accepted += 1
                conn = _Conn(sock, self.generation)
                self.conns.add(conn)
                stall = self.accepted <= self.stall_connections
            t = threading.Thread(target=self._serve, args=(conn, stall), daemon=True)
            self.threads.append(t)
            t.start()

    def _send(self, conn: _Conn, msg: dict[str, Any], cut: bool = False) -> bool:
        data = encode_frame(msg)
        with conn.write_lock:
            try:
                conn.sock.sendall(data[: len(data) // 2] if cut else data)
            except OSError:
                return False  # the connection is going away; its reader thread ends it
        return True

    def _serve(self, conn: _Conn, stall: bool) -> None:
        decoder = FrameDecoder(DEFAULT_MAX_FRAME)
        try:
            while True:
                try:
                    data = conn.sock.recv(1 << 16)
                except OSError:
                    return  # killed by the test, or reset by the client
                if not data:
                    return
                try:
                    messages = decoder.feed(data)
                except FrameError as exc:
                    self.errors.append(exc)  # the client must never send a broken frame
                    self._send(conn, exc.frame())
                    return
                for msg in messages:
                    if not self._handle(conn, msg, stall):
                        return
        except Exception as exc:
            self.errors.append(exc)
            raise
        finally:
            with self.lock:
                self.conns.discard(conn)
            conn.sock.close()

    def _handle(self, conn: _Conn, msg: dict[str, Any], stall: bool) -> bool:
        """Answer one message; False closes the connection."""
        if conn.producer is None:
            return self._hello(conn, msg)
        if stall:
            return True
        with self.lock:
            if self.rng.random() < self.drop_before:
                return False
        try:
            parsed = parse_message(msg)
            assert isinstance(parsed, Inc), parsed
        except ProtocolError as exc:
            self.errors.append(exc)
            self._send(conn, exc.frame())
            return True
        answer, applied, close = self._inc(conn, parsed)
        if close:
            return False
        with self.lock:
            if applied and self.rng.random() < self.drop_after_apply:
                return False
            cut = self.rng.random() < self.cut_answer
        return self._send(conn, answer, cut=cut) and not cut

    def _hello(self, conn: _Conn, msg: dict[str, Any]) -> bool:
        assert msg.get("op") == "hello" and msg.get("v") == 1, msg
        if self.token is not None and msg.get("token") != self.token:
            self._send(conn, {"op": "error", "seq": None, "code": "unauthorized",
                              "message": "token refused"})
            return False
        producer = msg["producer"]
        with self.lock:
            if conn.generation != self.generation:
                return False
            conn.producer = producer
            conn.epoch = self.epochs[producer] = self.epochs.get(producer, 0) + 1
            answer: dict[str, Any] = {"op": "welcome", "v": 1}
            if self.welcome_durable:
                answer["durable_seq"] = self.durable_marks.get(producer, 0)
        return self._send(conn, answer)

    def _inc(self, conn: _Conn, m: Inc) -> tuple[dict[str, Any], bool, bool]:
        """(answer, applied, close): tally's rules for one batch."""
        assert m.ack == "durable" and m.series is not None and m.rows is None
        p = conn.producer
        assert p is not None
        n = len(m.i or b"") // 4

        def error(code: str, message: str, **extra: Any) -> dict[str, Any]:
            return {"op": "error", "seq": m.seq, "code": code, "message": message, **extra}

        with self.lock:
            if conn.generation != self.generation or conn.epoch != self.epochs[p]:
                return {}, False, True  # crashed meanwhile, or fenced by a newer connection
            if m.seq <= self.marks.get(p, 0):
                return {"op": "ack", "seq": m.seq, "rows": n}, False, False  # a resend
            blocked = self.blocked.get(p)
            if blocked is not None and m.seq > blocked:
                return error("overloaded", f"seq {blocked} must come back first"), False, False
            if self.rng.random() < self.overload:
                self.blocked[p] = m.seq
                return error("overloaded", "busy"), False, False
            try:
                batch = columnar_batch(m.series, m.i, m.ts, m.v, time.time())
            except BadRow as exc:
                self.blocked.pop(p, None)
                return error("bad_row", str(exc), row=exc.row), False, False
            except BadBatch as exc:
                self.blocked.pop(p, None)
                return error("bad_request", str(exc)), False, False
            self.blocked.pop(p, None)
            for k in range(len(batch)):
                key = (batch.sids[int(batch.series[k])], int(batch.hours[k]))
                self.totals[key] += int(batch.values[k])
            self.marks[p] = m.seq
            self.applied.append((p, m.seq))
            return {"op": "ack", "seq": m.seq, "rows": batch.increments}, True, False


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return  # already closed by its own thread


@pytest.fixture
def peer_factory() -> Iterator[Any]:
    peers: list[Peer] = []

    def make(**kw: Any) -> Peer:
        peer = Peer(**kw)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.stop()


SERIES = [
    ("acme", "messages.received", {"channel": c}) for c in ("email", "chat", "twitter")
] + [("acme", "logins", None), ("globex", "messages.handled", {"agent": "ann"}),
     ("globex", "response_time", {"bucket": "lt_1h", "team": "b"})]


def random_increments(n: int, seed: int) -> list[tuple[str, str, int, int, dict | None]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        tenant, metric, tags = rnd.choice(SERIES)
        out.append((tenant, metric, rnd.choice((1, 1, 2, 7, -1)),
                    NOW - rnd.randrange(0, 90 * 86400), tags))
    return out


def expected_totals(incs: list[tuple[str, str, int, int, dict | None]]) -> Counter:
    totals: Counter[tuple[str, int]] = Counter()
    for tenant, metric, value, ts, tags in incs:
        totals[(series_id(tenant, metric, tags), ts // 3600)] += value
    return totals


def assert_exact(peer: Peer, incs: list, producer: str) -> None:
    expected = expected_totals(incs)
    with peer.lock:
        assert peer.totals == expected
        assert peer.checkpointed == expected  # flush(durable=True) returned: all checkpointed
        mine = [s for p, s in peer.applied if p == producer]
        assert len(mine) == len(set(mine)), "a batch was applied twice"
    peer.expect_no_errors()


def crash_losing_a_batch(peer: Peer, client: TallyClient, incs: list) -> None:
    """Crash ``peer`` while it holds an applied batch of ``client`` no checkpoint covers.

    A crash at a random moment may find everything checkpointed (the
    checkpoint thread won), so ``lost > 0`` would depend on timing. Here one
    increment more (added to ``incs``) goes out in a batch that is applied
    while checkpoints are held, so the crash loses it, and the client, which
    was connected, must reconnect and resend it.
    """
    inc = ("acme", "logins", 1, NOW, None)
    with peer.checkpoints_held():
        client.inc(*inc)
        incs.append(inc)
        client.flush(durable=False, timeout=60)
        lost = peer.lost
        peer.crash()
        assert peer.lost > lost


CHAOS = {
    "drop_before": 0.03,
    "drop_after_apply": 0.03,
    "cut_answer": 0.02,
    "overload": 0.05,
    "checkpoint_every": 0.1,  # so that a crash loses acked batches
}
FAST = {"backoff": (0.001, 0.02), "timeout": 5.0}


# --------------------------------------------------------------- sync client, real sockets


def test_exact_totals_through_dropped_connections_overloads_and_crashes(peer_factory) -> None:
    peer = peer_factory(seed=11, **CHAOS)
    incs = random_increments(60_000, seed=1)
    sent = list(incs)
    rnd = random.Random(2)
    with TallyClient("127.0.0.1", peer.port, batch_size=300, linger=0.005, **FAST) as client:
        for k, (tenant, metric, value, ts, tags) in enumerate(incs):
            client.inc(tenant, metric, value, ts, tags)
            if k % 5000 == 4999:
                time.sleep(0.02)  # let some batches be acked, not yet checkpointed
                rnd.choice((peer.crash, peer.kill_connections))()  # whatever is in flight
            if k % 20000 == 19999:
                crash_losing_a_batch(peer, client, sent)
        client.flush(durable=True, timeout=60)
        stats = client.stats
        assert_exact(peer, sent, client.producer)
        assert client.pending == 0 and stats["kept_batches"] == 0
    # the chaos really happened (the counts that do not depend on timing)
    assert stats["reconnects"] >= 3 and stats["resends"] > 0 and stats["overloaded"] > 0
    assert peer.crashes >= 3 and peer.lost >= 3  # acked batches were lost, and resent


def test_threads_share_one_client_exactly(peer_factory) -> None:
    peer = peer_factory(seed=12, **CHAOS)
    parts = [random_increments(8_000, seed=100 + t) for t in range(4)]
    with TallyClient("127.0.0.1", peer.port, batch_size=500, linger=0.002, **FAST) as client:

        def work(incs: list) -> None:
            for tenant, metric, value, ts, tags in incs:
                client.inc(tenant, metric, value, ts, tags)

        threads = [threading.Thread(target=work, args=(p,)) for p in parts]
        for t in threads:
            t.start()
        extra: list = []
        for _ in range(3):
            time.sleep(0.05)
            peer.crash()  # wherever the threads are
        crash_losing_a_batch(peer, client, extra)
        for t in threads:
            t.join()
        client.flush(timeout=60)
        assert_exact(peer, [i for p in parts for i in p] + extra, client.producer)
    assert peer.lost > 0


def test_a_silent_server_times_out_and_the_client_resends_elsewhere(peer_factory) -> None:
    peer = peer_factory(stall_connections=1)
    incs = random_increments(2_000, seed=3)
    with TallyClient("127.0.0.1", peer.port, batch_size=100, linger=0.01,
                     timeout=0.5, backoff=(0.001, 0.01)) as client:
        for tenant, metric, value, ts, tags in incs:
            client.inc(tenant, metric, value, ts, tags)
        client.flush(timeout=20)
        assert client.stats["reconnects"] >= 1
        assert_exact(peer, incs, client.producer)


def unlistened_port() -> int:
    """A free port outside the ephemeral range: a client retrying a connect to
    an ephemeral port with nothing listening can end up connected to itself
    (TCP simultaneous open), and then holds the port the server needs."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(10_000, low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    """Until ``condition()`` holds: what a test waits for, rather than for a guessed time."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.005)


def test_the_server_down_at_first_then_up(peer_factory) -> None:
    port = unlistened_port()
    with TallyClient("127.0.0.1", port, batch_size=10, linger=0.001, **FAST) as client:
        for _ in range(25):
            client.inc("acme", "logins", ts=NOW)
        wait_for(lambda: client.stats["reconnects"] >= 1)  # a connect was refused
        with pytest.raises(TallyTimeout, match=r"not durable yet.*last problem: connect"):
            client.flush(timeout=0.3)
        assert client.pending == 25  # nothing dropped
        peer = peer_factory(port=port)
        client.flush(timeout=10)
        assert_exact(peer, [("acme", "logins", 1, NOW, None)] * 25, client.producer)


def test_flush_acked_is_not_flush_durable(peer_factory) -> None:
    peer = peer_factory(checkpoint_every=None)
    with TallyClient("127.0.0.1", peer.port, batch_size=10, **FAST) as client:
        for _ in range(25):
            client.inc("acme", "logins", ts=NOW)
        client.flush(durable=False, timeout=10)
        assert sum(peer.totals.values()) == 25 and client.pending == 25
        with pytest.raises(TallyTimeout, match="3 batches .25 increments.* not durable yet"):
            client.flush(timeout=0.2)
        peer.checkpoint()
        client.flush(timeout=10)
        assert client.pending == 0 and client.durable_seq == client.last_seq


def test_backpressure_blocks_inc_until_durable_never_drops(peer_factory) -> None:
    peer = peer_factory(checkpoint_every=None)
    client = TallyClient("127.0.0.1", peer.port, batch_size=5, linger=0.001,
                         max_pending=10, timeout=1.0, backoff=(0.001, 0.01))
    for _ in range(10):
        client.inc("acme", "logins", ts=NOW)
    client.flush(durable=False)
    blocked = threading.Thread(target=client.inc, args=("acme", "logins", 1, NOW))
    blocked.start()
    time.sleep(0.3)
    assert blocked.is_alive() and client.pending == 10
    peer.checkpoint()
    blocked.join(5)
    assert not blocked.is_alive() and client.pending <= 1
    client.flush(durable=False)
    for _ in range(9):
        client.inc("acme", "logins", ts=NOW)
    t0 = time.monotonic()
    with pytest.raises(TallyTimeout, match="was not buffered"):
        client.inc("acme", "logins", ts=NOW)
    assert time.monotonic() - t0 >= 0.9 and client.pending == 10
    peer.checkpoint()
    client.close()
    assert sum(peer.checkpointed.values()) == 20


def test_bad_row_is_raised_once_and_only_that_batch_is_lost(peer_factory) -> None:
    peer = peer_factory()
    with TallyClient("127.0.0.1", peer.port, batch_size=1000, linger=60, **FAST) as client:
        client.inc("acme", "big", 2**62, ts=NOW)
        client.inc("acme", "big", 2**62, ts=NOW)  # the hour slot leaves int64: the server's call
        client.inc("acme", "ok", 1, ts=NOW)
        with pytest.raises(BatchRejected) as info:
            client.flush()
        err = info.value
        assert err.code == "bad_row" and err.row == 1 and err.increments == 3
        assert err.increment == ("acme", "big", None, NOW, 2**62)
        client.inc("acme", "ok", 1, ts=NOW)
        client.flush()  # raised once
        assert peer.checkpointed == Counter({(series_id("acme", "ok", None), NOW // 3600): 1})


def test_a_rejection_is_raised_from_the_next_inc_which_is_not_buffered(peer_factory) -> None:
    peer = peer_factory()
    with TallyClient("127.0.0.1", peer.port, batch_size=2, **FAST) as client:
        client.inc("acme", "big", 2**62, ts=NOW)
        client.inc("acme", "big", 2**62, ts=NOW)
        wait_for(lambda: client.stats["rejected"] > 0)
        with pytest.raises(BatchRejected):
            client.inc("acme", "ok", 1, ts=NOW)
        assert client.pending == 0
        client.inc("acme", "ok", 1, ts=NOW)
    assert sum(peer.checkpointed.values()) == 1


def test_on_error_receives_rejections_instead(peer_factory) -> None:
    peer = peer_factory()
    seen: list[BatchRejected] = []
    with TallyClient("127.0.0.1", peer.port, batch_size=2, on_error=seen.append,
                     **FAST) as client:
        client.inc("acme", "big", 2**62, ts=NOW)
        client.inc("acme", "big", 2**62, ts=NOW)
        client.inc("acme", "ok", 1, ts=NOW)
        client.flush()
    assert [e.code for e in seen] == ["bad_row"]


def test_an_on_error_that_raises_stops_the_client(peer_factory) -> None:
    peer = peer_factory()

    def bad_callback(error: BatchRejected) -> None:
        raise KeyError("oops")

    client = TallyClient("127.0.0.1", peer.port, batch_size=2, on_error=bad_callback, **FAST)
    client.inc("acme", "big", 2**62, ts=NOW)
    client.inc("acme", "big", 2**62, ts=NOW)
    with pytest.raises(ClientFailed, match="on_error raised") as info:
        client.flush()
    assert isinstance(info.value.__cause__, KeyError)
    client.close()  # already raised once: close does not raise it again


# A refused hello reaches the caller from whichever call follows it: the I/O thread
# reads the answer while the test goes on, so an ``inc`` right after the client is
# made may or may not see it yet. The tests below never depend on which thread wins:
# either they wait for the answer (``wait_connected``), or any of the calls may raise.


@pytest.mark.parametrize("wait", [True, False], ids=["wait_connected", "inc_then_flush"])
def test_unauthorized_raises_and_does_not_retry(peer_factory, wait: bool) -> None:
    peer = peer_factory(token="secret")
    client = TallyClient("127.0.0.1", peer.port, token="wrong", **FAST)
    with pytest.raises(Unauthorized) as info:
        if wait:
            client.wait_connected(timeout=10)
        client.inc("acme", "logins", ts=NOW)
        client.flush(timeout=10)
    assert info.value.code == ErrorCode.UNAUTHORIZED == "unauthorized"
    with pytest.raises(Unauthorized):  # from every later call
        client.inc("acme", "logins", ts=NOW)
    with pytest.raises(Unauthorized):
        client.flush(timeout=10)
    time.sleep(0.1)
    assert peer.accepted == 1  # not retried
    client.close()


@pytest.mark.parametrize("wait", [True, False], ids=["wait_connected", "inc_then_flush"])
def test_a_server_without_durable_acks_is_refused_clearly(peer_factory, wait: bool) -> None:
    peer = peer_factory(welcome_durable=False)
    client = TallyClient("127.0.0.1", peer.port, **FAST)
    with pytest.raises(ProtocolMismatch, match="durable_seq"):
        if wait:
            client.wait_connected(timeout=10)
        client.inc("acme", "logins", ts=NOW)
        client.flush(timeout=10)
    with pytest.raises(ProtocolMismatch, match="durable_seq"):
        client.inc("acme", "logins", ts=NOW)
    client.close()


def test_wait_connected_returns_once_welcomed_and_times_out_naming_the_problem(
    peer_factory,
) -> None:
    peer = peer_factory()
    with TallyClient("127.0.0.1", peer.port, **FAST) as client:
        client.wait_connected(timeout=10)
        assert client.stats["connections"] == 1
    with TallyClient("127.0.0.1", unlistened_port(), **FAST) as client:
        wait_for(lambda: client.stats["reconnects"] >= 1)  # a connect was refused
        with pytest.raises(TallyTimeout, match="not connected; last problem: connect"):
            client.wait_connected(timeout=0.05)


def test_a_dead_io_thread_surfaces_its_error(peer_factory) -> None:
    peer = peer_factory()
    client = TallyClient("127.0.0.1", peer.port, batch_size=1, **FAST)
    client.wait_connected(timeout=10)  # the welcome went through the real reader

    def broken(msg: dict, now: float) -> None:
        raise RuntimeError("bug in the reader")

    client._core.receive = broken  # type: ignore[method-assign]
    client.inc("acme", "logins", ts=NOW)  # its answer kills the I/O thread
    with pytest.raises(ClientFailed, match="I/O thread died") as info:
        client.flush(timeout=10)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ClientFailed):
        client.inc("acme", "logins", ts=NOW)
    client.close()
    assert not client._thread.is_alive()


def test_close_flushes_durable_and_then_refuses(peer_factory) -> None:
    peer = peer_factory()
    client = TallyClient("127.0.0.1", peer.port, linger=60, **FAST)
    client.inc("acme", "logins", 3, ts=NOW)
    client.close()
    assert sum(peer.checkpointed.values()) == 3
    with pytest.raises(ClientClosed):
        client.inc("acme", "logins", ts=NOW)
    with pytest.raises(ClientClosed):
        client.flush()
    client.close()  # twice is fine


def test_the_hooks_for_producers_that_number_their_batches(peer_factory) -> None:
    """What ``tally import`` uses: first_seq, linger=None, seal(seq), take_rejections, abort."""
    peer = peer_factory(checkpoint_every=None)
    client = TallyClient("127.0.0.1", peer.port, producer="numbered", first_seq=1000,
                         linger=None, **FAST)
    assert client.first_seq == 1000 and client.last_seq == 999
    client.inc("acme", "logins", 2, ts=NOW)
    time.sleep(0.05)
    assert client.stats["batches"] == 0  # no linger: only seal or flush closes a batch
    assert client.seal(1500) == 1500
    client.inc("acme", "big", 2**62, ts=NOW)
    client.inc("acme", "big", 2**62, ts=NOW)
    assert client.seal(2000) == 2000
    wait_for(lambda: client.stats["rejected"] == 1)
    peer.checkpoint()
    wait_for(lambda: client.durable_seq == 1500)
    [rejected] = client.take_rejections()
    assert rejected.seq == 2000 and rejected.code == ErrorCode.BAD_ROW
    assert client.take_rejections() == []
    client.inc("acme", "logins", 5, ts=NOW)  # open, never sealed: abort drops it
    client.abort()
    assert not client._thread.is_alive() and [s for _, s in peer.applied] == [1500]
    with pytest.raises(ClientClosed):
        client.inc("acme", "logins", ts=NOW)
    client.abort()  # twice is fine
    client.close()  # so is close after abort


def test_on_error_has_run_when_flush_returns(peer_factory) -> None:
    # The I/O thread hands rejections to on_error outside its lock; flush waits for
    # that, so a raising on_error has stopped the client before flush returns.
    for _ in range(20):
        peer = peer_factory()
        seen: list[int] = []

        def record(error: BatchRejected, seen: list[int] = seen) -> None:
            time.sleep(0.01)
            seen.append(error.seq)

        with TallyClient("127.0.0.1", peer.port, on_error=record, **FAST) as client:
            client.inc("acme", "big", 2**62, ts=NOW)
            client.inc("acme", "big", 2**62, ts=NOW)
            client.flush(timeout=10)
            assert seen == [client.last_seq]


def test_a_producer_name_survives_a_restart_of_the_client(peer_factory) -> None:
    peer = peer_factory()
    with TallyClient("127.0.0.1", peer.port, producer="worker-1", **FAST) as first:
        first.inc("acme", "logins", ts=NOW)
    with TallyClient("127.0.0.1", peer.port, producer="worker-1", **FAST) as second:
        # Starting again at durable_seq + 1 would collide with seqs the server may
        # hold as applied-not-durable from a crashed first incarnation.
        assert second.first_seq > first.last_seq
        second.inc("acme", "logins", ts=NOW)
    assert sum(peer.checkpointed.values()) == 2
    assert [s for _, s in peer.applied] == [first.last_seq, second.last_seq]


# --------------------------------------------------------------------------- async client


def test_async_exact_totals_through_chaos(peer_factory) -> None:
    peer = peer_factory(seed=21, **CHAOS)
    incs = random_increments(40_000, seed=4)
    sent = list(incs)

    async def crash_losing_a_batch(client: AsyncTallyClient) -> None:
        """As ``crash_losing_a_batch``, for the asyncio client."""
        inc = ("acme", "logins", 1, NOW, None)
        with peer.checkpoints_held():
            await client.inc(*inc)
            sent.append(inc)
            await client.flush(durable=False, timeout=60)
            lost = peer.lost
            peer.crash()
            assert peer.lost > lost

    async def main() -> dict[str, int]:
        async with AsyncTallyClient("127.0.0.1", peer.port, batch_size=300, linger=0.005,
                                    **FAST) as client:
            for k, (tenant, metric, value, ts, tags) in enumerate(incs):
                await client.inc(tenant, metric, value, ts, tags)
                if k % 200 == 199:
                    await asyncio.sleep(0.001)  # an application awaits other things too
                if k % 20000 == 19999:
                    await crash_losing_a_batch(client)
                elif k % 5000 == 4999:  # whatever is in flight
                    (peer.crash if k % 10000 == 9999 else peer.kill_connections)()
            await client.flush(durable=True, timeout=60)
            assert_exact(peer, sent, client.producer)
            return client.stats

    stats = asyncio.run(main())
    # the chaos really happened (the counts that do not depend on timing)
    assert stats["reconnects"] >= 2 and stats["resends"] > 0 and stats["overloaded"] > 0
    assert peer.crashes == 4 and peer.lost >= 2


def test_async_backpressure_rejections_and_close(peer_factory) -> None:
    peer = peer_factory(checkpoint_every=None)

    async def main() -> None:
        client = AsyncTallyClient("127.0.0.1", peer.port, batch_size=2, linger=0.001,
                                  max_pending=4, timeout=0.5, backoff=(0.001, 0.01))
        for _ in range(4):
            await client.inc("acme", "logins", ts=NOW)
        with pytest.raises(TallyTimeout, match="was not buffered"):
            await client.inc("acme", "logins", ts=NOW)
        waiting = asyncio.ensure_future(client.inc("acme", "logins", ts=NOW))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        peer.checkpoint()
        await asyncio.wait_for(waiting, 5)
        await client.flush(durable=False)  # the next two increments make one batch
        await client.inc("acme", "big", 2**62, ts=NOW)
        await client.inc("acme", "big", 2**62, ts=NOW)
        with pytest.raises(BatchRejected) as info:  # raised once the wait is over
            await client.flush(durable=False)
        assert info.value.increment == ("acme", "big", None, NOW, 2**62)
        peer.checkpoint()
        await client.close()
        with pytest.raises(ClientClosed):
            await client.inc("acme", "logins")

    asyncio.run(main())
    assert sum(peer.checkpointed.values()) == 5


def test_async_hooks_for_numbered_batches(peer_factory) -> None:
    peer = peer_factory(checkpoint_every=None)

    async def main() -> None:
        client = AsyncTallyClient("127.0.0.1", peer.port, producer="numbered", first_seq=10,
                                  linger=None, **FAST)
        await client.wait_connected(timeout=10)
        await client.inc("acme", "logins", 2, ts=NOW)
        assert client.seal(40) == 40
        await client.flush(durable=False, timeout=10)
        await client.inc("acme", "logins", 5, ts=NOW)  # never sealed: abort drops it
        await client.abort()
        with pytest.raises(ClientClosed):
            await client.inc("acme", "logins", ts=NOW)
        await client.close()

    asyncio.run(main())
    assert [s for _, s in peer.applied] == [40] and sum(peer.totals.values()) == 2


def test_async_unauthorized_and_silent_server(peer_factory) -> None:
    refusing = peer_factory(token="secret")
    silent = peer_factory(stall_connections=1)

    async def main() -> None:
        client = AsyncTallyClient("127.0.0.1", refusing.port, token="nope", **FAST)
        await client.inc("acme", "logins", ts=NOW)
        with pytest.raises(Unauthorized):
            await client.flush(timeout=10)
        await client.close()
        async with AsyncTallyClient("127.0.0.1", silent.port, timeout=0.5,
                                    backoff=(0.001, 0.01)) as client:
            await client.inc("acme", "logins", 2, ts=NOW)
            await client.flush(timeout=20)
            assert client.stats["reconnects"] >= 1

    asyncio.run(main())
    assert refusing.accepted == 1
    assert sum(silent.checkpointed.values()) == 2
