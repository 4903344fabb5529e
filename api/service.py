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
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.clients import ShardClient
from actors.router import Router
from actors.shard_state import exact_sum
from api.durability import DurableTracker, Token
from api.metrics import GatewayMetrics
from api.producers import Producers
from api.timerange import Plan, bucket_points
from checkpoint.store import MonthKey, Store
from wire.batches import Batch
from wire.series import SeriesKey, parse_series_id
from wire.timeslots import months_between


class IngestError(Exception):
    """A batch was refused as a whole; ``code`` is a wire-protocol error code."""

    def __init__(
        self, code: str, message: str, row: int | None = None, fatal: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.row = row
        self.fatal = fatal  # the connection must close: the client reconnects and resends


@dataclass(slots=True)
class Applied:
    rows: int  # increments in the batch
    token: Token  # what to wait for until it is durable (api.durability)
    fresh: bool = True  # applied on some shard (False: a resend every shard had already)


EMPTY = Batch.empty()
TAG_CACHE = 200_000  # series whose parsed tags a gateway keeps for breakdowns


class Service:
    def __init__(
        self, shards: ShardClient, store: Store, clock: Callable[[], float] = time.time
    ) -> None:
        self.shards = shards
        self.store = store
        self.router = Router(shards.shards)
        self.clock = clock
        self.producers = Producers()
        self.tracker = DurableTracker(shards.shards, shards.wait_checkpoint)
        self.increments = 0
        self.batches = 0
        self._tag_cache: dict[str, dict[str, str]] = {}
        # counted by the ingress shells, which also see refusals that never get here
        self.metrics = GatewayMetrics()

    def start(self) -> None:
        """Start the durability watchers; needs the running event loop."""
        self.tracker.start()

    async def durable_seq(self, producer: str) -> int:
        """Every batch of the producer up to this seq is durable on every shard (0: none)."""
        marks = await self._gather("durable_mark", producer)
        return max(0, min(marks))

    # ---- ingest --------------------------------------------------------

    async def ingest(
        self, batch: Batch, producer: str | None = None, seq: int | None = None,
        epoch: int | None = None,
    ) -> Applied:
        """Apply a validated batch on every shard, all or nothing, once per (producer, seq).

        Without a producer the batch goes to the shards it touches and nothing
        guards against a resend. With one, it goes to every shard (empty where
        it has no rows) in the producer's seq order, so each shard's mark for
        the producer moves with every batch and a resend is recognised.
        """
        parts = self.router.split(batch)
        if producer is None:
            applied = await self._apply(parts, list(parts), None, None, None)
        else:
            assert seq is not None
            st = self.producers.get(producer)
            async with st.lock:
                if epoch is not None and epoch != st.epoch:
                    raise IngestError(
                        "bad_request",
                        f"producer {producer!r} connected again elsewhere: this connection "
                        "is fenced",
                        fatal=True,
                    )
                if st.blocked_at is not None and seq > st.blocked_at:
                    raise IngestError(
                        "overloaded",
                        f"seq {st.blocked_at} of producer {producer!r} was refused and must "
                        f"be resent before seq {seq}",
                    )
                try:
                    applied = await self._apply(
                        parts, range(self.shards.shards), producer, seq, st.last_seq
                    )
                except IngestError as e:
                    if e.code == "bad_row":
                        # permanent: the client drops the batch; later seqs may pass
                        st.blocked_at = None
                    else:
                        st.blocked_at = seq if st.blocked_at is None else st.blocked_at
                        if e.fatal:
                            st.last_seq = None
                    raise
                if st.blocked_at is not None and seq >= st.blocked_at:
                    st.blocked_at = None
                fenced_meanwhile = epoch is not None and epoch != st.epoch
                # A resend every shard already had says nothing about their marks
                # (they may be further on), so it must not become the next expect.
                if not fenced_meanwhile and applied.fresh and (
                        st.last_seq is None or seq > st.last_seq):
                    st.last_seq = seq
        self.increments += batch.increments
        self.batches += 1
        return applied

    async def _apply(
        self,
        parts: dict[int, Batch],
        shards: Any,
        producer: str | None,
        seq: int | None,
        expect: int | None,
    ) -> Applied:
        order = list(shards)
        sent = [parts.get(s) or EMPTY for s in order]
        results = await asyncio.gather(
            *(self.shards.apply(s, b, producer, seq, expect) for s, b in zip(order, sent,
                                                                            strict=True)),
            return_exceptions=True,
        )
        answers = dict(zip(order, results, strict=True))
        refused = {
            s: r for s, r in answers.items() if isinstance(r, BaseException) or "code" in r
        }
        if refused:
            undo = [s for s, r in answers.items() if s not in refused and r["status"] == "applied"]
            await asyncio.gather(*(self.shards.revert(s, parts.get(s) or EMPTY, producer)
                                   for s in undo))
            raise self._refusal(parts, refused)
        token = {s: (r["incarnation"], r["ck"]) for s, r in answers.items()}
        rows = sum(b.increments for b in sent)
        fresh = any(r["status"] == "applied" for r in answers.values())
        return Applied(rows=rows, token=token, fresh=fresh)

    @staticmethod
    def _refusal(parts: dict[int, Batch], refused: dict[int, Any]) -> IngestError:
        crashed = [(s, r) for s, r in refused.items() if isinstance(r, BaseException)]
        if crashed:
            s, e = crashed[0]
            return IngestError(
                "overloaded", f"shard {s} is restarting ({type(e).__name__}); nothing was "
                "applied: reconnect and resend from the last durable seq", fatal=True,
            )
        gaps = [r for r in refused.values() if r["code"] == "gap"]
        if gaps:
            return IngestError("overloaded", gaps[0]["message"], fatal=True)
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
        self, tenant: str, metric: str, where: dict[str, str], h0: int, h1: int,
        covered: set[MonthKey],
    ) -> list:
        """Stored months the shards did not answer for."""
        return await asyncio.to_thread(
            self.store.read_months, tenant, metric, where, months_between(h0, h1), covered
        )

    async def hourly(
        self, tenant: str, metric: str, where: dict[str, str], h0: int, h1: int
    ) -> np.ndarray:
        """Counts per UTC hour of [h0, h1), every matching series summed."""
        answers = await self._gather("hourly", tenant, metric, where, h0, h1)
        covered: set[MonthKey] = set()
        for _, keys in answers:
            covered.update(keys)
        stored = np.zeros((1, h1 - h0), dtype=np.int64)
        docs = [d for d in await self._stored(tenant, metric, where, h0, h1, covered)
                if (d.sid, d.month) not in covered]
        if docs:
            stored = np.zeros((len(docs), h1 - h0), dtype=np.int64)
            for k, doc in enumerate(docs):
                for h, v in doc.hours.items():
                    if h0 <= h < h1:
                        stored[k, h - h0] = v
        parts = [np.asarray(arr) for arr, _ in answers]
        if any(p.dtype == object for p in parts):
            return sum(parts, exact_sum(stored, axis=0).astype(object))
        return exact_sum(np.vstack([*parts, stored]), axis=0)

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
        for doc in await self._stored(tenant, metric, where, h0, h1, covered):
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
        total = sum(v for _, v in points)
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
            prev_points = bucket_points(compare, hourlies[1])
            prev_total = sum(v for _, v in prev_points)
            answer["compare"] = {
                "from": compare.from_label,
                "to": compare.to_label,
                "points": prev_points,
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
        tags_of = self._tags_of
        for sid, v in per_series.items():
            groups[tags_of(sid).get(by)] += v
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

    def _tags_of(self, sid: str) -> dict[str, str]:
        """A series' tags; parsed once per series, not once per breakdown (bounded cache)."""
        tags = self._tag_cache.get(sid)
        if tags is None:
            if len(self._tag_cache) >= TAG_CACHE:
                self._tag_cache.clear()
            tags = self._tag_cache[sid] = parse_series_id(sid).tag_dict()
        return tags

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
