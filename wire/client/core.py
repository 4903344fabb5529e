"""The client's whole protocol state, without I/O: ``ProducerCore``.

Both shells (``TallyClient``'s thread, ``AsyncTallyClient``'s task) drive this
one object, so batching, seqs, resend, backoff and every answer of the
protocol behave the same in both and are tested once, as pure functions with
a fake clock. See the package docstring (``tally.client``) for the contract
it implements.
"""

from __future__ import annotations

import heapq
import logging
import random
import time
from collections import deque
from typing import Any

from tally.client.batching import Batches, rejection
from tally.client.errors import (
    BatchRejected,
    Broken,
    ClientFailed,
    ProducerConflict,
    ProtocolMismatch,
    Unauthorized,
    short,
)
from tally.client.validation import check_options
from tally.wire.frames import MAX_SEQ, PROTOCOL_VERSION, FrameError, encode_frame
from tally.wire.vocabulary import ErrorCode

__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_PENDING",
    "ProducerCore",
    "backoff_delay",
    "checked_first_seq",
    "initial_seq",
]

log = logging.getLogger("tally.client")

DEFAULT_MAX_BATCH_BYTES = 8 * 1024 * 1024  # half the server's default frame limit
DEFAULT_MAX_PENDING = 2_000_000
DEFAULT_MAX_IN_FLIGHT = 16
DEFAULT_BACKOFF = (0.05, 5.0)  # first delay, cap (seconds)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Capped exponential with jitter: in [d/2, d], d = min(cap, base * 2**attempt).

    Half fixed so a retry storm cannot land at ~0 s, half random so many
    clients refused at once do not come back in lockstep.
    """
    d = min(cap, base * 2 ** min(attempt, 32))
    return d / 2 + rng.uniform(0, d / 2)


def initial_seq() -> int:
    """Microseconds since the epoch: above anything an earlier process with this name sent."""
    return max(1, time.time_ns() // 1000)


def checked_first_seq(first_seq: int | None) -> int:
    """``first_seq`` as given, or the clock's; a seq the protocol cannot carry raises."""
    seq = initial_seq() if first_seq is None else first_seq
    if not 1 <= seq <= MAX_SEQ:
        raise ValueError(f"first_seq must be in [1, {MAX_SEQ}]")
    return seq


_HELLO = -1  # the hello's place in the queue of answers expected
_SERIES = -2  # a series frame's (the producer's table, client/table.py)
# Codes that refuse a batch for good: the same bytes would be refused again.
_PERMANENT = frozenset((ErrorCode.BAD_ROW, ErrorCode.BAD_REQUEST, ErrorCode.UNAUTHORIZED))


class ProducerCore(Batches):
    """The client's whole protocol state, without I/O (the h11 approach).

    Batching (the open batches and the kept ones) is its base, ``Batches``;
    this class adds the connection, the in-flight window and the answers.
    The shells (a thread with a selector, an asyncio task) call it with the
    lock held (sync) or from the loop (async), passing a monotonic ``now``:

    - ``add`` / ``seal`` / ``poll`` build batches (size, byte and linger triggers);
    - ``connection_made`` gives the hello frame; ``take_frames`` the frames to
      write now; ``receive`` digests each server message; ``disconnected``
      forgets the connection and says how long to wait before the next one;
    - ``deadline`` is when the shell must call back even if nothing arrives;
      ``timed_out`` tells it to drop a connection that stopped answering.

    ``receive`` raises ``Broken`` when the connection must go; fatal problems
    are recorded in ``fatal`` (the shells stop and every call raises it), and
    permanent batch refusals are queued in ``rejections``.
    """

    def __init__(
        self,
        producer: str,
        token: str | None = None,
        *,
        batch_size: int = 50_000,
        linger: float | None = 0.05,
        timeout: float = 30.0,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        backoff: tuple[float, float] = DEFAULT_BACKOFF,
        first_seq: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        check_options(
            producer, token, batch_size=batch_size, linger=linger, timeout=timeout,
            max_pending=max_pending, max_batch_bytes=max_batch_bytes,
            max_in_flight=max_in_flight, backoff=backoff,
        )
        base, cap = backoff
        self.producer = producer
        self.token = token
        self.timeout = float(timeout)
        self.max_pending = max_pending
        self.max_in_flight = max_in_flight
        self.backoff = (float(base), float(cap))
        self.rng = rng if rng is not None else random.Random()
        super().__init__(
            batch_size=batch_size, linger=linger, max_batch_bytes=max_batch_bytes,
            first_seq=checked_first_seq(first_seq),
        )
        self.max_sent = 0  # the highest seq ever written; never-sent batches are above it

        self.connected = False  # a socket is open (hello sent)
        self.ready = False  # welcome received: batches may go out
        self.inflight: deque[tuple[int, float]] = deque()  # (seq or _HELLO, sent at)
        self.durable_seq = 0  # the highest durable seq the server reported
        self.paused = False  # after overloaded: hold until in-flight drained and resume_at
        self.resume_at = 0.0
        self.overload_attempt = 0
        self.reconnect_attempt = 0

        self.rejections: deque[BatchRejected] = deque()
        self.fatal: BaseException | None = None
        self.last_error: str | None = None  # the last transient problem, for timeout messages
        self.stats |= {
            "sends": 0,  # frames written, resends included
            "resends": 0,
            "connections": 0,
            "reconnects": 0,  # connections lost or refused
            "overloaded": 0,
            "rejected": 0,
        }

    # -- state seen by callers -------------------------------------------------

    def describe_wait(self, upto: int, durable: bool) -> str:
        waiting = [b for s, b in self.kept.items() if s <= upto and (durable or not b.acked)]
        state = "connected" if self.ready else "not connected"
        what = "durable" if durable else "acknowledged"
        text = (
            f"{len(waiting)} batches ({sum(b.increments for b in waiting)} increments) "
            f"up to seq {upto} are not {what} yet; {state}, {len(self.inflight)} frames in flight"
        )
        if self.last_error:
            text += f"; last problem: {self.last_error}"
        return text

    def fail(self, error: BaseException) -> None:
        """Stop for good; the first fatal error wins."""
        if self.fatal is None:
            self.fatal = error

    # -- connection lifecycle --------------------------------------------------

    def connection_made(self, now: float) -> bytes:
        """A socket is open: the hello frame to write first."""
        self.connected = True
        self.ready = False
        self.inflight.clear()
        self.inflight.append((_HELLO, now))
        self.stats["connections"] += 1
        self.table.defined = 0  # a new connection holds no table
        return encode_frame(
            {"op": "hello", "v": PROTOCOL_VERSION, "token": self.token, "producer": self.producer}
        )

    def disconnected(self, reason: str) -> float:
        """The connection is gone (or never came): everything kept goes out again.

        Returns the delay before the next attempt. Acked batches are resent
        too: the server may have lost them with a crashed shard, and answers
        a resend of a batch it still holds with a plain ack.
        """
        self.connected = False
        self.ready = False
        self.inflight.clear()
        self.paused = False
        for batch in self.kept.values():
            batch.unsent = True
        self._unsent = list(self.kept)  # ascending: already a heap
        self.last_error = reason
        self.stats["reconnects"] += 1
        delay = backoff_delay(self.reconnect_attempt, *self.backoff, self.rng)
        self.reconnect_attempt += 1
        return delay

    def take_frames(self, now: float) -> list[bytes]:
        """Frames to write now, lowest seq first, within the in-flight window."""
        if not self.ready or self.fatal is not None:
            return []
        if self.paused:
            if self.inflight or now < self.resume_at:
                return []
            self.paused = False
        frames: list[bytes] = []
        unsent = self._unsent
        while unsent and len(self.inflight) < self.max_in_flight:
            seq = heapq.heappop(unsent)
            batch = self.kept.get(seq)
            if batch is None or not batch.unsent:
                continue  # durable, refused, or already re-queued: a stale heap entry
            if batch.need > self.table.defined:  # tell the connection the series first
                for frame in self.table.definitions(self.max_batch_bytes):
                    self.inflight.append((_SERIES, now))
                    frames.append(frame)
            batch.unsent = False
            if batch.sends:
                self.stats["resends"] += 1
            batch.sends += 1
            self.stats["sends"] += 1
            self.inflight.append((seq, now))
            self.max_sent = max(self.max_sent, seq)
            frames.append(batch.frame)
        return frames

    def deadline(self) -> float | None:
        """When the shell must call ``poll`` / ``take_frames`` / ``timed_out`` again."""
        times = []
        linger = self.linger_deadline()
        if linger is not None:
            times.append(linger)
        if self.inflight:
            times.append(self.inflight[0][1] + self.timeout)
        elif self.paused:
            times.append(self.resume_at)
        return min(times) if times else None

    def timed_out(self, now: float) -> bool:
        return bool(self.inflight) and now >= self.inflight[0][1] + self.timeout

    # -- answers ---------------------------------------------------------------

    def garbage(self, error: FrameError) -> None:
        """The server sent bytes that are not frames."""
        if not self.ready:
            self.fail(
                ProtocolMismatch(
                    f"the server does not speak tally wire protocol v1 ({error}); "
                    "is this the HTTP port?"
                )
            )
            return
        raise Broken(f"the server sent a broken frame: {error}")

    def receive(self, msg: dict[str, Any], now: float) -> None:
        """Digest one server message (``durable`` frames, or the answer to the oldest frame)."""
        op = msg.get("op")
        if op == "durable":
            seq = msg.get("seq")
            if type(seq) is not int:
                raise Broken(f"durable frame without an integer seq: {msg!r}")
            self._durable(seq)
            self.reconnect_attempt = 0
            return
        if not self.inflight:
            raise Broken(f"unexpected {op!r} frame with nothing in flight: {short(msg)}")
        head = self.inflight[0][0]
        if head == _HELLO:
            self._handshake(msg)
        elif head == _SERIES:
            self._defined(msg)
        elif op == "ack":
            self._ack(msg, head)
        elif op == "error":
            self._error(msg, head, now)
        else:
            raise Broken(f"unexpected {op!r} frame while waiting for seq {head}")

    def _handshake(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "error":
            if msg.get("code") == ErrorCode.OVERLOADED:  # e.g. too many connections: retry
                raise Broken(f"the server is busy: {msg.get('message')}")
            error: ClientFailed | Unauthorized
            if msg.get("code") == ErrorCode.UNAUTHORIZED:
                error = Unauthorized(msg)
            else:
                error = ProtocolMismatch(f"the server refused hello: {short(msg)}")
            self.fail(error)
            return
        if op != "welcome":
            raise Broken(f"expected welcome, got {short(msg)}")
        durable_seq = msg.get("durable_seq")
        if type(durable_seq) is not int or durable_seq < 0:
            self.fail(
                ProtocolMismatch(
                    "the server's welcome has no durable_seq: it does not support "
                    "ack 'durable' and idempotent resend, which this client needs "
                    f"(welcome was {short(msg)}); use tally.client.Connection with it"
                )
            )
            return
        self.inflight.popleft()
        self._durable(durable_seq)
        if self.fatal is None:
            self.ready = True

    def _defined(self, msg: dict[str, Any]) -> None:
        """The answer to a ``series`` frame. Every entry was validated before it was
        numbered, so a refusal means a server without the series table (or a bug)."""
        if msg.get("op") != "defined":
            self.fail(ProtocolMismatch(
                f"the server refused this producer's series table: {short(msg)}; it may "
                "predate the series op (docs/protocol.md): send batches with their own "
                "series table (a packed table as bytes) to it"))
            return
        self.inflight.popleft()

    def _durable(self, seq: int) -> None:
        if seq > self.max_sent and seq >= self.first_seq:
            self.fail(
                ProducerConflict(
                    f"the server holds seq {seq} of producer {self.producer!r} as durable, "
                    f"but this client sent seqs {self.first_seq}..{self.max_sent} only: another "
                    "client uses this producer name, or this machine's clock went back"
                )
            )
            return
        if seq > self.durable_seq:
            self.durable_seq = seq
        kept = self.kept
        while kept:
            first = next(iter(kept))
            if first > seq:
                break
            self.kept_increments -= kept.popitem(last=False)[1].increments

    def _ack(self, msg: dict[str, Any], head: int) -> None:
        seq = msg.get("seq")
        if seq != head:
            raise Broken(f"ack for seq {seq!r} while the answer to seq {head} was due")
        self.inflight.popleft()
        batch = self.kept.get(seq)
        if batch is not None:
            batch.acked = True
        self.overload_attempt = 0
        self.reconnect_attempt = 0

    def _error(self, msg: dict[str, Any], head: int, now: float) -> None:
        code = msg.get("code")
        seq = msg.get("seq")
        if code == ErrorCode.UNAUTHORIZED and seq is None:
            self.fail(Unauthorized(msg))
            return
        if code == ErrorCode.TOO_LARGE:
            self.fail(
                ClientFailed(
                    f"the server refused a frame as too_large ({msg.get('message')}): its frame "
                    f"limit is below max_batch_bytes={self.max_batch_bytes}; lower it"
                )
            )
            return
        if seq is None:
            if code == ErrorCode.BAD_FRAME:  # this client's encoder is wrong: retrying would loop
                self.fail(ClientFailed(f"the server could not decode a frame: {short(msg)}"))
                return
            raise Broken(f"connection-level error from the server: {short(msg)}")
        if seq != head:
            raise Broken(f"error for seq {seq!r} while the answer to seq {head} was due: "
                          f"{short(msg)}")
        self.inflight.popleft()
        batch = self.kept.get(seq)
        if code in _PERMANENT:
            # (unauthorized with a seq: the token lacks a tenant of this batch only)
            if batch is not None:
                del self.kept[seq]
                self.kept_increments -= batch.increments
                self.rejections.append(rejection(msg, batch, self.table))
                self.stats["rejected"] += 1
            return
        # retriable (overloaded, internal), or a code this client does not know: not
        # applied; try again later, after the answers to what is in flight are in.
        self.stats["overloaded"] += 1
        self.last_error = f"seq {seq}: {code}: {msg.get('message')}"
        if code != ErrorCode.OVERLOADED:
            log.warning("tally answered %s for seq %s; resending later: %s",
                        code, seq, msg.get("message"))
        if batch is not None and not batch.unsent:
            batch.unsent = True
            heapq.heappush(self._unsent, seq)
        if not self.paused:  # the refusals that follow in the same round back off no further
            self.paused = True
            self.resume_at = now + backoff_delay(self.overload_attempt, *self.backoff, self.rng)
            self.overload_attempt += 1
