"""The series a shard holds, by small number, and which UTC months of each it holds live.

A series id is a string; day blocks, the recent days' arrays and query scans
want a small integer instead (actors/day_blocks.py), so each series here gets
a number, recycled once the series is forgotten. The numbers are indexed by
(tenant, metric) for queries and catalogs.

A month is *live* for a series once its stored base is loaded: from then on
the shard's counts for it are complete, and the store's copy is not read
again. A batch may touch a month only after it is live (``missing`` says which
to load first); ``evict`` in ShardState makes clean ones stored-only again.
"""

from __future__ import annotations

from itertools import repeat

import numpy as np

from tally.actors.day_blocks import MONTH_BITS
from tally.checkpoint.store import MonthKey
from tally.wire.batches import Batch
from tally.wire.series import matches, parse_series_id
from tally.wire.timeslots import month_name, months_of_hours


class LiveSeries:
    """Series numbers and their ids; the live months of each.

    A series' parsed key (its tenant, metric and tags as objects) is not kept: its
    small objects were a large part of what each series costs a shard, and only a
    filter by tags (``matching``, which tools and the model test use; queries go
    by id) needs the tags, which it parses from the id then.
    """

    def __init__(self) -> None:
        self.series: dict[str, int] = {}  # sid -> series number
        self.sids: list[str | None] = []  # series number -> its sid (None: free)
        self._free: list[int] = []
        self._months_held = np.zeros(0, dtype=np.int32)  # per series: months live
        # per series number: bumped whenever the number is given to a series or freed, so
        # a number cached elsewhere with its generation (actors/channel_table.py) is
        # known stale once the number means another series, or none
        self.gen = np.zeros(0, dtype=np.int64)
        self.by_metric: dict[tuple[str, str], set[int]] = {}
        # month number -> a bool per series number: whether it holds that month live
        # (a batch is checked with a gather, ``_all_loaded``), and how many do. (A set
        # of numbers per month beside them cost a set entry and an int object per
        # series-month: see docs/performance.md, Memory.)
        self._held: dict[int, np.ndarray] = {}
        self._holding: dict[int, int] = {}
        self._match_cache: dict[tuple, list[int]] = {}

    def __len__(self) -> int:
        return len(self.series)

    @property
    def count(self) -> int:
        """A bound on series numbers: every number in use is below it."""
        return len(self.sids)

    def numbers(self, sids: list[str]) -> np.ndarray:
        """Series numbers of ``sids`` (-1: not held)."""
        # map() with a repeated default looks each up in C: no Python frame per sid
        return np.fromiter(map(self.series.get, sids, repeat(-1)), np.int64, len(sids))

    def add(self, sid: str) -> int:
        if self._free:
            g = self._free.pop()
            self.sids[g] = sid
        else:
            g = len(self.sids)
            self.sids.append(sid)
            if g >= len(self._months_held):
                self._months_held = np.concatenate(
                    [self._months_held, np.zeros(max(1024, g), np.int32)]
                )
                self.gen = np.concatenate([self.gen, np.zeros(max(1024, g), np.int64)])
        self._months_held[g] = 0
        self.gen[g] += 1
        self.series[sid] = g
        self.by_metric.setdefault(_metric_of(sid), set()).add(g)
        self._match_cache.clear()
        return g

    def drop(self, g: int) -> None:
        """Forget series ``g`` (it holds no month live); its number is free for another."""
        sid = self.sids[g]
        assert sid is not None
        del self.series[sid]
        metric = _metric_of(sid)
        members = self.by_metric[metric]
        members.discard(g)
        if not members:
            del self.by_metric[metric]
        self.sids[g] = None
        self.gen[g] += 1
        self._free.append(g)
        self._match_cache.clear()

    # ---- live months -----------------------------------------------------

    def release(self, g: int, mno: int) -> int:
        """Series ``g`` no longer holds month ``mno`` live; how many months it still holds."""
        held = self._held[mno]
        if held[g]:
            held[g] = False
            self._holding[mno] -= 1
            self._months_held[g] -= 1
            if not self._holding[mno]:
                del self._held[mno], self._holding[mno]
        return int(self._months_held[g])

    @property
    def series_months(self) -> int:
        return sum(self._holding.values())

    def months(self) -> list[int]:
        """The month numbers some series holds live."""
        return list(self._holding)

    def holders(self, mno: int) -> np.ndarray:
        """The series numbers holding month ``mno`` live, ascending."""
        held = self._held.get(mno)
        return np.zeros(0, np.int64) if held is None else np.flatnonzero(held)

    def holding(self, mno: int, numbers: list[int | None]) -> np.ndarray:
        """Whether each of ``numbers`` (None: a series not held) holds month ``mno`` live."""
        out = np.zeros(len(numbers), np.bool_)
        held = self._held.get(mno)
        if held is None:
            return out
        g = np.fromiter((-1 if n is None else n for n in numbers), np.int64, len(numbers))
        ok = (g >= 0) & (g < len(held))
        out[ok] = held[g[ok]]
        return out

    def missing(self, batch: Batch, numbers: np.ndarray | None = None,
                at: np.ndarray | None = None) -> list[MonthKey]:
        """(series, month) pairs of the batch not live yet; ``numbers``: the series
        numbers of its sids, if known; ``at``: only these aggregates, if given.

        A backfill over a year names hundreds of thousands of such pairs in a few
        batches, so they are found with a mask per month, not a step per pair."""
        if not len(batch):
            return []
        if numbers is None:
            numbers = self.numbers(batch.sids)
        series, hours = batch.series, batch.hours
        if at is not None:
            series, hours = series[at], hours[at]
        if self._all_loaded(series, hours, numbers):
            return []
        pairs = np.unique(series.astype(np.int64) << MONTH_BITS | months_of_hours(hours))
        s = pairs >> MONTH_BITS
        m = pairs & ((1 << MONTH_BITS) - 1)
        g = numbers[s]
        need = g < 0
        names = {}
        for mno in np.unique(m).tolist():
            names[mno] = month_name(mno)
            held = self._held.get(mno)
            if held is None:
                need[m == mno] = True
                continue
            at_m = np.flatnonzero((m == mno) & ~need)
            gm = g[at_m]
            live = gm < len(held)
            live[live] = held[gm[live]]
            need[at_m[~live]] = True
        if not need.all():
            s, m = s[need], m[need]
        sids = batch.sids
        named = (list(map(sids.__getitem__, s.tolist())) if isinstance(sids, list)
                 else sids[s].tolist())
        return list(zip(named, map(names.__getitem__, m.tolist()), strict=True))

    def hold_many(self, g: np.ndarray, mnos: np.ndarray) -> np.ndarray:
        """Each (series number, month number) pair is held live from now on; which pairs
        were not held before (a pair named twice counts once, at its first place)."""
        fresh = np.zeros(len(g), np.bool_)
        for mno in np.unique(mnos).tolist():
            at_m = np.flatnonzero(mnos == mno)
            gm = g[at_m]
            held = self._held.get(mno)
            top = int(gm.max())
            if held is None or top >= len(held):
                grown = np.zeros(max(1024, 2 * top + 1, len(self.sids)), np.bool_)
                if held is not None:
                    grown[:len(held)] = held
                held = self._held[mno] = grown
            _, first = np.unique(gm, return_index=True)
            first = first[~held[gm[first]]]
            if not len(first):
                continue
            new = gm[first]
            held[new] = True
            self._holding[mno] = self._holding.get(mno, 0) + len(new)
            self._months_held[new] += 1
            fresh[at_m[first]] = True
        return fresh

    def _all_loaded(self, series: np.ndarray, hours: np.ndarray, numbers: np.ndarray) -> bool:
        """Whether every (series, month) of these aggregates is live: a gather of bools
        per month, not a Python step per pair (the usual batch: yes)."""
        if not len(series):
            return True
        if len(numbers) and int(numbers.min()) < 0:
            return False
        g = numbers[series.astype(np.intp)]
        months = months_of_hours(hours)
        lo, hi = int(months.min()), int(months.max())
        # a mask per month of the range when it is short (a sort costs more)
        present = range(lo, hi + 1) if hi - lo < 64 else np.unique(months).tolist()
        per_month = [(lo, g)] if lo == hi else [(m, g[months == m]) for m in present]
        for m, gm in per_month:
            if not len(gm):
                continue
            held = self._held.get(m)
            if held is None or int(gm.max()) >= len(held) or not held[gm].all():
                return False
        return True

    # ---- lookups ---------------------------------------------------------

    def matching(self, tenant: str, metric: str, where: dict[str, str]) -> list[int]:
        """Numbers of the metric's series whose tags match ``where``, ascending."""
        ck = (tenant, metric, tuple(sorted(where.items())))
        found = self._match_cache.get(ck)
        if found is None:
            members = self.by_metric.get((tenant, metric), ())
            sids = self.sids
            found = sorted(
                g for g in members
                if matches(parse_series_id(sids[g]).tags, where)  # type: ignore[arg-type]
            ) if where else sorted(members)
            if len(self._match_cache) > 10_000:
                self._match_cache.clear()
            self._match_cache[ck] = found
        return found

    def series_of(self, tenant: str, metric: str) -> list[str]:
        """The metric's series this shard holds live (the store's catalog may lag behind)."""
        sids = self.sids
        return [sids[g] for g in self.by_metric.get((tenant, metric), ())]  # type: ignore[misc]

    def catalog(self, tenant: str) -> list[str]:
        sids = self.sids
        return [sids[g] for (t, _), members in self.by_metric.items() if t == tenant  # type: ignore
                for g in members]


def _metric_of(sid: str) -> tuple[str, str]:
    """(tenant, metric) of a canonical series id (neither holds a ``|``)."""
    tenant, metric, _ = sid.split("|", 2)
    return tenant, metric
