"""Where a shard's live counts are: day blocks of 24 hours, found by (series, day).

Counts are kept per (series, UTC day) rather than per series-month or per
increment so that an ingest is a handful of numpy operations over the batch
(find each aggregate's row, add, write back) with no Python step per row, and
a month the shard forgets (``free_month``) gives its rows back for reuse.

A block's *key* is ``series << DAY_BITS | day``. Each day holding a block has
an int32 row by series number in one grid (``tables``, actors/day_tables.py)
that finds its block: a batch finds its blocks with one numpy gather, however
many days it spans and however old they are, and a (series, day) costs 4 bytes
of grid rather than a dict entry and two ints.

A block's hours are int8 while they fit, wider only where a series counts
more (``hours``, actors/hour_tiers.py). The changes since the last checkpoint
(``pending``, actors/pending.py) are indexed by block row, so they grow with
the slab.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from tally.actors.day_tables import DayTables
from tally.actors.hour_tiers import HourTiers, Where
from tally.actors.pending import PendingDeltas
from tally.checkpoint.slots import Slots
from tally.wire.timeslots import month_name, months_of_hours

DAY_BITS = 20  # a block key is series << DAY_BITS | UTC day (days up to year 4840)
MONTH_BITS = 16  # a (series, month) key is series << MONTH_BITS | months since 1970-01
_HOUR_BITS = 27  # a (series, hour) key: hours since 1970 below 2**27 (to the year 17,000)
# Below this no 24 hours can add up to more than int64 (24 * 2**58 < 2**63): only a day
# holding an hour beyond it needs its day total checked.
BIG = 2**58


def beyond_big(values: np.ndarray) -> np.ndarray:
    """|values| > BIG without np.abs, which wraps INT64_MIN back to itself."""
    return (values > BIG) | (values < -BIG)


# a block's bytes beside its hours: its entry in the pending table's index
BLOCK_BYTES = 4


class DayBlocks:
    """The slab of day blocks, the tables that find them, and the deltas not yet checkpointed.

    Series numbers are the caller's (actors/live_series.py); ``series_count``
    arguments bound them, so per-series arrays here can be sized.
    """

    def __init__(self) -> None:
        # block row -> its 24 hours, as int8, int16 or int64: as narrow as they fit
        self.hours = HourTiers(1024)
        # (UTC day, series number) -> block row, for every day holding a block: a batch
        # finds its rows with one gather, and a (series, day) costs 4 bytes here rather
        # than a dict entry and two ints
        self.tables = DayTables()
        self.free: list[int] = []
        self.used = 0  # rows ever used: [0, used) are blocks or free
        self.big: set[int] = set()  # rows holding an hour beyond BIG
        self.pending = PendingDeltas(len(self.hours))

    def __len__(self) -> int:
        """Blocks held."""
        return self.used - len(self.free)

    def reserve(self, more: int) -> None:
        """Room in the slab for ``more`` new blocks (free rows are taken first).

        It grows by a quarter (at least 1024 rows), or at once to what a batch
        needs when that is more: a batch of many new series then costs one copy,
        not one per quarter, and leaves no quarter of slack behind it (two day
        blocks are a large part of what a series-month holds). But never by less
        than four such batches: a backfill brings new blocks with every batch, and
        a copy of the whole slab per batch was most of what it cost. A large slab
        is calloc'd from fresh pages: rows not used yet take no resident memory.
        """
        new = max(0, more - len(self.free))
        need = self.used + new
        size = len(self.hours)
        if need <= size:
            return
        size = max(need, size + max(1024, size // 4, 4 * new))
        self.hours.grow(size)
        self.pending.reserve(size)

    # ---- counts --------------------------------------------------------------

    @property
    def wide_blocks(self) -> int:
        """Blocks kept as int64 (none: every hour held is within ±NARROW)."""
        return self.hours.wide_blocks

    def get(self, rows: np.ndarray, hod: np.ndarray) -> np.ndarray:
        """The counts of slots (block rows, hours of day), as int64."""
        return self.hours.get(rows, hod)

    def located(self, rows: np.ndarray, hod: np.ndarray) -> tuple[np.ndarray, Where]:
        """The counts of slots, as int64, and where they are (for ``write``)."""
        return self.hours.located(rows, hod)

    def row_counts(self, rows: np.ndarray) -> np.ndarray:
        """The 24 hours of each block row, as int64 (len(rows) x 24)."""
        return self.hours.row_counts(rows)

    def find(self, g: np.ndarray, days: np.ndarray) -> np.ndarray:
        """Block rows of (series number, day) pairs; -1 where there is no block."""
        return self.tables.find(g, days)

    def locate(self, g: np.ndarray, days: np.ndarray, series_count: int) -> np.ndarray:
        """Block rows of (series number, day) pairs, creating missing blocks (a pair may
        repeat: the hours of one series-day)."""
        rows = self.find(g, days)
        missed = np.flatnonzero(rows < 0)
        if len(missed):
            keys = g[missed] << DAY_BITS | days[missed]
            uniq, inverse = np.unique(keys, return_inverse=True)
            made = self._make(uniq, max(series_count, int(g.max()) + 1))
            rows[missed] = made[inverse.reshape(-1)]
        return rows

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """Block rows for block keys, creating missing blocks."""
        keys = np.asarray(keys, np.int64)
        g = keys >> DAY_BITS
        return self.locate(g, keys & ((1 << DAY_BITS) - 1), int(g.max()) + 1 if len(g) else 0)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Block rows for block keys; -1 where there is none (nothing is created)."""
        keys = np.asarray(keys, np.int64)
        return self.find(keys >> DAY_BITS, keys & ((1 << DAY_BITS) - 1))

    def _make(self, keys: np.ndarray, series_count: int) -> np.ndarray:
        """New blocks for distinct keys that have none: free rows first, then fresh ones."""
        self.reserve(len(keys))
        reuse = min(len(self.free), len(keys))
        rows = np.empty(len(keys), np.int64)
        if reuse:
            rows[:reuse] = self.free[len(self.free) - reuse:][::-1]
            del self.free[len(self.free) - reuse:]
        rows[reuse:] = np.arange(self.used, self.used + len(keys) - reuse)
        self.used += len(keys) - reuse
        self.tables.put(keys >> DAY_BITS, keys & ((1 << DAY_BITS) - 1), rows, series_count)
        return rows

    def set_many_hours(self, months: list[tuple[int, dict[int, int]]],
                       series_count: int = 0) -> None:
        """Write stored months' ``{absolute hour: total}`` into their series' blocks:
        (series number, hours) pairs, in one step."""
        months = [(g, hours) for g, hours in months if hours]
        if not months:
            return
        n = sum(len(hours) for _, hours in months)
        g = np.fromiter(itertools.chain.from_iterable(
            itertools.repeat(g, len(hours)) for g, hours in months), np.int64, n)
        at = np.fromiter(itertools.chain.from_iterable(
            hours for _, hours in months), np.int64, n)
        totals = np.fromiter(itertools.chain.from_iterable(  # (stored totals are int64)
            hours.values() for _, hours in months), np.int64, n)
        rows = self.locate(g, at // 24, max(series_count, int(g.max()) + 1))
        self.hours.put(rows, at % 24, totals)
        self.big.update(rows[beyond_big(totals)].tolist())

    def write(self, rows: np.ndarray, hod: np.ndarray, new: np.ndarray,
              values: np.ndarray, keys_of: Callable[[np.ndarray], np.ndarray],
              where: Where | None = None) -> None:
        """Set slots (block rows, hours of day) to ``new``, which moved them by ``values``
        (distinct slots, checked for int64 by the caller); the move is pending.
        ``keys_of``: the block keys of the slots at some positions (the caller knows
        each slot's series and day; the slab keeps no key per block); ``where``: where
        ``located`` found these slots, if no block of theirs moved since."""
        self.hours.put(rows, hod, new, where)
        self.big.update(rows[beyond_big(new)].tolist())
        nonzero = values != 0
        if not nonzero.all():
            kept = np.flatnonzero(nonzero)
            rows, hod, values = rows[kept], hod[kept], values[kept]
            named = keys_of
            keys_of = lambda at: named(kept[at])  # noqa: E731
        if len(rows):
            self.pending.add(rows, hod, values, keys_of)

    def free_month(self, g: int, first: int, end: int) -> None:
        """Give back series ``g``'s blocks of days [first, end) (a month forgotten).

        A day's table goes with its last block: a dropped series' number is
        reused only once each of its rows was forgotten.
        """
        for day in range(first, end):
            row = self.tables.drop(day, g)
            if row < 0:
                continue
            self.hours.clear(row)
            self.big.discard(row)
            self.free.append(row)

    def days_bytes(self, first: int, end: int) -> int:
        """What the blocks of days [first, end) and those days' tables hold, in bytes."""
        held = 0
        for day in range(first, end):
            if day in self.tables:
                rows = self.tables.day_rows(day)
                held += len(rows) * BLOCK_BYTES + self.hours.bytes_of(rows)
                held += self.tables.row_bytes
        return held

    def changed_keys(self) -> np.ndarray:
        """Keys of the blocks changed since the last checkpoint (even back to nothing)."""
        return self.pending.block_keys()

    def take(self) -> Taken:
        """The changed slots for a checkpoint, with their keys; nothing pending after."""
        return Taken(*self.pending.take())


class Taken(NamedTuple):
    """A checkpoint's slots: block rows, hours of day, deltas, block keys.

    The keys are read when the slots are taken: a block row may hold another
    day by the time the writer thread names them.
    """

    rows: np.ndarray
    hod: np.ndarray
    vals: np.ndarray
    keys: np.ndarray

    def slots(self, sids: list[str | None]) -> Slots:
        """The slots by document (checkpoint/slots.py), each document's hours in order;
        ``sids``: the sid of each series number.

        A checkpoint can hold hundreds of thousands of slots: grouped with numpy,
        they cost no Python step per slot, here or in the store that takes them by
        column, and a step in C per document (its sid and month name).
        """
        keys, hod, summed = self.keys, self.hod, self.vals
        if not len(keys):
            return Slots.empty()
        hours = (keys & ((1 << DAY_BITS) - 1)) * 24 + hod
        series = keys >> DAY_BITS
        # (series, hour) order is (series, month, hour) order: one sort, one key, of 4
        # bytes when the series and the hours' span fit (the quicker sort)
        first = int(hours.min())
        span = int(hours.max()) - first + 1
        if (int(series.max()) + 1) * span <= 1 << 32:
            order = np.argsort((series * span + (hours - first)).astype(np.uint32))
        else:
            order = np.argsort(series << _HOUR_BITS | hours)
        hours, summed, series = hours[order], summed[order], series[order]
        months = months_of_hours(hours)
        docs = series << MONTH_BITS | months
        starts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
        counts = np.diff(np.r_[starts, len(docs)]).astype(np.int64)
        present, which = np.unique(months[starts], return_inverse=True)
        names = np.array([month_name(m) for m in present.tolist()], dtype=object)
        # (a list per document built in C: no Python step per document)
        doc_months = names[which.reshape(-1)].tolist()
        doc_sids = list(map(sids.__getitem__, series[starts].tolist()))
        return Slots(doc_sids, doc_months, counts,  # type: ignore[arg-type]
                     hours.astype(np.int64, copy=False), summed)

