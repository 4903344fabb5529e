"""The read path: a shard's counts per hour and totals over an hour range.

A query names series and an hour range; it may span months the shard holds
live (summed from its day blocks, actors/day_blocks.py) and months it holds
only in the store (kept, once read, in ``history``, actors/history.py). The
gateway sends each series only to the shard that owns it, so the shard
answers every month of it and each increment is counted once.

Answers are summed month by month with numpy, in int64 whenever the counts
read prove no sum can leave it, else exactly as Python ints: a total is never
wrapped. Nothing here changes the counts; only ``history`` and the store's
reads are touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from tally.actors.day_blocks import DayBlocks
from tally.actors.history import MISSING, History, Month, peak_of
from tally.actors.live_series import LiveSeries
from tally.checkpoint.store import MonthDoc, MonthKey
from tally.wire.timeslots import month_days, month_name, month_of

Load = Callable[[list[MonthKey]], dict[MonthKey, MonthDoc]]  # reads month documents


class Span(NamedTuple):
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


class Reads:
    """Queries over a shard's live series and day blocks, and the stored months it read."""

    def __init__(self, live: LiveSeries, blocks: DayBlocks, history: History) -> None:
        self.live = live
        self.blocks = blocks
        self.history = history  # stored months other than those live

    def _gather(
        self, tenant: str, metric: str, where: dict[str, str], h0: int, h1: int
    ) -> tuple[list[int], np.ndarray, list[MonthKey]]:
        """Matching series, their counts per hour of [h0, h1) (series x hours), months held.

        Live months only: what this shard holds in memory (the model test and tools read
        it; queries use ``per_hour``, which answers stored months too)."""
        series = self.live.matching(tenant, metric, where)
        d0, d1 = h0 // 24, (h1 - 1) // 24 + 1
        first_m, last_m = month_of(h0), month_of(h1 - 1)
        covered: list[MonthKey] = []
        held: list[int] = []
        sids = self.live.sids
        for m in range(first_m, last_m + 1):
            holding = self.live.holding(m, series)  # type: ignore[arg-type]
            if not holding.any():
                continue
            name = month_name(m)
            for g in np.asarray(series, np.int64)[holding].tolist():
                covered.append((sids[g], name))  # type: ignore[arg-type]
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
        sids = self.live.sids
        return {sids[g]: s for g, s in zip(series, sums, strict=True)}, covered  # type: ignore

    def per_hour(
        self, sids: list[str], h0: int, h1: int, load: Load
    ) -> np.ndarray:
        """Counts per hour of [h0, h1) of each of ``sids`` (one row each), stored months included.

        The gateway sends a series only to the shard that owns it, so this
        answers for every month: those held live from their blocks, the others
        from ``self.history`` or, the first time, the store. As in ingest,
        ``load`` runs synchronously: nothing may touch the state between finding
        a month not held and using what was read.
        """
        return self._dense(self._spans(sids, h0, h1, load), len(sids), h0, h1)

    def _spans(self, sids: list[str], h0: int, h1: int, load: Load) -> list[Span]:
        """Per UTC month of [h0, h1): which of ``sids`` it holds live, the stored months of
        the others (read from the store the first time, see ``per_hour``)."""
        if h1 <= h0:
            return []
        get_series, history = self.live.series.get, self.history
        numbers = [get_series(sid) for sid in sids]  # once per call, not once per month
        first_m, last_m = month_of(h0), month_of(h1 - 1)
        spans: list[Span] = []
        # per month some of sids do not hold live: (span, month, positions or None: all)
        wanted: list[tuple[int, int, set[int] | None]] = []
        for m in range(first_m, last_m + 1):
            m_first, m_end = month_days(m)
            span = Span(max(h0, m_first * 24), min(h1, m_end * 24), m_first * 24,
                        (m_end - m_first) * 24, [], [], [])
            spans.append(span)
            holding = self.live.holding(m, numbers)
            if not holding.any():  # none live: a stored month
                wanted.append((len(spans) - 1, m, None))
            elif holding.all():  # all live: the current month, usually
                span.live_rows.extend(range(len(sids)))
                span.live_series.extend(numbers)  # type: ignore[arg-type]
            else:
                rest: set[int] = set()
                for i, (g, live) in enumerate(zip(numbers, holding.tolist(), strict=True)):
                    if live:
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

    def _dense(self, spans: list[Span], n: int, h0: int, h1: int) -> np.ndarray:
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
        """Block rows of days [lo, hi) of each series (series x days), -1 where none: a
        gather per (series, day) from the day tables, however many are asked."""
        n, days = len(series), hi - lo
        g = np.repeat(np.array(series, np.int64), days)
        span = np.tile(np.arange(lo, hi, dtype=np.int64), n)
        return self.blocks.find(g, span).reshape(n, days)

    def _day_counts(self, series: list[int], lo: int, hi: int) -> np.ndarray:
        """Counts of days [lo, hi) of each series, one row of (hi - lo) * 24 hours per series."""
        rows = self._block_rows(series, lo, hi).ravel()
        present = rows >= 0
        counts = np.zeros((len(rows), 24), np.int64)
        counts[present] = self.blocks.row_counts(rows[present])
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
        blocks = self.blocks.row_counts(found)
        if peak_of(blocks) > limit:
            return None
        sums = np.einsum("ij->i", blocks)  # int64 like .sum(axis=1), and faster on rows of 24
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
        self, sids: list[str], h0: int, h1: int, load: Load
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
        self, sids: list[str], h0: int, h1: int, load: Load
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

