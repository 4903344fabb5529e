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
least recently used out first.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

MISSING = object()  # not kept: read the store
ENTRY_OVERHEAD = 120  # bytes of key, tuple and dict slot per entry, roughly
DEFAULT_BYTES = 64 * 1024 * 1024


class History:
    def __init__(self, max_bytes: int = DEFAULT_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        # (series id, month number) -> counts per hour of the month, or None: no document
        self._months: OrderedDict[tuple[str, int], np.ndarray | None] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._months)

    def get(self, key: tuple[str, int]) -> np.ndarray | None | object:
        """The month's hours, None for no document, or MISSING."""
        found = self._months.get(key, MISSING)
        if found is MISSING:
            self.misses += 1
        else:
            self.hits += 1
            self._months.move_to_end(key)
        return found

    def put(self, key: tuple[str, int], hours: np.ndarray | None) -> None:
        self.drop(key)
        self._months[key] = hours
        self.bytes += _size(hours)
        while self.bytes > self.max_bytes and self._months:
            _, old = self._months.popitem(last=False)
            self.bytes -= _size(old)

    def drop(self, key: tuple[str, int]) -> None:
        old = self._months.pop(key, MISSING)
        if old is not MISSING:
            self.bytes -= _size(old)  # type: ignore[arg-type]


def _size(hours: np.ndarray | None) -> int:
    return ENTRY_OVERHEAD + (hours.nbytes if hours is not None else 0)
