"""Each side of a cell alone, in one process: a gateway's work on frames, a shard's on its
parts, one checkpoint's write. No Ray, no sockets.

``tally bench`` measures the service end to end, where a change to one process is
blurred by the others sharing the cores. These take one side at a time with the
bench's own workload (``series`` active series, timestamps over the last ``hours``
hours, 0 for the current hour), so a change to it is measured without the rest::

    python -m tally.bench.inprocess gateway 100000 720       # columnar frames, a table
    python -m tally.bench.inprocess gateway-rows 100000 0    # 5,000-row frames
    python -m tally.bench.inprocess shard 100000 720         # 25,000-increment parts
    python -m tally.bench.inprocess checkpoint 100000 720    # one SQLite checkpoint
    python -m tally.bench.inprocess backfill 100000 8760     # a year's import, from cold
    python -m tally.bench.inprocess memory 25000 720         # bytes per live series-month

Figures are CPU-bound rates of one core (``memory``: the growth of this process's
resident anonymous memory); ``--profile`` adds cProfile's top entries.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import tempfile
import time
from collections.abc import Callable

import msgpack
import numpy as np

from tally.actors import memory as allocator
from tally.actors.channel_table import Known, Sent
from tally.actors.metrics import private_bytes
from tally.actors.router import Router
from tally.actors.shard_state import ShardState
from tally.api.series_table import ConnectionTable
from tally.bench.workload import Workload, frame
from tally.checkpoint.sqlite import SqliteStore
from tally.wire.batches import KnownSeries, rows_batch
from tally.wire.columnar import columnar_batch
from tally.wire.frames import FrameDecoder, SeriesTable
from tally.wire.registry import SeriesRegistry
from tally.wire.timeslots import month_name, months_of_hours

SHARDS = 4
PART = 25_000  # a 100,000-increment frame's part for one of four shards
# distinct frames cycled, as ``tally bench`` does by default (--distinct-frames): the
# slots a stream reaches between checkpoints, and how much of them a cache holds, follow
DISTINCT = 32
CHECKPOINT_EVERY = 20  # parts between a shard's checkpoints (about its interval's worth)


def _timed(step: Callable[[], int], seconds: float) -> tuple[float, int]:
    """Run ``step`` (it returns the increments it handled) for about ``seconds``."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += step()
    return time.perf_counter() - t0, n


def gateway(work: Workload) -> Callable[[], int]:
    """Columnar frames of 100,000 over a connection's table: batch, split, encode parts."""
    router = Router(SHARDS)
    table = ConnectionTable()
    table.define(SeriesTable(0, work.series), router.registry)
    chunks = work.columnar_chunks(100_000, distinct=DISTINCT, table=True)
    sent = [Sent() for _ in range(SHARDS)]
    at = [0]

    def step() -> int:
        c = chunks[at[0] % len(chunks)]
        at[0] += 1
        assert c.i is not None and c.ts is not None and c.v is not None
        batch = table.batch(router.registry, c.i.tobytes(), c.ts.tobytes(), c.v.tobytes(),
                            time.time())
        for shard, part in router.split(batch).items():
            msgpack.packb(sent[shard].fields(part))
        return batch.increments
    return step


def gateway_rows(work: Workload) -> Callable[[], int]:
    """5,000-row frames as the TCP server reads them: scan, batch, split, encode parts."""
    router = Router(SHARDS)
    frames = [frame(c, k + 1) for k, c in enumerate(work.row_chunks(5000, distinct=DISTINCT))]
    decoder, known = FrameDecoder(scan_rows=True), KnownSeries()
    sent = [Sent() for _ in range(SHARDS)]
    for f in frames:  # the connection has read its series once, as a long-lived one has
        for msg in decoder.feed(f):
            rows_batch(msg["rows"], time.time(), known, router.registry)
    at = [0]

    def step() -> int:
        n = 0
        for msg in decoder.feed(frames[at[0] % len(frames)]):
            batch = rows_batch(msg["rows"], time.time(), known, router.registry)
            for shard, part in router.split(batch).items():
                msgpack.packb(sent[shard].fields(part))
            n += batch.increments
        at[0] += 1
        return n
    return step


class _Shard:
    """One shard fed parts as its socket brings them (numbered series, msgpack), with a
    SQLite checkpoint every ``CHECKPOINT_EVERY`` parts, timed apart.

    It holds what one of ``SHARDS`` shards holds of the cell: a share of its series,
    reached by ``DISTINCT`` distinct parts. (All the cell's series in one shard, cycled
    through a few parts, kept the slots a checkpoint takes few and in cache, and
    measured about twice what a shard of the service gets through.)
    """

    def __init__(self, work: Workload, folder: str, runs: bool = True,
                 distinct: int = DISTINCT, warm: bool = True) -> None:
        self.store = SqliteStore(f"{folder}/shard.db", runs=runs)
        self.store.ensure_layout(1)
        self.state = ShardState(0, self.store.open_shard(0))
        registry = SeriesRegistry(1)
        now = time.time()
        self.parts = []
        work = Workload(max(1, len(work.series) // SHARDS), work.hours)  # (its share)
        for c in work.columnar_chunks(PART, distinct=distinct):
            assert c.i is not None and c.ts is not None and c.v is not None
            part = columnar_batch(work.series, c.i.tobytes(), c.ts.tobytes(), c.v.tobytes(),
                                  now)
            part.gn, part.gn_epoch = registry.numbers(list(part.sids)), registry.epoch
            self.parts.append(part)
        self.sent, self.known = Sent(), Known()
        self.seq = 0
        self.checkpoint_seconds = 0.0
        if warm:
            for _ in self.parts:  # every series and month in place first
                self.step()
            self.checkpoint()

    def step(self, checkpoints: bool = True) -> int:
        part = self.parts[self.seq % len(self.parts)]
        self.seq += 1
        msg = msgpack.unpackb(msgpack.packb(self.sent.fields(part)), raw=False)
        batch = self.known.batch(msg)
        assert batch is not None
        numbers = self.known.numbers(batch, self.state.live)
        self.state.ingest(batch, self.store.load_months, "bench", self.seq, None, numbers)
        if checkpoints and self.seq % CHECKPOINT_EVERY == 0:
            self.checkpoint()
        return batch.increments

    def checkpoint(self) -> None:
        t0 = time.perf_counter()
        _checkpoint(self.state, self.store)
        self.checkpoint_seconds += time.perf_counter() - t0


def backfill(work: Workload, folder: str, parts: int, profile: cProfile.Profile | None = None
             ) -> tuple[float, float, int, _Shard]:
    """A shard's share of an import of history, from a cold shard: ``parts`` parts of
    ``PART`` increments, none repeated (a backfill seldom comes back to a slot), with a
    checkpoint and an eviction of idle months every ``CHECKPOINT_EVERY`` parts, as the
    shard actor does. Seconds in all, seconds of checkpoints, increments, the shard
    (``profile``: enabled while the parts are sent, not while they are made)."""
    shard = _Shard(work, folder, distinct=parts, warm=False)
    now = time.time()
    month = month_name(int(months_of_hours(np.array([int(now) // 3600]))[0]))
    if profile:
        profile.enable()
    n, t0 = 0, time.perf_counter()
    for k in range(parts):
        n += shard.step(checkpoints=False)
        if (k + 1) % CHECKPOINT_EVERY == 0 or k + 1 == parts:
            shard.checkpoint()
            t1 = time.perf_counter()
            shard.state.evict(month)
            shard.checkpoint_seconds += time.perf_counter() - t1
    seconds = time.perf_counter() - t0
    if profile:
        profile.disable()
    return seconds, shard.checkpoint_seconds, n, shard


def memory(series: int, hours: int, folder: str) -> tuple[float, int]:
    """Bytes of resident memory per live series-month that a fresh shard gains over
    ``series`` series, each with every hour of the current month so far (up to
    ``hours``), checkpointed and folded; and the series-months. ``tally bench``'s
    memory phase in one process: a shard of its four takes a quarter of its series."""
    allocator.tune()
    store = SqliteStore(f"{folder}/shard.db")
    store.ensure_layout(1)
    state = ShardState(0, store.open_shard(0))
    now = time.time()

    # (the frames are made first: what making them leaves in the heap is not the shard's)
    chunks = Workload(series, seed=7, metric="bench.memory").hourly_chunks(hours, 100_000)
    gc.collect()
    allocator.trim()
    before = private_bytes()  # (the shards' own gauge: RssAnon)
    for k, c in enumerate(chunks):
        body = msgpack.unpackb(bytes([0x80 | c.keys]) + c.body, raw=False)
        state.ingest(columnar_batch(body["series"], body["i"], body["ts"], body["v"], now),
                     store.load_months)
        del body
        if k % 8 == 7:
            _checkpoint(state, store)
    _checkpoint(state, store)
    while store.fold(0, 1 << 18):
        pass
    gc.collect()
    allocator.trim()
    added = state.live.series_months
    store.close()
    return (private_bytes() - before) / added, added


def _checkpoint(state: ShardState, store: SqliteStore) -> None:
    """One checkpoint, as the shard actor writes it (its deltas named, then written)."""
    cp = state.begin_checkpoint(settle_later=True)
    if cp is not None:
        state.settle_checkpoint()
        store.write_checkpoint(cp)
        state.finish_checkpoint(cp.ck)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tally.bench.inprocess",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("side", choices=("gateway", "gateway-rows", "shard", "checkpoint",
                                         "backfill", "memory"))
    parser.add_argument("series", type=int)
    parser.add_argument("hours", type=int, help="timestamps over the last HOURS (0: this hour)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--parts", type=int, default=100,
                        help="backfill: parts of 25,000 increments to send (default 100)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--direct", action="store_true",
                        help="checkpoints written into slot rows at once, not kept as runs "
                             "for a fold later (which this tool does not time)")
    args = parser.parse_args(argv)
    work = Workload(args.series, args.hours)
    cell = f"{args.series:,} series x {args.hours or 'this'} hour(s)"
    with tempfile.TemporaryDirectory() as folder:
        profile = None
        if args.side == "memory":
            per, months = memory(args.series, args.hours, folder)
            print(f"memory, {args.series:,} series x {Workload(1).month_hours(args.hours)} "
                  f"hour(s) of this month: {per:,.0f} bytes per live series-month "
                  f"({months:,} series-months)")
        elif args.side == "backfill":
            profile = cProfile.Profile() if args.profile else None
            seconds, checkpoints, n, _ = backfill(work, folder, args.parts, profile)
            print(f"backfill, {cell}: {n / seconds / 1e6:.2f} M increments/s "
                  f"({n / (seconds - checkpoints) / 1e6:.2f} applying; checkpoints and "
                  f"evictions {100 * checkpoints / seconds:.0f} % of the time)")
        elif args.side == "checkpoint":
            shard = _Shard(work, folder, runs=not args.direct)
            for _ in range(CHECKPOINT_EVERY):
                shard.step(checkpoints=False)
            slots = shard.state.dirty_slots
            shard.checkpoint_seconds = 0.0
            profile = cProfile.Profile() if args.profile else None
            if profile:
                profile.enable()
            shard.checkpoint()
            if profile:
                profile.disable()
            print(f"checkpoint, {cell}: {slots:,} slots of {CHECKPOINT_EVERY} parts in "
                  f"{shard.checkpoint_seconds * 1000:.0f} ms "
                  f"({slots / shard.checkpoint_seconds / 1e6:.2f} M slots/s)")
        else:
            shard = _Shard(work, folder, runs=not args.direct) if args.side == "shard" else None
            step = shard.step if shard else (gateway if args.side == "gateway"
                                             else gateway_rows)(work)
            if shard:
                shard.checkpoint_seconds = 0.0
            profile = cProfile.Profile() if args.profile else None
            if profile:
                profile.enable()
            seconds, n = _timed(step, args.seconds)
            if profile:
                profile.disable()
            line = f"{args.side}, {cell}: {n / seconds / 1e6:.2f} M increments/s"
            if shard:
                applying = seconds - shard.checkpoint_seconds
                line += (f" ({n / applying / 1e6:.2f} applying; checkpoints "
                         f"{100 * shard.checkpoint_seconds / seconds:.0f} % of the time)")
            print(line)
        if profile:
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
