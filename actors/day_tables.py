"""Which block row holds (series number, UTC day): one int32 grid, a row per day held.

A shard's counts live in day blocks (actors/day_blocks.py). A batch of tens of
thousands of aggregates spread over weeks must find each one's block with no
Python step per aggregate and, better, none per day either: a table per day
cost a sort of the batch by day and a gather per day it touched. Here every
day held has a row of one grid (``rows``, days by series number), so a batch
finds its blocks with two gathers, whatever days it spans: where each day's
row starts (``_start``, by day from the first held: a day costs 8 bytes there,
held or not, and every day since 1970 would be 164 kB), then the blocks.

A day's grid row goes back to the free list with its last block; the grid
grows by whole rows (days) and whole columns (series numbers), each by a
part of its size, so that growth is rare and a row costs 4 bytes per series.
"""

from __future__ import annotations

import numpy as np

NONE = -1  # no block


class DayTables:
    """Block rows by (UTC day, series number), with each day's count of blocks."""

    def __init__(self) -> None:
        self.rows = np.full((0, 1024), NONE, np.int32)  # grid row -> series number -> block
        self.blocks: list[int] = []  # grid row -> blocks it holds
        self.free: list[int] = []  # grid rows without a day
        self.row_of: dict[int, int] = {}  # day -> its grid row
        # where each day's grid row starts in the flattened grid (NONE: not held), for the
        # days from ``_first`` to the last held: what a batch's days are looked up in
        self._first = 0
        self._start = np.empty(0, np.int64)

    def __contains__(self, day: int) -> bool:
        return day in self.row_of

    def __len__(self) -> int:
        """Days held."""
        return len(self.row_of)

    @property
    def width(self) -> int:
        """Series numbers a grid row holds."""
        return int(self.rows.shape[1])

    def day_blocks(self, day: int) -> int:
        """Blocks the day holds (0 if none)."""
        r = self.row_of.get(day)
        return 0 if r is None else self.blocks[r]

    def day_rows(self, day: int) -> np.ndarray:
        """The block rows the day holds."""
        r = self.row_of.get(day)
        if r is None:
            return np.empty(0, np.int64)
        grid_row = self.rows[r]
        return grid_row[grid_row != NONE].astype(np.int64)

    # ---- finding -----------------------------------------------------------

    def find(self, g: np.ndarray, days: np.ndarray) -> np.ndarray:
        """Block rows of (series number, day) pairs, as int64; NONE where there is none."""
        n = len(g)
        if not n or not self.row_of:
            return np.full(n, NONE, np.int64)
        lo, hi = int(days.min()), int(days.max())
        if lo == hi:  # the usual batch: one day
            r = self.row_of.get(lo)
            if r is None:
                return np.full(n, NONE, np.int64)
            grid_row = self.rows[r]
            if int(g.max()) < len(grid_row):
                return grid_row[g].astype(np.int64)
            found = np.full(n, NONE, np.int64)
            inside = g < len(grid_row)
            found[inside] = grid_row[g[inside]]
            return found
        offset = days - self._first
        if lo >= self._first and hi < self._first + len(self._start):
            start = self._start[offset]
        else:  # (days before or after every day held)
            start = np.full(n, NONE, np.int64)
            inside = (offset >= 0) & (offset < len(self._start))
            start[inside] = self._start[offset[inside]]
        held = start >= 0
        cells = self.rows.reshape(-1)
        if int(g.max()) < self.width and held.all():
            return cells[start + g].astype(np.int64)
        found = np.full(n, NONE, np.int64)
        inside = held & (g < self.width)
        found[inside] = cells[start[inside] + g[inside]]
        return found

    # ---- changing ----------------------------------------------------------

    def put(self, g: np.ndarray, days: np.ndarray, rows: np.ndarray, series_count: int) -> None:
        """Record new blocks: distinct (series number, day) pairs that had none."""
        if not len(g):
            return
        self._widen(max(series_count, int(g.max()) + 1))
        present, per_day = np.unique(days, return_counts=True)
        for day, count in zip(present.tolist(), per_day.tolist(), strict=True):
            self.blocks[self._grid_row(day)] += count
        self.rows.reshape(-1)[self._start[days - self._first] + g] = rows

    def drop(self, day: int, g: int) -> int:
        """Forget the block of (series number, day); its row, NONE if there was none.
        The day's grid row is freed with its last block."""
        r = self.row_of.get(day)
        if r is None or g >= self.width:
            return NONE
        row = int(self.rows[r, g])
        if row == NONE:
            return NONE
        self.rows[r, g] = NONE
        self.blocks[r] -= 1
        if not self.blocks[r]:  # (the grid row is all NONE again)
            del self.row_of[day]
            self.free.append(r)
            if len(self.free) > 8 and 2 * len(self.free) > len(self.rows):
                self._compact()  # (months forgotten: give their rows' memory back)
            self._index()
        return row

    def _compact(self) -> None:
        """A grid of the days held only, in their order."""
        held = sorted(self.row_of.items(), key=lambda item: item[1])
        self.rows = self.rows[[r for _, r in held]].copy()
        self.row_of = {day: k for k, (day, _) in enumerate(held)}
        self.blocks = [self.blocks[r] for _, r in held]
        self.free = []
        self._index()

    def _grid_row(self, day: int) -> int:
        r = self.row_of.get(day)
        if r is not None:
            return r
        if not self.free:  # (by half: a backfill reaches a day more with most batches)
            old = len(self.rows)
            more = max(8, old // 2)
            grown = np.empty((old + more, self.width), np.int32)
            grown[:old] = self.rows
            grown[old:] = NONE
            self.rows = grown
            self.blocks += [0] * more
            self.free = list(range(old + more - 1, old - 1, -1))
        r = self.free.pop()
        self.row_of[day] = r
        self._index()
        return r

    def _widen(self, need: int) -> None:
        """Columns for series numbers below ``need``."""
        width = self.width
        if need <= width:
            return
        grown = np.empty((len(self.rows), max(need, width + width // 2)), np.int32)
        grown[:, :width] = self.rows
        grown[:, width:] = NONE
        self.rows = grown
        self._index()

    def _index(self) -> None:
        """``_first`` and ``_start`` again, after days or columns changed."""
        if not self.row_of:
            self._first, self._start = 0, np.empty(0, np.int64)
            return
        first, last = min(self.row_of), max(self.row_of)
        start = np.full(last - first + 1, NONE, np.int64)
        for day, r in self.row_of.items():
            start[day - first] = r * self.width
        self._first, self._start = first, start

    @property
    def row_bytes(self) -> int:
        """What a day's grid row holds, in bytes."""
        return self.width * 4
