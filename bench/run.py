"""``tally bench``: start a service, measure it, check every total, print the table.

Every figure is taken against the service this command starts (its own ports,
its own store in a temporary folder), and beside a baseline measured in the
same run: the in-process ceiling for ingest, ``/healthz`` for queries.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tally.bench.ceiling import ceiling
from tally.bench.ingest import Background, Stream, run_streams
from tally.bench.latency import Latency, sample
from tally.bench.matrix import WINDOWS, CellResult, cells, drain, measure_cell
from tally.bench.spawn import Spawned
from tally.bench.workload import TENANT, Workload, frame

TARGETS = {
    "columnar_mps": 5.0, "columnar_hour_mps": 15.0, "rows_mps": 1.5,
    "query_p50_ms": 1.0, "query_p99_ms": 5.0, "breakdown_p99_ms": 50.0,
    "bytes_per_series_month": 2048, "lag_over_interval_s": 1.0,
    # the memory target is for series-months of 30 days of hours
    "series_month_hours": 720,
}


@dataclass
class BenchConfig:
    store: str | None = None  # default: SQLite in a temporary folder
    shards: int = 2 * (os.cpu_count() or 1)
    # the matrix: active series x how far back timestamps reach (bench/matrix.py)
    series: str = "1000,100000"
    windows: str = "hour,24h,30d"
    million: bool = False  # also a 1,000,000-series row of cells
    # Each phase of a cell lasts longer than a checkpoint interval, so its figure includes
    # the checkpoints ("every guarantee on") and not only the warm-up; a row phase also
    # runs long enough (several seconds) that its connections reading each series for
    # the first time, once per connection as for any long-lived producer, is a small part.
    rows: int = 10_000_000
    rows_per_frame: int = 5_000
    columnar: int = 30_000_000
    columnar_per_frame: int = 100_000
    distinct_frames: int = 32  # distinct frames per phase, cycled (the slots they reach)
    connections: int = 2
    queries: int = 300
    breakdown_series: int = 1000  # the breakdown's group count (its own metric)
    # the contract's case: 100,000 series with 30 days of hours each (fewer early in a
    # month: the report then gives no verdict from a figure under the target)
    memory_series: int = 100_000
    memory_hours: int = 720
    checkpoint_interval: float = 2.0
    # tally serve --gateways-per-node: the row and columnar phases' connections are
    # spread over them by the kernel (use several connections per gateway)
    gateways_per_node: int = 1
    # tally serve --http-gateways-per-node: queries get a gateway process of their own,
    # so that the query phase measures queries, not waiting behind frame decoding
    http_gateways_per_node: int = 1
    # tally serve --cpu-affinity: "off", as tally serve runs by default, the kernel placing
    # every process; "gateways" gives the TCP gateway a core of its own (actors/affinity.py),
    # which leaves the shards one core where they are the bound (docs/performance.md)
    cpu_affinity: str = "off"
    peer: str | None = None  # "clickhouse": the same batches into chDB, side by side

    def problems(self) -> list[str]:
        """What is wrong with these settings, each naming its flag (none: run)."""
        out = []
        for name in ("shards", "rows_per_frame", "columnar_per_frame", "distinct_frames",
                     "connections", "breakdown_series", "memory_hours"):
            if getattr(self, name) < 1:
                out.append(f"--{name.replace('_', '-')} must be at least 1, "
                           f"not {getattr(self, name)}")
        for name in ("rows", "columnar", "queries", "memory_series", "gateways_per_node",
                     "http_gateways_per_node"):
            if getattr(self, name) < 0:
                out.append(f"--{name.replace('_', '-')} must not be negative, "
                           f"not {getattr(self, name)}")
        return out


@dataclass
class Results:
    machine: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    ceiling_mps: float = 0.0
    cells: list[CellResult] = field(default_factory=list)
    healthz: Latency | None = None
    query: Latency | None = None
    breakdown: Latency | None = None
    query_cell: str = ""
    background_mps: float = 0.0  # what the hardest cell ingested meanwhile
    bytes_per_series_month: float = 0.0  # private memory of the shards
    memory_hours: int = 0  # hours each series-month held (this month has had that many)
    resident_bytes_per_series_month: float = 0.0
    exact: bool = False
    errors: list[str] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    peer_queries: dict[str, Any] = field(default_factory=dict)


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": model}


def scrape(url: str) -> dict[tuple[str, str], float]:
    """(metric name, shard) -> value for the shard gauges of /metrics."""
    text = httpx.get(url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "shard" in s.labels:
                out[(s.name, s.labels["shard"])] = s.value
    return out


def summed(metrics: dict[tuple[str, str], float], name: str) -> float:
    return sum(v for (n, _), v in metrics.items() if n == name)


def streams(port: int, chunks: list, total: int, per_frame: int, connections: int,
            **kw: Any) -> list[Stream]:
    frames = max(1, total // per_frame)
    split = [frames // connections + (1 if k < frames % connections else 0)
             for k in range(connections)]
    return [Stream(port, chunks, n, **kw) for n in split if n]


def run(cfg: BenchConfig, say: Any = print) -> Results:
    res = Results(machine=machine(), config=asdict(cfg))
    with tempfile.TemporaryDirectory(prefix="tally-bench-") as tmp:
        workdir = Path(tmp)
        store = cfg.store or f"sqlite:///{workdir / 'bench.db'}"
        service = Spawned(workdir, store, "--checkpoint-interval", str(cfg.checkpoint_interval),
                          "--gateways-per-node", str(cfg.gateways_per_node),
                          "--http-gateways-per-node", str(cfg.http_gateways_per_node),
                          "--cpu-affinity", cfg.cpu_affinity,
                          shards=cfg.shards)
        say(f"starting tally serve ({cfg.shards} shards, {cfg.gateways_per_node} TCP and "
            f"{cfg.http_gateways_per_node} HTTP gateway process(es), store "
            f"{store.split('?')[0]})" if cfg.http_gateways_per_node else
            f"starting tally serve ({cfg.shards} shards, {cfg.gateways_per_node} gateway "
            f"process(es), store {store.split('?')[0]})")
        service.start()
        try:
            _measure(cfg, service, res, say)
        finally:
            code = service.stop()
            if code != 0:
                res.errors.append(f"tally serve exited {code}")
    return res


def _measure(cfg: BenchConfig, service: Spawned, res: Results, say: Any) -> None:
    work = Workload(1000, 24)
    say("in-process ceiling (decode + dict update, one core)")
    res.ceiling_mps = ceiling([frame(c, 1) for c in work.row_chunks(cfg.rows_per_frame)]) / 1e6

    # First, from fresh shard processes: later phases leave garbage that a trim after a
    # checkpoint may give back during this one, which would flatter the figure.
    hours = Workload(1).month_hours(cfg.memory_hours)
    res.memory_hours = hours
    if cfg.memory_series:
        say(f"memory: {cfg.memory_series:,} series, {hours} hours each of this month")
        _memory(cfg, service, res)
    else:
        say("memory: skipped (--memory-series 0)")

    peer = None
    if cfg.peer:
        from tally.bench.peer import ClickHousePeer

        peer = ClickHousePeer(Path(service.workdir) / "clickhouse")
    sizes = [int(n) for n in cfg.series.split(",")] + ([1_000_000] if cfg.million else [])
    for cell in cells(sizes, cfg.windows.split(",")):
        say(f"cell {cell.name}: {cfg.columnar:,} increments in columnar frames"
            + (f", {cfg.rows:,} in row frames" if cfg.rows else "")
            + (" (and the same batches into ClickHouse)" if peer else ""))
        got = measure_cell(cell, service.url, service.tcp_port, cfg, peer)
        res.cells.append(got)
        for phase in (got.columnar, got.rows):
            res.errors += phase.errors
        if not got.exact:
            res.errors.append(f"cell {cell.name}: queried {got.queried_total:,}, acknowledged "
                              f"{got.acked_total:,}")
    if cfg.queries:
        _queries(cfg, service, res, say, peer)
    else:
        say("queries: skipped (--queries 0)")
    res.exact = all(c.exact for c in res.cells) and res.totals.get("queried") == res.totals.get(
        "sent_and_acked")


def _queries(cfg: BenchConfig, service: Spawned, res: Results, say: Any, peer: Any) -> None:
    """Query latency while the hardest cell (most series, widest window) ingests."""
    hardest = max(cells([int(n) for n in cfg.series.split(",")], cfg.windows.split(",")),
                  key=lambda c: (c.series, WINDOWS[c.window]))
    res.query_cell = hardest.name
    work = Workload(hardest.series, WINDOWS[hardest.window], seed=5, metric=hardest.metric)
    say(f"queries while the {hardest.name} cell ingests as fast as it can")
    # the breakdown's own metric: 1,000 series over the last day, written first
    groups = Workload(cfg.breakdown_series, 24, seed=9, metric="bench.breakdown")
    chunks = groups.columnar_chunks(100_000, distinct=4, table=True)
    setup = Stream(service.tcp_port, chunks, len(chunks), table=groups.series)
    run_streams([setup])
    feeder = Background(Stream(service.tcp_port, work.columnar_chunks(
        cfg.columnar_per_frame, distinct=8, table=True), 10**9, table=work.series))
    feeder.start()
    started = time.perf_counter()
    end = time.strftime("%Y-%m-%d", time.gmtime(work.now))
    start = time.strftime("%Y-%m-%d", time.gmtime(work.now - 30 * 86400))
    one = work.series[1][2]
    first_day, last_day = groups.days
    with httpx.Client(base_url=service.url, timeout=30) as client:
        res.healthz, _ = sample(client, "/healthz", {}, cfg.queries)
        res.query, _ = sample(client, "/v1/series", {
            "tenant": TENANT, "metric": hardest.metric, "from": start, "to": end,
            "tz": "Europe/London", "where": [f"{k}:{v}" for k, v in one.items()]}, cfg.queries)
        res.breakdown, answer = sample(client, "/v1/breakdown", {
            "tenant": TENANT, "metric": "bench.breakdown", "by": "agent", "from": first_day,
            "to": last_day, "limit": cfg.breakdown_series}, max(20, cfg.queries // 5))
        background = feeder.finish()
        res.background_mps = background.acked_increments / (time.perf_counter() - started) / 1e6
        if len(answer["groups"]) != cfg.breakdown_series:
            res.errors.append(f"breakdown has {len(answer['groups'])} groups, not "
                              f"{cfg.breakdown_series}")
        res.errors += [f"{e.get('code')}: {e.get('message')}" for e in background.errors[:3]]
        sent = setup.acked_total + background.acked_total
        got = 0
        for metric, w in (("bench.breakdown", groups), (hardest.metric, work)):
            r = client.get("/v1/series", params={"tenant": TENANT, "metric": metric,
                                                 "from": w.days[0], "to": w.days[1]})
            got += r.json()["total"]
        # (the hardest cell's metric also holds what its cell sent before)
        got -= next(c.acked_total for c in res.cells if c.series == hardest.series
                    and c.window == hardest.window)
        res.totals = {"sent_and_acked": sent, "queried": got}
    if peer is not None:
        from tally.bench.peer_run import peer_queries

        res.peer_queries = peer_queries(peer, work, groups, cfg)
        if not res.peer_queries["exact"]:
            res.errors.append("ClickHouse's answers differ from the oracle's")


def _memory(cfg: BenchConfig, service: Spawned, res: Results) -> None:
    """Growth of the fresh shards' memory per series-month over ``memory_series`` new
    series: by default the contract's 100,000. (What a shard allocates once, on its
    first series, is spread over them all: over 20,000 it was a visible share.)"""
    work = Workload(cfg.memory_series, seed=7, metric="bench.memory")
    before = scrape(service.url)
    chunks = work.hourly_chunks(cfg.memory_hours, per_frame=100_000, table=True)
    stream = Stream(service.tcp_port, chunks, len(chunks), table=work.series)
    stream.run()
    res.errors += [f"memory phase: {e.get('message')}" for e in stream.errors[:1]]
    time.sleep(cfg.checkpoint_interval * 2 + 1)  # let checkpoints take the dirty deltas
    drain(service.url, timeout=300)  # (and any still writing: its deltas are memory until done)
    # (and folding: a fold holds its runs' sums until it ends)
    drain(service.url, timeout=300, gauge="tally_unfolded_slots")
    after = scrape(service.url)
    added = summed(after, "tally_live_series_months") - summed(before, "tally_live_series_months")

    def per_series_month(gauge: str) -> float:
        return (summed(after, gauge) - summed(before, gauge)) / added if added else float("nan")

    # Private memory is the shards' own; resident adds the object-store and library pages
    # every Ray worker maps, which do not grow with series (both are reported).
    res.bytes_per_series_month = per_series_month("tally_shard_private_bytes")
    res.resident_bytes_per_series_month = per_series_month("tally_shard_resident_bytes")


def to_json(res: Results) -> str:
    return json.dumps(asdict(res), indent=2)
