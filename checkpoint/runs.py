"""Checkpoint runs: a checkpoint's deltas kept whole, as a few arrays, until folded.

A store that adds each changed slot into a B-tree pays for every slot at every
checkpoint, and when increments scatter over weeks of hours (a backfill, an
import, late events) nearly every increment is a new slot: the checkpoints then
cost more than everything else a shard does. Written as one *run* — the
checkpoint's documents and slots as arrays in one row — a checkpoint costs its
bytes. Runs are *folded* into the slot rows later, several at a time, when the
shard is idle or its backlog passes a bound; a slot changed by several runs
is written once. This is the log-structured shape (ClickHouse's parts and
merges, an LSM tree's flush and compaction) with the fold as its merge.

This module is the sans-I/O part: encoding a run, finding documents in runs,
and merging runs into the slot rows a fold writes. Slots are keyed by
``id << HOUR_BITS | hour``: the series row id, then the absolute hour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tally.checkpoint.slots import Slots, month_index
from tally.wire.timeslots import month_number

# Hours since 1970 below 2**27 reach the year 17,000; month names stop at 9999.
HOUR_BITS = 27
# Series row ids below this keep a key inside int64.
MAX_ID = 1 << (63 - HOUR_BITS)
MONTH_BITS = 20  # a document key: id << MONTH_BITS | month number
_LE64, _LE32 = np.dtype("<i8"), np.dtype("<i4")


@dataclass(slots=True)
class Run:
    """One checkpoint's documents (series row id and month number) and their slots,
    each document's slots next to each other in ``hours`` and ``values``."""

    shard: int
    ck: int
    ids: np.ndarray  # int64, per document
    months: np.ndarray  # int64 month numbers, per document
    counts: np.ndarray  # int64, slots per document
    hours: np.ndarray  # int64 absolute hours, per slot
    values: np.ndarray  # int64 deltas, per slot

    def __len__(self) -> int:
        return len(self.hours)

    def doc_keys(self) -> np.ndarray:
        return self.ids << MONTH_BITS | self.months

    def slot_keys(self) -> np.ndarray:
        return np.repeat(self.ids, self.counts) << HOUR_BITS | self.hours


def runnable(slots: Slots, ids: np.ndarray) -> bool:
    """Whether a checkpoint can be kept as a run: int64 deltas (one that left int64 is
    a Python int, written the direct way) and ids a slot key can hold."""
    return slots.values.dtype == np.int64 and (not len(ids) or int(ids.max()) < MAX_ID)


def encode(slots: Slots, ids: np.ndarray) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """The blobs of a run: ids, month numbers, counts, hours (int32) and values (int32
    when every one fits, else int64; the blob's length tells which)."""
    months = np.array([month_number(m) for m in dict.fromkeys(slots.months)], np.int64)
    per_doc = months[month_index(slots.months)]
    values = slots.values
    narrow = len(values) == 0 or (int(values.min()) >= -(2**31) and int(values.max()) < 2**31)
    return (ids.astype(_LE64).tobytes(), per_doc.astype(_LE32).tobytes(),
            slots.counts.astype(_LE32).tobytes(), slots.hours.astype(_LE32).tobytes(),
            values.astype(_LE32 if narrow else _LE64).tobytes())


def decode(shard: int, ck: int, ids: bytes, months: bytes, counts: bytes, hours: bytes,
           values: bytes) -> Run:
    n = len(hours) // 4
    wide = len(values) == 8 * n
    return Run(shard, ck,
               np.frombuffer(ids, _LE64).astype(np.int64),
               np.frombuffer(months, _LE32).astype(np.int64),
               np.frombuffer(counts, _LE32).astype(np.int64),
               np.frombuffer(hours, _LE32).astype(np.int64),
               np.frombuffer(values, _LE64 if wide else _LE32).astype(np.int64))


def decode_docs(ids: bytes, months: bytes) -> np.ndarray:
    """A run's document keys, sorted: enough to tell whether it holds a document."""
    keys = np.frombuffer(ids, _LE64).astype(np.int64) << MONTH_BITS
    keys |= np.frombuffer(months, _LE32).astype(np.int64)
    keys.sort()
    return keys


@dataclass(slots=True)
class Merged:
    """Runs summed: slot rows in key order, and every document the runs name
    (a document's slots may sum to nothing; it still exists, as the direct way)."""

    keys: np.ndarray  # int64 slot keys, ascending, unique
    values: np.ndarray  # their summed deltas: int64, or Python ints past int64
    docs: np.ndarray  # int64 document keys, ascending, unique

    def __len__(self) -> int:
        return len(self.keys)

    def doc_firsts(self) -> np.ndarray:
        """Each document's place in slot-key order: its first hour's key. A fold that
        writes the slot rows up to some key writes the documents up to it too."""
        ids, months = self.docs >> MONTH_BITS, self.docs & ((1 << MONTH_BITS) - 1)
        return ids << HOUR_BITS | _first_hours(months)


def merge(runs: list[Run]) -> Merged:
    """The runs' deltas summed per slot, sorted by key; sums past int64 exact."""
    if not runs:
        empty = np.zeros(0, np.int64)
        return Merged(empty, empty, empty)
    keys = np.concatenate([run.slot_keys() for run in runs])
    values = np.concatenate([run.values for run in runs])
    docs = np.unique(np.concatenate([run.doc_keys() for run in runs]))
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    if len(keys) < 2 or (keys[1:] > keys[:-1]).all():
        return Merged(keys, values, docs)
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    peak = max(-int(values.min()), int(values.max()))
    if peak * len(runs) < 2**63:  # (a slot is in each run at most once)
        summed = np.add.reduceat(values, starts)
    else:
        bounds = np.append(starts, len(values)).tolist()
        items = values.tolist()
        summed = np.empty(len(starts), dtype=object)
        summed[:] = [sum(items[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return Merged(keys[starts], summed, docs)


def _first_hours(months: np.ndarray) -> np.ndarray:
    """First absolute hour of each month number."""
    first = np.datetime64("1970-01", "M") + months.astype("timedelta64[M]")
    return first.astype("datetime64[h]").astype(np.int64)


def deltas_of(run: Run, wanted: np.ndarray, after: int = -1) -> dict[int, dict[int, int]]:
    """The run's deltas of the documents whose keys are in ``wanted`` (sorted), with
    slot keys above ``after`` (below it a fold has written them already): document
    key -> absolute hour -> delta."""
    docs = run.doc_keys()
    hit = np.isin(docs, wanted)
    if not hit.any():
        return {}
    firsts = (run.ids << HOUR_BITS | _first_hours(run.months)).tolist()
    starts = np.concatenate(([0], np.cumsum(run.counts))).tolist()
    hours, values = run.hours.tolist(), run.values.tolist()
    out: dict[int, dict[int, int]] = {}
    for k in np.flatnonzero(hit).tolist():
        a, b = starts[k], starts[k + 1]
        base = int(run.ids[k]) << HOUR_BITS
        pairs = {h: v for h, v in zip(hours[a:b], values[a:b], strict=True)
                 if base | h > after}
        if pairs or firsts[k] > after:  # (a fold writes a document at its first key)
            out[int(docs[k])] = pairs
    return out
