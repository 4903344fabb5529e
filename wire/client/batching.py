"""Batches as they go on the wire: the open batches, and sealed batches kept until durable.

Increments are buffered straight into the columnar form of an ``inc`` frame
(a series table plus little-endian ``<u4`` index, ``<i8`` ts and ``<i8``
value columns), so sealing a batch is one encode and no per-increment work.
A sealed batch is encoded once and kept byte for byte: a resend must be the
very same batch, since the server deduplicates by (producer, seq).
"""

from __future__ import annotations

import heapq
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from tally.client.errors import BatchRejected, Increment, Tags
from tally.client.table import ProducerTable
from tally.client.validation import SeriesEntry
from tally.wire.frames import MAX_SEQ, encode_frame

__all__ = [
    "BYTES_PER_INCREMENT",
    "FRAME_OVERHEAD",
    "BatchBuilder",
    "Batches",
    "EventBuilder",
    "SealedBatch",
    "columnar_frame",
    "decode_event",
    "decode_increment",
    "rejection",
]

BYTES_PER_INCREMENT = 4 + 8 + 8  # i, ts, v
# An upper bound on an inc frame's bytes outside the series entries and the
# columns: length prefix, map header, keys, "inc", seq, "durable", the array
# and bin headers. Checked against the real frame at every seal.
FRAME_OVERHEAD = 128

_PACKER = msgpack.Packer(use_bin_type=True)

assert array("I").itemsize == 4 and array("q").itemsize == 8, "unsupported platform"


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
    need: int = 0  # entries of the producer's series table its frame indexes (table.py)



class Batches:
    """The open batches and the sealed ones kept until durable; the base of ``ProducerCore``.

    Increments and events are buffered into open batches, sealed by size
    (``batch_size``), by bytes (``max_batch_bytes``, so the server never has
    to answer ``too_large``), by time (``linger`` seconds after a batch's
    first entry; None: never) or on demand (``seal``). A sealed batch gets
    the next seq, is encoded once, and is kept until the server says it is
    durable (``ProducerCore`` drops it then).
    """

    def __init__(
        self, *, batch_size: int, linger: float | None, max_batch_bytes: int, first_seq: int
    ) -> None:
        self.batch_size = batch_size
        self.linger = None if linger is None else float(linger)
        self.max_batch_bytes = max_batch_bytes
        self.first_seq = first_seq
        self.next_seq = first_seq
        self.builder = BatchBuilder()
        self.event_builder = EventBuilder()  # events are batched beside increments
        self.table = ProducerTable()  # series numbered for columnar batches (table.py)
        self.kept: OrderedDict[int, SealedBatch] = OrderedDict()  # seq order
        self.kept_increments = 0
        self._unsent: list[int] = []  # min-heap of seqs to (re)send; stale entries skipped
        self.stats = {"batches": 0}  # sealed

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

    def seal(self, seq: int | None = None) -> int | None:
        """Close the open batches (increments, then events); the last seq given, if any.

        ``seq``: the seq of the first batch sealed (the next ones follow it),
        for a caller that numbers its batches itself; it must be above
        ``last_seq``. Unused when nothing is open.
        """
        if seq is not None and (self.builder.n or self.event_builder.n):
            if type(seq) is not int or not self.next_seq <= seq <= MAX_SEQ:
                raise ValueError(f"seq {seq!r} must be above the last seq ({self.last_seq}) "
                                 f"and at most {MAX_SEQ}")
            self.next_seq = seq
        first = self._seal_increments()
        second = self._seal_events()
        return second if second is not None else first

    def add_columnar(
        self, seq: int, series: bytes | list[bytes], index: np.ndarray, ts: np.ndarray,
        values: np.ndarray,
    ) -> None:
        """Keep a batch the caller built whole as seq ``seq`` (see ``columnar_frame``).

        For a producer that builds its batches columnar itself (``tally
        import``): nothing is buffered, no batch may be open, ``seq`` must be
        above ``last_seq``, and the frame must fit ``max_batch_bytes``
        (``ValueError`` otherwise, and nothing is kept). ``series`` is the packed
        table (bytes), or its packed entries (a list): those are numbered in the
        producer's table, defined once per connection, and the frame carries none.
        """
        if self.builder.n or self.event_builder.n:
            raise ValueError("add_columnar: a batch is open; seal it first")
        if type(seq) is not int or not self.next_seq <= seq <= MAX_SEQ:
            raise ValueError(f"seq {seq!r} must be above the last seq ({self.last_seq}) "
                             f"and at most {MAX_SEQ}")
        n = len(index)
        if not n or len(ts) != n or len(values) != n:
            raise ValueError("add_columnar: index, ts and values must have one length, not 0")
        need = 0
        if isinstance(series, list):
            index = np.asarray(index)
            if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(series)):
                raise ValueError(f"add_columnar: index must be below len(series) = {len(series)}")
            numbers = self.table.numbers(series)
            if numbers is not None:
                index, need = numbers[index], len(self.table)
                series = b""
            else:  # (the table is full: this batch names its series itself)
                series = _PACKER.pack_array_header(len(series)) + b"".join(series)
        frame = columnar_frame(seq, series if not need else None, index, ts, values)
        if len(frame) > self.max_batch_bytes:
            raise ValueError(f"add_columnar: a frame of {len(frame)} bytes exceeds "
                             f"max_batch_bytes={self.max_batch_bytes}")
        self.next_seq = seq
        self._keep_frame(frame, n)
        self.kept[seq].need = need

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
        return self._keep_frame(frame, n)

    def _keep_frame(self, frame: bytes, n: int) -> int:
        seq = self.next_seq
        self.next_seq = seq + 1
        self.kept[seq] = SealedBatch(seq, frame, n)
        self.kept_increments += n
        heapq.heappush(self._unsent, seq)
        self.stats["batches"] += 1
        return seq

    def linger_deadline(self) -> float | None:
        firsts = [t for t in (self.builder.first_at, self.event_builder.first_at)
                  if t is not None]
        if not firsts or self.linger is None:
            return None
        return min(firsts) + self.linger

    def poll(self, now: float) -> bool:
        """Seal the open batch if its linger ran out; True if a batch was sealed."""
        deadline = self.linger_deadline()
        return deadline is not None and now >= deadline and self.seal() is not None


def columnar_frame(
    seq: int, series: bytes | None, index: np.ndarray, ts: np.ndarray, values: np.ndarray
) -> bytes:
    """An ``inc`` frame (ack durable) from a series table already packed and three columns.

    ``series`` is the msgpack encoding of the table, an array of ``[tenant,
    metric, tags|nil]`` entries (a caller that meets the same series in many
    batches packs each once and joins the bytes: packing is most of the cost
    of a wide batch), or None for a frame that indexes the connection's table.
    The columns become little-endian ``<u4``/``<i8``/``<i8``.
    """
    p = msgpack.Packer(use_bin_type=True)
    table = (p.pack("series"), series) if series is not None else ()
    body = b"".join((
        p.pack_map_header(7 if series is not None else 6),
        p.pack("op"), p.pack("inc"), p.pack("seq"), p.pack(seq), p.pack("ack"),
        p.pack("durable"), *table,
        p.pack("i"), p.pack(np.asarray(index).astype("<u4", copy=False).tobytes()),
        p.pack("ts"), p.pack(np.asarray(ts).astype("<i8", copy=False).tobytes()),
        p.pack("v"), p.pack(np.asarray(values).astype("<i8", copy=False).tobytes()),
    ))
    return len(body).to_bytes(4, "big") + body


def decode_increment(frame: bytes, row: int, table: ProducerTable | None = None
                     ) -> Increment | None:
    """Row ``row`` of an encoded batch, to name the bad increment in an error (slow path);
    ``table``: the producer's, for a frame that indexes it."""
    msg = msgpack.unpackb(frame[4:], raw=False)
    if msg.get("op") != "inc":
        return None
    i = np.frombuffer(msg["i"], "<u4")
    if not 0 <= row < len(i):
        return None
    if "series" in msg:
        entry = msg["series"][int(i[row])]
    else:
        entry = table.entry(int(i[row])) if table is not None else None
    if entry is None:
        return None
    tenant, metric, tags = entry
    ts = int(np.frombuffer(msg["ts"], "<i8")[row])
    value = int(np.frombuffer(msg["v"], "<i8")[row])
    return tenant, metric, tags, ts, value


def decode_event(frame: bytes, index: int) -> dict[str, Any] | None:
    """Event ``index`` of an encoded event batch (slow path, for an error)."""
    msg = msgpack.unpackb(frame[4:], raw=False)
    events = msg.get("events") if msg.get("op") == "event" else None
    return events[index] if isinstance(events, list) and 0 <= index < len(events) else None


def rejection(msg: dict[str, Any], batch: SealedBatch, table: ProducerTable | None = None
              ) -> BatchRejected:
    """The error for a batch the server refused for good, naming the row it named."""
    row = msg.get("row")
    named = type(row) is int
    return BatchRejected(
        msg, seq=batch.seq, increments=batch.increments,
        increment=decode_increment(batch.frame, row, table) if named else None,
        event=decode_event(batch.frame, row) if named else None,
    )
