"""Series ids to a store's integer row ids, held compactly in a shard's process.

A SQLite checkpoint names each document's series by its ``series`` row id
(checkpoint/sqlite.py), so a shard's store keeps the ids it has seen committed.
As a dict, an entry cost about 130 bytes a series, on top of the 2 KB a live
series-month may take in all. Here it is three arrays: each id string's hash,
sorted, the row id, and a reference to the id string (which the shard holds
anyway), 24 bytes a series. A lookup is a binary search per id and a check that
the string is the one asked for, so two ids with the same hash are never taken
for each other (the second is not held, and is looked up in the store instead).
"""

from __future__ import annotations

import numpy as np


class RowIds:
    """sid -> row id, for the rows committed so far (row ids are never reused)."""

    __slots__ = ("_hashes", "_ids", "_sids")

    def __init__(self) -> None:
        self._hashes = np.empty(0, np.int64)
        self._ids = np.empty(0, np.int64)
        self._sids = np.empty(0, object)

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, sids: list[str]) -> np.ndarray:
        """The row id of each of ``sids``; -1 where it is not held."""
        out = np.full(len(sids), -1, np.int64)
        if not len(self._ids) or not sids:
            return out
        hashes = np.fromiter(map(hash, sids), np.int64, len(sids))
        at = np.minimum(np.searchsorted(self._hashes, hashes), len(self._hashes) - 1)
        hit = self._hashes[at] == hashes
        asked = np.empty(len(sids), object)
        asked[:] = sids
        hit[hit] = self._sids[at[hit]] == asked[hit]
        out[hit] = self._ids[at[hit]]
        return out

    def add(self, found: dict[str, int]) -> None:
        """Hold these ids (committed ones), but no second id string of a hash held."""
        if not found:
            return
        sids = list(found)
        hashes = np.fromiter(map(hash, sids), np.int64, len(sids))
        ids = np.fromiter(map(found.__getitem__, sids), np.int64, len(sids))
        new = np.empty(len(sids), object)
        new[:] = sids
        # one string per hash: already held or twice among the new, the rest stay out
        _, first = np.unique(hashes, return_index=True)
        keep = np.zeros(len(sids), np.bool_)
        keep[first] = True
        keep &= ~np.isin(hashes, self._hashes)
        hashes = np.concatenate((self._hashes, hashes[keep]))
        order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[order]
        self._ids = np.concatenate((self._ids, ids[keep]))[order]
        self._sids = np.concatenate((self._sids, new[keep]))[order]
