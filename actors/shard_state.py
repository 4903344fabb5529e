"""A shard's in-memory state, free of I/O: batches in, checkpoint deltas out.

The shard owns every (series, UTC month) it has touched: it loads the stored
month document once (its *base*), then applies increments on top, so for
those months its totals are complete and a query needs no store round trip.
Months it has never touched are answered from the store alone; the two sets
never overlap, which is what makes a query count each increment once.

Changes since the last checkpoint are kept apart as ``dirty`` deltas. A
checkpoint freezes them into an immutable in-flight ``Checkpoint`` that is
retried as it is until the store takes it (the store's ``ck`` guard makes a
retry of a half-applied checkpoint exact); new increments meanwhile start the
next one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from checkpoint.store import Checkpoint, MonthDoc, MonthKey, ShardRecord
from wire.batches import INT64_MAX, INT64_MIN, Batch
from wire.series import SeriesKey, matches, parse_series_id
from wire.timeslots import hour_start, month_hours, month_of_hour, months_between

NO_SEQ = -1  # the mark of a producer none of whose batches is applied here

# Below this no 24 hours can add up to more than int64 (24 * 2**58 < 2**63).
BIG = 2**58


class SlotOverflow(ValueError):
    """An increment would take a stored slot outside int64; nothing was applied."""

    def __init__(self, aggregate: int, message: str) -> None:
        super().__init__(message)
        self.aggregate = aggregate


@dataclass(slots=True)
class MonthSlots:
    # absolute hour -> total (stored base + everything applied since)
    hours: dict[int, int] = field(default_factory=dict)
    # absolute hour -> delta not yet handed to a checkpoint
    dirty: dict[int, int] = field(default_factory=dict)
    # UTC days (hour // 24) holding an hour beyond BIG: only their day totals,
    # which month documents keep too, can leave int64 while every hour fits
    big_days: set[int] | None = None


@dataclass(slots=True)
class SeriesState:
    key: SeriesKey
    months: dict[str, MonthSlots] = field(default_factory=dict)


class ShardState:
    def __init__(
        self, shard: int, record: ShardRecord | None = None, max_dirty: int = 0
    ) -> None:
        record = record or ShardRecord()
        self.shard = shard
        self.last_ck = record.ck  # highest checkpoint id claimed in the store
        self.durable_ck = record.ck  # highest checkpoint id known durable
        # producer -> highest seq applied here; durable marks are what the
        # store holds. A restarted shard starts with applied == durable.
        self.applied: dict[str, int] = dict(record.producers)
        self.durable: dict[str, int] = dict(record.producers)
        self._undo: dict[str, int | None] = {}  # producer -> mark before its last batch
        self.max_dirty = max_dirty  # 0: unbounded
        self.dirty_count = 0  # (series, hour) slots with a delta not yet in a checkpoint
        self.inflight_count = 0
        self.series: dict[str, SeriesState] = {}
        self.by_metric: dict[tuple[str, str], set[str]] = {}
        self.dirty_keys: set[MonthKey] = set()
        self.inflight: Checkpoint | None = None
        self.unrecorded: set[str] = set()  # series no checkpoint has recorded in the catalog yet
        self.increments = 0  # applied since start, for stats

    # ---- loading -------------------------------------------------------

    def missing(self, batch: Batch) -> list[MonthKey]:
        """(series, month) pairs of the batch whose stored base is not loaded yet."""
        out: list[MonthKey] = []
        seen: set[MonthKey] = set()
        sids = batch.sids
        for idx, hour in zip(batch.series.tolist(), batch.hours.tolist(), strict=True):
            key = (sids[idx], month_of_hour(hour))
            if key in seen:
                continue
            seen.add(key)
            st = self.series.get(key[0])
            if st is None or key[1] not in st.months:
                out.append(key)
        return out

    def install(self, keys: Iterable[MonthKey], docs: dict[MonthKey, MonthDoc]) -> None:
        """Take stored bases for ``keys``; a key already present is kept (it is newer)."""
        for sid, month in keys:
            st = self.series.get(sid)
            if st is None:
                key = parse_series_id(sid)
                st = self.series[sid] = SeriesState(key)
                self.by_metric.setdefault((key.tenant, key.metric), set()).add(sid)
                self.unrecorded.add(sid)
            if month not in st.months:
                doc = docs.get((sid, month))
                slots = st.months[month] = MonthSlots(hours=dict(doc.hours) if doc else {})
                for hour, total in slots.hours.items():
                    if abs(total) > BIG:
                        _mark_big(slots, hour)

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
        checkpoint that makes it durable, or a refusal ``{"code", "message"}``.
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
        used = self.dirty_count + self.inflight_count
        if self.max_dirty and used and used + 2 * len(batch) > self.max_dirty:
            return {
                "code": "overloaded",
                "message": f"shard {self.shard} holds {used} slots not yet checkpointed "
                f"(bound {self.max_dirty}); retry later",
            }
        missing = self.missing(batch)
        if missing:
            try:
                docs = load(missing)
            except Exception as e:  # the store is down: refuse, the client backs off and resends
                return {"code": "overloaded", "message": f"store unavailable: {e}"}
            self.install(missing, docs)
        try:
            self.apply(batch)
        except SlotOverflow as e:
            return {"code": "bad_row", "aggregate": e.aggregate, "message": str(e)}
        if producer is not None:
            self._undo[producer] = self.applied.get(producer)
            self.applied[producer] = seq  # type: ignore[assignment]
        return {"status": "applied", "ck": self._holding_ck(producer)}

    def _holding_ck(self, producer: str | None) -> int:
        """The checkpoint by which everything applied so far is durable.

        Never one that will not happen: a waiter for it would wait forever.
        """
        if self.dirty_count or self.unrecorded:
            return self.last_ck + 1
        if producer is not None:
            mark = self.applied.get(producer)
            if self.durable.get(producer) != mark:
                if self.inflight is not None and self.inflight.producers.get(producer) == mark:
                    return self.inflight.ck
                return self.last_ck + 1
        if self.inflight is not None:
            return self.inflight.ck
        return self.durable_ck

    def apply(self, batch: Batch) -> None:
        """All or nothing: checks every slot for int64 overflow before changing any."""
        sids = batch.sids
        entries = zip(
            batch.series.tolist(), batch.hours.tolist(), batch.values.tolist(), strict=True
        )
        resolved: list[tuple[MonthSlots, int, int, str]] = []
        bad: list[tuple[int, str]] = []
        near_limit: list[int] = []
        for n, (idx, hour, value) in enumerate(entries):
            sid = sids[idx]
            slots = self.series[sid].months[month_of_hour(hour)]
            total = slots.hours.get(hour, 0) + value
            if not INT64_MIN <= total <= INT64_MAX:
                bad.append((n, f"series {sid!r} at {_utc(hour)}: the hour's total {total} "
                               "would leave int64"))
            elif abs(total) > BIG or (slots.big_days and hour // 24 in slots.big_days):
                near_limit.append(n)
            resolved.append((slots, hour, value, sid))
        if near_limit and not bad:
            bad = _day_overflows(resolved, near_limit)
        if bad:
            n, message = min(bad, key=lambda b: int(batch.first_row[b[0]]))
            raise SlotOverflow(n, message)
        self._add(resolved)
        self.increments += batch.increments

    def revert(
        self,
        batch: Batch,
        load: Callable[[list[MonthKey]], dict[MonthKey, MonthDoc]],
        producer: str | None = None,
    ) -> None:
        """Undo an applied batch (another shard refused its part of the same batch).

        A checkpoint may have written the batch and dropped its months from
        memory meanwhile, so they are loaded again (with the batch in their
        base) before subtracting. If that load fails, this raises and nothing
        changes, mark included: the batch then stays applied here, and the
        producer's resend of it is a duplicate here while other shards apply it.
        """
        missing = self.missing(batch)
        if missing:
            self.install(missing, load(missing))
        if producer is not None and producer in self._undo:
            # The mark goes back too, and the next checkpoint records the lower
            # mark (marks are set, not maxed): the client resends this seq and
            # it must apply here again, also after a restart.
            previous = self._undo.pop(producer)
            self.applied[producer] = NO_SEQ if previous is None else previous
        sids = batch.sids
        resolved = [
            (self.series[sids[idx]].months[month_of_hour(hour)], hour, -value, sids[idx])
            for idx, hour, value in zip(
                batch.series.tolist(), batch.hours.tolist(), batch.values.tolist(), strict=True
            )
        ]
        self._add(resolved)
        self.increments -= batch.increments

    def _add(self, resolved: list[tuple[MonthSlots, int, int, str]]) -> None:
        dirty_keys = self.dirty_keys
        for slots, hour, value, sid in resolved:
            total = slots.hours.get(hour, 0) + value
            if total:
                slots.hours[hour] = total
                if abs(total) > BIG:
                    _mark_big(slots, hour)
            else:
                slots.hours.pop(hour, None)
            before = slots.dirty.get(hour)
            delta = (before or 0) + value
            if delta:
                slots.dirty[hour] = delta
                if before is None:
                    self.dirty_count += 1
            elif before is not None:
                del slots.dirty[hour]
                self.dirty_count -= 1
            dirty_keys.add((sid, month_of_hour(hour)))

    # ---- checkpoints ---------------------------------------------------

    def begin_checkpoint(self) -> Checkpoint | None:
        """The checkpoint to write next: the unfinished one again, else the dirty deltas."""
        if self.inflight is not None:
            return self.inflight
        deltas: dict[MonthKey, dict[int, int]] = {}
        for sid, month in self.dirty_keys:
            slots = self.series[sid].months[month]
            if slots.dirty:
                deltas[(sid, month)] = slots.dirty
                slots.dirty = {}
        self.dirty_keys = set()
        producers = {p: s for p, s in self.applied.items() if self.durable.get(p) != s}
        if not deltas and not self.unrecorded and not producers:
            return None
        self.last_ck += 1
        self.inflight = Checkpoint(
            shard=self.shard,
            ck=self.last_ck,
            deltas=deltas,
            new_series=sorted(self.unrecorded),
            producers=producers,
        )
        self.unrecorded = set()
        self.inflight_count, self.dirty_count = self.dirty_count, 0
        return self.inflight

    def finish_checkpoint(self, ck: int) -> None:
        if self.inflight is None or self.inflight.ck != ck:
            raise RuntimeError(f"checkpoint {ck} is not the one in flight")
        self.durable.update(self.inflight.producers)
        self.durable_ck = ck
        self.inflight = None
        self.inflight_count = 0

    def evict(self, current_month: str) -> int:
        """Forget clean months other than the current one; the store has them."""
        busy = set(self.dirty_keys)
        if self.inflight is not None:
            busy.update(self.inflight.deltas)
        evicted = 0
        for sid in list(self.series):
            st = self.series[sid]
            for month in [m for m in st.months if m != current_month]:
                if (sid, month) not in busy:
                    del st.months[month]
                    evicted += 1
            if not st.months and sid not in self.unrecorded:
                del self.series[sid]
                metric_sids = self.by_metric[(st.key.tenant, st.key.metric)]
                metric_sids.discard(sid)
                if not metric_sids:
                    del self.by_metric[(st.key.tenant, st.key.metric)]
        return evicted

    @property
    def dirty_slots(self) -> int:
        return self.dirty_count + self.inflight_count

    @property
    def series_months(self) -> int:
        return sum(len(st.months) for st in self.series.values())

    # ---- queries -------------------------------------------------------

    def _matching(self, tenant: str, metric: str, where: dict[str, str]) -> list[SeriesState]:
        return [
            self.series[sid]
            for sid in self.by_metric.get((tenant, metric), ())
            if matches(self.series[sid].key.tags, where)
        ]

    def hourly(
        self, tenant: str, metric: str, where: dict[str, str], h0: int, h1: int
    ) -> tuple[np.ndarray, list[MonthKey]]:
        """Summed counts per hour of [h0, h1) over matching series, and the months covered."""
        out = np.zeros(h1 - h0, dtype=np.int64)
        covered: list[MonthKey] = []
        months = months_between(h0, h1)
        for st in self._matching(tenant, metric, where):
            sid = st.key.sid
            for month in months:
                slots = st.months.get(month)
                if slots is None:
                    continue
                covered.append((sid, month))
                _add_hours(out, slots.hours, h0, h1, month)
        return out, covered

    def totals(
        self, tenant: str, metric: str, where: dict[str, str], h0: int, h1: int
    ) -> tuple[dict[str, int], list[MonthKey]]:
        """Per-series totals over [h0, h1), and the months covered."""
        out: dict[str, int] = {}
        covered: list[MonthKey] = []
        months = months_between(h0, h1)
        for st in self._matching(tenant, metric, where):
            sid = st.key.sid
            for month in months:
                slots = st.months.get(month)
                if slots is None:
                    continue
                covered.append((sid, month))
                first, end = month_hours(month)
                if h0 <= first and end <= h1:
                    total = sum(slots.hours.values())
                else:
                    total = sum(v for h, v in slots.hours.items() if h0 <= h < h1)
                out[sid] = out.get(sid, 0) + total
        return out, covered

    def catalog(self, tenant: str) -> list[str]:
        return [sid for (t, _), sids in self.by_metric.items() if t == tenant for sid in sids]


def _add_hours(out: np.ndarray, hours: dict[int, int], h0: int, h1: int, month: str) -> None:
    first, end = month_hours(month)
    if h0 <= first and end <= h1:
        for h, v in hours.items():
            out[h - h0] += v
    else:
        for h, v in hours.items():
            if h0 <= h < h1:
                out[h - h0] += v


def _mark_big(slots: MonthSlots, hour: int) -> None:
    if slots.big_days is None:
        slots.big_days = set()
    slots.big_days.add(hour // 24)


def _utc(hour: int) -> str:
    return hour_start(hour).isoformat(timespec="minutes")


def _day_overflows(
    resolved: list[tuple[MonthSlots, int, int, str]], near_limit: list[int]
) -> list[tuple[int, str]]:
    """Aggregates whose UTC day total (stored plus this batch) would leave int64."""
    batch_days: dict[tuple[int, int], int] = defaultdict(int)
    for slots, hour, value, _ in resolved:
        batch_days[(id(slots), hour // 24)] += value
    bad = []
    for n in near_limit:
        slots, hour, _, sid = resolved[n]
        day = hour // 24
        stored = sum(slots.hours.get(h, 0) for h in range(day * 24, day * 24 + 24))
        total = stored + batch_days[(id(slots), day)]
        if not INT64_MIN <= total <= INT64_MAX:
            bad.append((n, f"series {sid!r} on {_utc(day * 24)[:10]}: the day's total {total} "
                           "would leave int64"))
    return bad
