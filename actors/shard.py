"""The shard actor: a thin Ray shell around ShardState and the store.

It is an async actor so that queries interleave with ingest instead of
queuing behind it, and so the checkpoint loop runs beside both. State is only
touched on the event loop thread, except by one dedicated writer thread: it
names the slots of the checkpoint just taken (the state keeps that checkpoint's
pending deltas apart from the ones still arriving) and writes them to the store,
work that would otherwise keep queries waiting; nothing else changes that
checkpoint meanwhile.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import ray

from tally.actors import affinity, logs, memory
from tally.actors.channel import ChannelServer
from tally.actors.channel_table import Known
from tally.actors.folds import Folds
from tally.actors.metrics import ShardMetrics
from tally.actors.shard_state import NO_SEQ, Applying, Outcome, ShardState
from tally.checkpoint.remote import open_store_in_actor
from tally.checkpoint.store import Checkpoint, Folding
from tally.wire.batches import Batch
from tally.wire.timeslots import month_of_hour

log = logging.getLogger("tally.shard")

SHARD_NAME = "tally-shard-{}"
# A checkpoint is slow when its oldest increment waited longer than this past
# the interval (the contract's bound on lag) or its write alone outlasted the interval.
LAG_MARGIN = 1.0
FREEZE_AFTER = 1000  # new series in one batch after which the heap is frozen (gc.freeze)
# aggregates a shard writes before it answers waiting queries (then goes on with the batch)
SLICE = 4096


@ray.remote(num_cpus=0, max_restarts=-1, enable_task_events=False)
class ShardActor:
    def __init__(
        self, shard: int, store_url: str, checkpoint_interval: float, max_dirty: int = 0,
        pinned_gateways: int = 0,
    ) -> None:
        """``pinned_gateways``: TCP gateways per node that keep cores of their own; this
        shard runs on the others (actors/affinity.py; 0: where the kernel puts it)."""
        logs.configure()
        affinity.pin(pinned_gateways, None, f"shard {shard}")
        memory.tune()  # before the state's large allocations: malloc gives memory back
        self.shard = shard
        self.interval = checkpoint_interval
        # A new id per start: the gateway tells a restart (and the loss of
        # what was applied but not yet checkpointed) from a slow answer.
        self.incarnation = uuid.uuid4().hex
        self.store = open_store_in_actor(store_url, runs=True)
        # checkpoints kept as runs, folded here (actors/folds.py); None: written as they come
        self.folds: Folds | None = None
        if isinstance(self.store, Folding) and self.store.runs:
            self.folds = Folds(unfolded=self.store.unfolded(shard))
        self._batches = 0  # batches applied, and as many at the last checkpoint interval
        self._batches_then = 0
        self.state = ShardState(shard, self.store.open_shard(shard), max_dirty=max_dirty)
        self._checkpointed: asyncio.Event | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"checkpoint-{shard}")
        self._loop_task: asyncio.Task | None = None
        self._ck_lock: asyncio.Lock | None = None
        self._state_lock: asyncio.Lock | None = None  # held by whatever changes the state
        self._channel: asyncio.Future | None = None  # the query socket's start
        self.checkpoints = 0
        self.store_errors = 0
        self.last_error: str | None = None
        self.last_checkpoint_seconds = 0.0
        self.failed_checkpoints = 0
        self.slow_checkpoints = 0
        self._failing: tuple[float, int] | None = None  # (since, failures) of an outage
        self._slowest = 0.0  # since the last ``summary`` call
        self._throttle = logs.Throttle()
        self.meters = ShardMetrics(shard, lambda: self.state, lambda: self.folds)
        gc.freeze()  # start-up objects never need collecting; avoids long gen2 pauses later

    # ---- lifecycle -----------------------------------------------------

    def _start_loop(self) -> None:
        if self._loop_task is None:
            self._ck_lock = asyncio.Lock()
            self._state_lock = asyncio.Lock()
            self._checkpointed = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._checkpoint_loop())
            self._loop_task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.last_error = f"checkpoint loop died: {task.exception()!r}"
            logs.event(log, logging.ERROR, "error", shard=self.shard, where="checkpoint loop",
                       error=self.last_error)

    async def ready(self) -> dict[str, Any]:
        self._start_loop()
        return {"shard": self.shard, "ck": self.state.last_ck, "incarnation": self.incarnation,
                "node": ray.get_runtime_context().get_node_id()}

    # ---- ingest --------------------------------------------------------

    async def apply(
        self,
        batch: Batch,
        producer: str | None = None,
        seq: int | None = None,
        expect: int | None = None,
    ) -> dict[str, Any]:
        """What ShardState.ingest answers (``Ingested.answer``), with this incarnation's id."""
        return await self._apply_now(batch, producer, seq, expect)

    async def _apply_now(self, batch: Batch, producer: str | None, seq: int | None,
                         expect: int | None, known: Known | None = None) -> dict[str, Any]:
        """``apply``, on the event loop, whether it came by Ray or by the socket (whose
        numbered series, ``known``, find the series numbers without a lookup by id).

        The batch is written ``SLICE`` aggregates at a time, and queries are answered
        between slices (a wide batch part is many milliseconds of work, and a query
        waited behind all of it). Nothing else that changes the state runs meanwhile:
        other batches, undos and checkpoints wait for ``_state_lock``.
        """
        self._start_loop()
        assert self._state_lock is not None
        async with self._state_lock:
            numbers = None if known is None else known.numbers(batch, self.state.live)
            series_before = len(self.state.live)
            # load_months runs synchronously on the event loop on purpose: nothing
            # else may touch the state between finding a month missing and
            # installing its base (see ShardState.ingest).
            started = self.state.begin_ingest(batch, self.store.load_months, producer, seq,
                                              expect, numbers)
            if isinstance(started, Applying):
                try:
                    while started.step(SLICE):
                        await asyncio.sleep(0)  # queries waiting on this loop go now
                except asyncio.CancelledError:
                    while started.step(len(batch)):  # never left half written
                        pass
                    raise
                except Exception as e:
                    self._half_written(e)
                assert started.result is not None
                result = started.result
            else:
                result = started
        if len(self.state.live) - series_before >= FREEZE_AFTER:
            # Series are long-lived: out of the collector's sight, a collection costs
            # what the young objects cost, not what the shard holds.
            gc.freeze()
        if result.outcome is Outcome.STORE_DOWN:
            self._store_failed(RuntimeError(result.message))
        elif result.outcome is Outcome.APPLIED:
            self._batches += 1
            self.meters.applied(batch.increments)
        answer = result.answer()
        answer["incarnation"] = self.incarnation
        return answer

    def _half_written(self, e: Exception) -> NoReturn:
        """A slice that failed leaves part of a batch applied and the producer's mark
        where it was: a resend would count that part twice, and the state refuses
        everything meanwhile. The process ends instead, as a crash would: Ray starts
        the shard again from its last checkpoint, and producers resend what was not
        durable."""
        logs.event(log, logging.CRITICAL, "error", shard=self.shard, where="apply",
                   error=f"a batch failed half written, restarting the shard: {e!r}"[:500])
        logging.shutdown()
        os._exit(70)

    async def revert(
        self, batch: Batch, producer: str | None = None, seq: int | None = None
    ) -> bool:
        self._start_loop()
        assert self._state_lock is not None
        async with self._state_lock:
            undone = self.state.revert(batch, self.store.load_months, producer, seq)
        if undone:
            self.meters.lag.applied()  # the undo is a delta to checkpoint like any other
        return undone

    async def wait_checkpoint(self, after_ck: int, timeout: float) -> dict[str, Any]:
        """Answer once a checkpoint newer than ``after_ck`` is durable, or at ``timeout``.

        Gateways keep one of these pending per shard: a long poll that tells
        them when acknowledged batches became durable, without a call per batch.
        """
        self._start_loop()
        assert self._checkpointed is not None
        if self.state.durable_ck <= after_ck:
            waiter = asyncio.ensure_future(self._checkpointed.wait())
            done, _ = await asyncio.wait({waiter}, timeout=timeout)
            if not done:  # answer with what is durable now; the caller polls again
                waiter.cancel()
        return {"incarnation": self.incarnation, "durable_ck": self.state.durable_ck}

    async def durable_mark(self, producer: str) -> int:
        return self.state.durable.get(producer, NO_SEQ)

    # ---- queries -------------------------------------------------------

    async def hourly_of(self, sids: list[str], h0: int, h1: int) -> Any:
        return self.state.hourly_of(sids, h0, h1, self.store.load_months)

    async def query_channel(self) -> dict[str, Any]:
        """Where this shard answers hourly_of and totals_of by socket, and its secret.

        Opened by the first gateway to ask (actors/channel.py); a restarted
        shard opens a new one.
        """
        if self._channel is None:
            server = ChannelServer(self._query, self._apply_now)
            self._channel = asyncio.ensure_future(server.start(ray.util.get_node_ip_address()))
        return await asyncio.shield(self._channel)

    def _query(self, method: str, sids: list[str], h0: int, h1: int) -> Any:
        query = self.state.hourly_of if method == "hourly_of" else self.state.totals_of
        return query(sids, h0, h1, self.store.load_months)

    async def totals_of(self, sids: list[str], h0: int, h1: int) -> list[int]:
        return self.state.totals_of(sids, h0, h1, self.store.load_months)

    async def series_of(self, tenant: str, metric: str) -> list[str]:
        return self.state.series_of(tenant, metric)

    async def catalog(self, tenant: str) -> list[str]:
        return self.state.catalog(tenant)

    # ---- checkpoints ---------------------------------------------------

    async def checkpoint(self) -> int:
        """Write everything applied so far; returns the last checkpoint id written."""
        self._start_loop()
        assert self._ck_lock is not None
        for _ in range(3):  # an unfinished one first, then what is dirty
            if await self._checkpoint_once() is None:
                break
        return self.state.last_ck

    async def _checkpoint_once(self) -> int | None:
        assert self._ck_lock is not None
        assert self._state_lock is not None
        async with self._ck_lock:
            async with self._state_lock:  # (never with half a batch written)
                cp = self.state.begin_checkpoint(settle_later=True)
                if cp is None:
                    self.meters.lag.clean()
                    # (an interval passes for the months a backfill stopped writing, too)
                    self.state.evict(month_of_hour(int(time.time()) // 3600))
                    return None
            self.meters.lag.began(cp.ck)
            started = time.monotonic()
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._writer, self._write, cp)
            except Exception as e:
                self._checkpoint_failed(cp.ck, e)
                raise
            async with self._state_lock:
                self.state.finish_checkpoint(cp.ck)
                assert self._checkpointed is not None
                self._checkpointed.set()  # wake every waiter, then arm for the next one
                self._checkpointed = asyncio.Event()
                now_month = month_of_hour(int(time.time()) // 3600)
                evicted = self.state.evict(now_month)
            self.checkpoints += 1
            seconds = self.last_checkpoint_seconds = time.monotonic() - started
            ck = cp.ck
            documents, slots = (0, 0) if cp.slots is None else (len(cp.slots.sids), len(cp.slots))
            lag = self.meters.checkpoint_written(
                ck, seconds, slots=slots, documents=documents, new_series=len(cp.new_series),
                evicted=evicted,
            )
            del cp  # its deltas are garbage now: a trim gives their pages back (``_trim``)
            memory.PROCESS.wrote(slots)
            self._checkpoint_written(ck, seconds, lag, slots, documents)
            return ck

    def _checkpoint_written(
        self, ck: int, seconds: float, lag: float, slots: int, documents: int
    ) -> None:
        """Counted in /metrics (ShardMetrics); logged only when it ends an outage or is slow.

        Slow: its oldest increment waited longer than the interval plus
        ``LAG_MARGIN`` (the contract's bound on how long an acknowledged
        increment may take to become durable), or the write alone took longer
        than the interval (the next one is due before it ends). Repeats are
        throttled per shard (logs.Throttle); the metric counts every one.
        """
        self._slowest = max(self._slowest, seconds)
        slow = seconds > self.interval or lag > self.interval + LAG_MARGIN
        if slow:
            self.slow_checkpoints += 1
            self.meters.slow.inc()
        if self._failing is not None:  # (slow, surely: its line says so)
            since, failures = self._failing
            self._failing = None
            self._throttle.reset("failed")  # the next outage is told at once
            logs.event(log, logging.WARNING, "checkpoint_recovered", shard=self.shard, ck=ck,
                       failures=failures, outage_seconds=round(time.monotonic() - since, 3),
                       seconds=round(seconds, 3), lag_seconds=round(lag, 3))
            return
        if not slow:
            return
        left_out = self._throttle.admit("slow")
        if left_out is not None:
            logs.event(log, logging.WARNING, "checkpoint_slow", shard=self.shard, ck=ck,
                       seconds=round(seconds, 3), lag_seconds=round(lag, 3),
                       interval=self.interval, slots=slots, documents=documents,
                       not_logged=left_out)

    def _checkpoint_failed(self, ck: int, e: Exception) -> None:
        """A write that failed: counted, kept in last_error, logged at the start of an
        outage and then at most once per ``logs.REPEAT_SECONDS``."""
        self.failed_checkpoints += 1
        self.store_errors += 1
        self.meters.store_errors.inc()
        self.meters.failures.inc()
        self.last_error = repr(e)
        since, failures = self._failing or (time.monotonic(), 0)
        self._failing = (since, failures + 1)
        left_out = self._throttle.admit("failed")
        if left_out is not None:
            logs.event(log, logging.ERROR, "checkpoint_failed", shard=self.shard, ck=ck,
                       error=self.last_error, failures=failures + 1,
                       outage_seconds=round(time.monotonic() - since, 3),
                       lag_seconds=round(self.meters.lag.seconds(), 3), not_logged=left_out)

    def _write(self, cp: Checkpoint) -> None:
        """On the writer thread: name the checkpoint's deltas, then write them."""
        self.state.settle_checkpoint()
        self.store.write_checkpoint(cp)
        if self.folds is not None and cp.slots is not None:
            self.folds.written(len(cp.slots))

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._checkpoint_once()
            except Exception:  # kept in last_error and retried next interval; state is intact
                continue
            await self._fold(until_done=False)
            await self._trim(idle=self._batches == self._batches_then)
            self._batches_then = self._batches

    async def _trim(self, idle: bool) -> None:
        """Give the checkpoints' garbage back when ``memory.PROCESS`` says so; on the
        writer thread, so the event loop serves queries meanwhile."""
        if memory.available() and memory.PROCESS.due(idle):
            loop = asyncio.get_running_loop()
            self.meters.trimmed(await loop.run_in_executor(self._writer, memory.trim))

    async def _fold(self, until_done: bool) -> None:
        """Fold the runs while the shard is idle (no batch since the last interval) or
        they hold more than their backlog, a step at a time; every step, with
        ``until_done``. On the writer thread, between checkpoints."""
        folds = self.folds
        if folds is None:
            return
        loop = asyncio.get_running_loop()
        while budget := folds.budget(until_done or self._batches == self._batches_then):
            started = time.monotonic()
            try:
                left = await loop.run_in_executor(self._writer, self.store.fold, self.shard,
                                                  budget)
            except Exception as e:  # the runs stay, read as they are; folded next interval
                self._fold_failed(e)
                return
            before, seconds = folds.unfolded, time.monotonic() - started
            folds.done(left)
            self.meters.folded(max(0, before - left), seconds)
            if not left and memory.available():  # (what the fold's sums held, back)
                self.meters.trimmed(await loop.run_in_executor(self._writer, memory.trim))

    def _fold_failed(self, e: Exception) -> None:
        self.store_errors += 1
        self.meters.store_errors.inc()
        self.last_error = repr(e)
        left_out = self._throttle.admit("fold")
        if left_out is not None:
            logs.event(log, logging.ERROR, "error", shard=self.shard, where="fold",
                       error=self.last_error, not_logged=left_out)

    def _store_failed(self, e: Exception) -> None:
        """A store read that failed (ingest answers ``overloaded``): counted, and logged
        at most once per ``logs.REPEAT_SECONDS`` however many batches it refuses."""
        self.store_errors += 1
        self.meters.store_errors.inc()
        self.last_error = repr(e)
        left_out = self._throttle.admit("read")
        if left_out is not None:
            logs.event(log, logging.ERROR, "error", shard=self.shard, where="store read",
                       error=self.last_error, not_logged=left_out)

    async def stats(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "ck": self.state.last_ck,
            "series": len(self.state.series),
            "dirty_slots": self.state.dirty_slots,
            "durable_ck": self.state.durable_ck,
            "incarnation": self.incarnation,
            "increments": self.state.increments,
            "checkpoints": self.checkpoints,
            "store_errors": self.store_errors,
            "last_error": self.last_error,
            "last_checkpoint_seconds": self.last_checkpoint_seconds,
            "unfolded_slots": 0 if self.folds is None else self.folds.unfolded,
        }

    async def summary(self) -> dict[str, Any]:
        """Counts since start, and the slowest checkpoint since the last call: the
        supervisor's summary line (cluster/supervisor.py) is their difference."""
        slowest, self._slowest = self._slowest, 0.0
        return {
            "increments": self.state.increments,
            "checkpoints": self.checkpoints,
            "slow_checkpoints": self.slow_checkpoints,
            "failed_checkpoints": self.failed_checkpoints,
            "store_errors": self.store_errors,
            "errors": logs.errors_logged(),
            "slowest_checkpoint": slowest,
            "lag": self.meters.lag.seconds(),
            "dirty_slots": self.state.dirty_slots,
            "unfolded_slots": 0 if self.folds is None else self.folds.unfolded,
            "incarnation": self.incarnation,
        }

    async def metrics(self) -> str:
        """Prometheus text of this shard; the gateway merges every shard's into /metrics."""
        return self.meters.render()

    async def shutdown(self) -> int:
        """Final checkpoint and fold, then stop the loop; the process may be killed after
        this. (Folded, the store starts the next time without runs to read through, and
        older tallies can read it.)"""
        ck = await self.checkpoint()
        if self._loop_task is not None:
            self._loop_task.cancel()
        await self._fold(until_done=True)
        return ck
