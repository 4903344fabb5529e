"""Which shard owns which series, and a batch cut into per-shard parts."""

from __future__ import annotations

from itertools import repeat

import numpy as np

from tally.wire.batches import Batch
from tally.wire.registry import SeriesRegistry
from tally.wire.series import shard_of

_CACHE_LIMIT = 1_000_000


class Router:
    def __init__(self, shards: int) -> None:
        if shards < 1:
            raise ValueError(f"shards must be at least 1, not {shards}")
        self.shards = shards
        self._cache: dict[str, int] = {}
        self.registry = SeriesRegistry(shards)  # a batch's series by number (wire/registry.py)

    def shard(self, sid: str) -> int:
        s = self._cache.get(sid)
        if s is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            s = self._cache[sid] = shard_of(sid, self.shards)
        return s

    def owners(self, sids: list[str]) -> np.ndarray:
        """The shard of each sid; the cache is looked up in C (no Python frame per sid)."""
        found = list(map(self._cache.get, sids, repeat(-1)))
        owner = np.array(found, np.int32) if found else np.empty(0, np.int32)
        for k in np.flatnonzero(owner < 0).tolist():
            owner[k] = self.shard(sids[k])
        return owner

    def split(self, batch: Batch) -> dict[int, Batch]:
        if not len(batch):
            return {}
        registry = self.registry
        if batch.gn is not None and batch.gn_epoch == registry.epoch:
            owner = registry.owner[batch.gn]
        else:
            owner = self.owners(batch.sids)
        first = int(owner[0])
        if (owner == first).all():
            return {first: batch}
        return batch.partition(owner)
