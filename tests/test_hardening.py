"""Guarantee 6 on the real TCP and HTTP servers: bad input, limits and access.

Every refusal is checked for its exact code and for what it must not do:
change a count, or disturb another connection. The servers run in-process
(tests/inproc.py); tests/test_e2e_hardening.py repeats the essentials
against `tally serve`.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator

import httpx
import msgpack
import numpy as np
import pytest
from inproc import InProcessTally, RawConnection

from tally.api.service import IngestError
from tally.api.tcp import TcpLimits
from tally.client import TallyClient
from tally.wire.frames import encode_frame

NOW = int(time.time())
DAY = time.strftime("%Y-%m-%d", time.gmtime(NOW - 60))
TS = NOW - 60 - (NOW - 60) % 86400 + 1  # early in DAY (UTC), in the past
HELLO = {"op": "hello", "v": 1, "token": None, "producer": "p"}


def row(tenant: str = "acme", value: int = 1, metric: str = "m") -> list:
    return [tenant, metric, {"k": "v"}, TS, value]


def slow_ingest(monkeypatch, service, seconds: float, seq: int | None = None) -> None:
    """The service takes ``seconds`` more to apply each batch (only seq ``seq``'s)."""
    ingest = service.ingest

    async def slow(batch, producer=None, seq_=None, epoch=None):  # type: ignore[no-untyped-def]
        if seq is None or seq_ == seq:
            await asyncio.sleep(seconds)
        return await ingest(batch, producer, seq_, epoch)

    monkeypatch.setattr(service, "ingest", slow)


def hello(port: int, producer: str = "p", token: str | None = None) -> RawConnection:
    conn = RawConnection(port)
    welcome = conn.request({**HELLO, "producer": producer, "token": token})
    assert welcome["op"] == "welcome", welcome
    return conn


# ---------------------------------------------------------------- TCP: bad input


def test_refused_batches_change_nothing_and_the_connection_goes_on(tally) -> None:
    ahead = int(time.time()) + 7200  # (not NOW: taken at import, long ago in a long run)
    with hello(tally.tcp_port) as conn:
        assert conn.request({"op": "inc", "seq": 1, "rows": [row(value=5)]})["op"] == "ack"
        cases = [
            ({"op": "inc", "seq": 2, "rows": [row(), ["acme", "m", None, TS, 1.5]]},
             "bad_row", 1, "value 1.5"),
            ({"op": "inc", "seq": 2, "rows": [row(), row(), ["Acme", "m", None, TS, 1]]},
             "bad_row", 2, "tenant 'Acme'"),
            ({"op": "inc", "seq": 2, "rows": [row(), ["acme", "m", None, ahead, 1]]},
             "bad_row", 1, "ahead"),
            ({"op": "inc", "seq": 2, "rows": [["acme", "m", {"K": "v"}, TS, 1]]},
             "bad_row", 0, "tag key 'K'"),
            ({"op": "inc", "seq": 2, "rows": [row(value=2**63)]}, "bad_row", 0, "int64"),
            ({"op": "inc", "seq": 2, "rows": [row(), [1, 2]]}, "bad_row", 1, "has 2 fields"),
            ({"op": "inc", "seq": 2, "ack": "maybe", "rows": [row()]}, "bad_request", None,
             "ack 'maybe'"),
            ({"op": "inc", "seq": "two", "rows": [row()]}, "bad_request", None, "seq 'two'"),
            ({"op": "inc", "seq": 2}, "bad_request", None, "needs rows"),
            ({"op": "inc", "seq": 2, "series": [["acme", "m", None]], "i": b"\0\0\0\0"},
             "bad_request", None, "lacks ts, v"),
            ({"op": "inc", "seq": 2, "series": [["acme", "m", None]],
              "i": np.array([1], "<u4").tobytes(), "ts": np.array([TS], "<i8").tobytes(),
              "v": np.array([1], "<i8").tobytes()}, "bad_row", 0, "i 1 is out of range"),
            ({"op": "flush"}, "bad_request", None, "unknown op 'flush'"),
            ({"seq": 3}, "bad_request", None, "no op"),
            ({"op": "hello", "v": 1, "token": None, "producer": "p"}, "bad_request", None,
             "already"),
        ]
        for frame, code, bad_row, words in cases:
            answer = conn.request(frame)
            assert answer["op"] == "error" and answer["code"] == code, (frame, answer)
            assert answer.get("row") == bad_row, (frame, answer)
            assert words in answer["message"], (frame, answer)
        # the same connection still works, and nothing refused was counted
        assert conn.request({"op": "inc", "seq": 2, "rows": [row(value=7)]})["op"] == "ack"
        assert conn.request({"op": "ping"}) == {"op": "pong"}
    assert tally.total("acme", "m", DAY) == 12


@pytest.mark.parametrize(
    ("raw", "code", "words"),
    [
        (struct.pack(">I", 2**32 - 1), "too_large", "4294967295 bytes exceeds"),
        (struct.pack(">I", 0), "bad_frame", "0 bytes"),
        (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "bad_frame", "not valid msgpack"),
        (struct.pack(">I", 2) + msgpack.packb([1]), "bad_frame", "msgpack list"),
    ],
)
def test_broken_frames_are_answered_then_closed_without_harm(tally, raw, code, words) -> None:
    with hello(tally.tcp_port, "bystander") as other, hello(tally.tcp_port) as conn:
        assert conn.request({"op": "inc", "seq": 1, "rows": [row()]})["op"] == "ack"
        conn.send(raw)
        answer = conn.receive()
        assert answer["op"] == "error" and answer["code"] == code, answer
        assert answer["seq"] is None and words in answer["message"], answer
        assert conn.closed_by_server()
        # another connection is unaffected
        assert other.request({"op": "inc", "seq": 1, "rows": [row(value=3)]})["op"] == "ack"
    assert tally.total("acme", "m", DAY) == 4


def test_frames_before_a_broken_one_in_the_same_packet_are_answered(tally) -> None:
    with hello(tally.tcp_port) as conn:
        good = msgpack.packb({"op": "inc", "seq": 1, "rows": [row(value=2)]})
        conn.send(struct.pack(">I", len(good)) + good + struct.pack(">I", 2**31))
        assert conn.receive()["op"] == "ack"
        assert conn.receive()["code"] == "too_large"
        assert conn.closed_by_server()
    assert tally.total("acme", "m", DAY) == 2


def test_the_first_frame_must_be_hello(tally) -> None:
    with RawConnection(tally.tcp_port) as conn:
        answer = conn.request({"op": "inc", "seq": 1, "rows": [row()]})
        assert (answer["code"], answer["message"]) == (
            "bad_request", "the first frame must be hello")
        assert conn.closed_by_server()
    assert tally.total("acme", "m", DAY) == 0


# ------------------------------------------------------- TCP: slow clients, limits


@pytest.fixture
def strict(tmp_path) -> Iterator[InProcessTally]:
    limits = TcpLimits(max_frame=1 << 16, max_connections=3, frame_timeout=0.5)
    server = InProcessTally(tmp_path, limits=limits).start()
    yield server
    server.stop()


def test_a_frame_stalled_halfway_is_timed_out_and_others_are_served(strict) -> None:
    with hello(strict.tcp_port, "slow") as slow, hello(strict.tcp_port, "fast") as fast:
        frame = msgpack.packb({"op": "inc", "seq": 1, "rows": [row(value=100)]})
        slow.send(struct.pack(">I", len(frame)) + frame[:5])  # and then nothing
        started = time.monotonic()
        for seq in range(1, 6):  # meanwhile another client is answered at once
            assert fast.request({"op": "inc", "seq": seq, "rows": [row()]})["op"] == "ack"
        answer = slow.receive()
        assert answer["code"] == "bad_frame"
        assert answer["message"].startswith("frame incomplete after 0.5 s (9 bytes received)")
        assert time.monotonic() - started < 5
        assert slow.closed_by_server()
    assert strict.total("acme", "m", DAY) == 5


def test_a_slow_trickle_does_not_extend_the_frame_deadline(strict) -> None:
    with hello(strict.tcp_port, "trickle") as conn:
        frame = struct.pack(">I", 200) + b"\x81" + b"\xa2op" * 10
        started = time.monotonic()
        with pytest.raises((ConnectionError, BrokenPipeError)):
            for byte in frame:
                conn.send(bytes([byte]))
                time.sleep(0.1)
            conn.receive()  # (the error frame arrives first, then EOF)
            conn.receive()
        assert time.monotonic() - started < 3


def test_the_servers_own_work_on_earlier_frames_does_not_count_against_the_next(
    strict, monkeypatch
) -> None:
    """A producer pipelines: its next frame begins in the socket while the server is still
    applying the one before. Found by `tally bench` with 10 MB frames: the deadline once
    ran from that first byte, so a slow apply cut a well-behaved producer off."""
    slow_ingest(monkeypatch, strict.service, 0.8)  # longer than frame_timeout (0.5 s)
    with hello(strict.tcp_port, "pipeline") as conn:
        first = msgpack.packb({"op": "inc", "seq": 1, "rows": [row()]})
        second = msgpack.packb({"op": "inc", "seq": 2, "rows": [row()]})
        conn.send(struct.pack(">I", len(first)) + first + struct.pack(">I", len(second))
                  + second[:3])  # the next frame's first bytes arrive with the first
        assert conn.receive()["op"] == "ack"  # after 0.8 s of the server's own work
        conn.send(second[3:])  # at once, from the client's side
        assert conn.receive() == {"op": "ack", "seq": 2, "rows": 1}
    assert strict.total("acme", "m", DAY) == 2


def test_a_frame_stalled_behind_a_slow_batch_times_out_after_its_answer(
    strict, monkeypatch
) -> None:
    """The deadline of a partial frame does not run while the batch before it is applied
    (its producer may wait for that ack), and runs again from the ack."""
    slow_ingest(monkeypatch, strict.service, 0.8)  # longer than frame_timeout (0.5 s)
    with hello(strict.tcp_port, "stall") as conn:
        first = msgpack.packb({"op": "inc", "seq": 1, "rows": [row()]})
        started = time.monotonic()
        conn.send(struct.pack(">I", len(first)) + first + struct.pack(">I", 40) + b"\x82")
        assert conn.receive() == {"op": "ack", "seq": 1, "rows": 1}
        answer = conn.receive()
        waited = time.monotonic() - started
        assert answer["code"] == "bad_frame"
        assert answer["message"].startswith("frame incomplete after 0.5 s")
        assert 1.2 < waited < 4  # 0.8 s of the server's work, then the 0.5 s deadline
        assert conn.closed_by_server()
    assert strict.total("acme", "m", DAY) == 1


def test_pipelined_batches_are_answered_in_order(tally, monkeypatch) -> None:
    """The next frames are decoded and checked while a batch is applied; a refusal found
    first is still answered after the batch before it, and nothing is reordered."""
    slow_ingest(monkeypatch, tally.service, 0.3, seq=1)
    frames = [{"op": "inc", "seq": 1, "rows": [row(value=5)]},
              {"op": "inc", "seq": 2, "rows": [row(), ["acme", "m", None, TS, 1.5]]},
              {"op": "inc", "seq": 3, "rows": [row(value=7)]},
              {"op": "ping"},
              {"op": "inc", "seq": 4, "rows": [row(value=11)], "ack": "durable"}]
    with hello(tally.tcp_port, "pipe") as conn:
        conn.send(b"".join(encode_frame(f) for f in frames))
        answers = [conn.receive() for _ in range(5)]
        assert answers[0] == {"op": "ack", "seq": 1, "rows": 1}
        assert (answers[1]["op"], answers[1]["seq"], answers[1]["code"], answers[1]["row"]) \
            == ("error", 2, "bad_row", 1)
        assert answers[2:] == [{"op": "ack", "seq": 3, "rows": 1}, {"op": "pong"},
                               {"op": "ack", "seq": 4, "rows": 1}]
        assert conn.receive() == {"op": "durable", "seq": 4}  # after its ack
    assert tally.total("acme", "m", DAY) == 23


def test_a_batch_behind_a_fatal_refusal_is_neither_applied_nor_answered(
    tally, monkeypatch
) -> None:
    """Seq 1 fails as a shard restart does (fatal: the client must reconnect and resend);
    seq 2, decoded and queued behind it meanwhile, must not be applied past it."""
    service = tally.service
    apply = service._apply  # noqa: SLF001
    failed: list[int] = []

    async def restart_once(parts, shards, producer, seq, expect):  # type: ignore[no-untyped-def]
        if seq == 1 and not failed:
            failed.append(seq)
            await asyncio.sleep(0.3)
            raise IngestError("overloaded", "shard 0 is restarting (test)", fatal=True)
        return await apply(parts, shards, producer, seq, expect)

    monkeypatch.setattr(service, "_apply", restart_once)
    batches = [{"op": "inc", "seq": q, "rows": [row(value=q)]} for q in (1, 2)]
    with hello(tally.tcp_port, "fatal") as conn:
        conn.send(b"".join(encode_frame(f) for f in batches))
        answer = conn.receive()
        assert (answer["op"], answer["seq"], answer["code"]) == ("error", 1, "overloaded")
        assert conn.closed_by_server()  # and no answer for seq 2
    assert tally.total("acme", "m", DAY) == 0
    with hello(tally.tcp_port, "fatal") as conn:  # the client resends from seq 1
        conn.send(b"".join(encode_frame(f) for f in batches))
        assert [conn.receive()["op"] for _ in batches] == ["ack", "ack"]
    assert tally.total("acme", "m", DAY) == 3


def test_a_handler_that_fails_unexpectedly_ends_its_connection_only(
    tally, monkeypatch, caplog
) -> None:
    service = tally.service
    ingest = service.ingest

    async def broken(batch, producer=None, seq=None, epoch=None):  # type: ignore[no-untyped-def]
        if seq == 2:
            await asyncio.sleep(0.3)  # seq 3 is decoded and queued behind it meanwhile
            raise RuntimeError("boom in a handler")
        return await ingest(batch, producer, seq, epoch)

    monkeypatch.setattr(service, "ingest", broken)
    batches = [{"op": "inc", "seq": q, "rows": [row(value=q)]} for q in (1, 2, 3)]
    with hello(tally.tcp_port, "broken") as conn:
        conn.send(b"".join(encode_frame(f) for f in batches))
        assert conn.receive() == {"op": "ack", "seq": 1, "rows": 1}
        assert conn.closed_by_server()  # nothing answered for 2 or 3
    with hello(tally.tcp_port, "other") as other:
        assert other.request({"op": "inc", "seq": 1, "rows": [row(value=10)]})["op"] == "ack"
    assert "boom in a handler" in caplog.text
    assert tally.total("acme", "m", DAY) == 11  # seq 3 was not applied past seq 2


def test_an_idle_connection_between_frames_is_not_timed_out(strict) -> None:
    with hello(strict.tcp_port) as conn:
        time.sleep(1.2)  # more than twice frame_timeout, between frames
        assert conn.request({"op": "ping"}) == {"op": "pong"}


def test_connections_over_the_maximum_are_refused_overloaded(strict) -> None:
    conns = [hello(strict.tcp_port, f"p{n}") for n in range(3)]
    try:
        with RawConnection(strict.tcp_port) as extra:
            answer = extra.receive()
            assert (answer["op"], answer["code"]) == ("error", "overloaded")
            assert answer["message"] == "too many connections (at most 3); retry later"
            assert extra.closed_by_server()
        conns.pop().sock.close()
        deadline = time.monotonic() + 30  # the server notices the close; bounds a hang
        while True:  # the freed place is taken by the next connection
            try:
                conns.append(hello(strict.tcp_port, "late"))
                break
            except (AssertionError, ConnectionError):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert conns[-1].request({"op": "inc", "seq": 1, "rows": [row()]})["op"] == "ack"
    finally:
        for c in conns:
            c.sock.close()


def test_the_client_library_waits_for_a_free_connection(strict) -> None:
    conns = [hello(strict.tcp_port, f"p{n}") for n in range(3)]
    with TallyClient("127.0.0.1", strict.tcp_port, producer="patient",
                     backoff=(0.05, 0.2)) as client:
        client.inc("acme", "m", 4, tags={"k": "v"}, ts=TS)
        time.sleep(0.5)  # refused with overloaded meanwhile: it backs off, retries
        for c in conns:
            c.sock.close()
        client.flush(durable=True, timeout=20)
    assert strict.total("acme", "m", DAY) == 4


def test_a_frame_over_the_configured_limit_is_too_large(strict) -> None:
    with hello(strict.tcp_port) as conn:
        answer = conn.request(struct.pack(">I", (1 << 16) + 1))
        assert answer["code"] == "too_large"
        assert answer["message"] == "frame of 65537 bytes exceeds the limit of 65536 bytes"
        assert conn.closed_by_server()


# ----------------------------------------------------------------- HTTP: bad input


def test_http_refusals_name_the_field_and_change_nothing(tally) -> None:
    url = tally.url + "/v1/increments"
    assert httpx.post(url, json={"rows": [row(value=9)]}).json() == {"rows": 1}
    cases = [
        ({"rows": [row(), ["acme", "m", None, TS, "1"]]}, 400, "bad_row", "row 1"),
        ({"rows": [row(), row(), ["acme", "", None, TS, 1]]}, 400, "bad_row", "row 2"),
        ({"rows": "lots"}, 400, "bad_request", "rows"),
        ({}, 400, "bad_request", "missing rows"),
        ({"rows": [row()], "ack": "eventually"}, 400, "bad_request", "ack must be"),
        ({"rows": [row()], "producer": "x"}, 400, "bad_request", "producer and seq go together"),
        ({"rows": [row()], "producer": "x", "seq": 0}, 400, "bad_request", "seq 0"),
        ({"series": [["acme", "m", None]], "i": [0], "ts": [TS], "v": [2**63]}, 400,
         "bad_row", "row 0"),
        ({"series": [["acme", "m", None]], "i": [0, 0], "ts": [TS], "v": [1]}, 400,
         "bad_request", ""),
    ]
    for body, status, code, words in cases:
        r = httpx.post(url, json=body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["code"] == code and words in error["message"], (body, error)
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_request")
    assert "not valid application/json" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"\xc1", headers={"content-type": "application/msgpack"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_request")
    r = httpx.post(url, content=b"rows", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "content-type 'text/plain'" in r.json()["error"]["message"]
    assert tally.total("acme", "m", DAY) == 9


def test_an_http_body_over_the_limit_is_413(strict) -> None:
    body = {"rows": [row()] * 3000}  # > 64 KiB as JSON
    r = httpx.post(strict.url + "/v1/increments", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (413, "too_large")
    assert strict.total("acme", "m", DAY) == 0


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"from": "2026-13-01", "to": "2026-12-31"}, "from '2026-13-01' is not a valid date"),
        ({"from": "2026-11-20", "to": "2026-11-01"}, "from 2026-11-20 is after to 2026-11-01"),
        ({"from": "2026-01-01", "to": "2026-12-31", "tz": "Mars/Olympus"}, "tz 'Mars/Olympus'"),
        ({"from": "2026-01-01", "to": "2026-12-31", "tz": "Asia/Kolkata"}, "Asia/Kolkata"),
        ({"from": "2026-01-01", "to": "2026-12-31", "granularity": "minute"},
         "granularity 'minute'"),
        ({"from": "2000-01-01", "to": "2026-12-31"}, "at most 400 days per query"),
        ({"from": "2026-01-01", "to": "2026-12-31", "compare": "yesterday"}, "compare"),
        ({"from": "2026-01-01", "to": "2026-12-31", "where": "channel"}, "key:value"),
        ({"to": "2026-12-31"}, "from"),
    ],
)
def test_query_guards_answer_400_with_a_reason(tmp_path, params, words) -> None:
    server = InProcessTally(tmp_path, max_query_days=400).start()
    try:
        r = httpx.get(server.url + "/v1/series", params={"tenant": "acme", "metric": "m",
                                                         **params})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "bad_request"
        assert words in r.json()["error"]["message"], r.json()
    finally:
        server.stop()


def test_unknown_routes_and_methods_keep_the_error_shape(tally) -> None:
    r = httpx.get(tally.url + "/v2/nothing")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    r = httpx.get(tally.url + "/v1/increments")
    assert (r.status_code, r.json()["error"]["code"]) == (405, "method_not_allowed")
    r = httpx.get(tally.url + "/v1/breakdown", params={"tenant": "acme", "metric": "m",
                                                       "from": DAY, "to": DAY, "by": "k",
                                                       "limit": 0})
    assert r.status_code == 400 and "limit" in r.json()["error"]["message"]
