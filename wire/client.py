"""Python client for tally's wire protocol v1: exactly-once increments, end to end.

Two clients share one sans-I/O core (``ProducerCore``) and differ only in how
they move bytes: ``TallyClient`` (synchronous, thread-safe, one background I/O
thread) and ``tally.wire.aclient.AsyncTallyClient`` (asyncio, the same API with
``await``). ``Connection`` is the older one-request-at-a-time connection,
kept for tests and scripts that want to see each answer.

Usage::

    from tally.wire.client import TallyClient

    with TallyClient("127.0.0.1", 8781, producer="billing-worker-3") as tally:
        tally.inc("acme", "messages.received", tags={"channel": "email"})
        tally.inc("acme", "messages.handled", 3, ts=1764158400, tags={"agent": "ann"})
        tally.flush()      # returns once every increment above is durable
    # leaving the block flushes (durable) and closes

    async with AsyncTallyClient("127.0.0.1", 8781) as tally:
        await tally.inc("acme", "logins")

Events go through the same machinery: ``tally.event("acme", "message.replied",
agent="ann", channel="email", response_seconds=95)`` buffers one raw event;
the server's fan-out rules turn it into increments (``api/rules.py``).

What it promises (design guarantee 3)
-------------------------------------
Every ``inc`` that returned without raising is applied exactly once by the
server, provided the client process lives until ``flush(durable=True)`` or
``close()`` returns without raising. In between, connections may break,
time out, the server may refuse with ``overloaded`` or crash and restart:

- Increments are buffered and sent as columnar ``inc`` batches (a series
  table plus little-endian ``<u4`` index, ``<i8`` ts and ``<i8`` value
  arrays). A batch is sealed when it holds ``batch_size`` increments, when
  ``linger`` seconds have passed since its first increment, when the next
  increment would take the frame over ``max_batch_bytes`` (so the server
  never has to answer ``too_large``), or on ``flush``.
- A sealed batch gets the next ``seq`` and is encoded once; its frame is
  kept, byte for byte, until the server says it is durable. Batches go out
  with ``ack: "durable"``; ``{"op": "durable", "seq": s}`` means every batch
  of this producer up to ``s`` is checkpointed, and those are dropped.
  ``ack`` answers mean applied and visible to queries (what
  ``flush(durable=False)`` waits for).
- Up to ``max_in_flight`` batches are pipelined on one connection; answers
  come back in order and are read off the caller's thread (the I/O thread,
  or a reader task).
- On a broken connection, or when the oldest batch in flight has had no
  answer for ``timeout`` seconds, the client reconnects with capped
  exponential backoff and jitter, sends ``hello``, drops every kept batch up
  to ``welcome.durable_seq`` and resends every other kept batch in seq
  order, unchanged. The server applies a batch at most once per
  ``(producer, seq)``, so what was applied before the break is only
  acknowledged again, and what a crashed server lost is applied again.

Producers and seqs
------------------
``producer`` names the stream of seqs the server deduplicates. It defaults to
a fresh ``python-<uuid4>`` per client instance. Two live clients must never
share a name (the server fences the older connection, and seqs would
collide); the client fails with ``ProducerConflict`` when it can tell.

Seqs start at the wall clock in microseconds (``time.time_ns() // 1000``) and
then count up by one per batch. A restarted process that reuses its producer
name therefore starts above every seq its previous incarnation could have
sent, even those the server applied but never made durable; starting at
``durable_seq + 1`` instead would make the server skip new batches as
resends of old ones. Resending a *crashed client's* batches would need them
on disk: this client keeps them in memory only, so a crash of the client
process loses the increments not yet durable (``pending`` says how many).
A stable name is necessary for such a spool, not sufficient.

Errors
------
Every error is a ``TallyError``. ``inc`` validates what is cheap to check on
the caller's thread -- types, the series (tenant, metric, tags, with the
server's own rules, cached per series), int64 ranges, a ts at most an hour
ahead of this machine's clock -- and raises ``TypeError`` or ``ValueError``
(``InvalidSeries``) at once, without buffering anything. That matters more
than it looks: the server refuses a batch all or nothing, so one bad
increment would take up to ``batch_size - 1`` good ones down with it.

What the server can still refuse (a ts ahead of *its* clock, an hour slot
pushed out of int64) arrives later, from the I/O thread:

- ``bad_row`` / ``bad_request`` for a batch, or ``unauthorized`` for a batch
  naming a tenant the token does not cover: permanent. The batch is dropped
  and a ``BatchRejected`` (``.code``, ``.row``, ``.seq``, ``.increments``,
  ``.increment`` -- the offending increment when the server named a row) is
  raised from the next ``inc``, ``flush`` or ``close`` call, once, in any
  thread. An ``inc`` that raises it did not buffer its own increment; a
  ``flush`` raises it after its wait. Pass ``on_error`` to receive rejections
  in a callback instead (run on the I/O thread or task; keep it short; if it
  raises, the client stops with ``ClientFailed``).
- ``overloaded`` (and ``internal``): transient. The client stops sending,
  waits for the answers still in flight, backs off, then resends the refused
  batch and everything after it in seq order. (The server refuses later seqs
  of a producer until the refused one comes back, so nothing overtakes it.)
- ``unauthorized`` in answer to ``hello`` (no valid token, or one without the
  ``ingest`` scope): raised as ``Unauthorized``; the client stops, it does not
  retry.
- ``too_large``, a server that does not answer ``welcome.durable_seq`` (one
  without durable acks), a server that is not a tally wire endpoint, a
  producer conflict, an exception in the I/O thread or task: the client stops
  and raises a ``ClientFailed`` from every later call. These are bugs or
  misconfiguration, and a loop of retries would only hide them.

``flush`` raises ``TallyTimeout`` (a ``TimeoutError``) when its wait runs out;
the batches stay kept and the client keeps trying, so calling ``flush`` again
is safe. Its message says what is missing and the last problem seen (e.g. the
connection refused while the server is down).

Events
------
``event`` batches raw events the same way, in ``event`` frames (an open
event batch beside the open increment batch; ``flush`` and the linger seal
both), with the same seqs, durability and resend. The client checks the
envelope (tenant, type, ts, fields that msgpack can carry) but not the
rules, which live on the server: an event the server's rules refuse (a type
no rule covers, a missing or mistyped field) takes its whole batch down, and
``BatchRejected.event`` is the event the server named. Producers that cannot
afford that validate their events first, or flush each one. ``pending`` and
``BatchRejected.increments`` count an event as one (the increments it makes
are known to the server only).

Memory
------
``max_pending`` bounds the increments held: buffered plus sent but not yet
durable. Once reached, ``inc`` blocks (awaits) until durable answers free
room -- backpressure, never a silent drop -- and raises ``TallyTimeout``
without buffering when that takes longer than ``timeout``. Each kept
increment costs about 20 bytes of frame (plus its series entries), so the
default 2,000,000 holds about 40 MiB and several seconds of checkpoint lag
at a high rate. Set it from (increments per second) x (checkpoint interval
+ a few seconds).

Threads and tasks
-----------------
``TallyClient`` may be shared by any number of threads; ``inc`` takes one
lock for a few list appends and wakes the I/O thread only when a batch is
sealed or starts. The I/O thread is a daemon: without ``close()``, what is
not durable at interpreter exit is lost. ``AsyncTallyClient`` belongs to
the event loop that first uses it and is not thread-safe.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import numbers
import random
import selectors
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from tally.wire.frames import (
    DEFAULT_MAX_FRAME,
    MAX_PRODUCER,
    MAX_SEQ,
    PROTOCOL_VERSION,
    FrameDecoder,
    FrameError,
    encode_frame,
)
from tally.wire.series import InvalidSeries, check_tenant, series_key
from tally.wire.timeslots import FUTURE_TOLERANCE

__all__ = [
    "BatchRejected",
    "ClientClosed",
    "ClientFailed",
    "Connection",
    "InvalidSeries",
    "ProducerConflict",
    "ProducerCore",
    "ProtocolMismatch",
    "ServerError",
    "TallyClient",
    "TallyError",
    "TallyTimeout",
    "Unauthorized",
]

log = logging.getLogger("tally.client")

Row = Sequence[Any]  # [tenant, metric, tags | None, ts, value]
Tags = dict[str, str] | None

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
DEFAULT_MAX_BATCH_BYTES = 8 * 1024 * 1024  # half the server's default frame limit
MIN_MAX_BATCH_BYTES = 64 * 1024  # the largest valid series entry (16 long tags) fits ~4 times
DEFAULT_MAX_PENDING = 2_000_000
DEFAULT_MAX_IN_FLIGHT = 16
DEFAULT_BACKOFF = (0.05, 5.0)  # first delay, cap (seconds)
BYTES_PER_INCREMENT = 4 + 8 + 8  # i, ts, v
# An upper bound on an inc frame's bytes outside the series entries and the
# columns: length prefix, map header, keys, "inc", seq, "durable", the array
# and bin headers. Checked against the real frame at every seal.
FRAME_OVERHEAD = 128

assert array("I").itemsize == 4 and array("q").itemsize == 8, "unsupported platform"


# ---------------------------------------------------------------------------- errors


class TallyError(Exception):
    """Base of every error raised by this module (besides argument errors)."""


class ServerError(TallyError):
    """An ``error`` frame from the server; ``code`` is the wire error code."""

    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.frame = frame
        self.code: str = frame.get("code", "")
        self.row: int | None = frame.get("row")


class BatchRejected(ServerError):
    """The server refused a batch for good (``bad_row``, ``bad_request``).

    None of its ``increments`` were applied and the client will not resend
    them. ``row`` indexes the batch, which is meaningless to the caller, so
    ``increment`` carries that row as ``(tenant, metric, tags, ts, value)``,
    or, for a batch of events, ``event`` the event the server named.
    """

    def __init__(
        self,
        frame: dict[str, Any],
        *,
        seq: int,
        increments: int,
        increment: tuple[str, str, Tags, int, int] | None = None,
        event: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(frame)
        self.seq = seq
        self.increments = increments
        self.increment = increment
        self.event = event
        what = f"; the bad increment: {increment!r}" if increment is not None else ""
        if event is not None:
            what = f"; the bad event: {_short(event)}"
        self.args = (
            f"batch seq {seq} ({increments} increments) refused for good, none applied: "
            f"{frame.get('code')}: {frame.get('message')}{what}",
        )


class Unauthorized(ServerError):
    """The server refused the token; the client stopped and does not retry."""


class ClientFailed(TallyError):
    """The client stopped for good; its kept increments are not sent any more."""


class ProtocolMismatch(ClientFailed):
    """The server does not speak what this client needs (v1 with durable acks)."""


class ProducerConflict(ClientFailed):
    """Another client is using this producer name: the seqs would collide."""


class ClientClosed(TallyError):
    """The client was closed (or is closing)."""


class TallyTimeout(TallyError, TimeoutError):
    """A wait ran out; nothing was dropped (kept batches are still being sent)."""


class _Broken(Exception):
    """The connection cannot go on; the shell closes it, then reconnects and resends."""


# --------------------------------------------------------------------- validation


@dataclass(slots=True, frozen=True, eq=False)
class SeriesEntry:
    """A validated series as it goes on the wire, with its packed size (for the byte cap).

    Compared and hashed by identity: the open batch indexes its series table
    by entry, and an identity hash costs nothing, where hashing the nested
    tuple of a series key again would cost a few hundred nanoseconds per
    increment. (Two entries for one series, after the cache was cleared, only
    mean a duplicate table row, which the server merges.)
    """

    wire: tuple[str, str, Tags]
    size: int


SeriesCacheKey = tuple[str, str, tuple[tuple[str, str], ...]]


class SeriesCache:
    """Validates each distinct (tenant, metric, tags) once, with the server's rules.

    ``series_key`` costs microseconds of regex work; a dict hit costs a tuple
    and a hash, so repeated series cost almost nothing. Bounded: it is
    cleared when it reaches ``limit`` entries (a cheap, safe eviction: a miss
    only re-validates).
    """

    __slots__ = ("_map", "_limit")

    def __init__(self, limit: int = 100_000) -> None:
        self._map: dict[SeriesCacheKey, SeriesEntry] = {}
        self._limit = limit

    def lookup(self, tenant: Any, metric: Any, tags: Any) -> SeriesEntry:
        """The series' wire entry; raises ``InvalidSeries`` (a ``ValueError``)."""
        try:
            hit = self._map.get(_cache_key(tenant, metric, tags))
        except TypeError:
            hit = None  # unhashable or unorderable parts: series_key below says what is wrong
        if hit is not None:
            return hit
        sk = series_key(tenant, metric, tags)
        wire = (sk.tenant, sk.metric, dict(sk.tags) if sk.tags else None)
        entry = SeriesEntry(wire, len(msgpack.packb(list(wire), use_bin_type=True)))
        if len(self._map) >= self._limit:
            self._map.clear()
        self._map[(sk.tenant, sk.metric, sk.tags)] = entry
        return entry


def _cache_key(tenant: Any, metric: Any, tags: Any) -> Any:
    """The key a valid series is cached under (tags sorted), or None for tags of another type."""
    if tags is None:
        return (tenant, metric, ())
    if type(tags) is not dict:
        return None
    items = tuple(tags.items())
    return (tenant, metric, items if len(items) < 2 else tuple(sorted(items)))


def _as_int(x: Any, what: str) -> int:
    if type(x) is int:
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{what} must be an int, not {type(x).__name__}")
    return int(x)


def _check_ts(ts: Any, now: float) -> int:
    if ts is None:
        return int(now)
    ts = _as_int(ts, "ts")
    if ts < 0:
        raise ValueError(f"ts {ts} is negative; timestamps are Unix seconds")
    if ts > now + FUTURE_TOLERANCE:
        raise ValueError(
            f"ts {ts} is {ts - int(now)} s ahead of this machine's clock; the server "
            f"refuses more than {FUTURE_TOLERANCE} s (and the whole batch with it)"
        )
    return ts


def prepare_increment(
    cache: SeriesCache, tenant: Any, metric: Any, value: Any, ts: Any, tags: Any, now: float
) -> tuple[SeriesEntry, int, int]:
    """Validate one increment on the caller's thread; the error names what is wrong."""
    ts = _check_ts(ts, now)
    value = _as_int(value, "value")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"value {value} is outside int64")
    return cache.lookup(tenant, metric, tags), ts, value


def prepare_event(
    tenant: Any, type: Any, ts: Any, fields: dict[str, Any], now: float
) -> tuple[dict[str, Any], int]:
    """Validate one event's envelope on the caller's thread; the event and its packed size.

    The rules are the server's, so only what any rule set would refuse is
    checked here: the tenant, the type, the ts, and fields msgpack can carry.
    """
    check_tenant(tenant)
    if not isinstance(type, str) or not type:
        raise TypeError(f"event type must be a non-empty string, not {_short(type)}")
    event = {"type": type, "tenant": tenant, "ts": _check_ts(ts, now), **fields}
    try:
        size = len(msgpack.packb(event, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"event fields must be msgpack values (str, int, float, bool, None, "
                        f"lists, maps): {exc}") from None
    return event, size


# ------------------------------------------------------------------------ batching


class BatchBuilder:
    """The open batch, in the wire's columnar form: a series table and three columns.

    ``bound`` is an upper bound on the encoded frame's size, kept exact enough
    (packed series entries, 20 bytes per increment, a fixed overhead) that a
    batch is sealed before it could exceed the byte cap.
    """

    __slots__ = ("index", "series", "i", "ts", "v", "n", "bound", "first_at")

    def __init__(self) -> None:
        self.index: dict[SeriesEntry, int] = {}  # entry -> its row in the series table
        self.series: list[tuple[str, str, Tags]] = []
        self.i = array("I")
        self.ts = array("q")
        self.v = array("q")
        self.n = 0  # increments
        self.bound = FRAME_OVERHEAD
        self.first_at: float | None = None  # when the first increment was added

    def message(self, seq: int) -> dict[str, Any]:
        """The ``inc`` message; columns are little-endian whatever this machine is."""
        return {
            "op": "inc",
            "seq": seq,
            "ack": "durable",
            "series": [list(s) for s in self.series],
            "i": np.frombuffer(self.i, dtype=np.uint32).astype("<u4", copy=False).tobytes(),
            "ts": np.frombuffer(self.ts, dtype=np.int64).astype("<i8", copy=False).tobytes(),
            "v": np.frombuffer(self.v, dtype=np.int64).astype("<i8", copy=False).tobytes(),
        }


class EventBuilder:
    """The open batch of raw events; ``bound`` as in ``BatchBuilder`` (packed sizes)."""

    __slots__ = ("events", "n", "bound", "first_at")

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.n = 0
        self.bound = FRAME_OVERHEAD
        self.first_at: float | None = None

    def message(self, seq: int) -> dict[str, Any]:
        return {"op": "event", "seq": seq, "ack": "durable", "events": self.events}


@dataclass(slots=True, eq=False)
class SealedBatch:
    """A batch with its seq and frame, kept until durable; resent byte for byte."""

    seq: int
    frame: bytes
    increments: int
    acked: bool = False  # acknowledged at least once: applied, visible to queries
    unsent: bool = True  # must go out (again) on the current connection
    sends: int = 0


def decode_increment(frame: bytes, row: int) -> tuple[str, str, Tags, int, int] | None:
    """Row ``row`` of an encoded batch, to name the bad increment in an error (slow path)."""
    msg = msgpack.unpackb(frame[4:], raw=False)
    if msg.get("op") != "inc":
        return None
    i = np.frombuffer(msg["i"], "<u4")
    if not 0 <= row < len(i):
        return None
    tenant, metric, tags = msg["series"][int(i[row])]
    ts = int(np.frombuffer(msg["ts"], "<i8")[row])
    value = int(np.frombuffer(msg["v"], "<i8")[row])
    return tenant, metric, tags, ts, value


def decode_event(frame: bytes, index: int) -> dict[str, Any] | None:
    """Event ``index`` of an encoded event batch (slow path, for an error)."""
    msg = msgpack.unpackb(frame[4:], raw=False)
    events = msg.get("events") if msg.get("op") == "event" else None
    return events[index] if isinstance(events, list) and 0 <= index < len(events) else None


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


# ---------------------------------------------------------------------- the core

_HELLO = -1  # the hello's place in the queue of answers expected


class ProducerCore:
    """The client's whole protocol state, without I/O (the h11 approach).

    The shells (a thread with a selector, an asyncio task) call it with the
    lock held (sync) or from the loop (async), passing a monotonic ``now``:

    - ``add`` / ``seal`` / ``poll`` build batches (size, byte and linger triggers);
    - ``connection_made`` gives the hello frame; ``take_frames`` the frames to
      write now; ``receive`` digests each server message; ``disconnected``
      forgets the connection and says how long to wait before the next one;
    - ``deadline`` is when the shell must call back even if nothing arrives;
      ``timed_out`` tells it to drop a connection that stopped answering.

    ``receive`` raises ``_Broken`` when the connection must go; fatal problems
    are recorded in ``fatal`` (the shells stop and every call raises it), and
    permanent batch refusals are queued in ``rejections``.
    """

    def __init__(
        self,
        producer: str,
        token: str | None = None,
        *,
        batch_size: int = 50_000,
        linger: float = 0.05,
        timeout: float = 30.0,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        backoff: tuple[float, float] = DEFAULT_BACKOFF,
        first_seq: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if type(producer) is not str or not 1 <= len(producer) <= MAX_PRODUCER:
            raise ValueError(f"producer must be a string of 1 to {MAX_PRODUCER} characters")
        if token is not None and type(token) is not str:
            raise TypeError("token must be a string or None")
        if _as_int(batch_size, "batch_size") < 1:
            raise ValueError("batch_size must be at least 1")
        if not linger >= 0:
            raise ValueError("linger must be >= 0 seconds")
        if not timeout > 0:
            raise ValueError("timeout must be > 0 seconds")
        if _as_int(max_pending, "max_pending") < 1:
            raise ValueError("max_pending must be at least 1")
        if not MIN_MAX_BATCH_BYTES <= max_batch_bytes <= DEFAULT_MAX_FRAME:
            raise ValueError(
                f"max_batch_bytes must be in [{MIN_MAX_BATCH_BYTES}, {DEFAULT_MAX_FRAME}] "
                "(the server's default frame limit)"
            )
        if _as_int(max_in_flight, "max_in_flight") < 1:
            raise ValueError("max_in_flight must be at least 1")
        base, cap = backoff
        if not 0 < base <= cap:
            raise ValueError("backoff must be (first delay, cap) with 0 < first <= cap")
        self.producer = producer
        self.token = token
        self.batch_size = batch_size
        self.linger = float(linger)
        self.timeout = float(timeout)
        self.max_pending = max_pending
        self.max_batch_bytes = max_batch_bytes
        self.max_in_flight = max_in_flight
        self.backoff = (float(base), float(cap))
        self.rng = rng if rng is not None else random.Random()
        self.first_seq = checked_first_seq(first_seq)
        self.next_seq = self.first_seq
        self.max_sent = 0  # the highest seq ever written; never-sent batches are above it

        self.builder = BatchBuilder()
        self.event_builder = EventBuilder()  # events are batched beside increments
        self.kept: OrderedDict[int, SealedBatch] = OrderedDict()  # seq order
        self.kept_increments = 0
        self._unsent: list[int] = []  # min-heap of seqs to (re)send; stale entries skipped

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
        self.stats = {
            "batches": 0,  # sealed
            "sends": 0,  # frames written, resends included
            "resends": 0,
            "connections": 0,
            "reconnects": 0,  # connections lost or refused
            "overloaded": 0,
            "rejected": 0,
        }

    # -- state seen by callers -------------------------------------------------

    @property
    def pending(self) -> int:
        """Increments held: buffered, plus sealed and not yet durable."""
        return self.builder.n + self.event_builder.n + self.kept_increments

    @property
    def last_seq(self) -> int:
        """The seq of the last sealed batch (``first_seq - 1`` before any)."""
        return self.next_seq - 1

    def settled(self, upto: int, durable: bool) -> bool:
        """Every batch up to ``upto`` is durable (or acked), or was refused for good."""
        for seq, batch in self.kept.items():
            if seq > upto:
                return True
            if durable or not batch.acked:
                return False
        return True

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

    # -- batching --------------------------------------------------------------

    def add(self, entry: SeriesEntry, ts: int, value: int, now: float) -> bool:
        """Buffer one validated increment; True when the I/O side should be woken.

        That is when a batch was sealed (frames to send) or a new batch began
        (a new linger deadline); other increments wake nobody. The hot path of
        the client: one dict lookup and three appends, nothing else.
        """
        b = self.builder
        sealed = False
        idx = b.index.get(entry)
        need = BYTES_PER_INCREMENT if idx is not None else BYTES_PER_INCREMENT + entry.size
        if b.bound + need > self.max_batch_bytes:
            sealed = self._seal_increments() is not None
            b = self.builder
            idx = None
            if b.bound + BYTES_PER_INCREMENT + entry.size > self.max_batch_bytes:
                raise ValueError(
                    f"one increment of series {entry.wire!r} needs more than "
                    f"max_batch_bytes={self.max_batch_bytes}"
                )
        if idx is None:
            idx = b.index[entry] = len(b.series)
            b.series.append(entry.wire)
            b.bound += entry.size
        started = not b.n
        if started:
            b.first_at = now
        b.i.append(idx)
        b.ts.append(ts)
        b.v.append(value)
        b.n += 1
        b.bound += BYTES_PER_INCREMENT
        if b.n >= self.batch_size:
            sealed = self._seal_increments() is not None
        return sealed or started

    def add_event(self, event: dict[str, Any], size: int, now: float) -> bool:
        """Buffer one checked event (``size``: its packed bytes); as ``add``, True to wake."""
        if FRAME_OVERHEAD + size > self.max_batch_bytes:
            raise ValueError(f"an event of {size} bytes packed does not fit in "
                             f"max_batch_bytes={self.max_batch_bytes}")
        b = self.event_builder
        sealed = False
        if b.bound + size > self.max_batch_bytes:
            sealed = self._seal_events() is not None
            b = self.event_builder
        started = not b.n
        if started:
            b.first_at = now
        b.events.append(event)
        b.n += 1
        b.bound += size
        if b.n >= self.batch_size:
            sealed = self._seal_events() is not None
        return sealed or started

    def seal(self) -> int | None:
        """Close the open batches (increments, then events); the last seq given, if any."""
        first = self._seal_increments()
        second = self._seal_events()
        return second if second is not None else first

    def _seal_increments(self) -> int | None:
        builder = self.builder
        if not builder.n:
            return None
        seq = self._keep(builder.message, builder.n, builder.bound)
        self.builder = BatchBuilder()
        return seq

    def _seal_events(self) -> int | None:
        builder = self.event_builder
        if not builder.n:
            return None
        seq = self._keep(builder.message, builder.n, builder.bound)
        self.event_builder = EventBuilder()
        return seq

    def _keep(self, message: Callable[[int], dict[str, Any]], n: int, bound: int) -> int:
        """Give a batch the next seq, encode it once, keep it until durable."""
        seq = self.next_seq
        if seq > MAX_SEQ:
            raise OverflowError("seq would exceed 2^63-1")
        frame = encode_frame(message(seq))
        if len(frame) > self.max_batch_bytes:  # the bound is wrong: a bug, not the caller's
            raise AssertionError(
                f"batch frame of {len(frame)} bytes exceeds max_batch_bytes="
                f"{self.max_batch_bytes} (estimated {bound})"
            )
        self.next_seq = seq + 1
        self.kept[seq] = SealedBatch(seq, frame, n)
        self.kept_increments += n
        heapq.heappush(self._unsent, seq)
        self.stats["batches"] += 1
        return seq

    def linger_deadline(self) -> float | None:
        firsts = [t for t in (self.builder.first_at, self.event_builder.first_at)
                  if t is not None]
        return min(firsts) + self.linger if firsts else None

    def poll(self, now: float) -> bool:
        """Seal the open batch if its linger ran out; True if a batch was sealed."""
        deadline = self.linger_deadline()
        return deadline is not None and now >= deadline and self.seal() is not None

    # -- connection lifecycle --------------------------------------------------

    def connection_made(self, now: float) -> bytes:
        """A socket is open: the hello frame to write first."""
        self.connected = True
        self.ready = False
        self.inflight.clear()
        self.inflight.append((_HELLO, now))
        self.stats["connections"] += 1
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
        raise _Broken(f"the server sent a broken frame: {error}")

    def receive(self, msg: dict[str, Any], now: float) -> None:
        """Digest one server message (``durable`` frames, or the answer to the oldest frame)."""
        op = msg.get("op")
        if op == "durable":
            seq = msg.get("seq")
            if type(seq) is not int:
                raise _Broken(f"durable frame without an integer seq: {msg!r}")
            self._durable(seq)
            self.reconnect_attempt = 0
            return
        if not self.inflight:
            raise _Broken(f"unexpected {op!r} frame with nothing in flight: {_short(msg)}")
        head = self.inflight[0][0]
        if head == _HELLO:
            self._handshake(msg)
        elif op == "ack":
            self._ack(msg, head)
        elif op == "error":
            self._error(msg, head, now)
        else:
            raise _Broken(f"unexpected {op!r} frame while waiting for seq {head}")

    def _handshake(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "error":
            if msg.get("code") == "overloaded":  # e.g. too many connections: back off, retry
                raise _Broken(f"the server is busy: {msg.get('message')}")
            error: ClientFailed | Unauthorized
            if msg.get("code") == "unauthorized":
                error = Unauthorized(msg)
            else:
                error = ProtocolMismatch(f"the server refused hello: {_short(msg)}")
            self.fail(error)
            return
        if op != "welcome":
            raise _Broken(f"expected welcome, got {_short(msg)}")
        durable_seq = msg.get("durable_seq")
        if type(durable_seq) is not int or durable_seq < 0:
            self.fail(
                ProtocolMismatch(
                    "the server's welcome has no durable_seq: it does not support "
                    "ack 'durable' and idempotent resend, which this client needs "
                    f"(welcome was {_short(msg)}); use tally.wire.client.Connection with it"
                )
            )
            return
        self.inflight.popleft()
        self._durable(durable_seq)
        if self.fatal is None:
            self.ready = True

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
            raise _Broken(f"ack for seq {seq!r} while the answer to seq {head} was due")
        self.inflight.popleft()
        batch = self.kept.get(seq)
        if batch is not None:
            batch.acked = True
        self.overload_attempt = 0
        self.reconnect_attempt = 0

    def _error(self, msg: dict[str, Any], head: int, now: float) -> None:
        code = msg.get("code")
        seq = msg.get("seq")
        if code == "unauthorized" and seq is None:
            self.fail(Unauthorized(msg))
            return
        if code == "too_large":
            self.fail(
                ClientFailed(
                    f"the server refused a frame as too_large ({msg.get('message')}): its frame "
                    f"limit is below max_batch_bytes={self.max_batch_bytes}; lower it"
                )
            )
            return
        if seq is None:
            if code == "bad_frame":  # this client's encoder is wrong: retrying would loop
                self.fail(ClientFailed(f"the server could not decode a frame: {_short(msg)}"))
                return
            raise _Broken(f"connection-level error from the server: {_short(msg)}")
        if seq != head:
            raise _Broken(f"error for seq {seq!r} while the answer to seq {head} was due: "
                          f"{_short(msg)}")
        self.inflight.popleft()
        batch = self.kept.get(seq)
        if code in ("bad_row", "bad_request", "unauthorized"):
            # (unauthorized with a seq: the token lacks a tenant of this batch only)
            if batch is not None:
                del self.kept[seq]
                self.kept_increments -= batch.increments
                row = msg.get("row")
                bad = decode_increment(batch.frame, row) if type(row) is int else None
                event = decode_event(batch.frame, row) if type(row) is int else None
                self.rejections.append(BatchRejected(
                    msg, seq=seq, increments=batch.increments, increment=bad, event=event
                ))
                self.stats["rejected"] += 1
            return
        # overloaded, internal, or a code this client does not know: not applied,
        # try again later, after the answers to what is in flight are in.
        self.stats["overloaded"] += 1
        self.last_error = f"seq {seq}: {code}: {msg.get('message')}"
        if code != "overloaded":
            log.warning("tally answered %s for seq %s; resending later: %s",
                        code, seq, msg.get("message"))
        if batch is not None and not batch.unsent:
            batch.unsent = True
            heapq.heappush(self._unsent, seq)
        if not self.paused:  # the refusals that follow in the same round back off no further
            self.paused = True
            self.resume_at = now + backoff_delay(self.overload_attempt, *self.backoff, self.rng)
            self.overload_attempt += 1


def _short(msg: Any) -> str:
    text = repr(msg)
    return text if len(text) <= 300 else text[:297] + "..."


class _ClientBase(ABC):
    """What both shells share: the options, the core, its read-only view, and the errors.

    ``__init__`` takes the clients' public signature, builds the core (with the
    default producer name) and then calls ``_init_shell`` for the shell's own
    I/O. A shell sets ``_guard``, the context manager that makes touching the
    core safe (a lock, or nothing on an event loop), and ``_fail``, which
    records a fatal error and wakes whoever waits.
    """

    _guard: contextlib.AbstractContextManager[Any]

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8781,
        *,
        producer: str | None = None,
        token: str | None = None,
        batch_size: int = 50_000,
        linger: float = 0.05,
        timeout: float = 30.0,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        backoff: tuple[float, float] = DEFAULT_BACKOFF,
        on_error: Callable[[BatchRejected], None] | None = None,
        fallbacks: Sequence[tuple[str, int]] = (),
    ) -> None:
        self._core = ProducerCore(
            producer if producer is not None else f"python-{uuid.uuid4()}",
            token,
            batch_size=batch_size,
            linger=linger,
            timeout=timeout,
            max_pending=max_pending,
            max_batch_bytes=max_batch_bytes,
            max_in_flight=max_in_flight,
            backoff=backoff,
        )
        self.host = host
        self.port = port
        # Other gateways of the service (one per node): tried in turn when a
        # connection fails, so a lost node costs a reconnect, not the producer.
        self.addresses = [(host, port), *((str(h), int(p)) for h, p in fallbacks)]
        self.timeout = float(timeout)
        self._on_error = on_error
        self._series = SeriesCache()
        self._closing = False  # no more inc; close is flushing
        self._stop = False  # the I/O thread or task must exit
        self._fatal_seen = False  # the fatal error was raised to a caller at least once
        self._init_shell()

    def _next_address(self) -> None:
        """After a failed connection: the next gateway of ``addresses``, round robin."""
        at = self.addresses.index((self.host, self.port))
        self.host, self.port = self.addresses[(at + 1) % len(self.addresses)]

    @abstractmethod
    def _init_shell(self) -> None:
        """Set up the shell's I/O (and ``_guard``); called last by ``__init__``."""

    @abstractmethod
    def _fail(self, failure: ClientFailed) -> None:
        """Record a fatal error in the core and wake every waiter."""

    # -- public API ------------------------------------------------------------

    @property
    def producer(self) -> str:
        return self._core.producer

    @property
    def pending(self) -> int:
        """Increments held: buffered, or sent and not yet durable."""
        with self._guard:
            return self._core.pending

    @property
    def last_seq(self) -> int:
        """The seq of the last sealed batch."""
        with self._guard:
            return self._core.last_seq

    @property
    def durable_seq(self) -> int:
        """The highest seq of this producer the server reported durable."""
        with self._guard:
            return self._core.durable_seq

    @property
    def stats(self) -> dict[str, int]:
        """Counters (batches, sends, resends, connections, reconnects, overloaded, rejected)."""
        with self._guard:
            core = self._core
            return {**core.stats, "pending": core.pending, "kept_batches": len(core.kept)}

    # -- errors (under ``_guard``) -----------------------------------------------

    def _check(self, *, rejections: bool, closing_ok: bool = False) -> None:
        """Raise what the caller must hear about."""
        core = self._core
        if core.fatal is not None:
            self._fatal_seen = True
            raise core.fatal.with_traceback(None)
        if self._stop or (self._closing and not closing_ok):
            raise ClientClosed("the client is closed")
        if rejections and core.rejections:
            raise core.rejections.popleft()

    def _has_room(self) -> bool:
        return self._core.pending < self._core.max_pending

    def _describe_full(self) -> str:
        core = self._core
        return (f"inc: {core.pending} increments pending (max_pending={core.max_pending}); "
                "this increment was not buffered")

    def _digest(self, decoder: FrameDecoder, data: bytes) -> None:
        """Give the core each whole message in ``data``, until one is fatal (under ``_guard``)."""
        core = self._core
        try:
            messages = decoder.feed(data)
        except FrameError as exc:
            core.garbage(exc)  # raises _Broken, or records a fatal error
            return
        now = time.monotonic()
        for msg in messages:
            core.receive(msg, now)
            if core.fatal is not None:
                return

    def _take_rejections(self) -> list[BatchRejected]:
        """The queued rejections when ``on_error`` takes them, else none (they are raised)."""
        if self._on_error is None or not self._core.rejections:
            return []
        errors = list(self._core.rejections)
        self._core.rejections.clear()
        return errors

    def _deliver(self, errors: list[BatchRejected]) -> None:
        """Hand rejections to ``on_error`` (not under ``_guard``); a raising callback is fatal."""
        for error in errors:
            try:
                self._on_error(error)  # type: ignore[misc]
            except Exception as exc:
                failure = ClientFailed(f"on_error raised {exc!r}")
                failure.__cause__ = exc
                self._fail(failure)
                return

    def _raise_unseen_fatal(self) -> None:
        """After close: raise the fatal error if no caller has been told of it yet."""
        if self._core.fatal is not None and not self._fatal_seen:
            self._fatal_seen = True
            raise self._core.fatal.with_traceback(None)


# ------------------------------------------------------------------- sync client


class TallyClient(_ClientBase):
    """Thread-safe, batching, resending client; see the module docstring.

    - ``producer``: the name the server deduplicates seqs under (default: a
      fresh ``python-<uuid4>``); never shared by two live clients.
    - ``token``: sent in ``hello``; a refusal raises ``Unauthorized``.
    - ``batch_size``, ``linger``, ``max_batch_bytes``: when a batch is sealed
      (increments, seconds after its first increment, frame bytes).
    - ``timeout``: seconds for connecting, for the oldest frame in flight to
      be answered (then the connection is dropped and everything resent), and
      the default wait of ``flush`` and of an ``inc`` held by ``max_pending``.
    - ``max_pending``: increments held (buffered plus not yet durable) before
      ``inc`` blocks. ``max_in_flight``: batches sent and not yet answered.
    - ``backoff``: (first delay, cap) in seconds for reconnects and for
      resending after ``overloaded``.
    - ``on_error``: receives ``BatchRejected`` errors on the I/O thread
      instead of having them raised from ``inc`` / ``flush``; it must not
      block, nor call ``flush`` or ``close``.
    - ``fallbacks``: ``(host, port)`` of the service's other gateways (one runs
      per node of a cluster); after a failed connection the next is tried.

    One background thread owns the socket (non-blocking, driven by a selector,
    so it reads answers while it writes large frames and neither side can
    stall the other), seals lingering batches, reconnects and resends. Callers
    only touch the core under the lock.
    """

    def _init_shell(self) -> None:
        self._cond = threading.Condition()
        self._guard = self._cond
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(
            target=self._io_main, name=f"tally-client:{self._core.producer}", daemon=True
        )
        self._thread.start()

    def _fail(self, failure: ClientFailed) -> None:
        with self._cond:
            self._core.fail(failure)
            self._cond.notify_all()

    # -- public API ------------------------------------------------------------

    def __enter__(self) -> TallyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def inc(
        self,
        tenant: str,
        metric: str,
        value: int = 1,
        ts: int | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Count ``value`` for the series at ``ts`` (Unix seconds, default now).

        Returns once buffered. Raises ``TypeError`` / ``ValueError`` for an
        invalid increment, a queued ``BatchRejected`` (this increment is then
        not buffered), ``TallyTimeout`` when ``max_pending`` stays reached for
        ``timeout`` seconds, or the client's fatal error.
        """
        prepared = prepare_increment(self._series, tenant, metric, value, ts, tags, time.time())
        core = self._core
        with self._cond:
            self._check(rejections=True)
            if not self._has_room():
                self._wait(self._has_room, self.timeout, self._describe_full)
            wake = core.add(*prepared, time.monotonic())
        if wake:
            self._wake()

    def event(self, tenant: str, type: str, ts: int | None = None, **fields: Any) -> None:
        """Buffer one raw event (``ts`` Unix seconds, default now) for the server's rules.

        Batched, kept and resent like ``inc``, and raises what ``inc`` raises;
        the fields are the event's (``agent="ann", response_seconds=95``).
        """
        event, size = prepare_event(tenant, type, ts, fields, time.time())
        core = self._core
        with self._cond:
            self._check(rejections=True)
            if not self._has_room():
                self._wait(self._has_room, self.timeout, self._describe_full)
            wake = core.add_event(event, size, time.monotonic())
        if wake:
            self._wake()

    def flush(self, durable: bool = True, timeout: float | None = None) -> None:
        """Send what is buffered; wait until everything so far is durable (or acked).

        Raises ``TallyTimeout`` after ``timeout`` (default: the client's)
        seconds, with nothing dropped; then a queued ``BatchRejected``, if any.
        """
        core = self._core
        wait = self.timeout if timeout is None else timeout
        with self._cond:
            self._check(rejections=False, closing_ok=True)
            if core.seal() is not None:
                self._wake()
            upto = core.last_seq
            self._wait(lambda: core.settled(upto, durable), wait,
                       lambda: f"flush: {core.describe_wait(upto, durable)}")
            self._check(rejections=True, closing_ok=True)

    def close(self, timeout: float | None = None) -> None:
        """Flush (durable), then stop the I/O thread and close the socket.

        The client is closed even when the flush raises; the error is then
        raised, and whatever ``pending`` said was not confirmed durable.
        """
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()  # an inc waiting for room gives up
        try:
            if self._core.fatal is None:
                self.flush(durable=True, timeout=timeout)
        finally:
            with self._cond:
                self._stop = True
            self._wake()
            self._thread.join()
            self._wake_r.close()
            self._wake_w.close()
        self._raise_unseen_fatal()

    # -- waiting ---------------------------------------------------------------

    def _wait(
        self, ready: Callable[[], bool], timeout: float | None, describe: Callable[[], str]
    ) -> None:
        """Wait on the condition until ``ready``; fatal errors and close interrupt (lock held)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        closing_ok = self._closing
        while True:
            self._check(rejections=False, closing_ok=closing_ok)
            if ready():
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TallyTimeout(describe())
            self._cond.wait(remaining)

    # -- the I/O thread --------------------------------------------------------

    def _wake(self) -> None:
        # A full socket buffer means a wake-up is already pending: that is enough.
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass

    def _io_main(self) -> None:
        try:
            self._io_loop()
        except Exception as exc:
            failure = ClientFailed(f"the client's I/O thread died: {exc!r}")
            failure.__cause__ = exc
            log.exception("tally client I/O thread died")
            self._fail(failure)

    def _io_loop(self) -> None:
        core = self._core
        delay = 0.0
        while True:
            if not self._pause(delay):
                return
            try:
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            except OSError as exc:
                with self._cond:
                    delay = core.disconnected(f"connect to {self.host}:{self.port}: {exc}")
                    self._cond.notify_all()
                self._next_address()
                continue
            try:
                self._serve(sock)
                return  # stopping, or fatal
            except (OSError, _Broken) as exc:
                with self._cond:
                    delay = core.disconnected(f"connection to {self.host}:{self.port}: {exc}")
                    self._cond.notify_all()
                log.info("tally connection lost (%s); reconnecting in %.3f s", exc, delay)
                self._next_address()
            finally:
                sock.close()

    def _pause(self, delay: float) -> bool:
        """Sleep ``delay`` between connections, still sealing lingering batches.

        False when the client is stopping (or failed).
        """
        core = self._core
        end = time.monotonic() + delay
        while True:
            with self._cond:
                if self._stop or core.fatal is not None:
                    return False
                now = time.monotonic()
                if core.poll(now):
                    self._cond.notify_all()
                linger = core.linger_deadline()
            if now >= end:
                return True
            wait = end - now if linger is None else max(0.0, min(end, linger) - now)
            self._select_wake(wait)

    def _select_wake(self, timeout: float) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            if sel.select(timeout):
                self._drain_wake()

    def _serve(self, sock: socket.socket) -> None:
        """Drive one connection until it breaks (raises) or the client stops (returns)."""
        core = self._core
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        decoder = FrameDecoder()
        out: deque[memoryview] = deque()
        with self._cond:
            out.append(memoryview(core.connection_made(time.monotonic())))
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while True:
                with self._cond:
                    if self._stop or core.fatal is not None:
                        return
                    now = time.monotonic()
                    if core.poll(now):
                        self._cond.notify_all()
                    if core.timed_out(now):
                        raise _Broken(f"no answer within {core.timeout} s")
                    out.extend(memoryview(f) for f in core.take_frames(now))
                    deadline = core.deadline()
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0)
                sel.modify(sock, events)
                wait = None if deadline is None else max(0.0, deadline - now)
                for key, mask in sel.select(wait):
                    if key.fileobj is self._wake_r:
                        self._drain_wake()
                        continue
                    if mask & selectors.EVENT_READ:
                        self._read(sock, decoder)
                    if mask & selectors.EVENT_WRITE:
                        _write(sock, out)

    def _read(self, sock: socket.socket, decoder: FrameDecoder) -> None:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return
        if not data:
            raise _Broken("the server closed the connection")
        errors: list[BatchRejected] = []
        try:
            with self._cond:
                try:
                    self._digest(decoder, data)
                finally:
                    self._cond.notify_all()
                    errors = self._take_rejections()
        finally:
            self._deliver(errors)  # also when the connection broke after a rejection


def _write(sock: socket.socket, out: deque[memoryview]) -> None:
    """Write as much of ``out`` as the socket takes without blocking."""
    while out:
        try:
            n = sock.send(out[0])
        except BlockingIOError:
            return
        if n < len(out[0]):
            out[0] = out[0][n:]
            return
        out.popleft()


# ------------------------------------------------------- one request at a time


class Connection:
    """A synchronous connection: one frame, then its answer.

    For tests and scripts that want to see every answer. It neither batches
    nor resends; ``TallyClient`` does. Server errors are raised as
    ``ServerError`` carrying the wire code, so callers can branch on it.

    The server skips a batch whose seq its producer already used (it answers
    ``ack`` and applies nothing: a resend). So with a producer name passed
    in, seqs start at the clock in microseconds, as ``TallyClient``'s do,
    above anything an earlier run under that name sent; without one, the
    producer is a fresh ``python-<uuid4>`` and seqs start at 1. ``first_seq``
    sets the first seq explicitly.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8781,
        *,
        producer: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        first_seq: int | None = None,
    ) -> None:
        first_seq = checked_first_seq(1 if first_seq is None and producer is None else first_seq)
        if producer is None:
            producer = f"python-{uuid.uuid4()}"
        self.producer = producer
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder()
        self.pending: list[dict[str, Any]] = []
        self.seq = first_seq - 1  # the last seq sent
        self.welcome = self.request({"op": "hello", "v": 1, "token": token, "producer": producer})

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one frame and return its answer; an error answer raises ServerError."""
        self.sock.sendall(encode_frame(msg))
        reply = self.receive()
        if reply.get("op") == "error":
            raise ServerError(reply)
        return reply

    def receive(self) -> dict[str, Any]:
        while not self.pending:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("server closed the connection")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def send_rows(self, rows: Iterable[Row]) -> dict[str, Any]:
        return self.request({"op": "inc", "seq": self._next_seq(), "rows": [list(r) for r in rows]})

    def send_columnar(
        self,
        series: Sequence[tuple[str, str, dict[str, str] | None]],
        index: Sequence[int] | np.ndarray,
        ts: Sequence[int] | np.ndarray,
        values: Sequence[int] | np.ndarray,
    ) -> dict[str, Any]:
        return self.request(
            {
                "op": "inc",
                "seq": self._next_seq(),
                "series": [list(s) for s in series],
                "i": np.asarray(index, dtype="<u4").tobytes(),
                "ts": np.asarray(ts, dtype="<i8").tobytes(),
                "v": np.asarray(values, dtype="<i8").tobytes(),
            }
        )

    def send_events(self, events: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """One ``event`` frame; the ack's ``rows`` counts the increments the rules made."""
        return self.request({"op": "event", "seq": self._next_seq(), "events": list(events)})

    def ping(self) -> dict[str, Any]:
        return self.request({"op": "ping"})
