"""A shard's operational metrics, in its own Prometheus registry.

Each shard owns a ``CollectorRegistry`` rather than the process-wide default:
tests build many shards in one process, and a Ray worker may host a restarted
shard whose old metrics must not linger. The gateway scrapes the rendered
text of every shard and merges it (api/metrics.py).

Values that already live in ShardState (dirty slots, live series) are read at
scrape time instead of being mirrored on every batch, so the ingest path only
pays for one counter increment per batch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tally.actors.folds import Folds
from tally.actors.shard_state import ShardState

# From a few slots written to a local SQLite up to a large checkpoint to a slow
# MongoDB, just short of when the store is declared down.
CHECKPOINT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
# How long a checkpoint's oldest increment waited: about the interval when all is
# well, so fine around the default interval; coarse beyond, for store outages.
WAIT_BUCKETS = (0.25, 0.5, 1.0, 2.0, 2.5, 3.0, 4.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class CheckpointLag:
    """Age of the oldest increment applied but not yet durable.

    ShardState knows which deltas are dirty or in flight but has no clock (it
    is free of I/O), so the times live here. Two marks are enough because a
    shard has at most one checkpoint in flight: ``dirty_since`` is when the
    first increment after the last hand-over was applied, ``inflight_since``
    is the ``dirty_since`` the in-flight checkpoint took with it. A failed
    write keeps its mark, so the lag keeps growing while the store is down.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._dirty_since: float | None = None
        self._inflight_since: float | None = None
        self._inflight_ck: int | None = None

    def applied(self) -> None:
        """Something not yet durable was applied (an increment, or an undo of one)."""
        if self._dirty_since is None:
            self._dirty_since = self._clock()

    def clean(self) -> None:
        """The state had nothing to checkpoint: an applied batch may since have been undone."""
        self._dirty_since = None
        self._inflight_since = None
        self._inflight_ck = None

    def began(self, ck: int) -> None:
        """Checkpoint ``ck`` is being written; a retry of the same one moves nothing."""
        if ck != self._inflight_ck:
            self._inflight_ck = ck
            self._inflight_since = self._dirty_since
            self._dirty_since = None

    def durable(self, ck: int) -> float:
        """Checkpoint ``ck`` is in the store; answers how long its oldest increment waited."""
        waited = 0.0
        if ck == self._inflight_ck:
            if self._inflight_since is not None:
                waited = self._clock() - self._inflight_since
            self._inflight_since = None
            self._inflight_ck = None
        return waited

    def seconds(self) -> float:
        marks = [m for m in (self._inflight_since, self._dirty_since) if m is not None]
        return self._clock() - min(marks) if marks else 0.0


def state_gauges(
    registry: CollectorRegistry, shard: int, state: Callable[[], ShardState]
) -> None:
    """Gauges read from a ShardState at scrape time; ``state`` is looked up per scrape."""
    label = str(shard)
    Gauge(
        "tally_dirty_slots",
        "(series, hour) slots applied but not yet durable (dirty or in flight); between "
        "checkpoints a slot hit by several batches may count once per batch",
        ["shard"],
        registry=registry,
    ).labels(shard=label).set_function(lambda: state().dirty_slots)
    Gauge(
        "tally_live_series",
        "Series held in shard memory (evicted once their months are checkpointed and past)",
        ["shard"],
        registry=registry,
    ).labels(shard=label).set_function(lambda: len(state().series))
    Gauge(
        "tally_live_series_months",
        "(series, UTC month) pairs held in shard memory, each with its hourly counts",
        ["shard"],
        registry=registry,
    ).labels(shard=label).set_function(lambda: state().series_months)


def resident_bytes() -> float:
    """This process's resident memory (Linux /proc); NaN where that is not available."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return float("nan")


def private_bytes() -> float:
    """This process's private resident memory (RssAnon in /proc/self/status): its own heap,
    without the shared object-store and library pages every Ray worker maps; NaN elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass  # not Linux: the gauge says NaN
    return float("nan")


def render(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


class ShardMetrics:
    """Everything a shard actor exposes on /metrics, labelled with its shard number."""

    def __init__(
        self,
        shard: int,
        state: Callable[[], ShardState],
        folds: Callable[[], Folds | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.lag = CheckpointLag(clock)
        label = str(shard)
        reg = self.registry
        self.checkpoints = Counter(
            "tally_checkpoints_total", "Checkpoints written to the store", ["shard"],
            registry=reg,
        ).labels(shard=label)
        self.checkpoint_seconds = Histogram(
            "tally_checkpoint_duration_seconds",
            "Time to write one checkpoint to the store (successful writes)",
            ["shard"],
            buckets=CHECKPOINT_BUCKETS,
            registry=reg,
        ).labels(shard=label)
        self.increments = Counter(
            "tally_shard_increments_total",
            "Increments applied on this shard (a batch undone later still counts)",
            ["shard"],
            registry=reg,
        ).labels(shard=label)
        self.store_errors = Counter(
            "tally_store_errors_total",
            "Failed store reads and checkpoint writes",
            ["shard"],
            registry=reg,
        ).labels(shard=label)
        self.failures = Counter(
            "tally_checkpoint_failures_total",
            "Checkpoint writes that failed (the state is kept and written at the next interval)",
            ["shard"],
            registry=reg,
        ).labels(shard=label)
        self.slow = Counter(
            "tally_checkpoint_slow_total",
            "Checkpoints whose oldest increment waited longer than the interval + 1 s, or whose "
            "write took longer than the interval (each is also logged, throttled)",
            ["shard"],
            registry=reg,
        ).labels(shard=label)
        self.wait_seconds = Histogram(
            "tally_checkpoint_wait_seconds",
            "How long each checkpoint's oldest increment waited, from applied to durable",
            ["shard"],
            buckets=WAIT_BUCKETS,
            registry=reg,
        ).labels(shard=label)
        self.slots = Counter(
            "tally_checkpoint_slots_total",
            "(series, hour) slots written by checkpoints",
            ["shard"],
            registry=reg,
        ).labels(shard=label)
        self.documents = Counter(
            "tally_checkpoint_documents_total",
            "Month documents written by checkpoints (one per series and UTC month changed)",
            ["shard"],
            registry=reg,
        ).labels(shard=label)
        self.new_series = Counter(
            "tally_checkpoint_new_series_total",
            "Series added to the store's catalog by checkpoints",
            ["shard"],
            registry=reg,
        ).labels(shard=label)
        self.evicted = Counter(
            "tally_evicted_series_months_total",
            "(series, month) pairs dropped from shard memory once durable and past",
            ["shard"],
            registry=reg,
        ).labels(shard=label)
        self.trims = Counter(
            "tally_memory_trims_total",
            "Times the shard gave freed memory back to the system after a checkpoint",
            ["shard"],
            registry=reg,
        ).labels(shard=label)
        self.trim_seconds = Counter(
            "tally_memory_trim_seconds_total",
            "Time spent giving freed memory back (on the checkpoint writer thread)",
            ["shard"],
            registry=reg,
        ).labels(shard=label)
        Gauge(
            "tally_checkpoint_lag_seconds",
            "Age of the oldest increment applied but not yet durable (0: all durable)",
            ["shard"],
            registry=reg,
        ).labels(shard=label).set_function(self.lag.seconds)
        Gauge(
            "tally_shard_resident_bytes",
            "Resident memory of the shard's process (one shard per Ray worker process)",
            ["shard"],
            registry=reg,
        ).labels(shard=label).set_function(resident_bytes)
        Gauge(
            "tally_shard_private_bytes",
            "Private resident memory of the shard's process (heap; no shared object-store or "
            "library pages)",
            ["shard"],
            registry=reg,
        ).labels(shard=label).set_function(private_bytes)
        state_gauges(reg, shard, state)
        Gauge(
            "tally_unfolded_slots",
            "Slots in checkpoint runs not yet folded into the store's slot rows (SQLite: "
            "durable either way; folded while the shard is idle or past its backlog)",
            ["shard"],
            registry=reg,
        ).labels(shard=label).set_function(lambda: getattr(folds(), "unfolded", 0))
        self.folded_slots = Counter(
            "tally_folded_slots_total",
            "Slots folded from checkpoint runs into slot rows",
            ["shard"],
            registry=reg,
        ).labels(shard=label)
        self.fold_seconds = Counter(
            "tally_fold_seconds_total",
            "Time spent folding checkpoint runs (on the checkpoint writer thread)",
            ["shard"],
            registry=reg,
        ).labels(shard=label)

    def applied(self, increments: int) -> None:
        if increments:
            self.increments.inc(increments)
            self.lag.applied()

    def checkpoint_written(
        self, ck: int, seconds: float, slots: int = 0, documents: int = 0, new_series: int = 0,
        evicted: int = 0,
    ) -> float:
        """Count a durable checkpoint; answers how long its oldest increment waited."""
        self.checkpoints.inc()
        self.checkpoint_seconds.observe(seconds)
        self.slots.inc(slots)
        self.documents.inc(documents)
        self.new_series.inc(new_series)
        self.evicted.inc(evicted)
        waited = self.lag.durable(ck)
        self.wait_seconds.observe(waited)
        return waited

    def folded(self, slots: int, seconds: float) -> None:
        self.folded_slots.inc(slots)
        self.fold_seconds.inc(seconds)

    def trimmed(self, seconds: float) -> None:
        self.trims.inc()
        self.trim_seconds.inc(seconds)

    def render(self) -> str:
        return render(self.registry)
