"""The 24 hours of every day block, each block as narrow as its counts allow.

A shard holding 30 days of hours for 100,000 series keeps 72 million hours,
and most of them count little: a series of a customer-service product sees a
few events an hour. Every block starts as 24 bytes of int8 (``small``); a
block with an hour beyond ±SMALL moves, with its other hours, to a row of the
int16 slab (``mid``), and one beyond ±NARROW to a row of the int64 slab
(``wide``). ``at`` says where a block moved (one int32 per block row), so a
block costs 28 bytes while it is small, and only a busy series' blocks pay
for more: a current-hour stream of a thousand series promotes its thousand
blocks once and is read from ``mid`` from then on.

A block does not move back when its counts shrink (an undo): its row goes
back to the free list only when the block is cleared (its month forgotten).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SMALL = 2**7 - 1  # a block whose every hour is within ±SMALL is kept as int8
NARROW = 2**15 - 1  # ... within ±NARROW, as int16 at most
# ``at`` of a block in ``wide`` is WIDE + its row there; in ``mid`` just its row; -1: none
WIDE = 1 << 30
# a block's bytes while it is small: its int8 row and its ``at``
SMALL_BYTES = 24 + 4
MID_BYTES = 24 * 2
WIDE_BYTES = 24 * 8


class Where(NamedTuple):
    """Where a batch's slots were when it read them: all in ``small`` or all in ``mid``
    (``tier``), at ``flat`` (row * 24 + hour of that slab); tier MIXED: neither, no
    ``flat``. A write of the same slots reuses it while no block of theirs has moved
    since, which a batch's own earlier slices cannot have done to them: a slice holds
    all the slots of its series (actors/shard_state.py, ``Applying``)."""

    tier: int
    flat: np.ndarray | None

    def part(self, a: int, z: int) -> Where:
        """Where slots [a, z) of the batch are."""
        return self if self.flat is None else Where(self.tier, self.flat[a:z])


SMALL_TIER, MID_TIER, MIXED = 0, 1, -1
NOWHERE = Where(MIXED, None)  # slots in several tiers (or none): found again when written


class _Slab:
    """Rows of 24 hours of one width, handed out and given back."""

    __slots__ = ("hours", "free", "used")

    def __init__(self, dtype: type, rows: int) -> None:
        self.hours = np.zeros((rows, 24), dtype)
        self.free: list[int] = []
        self.used = 0

    def __len__(self) -> int:
        """Rows holding a block."""
        return self.used - len(self.free)

    def take(self, n: int) -> np.ndarray:
        """``n`` rows (zero), free ones first; the slab doubles when it is full."""
        reuse = min(len(self.free), n)
        rows = np.empty(n, np.int64)
        if reuse:
            rows[:reuse] = self.free[len(self.free) - reuse:]
            del self.free[len(self.free) - reuse:]
        fresh = n - reuse
        if self.used + fresh > len(self.hours):
            grown = np.zeros((max(self.used + fresh, 2 * len(self.hours)), 24),
                             self.hours.dtype)
            grown[:self.used] = self.hours[:self.used]
            self.hours = grown
        rows[reuse:] = np.arange(self.used, self.used + fresh)
        self.used += fresh
        return rows

    def give(self, row: int) -> None:
        self.hours[row] = 0
        self.free.append(row)


class HourTiers:
    """The hours of block rows [0, len): int8, int16 or int64 per block."""

    def __init__(self, rows: int) -> None:
        self.small = np.zeros((rows, 24), np.int8)
        self.at = np.full(rows, -1, np.int32)  # block row -> where it moved (-1: small)
        self.mid = _Slab(np.int16, 64)
        self.wide = _Slab(np.int64, 16)

    def __len__(self) -> int:
        """Block rows there is room for."""
        return len(self.small)

    def grow(self, rows: int) -> None:
        """Room for ``rows`` block rows (new ones small and zero)."""
        small = np.zeros((rows, 24), np.int8)
        small[:len(self.small)] = self.small
        at = np.full(rows, -1, np.int32)
        at[:len(self.at)] = self.at
        self.small, self.at = small, at

    @property
    def moved(self) -> int:
        """Blocks kept wider than int8 (none: ``at`` need not be read)."""
        return len(self.mid) + len(self.wide)

    @property
    def wide_blocks(self) -> int:
        """Blocks kept as int64 (none: every hour held is within ±NARROW)."""
        return len(self.wide)

    def get(self, rows: np.ndarray, hod: np.ndarray) -> np.ndarray:
        """The counts of slots (block rows, hours of day), as int64."""
        return self.located(rows, hod)[0]

    def located(self, rows: np.ndarray, hod: np.ndarray) -> tuple[np.ndarray, Where]:
        """The counts of slots (block rows, hours of day), as int64, and where they are
        (for ``put`` to write them back without finding them again)."""
        where = self._where(rows, hod)
        if where.tier == SMALL_TIER:
            return self.small.reshape(-1).take(where.flat).astype(np.int64), where
        if where.tier == MID_TIER:
            return self.mid.hours.reshape(-1).take(where.flat).astype(np.int64), where
        at = self.at[rows]
        values = self.small.reshape(-1).take(rows * 24 + hod).astype(np.int64)
        mid, wide = self._tiers(at)
        if mid is not None:
            values[mid] = self.mid.hours.reshape(-1).take(at[mid] * 24 + hod[mid])
        if wide is not None:
            values[wide] = self.wide.hours[at[wide] - WIDE, hod[wide]]
        return values, where

    def _where(self, rows: np.ndarray, hod: np.ndarray) -> Where:
        """Where slots are: all small, all in ``mid``, or NOWHERE (several tiers). Flat
        indexes (1-D takes and puts) cost less than numpy's 2-D fancy indexing."""
        if not self.moved:
            return Where(SMALL_TIER, rows * 24 + hod)
        at = self.at[rows]
        if not self.wide_blocks and int(at.min()) >= 0:  # (a busy stream: every block moved)
            return Where(MID_TIER, at * 24 + hod)
        return NOWHERE

    def row_counts(self, rows: np.ndarray) -> np.ndarray:
        """The 24 hours of each block row, as int64 (len(rows) x 24)."""
        out = self.small[rows].astype(np.int64)
        if not self.moved:
            return out
        at = self.at[rows]
        mid, wide = self._tiers(at)
        if mid is not None:
            out[mid] = self.mid.hours[at[mid]]
        if wide is not None:
            out[wide] = self.wide.hours[at[wide] - WIDE]
        return out

    def put(self, rows: np.ndarray, hod: np.ndarray, values: np.ndarray,
            where: Where | None = None) -> None:
        """Set distinct slots to int64 ``values``, moving blocks that need a wider tier;
        ``where``: where ``located`` found these slots, if none of their blocks moved since
        (found here otherwise)."""
        if not len(values):
            return
        # (two reductions, no mask: what a batch whose blocks all fit their tier costs)
        top, bottom = int(values.max()), int(values.min())
        if where is None:
            where = self._where(rows, hod)
        if where.tier == SMALL_TIER and top <= SMALL and bottom >= -SMALL:
            self.small.reshape(-1).put(where.flat, values)
            return
        if where.tier == MID_TIER and top <= NARROW and bottom >= -NARROW:
            self.mid.hours.reshape(-1).put(where.flat, values)
            return
        self._make_room(rows, values)
        at = self.at[rows]
        mid, wide = self._tiers(at)
        if mid is None and wide is None:
            self.small.reshape(-1).put(rows * 24 + hod, values)
            return
        small = at < 0
        self.small.reshape(-1).put(rows[small] * 24 + hod[small], values[small])
        if mid is not None:
            self.mid.hours.reshape(-1).put(at[mid] * 24 + hod[mid], values[mid])
        if wide is not None:
            self.wide.hours[at[wide] - WIDE, hod[wide]] = values[wide]

    def clear(self, row: int) -> None:
        """Zero a block row, small again (its wider row, if any, is given back)."""
        self.small[row] = 0
        a = int(self.at[row])
        if a >= WIDE:
            self.wide.give(a - WIDE)
        elif a >= 0:
            self.mid.give(a)
        self.at[row] = -1

    def bytes_of(self, rows: np.ndarray) -> int:
        """What block rows' hours hold, in bytes (their wider rows included)."""
        total = len(rows) * SMALL_BYTES
        if self.moved and len(rows):
            at = self.at[rows]
            total += int(np.count_nonzero((at >= 0) & (at < WIDE))) * MID_BYTES
            total += int(np.count_nonzero(at >= WIDE)) * WIDE_BYTES
        return total

    # ---- moving blocks to a wider tier --------------------------------------

    @staticmethod
    def _tiers(at: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Masks of the entries of ``at`` in ``mid`` and in ``wide`` (None: no entry)."""
        moved = at >= 0
        if not moved.any():
            return None, None
        wide = at >= WIDE
        if not wide.any():
            return moved, None
        mid = moved & ~wide
        return (mid if mid.any() else None), wide

    def _make_room(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Move the blocks of ``rows`` whose new value does not fit their tier."""
        over16 = (values > NARROW) | (values < -NARROW)
        if over16.any():
            at = self.at[rows[over16]]
            self._to_wide(np.unique(rows[over16][at < WIDE]))
        over8 = (values > SMALL) | (values < -SMALL)
        if over8.any():
            candidates = rows[over8]
            candidates = np.unique(candidates[self.at[candidates] < 0])
            if len(candidates):
                self._to_mid(candidates)

    def _to_mid(self, rows: np.ndarray) -> None:
        """Move small blocks (distinct rows) to ``mid``, their hours kept."""
        to = self.mid.take(len(rows))
        self.mid.hours[to] = self.small[rows]
        self.small[rows] = 0
        self.at[rows] = to

    def _to_wide(self, rows: np.ndarray) -> None:
        """Move small or mid blocks (distinct rows) to ``wide``, their hours kept."""
        if not len(rows):
            return
        counts = self.row_counts(rows)
        for row in rows.tolist():
            a = int(self.at[row])
            if a >= 0:
                self.mid.give(a)
            self.small[row] = 0
        to = self.wide.take(len(rows))
        self.wide.hours[to] = counts
        self.at[rows] = to + WIDE
