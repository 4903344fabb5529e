"""The in-process ceiling: what one Python process can do with the same row frames
and no service at all -- msgpack-decode each frame and add every increment into a
dict keyed by (series, hour). tally's figures are printed as ratios to it."""

from __future__ import annotations

import time

import msgpack


def ceiling(frames: list[bytes], min_seconds: float = 2.0) -> float:
    """Increments per second, over whole passes of ``frames`` for at least ``min_seconds``."""
    counts: dict[tuple, int] = {}
    done = 0
    started = time.perf_counter()
    while True:
        for f in frames:
            rows = msgpack.unpackb(f[4:], raw=False)["rows"]
            for tenant, metric, tags, ts, value in rows:
                key = (tenant, metric, tuple(sorted(tags.items())) if tags else (), ts // 3600)
                counts[key] = counts.get(key, 0) + value
            done += len(rows)
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return done / elapsed
