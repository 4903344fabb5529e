"""A shard's in-memory state, free of I/O: batches in, checkpoint deltas out.

The shard owns every (series, UTC month) it has touched: it loads the stored
month document once (its *base*), then applies increments on top, so for
those months its totals are complete and a query needs no store round trip.
Months it has never touched are answered from the store alone; the two sets
never overlap, which is what makes a query count each increment once.

``ShardState`` composes the parts and keeps what must change them together:
ingest (marks, bound, loading bases, applying all or nothing), revert,
checkpoints and eviction. The parts, each in a module of its own:

- ``LiveSeries`` (live_series.py): series numbers and the months held live;
- ``DayBlocks`` (day_blocks.py): the counts, in a slab of day blocks, and the
  deltas since the last checkpoint (``PendingDeltas``, pending.py);
- ``Marks`` (marks.py): producers' applied and durable seqs, checkpoint ids;
- ``Reads`` (reads.py): the queries;
- ``Ingested`` (outcomes.py): what ``ingest`` answers.

A checkpoint takes the pending deltas as they are and freezes them into an
immutable in-flight ``Checkpoint`` that is retried as it is until the store
takes it (the store's ``ck`` guard makes a retry of a half-applied checkpoint
exact); new increments meanwhile start the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from tally.actors.day_blocks import BIG, DAY_BITS, DayBlocks, Taken, beyond_big
from tally.actors.history import DEFAULT_BYTES, History
from tally.actors.hour_tiers import NARROW, NOWHERE, Where
from tally.actors.live_series import LiveSeries
from tally.actors.marks import NO_SEQ, Marks
from tally.actors.outcomes import Ingested, Outcome
from tally.actors.reads import Load, Reads
from tally.checkpoint.store import Checkpoint, MonthDoc, MonthKey, ShardRecord
from tally.wire.batches import INT64_MAX, INT64_MIN, Batch
from tally.wire.timeslots import hour_start, month_days, month_number, months_of_hours

__all__ = ["NO_SEQ", "DeltaOverflow", "Ingested", "Outcome", "ShardState", "SlotOverflow"]


class SlotOverflow(ValueError):
    """An increment would take a stored slot outside int64; nothing was applied."""

    def __init__(self, aggregate: int, message: str) -> None:
        super().__init__(message)
        self.aggregate = aggregate


class DeltaOverflow(ValueError):
    """An hour's change since the last checkpoint would leave int64 (a checkpoint carries
    it as one int64 increment); nothing was applied. It fits once that checkpoint began."""


# A past month stays live this many checkpoint intervals after a batch last touched it ...
EVICT_IDLE_CHECKPOINTS = 10
# ... unless the shard's past months hold more bytes than this (their day blocks and day
# tables): the least recently touched go first. A bound in memory, not in series-months:
# a backfill scattered over a year touches many months of few blocks each, and reloading
# them from the store for every batch would cost it most of its time.
KEEP_PAST_BYTES = 256 << 20


class ShardState:
    def __init__(
        self, shard: int, record: ShardRecord | None = None, max_dirty: int = 0,
        history_bytes: int = DEFAULT_BYTES,
    ) -> None:
        record = record or ShardRecord()
        self.shard = shard
        self.marks = Marks(record)
        self.max_dirty = max_dirty  # 0: unbounded
        self.inflight: Checkpoint | None = None
        self.inflight_count = 0
        self.unrecorded: set[str] = set()  # series no checkpoint has recorded in the catalog yet
        self.increments = 0  # applied since start, for stats
        self.live = LiveSeries()
        self.blocks = DayBlocks()
        self.reads = Reads(self.live, self.blocks, History(history_bytes))
        self._unsettled: Taken | None = None  # the in-flight checkpoint's slots, not named yet
        # month number -> ``evict`` calls made when a batch last touched it: a past month
        # stays live while a backfill keeps writing it, instead of being forgotten after
        # every checkpoint and loaded again by the next batch
        self.month_touched: dict[int, int] = {}
        self.evictions = 0
        self.applying: Applying | None = None  # a batch checked and being written

    # ---- what other modules read -----------------------------------------

    @property
    def last_ck(self) -> int:
        """Highest checkpoint id claimed in the store."""
        return self.marks.last_ck

    @property
    def durable_ck(self) -> int:
        """Highest checkpoint id known durable."""
        return self.marks.durable_ck

    @property
    def applied(self) -> dict[str, int]:
        """Producer -> highest seq applied here."""
        return self.marks.applied

    @property
    def durable(self) -> dict[str, int]:
        """Producer -> highest seq the store holds."""
        return self.marks.durable

    @property
    def series(self) -> dict[str, int]:
        """Sid -> series number, of every series held."""
        return self.live.series

    @property
    def history(self) -> History:
        """Stored months read for queries (other than those live)."""
        return self.reads.history

    @history.setter
    def history(self, history: History) -> None:
        self.reads.history = history

    @property
    def dirty_slots(self) -> int:
        return self.blocks.pending.slots + self.inflight_count

    @property
    def series_months(self) -> int:
        return self.live.series_months

    # ---- series and months ---------------------------------------------

    def _add_series(self, sid: str) -> int:
        self.unrecorded.add(sid)
        return self.live.add(sid)

    def missing(self, batch: Batch, numbers: np.ndarray | None = None,
                at: np.ndarray | None = None) -> list[MonthKey]:
        """(series, month) pairs of the batch whose stored base is not loaded yet;
        ``numbers``: the series numbers of its sids, if known; ``at``: only these
        aggregates, if given."""
        return self.live.missing(batch, numbers, at)

    def install(self, keys: Iterable[MonthKey], docs: dict[MonthKey, MonthDoc]) -> None:
        """Take stored bases for ``keys``; a key already present is kept (it is newer).

        A backfill installs hundreds of thousands of months a batch, most of them
        with no stored document: the months are held per month number, and only the
        documents found are written into blocks, together."""
        keys = list(keys)
        if not keys:
            return
        live = self.live
        sids = [sid for sid, _ in keys]
        for sid in dict.fromkeys(sids):
            if sid not in live.series:
                self._add_series(sid)
        g = live.numbers(sids)
        number_of = {month: month_number(month) for month in {month for _, month in keys}}
        mnos = np.fromiter(map(number_of.__getitem__, (m for _, m in keys)), np.int64,
                           len(keys))
        fresh = live.hold_many(g, mnos)
        history = self.history
        if not docs and not len(history):
            return
        found: list[tuple[int, dict[int, int]]] = []
        for k in np.flatnonzero(fresh).tolist():
            key = keys[k]
            if len(history):
                history.drop((key[0], int(mnos[k])))  # live from now on; the copy would go stale
            doc = docs.get(key)
            if doc is not None and doc.hours:
                found.append((int(g[k]), doc.hours))
        self.blocks.set_many_hours(found, live.count)

    # ---- applying ------------------------------------------------------

    def ingest(
        self,
        batch: Batch,
        load: Load,
        producer: str | None = None,
        seq: int | None = None,
        expect: int | None = None,
        numbers: np.ndarray | None = None,
    ) -> Ingested:
        """``begin_ingest``, and the whole batch written at once."""
        started = self.begin_ingest(batch, load, producer, seq, expect, numbers)
        if isinstance(started, Ingested):
            return started
        while started.step(len(batch)):
            pass
        assert started.result is not None
        return started.result

    def begin_ingest(
        self,
        batch: Batch,
        load: Load,
        producer: str | None = None,
        seq: int | None = None,
        expect: int | None = None,
        numbers: np.ndarray | None = None,
    ) -> Ingested | Applying:
        """Apply a batch once per (producer, seq); the result says what happened, or, for
        a batch to apply, what writes it (``Applying``, a slice at a time).

        Accepted (applied now, or a duplicate), it names the checkpoint that
        makes the batch durable (an applied batch that brought series this
        shard did not hold also lists them); refused, it says why (see
        ``Outcome``), and nothing changed.
        A producer's batches reach every shard in seq order (the gateway sends
        each one to all shards, empty where it has no rows there), so a seq at
        or below this shard's mark is a resend. ``expect`` is the seq the
        gateway sent before this one: a mark that differs means this shard
        lost batches (it restarted) and must not skip past them.

        Callers must not let other calls touch this state between the load and
        the apply (the shard actor calls ``load`` synchronously), or a stale
        base could be installed over newer counts; nor, until the ``Applying`` is
        done, anything but reads (``applying`` says so).
        """
        self._not_applying("ingest")
        marks = self.marks
        if producer is not None:
            assert seq is not None
            if marks.is_resend(producer, seq):
                return Ingested.duplicate(self._holding_ck(producer))
            mark = marks.applied.get(producer)
            if expect is not None and mark != expect:
                return Ingested.refused(
                    Outcome.GAP, f"shard {self.shard} holds {producer!r} up to seq {mark}, "
                    f"not {expect}: it restarted; resend from the last durable seq")
        # Room for the batch twice: if another shard refuses its part, undoing
        # it here may add as many slots again (when a checkpoint took the
        # originals meanwhile), and an undo cannot be refused. An empty shard
        # takes any batch, so a batch larger than half the bound still passes.
        if self.max_dirty and self._over_bound(len(batch)):
            return Ingested.refused(
                Outcome.FULL, f"shard {self.shard} holds {self.dirty_slots} slots not yet "
                f"checkpointed (bound {self.max_dirty}); retry later")
        if numbers is None:  # (``numbers``: the sids' series numbers, -1 if not held)
            numbers = self.live.numbers(batch.sids)
        rows = self._held_rows(batch, numbers)
        # only aggregates without a block yet can need a month loaded
        absent = None if rows is None else np.flatnonzero(rows < 0)
        missing = ([] if absent is not None and not len(absent)
                   else self.missing(batch, numbers, absent))
        new: list[str] = []
        if missing:
            numbers = rows = absent = None  # series are installed: their numbers change
            try:
                docs = load(missing)
            except Exception as e:  # the store is down: refuse, the client backs off and resends
                return Ingested.refused(Outcome.STORE_DOWN, f"store unavailable: {e}")
            known = self.live.series
            new = list(dict.fromkeys(sid for sid, _ in missing if sid not in known))
            self.install(missing, docs)
        if numbers is None:
            numbers = self.live.numbers(batch.sids)
        try:
            rows, hod, sums, where = self._checked(batch, numbers, rows, absent)
        except SlotOverflow as e:
            return Ingested.refused(Outcome.BAD_ROW, str(e), e.aggregate)
        except DeltaOverflow as e:
            return Ingested.refused(Outcome.DELTA_OVERFLOW, str(e))
        self.applying = Applying(self, batch, numbers, rows, hod, sums, where, producer, seq,
                                 new)
        return self.applying

    def _not_applying(self, what: str) -> None:
        if self.applying is not None:
            raise RuntimeError(f"shard {self.shard}: {what} while a batch is half written")

    def _applied(self, applying: Applying) -> Ingested:
        """The end of an ``Applying``: the batch counts as applied from here."""
        self.applying = None
        batch = applying.batch
        self._touched(batch)
        if applying.producer is not None:
            self.marks.applied_now(applying.producer, applying.seq)  # type: ignore[arg-type]
        return Ingested.applied(self._holding_ck(applying.producer), applying.new)

    def _over_bound(self, size: int) -> bool:
        used = self.dirty_slots
        return bool(used) and used + 2 * size > self.max_dirty

    def _holding_ck(self, producer: str | None) -> int:
        """The checkpoint by which everything applied so far is durable (``Marks``)."""
        changed = bool(self.blocks.pending.rows or self.unrecorded)  # (may sum to nothing)
        return self.marks.holding_ck(producer, changed, self.inflight)

    def _held_rows(self, batch: Batch, numbers: np.ndarray) -> np.ndarray | None:
        """The block rows of a batch's aggregates (-1: no block yet), or None when a series
        is not held. A block is there only while its series' month is live (``evict``
        frees a month's blocks before it releases the month), so only the aggregates
        without one can need a month loaded: for the usual batch, none."""
        if not len(batch) or int(numbers.min()) < 0:
            return None
        g = numbers[batch.series.astype(np.intp)]
        return self.blocks.find(g, batch.hours // 24)

    def _locate(self, batch: Batch, numbers: np.ndarray, rows: np.ndarray | None = None,
                absent: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Block rows and hours of day of a batch's aggregates (all months loaded);
        ``numbers``: the series number of each of its sids; ``rows``: the rows the caller
        found (``_held_rows``), -1 where a block is made, at ``absent`` (found from
        ``rows`` if not given)."""
        if rows is not None:
            if absent is None:
                absent = np.flatnonzero(rows < 0)
            if len(absent):
                g = numbers[batch.series[absent].astype(np.intp)]
                rows = rows.copy()
                rows[absent] = self.blocks.locate(g, batch.hours[absent] // 24, self.live.count)
            return rows, batch.hours % 24
        g = numbers[batch.series.astype(np.intp)]
        if (g < 0).any():
            raise RuntimeError("a batch's series must be installed before it is applied")
        hours = batch.hours
        rows = self.blocks.locate(g, hours // 24, self.live.count)
        return rows, hours % 24

    def _checked(self, batch: Batch, numbers: np.ndarray, rows: np.ndarray | None = None,
                 absent: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Where]:
        """The batch's slots (block rows, hours of day) and their totals with it, once no
        slot, day or pending delta would leave int64 (SlotOverflow, DeltaOverflow)."""
        if not len(batch):
            empty = np.empty(0, np.int64)
            return empty, empty, empty, NOWHERE
        rows, hod = self._locate(batch, numbers, rows, absent)
        blocks = self.blocks
        values = batch.values
        old, where = blocks.located(rows, hod)
        with np.errstate(over="ignore"):
            new = old + values
        if (not blocks.wide_blocks and not blocks.big
                and max(int(values.max()), -int(values.min())) <= BIG - NARROW):
            # Every hour held is within ±NARROW and no value passes BIG - NARROW: no sum
            # can wrap or pass BIG, so no slot, day or pending delta needs a check.
            return rows, hod, new, where
        wrapped = ((old ^ new) & (values ^ new)) < 0  # (the sum's sign differs from both)
        bad: list[tuple[int, str]] = []
        for n in np.flatnonzero(wrapped).tolist():
            total = int(old[n]) + int(values[n])
            bad.append((n, f"series {batch.sids[int(batch.series[n])]!r} at "
                           f"{_utc(int(batch.hours[n]))}: the hour's total {total} "
                           "would leave int64"))
        big = beyond_big(new)
        if blocks.big:
            big |= np.isin(rows, np.fromiter(blocks.big, np.int64, len(blocks.big)))
        if big.any() and not bad:
            bad = self._day_overflows(batch, rows, np.flatnonzero(big))
        if bad:
            # (blocks the batch created stay, all zero, until their month is evicted)
            n, message = min(bad, key=lambda b: int(batch.first_row[b[0]]))
            raise SlotOverflow(n, message)
        if big.any():  # (a change beyond int64 needs an hour beyond BIG, then or now)
            moved = blocks.pending.overflows(rows, hod, values)
            if len(moved):
                n = int(moved[0])
                raise DeltaOverflow(
                    f"shard {self.shard}: series {batch.sids[int(batch.series[n])]!r} at "
                    f"{_utc(int(batch.hours[n]))}: the hour's change since the last "
                    "checkpoint would leave int64; retry after the next checkpoint")
        return rows, hod, new, where

    def _touched(self, batch: Batch) -> None:
        """Count the batch's increments, and note its months as written now."""
        self.increments += batch.increments
        if not len(batch):
            return
        first, last = (int(m) for m in months_of_hours(np.array([batch.hours.min(),
                                                                 batch.hours.max()])))
        for m in range(first, last + 1):  # (a backfill's months are one range)
            self.month_touched[m] = self.evictions

    def _day_overflows(
        self, batch: Batch, rows: np.ndarray, near: np.ndarray
    ) -> list[tuple[int, str]]:
        """Aggregates whose UTC day total (stored plus this batch) would leave int64."""
        added: dict[int, int] = {}
        for r, v in zip(rows.tolist(), batch.values.tolist(), strict=True):
            added[r] = added.get(r, 0) + v
        bad = []
        for n in near.tolist():
            r = int(rows[n])
            total = sum(int(x) for x in self.blocks.row_counts(rows[n:n + 1])[0].tolist())
            total += added[r]
            if not INT64_MIN <= total <= INT64_MAX:
                day = int(batch.hours[n]) // 24
                bad.append((n, f"series {batch.sids[int(batch.series[n])]!r} on "
                               f"{_utc(day * 24)[:10]}: the day's total {total} "
                               "would leave int64"))
        return bad

    def revert(
        self,
        batch: Batch,
        load: Load,
        producer: str | None = None,
        seq: int | None = None,
    ) -> bool:
        """Undo an applied batch (another shard refused its part of the same batch).

        A producer's batch is undone only while it is the producer's last one
        here and no resend of it was answered ``duplicate`` meanwhile: after a
        failover the producer's new connection can resend the batch (a
        duplicate here, applied on the shard that restarted) before the old
        connection's refusal comes back, and undoing it then would lose it.
        Answers whether it undid the batch.

        A checkpoint may have written the batch and dropped its months from
        memory meanwhile, so they are loaded again (with the batch in their
        base) before subtracting. If that load fails, this raises and nothing
        changes, mark included: the batch then stays applied here, and the
        producer's resend of it is a duplicate here while other shards apply it.
        """
        self._not_applying("an undo")
        if producer is not None and not self.marks.undoable(producer, seq):
            return False
        missing = self.missing(batch)
        if missing:
            self.install(missing, load(missing))
        if producer is not None:
            self.marks.undo(producer)
        if not len(batch):
            return True
        numbers = self.live.numbers(batch.sids)
        rows, hod = self._locate(batch, numbers)
        old = self.blocks.get(rows, hod)
        values = -batch.values
        with np.errstate(over="ignore"):
            new = old + values
        if (((values > 0) & (new < old)) | ((values < 0) & (new > old))).any():
            # Only possible if other batches moved the slot to within a batch of
            # the limit meanwhile; an undo cannot be refused, and must not wrap.
            raise RuntimeError(f"shard {self.shard}: undoing a batch would leave int64")
        self.blocks.write(rows, hod, new, values, block_keys(batch, numbers))
        self.increments -= batch.increments
        return True

    # ---- checkpoints ---------------------------------------------------

    def begin_checkpoint(self, settle_later: bool = False) -> Checkpoint | None:
        """The checkpoint to write next: the unfinished one again, else the dirty deltas.

        With ``settle_later`` the dirty slots are only taken: naming them per
        document (a dict entry per slot) is left to ``settle_checkpoint`` on the
        writer thread, so queries do not wait for it on the event loop.
        """
        self._not_applying("beginning a checkpoint")
        if self.inflight is not None:
            return self.inflight
        taken = self.blocks.take()
        producers = self.marks.unsaved()
        # A waiter may hold the promise of this checkpoint: it happens even if
        # the deltas summed to nothing meanwhile (a batch and its undo).
        promised = self.marks.take_promise()
        if not len(taken.rows) and not self.unrecorded and not producers and not promised:
            return None
        self.inflight = Checkpoint(
            shard=self.shard,
            ck=self.marks.claim(),
            deltas={},
            new_series=sorted(self.unrecorded),
            producers=producers,
        )
        self.unrecorded = set()
        self.inflight_count = len(taken.rows)
        if settle_later:
            self._unsettled = taken
        else:
            self._settle(taken)
        return self.inflight

    def settle_checkpoint(self) -> None:
        """Name what ``begin_checkpoint`` took as the in-flight checkpoint's deltas.

        Safe on another thread while the event loop ingests and answers: it
        reads only the arrays taken and the names of their series, and a
        series number is reused only by ``evict``, which settles first (the
        actor never evicts while a checkpoint is being written).
        """
        if self._unsettled is None or self.inflight is None:
            return
        self._settle(self._unsettled)
        self._unsettled = None

    def _settle(self, taken: Taken) -> None:
        assert self.inflight is not None
        self.inflight.slots = taken.slots(self.live.sids)

    def finish_checkpoint(self, ck: int) -> None:
        if self.inflight is None or self.inflight.ck != ck:
            raise RuntimeError(f"checkpoint {ck} is not the one in flight")
        self.marks.durable_at(self.inflight)
        self.inflight = None
        self.inflight_count = 0

    def evict(self, current_month: str, idle: int = EVICT_IDLE_CHECKPOINTS,
              keep: int = KEEP_PAST_BYTES) -> int:
        """Forget clean months other than the current one; the store has them.

        Called once per checkpoint interval (checkpoint or not): a past month is
        kept until ``idle`` calls passed since a batch last touched it, so a
        backfill does not load the same months again after every checkpoint;
        beyond ``keep`` bytes of past months, the least recently touched go
        first even so.
        """
        self._not_applying("evicting months")
        self.evictions += 1
        current = month_number(current_month)
        live = self.live
        touched = self.month_touched
        past = sorted((m for m in live.months() if m != current),
                      key=lambda m: touched.get(m, -1))
        cost = {m: self.blocks.days_bytes(*month_days(m)) for m in past}
        held = sum(cost.values())
        others = []
        for m in past:
            if touched.get(m, -1) < self.evictions - idle or held > keep:
                others.append(m)
                held -= cost[m]
        months = set(live.months())
        for m in [m for m in touched if m not in months and m != current]:
            del touched[m]
        if not others:
            return 0
        self.settle_checkpoint()  # its series must be named before a number is reused
        busy: set[tuple[int, int]] = set()
        if self.blocks.pending.rows:  # (blocks changed since the last checkpoint, even to nothing)
            keys = self.blocks.changed_keys()
            mnos = months_of_hours((keys & ((1 << DAY_BITS) - 1)) * 24)
            busy.update(zip((keys >> DAY_BITS).tolist(), mnos.tolist(), strict=True))
        if self.inflight is not None and self.inflight.slots is not None:
            held = self.inflight.slots
            busy.update((live.series[sid], month_number(m))
                        for sid, m in zip(held.sids, held.months, strict=True)
                        if sid in live.series)
        evicted = 0
        for m in others:
            first, end = month_days(m)
            for g in [g for g in live.holders(m).tolist() if (g, m) not in busy]:
                evicted += 1
                self.blocks.free_month(g, first, end)
                if not live.release(g, m) and live.sids[g] not in self.unrecorded:
                    live.drop(g)
        return evicted

    # ---- queries (reads.py) ----------------------------------------------

    def hourly_of(self, sids: list[str], h0: int, h1: int, load: Load) -> np.ndarray:
        return self.reads.hourly_of(sids, h0, h1, load)

    def totals_of(self, sids: list[str], h0: int, h1: int, load: Load) -> list[int]:
        return self.reads.totals_of(sids, h0, h1, load)

    def per_hour(self, sids: list[str], h0: int, h1: int, load: Load) -> np.ndarray:
        return self.reads.per_hour(sids, h0, h1, load)

    def hourly(
        self, tenant: str, metric: str, where: dict[str, str], h0: int, h1: int
    ) -> tuple[np.ndarray, list[MonthKey]]:
        return self.reads.hourly(tenant, metric, where, h0, h1)

    def totals(
        self, tenant: str, metric: str, where: dict[str, str], h0: int, h1: int
    ) -> tuple[dict[str, int], list[MonthKey]]:
        return self.reads.totals(tenant, metric, where, h0, h1)

    def series_of(self, tenant: str, metric: str) -> list[str]:
        return self.live.series_of(tenant, metric)

    def catalog(self, tenant: str) -> list[str]:
        return self.live.catalog(tenant)


def _utc(hour: int) -> str:
    return hour_start(hour).isoformat(timespec="minutes")


class Applying:
    """A batch that passed every check, written a slice at a time (``step``), so that a
    shard's event loop can answer queries between slices instead of after the whole
    batch. Slices end where a series' aggregates end: a query of one series sees all
    of the batch's increments for it, or none. Until the last slice nothing but reads
    may touch the state (``ShardState.applying``): no checkpoint may begin with half a
    batch in it and the producer's mark not yet moved, or a crash after it would count
    that half twice when the batch is resent.
    """

    __slots__ = ("state", "batch", "numbers", "rows", "hod", "sums", "where", "producer", "seq",
                 "new", "done", "result")

    def __init__(self, state: ShardState, batch: Batch, numbers: np.ndarray, rows: np.ndarray,
                 hod: np.ndarray, sums: np.ndarray, where: Where, producer: str | None,
                 seq: int | None, new: list[str]) -> None:
        self.state, self.batch = state, batch
        self.numbers = numbers  # the series number of each of the batch's sids
        # where its slots were read: no block of a slice moves before the slice is written,
        # for a slice holds all its series' slots and only a write moves a block
        self.where = where
        self.rows, self.hod, self.sums = rows, hod, sums  # each slot and its total with it
        self.producer, self.seq, self.new = producer, seq, new
        self.done = 0  # aggregates written
        self.result: Ingested | None = None  # once the last slice is written

    def step(self, size: int) -> bool:
        """Write the next slice of at least ``size`` aggregates (to its series' end);
        whether slices remain. After the last one the batch is applied (``result``)."""
        n, a = len(self.sums), self.done
        z = min(a + max(size, 1), n)
        if z < n:  # on to the end of the last series in the slice (series are in order)
            series = self.batch.series
            z = max(z, int(np.searchsorted(series, series[z - 1], side="right")))
        if z > a:
            values = self.batch.values[a:z]
            self.state.blocks.write(self.rows[a:z], self.hod[a:z], self.sums[a:z], values,
                                    block_keys(self.batch, self.numbers, a), self.where.part(a, z))
        self.done = z
        if z < n:
            return True
        self.result = self.state._applied(self)
        return False


def block_keys(batch: Batch, numbers: np.ndarray, offset: int = 0
               ) -> Callable[[np.ndarray], np.ndarray]:
    """The block keys of a batch's aggregates at positions (from ``offset``), as
    ``DayBlocks.write`` asks for them: only for blocks new to the pending table."""
    def keys_of(at: np.ndarray) -> np.ndarray:
        at = at + offset
        g = numbers[batch.series[at].astype(np.intp)]
        return g << DAY_BITS | batch.hours[at] // 24
    return keys_of
