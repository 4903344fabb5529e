"""The bench's cells: active series x how far back the timestamps reach, rows and columnar.

A figure for 1,000 series in the last day says nothing about 100,000 series
whose late events scatter over a month, and real workloads are the second
kind. So ``tally bench`` measures every cell of the matrix against one
service, each cell on a metric of its own, and checks each cell's total
exactly: what the producers had acknowledged is what a query finds.

Within a cell the columnar phase defines the series once per connection
(the ``series`` op) and sends frames of ``columnar_per_frame`` increments
indexing it; the row phase sends msgpack row frames as any client would. A
producer resends what is refused ``overloaded``, as the client library does,
and the refusals are counted: backpressure is part of the figure. After each
phase the bench waits for the shards to hold nothing unwritten, and that wait
(from the last acknowledgement) bounds the checkpoint lag of the cell.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tally.bench.ingest import Stream, run_streams
from tally.bench.workload import TENANT, Chunk, Workload

WINDOWS = {"hour": 0, "24h": 24, "30d": 720}  # the timestamps' reach, in hours (0: this hour)


@dataclass(frozen=True)
class Cell:
    series: int
    window: str  # a key of WINDOWS

    @property
    def name(self) -> str:
        return f"{self.series:,} series × {self.window}"

    @property
    def metric(self) -> str:
        return f"bench.s{self.series}.{self.window}"


@dataclass
class Phase:
    """One ingest phase of a cell (rows or columnar)."""

    mps: float = 0.0  # acknowledged increments per second, first frame to last ack
    increments: int = 0
    seconds: float = 0.0
    connect_s: float = 0.0  # before the phase, untimed: connecting and defining the series
    refused: int = 0  # batches answered `overloaded` and sent again
    drain_s: float = 0.0  # last ack -> no shard holds an unwritten slot
    fold_s: float = 0.0  # then -> every checkpoint run folded (actors/folds.py)
    slow_checkpoints: int = 0  # tally_checkpoint_slow_total during the phase
    errors: list[str] = field(default_factory=list)


@dataclass
class CellResult:
    series: int
    window: str
    columnar: Phase = field(default_factory=Phase)
    rows: Phase = field(default_factory=Phase)
    acked_total: int = 0
    queried_total: int = 0
    exact: bool = False
    peer: dict[str, Any] = field(default_factory=dict)


def split_frames(frames: int, connections: int) -> list[int]:
    return [frames // connections + (1 if k < frames % connections else 0)
            for k in range(connections)]


def _scrape(url: str) -> dict[str, float]:
    """Shard gauges and counters of /metrics summed over shards, by sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def drain(url: str, timeout: float = 120.0, gauge: str = "tally_dirty_slots") -> float:
    """Seconds until no shard holds an unwritten slot (``timeout`` if never); with
    ``gauge="tally_unfolded_slots"``, until every checkpoint run is folded."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if not _scrape(url).get(gauge, 0):
            return time.perf_counter() - started
        time.sleep(0.05)
    return timeout


def ingest(url: str, port: int, chunks: list[Chunk], increments: int, per_frame: int,
           connections: int, table: list | None) -> tuple[Phase, int]:
    """One phase; the phase and the acknowledged sum of values."""
    frames = max(1, increments // per_frame)
    streams = [Stream(port, chunks, n, table=table)
               for n in split_frames(frames, connections) if n]
    slow_before = _scrape(url).get("tally_checkpoint_slow_total", 0)
    seconds = run_streams(streams)
    phase = Phase(seconds=seconds, connect_s=max(s.connect_seconds for s in streams))
    phase.increments = sum(s.acked_increments for s in streams)
    phase.mps = phase.increments / seconds / 1e6
    phase.refused = sum(s.refused for s in streams)
    phase.errors = [f"{e.get('code')}: {e.get('message')}" for s in streams for e in s.errors[:3]]
    phase.drain_s = drain(url)
    # The shards fold once idle; a phase starts with none left over from the one before.
    phase.fold_s = drain(url, timeout=600, gauge="tally_unfolded_slots")
    phase.slow_checkpoints = int(_scrape(url).get("tally_checkpoint_slow_total", 0) - slow_before)
    return phase, sum(s.acked_total for s in streams)


def measure_cell(cell: Cell, url: str, port: int, cfg: Any, peer: Any = None) -> CellResult:
    """Both phases of a cell, its exact total, and the peer's figures for the same batches."""
    work = Workload(cell.series, WINDOWS[cell.window], seed=cell.series + len(cell.window),
                    metric=cell.metric)
    res = CellResult(cell.series, cell.window)
    # Untimed: the cell's series become active first (a new series costs a store read and
    # its installation once, which says nothing about a stream of active series).
    warm = work.warmup_chunks(cfg.columnar_per_frame, table=True)
    warmed = Stream(port, warm, len(warm), table=work.series)
    run_streams([warmed])
    res.acked_total += warmed.acked_total
    if cfg.columnar:
        col_chunks = work.columnar_chunks(cfg.columnar_per_frame,
                                          distinct=cfg.distinct_frames, table=True)
        res.columnar, total = ingest(url, port, col_chunks, cfg.columnar,
                                     cfg.columnar_per_frame, cfg.connections, work.series)
        res.acked_total += total
    if cfg.rows:
        row_chunks = work.row_chunks(cfg.rows_per_frame, distinct=cfg.distinct_frames)
        res.rows, total = ingest(url, port, row_chunks, cfg.rows, cfg.rows_per_frame,
                                 cfg.connections, None)
        res.acked_total += total
    first, last = work.days
    r = httpx.get(url + "/v1/series", params={"tenant": TENANT, "metric": cell.metric,
                                              "from": first, "to": last}, timeout=60)
    r.raise_for_status()
    res.queried_total = r.json()["total"]
    res.exact = res.queried_total == res.acked_total
    if peer is not None and cfg.columnar:
        from tally.bench.peer_run import peer_cell  # (chdb is an optional extra)

        res.peer = peer_cell(peer, work, warm, col_chunks, cfg, res.queried_total)
        if not res.peer["exact"]:
            res.exact = False
    return res


def cells(series: list[int], windows: list[str]) -> list[Cell]:
    return [Cell(n, w) for n in series for w in windows]
