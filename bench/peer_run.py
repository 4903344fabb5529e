"""The ClickHouse peer (bench/peer.py) given exactly what tally was given, cell by cell.

Each cell's warm-up and columnar batches go into ClickHouse in the same
batches, the same number of times, and its answers are checked against
tally's: the month's total per cell, the one-series days, the breakdown.
Insert rates are each table's own insert time (the bench's sending is not
counted for ClickHouse, which runs in this process).
"""

from __future__ import annotations

import time
from typing import Any

from tally.bench.workload import TENANT, Chunk, Workload


def _insert_all(peer: Any, work: Workload, chunks: list[Chunk]) -> None:
    for c in chunks:
        peer.insert(work.series, c.i, c.ts, c.v)


def peer_cell(peer: Any, work: Workload, warm: list[Chunk], col_chunks: list[Chunk],
              cfg: Any, tally_total: int) -> dict[str, Any]:
    """Insert the cell's batches; rates and whether ClickHouse's total equals tally's."""
    peer.reset()
    _insert_all(peer, work, warm)
    before, series_before = dict(peer.insert_seconds), peer.series_seconds
    frames = max(1, cfg.columnar // cfg.columnar_per_frame)
    _insert_all(peer, work, [col_chunks[k % len(col_chunks)] for k in range(frames)])
    n = frames * cfg.columnar_per_frame
    # ClickHouse's best shot: its engine's time alone, without the peer's own series
    # resolution (a dict lookup per series entry, which a ClickHouse user's client does)
    resolving = peer.series_seconds - series_before
    raw = peer.insert_seconds["raw"] - before.get("raw", 0.0) - resolving
    hourly = peer.insert_seconds["hourly"] - before.get("hourly", 0.0) - resolving
    first, last = work.days
    # (the row phase went to tally only: ClickHouse's total is the columnar part of it)
    row_part = tally_total - sum(c.total for c in warm) - sum(
        col_chunks[k % len(col_chunks)].total for k in range(frames))
    got = sum(peer.breakdown(TENANT, work.series[0][1], "channel", first, last).values())
    peer.reset()  # (dropped now: its background merges must not run into tally's next cell)
    return {"insert_mps": n / hourly / 1e6 if hourly else 0.0,
            "raw_insert_mps": n / raw / 1e6 if raw else 0.0,
            "exact": got + row_part == tally_total}


def peer_queries(peer: Any, work: Workload, groups: Workload, cfg: Any) -> dict[str, Any]:
    """The query phase's questions of ClickHouse, holding the hardest cell's batches and
    the breakdown's: p50/p99 each, every answer checked against the numpy oracle."""
    from tally.bench.peer import Oracle, latency

    peer.reset()
    oracle = Oracle()
    for w in (work, groups):
        for c in w.warmup_chunks(100_000) + w.columnar_chunks(100_000, distinct=4):
            peer.insert(w.series, c.i, c.ts, c.v)
            oracle.insert(w.series, c.i, c.ts, c.v)
    tags = work.series[1][2]
    end = time.strftime("%Y-%m-%d", time.gmtime(work.now))
    start = time.strftime("%Y-%m-%d", time.gmtime(work.now - 30 * 86400))
    metric, by_metric = work.series[0][1], groups.series[0][1]

    def series() -> Any:
        return peer.series_by_day(TENANT, metric, tags, start, end, "Europe/London")

    def breakdown() -> Any:
        return peer.breakdown(TENANT, by_metric, "agent", *groups.days)

    exact = (series() == oracle.series_by_day(TENANT, metric, tags, start, end,
                                              "Europe/London")
             and breakdown() == oracle.breakdown(TENANT, by_metric, "agent", *groups.days))
    return {"series": latency(series, cfg.queries),
            "breakdown": latency(breakdown, max(20, cfg.queries // 5)), "exact": exact}
