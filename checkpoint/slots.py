"""A checkpoint's deltas by column: its documents in order, then their slots as arrays.

A shard's checkpoint can change hundreds of thousands of slots. As a dict per
document (``Checkpoint.deltas``) it costs a Python object per slot to build, to
check and to feed a store, then to free: on the shard's writer thread, whose
Python work takes the GIL from the event loop that applies batches and answers
queries. As columns it costs numpy, a check per document (its series id and
month) and nothing per slot until the store takes the values.

The checks are those of the dict form (checkpoint/layout.py), vectorised for
the common case (int64 deltas well inside int64); anything else goes through
the dict form's own checks, so both forms refuse the same checkpoints with the
same messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

MonthKey = tuple[str, str]  # (series id, "YYYY-MM"), as in checkpoint/store.py

# Below this, no day of 24 hours can add up to more than int64: the day totals
# need no exact check.
_SAFE_DELTA = (2**63 - 1) // 24


@dataclass(slots=True)
class Slots:
    """Documents ``(sids[k], months[k])``, each with ``counts[k]`` slots, their slots
    next to each other in ``hours`` (absolute, int64) and ``values`` (int64 deltas,
    or Python ints in an object array when one left int64)."""

    sids: list[str]
    months: list[str]
    counts: np.ndarray
    hours: np.ndarray
    values: np.ndarray

    @classmethod
    def empty(cls) -> Slots:
        return cls([], [], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def from_deltas(cls, deltas: dict[MonthKey, dict[int, int]]) -> Slots:
        """The dict form by column, in its order, unchecked (zeros kept)."""
        sids = [sid for sid, _ in deltas]
        months = [month for _, month in deltas]
        counts = np.fromiter((len(h) for h in deltas.values()), np.int64, len(deltas))
        hours = [h for doc in deltas.values() for h in doc]
        values = [v for doc in deltas.values() for v in doc.values()]
        return cls(sids, months, counts, _column(hours), _column(values))

    def __len__(self) -> int:
        return len(self.hours)

    def doc_keys(self) -> list[MonthKey]:
        return list(zip(self.sids, self.months, strict=True))

    def starts(self) -> np.ndarray:
        """Where each document's slots begin (and, last, where they end)."""
        return np.concatenate(([0], np.cumsum(self.counts)))

    def to_deltas(self) -> dict[MonthKey, dict[int, int]]:
        """The dict form: a dict per document (a Python object per slot)."""
        hours, values = self.hours.tolist(), self.values.tolist()
        bounds = self.starts().tolist()
        return {
            (sid, month): dict(zip(hours[a:b], values[a:b], strict=True))
            for sid, month, a, b in zip(self.sids, self.months, bounds, bounds[1:], strict=False)
        }

    def documents(self) -> Iterator[tuple[MonthKey, list[tuple[int, int]]]]:
        """Each document's key and its ``(hour, delta)`` pairs as plain ints."""
        hours, values = self.hours.tolist(), self.values.tolist()
        bounds = self.starts().tolist()
        for sid, month, a, b in zip(self.sids, self.months, bounds, bounds[1:], strict=False):
            yield (sid, month), list(zip(hours[a:b], values[a:b], strict=True))

    def select(self, keep: np.ndarray) -> Slots:
        """The documents where ``keep`` (one bool per document) is true."""
        if keep.all():
            return self
        per_slot = np.repeat(keep, self.counts)
        chosen = np.flatnonzero(keep).tolist()
        return Slots([self.sids[k] for k in chosen], [self.months[k] for k in chosen],
                     self.counts[keep], self.hours[per_slot], self.values[per_slot])


def _column(items: list) -> np.ndarray:
    """int64 if every item is an integer that fits, else an object array (checked later,
    item by item: a float must be refused, not cast)."""
    if not items:
        return np.zeros(0, np.int64)
    try:
        column = np.array(items)
    except (OverflowError, TypeError, ValueError):
        column = None
    if column is not None and column.dtype == np.int64 and column.ndim == 1:
        return column
    column = np.empty(len(items), dtype=object)
    column[:] = items
    return column


def month_index(months: list[str]) -> np.ndarray:
    """Each document's month as its place among the distinct months, in the order they
    first appear (``dict.fromkeys(months)``): found in C, not a Python step per document."""
    index = {m: k for k, m in enumerate(dict.fromkeys(months))}
    return np.fromiter(map(index.__getitem__, months), np.int64, len(months))


def plainly_valid(slots: Slots, month_bounds: dict[str, tuple[int, int]]) -> bool:
    """Whether the vectorised checks alone prove the slots valid: int64 columns of
    matching lengths, each document's hours strictly increasing and inside its month,
    no day that could add up past int64. ``month_bounds``: each (checked) month's
    ``[first, end)`` hours. False says only "check the slow way", which finds and
    names the problem."""
    hours, values, counts = slots.hours, slots.values, slots.counts
    if hours.dtype != np.int64 or values.dtype != np.int64 or counts.dtype != np.int64:
        return False
    if not len(slots.sids) == len(slots.months) == len(counts):
        return False
    if len(hours) != len(values) or int(counts.sum()) != len(hours) or (counts < 0).any():
        return False
    if not len(hours):
        return True
    # strictly increasing hours within each document: none listed twice
    step = np.diff(hours) > 0
    if not step.all():
        ends = np.cumsum(counts)[:-1]
        step[ends[(ends > 0) & (ends < len(hours))] - 1] = True  # (across documents)
        if not step.all():
            return False
    which = month_index(slots.months)
    bounds = np.array([month_bounds[m] for m in dict.fromkeys(slots.months)],
                      np.int64).reshape(-1, 2)
    first = np.repeat(bounds[which, 0], counts)
    end = np.repeat(bounds[which, 1], counts)
    if ((hours < first) | (hours >= end)).any():
        return False
    # (-INT64_MIN is outside int64: compare without negating)
    return bool(((values <= _SAFE_DELTA) & (values >= -_SAFE_DELTA)).all())


def nonzero(slots: Slots) -> Slots:
    """Without zero deltas, and without the documents left with none."""
    keep = slots.values != 0
    if keep.all():
        return slots
    doc_of_slot = np.repeat(np.arange(len(slots.counts)), slots.counts)
    per_doc = np.bincount(doc_of_slot[keep], minlength=len(slots.counts)).astype(np.int64)
    docs = per_doc > 0
    chosen = np.flatnonzero(docs).tolist()
    return Slots([slots.sids[k] for k in chosen], [slots.months[k] for k in chosen],
                 per_doc[docs], slots.hours[keep], slots.values[keep])
