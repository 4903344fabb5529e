"""A socket from a gateway straight to a shard, for queries and ingest.

A Ray actor call costs several times what a round trip over a kept-open
socket between the same two processes does, and was most of a one-series
query (docs/performance.md has the figures). So a shard
also listens on a socket of its own for ``hourly_of`` and ``totals_of``, and
answers there on its event loop, between the same batches as a Ray call
would: a query still sees every batch acknowledged before it.

The same holds for ``apply``, a batch of a producer: the Ray call's fixed
CPU cost on each side is paid once per shard per frame, and was most of a
row frame's cost. Only batches with a
producer take the socket, and a request that was sent and never answered
is not asked again of Ray: it may have been applied, so the call fails as a
Ray call to a shard that died would, and the client resends (the shard
recognises a resend by its seq, whichever road the first one took).

Everything else stays on Ray (checkpoints, restarts, placement, reverts), and
this road is only ever a shortcut: whatever goes wrong on it before a request
is sent (a shard that restarted on a new port, a port the gateway's node
cannot reach), or what the shard will not answer on it (a count beyond what
msgpack carries, an error inside the shard, a request it cannot read), turns
into the same Ray call as before, which answers or raises as it always did.

Frames are tally's wire frames (wire/frames.py). A connection opens with
``{"op": "hello", "secret": ...}``: each shard makes a secret when it starts
listening and tells it only through Ray (``ShardActor.query_channel``), so
only a process of the Ray cluster can ask. Then ``{"id", "m", "sids", "h0",
"h1"}`` (a query) or ``{"id", "m": "apply", "b": batch, "p", "s", "e"}`` is
answered by ``{"id", "ok": answer}`` or ``{"id", "ray": why}``.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from tally.actors.channel_table import Known, Sent
from tally.wire import stream
from tally.wire.batches import Batch
from tally.wire.frames import FrameDecoder, FrameError, encode_frame

log = logging.getLogger("tally.channel")

METHODS = ("hourly_of", "totals_of")
MAX_FRAME = 64 * 1024 * 1024  # a breakdown's sids (~40 bytes each), a frame's part
# A connection's receive buffer (wire/stream.py): a frame's part for a shard is ~50 KB (5,000
# rows), and a longer request gets a buffer of its own size. Two per shard are kept.
READ_SIZE = 256 * 1024
HELLO_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
RETRY_AFTER = 5.0  # after a failed connect, Ray answers alone this long

Query = Callable[[str, list[str], int, int], Any]  # (method, sids, h0, h1) -> its answer
# (batch, producer, seq, expect) -> what the shard answers (ShardState.ingest, as a dict)
Apply = Callable[[Batch, str, int, int | None, Known],
                 dict[str, Any] | Awaitable[dict[str, Any]]]


# a request's fields, or how to build them for the connection that writes it
Fields = dict[str, Any] | Callable[["_Connection"], dict[str, Any]]


class _Fallback:
    def __repr__(self) -> str:
        return "FALLBACK"


FALLBACK: Any = _Fallback()  # what a channel answers when the Ray call must answer instead
LOST: Any = object()  # a connection's answer to an apply it sent and lost


class AnswerLost(ConnectionError):
    """A request went out and the connection ended before its answer: an ``apply`` may
    or may not have happened, so it is not asked again (the caller fails the batch)."""


# ---- the codec: requests and answers, no I/O -----------------------------


def request(rid: int, method: str, fields: dict[str, Any]) -> bytes:
    return encode_frame({"id": rid, "m": method, **fields})


def query_fields(sids: list[str], h0: int, h1: int) -> dict[str, Any]:
    return {"sids": sids, "h0": h0, "h1": h1}


def apply_fields(batch: Batch, producer: str, seq: int, expect: int | None,
                 sent: Sent | None = None) -> dict[str, Any]:
    """An ``apply``'s fields; with ``sent`` (the socket's), series go by number."""
    wire = batch.to_wire() if sent is None else sent.fields(batch)
    return {"b": wire, "p": producer, "s": seq, "e": expect}


def _malformed(rid: Any, msg: dict[str, Any]) -> bytes:
    log.warning(json.dumps({"event": "error", "where": "query channel",
                            "error": f"malformed request {str(msg)[:200]}"}))
    return encode_frame({"id": rid, "ray": "malformed request"})


async def answer_apply(msg: dict[str, Any], apply: Apply, known: Known | None = None
                       ) -> bytes:
    """The answer to an ``apply``: what the shard answered, or "ask Ray" when it did not
    apply (a request it cannot read, an error inside it: the Ray call meets it again).
    ``known``: the socket's numbered series (actors/channel_table.py)."""
    rid = msg.get("id")
    producer, seq, expect = msg.get("p"), msg.get("s"), msg.get("e")
    known = known if known is not None else Known()
    batch = known.batch(msg.get("b"))
    if (batch is None or type(producer) is not str or type(seq) is not int
            or (expect is not None and type(expect) is not int)):
        return _malformed(rid, msg)
    try:
        result = apply(batch, producer, seq, expect, known)
        if inspect.isawaitable(result):  # (a shard writes a batch in slices: see shard.py)
            result = await result
    except Exception as e:
        return encode_frame({"id": rid, "ray": f"{type(e).__name__}: {e}"[:500]})
    return encode_frame({"id": rid, "ok": result})  # applied: if this raises, the
    # connection ends and the gateway fails the batch (the client resends it)


def answer(msg: dict[str, Any], query: Query) -> bytes:
    """The answer frame to one query; anything it cannot carry says "ask Ray"."""
    rid = msg.get("id")
    method, sids, h0, h1 = (msg.get(k) for k in ("m", "sids", "h0", "h1"))
    if (method not in METHODS or type(sids) is not list
            or not all(type(s) is str for s in sids)
            or type(h0) is not int or type(h1) is not int):
        return _malformed(rid, msg)
    try:
        result = query(method, sids, h0, h1)
    except Exception as e:  # the Ray call will meet it again and raise it to the gateway
        return encode_frame({"id": rid, "ray": f"{type(e).__name__}: {e}"[:500]})
    if isinstance(result, np.ndarray):
        if result.dtype != np.int64:  # Python ints beyond int64
            return encode_frame({"id": rid, "ray": "counts beyond int64"})
        return encode_frame({"id": rid, "ok": result.astype("<i8", copy=False).tobytes()})
    try:
        return encode_frame({"id": rid, "ok": result})
    except (OverflowError, TypeError):  # a total beyond 64 bits
        return encode_frame({"id": rid, "ray": "totals beyond 64 bits"})


def result_of(method: str, msg: dict[str, Any]) -> Any:
    """An answer frame's result, or FALLBACK."""
    if "ok" not in msg:
        return FALLBACK
    ok = msg["ok"]
    if method == "apply":
        return ok if isinstance(ok, dict) else FALLBACK
    if method == "hourly_of":
        if not isinstance(ok, bytes) or len(ok) % 8:
            return FALLBACK
        return np.frombuffer(ok, "<i8").astype(np.int64)
    return ok if isinstance(ok, list) else FALLBACK


# ---- the shard's side ------------------------------------------------------


class ChannelServer:
    """Listens in a shard actor; ``query`` and ``apply`` run on its event loop like actor
    methods, so they come between the same batches as Ray calls."""

    def __init__(self, query: Query, apply: Apply | None = None) -> None:
        self.query = query
        self.apply = apply
        self.secret = secrets.token_hex(32)
        self.server: asyncio.base_events.Server | None = None
        self.answered = 0

    async def start(self, host: str) -> dict[str, Any]:
        self.server = await stream.start_server(self._serve, host, 0, READ_SIZE)
        port = self.server.sockets[0].getsockname()[1]
        return {"host": host, "port": port, "secret": self.secret}

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def _welcome(self, msg: dict[str, Any]) -> bool:
        given = msg.get("secret")
        return msg.get("op") == "hello" and isinstance(given, str) and hmac.compare_digest(
            given.encode(), self.secret.encode())

    async def _serve(self, reader: stream.ChunkReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder(MAX_FRAME)
        greeted = False
        known = Known()  # this socket's numbered series
        try:
            while True:
                data = await (reader.read() if greeted else
                              asyncio.wait_for(reader.read(), HELLO_TIMEOUT))
                if not data:
                    return
                for msg in decoder.feed(data):
                    if not greeted:
                        if not self._welcome(msg):
                            log.warning(json.dumps({"event": "channel_refused", "peer": str(
                                writer.get_extra_info("peername"))}))
                            return
                        greeted = True
                        continue
                    if msg.get("m") == "apply" and self.apply is not None:
                        writer.write(await answer_apply(msg, self.apply, known))
                    else:
                        writer.write(answer(msg, self.query))
                    self.answered += 1
                await writer.drain()
        except (ConnectionError, TimeoutError, FrameError) as e:
            log.info(json.dumps({"event": "channel_closed", "error": repr(e)}))
        except Exception as e:  # an answer that cannot be encoded: the caller fails it
            log.error(json.dumps({"event": "error", "where": "query channel",
                                  "error": repr(e)[:500]}))
        finally:
            writer.close()


# ---- the gateway's side ----------------------------------------------------


class _Connection:
    """One open channel: requests go out in order, answers resolve them by id."""

    def __init__(self, reader: stream.ChunkReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.waiting: dict[int, tuple[str, asyncio.Future]] = {}
        self.next_id = 0
        self.sent = Sent()  # the series this socket was told by number
        self.task = asyncio.get_running_loop().create_task(self._read())
        self.task.add_done_callback(self._ended)

    @property
    def open(self) -> bool:
        return not self.task.done()

    async def call(self, method: str, fields: Fields) -> Any:
        """The answer; FALLBACK if it was never sent or the shard says "ask Ray"; a
        request sent and unanswered when the connection ends gets ``LOST``. ``fields`` may
        be built for this connection (a callable), just before it is written."""
        if not self.open:  # ended; its callback may not have run yet
            return FALLBACK
        if callable(fields):
            fields = fields(self)
        self.next_id += 1
        rid = self.next_id
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.waiting[rid] = (method, done)
        self.writer.write(request(rid, method, fields))
        return await done

    async def _read(self) -> None:
        decoder = FrameDecoder(MAX_FRAME)
        while data := await self.reader.read():
            for msg in decoder.feed(data):
                method, done = self.waiting.pop(msg.get("id"), (None, None))
                if done is not None and not done.done():
                    done.set_result(result_of(method, msg))

    def _ended(self, task: asyncio.Task) -> None:
        """The connection is gone: the queries it still owed are asked of Ray instead;
        the applies are answered ``LOST`` (they may have been applied)."""
        if not task.cancelled() and task.exception() is not None:
            log.info(json.dumps({"event": "channel_lost", "error": repr(task.exception())}))
        for method, done in self.waiting.values():
            if not done.done():
                done.set_result(LOST if method == "apply" else FALLBACK)
        self.waiting.clear()
        self.writer.close()

    def close(self) -> None:
        self.task.cancel()


class ShardChannel:
    """A gateway's shortcut to one shard, opened on first use and again after a loss.

    ``locate`` asks the shard, through Ray, where it listens and its secret:
    a restarted shard listens elsewhere, so a lost connection locates again.
    """

    def __init__(self, locate: Callable[[], Awaitable[dict[str, Any]]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.locate = locate
        self.clock = clock
        self.conn: _Connection | None = None
        self.retry_at = 0.0
        self.lock = asyncio.Lock()
        self.answered = 0  # queries answered by the channel
        self.fell_back = 0  # by Ray instead
        self.applied = 0  # batches answered by the channel
        self.applies_by_ray = 0  # by Ray instead (counted by the caller, which makes them)
        self.applies_lost = 0  # sent, and the connection ended before the answer

    async def call(self, method: str, sids: list[str], h0: int, h1: int) -> Any:
        """A query's answer, or FALLBACK: ask Ray."""
        got = await self._call(method, query_fields(sids, h0, h1))
        if got is FALLBACK:
            self.fell_back += 1
        else:
            self.answered += 1
        return got

    async def apply(self, batch: Batch, producer: str, seq: int, expect: int | None) -> Any:
        """The shard's answer, or FALLBACK (not applied on this road: ask Ray); raises
        ``AnswerLost`` when the request went out and its answer did not come."""
        got = await self._call("apply", lambda conn: apply_fields(
            batch, producer, seq, expect, conn.sent))
        if got is LOST:
            self.applies_lost += 1
            raise AnswerLost("the shard's socket closed before it answered this batch")
        if got is not FALLBACK:
            self.applied += 1
        return got

    async def _call(self, method: str, fields: Fields) -> Any:
        conn = self.conn if self.conn is not None and self.conn.open else await self._connect()
        got = FALLBACK if conn is None else await conn.call(method, fields)
        if (got is FALLBACK or got is LOST) and conn is not None and not conn.open:
            self.retry_at = self.clock() + RETRY_AFTER  # lost (a restart): not at once
        return got

    async def _connect(self) -> _Connection | None:
        async with self.lock:
            if self.conn is not None and self.conn.open:
                return self.conn
            if self.clock() < self.retry_at:
                return None
            try:
                where = await asyncio.wait_for(self.locate(), CONNECT_TIMEOUT)
                reader, writer = await asyncio.wait_for(
                    stream.open_connection(where["host"], where["port"], READ_SIZE),
                    CONNECT_TIMEOUT)
            except Exception as e:  # Ray answers meanwhile; the reason is logged once per try
                self.retry_at = self.clock() + RETRY_AFTER
                log.warning(json.dumps({"event": "channel_unavailable", "error": repr(e)[:300],
                                        "retry_in_seconds": RETRY_AFTER}))
                return None
            writer.write(encode_frame({"op": "hello", "secret": where["secret"]}))
            self.conn = _Connection(reader, writer)
            return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

