"""Which series a metric has, so that a query calls only the shards owning the matches.

A query for one series of a metric used to ask every shard; with four shards
that fan-out alone cost more than the whole query budget. The gateway now keeps
the series of each metric it has been asked about: loaded on the first query
from the store's catalog and from the series the shards hold live, then kept
current by this gateway's own ingest. ``saw`` runs after every shard applied a
batch and before the ack is sent, and a load registers its entry before it
asks the shards, so an acknowledged series is always found (read your writes):
either the entry existed when the batch was seen, or the shards had the series
when the entry was loaded.

Series ingested through another gateway reach this index only through a load;
with one gateway per node (issue 7) the gateways must also tell each other of
new series before acknowledging them. Bounded: least recently queried metrics
are forgotten first and loaded again when asked for.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple

import numpy as np

from tally.actors.router import Router
from tally.wire.series import SeriesKey, matches, parse_series_id

DEFAULT_MAX_SERIES = 2_000_000
MATCH_CACHE = 1_000  # where filters remembered per metric
BY_TAG_CACHE = 100  # (where, tag) breakdown groupings remembered per metric
PARSE_CACHE = 200_000  # series ids whose parsed keys ``saw`` keeps

Loader = Callable[[str, str], Awaitable[Iterable[str]]]


class Grouping(NamedTuple):
    """A breakdown's series: by owning shard, each with the index of its group in ``values``.

    Worked out once per (filter, tag) while the metric gains no series, so a
    breakdown over 1,000 series adds each shard's totals into a list by index
    instead of rebuilding every series' tag dict and sorting by value each time.
    """

    owners: dict[int, list[str]]  # shard -> matching sids it owns (as ``groups`` answers)
    group_of: dict[int, list[int]]  # shard -> group index of each of owners[shard]
    # the tag's values, None (no such tag) last: how a breakdown orders equal totals
    values: list[str | None]


class _Metric:
    __slots__ = ("keys", "loading", "groups", "by_tag")

    def __init__(self) -> None:
        self.keys: dict[str, SeriesKey] = {}
        self.loading: asyncio.Task | None = None
        # where (sorted pairs) -> shard -> matching sids; cleared when a series is added
        self.groups: dict[tuple[tuple[str, str], ...], dict[int, list[str]]] = {}
        # (where, tag) -> its grouping; cleared with ``groups``
        self.by_tag: dict[tuple[tuple[tuple[str, str], ...], str], Grouping] = {}

    def add(self, sid: str, key: SeriesKey) -> None:
        if sid not in self.keys:
            self.keys[sid] = key
            self.groups.clear()
            self.by_tag.clear()


class SeriesIndex:
    def __init__(self, router: Router, load: Loader, max_series: int = DEFAULT_MAX_SERIES) -> None:
        self.router = router
        self._load = load  # (tenant, metric) -> every sid the store or a shard knows
        self.max_series = max_series
        self._metrics: OrderedDict[tuple[str, str], _Metric] = OrderedDict()
        self._parsed: dict[str, SeriesKey] = {}  # batches bring the same series again and again
        self.series = 0  # held over all metrics
        # ``saw`` with gateway numbers (wire/registry.py): the generation each number was
        # last checked in; a new entry starts a new generation, so every series is checked
        # against it once, and a wide batch of series already checked costs numpy alone
        self.generation = 0
        self._seen = np.full(0, -1, np.int64)
        self._seen_epoch = 0

    def saw(self, sids: list[str], gn: np.ndarray | None = None, epoch: int = 0) -> None:
        """Series of a batch every shard has applied; call before acknowledging it.

        Checked against the entries every time, not once per series id: a
        series known here may still be missing from an entry loaded later (the
        connection fuzzer found one: a series first named by a resend, whose
        rows are never applied, so no shard or catalog had it at the load).
        """
        metrics = self._metrics
        if not metrics:
            return
        if gn is not None and len(gn):
            if epoch != self._seen_epoch or len(self._seen) <= int(gn.max()):
                seen = np.full(max(int(gn.max()) + 1, 2 * len(self._seen)), -1, np.int64)
                if epoch == self._seen_epoch:
                    seen[: len(self._seen)] = self._seen
                self._seen, self._seen_epoch = seen, epoch
            stale = np.flatnonzero(self._seen[gn] != self.generation)
            self._seen[gn[stale]] = self.generation
            sids = [sids[k] for k in stale.tolist()]
        parsed = self._parsed
        for sid in sids:
            key = parsed.get(sid)
            if key is None:
                if len(parsed) >= PARSE_CACHE:
                    parsed.clear()  # only costs re-parsing
                key = parsed[sid] = parse_series_id(sid)
            entry = metrics.get((key.tenant, key.metric))
            if entry is not None and sid not in entry.keys:
                entry.add(sid, key)
                self.series += 1

    async def groups(
        self, tenant: str, metric: str, where: dict[str, str]
    ) -> tuple[dict[int, list[str]], dict[str, SeriesKey]]:
        """Shard -> the metric's series whose tags include ``where``, owned by that shard;
        and every series of the metric by id (for their tags)."""
        entry = await self._entry(tenant, metric)
        return self._groups(entry, where), entry.keys

    async def grouping(self, tenant: str, metric: str, where: dict[str, str], by: str) -> Grouping:
        """The metric's series whose tags include ``where``, by shard and by value of ``by``."""
        entry = await self._entry(tenant, metric)
        # no await from here on: what is cached matches entry.keys as it is now
        ck = (tuple(sorted(where.items())), by)
        found = entry.by_tag.get(ck)
        if found is None:
            owners = self._groups(entry, where)
            keys = entry.keys
            value_of = {sid: dict(keys[sid].tags).get(by)
                        for sids in owners.values() for sid in sids}
            values = sorted(set(value_of.values()), key=lambda v: (v is None, v or ""))
            index = {v: k for k, v in enumerate(values)}
            group_of = {s: [index[value_of[sid]] for sid in sids] for s, sids in owners.items()}
            found = Grouping(owners, group_of, values)
            if len(entry.by_tag) >= BY_TAG_CACHE:
                entry.by_tag.clear()
            entry.by_tag[ck] = found
        return found

    def _groups(self, entry: _Metric, where: dict[str, str]) -> dict[int, list[str]]:
        wk = tuple(sorted(where.items()))
        found = entry.groups.get(wk)
        if found is None:
            grouped: dict[int, list[str]] = defaultdict(list)
            shard = self.router.shard
            for sid, key in entry.keys.items():
                if matches(key.tags, where):
                    grouped[shard(sid)].append(sid)
            found = dict(grouped)
            if len(entry.groups) >= MATCH_CACHE:
                entry.groups.clear()
            entry.groups[wk] = found
        return found

    async def _entry(self, tenant: str, metric: str) -> _Metric:
        name = (tenant, metric)
        entry = self._metrics.get(name)
        if entry is None:
            # registered before the shards are asked: batches seen meanwhile land in it
            entry = self._metrics[name] = _Metric()
            self.generation += 1
            entry.loading = asyncio.get_running_loop().create_task(self._fill(name, entry))
        else:
            self._metrics.move_to_end(name)
        if entry.loading is not None:
            # shielded: one caller giving up must not cancel the load the others wait for
            await asyncio.shield(entry.loading)
        return entry

    async def _fill(self, name: tuple[str, str], entry: _Metric) -> None:
        try:
            sids = await self._load(*name)
        except BaseException:
            if self._metrics.get(name) is entry:
                del self._metrics[name]  # the next query loads again
                self.series -= len(entry.keys)
            raise
        before = len(entry.keys)
        for sid in sids:
            if sid not in entry.keys:
                entry.add(sid, parse_series_id(sid))
        self.series += len(entry.keys) - before
        entry.loading = None
        self._trim(keep=name)

    def _trim(self, keep: tuple[str, str]) -> None:
        while self.series > self.max_series and len(self._metrics) > 1:
            name, entry = next(iter(self._metrics.items()))
            if name == keep:
                self._metrics.move_to_end(name)
                continue
            if entry.loading is not None:
                break  # a load in flight holds its entry
            del self._metrics[name]
            self.series -= len(entry.keys)
