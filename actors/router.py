"""Which shard owns which series, and a batch cut into per-shard parts."""

from __future__ import annotations

import numpy as np

from wire.batches import Batch
from wire.series import shard_of

_CACHE_LIMIT = 1_000_000


class Router:
    def __init__(self, shards: int) -> None:
        if shards < 1:
            raise ValueError(f"shards must be at least 1, not {shards}")
        self.shards = shards
        self._cache: dict[str, int] = {}

    def shard(self, sid: str) -> int:
        s = self._cache.get(sid)
        if s is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            s = self._cache[sid] = shard_of(sid, self.shards)
        return s

    def split(self, batch: Batch) -> dict[int, Batch]:
        if not len(batch):
            return {}
        owner = np.fromiter((self.shard(s) for s in batch.sids), np.int32, len(batch.sids))
        per_aggregate = owner[batch.series]
        first = int(per_aggregate[0])
        if (per_aggregate == first).all():
            return {first: batch}
        return {int(s): batch.select(per_aggregate == s) for s in np.unique(per_aggregate)}
