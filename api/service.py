"""The gateway's logic, shared by the TCP and HTTP shells: ingest and queries.

Queries merge two disjoint sources. Shards answer for every (series, month)
they hold — complete totals, base included — and name those months; the
store answers for all other months. Shards are asked first: a month a shard
picks up after its answer was taken is read from the store, which then
already holds everything acknowledged before the query began.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from actors.clients import ShardClient
from actors.router import Router
from api.timerange import Plan, bucket_points
from checkpoint.store import MonthKey, Store
from wire.batches import Batch
from wire.series import SeriesKey, parse_series_id
from wire.timeslots import months_between


class IngestError(Exception):
    """A batch was refused as a whole; ``code`` is a wire-protocol error code."""

    def __init__(self, code: str, message: str, row: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.row = row


class Service:
    def __init__(
        self, shards: ShardClient, store: Store, clock: Callable[[], float] = time.time
    ) -> None:
        self.shards = shards
        self.store = store
        self.router = Router(shards.shards)
        self.clock = clock
        self.increments = 0
        self.batches = 0

    # ---- ingest --------------------------------------------------------

    async def ingest(self, batch: Batch) -> int:
        """Apply a validated batch on every shard it touches, all or nothing."""
        parts = self.router.split(batch)
        order = list(parts)
        results = await asyncio.gather(
            *(self.shards.apply(s, parts[s]) for s in order), return_exceptions=True
        )
        refused = {s: r for s, r in zip(order, results, strict=True) if r is not None}
        if refused:
            applied = [s for s in order if s not in refused]
            await asyncio.gather(*(self.shards.revert(s, parts[s]) for s in applied))
            raise self._refusal(parts, refused)
        self.increments += batch.increments
        self.batches += 1
        return batch.increments

    @staticmethod
    def _refusal(parts: dict[int, Batch], refused: dict[int, Any]) -> IngestError:
        crashed = [(s, r) for s, r in refused.items() if isinstance(r, BaseException)]
        if crashed:
            s, e = crashed[0]
            return IngestError("internal", f"shard {s} failed: {e}; nothing was applied")
        overloaded = [r for r in refused.values() if r["code"] == "overloaded"]
        if overloaded:
            return IngestError("overloaded", overloaded[0]["message"])
        s, r = min(
            refused.items(), key=lambda sr: int(parts[sr[0]].first_row[sr[1]["aggregate"]])
        )
        row = int(parts[s].first_row[r["aggregate"]])
        return IngestError("bad_row", f"row {row}: {r['message']}", row=row)

    # ---- queries -------------------------------------------------------

    async def _gather(self, method: str, *args: Any) -> list[Any]:
        return await asyncio.gather(
            *(getattr(self.shards, method)(s, *args) for s in range(self.shards.shards))
        )

    async def _stored(
        self, tenant: str, metric: str, where: dict[str, str], h0: int, h1: int
    ) -> list:
        return await asyncio.to_thread(
            self.store.read_months, tenant, metric, where, months_between(h0, h1)
        )

    async def hourly(
        self, tenant: str, metric: str, where: dict[str, str], h0: int, h1: int
    ) -> np.ndarray:
        """Counts per UTC hour of [h0, h1), every matching series summed."""
        answers = await self._gather("hourly", tenant, metric, where, h0, h1)
        out = np.zeros(h1 - h0, dtype=np.int64)
        covered: set[MonthKey] = set()
        for arr, keys in answers:
            out += arr
            covered.update(keys)
        for doc in await self._stored(tenant, metric, where, h0, h1):
            if (doc.sid, doc.month) in covered:
                continue
            for h, v in doc.hours.items():
                if h0 <= h < h1:
                    out[h - h0] += v
        return out

    async def totals(
        self, tenant: str, metric: str, where: dict[str, str], h0: int, h1: int
    ) -> dict[str, int]:
        """Per-series totals over [h0, h1)."""
        answers = await self._gather("totals", tenant, metric, where, h0, h1)
        out: dict[str, int] = defaultdict(int)
        covered: set[MonthKey] = set()
        for per_series, keys in answers:
            for sid, v in per_series.items():
                out[sid] += v
            covered.update(keys)
        for doc in await self._stored(tenant, metric, where, h0, h1):
            if (doc.sid, doc.month) in covered:
                continue
            out[doc.sid] += sum(v for h, v in doc.hours.items() if h0 <= h < h1)
        return out

    async def series(
        self,
        tenant: str,
        metric: str,
        where: dict[str, str],
        plan: Plan,
        compare: Plan | None = None,
    ) -> dict[str, Any]:
        plans = [plan] if compare is None else [plan, compare]
        hourlies = await asyncio.gather(
            *(self.hourly(tenant, metric, where, p.h0, p.h1) for p in plans)
        )
        points = bucket_points(plan, hourlies[0])
        total = int(hourlies[0].sum())
        answer: dict[str, Any] = {
            "tenant": tenant,
            "metric": metric,
            "where": where,
            "granularity": plan.granularity,
            "tz": plan.tz,
            "from": plan.from_label,
            "to": plan.to_label,
            "points": points,
            "total": total,
            "compare": None,
        }
        if compare is not None:
            prev_total = int(hourlies[1].sum())
            answer["compare"] = {
                "from": compare.from_label,
                "to": compare.to_label,
                "points": bucket_points(compare, hourlies[1]),
                "total": prev_total,
                "change": (total - prev_total) / prev_total if prev_total else None,
            }
        return answer

    async def breakdown(
        self, tenant: str, metric: str, by: str, where: dict[str, str], plan: Plan, limit: int
    ) -> dict[str, Any]:
        """Totals per value of tag ``by``; series without that tag group under null."""
        per_series = await self.totals(tenant, metric, where, plan.h0, plan.h1)
        groups: dict[str | None, int] = defaultdict(int)
        for sid, v in per_series.items():
            groups[parse_series_id(sid).tag_dict().get(by)] += v
        ranked = sorted(
            ((value, t) for value, t in groups.items() if t),
            key=lambda vt: (-vt[1], vt[0] is None, vt[0] or ""),
        )
        return {
            "tenant": tenant,
            "metric": metric,
            "by": by,
            "where": where,
            "tz": plan.tz,
            "from": plan.from_label,
            "to": plan.to_label,
            "groups": [{"value": v, "total": t} for v, t in ranked[:limit]],
            "other": sum(t for _, t in ranked[limit:]),
            "total": sum(t for _, t in ranked),
        }

    async def catalog(self, tenant: str, max_values: int = 100) -> dict[str, Any]:
        """Metrics of a tenant with their tag keys and (up to ``max_values``) values."""
        live = await self._gather("catalog", tenant)
        stored = await asyncio.to_thread(self.store.catalog, tenant)
        keys: dict[str, SeriesKey] = {k.sid: k for k in stored}
        for sids in live:
            for sid in sids:
                if sid not in keys:
                    keys[sid] = parse_series_id(sid)
        metrics: dict[str, dict[str, Any]] = {}
        for key in keys.values():
            m = metrics.setdefault(key.metric, {"metric": key.metric, "series": 0, "tags": {}})
            m["series"] += 1
            for k, v in key.tags:
                m["tags"].setdefault(k, set()).add(v)
        out = []
        for name in sorted(metrics):
            m = metrics[name]
            m["tags"] = {k: sorted(vs)[:max_values] for k, vs in sorted(m["tags"].items())}
            out.append(m)
        return {"tenant": tenant, "metrics": out}
