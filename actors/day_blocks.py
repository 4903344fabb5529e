"""Where a shard's live counts are: one int64 slab of day blocks, 24 hours each.

Counts are kept per (series, UTC day) rather than per series-month or per
increment so that an ingest is a handful of numpy operations over the batch
(find each aggregate's row, add, write back) with no Python step per row, and
a month the shard forgets (``free_month``) gives its rows back for reuse.

A block's *key* is ``series << DAY_BITS | day``; a dict finds its row. Finding
rows one dict lookup at a time is what an ingest would otherwise spend its
time on, so the rows of the most recent days are also kept in an int32 array
per day indexed by series number (``recent``): a batch of the current hours
finds its rows with one numpy gather.

The changes since the last checkpoint (``pending``, actors/pending.py) are
indexed by block row, so they grow with the slab.
"""

from __future__ import annotations

from itertools import repeat
from typing import NamedTuple

import numpy as np

from tally.actors.pending import PendingDeltas
from tally.checkpoint.store import MonthKey
from tally.wire.timeslots import month_name, months_of_hours

DAY_BITS = 20  # a block key is series << DAY_BITS | UTC day (days up to year 4840)
MONTH_BITS = 16  # a (series, month) key is series << MONTH_BITS | months since 1970-01
FREE = -1  # the block key of a free row (its series, FREE >> DAY_BITS, is no series)
RECENT_DAYS = 3  # days whose block rows are also kept in an array per series number
# Below this no 24 hours can add up to more than int64 (24 * 2**58 < 2**63): only a day
# holding an hour beyond it needs its day total checked.
BIG = 2**58


def beyond_big(values: np.ndarray) -> np.ndarray:
    """|values| > BIG without np.abs, which wraps INT64_MIN back to itself."""
    return (values > BIG) | (values < -BIG)


class DayBlocks:
    """The slab of day blocks, the table of their keys, and the deltas not yet checkpointed.

    Series numbers are the caller's (actors/live_series.py); ``series_count``
    arguments bound them, so per-series arrays here can be sized.
    """

    def __init__(self) -> None:
        self.counts = np.zeros((1024, 24), dtype=np.int64)  # block row -> its 24 hours
        self.row_of: dict[int, int] = {}  # block key -> block row
        self.key = np.zeros(1024, dtype=np.int64)  # block row -> its key (FREE: none)
        # day -> block row by series number (-1: not known here, ask row_of)
        self.recent: dict[int, np.ndarray] = {}
        self.free: list[int] = []
        self.used = 0  # rows ever used: [0, used) are blocks or free
        self.big: set[int] = set()  # rows holding an hour beyond BIG
        self.pending = PendingDeltas(len(self.counts))

    def block(self, key: int) -> int:
        """The row of a block key, taken (a free row first) if it has none."""
        row = self.row_of.get(key)
        if row is None:
            if self.free:
                row = self.free.pop()
            else:
                row = self.used
                if row == len(self.counts):
                    self.reserve(1)
                self.used += 1
            self.row_of[key] = row
            self.key[row] = key
        return row

    def reserve(self, more: int) -> None:
        """Room in the slab for ``more`` new blocks (free rows are taken first).

        It grows by a quarter (at least 1024 rows), or at once to what a batch
        needs when that is more: a batch of many new series then costs one copy,
        not one per quarter, and leaves no quarter of slack behind it (two day
        blocks are a large part of what a series-month holds). A large slab is
        calloc'd from fresh pages: rows not used yet take no resident memory.
        """
        need = self.used + max(0, more - len(self.free))
        size = len(self.counts)
        if need <= size:
            return
        size = max(need, size + max(1024, size // 4))
        counts = np.zeros((size, 24), np.int64)
        counts[: len(self.counts)] = self.counts
        key = np.zeros(size, np.int64)
        key[: len(self.key)] = self.key
        self.counts, self.key = counts, key
        self.pending.reserve(size)

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """Block rows for block keys, creating missing blocks (a key may repeat: the
        hours of one series-day). Each key is looked up in C; only the missing ones are
        made distinct (``np.unique`` costs more than the lookups)."""
        rows = np.fromiter(map(self.row_of.get, keys.tolist(), repeat(-1)), np.int64,
                           len(keys))
        missing = rows < 0
        if missing.any():
            uniq, inverse = np.unique(keys[missing], return_inverse=True)
            self.reserve(len(uniq))
            block = self.block
            made = np.fromiter((block(k) for k in uniq.tolist()), np.int64, len(uniq))
            rows[missing] = made[inverse.reshape(-1)]
        return rows

    def locate(self, g: np.ndarray, days: np.ndarray, series_count: int) -> np.ndarray:
        """Block rows of (series number, day) pairs, creating missing blocks."""
        rows = self.recent_rows(g, days, series_count)
        missed = rows < 0
        if missed.any():
            g, days = g[missed], days[missed]
            found = self.rows(g << DAY_BITS | days)
            rows[missed] = found
            for day, table in self.recent.items():  # (known from now on)
                mine = days == day
                table[g[mine]] = found[mine]
        return rows

    def recent_rows(self, g: np.ndarray, days: np.ndarray, series_count: int) -> np.ndarray:
        """Block rows of (series, day) pairs from the recent days' arrays; -1 where they
        do not know it. A day newer than those kept gets an array (the oldest goes)."""
        rows = np.full(len(g), -1, np.int64)
        if not len(g):
            return rows
        newest = int(days.max())
        recent = self.recent
        for day in range(max(int(days.min()), newest - RECENT_DAYS + 1), newest + 1):
            if day not in recent and (len(recent) < RECENT_DAYS or day > min(recent)):
                if len(recent) == RECENT_DAYS:
                    del recent[min(recent)]
                recent[day] = np.full(max(series_count, 1024), -1, np.int32)
        for day, table in list(recent.items()):
            if len(table) < series_count:  # series added since: room for them, unknown yet
                grown = np.full(max(series_count, len(table) + len(table) // 2), -1, np.int32)
                grown[:len(table)] = table
                recent[day] = table = grown
            mine = days == day
            rows[mine] = table[g[mine]]
        return rows

    def set_hours(self, g: int, hours: dict[int, int]) -> None:
        """Write a stored month's ``{absolute hour: total}`` into series ``g``'s blocks."""
        for hour, total in hours.items():
            row = self.block(g << DAY_BITS | hour // 24)
            self.counts[row, hour % 24] = total
            if abs(total) > BIG:
                self.big.add(row)

    def write(self, rows: np.ndarray, hod: np.ndarray, new: np.ndarray,
              values: np.ndarray) -> None:
        """Set slots (block rows, hours of day) to ``new``, which moved them by ``values``
        (distinct slots, checked for int64 by the caller); the move is pending."""
        self.counts[rows, hod] = new
        self.big.update(rows[beyond_big(new)].tolist())
        nonzero = values != 0
        if not nonzero.all():
            rows, hod, values = rows[nonzero], hod[nonzero], values[nonzero]
        if len(rows):
            self.pending.add(rows, hod, values)

    def free_month(self, g: int, first: int, end: int) -> None:
        """Give back series ``g``'s blocks of days [first, end) (a month forgotten).

        The recent days' arrays forget them too: a dropped series' number is
        reused only once each of its rows was forgotten.
        """
        base = g << DAY_BITS
        for day in range(first, end):
            row = self.row_of.pop(base | day, None)
            if row is not None:
                table = self.recent.get(day)
                if table is not None and g < len(table):
                    table[g] = -1
                self.counts[row] = 0
                self.key[row] = FREE  # a scan of the keys must not find it
                self.big.discard(row)
                self.free.append(row)

    def changed_keys(self) -> np.ndarray:
        """Keys of the blocks changed since the last checkpoint (even back to nothing)."""
        return self.key[self.pending.block_rows()]

    def take(self) -> Taken:
        """The changed slots for a checkpoint, with their keys; nothing pending after."""
        rows, hod, vals = self.pending.take()
        return Taken(rows, hod, vals, self.key[rows])


class Taken(NamedTuple):
    """A checkpoint's slots: block rows, hours of day, deltas, block keys.

    The keys are read when the slots are taken: a block row may hold another
    day by the time the writer thread names them.
    """

    rows: np.ndarray
    hod: np.ndarray
    vals: np.ndarray
    keys: np.ndarray

    def deltas(self, sids: list[str | None]) -> dict[MonthKey, dict[int, int]]:
        """The slots as ``(sid, month) -> {absolute hour: delta}``, built per document;
        ``sids``: the sid of each series number.

        A checkpoint can hold hundreds of thousands of slots. Grouping them by
        document with numpy and sharing one int object per distinct hour keeps
        the per-slot Python work to a dict entry: a loop per slot would make
        several int objects per slot (series, month, hour), and that churn of
        small objects is what leaves the allocator's arenas pinned (resident)
        after the checkpoint is gone.
        """
        keys, hod, summed = self.keys, self.hod, self.vals
        deltas: dict[MonthKey, dict[int, int]] = {}
        if not len(keys):
            return deltas
        hours = (keys & ((1 << DAY_BITS) - 1)) * 24 + hod
        docs = (keys >> DAY_BITS) << MONTH_BITS | months_of_hours(hours)
        order = np.lexsort((hours, docs))
        docs, hours, summed = docs[order], hours[order], summed[order]
        starts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
        ends = np.r_[starts[1:], len(docs)]
        distinct, which = np.unique(hours, return_inverse=True)
        shared = np.empty(len(distinct), dtype=object)
        shared[:] = distinct.tolist()
        hour_objs = shared[which.reshape(-1)].tolist()  # references to the shared ints
        values = summed.tolist()
        low = (1 << MONTH_BITS) - 1
        names: dict[int, str] = {}
        for doc, a, b in zip(docs[starts].tolist(), starts.tolist(), ends.tolist(), strict=True):
            m = doc & low
            name = names.get(m)
            if name is None:
                name = names[m] = month_name(m)
            deltas[(sids[doc >> MONTH_BITS], name)] = dict(  # type: ignore[index]
                zip(hour_objs[a:b], values[a:b], strict=True)
            )
        return deltas

