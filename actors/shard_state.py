"""A shard's in-memory state, free of I/O: batches in, checkpoint deltas out.

The shard owns every (series, UTC month) it has touched: it loads the stored
month document once (its *base*), then applies increments on top, so for
those months its totals are complete and a query needs no store round trip.
Months it has never touched are answered from the store alone; the two sets
never overlap, which is what makes a query count each increment once.

Layout, for speed and memory (the hot path is numpy, not a loop per
increment): counts live in one int64 slab of *day blocks*, 24 hours each,
one block per (series, UTC day) that has data; a dict maps ``series << 20 |
day`` to a block. Series are small integers. Changes since the last
checkpoint are summed as they come into a table of *pending* deltas, a row of
24 per block changed since (``_Pending``), so a checkpoint takes the dirty
slots as they are and the dirty bound's count is always exact. A
checkpoint freezes them into an immutable in-flight ``Checkpoint`` that is
retried as it is until the store takes it (the store's ``ck`` guard makes a
retry of a half-applied checkpoint exact); new increments meanwhile start the
next one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np

from tally.actors.history import DEFAULT_BYTES, MISSING, History, Month, peak_of
from tally.checkpoint.store import Checkpoint, MonthDoc, MonthKey, ShardRecord
from tally.wire.batches import INT64_MAX, INT64_MIN, Batch
from tally.wire.series import SeriesKey, matches, parse_series_id
from tally.wire.timeslots import hour_start

NO_SEQ = -1  # the mark of a producer none of whose batches is applied here

# Below this no 24 hours can add up to more than int64 (24 * 2**58 < 2**63).
BIG = 2**58
DAY_BITS = 20  # a block key is series << DAY_BITS | UTC day (days up to year 4840)
RECENT_DAYS = 3  # days whose block rows are also kept in an array per series number
FREE = -1  # the block key of a free row (its series, FREE >> DAY_BITS, is no series)
# A query looks up each (series, day) in the dict, or, when there are more than
# 1/SCAN_RATIO as many of them as used rows, finds them in one numpy pass over every
# row's key: a dict lookup costs ~100 ns, that pass a few ns per row.
SCAN_RATIO = 10
MONTH_BITS = 16  # a loaded-month key is series << MONTH_BITS | months since 1970-01


class _Span(NamedTuple):
    """One UTC month of a query's range: where each queried series' counts for it are.

    Found once per query, then summed with numpy a month at a time (live
    series from their day blocks, stored months from their kept totals)
    rather than copied series by series into a (series x hours) matrix.
    """

    h0: int  # absolute hours [h0, h1) of the month inside the range
    h1: int
    base: int  # the month's first hour
    month_hours: int
    live_rows: list[int]  # positions (in the query's series) of those holding it live
    live_series: list[int]  # their series numbers
    stored: list[tuple[int, Month]]  # (position, stored month) of the others with a document


class SlotOverflow(ValueError):
    """An increment would take a stored slot outside int64; nothing was applied."""

    def __init__(self, aggregate: int, message: str) -> None:
        super().__init__(message)
        self.aggregate = aggregate


class DeltaOverflow(ValueError):
    """An hour's change since the last checkpoint would leave int64 (a checkpoint carries
    it as one int64 increment); nothing was applied. It fits once that checkpoint began."""


def months_of_hours(hours: np.ndarray) -> np.ndarray:
    """Months since 1970-01 of absolute UTC hours (vectorised). numpy's calendar
    conversion costs ~50 ns an element, so a batch's few days are converted once each."""
    days = hours // 24
    if len(days) > 64:
        lo, hi = int(days.min()), int(days.max())
        if hi - lo < len(days):
            months = np.arange(lo, hi + 1).astype("datetime64[D]").astype("datetime64[M]")
            return months.astype(np.int64)[days - lo]
    return days.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)


def month_name(mno: int) -> str:
    return f"{1970 + mno // 12:04d}-{mno % 12 + 1:02d}"


def month_number(month: str) -> int:
    return (int(month[:4]) - 1970) * 12 + int(month[5:7]) - 1


def month_days(mno: int) -> tuple[int, int]:
    """[first, end) UTC days of a month."""
    first = np.array([mno, mno + 1], dtype="datetime64[M]").astype("datetime64[D]")
    return int(first[0].astype(np.int64)), int(first[1].astype(np.int64))


class ShardState:
    def __init__(
        self, shard: int, record: ShardRecord | None = None, max_dirty: int = 0,
        history_bytes: int = DEFAULT_BYTES,
    ) -> None:
        record = record or ShardRecord()
        self.shard = shard
        self.last_ck = record.ck  # highest checkpoint id claimed in the store
        self.durable_ck = record.ck  # highest checkpoint id known durable
        # producer -> highest seq applied here; durable marks are what the
        # store holds. A restarted shard starts with applied == durable.
        self.applied: dict[str, int] = dict(record.producers)
        self.durable: dict[str, int] = dict(record.producers)
        # producer -> (its last applied seq, the mark before it): what revert may undo
        self._undo: dict[str, tuple[int, int | None]] = {}
        self.max_dirty = max_dirty  # 0: unbounded
        self.inflight: Checkpoint | None = None
        self.inflight_count = 0
        self.unrecorded: set[str] = set()  # series no checkpoint has recorded in the catalog yet
        self.increments = 0  # applied since start, for stats

        # series: small integers, recycled after eviction
        self.series: dict[str, int] = {}  # sid -> series number
        self._keys: list[SeriesKey | None] = []
        self._sids: list[str | None] = []
        self._free_series: list[int] = []
        self._months_held = np.zeros(0, dtype=np.int32)  # per series: months loaded
        self.by_metric: dict[tuple[str, str], set[int]] = {}
        self._loaded: dict[int, set[int]] = {}  # month number -> series holding it
        self._match_cache: dict[tuple, list[int]] = {}
        self.history = History(history_bytes)  # stored months other than those loaded

        # counts: day blocks of 24 hours
        self._blocks = np.zeros((1024, 24), dtype=np.int64)
        self._block_of: dict[int, int] = {}  # series << DAY_BITS | day -> block row
        # the same for the most recent days, as int32 arrays by series number (-1: not known
        # here, ask the dict): an ingest finds its rows with numpy, not a lookup each
        self._recent: dict[int, np.ndarray] = {}
        self._block_key = np.zeros(1024, dtype=np.int64)  # block row -> its key
        self._free_blocks: list[int] = []
        self._used_blocks = 0
        self._big: set[int] = set()  # blocks holding an hour beyond BIG

        # deltas since the last begin_checkpoint, summed per slot as batches apply
        self._pending = _Pending(len(self._blocks))
        self._promised = False  # _holding_ck answered last_ck + 1 since the last begin
        self._unsettled: _Taken | None = None  # the in-flight checkpoint's slots, not named yet

    # ---- series and months ---------------------------------------------

    def _series_numbers(self, sids: list[str]) -> np.ndarray:
        # map() with a repeated default looks each up in C: no Python frame per sid
        return np.fromiter(map(self.series.get, sids, repeat(-1)), np.int64, len(sids))

    def _add_series(self, sid: str) -> int:
        key = parse_series_id(sid)
        if self._free_series:
            g = self._free_series.pop()
            self._keys[g], self._sids[g] = key, sid
        else:
            g = len(self._keys)
            self._keys.append(key)
            self._sids.append(sid)
            if g >= len(self._months_held):
                self._months_held = np.concatenate(
                    [self._months_held, np.zeros(max(1024, g), np.int32)]
                )
        self._months_held[g] = 0
        self.series[sid] = g
        self.by_metric.setdefault((key.tenant, key.metric), set()).add(g)
        self._match_cache.clear()
        self.unrecorded.add(sid)
        return g

    def missing(self, batch: Batch, numbers: np.ndarray | None = None) -> list[MonthKey]:
        """(series, month) pairs of the batch whose stored base is not loaded yet;
        ``numbers``: the series numbers of its sids, if known."""
        if not len(batch):
            return []
        if numbers is None:
            numbers = self._series_numbers(batch.sids)
        if self._all_loaded(batch, numbers):
            return []
        numbers = numbers.tolist()
        local = batch.series.astype(np.int64)
        pairs = np.unique(local << MONTH_BITS | months_of_hours(batch.hours))
        low = (1 << MONTH_BITS) - 1
        loaded = self._loaded
        out: list[MonthKey] = []
        for p in pairs.tolist():
            s, m = p >> MONTH_BITS, p & low
            g = numbers[s]
            if g < 0 or g not in loaded.get(m, ()):
                out.append((batch.sids[s], month_name(m)))
        return out

    def _all_loaded(self, batch: Batch, numbers: np.ndarray) -> bool:
        """Whether every (series, month) of the batch is loaded: set containment in C, a
        month at a time, rather than a Python step per pair (the usual batch: yes)."""
        if len(numbers) and int(numbers.min()) < 0:
            return False
        held = numbers[batch.series.astype(np.intp)]
        months = months_of_hours(batch.hours)
        first = int(months[0])
        if (months == first).all():  # the usual batch: the current month only
            per_month = [(first, held)]
        else:
            per_month = [(m, held[months == m]) for m in np.unique(months).tolist()]
        loaded = self._loaded
        return all(m in loaded and loaded[m].issuperset(g.tolist()) for m, g in per_month)

    def install(self, keys: Iterable[MonthKey], docs: dict[MonthKey, MonthDoc]) -> None:
        """Take stored bases for ``keys``; a key already present is kept (it is newer)."""
        for sid, month in keys:
            g = self.series.get(sid)
            if g is None:
                g = self._add_series(sid)
            mno = month_number(month)
            holders = self._loaded.setdefault(mno, set())
            if g in holders:
                continue
            holders.add(g)
            self.history.drop((sid, mno))  # live from now on; the copy would go stale
            self._months_held[g] += 1
            doc = docs.get((sid, month))
            if doc is None or not doc.hours:
                continue
            for hour, total in doc.hours.items():
                row = self._block(g << DAY_BITS | hour // 24)
                self._blocks[row, hour % 24] = total
                if abs(total) > BIG:
                    self._big.add(row)

    def _block(self, key: int) -> int:
        row = self._block_of.get(key)
        if row is None:
            if self._free_blocks:
                row = self._free_blocks.pop()
            else:
                row = self._used_blocks
                if row == len(self._blocks):
                    self._reserve(1)
                self._used_blocks += 1
            self._block_of[key] = row
            self._block_key[row] = key
        return row

    def _reserve(self, more: int) -> None:
        """Room in the slab for ``more`` new blocks (free rows are taken first).

        It grows by a quarter (at least 1024 rows), or at once to what a batch
        needs when that is more: a batch of many new series then costs one copy,
        not one per quarter, and leaves no quarter of slack behind it (two day
        blocks are ~400 of the ~1,700 bytes a series-month holds). A large slab
        is calloc'd from fresh pages: rows not used yet take no resident memory.
        """
        need = self._used_blocks + max(0, more - len(self._free_blocks))
        size = len(self._blocks)
        if need <= size:
            return
        size = max(need, size + max(1024, size // 4))
        blocks = np.zeros((size, 24), np.int64)
        blocks[: len(self._blocks)] = self._blocks
        block_key = np.zeros(size, np.int64)
        block_key[: len(self._block_key)] = self._block_key
        self._blocks, self._block_key = blocks, block_key
        self._pending.reserve(size)

    def _rows(self, keys: np.ndarray) -> np.ndarray:
        """Block rows for block keys, creating missing blocks (a key may repeat: the
        hours of one series-day). Each key is looked up in C; only the missing ones are
        made distinct (``np.unique`` costs more than the lookups)."""
        rows = np.fromiter(map(self._block_of.get, keys.tolist(), repeat(-1)), np.int64,
                           len(keys))
        missing = rows < 0
        if missing.any():
            uniq, inverse = np.unique(keys[missing], return_inverse=True)
            self._reserve(len(uniq))
            block = self._block
            made = np.fromiter((block(k) for k in uniq.tolist()), np.int64, len(uniq))
            rows[missing] = made[inverse.reshape(-1)]
        return rows

    # ---- applying ------------------------------------------------------

    def ingest(
        self,
        batch: Batch,
        load: Callable[[list[MonthKey]], dict[MonthKey, MonthDoc]],
        producer: str | None = None,
        seq: int | None = None,
        expect: int | None = None,
    ) -> dict[str, Any]:
        """Apply a batch once per (producer, seq); the answer says what happened.

        ``{"status": "applied" | "duplicate", "ck": n}``, where ``n`` is the
        checkpoint that makes it durable (an applied batch that brought series
        this shard did not hold also lists them under ``"new"``), or a refusal
        ``{"code", "message"}``.
        A producer's batches reach every shard in seq order (the gateway sends
        each one to all shards, empty where it has no rows there), so a seq at
        or below this shard's mark is a resend. ``expect`` is the seq the
        gateway sent before this one: a mark that differs means this shard
        lost batches (it restarted) and must not skip past them.

        Callers must not let other calls touch this state between the load and
        the apply (the shard actor calls ``load`` synchronously), or a stale
        base could be installed over newer counts.
        """
        if producer is not None:
            assert seq is not None
            mark = self.applied.get(producer)
            if mark is not None and seq <= mark:
                # Another connection of the producer (a resend after a failover)
                # is told its batch is here: from now on it must stay, whatever
                # the connection that applied it meets on the other shards.
                self._undo.pop(producer, None)
                return {"status": "duplicate", "ck": self._holding_ck(producer)}
            if expect is not None and mark != expect:
                return {
                    "code": "gap",
                    "message": f"shard {self.shard} holds {producer!r} up to seq {mark}, "
                    f"not {expect}: it restarted; resend from the last durable seq",
                }
        # Room for the batch twice: if another shard refuses its part, undoing
        # it here may add as many slots again (when a checkpoint took the
        # originals meanwhile), and an undo cannot be refused. An empty shard
        # takes any batch, so a batch larger than half the bound still passes.
        if self.max_dirty and self._over_bound(len(batch)):
            return {
                "code": "overloaded",
                "message": f"shard {self.shard} holds {self.dirty_slots} slots not yet "
                f"checkpointed (bound {self.max_dirty}); retry later",
            }
        numbers: np.ndarray | None = self._series_numbers(batch.sids)
        missing = self.missing(batch, numbers)
        new: list[str] = []
        if missing:
            numbers = None  # series are installed: their numbers change
            try:
                docs = load(missing)
            except Exception as e:  # the store is down: refuse, the client backs off and resends
                return {"code": "overloaded", "message": f"store unavailable: {e}"}
            known = self.series
            new = list(dict.fromkeys(sid for sid, _ in missing if sid not in known))
            self.install(missing, docs)
        try:
            self.apply(batch, numbers)
        except SlotOverflow as e:
            return {"code": "bad_row", "aggregate": e.aggregate, "message": str(e)}
        except DeltaOverflow as e:
            return {"code": "overloaded", "message": str(e)}
        if producer is not None:
            self._undo[producer] = (seq, self.applied.get(producer))  # type: ignore[assignment]
            self.applied[producer] = seq  # type: ignore[assignment]
        answer: dict[str, Any] = {"status": "applied", "ck": self._holding_ck(producer)}
        if new:
            # series this shard did not hold: other gateways' series indexes must hear of them
            answer["new"] = new
        return answer

    def _over_bound(self, size: int) -> bool:
        used = self.dirty_slots
        return bool(used) and used + 2 * size > self.max_dirty

    def _holding_ck(self, producer: str | None) -> int:
        """The checkpoint by which everything applied so far is durable.

        Never one that will not happen: a waiter for it would wait forever.
        """
        if self._pending.rows or self.unrecorded:  # (changes that may sum to nothing too)
            return self._promise()
        if producer is not None:
            # the mark the store will hold once the in-flight checkpoint lands (it may
            # carry a lower one: a batch undone after an earlier checkpoint took it)
            pending = self.inflight.producers if self.inflight is not None else {}
            if pending.get(producer, self.durable.get(producer)) != self.applied.get(producer):
                return self._promise()
        if self.inflight is not None:
            return self.inflight.ck
        return self.durable_ck

    def _promise(self) -> int:
        """The next checkpoint id, which begin_checkpoint then takes even if empty."""
        self._promised = True
        return self.last_ck + 1

    def _locate(self, batch: Batch, numbers: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Block rows and hours of day of a batch's aggregates (all months loaded)."""
        if numbers is None:
            numbers = self._series_numbers(batch.sids)
        g = numbers[batch.series.astype(np.intp)]
        if (g < 0).any():
            raise RuntimeError("a batch's series must be installed before it is applied")
        hours = batch.hours
        days = hours // 24
        rows = self._recent_rows(g, days)
        missed = rows < 0
        if missed.any():
            g, days = g[missed], days[missed]
            found = self._rows(g << DAY_BITS | days)
            rows[missed] = found
            for day, table in self._recent.items():  # (known from now on)
                mine = days == day
                table[g[mine]] = found[mine]
        return rows, hours % 24

    def _recent_rows(self, g: np.ndarray, days: np.ndarray) -> np.ndarray:
        """Block rows of (series, day) pairs from the recent days' arrays; -1 where they
        do not know it. A day newer than those kept gets an array (the oldest goes)."""
        rows = np.full(len(g), -1, np.int64)
        if not len(g):
            return rows
        newest = int(days.max())
        for day in range(max(int(days.min()), newest - RECENT_DAYS + 1), newest + 1):
            if day not in self._recent and (len(self._recent) < RECENT_DAYS
                                            or day > min(self._recent)):
                if len(self._recent) == RECENT_DAYS:
                    del self._recent[min(self._recent)]
                self._recent[day] = np.full(max(len(self._keys), 1024), -1, np.int32)
        size = len(self._keys)
        for day, table in list(self._recent.items()):
            if len(table) < size:  # series added since: room for them, unknown yet
                grown = np.full(max(size, len(table) + len(table) // 2), -1, np.int32)
                grown[:len(table)] = table
                self._recent[day] = table = grown
            mine = days == day
            rows[mine] = table[g[mine]]
        return rows

    def _forget_recent(self, g: int, day: int) -> None:
        """A block row freed (evicted): the recent days' arrays must not point at it (a
        dropped series' number is reused only once each of its rows was forgotten)."""
        table = self._recent.get(day)
        if table is not None and g < len(table):
            table[g] = -1

    def apply(self, batch: Batch, numbers: np.ndarray | None = None) -> None:
        """All or nothing: checks every slot for int64 overflow before changing any.
        ``numbers``: the series numbers of the batch's sids, if known."""
        if not len(batch):
            return
        rows, hod = self._locate(batch, numbers)
        values = batch.values
        old = self._blocks[rows, hod]
        with np.errstate(over="ignore"):
            new = old + values
        wrapped = ((values > 0) & (new < old)) | ((values < 0) & (new > old))
        bad: list[tuple[int, str]] = []
        for n in np.flatnonzero(wrapped).tolist():
            total = int(old[n]) + int(values[n])
            bad.append((n, f"series {batch.sids[int(batch.series[n])]!r} at "
                           f"{_utc(int(batch.hours[n]))}: the hour's total {total} "
                           "would leave int64"))
        big = _beyond_big(new)
        if self._big:
            big |= np.isin(rows, np.fromiter(self._big, np.int64, len(self._big)))
        if big.any() and not bad:
            bad = self._day_overflows(batch, rows, hod, np.flatnonzero(big))
        if bad:
            # (blocks the batch created stay, all zero, until their month is evicted)
            n, message = min(bad, key=lambda b: int(batch.first_row[b[0]]))
            raise SlotOverflow(n, message)
        if big.any():  # (a change beyond int64 needs an hour beyond BIG, then or now)
            moved = self._pending.overflows(rows, hod, values)
            if len(moved):
                n = int(moved[0])
                raise DeltaOverflow(
                    f"shard {self.shard}: series {batch.sids[int(batch.series[n])]!r} at "
                    f"{_utc(int(batch.hours[n]))}: the hour's change since the last "
                    "checkpoint would leave int64; retry after the next checkpoint")
        self._blocks[rows, hod] = new
        self._big.update(rows[_beyond_big(new)].tolist())
        self._add_pending(rows, hod, values)
        self.increments += batch.increments

    def _day_overflows(
        self, batch: Batch, rows: np.ndarray, hod: np.ndarray, near: np.ndarray
    ) -> list[tuple[int, str]]:
        """Aggregates whose UTC day total (stored plus this batch) would leave int64."""
        added: dict[int, int] = {}
        for r, v in zip(rows.tolist(), batch.values.tolist(), strict=True):
            added[r] = added.get(r, 0) + v
        bad = []
        for n in near.tolist():
            r = int(rows[n])
            total = sum(int(x) for x in self._blocks[r].tolist()) + added[r]
            if not INT64_MIN <= total <= INT64_MAX:
                day = int(batch.hours[n]) // 24
                bad.append((n, f"series {batch.sids[int(batch.series[n])]!r} on "
                               f"{_utc(day * 24)[:10]}: the day's total {total} "
                               "would leave int64"))
        return bad

    def _add_pending(self, rows: np.ndarray, hod: np.ndarray, values: np.ndarray) -> None:
        nonzero = values != 0
        if not nonzero.all():
            rows, hod, values = rows[nonzero], hod[nonzero], values[nonzero]
        if len(rows):
            self._pending.add(rows, hod, values)

    def revert(
        self,
        batch: Batch,
        load: Callable[[list[MonthKey]], dict[MonthKey, MonthDoc]],
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
        if producer is not None:
            undo = self._undo.get(producer)
            if undo is None or undo[0] != seq:
                return False
        missing = self.missing(batch)
        if missing:
            self.install(missing, load(missing))
        if producer is not None:
            # The mark goes back too, and the next checkpoint records the lower
            # mark (marks are set, not maxed): the client resends this seq and
            # it must apply here again, also after a restart.
            _, previous = self._undo.pop(producer)
            self.applied[producer] = NO_SEQ if previous is None else previous
        if not len(batch):
            return True
        rows, hod = self._locate(batch)
        old = self._blocks[rows, hod]
        values = -batch.values
        with np.errstate(over="ignore"):
            new = old + values
        if (((values > 0) & (new < old)) | ((values < 0) & (new > old))).any():
            # Only possible if other batches moved the slot to within a batch of
            # the limit meanwhile; an undo cannot be refused, and must not wrap.
            raise RuntimeError(f"shard {self.shard}: undoing a batch would leave int64")
        self._blocks[rows, hod] = new
        self._big.update(rows[_beyond_big(new)].tolist())
        self._add_pending(rows, hod, values)
        self.increments -= batch.increments
        return True

    # ---- checkpoints ---------------------------------------------------

    def begin_checkpoint(self, settle_later: bool = False) -> Checkpoint | None:
        """The checkpoint to write next: the unfinished one again, else the dirty deltas.

        With ``settle_later`` the dirty slots are only taken: naming them per
        document (a dict entry per slot) is left to ``settle_checkpoint`` on the
        writer thread, so queries do not wait for it on the event loop.
        """
        if self.inflight is not None:
            return self.inflight
        rows, hod, vals = self._pending.take()
        taken = _Taken(rows, hod, vals, self._block_key[rows])
        producers = {p: s for p, s in self.applied.items() if self.durable.get(p) != s}
        # A waiter may hold the promise of this checkpoint: it happens even if
        # the deltas summed to nothing meanwhile (a batch and its undo).
        promised, self._promised = self._promised, False
        if not len(taken.rows) and not self.unrecorded and not producers and not promised:
            return None
        self.last_ck += 1
        self.inflight = Checkpoint(
            shard=self.shard,
            ck=self.last_ck,
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

    def _settle(self, taken: _Taken) -> None:
        assert self.inflight is not None
        self.inflight.deltas = self._deltas(taken.keys, taken.hod, taken.vals)

    def _deltas(
        self, keys: np.ndarray, hod: np.ndarray, summed: np.ndarray
    ) -> dict[MonthKey, dict[int, int]]:
        """Folded slots as ``(sid, month) -> {absolute hour: delta}``, built per document.

        A checkpoint can hold hundreds of thousands of slots. Grouping them by
        document with numpy and sharing one int object per distinct hour keeps
        the per-slot Python work to a dict entry: a loop per slot would make
        several int objects per slot (series, month, hour), and that churn of
        small objects is what leaves the allocator's arenas pinned (resident)
        after the checkpoint is gone.
        """
        deltas: dict[MonthKey, dict[int, int]] = {}
        if not len(keys):
            return deltas
        hours = (keys & ((1 << DAY_BITS) - 1)) * 24 + hod
        docs = (keys >> DAY_BITS) << MONTH_BITS | months_of_hours(hours)
        order = np.lexsort((hours, docs))
        docs, hours, summed = docs[order], hours[order], summed[order]
        starts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
        ends = np.r_[starts[1:], len(docs)]
        distinct, which = np.unique(hours, return_inverse=True)
        shared = np.empty(len(distinct), dtype=object)
        shared[:] = distinct.tolist()
        hour_objs = shared[which.reshape(-1)].tolist()  # references to the shared ints
        values = summed.tolist()
        low = (1 << MONTH_BITS) - 1
        names: dict[int, str] = {}
        sids = self._sids
        for doc, a, b in zip(docs[starts].tolist(), starts.tolist(), ends.tolist(), strict=True):
            m = doc & low
            name = names.get(m)
            if name is None:
                name = names[m] = month_name(m)
            deltas[(sids[doc >> MONTH_BITS], name)] = dict(  # type: ignore[index]
                zip(hour_objs[a:b], values[a:b], strict=True)
            )
        return deltas

    def finish_checkpoint(self, ck: int) -> None:
        if self.inflight is None or self.inflight.ck != ck:
            raise RuntimeError(f"checkpoint {ck} is not the one in flight")
        self.durable.update(self.inflight.producers)
        self.durable_ck = ck
        self.inflight = None
        self.inflight_count = 0

    def evict(self, current_month: str) -> int:
        """Forget clean months other than the current one; the store has them."""
        current = month_number(current_month)
        others = [m for m in self._loaded if m != current]
        if not others:
            return 0
        self.settle_checkpoint()  # its series must be named before a number is reused
        busy: set[tuple[int, int]] = set()
        if self._pending.rows:  # (blocks changed since the last checkpoint, even to nothing)
            keys = self._block_key[self._pending.block_rows()]
            mnos = months_of_hours((keys & ((1 << DAY_BITS) - 1)) * 24)
            busy.update(zip((keys >> DAY_BITS).tolist(), mnos.tolist(), strict=True))
        if self.inflight is not None:
            busy.update((self.series[sid], month_number(m)) for sid, m in self.inflight.deltas
                        if sid in self.series)
        evicted = 0
        for m in others:
            holders = self._loaded[m]
            first, end = month_days(m)
            for g in [g for g in holders if (g, m) not in busy]:
                holders.discard(g)
                evicted += 1
                base = g << DAY_BITS
                for day in range(first, end):
                    row = self._block_of.pop(base | day, None)
                    if row is not None:
                        self._forget_recent(g, day)
                        self._blocks[row] = 0
                        self._block_key[row] = FREE  # a scan of the keys must not find it
                        self._big.discard(row)
                        self._free_blocks.append(row)
                self._months_held[g] -= 1
                if self._months_held[g] == 0 and self._sids[g] not in self.unrecorded:
                    self._drop_series(g)
            if not holders:
                del self._loaded[m]
        return evicted

    def _drop_series(self, g: int) -> None:
        key, sid = self._keys[g], self._sids[g]
        assert key is not None and sid is not None
        del self.series[sid]
        members = self.by_metric[(key.tenant, key.metric)]
        members.discard(g)
        if not members:
            del self.by_metric[(key.tenant, key.metric)]
        self._keys[g] = self._sids[g] = None
        self._free_series.append(g)
        self._match_cache.clear()

    @property
    def dirty_slots(self) -> int:
        return self._pending.slots + self.inflight_count

    @property
    def series_months(self) -> int:
        return sum(len(h) for h in self._loaded.values())

    # ---- queries -------------------------------------------------------

    def _matching(self, tenant: str, metric: str, where: dict[str, str]) -> list[int]:
        ck = (tenant, metric, tuple(sorted(where.items())))
        found = self._match_cache.get(ck)
        if found is None:
            keys = self._keys
            found = sorted(
                g for g in self.by_metric.get((tenant, metric), ())
                if matches(keys[g].tags, where)  # type: ignore[union-attr]
            )
            if len(self._match_cache) > 10_000:
                self._match_cache.clear()
            self._match_cache[ck] = found
        return found

    def _gather(
        self, tenant: str, metric: str, where: dict[str, str], h0: int, h1: int
    ) -> tuple[list[int], np.ndarray, list[MonthKey]]:
        """Matching series, their counts per hour of [h0, h1) (series x hours), months held.

        Live months only: what this shard holds in memory (the model test and tools read
        it; queries use ``per_hour``, which answers stored months too)."""
        series = self._matching(tenant, metric, where)
        d0, d1 = h0 // 24, (h1 - 1) // 24 + 1
        first_m = int(months_of_hours(np.array([h0]))[0])
        last_m = int(months_of_hours(np.array([h1 - 1]))[0])
        covered: list[MonthKey] = []
        held: list[int] = []
        for m in range(first_m, last_m + 1):
            holders = self._loaded.get(m)
            if not holders:
                continue
            name = month_name(m)
            for g in series:
                if g in holders:
                    covered.append((self._sids[g], name))  # type: ignore[arg-type]
                    held.append(g)
        if not held:
            return [], np.zeros((0, h1 - h0), np.int64), covered
        uniq = sorted(set(held))
        per_hour = self._day_counts(uniq, d0, d1)
        start = h0 - d0 * 24
        return uniq, per_hour[:, start:start + (h1 - h0)], covered

    def hourly(
        self, tenant: str, metric: str, where: dict[str, str], h0: int, h1: int
    ) -> tuple[np.ndarray, list[MonthKey]]:
        """Summed counts per hour of [h0, h1) over matching series, and the months covered."""
        _, per_hour, covered = self._gather(tenant, metric, where, h0, h1)
        return exact_sum(per_hour, axis=0), covered

    def totals(
        self, tenant: str, metric: str, where: dict[str, str], h0: int, h1: int
    ) -> tuple[dict[str, int], list[MonthKey]]:
        """Per-series totals over [h0, h1), and the months covered."""
        series, per_hour, covered = self._gather(tenant, metric, where, h0, h1)
        sums = exact_sum(per_hour, axis=1).tolist()
        sids = self._sids
        return {sids[g]: s for g, s in zip(series, sums, strict=True)}, covered  # type: ignore

    def series_of(self, tenant: str, metric: str) -> list[str]:
        """The metric's series this shard holds live (the store's catalog may lag behind)."""
        sids = self._sids
        return [sids[g] for g in self.by_metric.get((tenant, metric), ())]  # type: ignore[misc]

    def per_hour(
        self, sids: list[str], h0: int, h1: int,
        load: Callable[[list[MonthKey]], dict[MonthKey, MonthDoc]],
    ) -> np.ndarray:
        """Counts per hour of [h0, h1) of each of ``sids`` (one row each), stored months included.

        The gateway sends a series only to the shard that owns it, so this
        answers for every month: those held live from their blocks, the others
        from ``self.history`` or, the first time, the store. Like ``ingest``,
        ``load`` runs synchronously: nothing may touch the state between finding
        a month not held and using what was read.
        """
        return self._dense(self._spans(sids, h0, h1, load), len(sids), h0, h1)

    def _spans(
        self, sids: list[str], h0: int, h1: int,
        load: Callable[[list[MonthKey]], dict[MonthKey, MonthDoc]],
    ) -> list[_Span]:
        """Per UTC month of [h0, h1): which of ``sids`` it holds live, the stored months of
        the others (read from the store the first time, see ``per_hour``)."""
        if h1 <= h0:
            return []
        get_series, history = self.series.get, self.history
        numbers = [get_series(sid) for sid in sids]  # once per call, not once per month
        first_m, last_m = months_of_hours(np.array([h0, h1 - 1])).tolist()
        spans: list[_Span] = []
        # per month some of sids do not hold live: (span, month, positions or None: all)
        wanted: list[tuple[int, int, set[int] | None]] = []
        for m in range(first_m, last_m + 1):
            m_first, m_end = month_days(m)
            span = _Span(max(h0, m_first * 24), min(h1, m_end * 24), m_first * 24,
                         (m_end - m_first) * 24, [], [], [])
            spans.append(span)
            holders = self._loaded.get(m)
            if not holders or holders.isdisjoint(numbers):  # none live: a stored month
                wanted.append((len(spans) - 1, m, None))
            elif holders.issuperset(numbers):  # all live: the current month, usually
                span.live_rows.extend(range(len(sids)))
                span.live_series.extend(numbers)  # type: ignore[arg-type]
            else:
                rest: set[int] = set()
                for i, g in enumerate(numbers):
                    if g in holders:
                        span.live_rows.append(i)
                        span.live_series.append(g)  # type: ignore[arg-type]
                    else:
                        rest.add(i)
                wanted.append((len(spans) - 1, m, rest))
        need: list[tuple[int, int, str, int]] = []  # (span, position, sid, month)
        if wanted:
            # one lookup per series for all its months, not one per series and month
            asked = 0
            for i, sid in enumerate(sids):
                kept = history.months(sid)
                for k, m, only in wanted:
                    if only is not None and i not in only:
                        continue
                    asked += 1
                    month = kept.get(m, MISSING)
                    if month is MISSING:
                        need.append((k, i, sid, m))
                    elif month is not None:
                        spans[k].stored.append((i, month))  # type: ignore[arg-type]
            history.count(hits=asked - len(need), misses=len(need))
            need.sort()  # the store is asked month by month, as the months are found
        if need:
            keys = list(dict.fromkeys((sid, month_name(m)) for _, _, sid, m in need))
            docs = load(keys)
            for k, i, sid, m in need:
                span = spans[k]
                doc = docs.get((sid, month_name(m)))
                hours = None
                if doc is not None and doc.hours:
                    hours = np.zeros(span.month_hours, np.int64)
                    for h, v in doc.hours.items():
                        hours[h - span.base] = v
                month = history.put((sid, m), hours)
                if month is not None:
                    span.stored.append((i, month))
        return spans

    def _dense(self, spans: list[_Span], n: int, h0: int, h1: int) -> np.ndarray:
        """The (series x hours of [h0, h1)) matrix of what ``_spans`` found."""
        out = np.zeros((n, h1 - h0), np.int64)
        for sp in spans:
            cols = slice(sp.h0 - h0, sp.h1 - h0)
            if sp.live_rows:
                out[sp.live_rows, cols] = self._live_hours(sp.live_series, sp.h0, sp.h1)
            a, b = sp.h0 - sp.base, sp.h1 - sp.base
            for i, month in sp.stored:
                out[i, cols] = month.hours[a:b]
        return out

    def _block_rows(self, series: list[int], lo: int, hi: int) -> np.ndarray:
        """Block rows of days [lo, hi) of each series (series x days), -1 where none."""
        n, days = len(series), hi - lo
        used = self._used_blocks
        if n * days * SCAN_RATIO > used:
            # Many (a breakdown over most of the shard): scan every row's key instead.
            numbers = np.array(series, np.int64)
            # series number -> its position in ``series``; the extra last slot (-1) is
            # what a free row's key (FREE) finds
            position = np.full(len(self._keys) + 1, -1, np.int64)
            position[numbers] = np.arange(n)
            if (position[numbers] == np.arange(n)).all():  # (a series asked twice: lookups)
                keys = self._block_key[:used]
                at = position[keys >> DAY_BITS]
                day = (keys & ((1 << DAY_BITS) - 1)) - lo
                found = np.flatnonzero((at >= 0) & (day >= 0) & (day < days))
                rows = np.full(n * days, -1, np.int64)
                rows[at[found] * days + day[found]] = found
                return rows.reshape(n, days)
        span = np.arange(lo, hi, dtype=np.int64)
        keys = (np.array(series, np.int64)[:, None] << DAY_BITS | span[None, :]).ravel().tolist()
        rows = np.fromiter(map(self._block_of.get, keys, repeat(-1)), np.int64, len(keys))
        return rows.reshape(n, days)

    def _day_counts(self, series: list[int], lo: int, hi: int) -> np.ndarray:
        """Counts of days [lo, hi) of each series, one row of (hi - lo) * 24 hours per series."""
        rows = self._block_rows(series, lo, hi).ravel()
        present = rows >= 0
        counts = np.zeros((len(rows), 24), np.int64)
        counts[present] = self._blocks[rows[present]]
        return counts.reshape(len(series), (hi - lo) * 24)

    def _live_hours(self, series: list[int], a: int, b: int) -> np.ndarray:
        """Counts per hour of [a, b) (one month at most) of series holding it live."""
        lo, hi = a // 24, (b - 1) // 24 + 1
        return self._day_counts(series, lo, hi)[:, a - lo * 24:b - lo * 24]

    def _live_totals(self, series: list[int], a: int, b: int, limit: int) -> np.ndarray | None:
        """Each series' total over hours [a, b) (one month at most) from its day blocks,
        without the (series x hours) matrix; None if a count beyond ``limit`` could make
        an int64 sum inexact (the caller then sums exactly)."""
        lo, hi = a // 24, (b - 1) // 24 + 1
        rows = self._block_rows(series, lo, hi)
        present = rows >= 0
        found = rows[present]
        per_day = np.zeros(rows.shape, np.int64)
        if not len(found):
            return per_day.sum(axis=1)
        blocks = self._blocks[found]
        if peak_of(blocks) > limit:
            return None
        sums = np.einsum("ij->i", blocks)  # int64 like .sum(axis=1), twice as fast on rows of 24
        # the range may start or end inside a day: take those hours back out
        skip, stop = a - lo * 24, b - (hi - 1) * 24
        if skip or stop < 24:
            day = np.nonzero(present)[1]
            if skip:
                first = day == 0
                sums[first] -= blocks[first, :skip].sum(axis=1)
            if stop < 24:
                last = day == hi - lo - 1
                sums[last] -= blocks[last, stop:].sum(axis=1)
        per_day[present] = sums
        return per_day.sum(axis=1)

    def hourly_of(
        self, sids: list[str], h0: int, h1: int,
        load: Callable[[list[MonthKey]], dict[MonthKey, MonthDoc]],
    ) -> np.ndarray:
        """Counts per hour of [h0, h1), summed over ``sids`` (exact: Python ints past int64).

        The same answer, dtype included, as ``exact_sum(per_hour(...), axis=0)``, summed
        month by month without the (series x hours) matrix: int64 exactly when every
        count is within ``limit``, else (rare: counts beyond 2**63 / series) that way.
        """
        spans = self._spans(sids, h0, h1, load)
        n = len(sids)

        def exact() -> np.ndarray:
            return exact_sum(self._dense(spans, n, h0, h1), axis=0)

        if not n or h1 <= h0:
            return exact()
        limit = (2**63 - 1) // n  # peak * n < 2**63: no column sum can leave int64
        out = np.zeros(h1 - h0, np.int64)
        for sp in spans:
            cols = slice(sp.h0 - h0, sp.h1 - h0)
            if sp.live_rows:
                counts = self._live_hours(sp.live_series, sp.h0, sp.h1)
                if peak_of(counts) > limit:
                    return exact()
                out[cols] += counts.sum(axis=0)
            if sp.stored:
                a, b = sp.h0 - sp.base, sp.h1 - sp.base
                counts = np.vstack([month.hours[a:b] for _, month in sp.stored])
                if b - a == sp.month_hours:
                    peak = max(month.peak for _, month in sp.stored)
                else:
                    peak = peak_of(counts)
                if peak > limit:
                    return exact()
                out[cols] += counts.sum(axis=0)
        return out

    def totals_of(
        self, sids: list[str], h0: int, h1: int,
        load: Callable[[list[MonthKey]], dict[MonthKey, MonthDoc]],
    ) -> list[int]:
        """Each series' total over [h0, h1), in ``sids`` order.

        Summed month by month (a stored month the range covers whole is its kept
        total), in int64 when every count read is within ``limit``: then no partial
        sum (of at most the days the range touches, 24 hours each) can leave int64.
        Else (rare: counts near 2**63 / hours) exactly from the (series x hours) matrix.
        """
        spans = self._spans(sids, h0, h1, load)
        n = len(sids)

        def exact() -> list[int]:
            return exact_sum(self._dense(spans, n, h0, h1), axis=1).tolist()

        if not n or h1 <= h0:
            return exact()
        limit = (2**63 - 1) // (24 * ((h1 - 1) // 24 + 1 - h0 // 24))
        totals = np.zeros(n, np.int64)
        for sp in spans:
            if sp.live_rows:
                live = self._live_totals(sp.live_series, sp.h0, sp.h1, limit)
                if live is None:
                    return exact()
                totals[sp.live_rows] += live
            if sp.stored:
                if max(month.peak for _, month in sp.stored) > limit:
                    return exact()
                rows = [i for i, _ in sp.stored]
                a, b = sp.h0 - sp.base, sp.h1 - sp.base
                if b - a == sp.month_hours:
                    totals[rows] += np.fromiter(
                        (month.total for _, month in sp.stored), np.int64, len(rows))
                else:
                    totals[rows] += np.vstack(
                        [month.hours[a:b] for _, month in sp.stored]).sum(axis=1)
        return totals.tolist()

    def catalog(self, tenant: str) -> list[str]:
        sids = self._sids
        return [sids[g] for (t, _), members in self.by_metric.items() if t == tenant  # type: ignore
                for g in members]


class _Pending:
    """Deltas since the last checkpoint, summed per (block row, hour of day) as batches
    apply: a row of 24 for each block changed since, found by block row.

    A log of every batch's aggregates, summed when a checkpoint began, cost a
    shard more than a tenth of its time at 1.5 M increments/s: ~750,000 entries
    per shard per checkpoint, in fresh arrays whose pages the kernel zeroes,
    summed into a few thousand slots. Here an aggregate costs one add into a
    slot, and a checkpoint takes the few thousand as they are. A slot's delta
    that leaves int64 (its hour's total, which stays within int64, moved by
    more than 2**63 since the last checkpoint) refuses the batch (``overflows``),
    but an undo cannot be refused: its delta is kept exactly, as a Python int in
    ``wide``, its table entry 0 (the store refuses that checkpoint, see
    checkpoint/layout.py, and the shard reports it until an operator acts).
    """

    __slots__ = ("table", "at", "block", "rows", "slots", "wide")

    def __init__(self, blocks: int) -> None:
        self.table = np.zeros((_PENDING_ROWS, 24), np.int64)
        self.at = np.full(blocks, -1, np.int32)  # block row -> its row of table, -1: none
        self.block = np.zeros(_PENDING_ROWS, np.int64)  # row of table -> its block row
        self.rows = 0  # rows of table in use
        self.slots = 0  # nonzero entries of table and of wide
        self.wide: dict[int, int] = {}  # row of table * 24 + hour of day -> delta

    def reserve(self, blocks: int) -> None:
        """The block slab grew to ``blocks`` rows."""
        if blocks > len(self.at):
            at = np.full(blocks, -1, np.int32)
            at[:len(self.at)] = self.at
            self.at = at

    def block_rows(self) -> np.ndarray:
        return self.block[:self.rows]

    def _before(self, rows: np.ndarray, hod: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of table of block ``rows`` (-1: none yet) and the deltas at ``hod``."""
        at = self.at[rows]
        known = at >= 0
        if known.all():
            return at, self.table[at, hod]
        before = np.zeros(len(at), np.int64)
        before[known] = self.table[at[known], hod[known]]
        return at, before

    def overflows(self, rows: np.ndarray, hod: np.ndarray, values: np.ndarray
                  ) -> np.ndarray:
        """Which of (block row, hour, value) would take a slot's delta out of int64."""
        _, before = self._before(rows, hod)
        with np.errstate(over="ignore"):
            after = before + values
        return np.flatnonzero(((values > 0) & (after < before)) | ((values < 0) & (after > before)))

    def add(self, rows: np.ndarray, hod: np.ndarray, values: np.ndarray) -> None:
        """Add nonzero ``values`` at distinct (block row, hour of day) slots."""
        at = self.at[rows]
        fresh = at < 0
        if fresh.any():
            new = np.unique(rows[fresh])
            n, m = self.rows, self.rows + len(new)
            if m > len(self.table):
                size = max(m, 2 * len(self.table))
                table = np.zeros((size, 24), np.int64)
                table[:n] = self.table[:n]
                block = np.zeros(size, np.int64)
                block[:n] = self.block[:n]
                self.table, self.block = table, block
            self.block[n:m] = new
            self.at[new] = np.arange(n, m, dtype=np.int32)
            self.rows = m
            at = self.at[rows]
        before = self.table[at, hod]
        with np.errstate(over="ignore"):
            after = before + values
        wrapped = ((values > 0) & (after < before)) | ((values < 0) & (after > before))
        if self.wide or wrapped.any():
            self._widen(at.astype(np.int64) * 24 + hod, before, values, after, wrapped)
        self.table[at, hod] = after
        self.slots += int(np.count_nonzero(after)) - int(np.count_nonzero(before))

    def _widen(self, keys: np.ndarray, before: np.ndarray, values: np.ndarray,
               after: np.ndarray, wrapped: np.ndarray) -> None:
        """Slots whose delta left int64 now or before: summed as Python ints in ``wide``,
        their ``after`` set to 0 (``slots`` counts them as ``wide`` does)."""
        wide = self.wide
        hit = wrapped
        if wide:
            hit = hit | np.isin(keys, np.fromiter(wide, np.int64, len(wide)))
        for n in np.flatnonzero(hit).tolist():
            key = int(keys[n])
            old = wide.get(key, 0)
            new = wide[key] = old + int(before[n]) + int(values[n])
            after[n] = 0
            self.slots += (new != 0) - (old != 0)

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The nonzero slots (block rows, hours of day, deltas), and nothing pending after.
        Deltas are int64, or Python ints (dtype object) if one left int64."""
        n = self.rows
        used = self.table[:n]
        at, hod = np.nonzero(used)
        vals = used[at, hod]
        if self.wide:
            keys = np.fromiter(self.wide, np.int64, len(self.wide))
            at = np.concatenate((at, keys // 24))
            hod = np.concatenate((hod, keys % 24))
            wide = np.array(list(self.wide.values()), dtype=object)
            vals = np.concatenate((vals.astype(object), wide))
            keep = vals != 0
            at, hod, vals = at[keep], hod[keep], vals[keep]
        rows = self.block[at]
        self.at[self.block[:n]] = -1
        if len(self.table) > _PENDING_ROWS:  # (a burst of new series: give its pages back)
            self.table = np.zeros((_PENDING_ROWS, 24), np.int64)
            self.block = np.zeros(_PENDING_ROWS, np.int64)
        else:
            used[:] = 0
        self.rows = self.slots = 0
        self.wide = {}
        return rows, hod.astype(np.int64), vals


_PENDING_ROWS = 4096  # rows of pending deltas kept between checkpoints (768 KB)


class _Taken(NamedTuple):
    """A checkpoint's slots: block rows, hours of day, deltas, block keys.

    The keys are read when the slots are taken: a block row may hold another
    day by the time the writer thread names them.
    """

    rows: np.ndarray
    hod: np.ndarray
    vals: np.ndarray
    keys: np.ndarray


def _beyond_big(values: np.ndarray) -> np.ndarray:
    """|values| > BIG without np.abs, which wraps INT64_MIN back to itself."""
    return (values > BIG) | (values < -BIG)


def exact_sum(counts: np.ndarray, axis: int) -> np.ndarray:
    """Sums along ``axis``: int64 when they provably fit, else Python ints (dtype object),
    so a total over many hours or series is exact, never wrapped."""
    n = counts.shape[axis]
    if not counts.size:
        return np.zeros(counts.shape[1 - axis], np.int64)
    bound = max(abs(int(counts.min())), abs(int(counts.max()))) * n
    if bound < 2**63:
        return counts.sum(axis=axis, dtype=np.int64)
    return counts.astype(object).sum(axis=axis)


def _utc(hour: int) -> str:
    return hour_start(hour).isoformat(timespec="minutes")
