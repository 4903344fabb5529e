"""The TCP ingress for wire protocol v1: an asyncio shell around the codec.

Frames of one connection are answered in order, and a producer's batches are
applied in order (the service's lock per producer), but they overlap: while a
batch waits for the shards, the connection's next frame is decoded and
validated (``PIPELINE``), work that otherwise left the gateway idle while the
shards worked. Different connections interleave on the event loop. Decoding and
validation are the sans-I/O parts in wire/; this module only moves bytes.
``durable`` frames trail the acks: a task per connection waits for each
batch's checkpoints in order and sends them as they complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tally.actors import logs
from tally.api.access import OPEN, AccessList, Denied, Grant
from tally.api.durability import ShardRestarted, Token
from tally.api.ingest import Incoming, build_batch, build_event_batch, check_ack
from tally.api.rules import BUILTIN, Rules
from tally.api.series_table import ConnectionTable
from tally.api.service import IngestError, Service
from tally.wire import stream
from tally.wire.batches import KnownSeries
from tally.wire.frames import (
    DEFAULT_MAX_FRAME,
    Events,
    FrameDecoder,
    FrameError,
    Hello,
    Inc,
    Ping,
    ProtocolError,
    SeriesTable,
    encode_frame,
    parse_message,
)
from tally.wire.vocabulary import ErrorCode

log = logging.getLogger("tally.tcp")
# A connection's receive buffer (wire/stream.py): reading pauses with this much unread.
READ_SIZE = 1 << 20
# A connection's batches in the works at once: one waiting for the shards, the next
# decoded, validated and queued behind it for its producer's turn.
PIPELINE = 2
PIPELINED_OPS = ("inc", "event")  # (after hello; anything else, series too, waits for those)
# A client cut off again and again (a producer in a reconnect loop, a scanner) is
# logged once per reason per this many seconds; the metric counts every one.
CUT_OFF_LOG_SECONDS = 10.0
_cut_off_lines = logs.Throttle(CUT_OFF_LOG_SECONDS)


class Connection:
    """One client connection's protocol state; ``handle`` maps a message to its reply."""

    def __init__(
        self,
        service: Service,
        writer: asyncio.StreamWriter | None = None,
        access: AccessList | None = None,
        rules: Rules = BUILTIN,
    ) -> None:
        self.service = service
        self.writer = writer
        self.access = access
        self.rules = rules
        self.grant: Grant = OPEN
        self.series_cache = KnownSeries()  # a producer sends the same series frame after frame
        self.table = ConnectionTable()  # the ``series`` op's entries, for ``inc`` without series
        self.hello: Hello | None = None
        self.epoch: int | None = None
        self.close_after = False
        self.pending: asyncio.Queue[tuple[int, Token, bool]] = asyncio.Queue()
        self.durable_task: asyncio.Task | None = None
        self.acked: tuple[int, Token, bool] | None = None

    async def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            parsed = parse_message(msg)
            if self.hello is None:
                if not isinstance(parsed, Hello):
                    self.close_after = True
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "the first frame must be hello")
                return await self.welcome(parsed)
            if isinstance(parsed, Ping):
                return {"op": "pong"}
            if isinstance(parsed, Hello):
                raise ProtocolError(ErrorCode.BAD_REQUEST,
                        "hello was already received on this connection")
            if isinstance(parsed, Events):
                return await self.event(parsed)
            if isinstance(parsed, SeriesTable):
                return self.table.define(parsed, self.service.router.registry)
            assert isinstance(parsed, Inc)
            return await self.inc(parsed)
        except ProtocolError as e:
            return e.frame()

    async def welcome(self, hello: Hello) -> dict[str, Any]:
        if self.access is not None:
            try:
                grant = self.access.grant_for(hello.token)
                grant.require_scope("ingest")
            except Denied as e:
                # The protocol has one code for both: no valid token, or a token
                # that may not ingest at all. Either way this connection is useless.
                self.close_after = True
                self.service.metrics.connection_refused(e.code)
                message = "hello: a token is required" if hello.token is None else e.message
                raise ProtocolError(ErrorCode.UNAUTHORIZED, message) from None
            self.grant = grant
        self.hello = hello
        self.epoch = self.service.producers.connect(hello.producer)
        try:
            durable_seq = await self.service.durable_seq(hello.producer)
        except IngestError as e:  # the client backs off and connects again
            self.close_after = True
            raise ProtocolError(e.code, e.message) from None
        return {"op": "welcome", "v": 1, "durable_seq": durable_seq}

    async def inc(self, m: Inc) -> dict[str, Any]:
        registry = self.service.router.registry
        if m.rows is None and m.series is None:
            table = self.table
            return await self._ingest(m.seq, m.ack, _increments_in(m), lambda now: Incoming(
                table.batch(registry, m.i, m.ts, m.v, now), registry=registry))
        return await self._ingest(m.seq, m.ack, _increments_in(m), lambda now: Incoming(
            build_batch(m.rows, m.series, m.i, m.ts, m.v, now, self.series_cache, registry),
            registry=registry))

    async def event(self, m: Events) -> dict[str, Any]:
        """Fan the events out, then exactly what ``inc`` does; ``rows`` counts increments."""
        return await self._ingest(m.seq, m.ack, len(m.events), lambda now: build_event_batch(
            m.events, self.rules, now, self.series_cache))

    async def _ingest(
        self, seq: int, ack: str, claimed: int, build: Callable[[float], Incoming]
    ) -> dict[str, Any]:
        """Validate, check access, apply; the answer frame. ``claimed`` counts a refusal."""
        assert self.hello is not None
        try:
            if seq < 1:
                raise IngestError(ErrorCode.BAD_REQUEST, f"seq {seq}: seqs start at 1")
            check_ack(ack)
            incoming = build(self.service.clock())
            with incoming.blamed():
                try:
                    self.grant.require_tenants(incoming.tenants)
                except Denied as e:
                    # `unauthorized` is the protocol's only access code; the row says
                    # which tenant, and the connection stays usable for the others.
                    raise IngestError(ErrorCode.UNAUTHORIZED, e.message, row=e.row) from None
                applied = await self.service.ingest(
                    incoming.batch, self.hello.producer, seq, self.epoch
                )
        except IngestError as e:
            self.service.metrics.batch_rejected("tcp", e.code, claimed)
            if e.fatal:
                self.close_after = True
            frame: dict[str, Any] = {
                "op": "error", "seq": seq, "code": e.code, "message": e.message,
            }
            if e.row is not None:
                frame["row"] = e.row
            return frame
        self.service.metrics.batch_accepted("tcp", applied.rows)
        self.acked = (seq, applied.token, ack == "durable")
        return {"op": "ack", "seq": seq, "rows": applied.rows}

    def after_reply(self, acked: tuple[int, Token, bool] | None = None) -> None:
        """Once an ack is written, its durable frame may follow (never precede it).
        ``acked``: what a pipelined handler took (``answered``); else the last one's."""
        if acked is None:
            acked, self.acked = self.acked, None
        if acked is None:
            return
        self.pending.put_nowait(acked)
        if self.durable_task is None and self.writer is not None:
            self.durable_task = asyncio.get_running_loop().create_task(self._durability())
            self.durable_task.add_done_callback(self._durability_ended)

    async def _durability(self) -> None:
        """Send ``durable`` for each batch that asked, in order, once checkpointed."""
        assert self.writer is not None
        while True:
            seq, token, wanted = await self.pending.get()
            try:
                await self.service.tracker.wait(token)
            except ShardRestarted as e:
                # What was only acked is lost with the shard's memory: the
                # client must reconnect and resend everything not durable.
                self.writer.write(encode_frame(
                    {"op": "error", "seq": seq, "code": ErrorCode.OVERLOADED, "message": str(e)}
                ))
                self.writer.close()
                return
            if self.writer.is_closing():
                return  # the connection is gone; the client learns durability on reconnect
            if wanted:
                self.writer.write(encode_frame({"op": "durable", "seq": seq}))

    def _durability_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(json.dumps({"event": "error", "where": "tcp durable acks",
                                  "error": repr(task.exception())}))
            if self.writer is not None:
                self.writer.close()  # the client reconnects and resends; nothing is lost

    async def answered(self, msg: dict[str, Any], after: asyncio.Task[Answered] | None = None
                       ) -> Answered:
        """``handle``, once ``after`` (the message before it) is answered: and not at all
        if that one failed or closes the connection (the client resends from there).
        Returns what this message alone set."""
        if after is not None:
            try:
                before = await after
            except asyncio.CancelledError:
                if not after.cancelled():
                    raise  # this handler is cancelled, not the one before it
                raise _Skipped from None
            except Exception:  # (its error is the connection's, raised once)
                raise _Skipped from None
            if before.closes:
                raise _Skipped
        reply = await self.handle(msg)
        # No await since the handler set these: they are this message's own.
        acked, self.acked = self.acked, None
        closes, self.close_after = self.close_after, False
        return Answered(reply, acked, closes)

    def close(self) -> None:
        if self.durable_task is not None:
            self.durable_task.cancel()


class _Skipped(Exception):
    """A message not handled: the one before it failed or closed the connection."""


@dataclass(slots=True)
class Answered:
    reply: dict[str, Any]
    acked: tuple[int, Token, bool] | None
    closes: bool  # the connection closes after this reply


def _increments_in(m: Inc) -> int:
    """Increments a refused batch carried, as far as its envelope tells (for metrics)."""
    if m.rows is not None:
        return len(m.rows)
    return len(m.v) // 8 if m.v is not None else 0


@dataclass(frozen=True)
class TcpLimits:
    max_frame: int = DEFAULT_MAX_FRAME
    max_connections: int = 1000
    # a frame must be complete this many seconds after its first byte arrived,
    # and the client must read its answers within as long
    frame_timeout: float = 30.0


class TcpServer:
    def __init__(
        self, service: Service, limits: TcpLimits | None = None,
        access: AccessList | None = None, rules: Rules = BUILTIN,
    ) -> None:
        self.service = service
        self.limits = limits or TcpLimits()
        self.access = access
        self.rules = rules
        self.server: asyncio.base_events.Server | None = None
        self.connections = 0

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        self.server = await stream.start_server(
            self._serve, host, port, READ_SIZE, reuse_port=reuse_port or None
        )
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: stream.ChunkReader, writer: asyncio.StreamWriter) -> None:
        metrics = self.service.metrics
        if self.connections >= self.limits.max_connections:
            metrics.connection_refused("max_connections")
            _cut_off(self.service, writer, None, "max_connections",
                     f"too many connections (at most {self.limits.max_connections})")
            writer.write(encode_frame({
                "op": "error", "seq": None, "code": ErrorCode.OVERLOADED,
                "message": f"too many connections (at most {self.limits.max_connections}); "
                "retry later",
            }))
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.drain(), self.limits.frame_timeout)
            writer.close()
            return
        self.connections += 1
        metrics.connection_opened()
        conn = Connection(self.service, writer, self.access, self.rules)
        try:
            await self._converse(conn, reader, writer)
        except ConnectionError as e:
            # The client went away; it resends what it has no answer for.
            log.debug("connection lost: %r", e)
        except _SlowClient as e:
            metrics.frame_error("timeout")
            _cut_off(self.service, writer, conn, "timeout", str(e))
            if e.reading:
                writer.write(encode_frame(
                    {"op": "error", "seq": None, "code": ErrorCode.BAD_FRAME, "message": str(e)}
                ))
            else:  # it does not read: what is buffered for it would never leave
                writer.transport.abort()
        except Exception as e:
            log.error(json.dumps({"event": "error", "where": "tcp", "error": repr(e)}))
            raise
        finally:
            self.connections -= 1
            metrics.connection_closed()
            conn.close()
            writer.close()

    async def _converse(
        self, conn: Connection, reader: stream.ChunkReader, writer: asyncio.StreamWriter
    ) -> None:
        decoder = FrameDecoder(self.limits.max_frame, scan_rows=True)
        timeout = self.limits.frame_timeout
        frame_started: float | None = None  # when the partial frame's first byte arrived
        loop = asyncio.get_running_loop()
        answers = _Answers(conn, writer, timeout)
        try:
            while not answers.closing:
                if frame_started is None:
                    data = await reader.read()  # idle between frames: no limit
                else:
                    try:
                        async with asyncio.timeout(None) as deadline:
                            answers.arm(deadline, frame_started + timeout)
                            data = await reader.read()
                    except TimeoutError:
                        raise _SlowClient(
                            f"frame incomplete after {timeout:g} s ({decoder.pending} bytes "
                            "received): closing", reading=True,
                        ) from None
                    finally:
                        answers.deadline = None
                if not data:
                    break
                received_at = loop.time()
                payloads, fatal = decoder.frames(data)
                if decoder.pending == 0:
                    frame_started = None
                elif frame_started is None or payloads:
                    frame_started = received_at  # a new frame began in this read
                for payload in payloads:
                    try:
                        msg = decoder.decode(payload)
                    except FrameError as e:
                        fatal = e
                        break
                    alone = conn.hello is None or msg.get("op") not in PIPELINED_OPS
                    if alone:  # after what came before it, and before what follows
                        await answers.wait(0)
                    if answers.closing:
                        break
                    answers.add(loop.create_task(conn.answered(msg, answers.last)))
                    await answers.wait(0 if alone else PIPELINE - 1)
                    if answers.closing:
                        break
                if fatal is not None:
                    await answers.wait(0)
                    if not answers.closing:
                        self.service.metrics.frame_error(fatal.code)
                        _cut_off(self.service, writer, conn, fatal.code, fatal.message)
                        writer.write(encode_frame(fatal.frame()))
                        answers.closing = True
                await self._drain(writer, timeout)
                if payloads and decoder.pending:
                    # The time this server spent on the frames before it is not the client's:
                    # a pipelining producer's next frame waits in the socket meanwhile.
                    frame_started = loop.time()
            await answers.wait(0)  # (the client stopped sending: its answers still go)
            await self._drain(writer, timeout)
        except ConnectionError:
            if answers.failed is not None:  # a handler's error ended the connection
                raise answers.failed from None
            raise
        finally:
            answers.abandon()

    async def _drain(self, writer: asyncio.StreamWriter, timeout: float) -> None:
        if writer.is_closing():
            return
        try:
            await asyncio.wait_for(writer.drain(), timeout)
        except TimeoutError:
            raise _SlowClient(
                f"client did not read its answers within {timeout:g} s: closing",
                reading=False,
            ) from None


class _Answers:
    """A connection's messages being handled, answered in order as each is done.

    Answers are written from the handlers' completion, not only when the reading
    loop looks, so a client that waits for its ack gets it while the loop waits for
    its next frame. After an answer that closes the connection, the answers to the
    batches behind it are not sent (the service refused them: their producer
    resends from the one refused). A handler that fails unexpectedly ends the
    connection, and ``wait`` raises its error.
    """

    def __init__(self, conn: Connection, writer: asyncio.StreamWriter, timeout: float
                 ) -> None:
        self.conn = conn
        self.writer = writer
        self.timeout = timeout  # a partial frame's, from its start or the last answer
        self.inflight: deque[asyncio.Task[Answered]] = deque()
        self.closing = False
        self.failed: BaseException | None = None
        self.deadline: asyncio.Timeout | None = None  # of the partial frame being read

    def arm(self, deadline: asyncio.Timeout, at: float) -> None:
        """A partial frame must be complete by ``at``; but not while the batches before
        it are answered (its producer may wait for their acks): then ``timeout`` after
        the last answer."""
        self.deadline = deadline
        deadline.reschedule(None if self.inflight else at)

    @property
    def last(self) -> asyncio.Task[Answered] | None:
        return self.inflight[-1] if self.inflight else None

    def add(self, task: asyncio.Task[Answered]) -> None:
        self.inflight.append(task)
        task.add_done_callback(self._flush)

    async def wait(self, keep: int) -> None:
        """Until at most ``keep`` are in flight; raises a handler's unexpected error."""
        while len(self.inflight) > keep and self.failed is None:
            await asyncio.wait({self.inflight[0]})
            self._flush()
        if self.failed is not None:
            raise self.failed

    def _flush(self, _: object = None) -> None:
        inflight = self.inflight
        while inflight and inflight[0].done():
            task = inflight.popleft()
            if not task.cancelled() and isinstance(task.exception(), _Skipped):
                continue  # (behind a failure, or an answer that closed the connection)
            if task.cancelled() or task.exception() is not None:
                if self.failed is None:
                    self.failed = (asyncio.CancelledError() if task.cancelled()
                                   else task.exception())
                self.closing = True
                self.writer.transport.abort()  # the reading loop wakes up and raises it
                continue
            if self.closing:
                continue
            if self.writer.is_closing():  # closed meanwhile (a shard restarted)
                self.closing = True
                continue
            answered = task.result()
            self.writer.write(encode_frame(answered.reply))
            self.conn.after_reply(answered.acked)
            self.closing = answered.closes
            if answered.closes and answered.reply.get("op") == "error":
                reply = answered.reply
                _cut_off(self.conn.service, self.writer, self.conn, reply.get("code"),
                         reply.get("message"))
        if not inflight and self.deadline is not None and self.deadline.when() is None:
            self.deadline.reschedule(asyncio.get_running_loop().time() + self.timeout)

    def abandon(self) -> None:
        """The connection ends (an error): handlers still running finish alone."""
        for task in self.inflight:
            task.remove_done_callback(self._flush)
            task.add_done_callback(_unanswered)
        self.inflight.clear()


def _unanswered(task: asyncio.Task) -> None:
    """A batch's handler that outlived its connection: its error is logged, not lost."""
    if not task.cancelled() and task.exception() is not None \
            and not isinstance(task.exception(), _Skipped):
        log.error(json.dumps({"event": "error", "where": "tcp batch after its connection",
                              "error": repr(task.exception())}))


class _SlowClient(Exception):
    """A client that holds a partial frame (``reading``) or unread answers too long."""

    def __init__(self, message: str, reading: bool) -> None:
        super().__init__(message)
        self.reading = reading


def _cut_off(service: Service, writer: asyncio.StreamWriter, conn: Connection | None,
             reason: Any, message: Any) -> None:
    """The server closes a client's connection: counted, and logged (throttled per reason)
    with whom, so an operator can tell which producer or address to look at."""
    service.metrics.connection_cut_off(str(reason))
    left_out = _cut_off_lines.admit(reason)
    if left_out is None:
        return
    hello = conn.hello if conn is not None else None
    logs.event(log, logging.WARNING, "client_cut_off", reason=reason, peer=_peer(writer),
               producer=hello.producer if hello is not None else None,
               gateway=service.metrics.name, message=str(message)[:300],
               not_logged=left_out)


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
