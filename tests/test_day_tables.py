"""DayTables (actors/day_tables.py) finds exactly the blocks a dict of (series, day) would.

A hypothesis state machine puts and drops blocks over days spread from 1970 to
now, one day or many per batch, with series numbers that outgrow the grid's
columns and days that come and go (freeing grid rows, compacting the grid), and
checks every lookup against a plain dict.
"""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tally.actors.day_tables import NONE, DayTables

# a few clusters of days, so that batches span one day, a month, and decades
DAYS = st.one_of(st.integers(20_400, 20_440), st.integers(0, 40), st.integers(20_400, 20_402))
SERIES = st.integers(0, 5_000)


class TablesMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tables = DayTables()
        self.model: dict[tuple[int, int], int] = {}
        self.next_row = 0

    @rule(pairs=st.lists(st.tuples(SERIES, DAYS), min_size=1, max_size=40))
    def put(self, pairs: list[tuple[int, int]]) -> None:
        fresh = list(dict.fromkeys(p for p in pairs if p not in self.model))
        if not fresh:
            return
        rows = np.arange(self.next_row, self.next_row + len(fresh), dtype=np.int64)
        self.next_row += len(fresh)
        g = np.array([s for s, _ in fresh], np.int64)
        days = np.array([d for _, d in fresh], np.int64)
        self.tables.put(g, days, rows, int(g.max()) + 1)
        self.model.update(zip(fresh, rows.tolist(), strict=True))

    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        if not self.model:
            return
        held = sorted(self.model)
        s, d = data.draw(st.sampled_from(held))
        assert self.tables.drop(d, s) == self.model.pop((s, d))
        assert self.tables.drop(d, s) == NONE  # (dropped already)

    @rule(day=DAYS)
    def drop_day(self, day: int) -> None:
        """Every block of a day goes: its grid row is freed (and the grid may compact)."""
        for s, d in [p for p in self.model if p[1] == day]:
            assert self.tables.drop(d, s) == self.model.pop((s, d))
        assert day not in self.tables

    @rule(pairs=st.lists(st.tuples(st.integers(0, 9_000), DAYS), min_size=1, max_size=60))
    def find(self, pairs: list[tuple[int, int]]) -> None:
        g = np.array([s for s, _ in pairs], np.int64)
        days = np.array([d for _, d in pairs], np.int64)
        want = [self.model.get(p, NONE) for p in pairs]
        assert self.tables.find(g, days).tolist() == want
        # one day at a time, the path a batch of a single day takes
        for s, d in pairs[:5]:
            one = self.tables.find(np.array([s, s], np.int64), np.array([d, d], np.int64))
            assert one.tolist() == [self.model.get((s, d), NONE)] * 2

    @invariant()
    def days_and_counts(self) -> None:
        per_day: dict[int, int] = {}
        for _, d in self.model:
            per_day[d] = per_day.get(d, 0) + 1
        assert len(self.tables) == len(per_day)
        for d, n in per_day.items():
            assert self.tables.day_blocks(d) == n
        # freed grid rows are given back once most of the grid is free
        assert len(self.tables.rows) <= 2 * len(per_day) + 16


TestDayTables = TablesMachine.TestCase
TestDayTables.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_far_days_and_wide_series_are_found() -> None:
    """Days decades apart in one batch, and a series number past the grid's width."""
    tables = DayTables()
    g = np.array([3, 70_000, 3], np.int64)
    days = np.array([0, 20_430, 20_430], np.int64)
    tables.put(g, days, np.array([7, 8, 9], np.int64), 70_001)
    found = tables.find(np.array([3, 70_000, 3, 3, 200_000], np.int64),
                        np.array([0, 20_430, 20_430, 1, 20_430], np.int64))
    assert found.tolist() == [7, 8, 9, NONE, NONE]
    assert tables.find(np.array([3], np.int64), np.array([-5], np.int64)).tolist() == [NONE]
    assert tables.find(np.array([3], np.int64), np.array([30_000], np.int64)).tolist() == [NONE]
    # days beyond those held, beside days held, in one batch
    mixed = tables.find(np.array([3, 70_000, 3], np.int64), np.array([30_000, 20_430, 0], np.int64))
    assert mixed.tolist() == [NONE, 8, 7]
