"""Changes since the last checkpoint, summed per slot as batches apply.

A shard checkpoints the *deltas* of the hours it changed, not its totals: a
month document in the store is updated by adding them (checkpoint/store.py).
They are summed per (block row, hour of day) as batches apply, so beginning a
checkpoint takes the changed slots as they are, and the count of dirty slots
that the shard's bound (``max_dirty``) limits is always exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PENDING_ROWS = 4096  # rows of pending deltas kept between checkpoints, at least
SAFE = 2**62  # a delta within this plus a value within it cannot leave int64
# The table's widths, narrowest first, and the largest delta each holds.
WIDTHS = ((np.dtype(np.int16), 2**15 - 1), (np.dtype(np.int32), 2**31 - 1),
          (np.dtype(np.int64), 2**63 - 1))


def width_for(bound: int) -> np.dtype:
    """The narrowest of ``WIDTHS`` holding every delta within ``bound``."""
    return next(dtype for dtype, top in WIDTHS if bound <= top)


class PendingDeltas:
    """Deltas since the last checkpoint, summed per (block row, hour of day) as batches
    apply: a row of 24 for each block changed since, found by block row.

    Not a log of every batch's aggregates, summed when a checkpoint begins: a
    shard ingesting fast logs far more entries per checkpoint than there are
    slots to write, in fresh arrays whose pages the kernel must zero, and
    summing them took a large share of the shard's time (docs/performance.md).
    Here an aggregate costs one add into a slot, and a checkpoint takes the
    slots as they are.

    The table is as narrow as its deltas allow (``WIDTHS``): int16 while no
    delta since the last checkpoint can pass 2**15 (``bound``), widened in one
    copy when one could. A wide stream changes about one hour of each block it
    touches, so a checkpoint scans and clears 24 entries per changed slot:
    narrow entries are a quarter of the bytes to scan, clear and miss in cache.
    A slot's delta
    that leaves int64 (its hour's total, which stays within int64, moved by
    more than 2**63 since the last checkpoint) refuses the batch (``overflows``),
    but an undo cannot be refused: its delta is kept exactly, as a Python int in
    ``wide``, its table entry 0 (the store refuses that checkpoint, see
    checkpoint/layout.py, and the shard reports it until an operator acts).
    """

    __slots__ = ("table", "at", "block", "key", "rows", "slots", "wide", "bound")

    def __init__(self, blocks: int) -> None:
        self.table = np.zeros((PENDING_ROWS, 24), WIDTHS[0][0])
        self.at = np.full(blocks, -1, np.int32)  # block row -> its row of table, -1: none
        self.block = np.zeros(PENDING_ROWS, np.int64)  # row of table -> its block row
        # row of table -> its block's key (series << DAY_BITS | day): named here, for the
        # blocks changed, so the slab keeps no key per block
        self.key = np.zeros(PENDING_ROWS, np.int64)
        self.rows = 0  # rows of table in use
        self.slots = 0  # nonzero entries of table and of wide
        self.wide: dict[int, int] = {}  # row of table * 24 + hour of day -> delta
        # no delta in table is beyond this (the values added since ``take``, each batch's
        # largest): within the table's width; below SAFE, no int64 add can wrap and none
        # needs the check
        self.bound = 0

    def reserve(self, blocks: int) -> None:
        """The block slab grew to ``blocks`` rows."""
        if blocks > len(self.at):
            at = np.full(blocks, -1, np.int32)
            at[:len(self.at)] = self.at
            self.at = at

    def block_rows(self) -> np.ndarray:
        return self.block[:self.rows]

    def block_keys(self) -> np.ndarray:
        """The keys of the blocks changed (in ``block_rows`` order)."""
        return self.key[:self.rows]

    def _before(self, rows: np.ndarray, hod: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of table of block ``rows`` (-1: none yet) and the deltas at ``hod``."""
        at = self.at[rows]
        known = at >= 0
        if known.all():
            return at, self.table[at, hod].astype(np.int64)
        before = np.zeros(len(at), np.int64)
        before[known] = self.table[at[known], hod[known]]
        return at, before

    def overflows(self, rows: np.ndarray, hod: np.ndarray, values: np.ndarray
                  ) -> np.ndarray:
        """Which of (block row, hour, value) would take a slot's delta out of int64."""
        _, before = self._before(rows, hod)
        with np.errstate(over="ignore"):
            after = before + values
        return np.flatnonzero(((values > 0) & (after < before)) | ((values < 0) & (after > before)))

    def add(self, rows: np.ndarray, hod: np.ndarray, values: np.ndarray,
            keys_of: Callable[[np.ndarray], np.ndarray]) -> None:
        """Add nonzero ``values`` at distinct (block row, hour of day) slots; ``keys_of``
        gives the block keys of the slots at some positions (asked only for blocks
        not changed since the last checkpoint, the first time)."""
        at = self.at[rows]
        fresh = at < 0
        if fresh.any():
            fresh = np.flatnonzero(fresh)
            first = _distinct(rows[fresh], self.at)
            new = rows[fresh[first]]
            n, m = self.rows, self.rows + len(new)
            if m > len(self.table):
                size = max(m, len(self.table) + len(self.table) // 2)
                table = np.zeros((size, 24), self.table.dtype)
                table[:n] = self.table[:n]
                block = np.zeros(size, np.int64)
                block[:n] = self.block[:n]
                key = np.zeros(size, np.int64)
                key[:n] = self.key[:n]
                self.table, self.block, self.key = table, block, key
            self.block[n:m] = new
            self.key[n:m] = keys_of(fresh[first])
            self.at[new] = np.arange(n, m, dtype=np.int32)
            self.rows = m
            at = self.at[rows]
        flat = at.astype(np.int64) * 24 + hod  # (one gather and one scatter, not 2-D ones)
        self.bound += max(int(values.max()), -int(values.min())) if len(values) else 0
        dtype = width_for(min(self.bound, SAFE))
        if dtype.itemsize > self.table.itemsize:
            self.table = self.table.astype(dtype)
        cells = self.table.reshape(-1)
        before = cells[flat].astype(np.int64, copy=False)
        with np.errstate(over="ignore"):
            after = before + values
        if self.wide or self.bound >= SAFE:
            # an int64 sum wrapped where its sign differs from both operands' signs
            wrapped = ((before ^ after) & (values ^ after)) < 0
            if self.wide or wrapped.any():
                self._widen(flat, before, values, after, wrapped)
        cells[flat] = after
        self.slots += int(np.count_nonzero(after)) - int(np.count_nonzero(before))

    def _widen(self, keys: np.ndarray, before: np.ndarray, values: np.ndarray,
               after: np.ndarray, wrapped: np.ndarray) -> None:
        """Slots whose delta left int64 now or before: summed as Python ints in ``wide``,
        their ``after`` set to 0 (``slots`` counts them as ``wide`` does)."""
        wide = self.wide
        hit = wrapped
        if wide:
            hit = hit | np.isin(keys, np.fromiter(wide, np.int64, len(wide)))
        for n in np.flatnonzero(hit).tolist():
            key = int(keys[n])
            old = wide.get(key, 0)
            new = wide[key] = old + int(before[n]) + int(values[n])
            after[n] = 0
            self.slots += (new != 0) - (old != 0)

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The nonzero slots (block rows, hours of day, deltas, block keys), and nothing
        pending after. Deltas are int64, or Python ints (dtype object) if one left int64."""
        n = self.rows
        used = self.table[:n]
        flat, vals = _nonzero(used.reshape(-1))
        at, hod = np.divmod(flat, 24)
        if self.wide:
            keys = np.fromiter(self.wide, np.int64, len(self.wide))
            at = np.concatenate((at, keys // 24))
            hod = np.concatenate((hod, keys % 24))
            wide = np.array(list(self.wide.values()), dtype=object)
            vals = np.concatenate((vals.astype(object), wide))
            keep = vals != 0
            at, hod, vals = at[keep], hod[keep], vals[keep]
        rows, keys = self.block[at], self.key[at]
        self.at[self.block[:n]] = -1
        # Room for as many rows as this checkpoint took, and a quarter more: the next
        # interval of a steady stream needs about as many, and a table regrown from
        # small by doubling at every interval copies itself over and over. Only a
        # table far larger than that (a burst is over) gives its pages back. The width
        # starts narrow again: the next interval's deltas may fit.
        keep = max(PENDING_ROWS, n + n // 4)
        narrow = WIDTHS[0][0]
        if len(self.table) > 2 * keep:
            self.table = np.zeros((keep, 24), narrow)
            self.block = np.zeros(keep, np.int64)
            self.key = np.zeros(keep, np.int64)
        elif self.table.dtype != narrow:
            self.table = np.zeros(self.table.shape, narrow)
        else:
            used[:] = 0
        self.rows = self.slots = self.bound = 0
        self.wide = {}
        return rows, hod.astype(np.int64), vals, keys


def _nonzero(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The indexes and values (as int64) of the nonzero entries of contiguous ``cells``.

    Read 8 bytes at a time: the words holding something first, then their entries. A
    wide stream's changed blocks hold about one nonzero hour each, so this scans a
    quarter of the entries an int16 scan would (and from a bool mask, which
    ``flatnonzero`` scans faster than integers).
    """
    lanes = 8 // cells.itemsize
    if lanes == 1 or len(cells) % lanes:
        flat = np.flatnonzero(cells != 0)
        return flat, cells[flat].astype(np.int64, copy=False)
    whole = cells.view(np.uint64)
    words = np.flatnonzero(whole != 0)
    held = whole[words].view(cells.dtype)  # the entries of those words
    k = np.flatnonzero(held != 0)
    flat = words[k // lanes] * lanes + k % lanes
    return flat, held[k].astype(np.int64, copy=False)


def _distinct(keys: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Positions in ``keys`` of one occurrence of each distinct value (non-negative
    indexes into ``scratch``, whose entries there are -1 and are left so), in no
    particular order, without a sort: each key's entry takes the position of one of its
    occurrences, and that one is kept."""
    positions = np.arange(len(keys), dtype=scratch.dtype)
    scratch[keys] = positions
    kept = np.flatnonzero(scratch[keys] == positions)
    scratch[keys] = -1
    return kept
