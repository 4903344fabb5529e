"""Stored months of a shard's own series, kept for queries.

A query for a series asks only the shard that owns it, and the shard answers
for every month — live ones from its blocks, the others from the store. This
is the shard's copy of those others. It stays exact without any invalidation
protocol because the owning shard is the only writer of its series' month
documents and a document only changes while the shard holds the month live
(a live month answers from its blocks; loading it live drops the copy, and
when it is evicted later the store already has its final counts, read again
on the next query). Absent documents are kept too, so a range reaching back
before a series existed costs no store read after the first. Bounded by bytes,
least recently used series out first (with all its months): a query reads a
series' months together, so keeping them together makes a year-long query one
lookup per series, not one per series and month.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

MISSING = object()  # not kept: read the store
ENTRY_OVERHEAD = 120  # bytes of key, tuple and dict slot per entry, roughly
MONTH_OVERHEAD = 120  # bytes of a Month beside its hours (tuple, array header, two ints)
DEFAULT_BYTES = 64 * 1024 * 1024


class Month(NamedTuple):
    """A stored month's counts per hour, with their exact sum and largest magnitude.

    A query whose range covers the whole month (every month of a year-long
    range but the two at its ends) then reads two numbers instead of summing
    some 720 hours, and knows without a pass over them whether int64 sums stay exact.
    """

    hours: np.ndarray  # int64, one per hour of the month
    total: int  # exact (a Python int, beyond int64 if need be)
    peak: int  # the largest |hour|


NO_MONTHS: Mapping[int, Month | None] = MappingProxyType({})  # of a series not kept


def peak_of(values: np.ndarray) -> int:
    """The largest magnitude in a non-empty array: what decides whether an int64 sum of
    ``n`` of them is exact (``peak * n < 2**63``)."""
    return max(-int(values.min()), int(values.max()))


def month_of(hours: np.ndarray) -> Month:
    peak = peak_of(hours)
    fits = peak * len(hours) < 2**63  # else an int64 sum could wrap: Python ints
    return Month(hours, int(hours.sum(dtype=np.int64)) if fits else sum(hours.tolist()), peak)


class History:
    def __init__(self, max_bytes: int = DEFAULT_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        # series id -> month number -> the month's counts, or None: no document
        self._series: OrderedDict[str, dict[int, Month | None]] = OrderedDict()
        self._entries = 0  # (series, month) pairs kept
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return self._entries

    def months(self, sid: str) -> Mapping[int, Month | None]:
        """Every month kept of a series (read only), marking the series used.

        Not counted in ``hits``/``misses``: the caller knows which months it wanted
        (``count``)."""
        kept = self._series.get(sid)
        if kept is None:
            return NO_MONTHS
        self._series.move_to_end(sid)
        return kept

    def count(self, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses

    def put(self, key: tuple[str, int], hours: np.ndarray | None) -> Month | None:
        """Keep a month read from the store (None: no document); answers what is kept."""
        self.drop(key)
        sid, mno = key
        month = None if hours is None else month_of(hours)
        kept = self._series.get(sid)
        if kept is None:
            kept = self._series[sid] = {}
        else:
            self._series.move_to_end(sid)
        kept[mno] = month
        self._entries += 1
        self.bytes += _size(month)
        while self.bytes > self.max_bytes and self._series:
            _, old = self._series.popitem(last=False)
            self._entries -= len(old)
            self.bytes -= sum(_size(m) for m in old.values())
        return month

    def drop(self, key: tuple[str, int]) -> None:
        sid, mno = key
        kept = self._series.get(sid)
        if kept is None or mno not in kept:
            return
        self.bytes -= _size(kept.pop(mno))
        self._entries -= 1
        if not kept:
            del self._series[sid]


def _size(month: Month | None) -> int:
    return ENTRY_OVERHEAD + (month.hours.nbytes + MONTH_OVERHEAD if month is not None else 0)
