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
from rich.console import Console
from rich.table import Table

from tally.bench.ceiling import ceiling
from tally.bench.ingest import Background, Stream, run_streams
from tally.bench.latency import Latency, sample
from tally.bench.spawn import Spawned
from tally.bench.workload import METRIC, TENANT, Workload, frame

TARGETS = {
    "columnar_mps": 5.0, "columnar_vs_ceiling": 2.0, "rows_mps": 1.5, "rows_vs_ceiling": 0.6,
    "query_p50_ms": 2.0, "query_p99_ms": 10.0, "breakdown_p99_ms": 50.0,
    "bytes_per_series_month": 2048,
}


@dataclass
class BenchConfig:
    store: str | None = None  # default: SQLite in a temporary folder
    shards: int = 2 * (os.cpu_count() or 1)
    series: int = 1000
    # Each ingest phase lasts a few seconds, longer than a checkpoint interval, so its
    # figure includes the checkpoints ("every guarantee on") and not only the warm-up.
    rows: int = 4_000_000
    rows_per_frame: int = 5_000
    columnar: int = 40_000_000
    columnar_per_frame: int = 200_000
    connections: int = 2
    queries: int = 300
    background_rate: int = 1_000_000  # increments/s ingested (columnar) while queries run
    memory_series: int = 100_000  # enough that fixed costs (SQLite page cache) do not count
    checkpoint_interval: float = 2.0
    # tally serve --gateways-per-node: the row and columnar phases' connections are
    # spread over them by the kernel (use several connections per gateway)
    gateways_per_node: int = 1
    # tally serve --http-gateways-per-node: queries get a gateway process of their own,
    # so that the query phase measures queries, not waiting behind frame decoding
    http_gateways_per_node: int = 1
    # tally serve --cpu-affinity: the TCP gateway keeps a core of its own, which is what a
    # dedicated node would run (actors/affinity.py); "off" measures the kernel's placement
    cpu_affinity: str = "gateways"


@dataclass
class Results:
    machine: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    ceiling_mps: float = 0.0
    rows_mps: float = 0.0
    columnar_mps: float = 0.0
    healthz: Latency | None = None
    query: Latency | None = None
    breakdown: Latency | None = None
    bytes_per_series_month: float = 0.0  # private memory of the shards
    resident_bytes_per_series_month: float = 0.0
    exact: bool = False
    errors: list[str] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)


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
    work = Workload(cfg.series)
    row_chunks = work.row_chunks(cfg.rows_per_frame)
    col_chunks = work.columnar_chunks(cfg.columnar_per_frame)
    say("in-process ceiling (decode + dict update, one core)")
    res.ceiling_mps = ceiling([frame(c, 1) for c in row_chunks]) / 1e6
    sent_total = 0

    # First, from fresh shard processes: later phases leave garbage that a trim after a
    # checkpoint may give back during this one, which would flatter the figure.
    say(f"memory: {cfg.memory_series:,} series, 24 hours each")
    _memory(cfg, service, res)

    say(f"ingest: {cfg.rows:,} increments in row frames over {cfg.connections} connections")
    rows = streams(service.tcp_port, row_chunks, cfg.rows, cfg.rows_per_frame, cfg.connections)
    seconds = run_streams(rows)
    res.rows_mps = sum(s.acked_increments for s in rows) / seconds / 1e6
    sent_total += sum(s.acked_total for s in rows)

    say(f"ingest: {cfg.columnar:,} increments in columnar frames")
    cols = streams(service.tcp_port, col_chunks, cfg.columnar, cfg.columnar_per_frame,
                   cfg.connections)
    seconds = run_streams(cols)
    res.columnar_mps = sum(s.acked_increments for s in cols) / seconds / 1e6
    sent_total += sum(s.acked_total for s in cols)

    say(f"queries while ingesting {cfg.background_rate:,} increments/s")
    feeder = Background(Stream(service.tcp_port, work.columnar_chunks(50_000), 10**9,
                               rate=cfg.background_rate))
    feeder.start()
    first_day, last_day = work.days
    end = time.strftime("%Y-%m-%d", time.gmtime(work.now))
    start = time.strftime("%Y-%m-%d", time.gmtime(work.now - 30 * 86400))
    one = work.series[1][2]
    with httpx.Client(base_url=service.url, timeout=30) as client:
        res.healthz, _ = sample(client, "/healthz", {}, cfg.queries)
        res.query, _ = sample(client, "/v1/series", {
            "tenant": TENANT, "metric": METRIC, "from": start, "to": end,
            "where": [f"{k}:{v}" for k, v in one.items()]}, cfg.queries)
        res.breakdown, answer = sample(client, "/v1/breakdown", {
            "tenant": TENANT, "metric": METRIC, "by": "agent", "from": first_day, "to": last_day,
            "limit": 1000}, max(20, cfg.queries // 5))
        if len(answer["groups"]) != cfg.series:
            res.errors.append(f"breakdown has {len(answer['groups'])} groups, not {cfg.series}")
        background = feeder.finish()
        sent_total += background.acked_total
        for s in [*rows, *cols, background]:
            res.errors += [f"{e.get('code')}: {e.get('message')}" for e in s.errors[:3]]

        r = client.get("/v1/series", params={"tenant": TENANT, "metric": METRIC,
                                             "from": first_day, "to": last_day})
        got = r.json()["total"]
        res.totals = {"sent_and_acked": sent_total, "queried": got}
        res.exact = got == sent_total



def _memory(cfg: BenchConfig, service: Spawned, res: Results) -> None:
    work = Workload(cfg.memory_series, seed=7, metric="bench.memory")
    before = scrape(service.url)
    stream = Stream(service.tcp_port, work.hourly_chunks(24), 0)
    stream.frames = len(stream.chunks)
    stream.run()
    res.errors += [f"memory phase: {e.get('message')}" for e in stream.errors[:1]]
    time.sleep(cfg.checkpoint_interval * 2 + 1)  # let checkpoints take the dirty deltas
    after = scrape(service.url)
    for _ in range(20):  # (and any still writing: its deltas are memory until it is done)
        if not summed(after, "tally_dirty_slots"):
            break
        time.sleep(cfg.checkpoint_interval)
        after = scrape(service.url)
    added = summed(after, "tally_live_series_months") - summed(before, "tally_live_series_months")

    def per_series_month(gauge: str) -> float:
        return (summed(after, gauge) - summed(before, gauge)) / added if added else float("nan")

    # Private memory is the shards' own; resident adds the object-store and library pages
    # every Ray worker maps, which do not grow with series (both are reported).
    res.bytes_per_series_month = per_series_month("tally_shard_private_bytes")
    res.resident_bytes_per_series_month = per_series_month("tally_shard_resident_bytes")


def report(res: Results, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 130))
    t = TARGETS
    gateways = res.config.get("gateways_per_node", 1)
    http = res.config.get("http_gateways_per_node", 0)
    table = Table(title=f"tally bench — {res.machine['cpus']} CPUs, {res.machine['cpu']}"
                  + (f"; gateway processes: {gateways} TCP, {http} HTTP" if http else
                     f"; {gateways} gateway processes" if gateways > 1 else "")
                  + ("; TCP gateways on cores of their own"
                     if res.config.get("cpu_affinity") == "gateways" else ""))
    for col in ("measure", "tally", "baseline (same run)", "ratio", "target", "met"):
        table.add_column(col)

    def row(name: str, value: str, base: str, ratio: str, target: str, ok: bool) -> None:
        table.add_row(name, value, base, ratio, target, "yes" if ok else "[red]no[/red]")

    c = res.ceiling_mps
    row(f"ingest, columnar frames of {res.config.get('columnar_per_frame', 0):,} (M incr/s)",
        f"{res.columnar_mps:.2f}",
        f"ceiling {c:.2f}", f"{res.columnar_mps / c:.2f}x",
        f"≥ {t['columnar_mps']} and ≥ {t['columnar_vs_ceiling']}x",
        res.columnar_mps >= t["columnar_mps"] and res.columnar_mps / c >= t["columnar_vs_ceiling"])
    row(f"ingest, row frames of {res.config.get('rows_per_frame', 0):,} (M incr/s)",
        f"{res.rows_mps:.2f}", f"ceiling {c:.2f}",
        f"{res.rows_mps / c:.2f}x", f"≥ {t['rows_mps']} and ≥ {t['rows_vs_ceiling']}x",
        res.rows_mps >= t["rows_mps"] and res.rows_mps / c >= t["rows_vs_ceiling"])
    h, q, b = res.healthz, res.query, res.breakdown
    assert h and q and b
    row(f"query: 1 series, 31 days by day, while ingesting "
        f"{res.config['background_rate'] / 1e6:g} M/s (ms p50 / p99)",
        f"{q.p50_ms:.2f} / {q.p99_ms:.2f}", f"/healthz {h.p50_ms:.2f} / {h.p99_ms:.2f}",
        f"{q.p50_ms / h.p50_ms:.1f}x", f"≤ {t['query_p50_ms']} / ≤ {t['query_p99_ms']}",
        q.p50_ms <= t["query_p50_ms"] and q.p99_ms <= t["query_p99_ms"])
    row(f"breakdown over {res.config['series']:,} series (ms p50 / p99)",
        f"{b.p50_ms:.2f} / {b.p99_ms:.2f}", f"/healthz {h.p50_ms:.2f} / {h.p99_ms:.2f}",
        f"{b.p99_ms / h.p99_ms:.1f}x", f"p99 ≤ {t['breakdown_p99_ms']}",
        b.p99_ms <= t["breakdown_p99_ms"])
    row("memory per live series-month (bytes, private)", f"{res.bytes_per_series_month:,.0f}",
        f"resident {res.resident_bytes_per_series_month:,.0f}", "",
        f"≤ {t['bytes_per_series_month']}",
        res.bytes_per_series_month <= t["bytes_per_series_month"])
    row("totals exact", f"{res.totals.get('queried', 0):,}",
        f"sent {res.totals.get('sent_and_acked', 0):,}", "", "equal", res.exact)
    console.print(table)
    for e in res.errors:
        console.print(f"[red]error:[/red] {e}")


def to_json(res: Results) -> str:
    return json.dumps(asdict(res), indent=2)
