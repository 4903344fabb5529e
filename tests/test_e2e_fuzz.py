"""End to end: a few thousand random frames at a running ``tally serve``, then exact totals.

Design guarantee 6 over real sockets: malformed frames, invalid rows and
protocol mistakes get the documented error (``bad_frame``/``too_large`` close
the connection, the others do not), a batch is applied all or nothing, other
connections are unaffected, and the service keeps answering. The valid
batches that were acknowledged, and only those, are counted, exactly once
(guarantee 3: a resent seq is acknowledged again but not applied).

Everything is drawn from one fixed seed. Frames are written with plain
sockets and ``wire.frames`` (not the client library), on several connections
at once; each connection has its own producer, so its seqs start at 1.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from served import Served

from tally.client import Connection, TallyClient
from tally.wire.frames import DEFAULT_MAX_FRAME, FrameDecoder, FrameError, encode_frame

pytestmark = pytest.mark.e2e

SEED = 20261120
FRAMES = 3000  # frames written in all, hellos and broken ones included
WORKERS = 4  # connections served at the same time

SERIES: list[tuple[str, str, dict[str, str] | None]] = [
    ("fuzz", "hits", None),
    ("fuzz", "hits", {"channel": "a"}),
    ("fuzz", "hits", {"channel": "b"}),
    ("fuzz", "hits", {"channel": "b", "agent": "x%,=|"}),
    ("fuzz", "hits", {"agent": "x%,=|", "channel": "b"}),  # the same series again
    ("fuzz", "misses", {"channel": "a"}),
    ("other", "hits", {"channel": "a"}),
]
QUERIES = [("fuzz", "hits", {}), ("fuzz", "hits", {"channel": "a"}),
           ("fuzz", "hits", {"channel": "b"}), ("fuzz", "misses", {}), ("other", "hits", {})]

Row = list[Any]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def bad_rows(now: int) -> list[Row]:
    """Rows that break the data model, each on its own."""
    return [
        ["fuzz", "hits", None, now - 10, "7"],
        ["fuzz", "hits", None, now - 10, 1.5],
        ["fuzz", "hits", None, now - 10, 2**63],  # msgpack uint64
        ["fuzz", "hits", None, now - 10, 2**64 - 1],
        ["Fuzz", "hits", None, now - 10, 1],
        ["", "hits", None, now - 10, 1],
        ["fuzz", "hi ts", None, now - 10, 1],
        ["fuzz", "hits", {"Bad": "x"}, now - 10, 1],
        ["fuzz", "hits", {"a": "x" * 201}, now - 10, 1],
        ["fuzz", "hits", {"a": 1}, now - 10, 1],
        ["fuzz", "hits", ["a"], now - 10, 1],
        ["fuzz", "hits", None, now + 7200, 1],  # two hours ahead of the server clock
        ["fuzz", "hits", None, -1, 1],
        ["fuzz", "hits", None, float(now - 10), 1],
        ["fuzz", "hits", None, None, 1],
        ["fuzz", "hits", None, now - 10],
        ["fuzz", "hits", None, now - 10, 1, 1],
        {"tenant": "fuzz"},
        None,
        "fuzz,hits,1",
    ]


@dataclass
class Step:
    """One frame to write (bytes) and the reply it must get (None: no reply)."""

    data: bytes
    want: dict[str, Any] | None
    rows: list[Row] | None = None  # the increments of a valid batch, counted once acked
    seq: int | None = None


@dataclass
class Plan:
    producer: str
    steps: list[Step]
    pipelined: bool  # all steps at once, or one reply before the next step
    end: str  # "close", "fatal" (a bad frame: the server answers and closes), "eof" (we stop)
    end_step: Step | None = None


@dataclass
class Outcome:
    mismatches: list[str] = field(default_factory=list)
    counted: list[Row] = field(default_factory=list)  # rows of acknowledged new batches
    frames: int = 0
    replies: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))


def err(code: str, seq: int | None = None, row: int | None = None) -> dict[str, Any]:
    want: dict[str, Any] = {"op": "error", "seq": seq, "code": code}
    if row is not None:
        want["row"] = row
    return want


def columnar(rows: list[Row], rnd: random.Random) -> dict[str, Any]:
    keys: list[tuple] = []
    index: dict[tuple, int] = {}
    idx = []
    for tenant, metric, tags, _, _ in rows:
        key = (tenant, metric, tuple(sorted((tags or {}).items())))
        if key not in index:
            index[key] = len(keys)
            keys.append((tenant, metric, tags))
        idx.append(index[key])
    return {
        "series": [list(k) for k in keys],
        "i": np.asarray(idx, "<u4").tobytes(),
        "ts": np.asarray([r[3] for r in rows], "<i8").tobytes(),
        "v": np.asarray([r[4] for r in rows], "<i8").tobytes(),
    }


class Planner:
    """Draws connections and frames from one seeded generator, with the replies they need."""

    def __init__(self, seed: int, now: int) -> None:
        self.rnd = random.Random(seed)
        self.now = now
        self.bad = bad_rows(now)
        self.connections = 0

    def row(self) -> Row:
        rnd = self.rnd
        tenant, metric, tags = rnd.choice(SERIES)
        ts = self.now - rnd.randrange(60, 3 * 86400)
        value = rnd.choice((1, 1, 1, 2, 5, -1, 0, rnd.randrange(1000)))
        return [tenant, metric, dict(tags) if tags is not None else None, ts, value]

    def plan(self) -> Plan:
        rnd = self.rnd
        self.connections += 1
        producer = f"fuzz-{self.connections}"
        steps: list[Step] = []
        if rnd.random() < 0.06:  # no hello: the first frame must be hello
            first = rnd.choice([{"op": "ping"}, {"op": "inc", "seq": 1, "rows": [self.row()]}])
            steps.append(Step(encode_frame(first), err("bad_request")))
            return Plan(producer, steps, pipelined=False, end="closed by server")
        hello = {"op": "hello", "v": 1, "token": None, "producer": producer}
        steps.append(Step(encode_frame(hello), {"op": "welcome", "v": 1, "durable_seq": 0}))
        seq = 0
        acked: list[Step] = []
        for _ in range(rnd.randrange(1, 40)):
            kind = rnd.choices(
                ["rows", "columnar", "bad row", "bad columnar", "resend", "ping", "unknown op",
                 "no op", "hello again", "seq 0", "bad ack", "both forms", "bad event"],
                [30, 20, 10, 6, 5, 8, 4, 3, 2, 2, 2, 2, 1],
            )[0]
            if kind == "resend" and acked:
                old = rnd.choice(acked)
                steps.append(Step(old.data, old.want))  # acknowledged again, not counted
                continue
            if kind in ("rows", "columnar", "resend"):
                seq += 1
                rows = [self.row() for _ in range(rnd.randrange(0, 25))]
                msg: dict[str, Any] = {"op": "inc", "seq": seq}
                if rnd.random() < 0.3:
                    msg["ack"] = rnd.choice(["received", "durable", None])
                if kind == "columnar":
                    msg.update(columnar(rows, rnd))
                else:
                    msg["rows"] = rows
                step = Step(encode_frame(msg), {"op": "ack", "seq": seq, "rows": len(rows)},
                            rows, seq)
                acked.append(step)
                steps.append(step)
            elif kind == "bad row":
                seq += 1
                rows = [self.row() for _ in range(rnd.randrange(0, 12))]
                k = rnd.randrange(len(rows) + 1)
                rows.insert(k, rnd.choice(self.bad))
                steps.append(Step(encode_frame({"op": "inc", "seq": seq, "rows": rows}),
                                  err("bad_row", seq, k)))
            elif kind == "bad columnar":
                seq += 1
                rows = [self.row() for _ in range(rnd.randrange(1, 12))]
                k = rnd.randrange(len(rows))
                msg = {"op": "inc", "seq": seq, **columnar(rows, rnd)}
                idx = np.frombuffer(msg["i"], "<u4").copy()
                ts = np.frombuffer(msg["ts"], "<i8").copy()
                how = rnd.choice(["i", "future", "negative", "series"])
                if how == "i":
                    idx[k] = len(msg["series"]) + rnd.randrange(3)
                elif how == "future":
                    ts[k] = self.now + 7200
                elif how == "negative":
                    ts[k] = -1
                else:
                    idx[k] = len(msg["series"])
                    msg["series"].append(["fuzz", "hits", {"Bad": "tag"}])
                msg["i"], msg["ts"] = idx.tobytes(), ts.tobytes()
                steps.append(Step(encode_frame(msg), err("bad_row", seq, k)))
            elif kind == "ping":
                steps.append(Step(encode_frame({"op": "ping"}), {"op": "pong"}))
            elif kind == "unknown op":
                op = rnd.choice(["incr", "INC", "durable", "ack", "welcome", "pong", "", "\u00e9"])
                steps.append(Step(encode_frame({"op": op, "seq": 3}), err("bad_request", 3)))
            elif kind == "no op":
                msg = rnd.choice([{}, {"seq": 2, "rows": []}, {"op": None}, {"op": 1},
                                  {b"op": "inc"}, {1: 2}])
                steps.append(Step(encode_frame(msg), err("bad_request", msg.get("seq"))))
            elif kind == "hello again":
                steps.append(Step(encode_frame(hello), err("bad_request")))
            elif kind == "seq 0":
                steps.append(Step(encode_frame({"op": "inc", "seq": 0, "rows": [self.row()]}),
                                  err("bad_request", 0)))
            elif kind == "bad ack":
                steps.append(Step(encode_frame({"op": "inc", "seq": seq + 1, "ack": "maybe",
                                                "rows": [self.row()]}),
                                  err("bad_request", seq + 1)))
            elif kind == "both forms":
                rows = [self.row()]
                msg = {"op": "inc", "seq": seq + 1, "rows": rows, **columnar(rows, rnd)}
                steps.append(Step(encode_frame(msg), err("bad_request", seq + 1)))
            else:  # events must be a list, whatever rules are loaded
                steps.append(Step(encode_frame({"op": "event", "seq": seq + 1, "events": 5}),
                                  err("bad_request", seq + 1)))
        pipelined = rnd.random() < 0.6
        end = rnd.choices(["close", "fatal", "truncated", "random", "abort"],
                          [40, 35, 10, 10, 5])[0]
        if end == "fatal":
            return Plan(producer, steps, pipelined, "fatal", self.fatal_step())
        if end == "truncated":  # part of a valid frame, then end of stream: no answer
            frame = steps[-1].data if len(steps[-1].data) > 1 else encode_frame({"op": "ping"})
            cut = frame[: rnd.randrange(1, len(frame))]
            return Plan(producer, steps, pipelined, "eof", Step(cut, None))
        if end == "random":
            return Plan(producer, steps, pipelined, "eof", self.random_bytes_step())
        return Plan(producer, steps, pipelined, end)

    def fatal_step(self) -> Step:
        """A frame that breaks the stream: the server answers it, then closes."""
        rnd = self.rnd
        kind = rnd.choice(["huge prefix", "over max", "zero", "not msgpack", "not a map",
                           "trailing bytes", "ext type", "bad utf-8"])
        if kind == "huge prefix":
            return Step(struct.pack(">I", 0xFFFFFFFF), err("too_large"))
        if kind == "over max":
            return Step(struct.pack(">I", DEFAULT_MAX_FRAME + 1), err("too_large"))
        if kind == "zero":
            return Step(struct.pack(">I", 0), err("bad_frame"))
        if kind == "not msgpack":
            body = rnd.choice([b"\xc1", b"\xc1\xc1\xc1", b"{\"op\": \"ping\"}", b"\x81\xc1"])
        elif kind == "not a map":
            body = msgpack.packb(rnd.choice([[1, 2], "op", 7, None, b"\x00", [{"op": "ping"}]]))
        elif kind == "trailing bytes":
            body = msgpack.packb({"op": "ping"}) + b"\x00"
        elif kind == "ext type":
            body = msgpack.packb({"op": "ping", "t": msgpack.ExtType(5, b"xx")})
        else:
            body = b"\x81\xa2op\xa4p\xffng"
        return Step(struct.pack(">I", len(body)) + body, err("bad_frame"))

    def random_bytes_step(self) -> Step:
        """Raw random bytes, then end of stream; the reply is what the codec makes of them."""
        while True:
            data = self.rnd.randbytes(self.rnd.randrange(1, 64))
            try:
                if FrameDecoder().feed(data):
                    continue  # it happens to hold a whole frame: draw again
                return Step(data, None)  # an incomplete frame: no answer
            except FrameError as e:
                if not e.messages:
                    return Step(data, err(e.code))


def read_replies(sock: socket.socket, decoder: FrameDecoder, pending: list[dict], n: int,
                 durables: list[int]) -> list[dict]:
    """The next ``n`` replies, with ``durable`` frames (which trail acks) set aside."""
    while len(pending) < n:
        data = sock.recv(1 << 16)
        if not data:
            break
        for m in decoder.feed(data):
            if m.get("op") == "durable":
                durables.append(m["seq"])
            else:
                pending.append(m)
    out, pending[:] = pending[:n], pending[n:]
    return out


def read_to_eof(sock: socket.socket, decoder: FrameDecoder, pending: list[dict],
                durables: list[int]) -> bool:
    """True once the server has closed; every frame before that lands in ``pending``."""
    sock.settimeout(5)
    try:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return True
            for m in decoder.feed(data):
                (durables.append(m["seq"]) if m.get("op") == "durable" else pending.append(m))
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def run_plan(port: int, plan: Plan, rnd: random.Random) -> Outcome:
    out = Outcome()
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    decoder = FrameDecoder()
    pending: list[dict] = []
    durables: list[int] = []
    got: list[dict] = []
    try:
        if plan.pipelined:
            stream = b"".join(s.data for s in plan.steps)
            cuts = sorted(rnd.sample(range(1, len(stream)), min(3, len(stream) - 1)))
            for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
                sock.sendall(stream[a:b])
            got = read_replies(sock, decoder, pending, len(plan.steps), durables)
        else:
            for s in plan.steps:
                sock.sendall(s.data)
                got += read_replies(sock, decoder, pending, 1, durables)
        out.frames += len(plan.steps)
        end = plan.end_step
        if end is not None:
            sock.sendall(end.data)
            out.frames += 1
            if plan.end == "eof":
                sock.shutdown(socket.SHUT_WR)
            if not read_to_eof(sock, decoder, pending, durables):
                out.mismatches.append(f"{plan.producer}: the server did not close after "
                                      f"{end.data[:16]!r}")
            got += pending
            pending.clear()
        elif plan.end == "closed by server":
            if not read_to_eof(sock, decoder, pending, durables) or pending:
                out.mismatches.append(f"{plan.producer}: still open after a frame before hello")
        elif plan.end == "abort":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()

    wants = [s.want for s in plan.steps]
    if end is not None and end.want is not None:
        wants.append(end.want)
    if len(got) != len(wants):
        out.mismatches.append(f"{plan.producer}: {len(got)} replies for {len(wants)} frames")
    seen: set[int] = set()
    for n, (reply, want) in enumerate(zip(got, wants, strict=False)):
        out.replies[f"{reply.get('op')} {reply.get('code', '')}".strip()] += 1
        if reply.get("op") == "error":
            message = reply.get("message")
            if not (isinstance(message, str) and message):
                out.mismatches.append(f"{plan.producer} #{n}: error without message {reply}")
            reply = {k: v for k, v in reply.items() if k != "message"}
        if reply != want:
            out.mismatches.append(f"{plan.producer} #{n}: got {reply}, want {want}")
    # what counts is what was acknowledged: a new seq's rows, once
    for reply, step in zip(got, plan.steps, strict=False):
        if reply.get("op") == "ack" and step.rows is not None and step.seq not in seen:
            seen.add(step.seq)  # type: ignore[arg-type]
            out.counted.extend(step.rows)
    durable_ok = {s.seq for s in plan.steps if s.seq is not None}
    if any(d not in durable_ok for d in durables) or durables != sorted(durables):
        out.mismatches.append(f"{plan.producer}: durable frames {durables}")
    return out


def edge_plan(today: date) -> Plan:
    """Batches at the int64 limits of one series, in order on one connection.

    An increment that would take an hour, or a UTC day (month documents keep day
    totals), out of int64 is a bad row and refuses its whole batch, on every
    shard; values that stay inside are exact.
    """
    day1 = int(datetime(today.year, today.month, today.day, tzinfo=UTC).timestamp()) - 2 * 86400
    h1, h2, h3, h4 = day1 + 3 * 3600, day1 + 5 * 3600, day1 + 86400 + 3600, day1 + 86400 + 7200
    edge = ["edge", "m", None]
    hello = {"op": "hello", "v": 1, "token": None, "producer": "edge"}
    steps = [Step(encode_frame(hello), {"op": "welcome", "v": 1, "durable_seq": 0})]
    for seq, (rows, want) in enumerate([
        ([[*edge, h1, INT64_MAX]], None),
        ([[*edge, h1, 1]], err("bad_row", 2, 0)),  # the hour would leave int64
        ([[*edge, h2, INT64_MIN]], None),  # the day's total is -1
        ([["fuzz", "hits", {"channel": "a"}, h2, 1000], [*edge, h2, -1]], err("bad_row", 4, 1)),
        ([[*edge, h3, INT64_MIN]], None),
        ([[*edge, h4, -1]], err("bad_row", 6, 0)),  # every hour fits; the day would not
        ([[*edge, h4, 5]], None),
    ], start=1):
        ok = {"op": "ack", "seq": seq, "rows": len(rows)}
        steps.append(Step(encode_frame({"op": "inc", "seq": seq, "rows": rows}), want or ok,
                          rows, seq))
    return Plan("edge", steps, pipelined=False, end="close")


def utc_day(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


def check_totals(http: httpx.Client, counted: list[Row], start: date, end: date) -> int:
    """Series by day, by hour and breakdowns equal the sums of the acknowledged rows."""
    n = 0
    days = [(start + timedelta(days=k)).isoformat() for k in range((end - start).days + 1)]
    for tenant, metric, where in QUERIES:
        rows = [r for r in counted if (r[0], r[1]) == (tenant, metric)
                and where.items() <= (r[2] or {}).items()]
        by_day: dict[str, int] = defaultdict(int)
        by_hour: dict[int, int] = defaultdict(int)
        by_channel: dict[str | None, int] = defaultdict(int)
        for r in rows:
            by_day[utc_day(r[3])] += r[4]
            by_hour[r[3] // 3600] += r[4]
            by_channel[(r[2] or {}).get("channel")] += r[4]
        params = {"tenant": tenant, "metric": metric, "from": start.isoformat(),
                  "to": end.isoformat(), "where": [f"{k}:{v}" for k, v in where.items()]}
        got = http.get("/v1/series", params=params)
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["points"] == [[d, by_day[d]] for d in days], (tenant, metric, where)
        assert body["total"] == sum(r[4] for r in rows)
        got = http.get("/v1/series", params={**params, "granularity": "hour"})
        assert got.status_code == 200, got.text
        first_hour = int(datetime(start.year, start.month, start.day, tzinfo=UTC).timestamp())
        assert [v for _, v in got.json()["points"]] == [
            by_hour[first_hour // 3600 + k] for k in range(24 * len(days))], (tenant, metric)
        got = http.get("/v1/breakdown", params={**params, "by": "channel", "limit": 100})
        assert got.status_code == 200, got.text
        body = got.json()
        assert {g["value"]: g["total"] for g in body["groups"]} == {
            k: v for k, v in by_channel.items() if v}, (tenant, metric, where)
        assert body["other"] == 0 and body["total"] == sum(by_channel.values())
        n += 3
    return n


@pytest.fixture
def served(tmp_path):
    server = Served(tmp_path, "sqlite:///" + str(tmp_path / "t.db"), shards=2).start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            code = server.stop()
            assert code == 0, server.output()[-3000:]


def test_random_frames_never_crash_the_server_and_totals_stay_exact(served: Served) -> None:
    """~3000 random frames on many connections; every reply as documented, totals exact.

    Afterwards /healthz answers, a normal client still ingests (and its batch
    becomes durable), and the server logged no error from its TCP shell.
    """
    now = int(time.time())
    planner = Planner(SEED, now)
    plans: list[Plan] = []
    frames = 0
    while frames < FRAMES:
        plans.append(planner.plan())
        frames += len(plans[-1].steps) + (plans[-1].end_step is not None)
    rnds = [random.Random(SEED + k) for k in range(len(plans))]
    started = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        outcomes = list(pool.map(lambda pr: run_plan(served.tcp_port, *pr), zip(plans, rnds,
                                                                                   strict=True)))
    elapsed = time.monotonic() - started
    mismatches = [m for o in outcomes for m in o.mismatches]
    counted = [r for o in outcomes for r in o.counted]
    replies: dict[str, int] = defaultdict(int)
    for o in outcomes:
        for k, v in o.replies.items():
            replies[k] += v
    sent = sum(o.frames for o in outcomes)
    assert sent >= FRAMES
    assert not mismatches, f"{len(mismatches)} unexpected replies:\n" + "\n".join(mismatches[:30])
    # the mixture really was mixed (guards the generator, not the server)
    assert len(plans) > 100 and len(counted) > 5000, (len(plans), len(counted))
    for kind in ("ack", "pong", "welcome", "error bad_row", "error bad_request",
                 "error bad_frame", "error too_large"):
        assert replies[kind] > 10, dict(replies)

    assert httpx.get(served.url + "/healthz", timeout=10).status_code == 200
    today = datetime.fromtimestamp(now, UTC).date()
    edge = run_plan(served.tcp_port, edge_plan(today), random.Random(SEED))
    assert not edge.mismatches, edge.mismatches
    assert [r[4] for r in edge.counted] == [INT64_MAX, INT64_MIN, INT64_MIN, 5]
    with httpx.Client(base_url=served.url, timeout=30) as http:
        assert check_totals(http, counted, today - timedelta(days=4), today) == 15
        got = http.get("/v1/series", params={
            "tenant": "edge", "metric": "m", "from": (today - timedelta(days=2)).isoformat(),
            "to": (today - timedelta(days=1)).isoformat()})
        assert got.status_code == 200, got.text
        assert got.json()["points"] == [[(today - timedelta(days=2)).isoformat(), -1],
                                        [(today - timedelta(days=1)).isoformat(), INT64_MIN + 5]]

        # a well-behaved client is unaffected: rows over Connection, then durable via TallyClient
        with Connection("127.0.0.1", served.tcp_port) as conn:
            assert conn.send_rows([["fuzz", "hits", {"channel": "a"}, now - 30, 11]]) == {
                "op": "ack", "seq": 1, "rows": 1}
        client = TallyClient("127.0.0.1", served.tcp_port, timeout=30)
        try:
            client.inc("fuzz", "hits", 31, ts=now - 30, tags={"channel": "a"})
            client.flush(durable=True)
        finally:
            client.close()
        counted += [["fuzz", "hits", {"channel": "a"}, now - 30, 11],
                    ["fuzz", "hits", {"channel": "a"}, now - 30, 31]]
        check_totals(http, counted, today - timedelta(days=4), today)

    log = served.output()
    assert '"where": "tcp"' not in log, log[-3000:]
    assert "outside int64" not in log, log[-3000:]  # no checkpoint refused by the store
    assert served.proc is not None and served.proc.poll() is None
    print(f"{sent} frames on {len(plans)} connections in {elapsed:.1f} s; "
          f"{len(counted)} increments counted; replies {dict(replies)}")
