"""A model of ShardState's observable behaviour, to hold any rewrite of it to the same answers.

A hypothesis state machine drives one ``ShardState`` through ingests (with and
without producer seqs: new, resent, skipping ahead, with a wrong ``expect``),
reverts of the last applied batch, checkpoints (written, lost before the store
took them, written but not acknowledged, half applied), evictions and restarts
from the store's record, over a fake in-memory store that keeps the store
protocol (checkpoint/store.py: per-document ``ck`` guards, marks set by the
checkpoint that carries them, a committed checkpoint finished on open).

A model written from the docstrings predicts every answer. After every step
the combined view (the shard's months, plus stored months it does not cover,
merged exactly as api/service.py merges them) must equal the model's counts,
for every tenant, metric, ``where`` and a few hour ranges crossing UTC months.
Only the public API is used; ``len(state.series)`` and ``state.series_months``
as counts. ``dirty_slots`` is exact. One relation is deliberately looser than
the current code: a month whose changes since the last checkpoint summed to
zero may be evicted or kept.

Plain tests below pin the int64 edges (an hour or a UTC day total leaving
int64 refuses the batch as ``bad_row`` naming the aggregate, and changes
nothing) and a store that fails to load.
"""

from __future__ import annotations

import calendar
import copy
from collections import Counter, defaultdict
from functools import cache
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tally.actors.shard_state import Ingested, Outcome, ShardState
from tally.checkpoint.store import Checkpoint, MonthDoc, MonthKey, ShardRecord, StoreError
from tally.wire.batches import INT64_MAX, INT64_MIN, Batch, rows_batch
from tally.wire.series import SeriesKey, matches, parse_series_id, series_id
from tally.wire.timeslots import month_of_hour, months_between

SHARD = 3
NOW = calendar.timegm((2026, 12, 31, 23, 30, 0))


def hour(y: int, m: int, d: int, h: int) -> int:
    return calendar.timegm((y, m, d, h, 0, 0)) // 3600


# Hours on both sides of two month boundaries, and both ends of the three months.
HOURS = [
    hour(2026, 10, 1, 0),
    hour(2026, 10, 31, 22),
    hour(2026, 10, 31, 23),
    hour(2026, 11, 1, 0),
    hour(2026, 11, 1, 1),
    hour(2026, 11, 15, 12),
    hour(2026, 11, 30, 23),
    hour(2026, 12, 1, 0),
    hour(2026, 12, 31, 23),
]
TENANTS = ["acme", "globex"]
METRICS = ["m", "n"]
TAGS: list[dict[str, str] | None] = [
    None,
    {},  # the same series as nil tags
    {"c": "a"},
    {"c": "b"},
    {"r": "x", "c": "a"},
    {"r": "x"},
]
WHERES: list[dict[str, str]] = [{}, {"c": "a"}, {"c": "b"}, {"r": "x"}, {"c": "a", "r": "x"}]
FULL = (hour(2026, 10, 1, 0), hour(2027, 1, 1, 0))  # every hour the machine writes
RANGES = [
    FULL,
    (hour(2026, 10, 31, 23), hour(2026, 12, 1, 1)),  # cuts October and December
    (hour(2026, 11, 30, 23), hour(2026, 12, 1, 0)),  # one hour, the last of November
]
# every where over the three months; the cut ranges with every series
QUERIES = [*((where, FULL) for where in WHERES), *(({}, r) for r in RANGES[1:])]
MONTHS = ["2026-10", "2026-11", "2026-12", "2027-01"]
PRODUCERS = ["p", "q"]

INGEST = st.fixed_dictionaries({
    "raw": st.lists(
        st.tuples(
            st.sampled_from(TENANTS), st.sampled_from(METRICS), st.sampled_from(TAGS),
            st.sampled_from(HOURS), st.integers(0, 3599), st.integers(-4, 6),
            st.booleans(),  # and the same again, negated: an aggregate of zero
        ),
        max_size=6,
    ),
    "producer": st.sampled_from([None, None, *PRODUCERS]),
    "kind": st.sampled_from(["next", "next", "next", "no_expect", "resend", "jump", "gap"]),
    "back": st.integers(0, 2),
    "down": st.integers(0, 5).map(lambda n: n == 5),  # the store fails to load
})
# checkpoint: written; lost before the store took it; written but not acknowledged;
# committed and half applied when the writer failed
MODES = ["ok", "ok", "ok", "lost", "unacked", "partial"]
ACTIONS = ["ingest"] * 8 + ["revert"] * 3 + ["checkpoint"] * 4 + ["evict"] * 2 + ["restart"]


@cache
def key_of(sid: str) -> SeriesKey:
    return parse_series_id(sid)


@cache
def months_in(h0: int, h1: int) -> frozenset[str]:
    return frozenset(months_between(h0, h1))


def sid_matches(sid: str, tenant: str, metric: str, where: dict[str, str]) -> bool:
    key = key_of(sid)
    return key.tenant == tenant and key.metric == metric and matches(key.tags, where)


def add(d: dict, key: Any, value: int) -> None:
    """Add into a dict that keeps no zero values."""
    total = d.get(key, 0) + value
    if total:
        d[key] = total
    else:
        d.pop(key, None)


def aggregates(rows: list[list]) -> dict[tuple[str, int], int]:
    """(sid, hour) -> sum of the rows, zero sums included (the batch keeps them too)."""
    out: dict[tuple[str, int], int] = defaultdict(int)
    for tenant, metric, tags, ts, value in rows:
        out[(series_id(tenant, metric, tags), ts // 3600)] += value
    return dict(out)


def by_month(slots: dict[tuple[str, int], int]) -> dict[MonthKey, dict[int, int]]:
    out: dict[MonthKey, dict[int, int]] = defaultdict(dict)
    for (sid, h), v in slots.items():
        out[(sid, month_of_hour(h))][h] = v
    return dict(out)


def plain_checkpoint(cp: Checkpoint) -> tuple:
    """A checkpoint's content as plain values, its types checked: stores bind ints, not numpy
    (the columns are int64 arrays, whose ``tolist`` gives ints)."""
    assert type(cp.shard) is int and type(cp.ck) is int, cp
    if cp.slots is not None:
        assert cp.deltas == {}, "both forms at once"
        assert cp.slots.hours.dtype == np.int64 and cp.slots.values.dtype in (np.int64, object)
        assert cp.slots.counts.dtype == np.int64 and (cp.slots.counts > 0).all()
    deltas = {}
    for (sid, month), hours in cp.documents().items():
        assert type(sid) is str and type(month) is str, (sid, month)
        assert hours, f"an empty delta document for {(sid, month)}"
        for h, v in hours.items():
            assert type(h) is int and type(v) is int, (sid, month, h, v, type(h), type(v))
            assert v != 0, f"a zero delta for {sid} at hour {h}"
            assert month_of_hour(h) == month, (sid, month, h)
        deltas[(sid, month)] = dict(hours)
    assert list(cp.new_series) == sorted(set(cp.new_series)), cp.new_series
    for p, s in cp.producers.items():
        assert type(p) is str and type(s) is int, (p, s)
    return cp.shard, cp.ck, deltas, list(cp.new_series), dict(cp.producers)


class FakeStore:
    """The store protocol in memory: what write_checkpoint and open_shard promise."""

    def __init__(self) -> None:
        self.docs: dict[MonthKey, dict[int, int]] = {}
        self.doc_ck: dict[MonthKey, int] = {}
        self.ck = 0
        self.marks: dict[str, int] = {}
        self.mark_ck: dict[str, int] = {}
        self.catalog: set[str] = set()
        self.journal: Checkpoint | None = None  # committed, not completely applied
        self.written: dict[int, tuple] = {}  # ck -> content, to check that a retry is the same
        self.down = False
        self.loads: list[list[MonthKey]] = []

    def load(self, keys: list[MonthKey]) -> dict[MonthKey, MonthDoc]:
        keys = list(keys)
        self.loads.append(keys)
        if self.down:
            raise StoreError("the store is down")
        return {
            k: MonthDoc(k[0], k[1], dict(self.docs[k]), self.doc_ck[k])
            for k in keys
            if k in self.docs
        }

    def write(self, cp: Checkpoint, limit: int | None = None) -> None:
        """Commit the checkpoint, then apply it; with ``limit`` stop after that many documents."""
        content = plain_checkpoint(cp)
        assert content[0] == SHARD
        if cp.ck in self.written:
            assert self.written[cp.ck] == content, "a checkpoint id was written again, changed"
        else:
            assert cp.ck > self.ck, f"checkpoint {cp.ck} after {self.ck}: ids must increase"
            assert self.journal is None, "a new checkpoint before the half-applied one"
            self.written[cp.ck] = content
        cp = copy.deepcopy(cp)
        self.ck = max(self.ck, cp.ck)
        self.journal = cp
        deltas = cp.documents()
        for n, key in enumerate(sorted(deltas)):
            if limit is not None and n >= limit:
                return  # the writer died half way; the commit stands
            if self.doc_ck.get(key, 0) >= cp.ck:
                continue  # this document already took this checkpoint
            hours = self.docs.setdefault(key, {})
            for h, v in deltas[key].items():
                add(hours, h, v)
            self.doc_ck[key] = cp.ck
        self.catalog.update(cp.new_series)
        for p, s in cp.producers.items():
            if self.mark_ck.get(p, 0) < cp.ck:
                self.marks[p] = s
                self.mark_ck[p] = cp.ck
        self.journal = None

    def open_shard(self) -> ShardRecord:
        if self.journal is not None:
            self.write(self.journal)
        return ShardRecord(ck=self.ck, producers=dict(self.marks))


class ShardStateMachine(RuleBasedStateMachine):
    """One shard, its fake store, and the model's prediction of both."""

    def __init__(self) -> None:
        super().__init__()
        self.store = FakeStore()
        self.max_dirty = 0
        self.state = ShardState(SHARD, self.store.open_shard())
        self.ever: set[str] = set()  # every sid the shard was ever given
        # what the store must hold once every committed checkpoint is applied
        self.m_store: dict[tuple[str, int], int] = {}
        self.m_store_marks: dict[str, int] = {}
        self.m_store_ck = 0
        self.reset_incarnation()

    def reset_incarnation(self) -> None:
        """The model of a shard that just started from the store's record."""
        self.truth: dict[tuple[str, int], int] = dict(self.m_store)  # the combined view
        self.pending: dict[tuple[str, int], int] = {}  # not yet in a checkpoint, no zeros
        self.touched: set[MonthKey] = set()  # changed since the last fresh checkpoint
        self.inflight: dict[tuple[str, int], int] | None = None
        self.inflight_cp: tuple | None = None
        self.inflight_producers: dict[str, int] = {}
        self.committed = False  # the store took the in-flight checkpoint
        self.applied: dict[str, int] = dict(self.m_store_marks)
        self.durable: dict[str, int] = dict(self.m_store_marks)
        self.undo: dict[str, int | None] = {}
        self.last_ck = self.durable_ck = self.m_store_ck
        self.increments = 0
        self.known: Counter[str] = Counter()  # sids of applied batches: the catalog has them
        self.installed: set[MonthKey] = set()  # months this incarnation loaded at least once
        self.revertible: dict[str | None, tuple] = {}
        # (producer, seq, ck) of answers: once ck is durable, so is the producer's seq
        self.watches: list[tuple[str, int, int]] = []
        # (producer, seq, ck, kept): a checkpoint ck that an answer promised will happen.
        # Kept promises are those of applied batches of a producer (their mark must be
        # checkpointed); the others hold until the state changes again, which may cancel
        # what they wait for (a later batch that cancels every pending delta exactly, or a
        # mark that comes back to the durable one).
        self.promises: list[tuple[str | None, int | None, int, bool]] = []

    # ---- helpers ---------------------------------------------------------

    def busy(self) -> set[MonthKey]:
        """Months the shard must keep: with deltas pending or in flight."""
        out = {(sid, month_of_hour(h)) for sid, h in self.pending}
        if self.inflight is not None:
            out |= {(sid, month_of_hour(h)) for sid, h in self.inflight}
        return out

    def dirty_model(self) -> int:
        """(series, hour) slots with a nonzero delta not yet durable: pending or in flight."""
        return len(self.pending) + (len(self.inflight) if self.inflight is not None else 0)

    def observed(self) -> tuple:
        """Everything a refusal must leave as it was (dirty_slots: see marks_and_counters)."""
        s = self.state
        return (
            dict(s.applied), dict(s.durable), s.last_ck, s.durable_ck, s.increments,
            len(s.series), s.series_months,
            [s.hourly(t, m, {}, *FULL)[0].tolist() for t in TENANTS for m in METRICS],
        )

    def check_answer_ck(
        self, answer: Ingested, producer: str | None, seq: int | None
    ) -> None:
        ck = answer.ck
        assert type(ck) is int, answer
        s = self.state
        allowed = {s.durable_ck, s.last_ck + 1}
        if self.inflight is not None:
            allowed.add(s.last_ck)
        assert ck in allowed, (answer, allowed)
        if self.pending:  # applied and not in any checkpoint yet: the next one holds it
            assert ck == s.last_ck + 1, (answer, s.last_ck)
        if producer is not None and self.applied.get(producer) != self.durable.get(producer):
            assert ck > s.durable_ck, (answer, s.durable_ck)
        kept = producer is not None and answer.outcome is Outcome.APPLIED
        self.promises.append((producer, seq, ck, kept))
        if producer is None:
            return
        mark = self.applied[producer]
        if self.inflight is not None and self.inflight_producers.get(
            producer, self.durable.get(producer)
        ) != mark and self.durable.get(producer) == mark:
            # the in-flight checkpoint will set an older mark; see
            # test_a_resend_while_an_older_mark_is_in_flight_waits_for_the_next_checkpoint
            return
        self.watches.append((producer, seq, ck))

    def changed(self) -> None:
        self.promises = [p for p in self.promises if p[3]]

    # ---- steps -----------------------------------------------------------

    # One rule that picks the action, and draws every action's arguments every time:
    # hypothesis' swarm testing (which turns whole rules off per test case) left most
    # cases without checkpoints or with nothing but evictions, and steps of one shape
    # let the shrinker delete any of them.
    @rule(
        action=st.sampled_from(ACTIONS),
        batch=INGEST,
        which=st.integers(0, 2),  # the batch to revert, of those that may be
        down=st.integers(0, 3).map(lambda n: n == 3),  # the store fails the revert's load
        mode=st.sampled_from(MODES),
        written=st.integers(0, 3),  # documents a half-applied checkpoint wrote
        month=st.sampled_from(MONTHS),  # the current month, for an eviction
    )
    def step(
        self, action: str, batch: dict, which: int, down: bool, mode: str, written: int,
        month: str,
    ) -> None:
        if action == "revert" and not self.revertible:
            action = "ingest"
        if action == "ingest":
            self.ingest(**batch)
        elif action == "revert":
            candidates = sorted(self.revertible, key=str)
            self.revert(candidates[which % len(candidates)], down)
        elif action == "checkpoint":
            self.checkpoint(mode, written)
        elif action == "evict":
            self.evict(month)
        else:
            self.restart()

    @initialize(max_dirty=st.sampled_from([0, 0, 7, 12]))
    def bound(self, max_dirty: int) -> None:
        self.max_dirty = max_dirty
        self.state = ShardState(SHARD, self.store.open_shard(), max_dirty=max_dirty)

    def ingest(
        self, raw: list, producer: str | None, kind: str, back: int, down: bool
    ) -> None:
        """A batch as the gateway sends it: ``kind`` picks seq and expect from the mark."""
        rows: list[list] = []
        for tenant, metric, tags, h, sec, value, cancel in raw:
            rows.append([tenant, metric, tags, h * 3600 + sec, value])
            if cancel:  # the same hour and series again, summing to zero
                rows.append([tenant, metric, tags, h * 3600 + (sec * 7) % 3600, -value])
        batch = rows_batch(rows, NOW)
        aggs = aggregates(rows)
        assert len(batch) == len(aggs)
        self.ever.update(sid for sid, _ in aggs)
        keys = {(sid, month_of_hour(h)) for sid, h in aggs}

        seq = expect = None
        mark = self.applied.get(producer) if producer is not None else None
        if producer is not None:
            base = 0 if mark is None or mark < 0 else mark
            known_mark = mark if mark is not None and mark >= 0 else None
            seq, expect = {
                "next": (base + 1, known_mark),
                "no_expect": (base + 1, None),
                "resend": (max(1, base - back), known_mark),
                "jump": (base + 2 + back, known_mark),
                "gap": (base + 1, base + 1 + back),
            }[kind]

        before = self.observed()
        self.store.down = down
        self.store.loads = []
        try:
            answer = self.state.ingest(batch, self.store.load, producer, seq, expect)
        finally:
            self.store.down = False
        loads = self.store.loads
        event(f"ingest: {answer.outcome.value}")
        for requested in loads:
            assert len(set(requested)) == len(requested), requested
            assert set(requested) <= keys, (requested, keys)

        if producer is not None and mark is not None and seq <= mark:
            assert answer.outcome is Outcome.DUPLICATE, answer
            if producer in self.revertible:  # found here by a resend: it must stay
                self.revertible[producer] = (*self.revertible[producer][:5], True)
            assert not loads, "a duplicate loaded months"
            assert self.observed() == before
            self.check_answer_ck(answer, producer, seq)
            return
        if producer is not None and expect is not None and mark != expect:
            assert answer.outcome is Outcome.GAP, answer
            assert type(answer.message) is str and answer.message
            assert self.observed() == before
            return
        used = self.dirty_model()
        if self.max_dirty and used and used + 2 * len(batch) > self.max_dirty:
            assert answer.outcome is Outcome.FULL, (answer, used, len(batch))
            assert not loads, "a batch over the bound loaded months"
            assert self.observed() == before
            return
        if answer.outcome is Outcome.STORE_DOWN:
            # only a store that failed to load may refuse now, and then nothing changed
            assert down and loads, answer
            assert answer.answer()["code"] == "overloaded", answer
            assert "store" in answer.message, answer
            assert self.observed() == before
            return
        assert answer.outcome is Outcome.APPLIED, answer
        if down:  # it loaded nothing, so it held every month already
            assert keys <= self.installed, (keys - self.installed, answer)
        # a stored base is only loaded for a month the shard does not hold: never a busy one
        for requested in loads:
            assert not set(requested) & self.busy(), set(requested) & self.busy()

        for (sid, h), v in aggs.items():
            add(self.truth, (sid, h), v)
            add(self.pending, (sid, h), v)
            self.touched.add((sid, month_of_hour(h)))
        self.installed |= keys
        self.known.update({sid for sid, _ in aggs})
        self.increments += len(rows)
        prev = None
        if producer is not None:
            prev = self.undo[producer] = self.applied.get(producer)
            self.applied[producer] = seq
        self.revertible[producer] = (batch, aggs, len(rows), prev, seq, False)
        self.changed()
        self.check_answer_ck(answer, producer, seq)

    def revert(self, producer: str | None, down: bool) -> None:
        """Another shard refused its part of the batch: the gateway undoes this one."""
        batch, aggs, nrows, prev, seq, stale = self.revertible.pop(producer)
        keys = {(sid, month_of_hour(h)) for sid, h in aggs}
        before = self.observed()
        self.store.down = down
        self.store.loads = []
        if stale:
            try:
                assert self.state.revert(batch, self.store.load, producer, seq) is False
            finally:
                self.store.down = False
            event("revert: refused, a resend found the batch")
            assert not self.store.loads and self.observed() == before
            return
        try:
            assert self.state.revert(batch, self.store.load, producer, seq) is True
        except StoreError:
            event("revert: the store failed")
            # nothing changed, the mark included: the batch stays applied here
            assert down
            assert self.observed() == before
            return
        finally:
            self.store.down = False
        event("revert: done")
        for requested in self.store.loads:
            assert set(requested) <= keys, (requested, keys)
            assert not set(requested) & self.busy(), set(requested) & self.busy()
        for (sid, h), v in aggs.items():
            add(self.truth, (sid, h), -v)
            add(self.pending, (sid, h), -v)
            self.touched.add((sid, month_of_hour(h)))
        self.installed |= keys
        self.known.subtract({sid for sid, _ in aggs})
        self.increments -= nrows
        if producer is not None:
            assert self.undo.pop(producer) == prev
            self.applied[producer] = -1 if prev is None else prev
            # resends up to the old mark are still answered; later ones will apply again
            floor = -1 if prev is None else prev
            self.watches = [w for w in self.watches if w[0] != producer or w[1] <= floor]
            self.promises = [p for p in self.promises if p[0] != producer or p[1] <= floor]
        self.changed()

    def checkpoint(self, mode: str, limit: int) -> None:
        """One attempt of the checkpoint loop: ok, or a failure of one kind."""
        with pytest.raises(RuntimeError):  # finishing one that is not in flight
            self.state.finish_checkpoint(self.last_ck + 1)
        cp = self.state.begin_checkpoint()
        if self.inflight is not None:
            assert cp is not None, "the in-flight checkpoint vanished"
            assert plain_checkpoint(cp) == self.inflight_cp, "a retry must be the same"
        else:
            deltas = by_month(self.pending)
            producers = {p: s for p, s in self.applied.items() if self.durable.get(p) != s}
            unrecorded = {sid for sid, n in self.known.items() if n > 0} - self.store.catalog
            self.touched = set()
            if cp is None:
                event("checkpoint: none")
                assert not deltas and not producers and not unrecorded, (
                    deltas, producers, unrecorded)
                promised = max((p[2] for p in self.promises), default=0)
                assert promised <= self.state.durable_ck, f"checkpoint {promised} will not come"
                return
            content = plain_checkpoint(cp)
            assert content[0] == SHARD and content[1] == self.last_ck + 1, content
            assert content[2] == deltas, (content[2], deltas)
            assert content[4] == producers, (content[4], producers)
            assert unrecorded <= set(cp.new_series) <= self.ever, (unrecorded, cp.new_series)
            self.last_ck += 1
            self.inflight, self.pending = self.pending, {}
            self.inflight_cp = content
            self.inflight_producers = producers
            self.committed = False
        ck = cp.ck
        event(f"checkpoint: {mode}")
        if mode == "lost":  # the store never took it
            return
        self.store.write(cp, limit if mode == "partial" else None)
        if not self.committed:
            self.committed = True
            for key, v in self.inflight.items():
                add(self.m_store, key, v)
            self.m_store_marks.update(self.inflight_producers)
            self.m_store_ck = ck
        if mode != "ok":  # written (maybe half), but the shard never heard back
            return
        self.state.finish_checkpoint(ck)
        self.durable.update(self.inflight_producers)
        self.durable_ck = ck
        self.inflight = self.inflight_cp = None
        self.inflight_producers = {}

    def evict(self, current: str) -> None:
        held = self.held()
        months_before = self.state.series_months
        evicted = self.state.evict(current, idle=0)  # (the idle rule: test_shard_state.py)
        assert type(evicted) is int
        event(f"evict: {'some' if evicted else 'none'}")
        assert self.state.series_months == months_before - evicted
        after = self.held()
        assert after <= held
        assert len(held - after) == evicted, (held - after, evicted)
        # kept: the current month and those with deltas not yet durable; forgotten: those
        # nothing changed since the last checkpoint began (changes that summed to zero: the
        # current code keeps their months until the next checkpoint; either is right)
        keep = self.busy()
        for key in held:
            if key[1] == current or key in keep:
                assert key in after, f"{key} was evicted (current {current})"
            elif key not in self.touched:
                assert key not in after, f"clean {key} was kept (current {current})"

    def restart(self) -> None:
        """The process dies: a new state from the store's record; the rest is lost."""
        record = self.store.open_shard()
        assert record.ck == self.m_store_ck and record.producers == self.m_store_marks
        self.state = ShardState(SHARD, record, max_dirty=self.max_dirty)
        self.reset_incarnation()

    # ---- invariants ------------------------------------------------------

    def held(self) -> set[MonthKey]:
        out: set[MonthKey] = set()
        for t in TENANTS:
            for m in METRICS:
                out.update(self.state.hourly(t, m, {}, *FULL)[1])
        return out

    @invariant()
    def marks_and_counters(self) -> None:
        s = self.state
        assert s.applied == self.applied, (s.applied, self.applied)
        assert s.durable == self.durable, (s.durable, self.durable)
        assert (s.last_ck, s.durable_ck) == (self.last_ck, self.durable_ck)
        assert s.increments == self.increments
        # exactly the (series, hour) slots with a nonzero delta, pending or in flight
        assert s.dirty_slots == self.dirty_model(), (s.dirty_slots, self.pending, self.inflight)
        for producer, seq, ck in self.watches:
            if ck <= s.durable_ck:  # the answer said: durable by then
                assert s.durable.get(producer, -1) >= seq, (producer, seq, ck, s.durable)

    @invariant()
    def store_matches_the_model(self) -> None:
        if self.store.journal is not None:
            return  # half applied: open_shard or the retry finishes it
        assert self.store.ck == self.m_store_ck
        assert self.store.marks == self.m_store_marks
        docs = {(sid, h): v for (sid, _), hours in self.store.docs.items()
                for h, v in hours.items()}
        assert docs == self.m_store, (docs, self.m_store)
        with_data = {sid for (sid, _), hours in self.store.docs.items() if hours}
        assert with_data <= self.store.catalog, with_data - self.store.catalog

    @invariant()
    def queries_merge_to_the_model(self) -> None:
        s = self.state
        stored: dict[tuple[str, str], list] = defaultdict(list)
        for (sid, month), hours in self.store.docs.items():
            key = key_of(sid)
            stored[(key.tenant, key.metric)].append((sid, month, hours))
        model: dict[tuple[str, str], list] = defaultdict(list)
        for (sid, h), v in self.truth.items():
            key = key_of(sid)
            model[(key.tenant, key.metric)].append((sid, h, v))
        months_held = 0
        for t in TENANTS:
            for m in METRICS:
                for where, (h0, h1) in QUERIES:
                    arr, covered = s.hourly(t, m, where, h0, h1)
                    assert isinstance(arr, np.ndarray) and arr.dtype == np.int64
                    assert arr.shape == (h1 - h0,)
                    # (sid, month) tuples, each once: the gateway puts them in a set
                    assert all(type(k) is tuple and len(k) == 2 for k in covered), covered
                    cov = set(covered)
                    assert len(cov) == len(covered), covered
                    in_range = months_in(h0, h1)
                    for sid, month in cov:
                        assert month in in_range and sid_matches(sid, t, m, where)
                    if where == {} and (h0, h1) == FULL:
                        months_held += len(cov)
                    got: dict[int, int] = {}
                    per_sid: dict[str, int] = {}
                    for i in np.flatnonzero(arr).tolist():
                        got[h0 + i] = int(arr[i])
                    totals, tcov = s.totals(t, m, where, h0, h1)
                    assert set(tcov) == cov and len(tcov) == len(covered)
                    for sid, v in totals.items():
                        assert type(v) is int, (sid, v, type(v))
                        assert sid_matches(sid, t, m, where)
                        add(per_sid, sid, v)
                    assert sum(totals.values()) == int(arr.sum())
                    for sid, month, hours in stored[(t, m)]:
                        if month not in in_range or (sid, month) in cov:
                            continue
                        if not matches(key_of(sid).tags, where):
                            continue
                        for h, v in hours.items():
                            if h0 <= h < h1:
                                add(got, h, v)
                                add(per_sid, sid, v)
                    want: dict[int, int] = {}
                    want_sid: dict[str, int] = {}
                    for sid, h, v in model[(t, m)]:
                        if h0 <= h < h1 and matches(key_of(sid).tags, where):
                            add(want, h, v)
                            add(want_sid, sid, v)
                    assert got == want, (t, m, where, (h0, h1), got, want)
                    assert per_sid == want_sid, (t, m, where, (h0, h1), per_sid, want_sid)
        assert s.series_months == months_held, (s.series_months, months_held)

    @invariant()
    def owned_series_answer_for_every_month(self) -> None:
        """What the gateway asks: series' counts over live and stored months alike, exact
        whatever the shard's copy of stored months holds (it is read as a side effect)."""
        s = self.state
        by_metric: dict[tuple[str, str], list[str]] = defaultdict(list)
        for sid in sorted(self.ever):
            key = key_of(sid)
            by_metric[(key.tenant, key.metric)].append(sid)
        for sids in by_metric.values():
            for where, (h0, h1) in QUERIES:
                chosen = [sid for sid in sids if matches(key_of(sid).tags, where)]
                want_sid = dict.fromkeys(chosen, 0)
                want = np.zeros(h1 - h0, dtype=object)
                for (sid, h), v in self.truth.items():
                    if sid in want_sid and h0 <= h < h1:
                        want_sid[sid] += v
                        want[h - h0] += v
                assert s.totals_of(chosen, h0, h1, self.store.load) == list(want_sid.values())
                got = s.hourly_of(chosen, h0, h1, self.store.load)
                assert got.shape == (h1 - h0,) and [int(v) for v in got] == want.tolist()

    @invariant()
    def catalog_has_every_series(self) -> None:
        live_total = 0
        for t in TENANTS:
            live = self.state.catalog(t)
            assert len(set(live)) == len(live), live
            assert all(key_of(sid).tenant == t for sid in live), live
            assert set(live) <= self.ever
            live_total += len(live)
            stored = {sid for sid in self.store.catalog if key_of(sid).tenant == t}
            # or the in-flight checkpoint will record it (its months may be gone already when
            # all it has are zeros)
            if self.inflight_cp is not None:
                stored |= set(self.inflight_cp[3])
            required = {sid for sid, n in self.known.items() if n > 0 and key_of(sid).tenant == t}
            assert required <= set(live) | stored, required - set(live) - stored
        assert len(self.state.series) == live_total


ShardStateMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestShardStateModel = ShardStateMachine.TestCase


# ---- int64 edges and refusals, step by step ---------------------------------------------

T = hour(2026, 11, 3, 1) * 3600  # 01:00 UTC on 2026-11-03
HALF = 2**62  # two of them make 2**63: just past INT64_MAX


def fresh(store: FakeStore | None = None) -> tuple[ShardState, FakeStore]:
    store = store or FakeStore()
    return ShardState(SHARD, store.open_shard()), store


def view(state: ShardState, store: FakeStore) -> tuple:
    """What a refused batch must leave unchanged (the catalog may gain a series).

    Counts are the merged view of api/service.py: the shard's months, then stored
    months it does not cover.
    """
    h0, h1 = hour(2026, 11, 1, 0), hour(2026, 12, 1, 0)
    arr, covered = state.hourly("acme", "big", {}, h0, h1)
    counts = {h0 + i: int(arr[i]) for i in np.flatnonzero(arr).tolist()}
    for (sid, month), hours in store.docs.items():
        if sid.startswith("acme|big|") and (sid, month) not in covered:
            for h, v in hours.items():
                if h0 <= h < h1:
                    add(counts, h, v)
    marks = dict(state.applied), dict(state.durable)
    return counts, state.dirty_slots, marks, state.increments, state.last_ck


def ingest(state: ShardState, store: FakeStore, rows: list[list], *mark: Any) -> tuple:
    batch = rows_batch(rows, NOW)
    return state.ingest(batch, store.load, *mark), batch


def blamed_row(answer: Ingested, batch: Batch) -> int:
    assert answer.outcome is Outcome.BAD_ROW, answer
    assert type(answer.aggregate) is int and type(answer.message) is str
    return int(batch.first_row[answer.aggregate])


def big(ts: int, value: int, tags: dict | None = None) -> list:
    return ["acme", "big", tags, ts, value]


def test_an_hour_total_leaving_int64_is_refused_and_changes_nothing():
    state, store = fresh()
    assert ingest(state, store, [big(T, INT64_MAX - 3)], "p", 1)[0].outcome is Outcome.APPLIED
    before = view(state, store)
    rows = [big(T + 86400, 5), big(T, 1, {"c": "a"}), big(T + 60, 4), big(T + 7200, 1)]
    answer, batch = ingest(state, store, rows, "p", 2, 1)
    assert blamed_row(answer, batch) == 2
    assert view(state, store) == before
    # the seq was not used up: the same seq applies once the batch is fixed
    answer, _ = ingest(state, store, [big(T, 3), big(T + 86400, 5)], "p", 2, 1)
    assert answer.outcome is Outcome.APPLIED
    arr, _ = state.hourly("acme", "big", {}, T // 3600, T // 3600 + 25)
    assert arr[0] == INT64_MAX and arr[24] == 5


def test_an_hour_total_below_int64_is_refused_too():
    state, store = fresh()
    ingest(state, store, [big(T, INT64_MIN + 2)])
    before = view(state, store)
    answer, batch = ingest(state, store, [big(T, -2), big(T + 1, -1)])  # one aggregate: -3
    assert blamed_row(answer, batch) == 0
    assert view(state, store) == before
    assert ingest(state, store, [big(T, -2)])[0].outcome is Outcome.APPLIED
    assert state.totals("acme", "big", {}, T // 3600, T // 3600 + 1)[0] == {
        "acme|big|": INT64_MIN}


def test_the_first_of_two_overflowing_rows_is_blamed():
    state, store = fresh()
    ingest(state, store, [big(T, INT64_MAX), big(T, INT64_MAX, {"c": "b"})])
    # "acme|big|c=b" sorts after "acme|big|": its aggregate comes second in the batch
    rows = [big(T + 3600, 1), big(T, 1, {"c": "b"}), big(T, 1)]
    answer, batch = ingest(state, store, rows)
    assert blamed_row(answer, batch) == 1


def test_a_day_total_leaving_int64_is_refused_although_every_hour_fits():
    state, store = fresh()
    ingest(state, store, [big(T, HALF)], "p", 1)
    before = view(state, store)
    rows = [big(T + 86400, HALF), big(T + 3600, HALF)]  # the next day is fine; this day is not
    answer, batch = ingest(state, store, rows, "p", 2, 1)
    assert blamed_row(answer, batch) == 1
    assert "day" in answer.message and "2026-11-03" in answer.message
    assert view(state, store) == before
    # exactly INT64_MAX for the day is fine, and so is exactly INT64_MIN
    assert ingest(state, store, [big(T + 3600, HALF - 1)], "p", 2, 1)[0].outcome is Outcome.APPLIED
    day = T // 3600 - 1
    assert int(state.hourly("acme", "big", {}, day, day + 24)[0].sum()) == INT64_MAX
    ingest(state, store, [big(T + 86400, -HALF), big(T + 86400 + 3600, -HALF)])
    before = view(state, store)
    answer, batch = ingest(state, store, [big(T + 86400 + 7200, -1)])
    assert blamed_row(answer, batch) == 0
    assert view(state, store) == before


def test_two_rows_of_one_batch_taking_a_day_out_of_int64_are_refused():
    state, store = fresh()
    answer, batch = ingest(state, store, [big(T, HALF), big(T + 3600, HALF), big(T + 86400, 1)])
    assert blamed_row(answer, batch) in (0, 1)
    assert view(state, store) == view(*fresh())


def test_a_day_that_was_near_the_limit_and_came_back_is_not_refused():
    state, store = fresh()
    ingest(state, store, [big(T, HALF)])
    ingest(state, store, [big(T, -HALF)])  # the hour is back to zero
    assert ingest(state, store, [big(T + 3600, HALF)])[0].outcome is Outcome.APPLIED
    answer, batch = ingest(state, store, [big(T, HALF)])  # 2**63 again: refused
    assert blamed_row(answer, batch) == 0
    assert ingest(state, store, [big(T, HALF - 1)])[0].outcome is Outcome.APPLIED


def test_a_stored_day_near_the_limit_counts_after_a_restart_and_after_an_eviction():
    first, store = fresh()
    ingest(first, store, [big(T, HALF)])
    cp = first.begin_checkpoint()
    store.write(cp)
    first.finish_checkpoint(cp.ck)
    assert first.evict("2027-01", idle=0) == 1
    for state in (first, fresh(store)[0]):
        before = view(state, store)
        answer, batch = ingest(state, store, [big(T + 3600, HALF)])  # the base is loaded first
        assert blamed_row(answer, batch) == 0
        assert view(state, store) == before
        assert ingest(state, store, [big(T + 3600, HALF - 1)])[0].outcome is Outcome.APPLIED


def test_a_store_that_cannot_load_refuses_the_batch_and_changes_nothing():
    state, store = fresh()
    ingest(state, store, [big(T, 5)], "p", 1)
    before = (view(state, store), state.series_months, len(state.series))
    store.down = True
    answer, _ = ingest(state, store, [big(T, 1), big(T + 40 * 86400, 1)], "p", 2, 1)
    assert answer.outcome is Outcome.STORE_DOWN and "store" in answer.message, answer
    assert (view(state, store), state.series_months, len(state.series)) == before
    store.down = False
    assert ingest(state, store, [big(T, 1), big(T + 40 * 86400, 1)], "p", 2, 1)[0].ck == 1
    assert state.applied == {"p": 2}


def test_a_resend_while_an_older_mark_is_in_flight_waits_for_the_next_checkpoint():
    """A revert after a checkpoint took the mark, a checkpoint of the lowered mark in flight,
    then the resend of that seq (empty on this shard): the answer must not be the in-flight
    checkpoint, whose finish makes the durable mark the lower one."""
    state, store = fresh()
    empty = Batch.empty()
    assert state.ingest(empty, store.load, "p", 1).outcome is Outcome.APPLIED
    cp = state.begin_checkpoint()
    state.finish_checkpoint(cp.ck)
    assert state.revert(empty, store.load, "p", 1)  # another shard refused seq 1
    lowered = state.begin_checkpoint()
    assert lowered.producers == {"p": -1}
    answer = state.ingest(empty, store.load, "p", 1)
    state.finish_checkpoint(lowered.ck)
    if answer.ck <= state.durable_ck:
        assert state.durable["p"] >= 1, (answer, state.durable)


def test_a_small_increment_on_a_day_already_at_the_limit_is_refused():
    """Every hour of the batch is small: only the day's stored hours can tell."""
    for stored in (False, True):
        state, store = fresh()
        ingest(state, store, [big(T, INT64_MAX)])
        if stored:  # the day comes back from the store after a checkpoint and an eviction
            cp = state.begin_checkpoint()
            store.write(cp)
            state.finish_checkpoint(cp.ck)
            assert state.evict("2027-01", idle=0) == 1
            state = fresh(store)[0]
        before = view(state, store)
        answer, batch = ingest(state, store, [big(T + 86400, 1), big(T + 3600, 1)])
        assert blamed_row(answer, batch) == 1
        assert "day" in answer.message
        assert view(state, store) == before
        assert ingest(state, store, [big(T + 3600, -1)])[0].outcome is Outcome.APPLIED


def test_the_dirty_bound_counts_distinct_slots_and_takes_a_batch_that_fills_it_exactly():
    """A batch needs room twice (its undo may need as much again): refused when
    slots + 2 * aggregates would pass the bound, never when they reach it exactly,
    however often the held slots were changed."""
    store = FakeStore()
    state = ShardState(SHARD, store.open_shard(), max_dirty=7)
    for _ in range(3):  # one slot, changed three times
        assert ingest(state, store, [big(T, 1)])[0].outcome is Outcome.APPLIED
    fill = [big(T + 3600 * k, 1) for k in (1, 2, 3)]
    assert ingest(state, store, fill)[0].outcome is Outcome.APPLIED  # 1 + 2 * 3 == 7
    assert state.dirty_slots == 4
    answer, _ = ingest(state, store, [big(T + 3600 * 4, 1), big(T + 3600 * 5, 1)])
    assert answer.outcome is Outcome.FULL, answer  # 4 + 2 * 2 > 7
    assert ingest(state, store, [big(T, 1)])[0].outcome is Outcome.APPLIED  # 4 + 2 * 1 <= 7
    cp = state.begin_checkpoint()
    assert state.dirty_slots == 4  # in flight counts too
    assert ingest(state, store, [big(T, 1), big(T + 3600, 1)])[0].outcome is Outcome.FULL
    store.write(cp)
    state.finish_checkpoint(cp.ck)
    assert state.dirty_slots == 0
    many = [big(T + 3600 * k, 1) for k in range(10)]  # an empty shard takes any batch
    assert ingest(state, store, many)[0].outcome is Outcome.APPLIED
