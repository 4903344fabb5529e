"""The gateway's logic, shared by the TCP and HTTP shells: ingest and queries.

A query finds the matching series in the gateway's series index
(api/series_index.py) and asks only the shards that own them; each shard
answers for every month of its series, live or stored, because it is the only
writer of their month documents (actors/history.py). One shard sees one
consistent state, so an increment is counted once even while a checkpoint is
in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tally.actors.channel import AnswerLost
from tally.actors.clients import ShardClient
from tally.actors.reads import exact_sum
from tally.actors.router import Router
from tally.api.durability import DurableTracker, Token
from tally.api.metrics import GatewayMetrics
from tally.api.peers import Peers, Tell
from tally.api.producers import Producers
from tally.api.series_index import SeriesIndex
from tally.api.timerange import Plan, bucket_points
from tally.checkpoint.store import Store
from tally.wire.batches import Batch
from tally.wire.series import SeriesKey, parse_series_id
from tally.wire.vocabulary import ErrorCode

log = logging.getLogger("tally.service")


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
    new: list[str] = field(default_factory=list)  # series some shard did not hold before


EMPTY = Batch.empty()


async def _no_peer(peer: Any, sids: list[str]) -> None:
    raise AssertionError("a service without a way to reach peers was given some")


class Service:
    def __init__(
        self, shards: ShardClient, store: Store, clock: Callable[[], float] = time.time,
        tell_peer: Tell | None = None,
        ask_peer_metrics: Callable[[Any], Awaitable[str]] | None = None,
    ) -> None:
        self.shards = shards
        self.store = store
        self.router = Router(shards.shards)
        self.clock = clock
        self.producers = Producers()
        self.tracker = DurableTracker(shards.shards, shards.wait_checkpoint)
        self.increments = 0
        self.batches = 0
        self.index = SeriesIndex(self.router, self._series_of)
        # the other gateways (none in-process); their indexes hear of new series before an ack
        self.peers = Peers(tell_peer or _no_peer)
        self._ask_peer_metrics = ask_peer_metrics
        # counted by the ingress shells, which also see refusals that never get here
        self.metrics = GatewayMetrics()

    def start(self) -> None:
        """Start the durability watchers; needs the running event loop."""
        self.tracker.start()

    async def peer_metrics(self) -> dict[str, str | BaseException]:
        """The other gateways' own samples (api/metrics.py), by gateway name."""
        if self._ask_peer_metrics is None or not self.peers.handles:
            return {}
        return await self.peers.ask(self._ask_peer_metrics)

    async def durable_seq(self, producer: str) -> int:
        """Every batch of the producer up to this seq is durable on every shard (0: none)."""
        marks = await self._gather("durable_mark", producer, return_exceptions=True)
        for s, mark in enumerate(marks):
            if isinstance(mark, BaseException):  # a shard restarting (its node went)
                raise IngestError(
                    ErrorCode.OVERLOADED, f"shard {s} is restarting ({type(mark).__name__}): "
                    "say hello again shortly", fatal=True,
                ) from mark
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
        registry = self.router.registry
        if len(batch) and (batch.gn is None or batch.gn_epoch != registry.epoch):
            batch.gn, batch.gn_epoch = registry.numbers(batch.sids), registry.epoch
        parts = self.router.split(batch)
        if producer is None:
            applied = await self._apply(parts, list(parts), None, None, None)
        else:
            assert seq is not None
            st = self.producers.get(producer)
            async with st.lock:
                if epoch is not None and epoch != st.epoch:
                    raise IngestError(
                        ErrorCode.BAD_REQUEST,
                        f"producer {producer!r} connected again elsewhere: this connection "
                        "is fenced",
                        fatal=True,
                    )
                if st.blocked_at is not None and seq > st.blocked_at:
                    raise IngestError(
                        ErrorCode.OVERLOADED,
                        f"seq {st.blocked_at} of producer {producer!r} was refused and must "
                        f"be resent before seq {seq}",
                    )
                try:
                    applied = await self._apply(
                        parts, range(self.shards.shards), producer, seq, st.last_seq
                    )
                except IngestError as e:
                    if e.code == ErrorCode.BAD_ROW:
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
        if applied.fresh:  # (a resend's rows are not applied: its series may not exist)
            # before the ack: a query must find these series
            self.index.saw(batch.sids, batch.gn, batch.gn_epoch)
            await self.peers.saw(applied.new)  # ... whichever gateway it asks
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
            undone = await asyncio.gather(
                *(self.shards.revert(s, parts.get(s) or EMPTY, producer, seq) for s in undo),
                return_exceptions=True,
            )
            kept = {s: u for s, u in zip(undo, undone, strict=True) if u is not True}
            if kept:
                # Kept where a resend was answered `duplicate` meanwhile (it must
                # stay), or where the shard went too (it recovers without it).
                log.info(json.dumps({"event": "batch_kept", "producer": producer, "seq": seq,
                                     "shards": {s: repr(u) for s, u in kept.items()}}))
            raise self._refusal(parts, refused)
        token = {s: (r["incarnation"], r["ck"]) for s, r in answers.items()}
        rows = sum(b.increments for b in sent)
        fresh = any(r["status"] == "applied" for r in answers.values())
        new = [sid for r in answers.values() for sid in r.get("new", ())]
        return Applied(rows=rows, token=token, fresh=fresh, new=new)

    @staticmethod
    def _refusal(parts: dict[int, Batch], refused: dict[int, Any]) -> IngestError:
        crashed = [(s, r) for s, r in refused.items() if isinstance(r, BaseException)]
        if crashed:
            s, e = crashed[0]
            if isinstance(e, AnswerLost):  # the shard may have it: a resend is recognised
                return IngestError(
                    ErrorCode.OVERLOADED,
                            f"shard {s} did not answer ({type(e).__name__}): reconnect "
                    "and resend from the last durable seq", fatal=True,
                )
            return IngestError(
                ErrorCode.OVERLOADED, f"shard {s} is restarting ({type(e).__name__}); nothing was "
                "applied: reconnect and resend from the last durable seq", fatal=True,
            )
        gaps = [r for r in refused.values() if r["code"] == "gap"]
        if gaps:
            return IngestError(ErrorCode.OVERLOADED, gaps[0]["message"], fatal=True)
        overloaded = [r for r in refused.values() if r["code"] == ErrorCode.OVERLOADED]
        if overloaded:
            return IngestError(ErrorCode.OVERLOADED, overloaded[0]["message"])
        s, r = min(
            refused.items(), key=lambda sr: int(parts[sr[0]].first_row[sr[1]["aggregate"]])
        )
        row = int(parts[s].first_row[r["aggregate"]])
        return IngestError(ErrorCode.BAD_ROW, f"row {row}: {r['message']}", row=row)

    # ---- queries -------------------------------------------------------

    async def _gather(self, method: str, *args: Any, return_exceptions: bool = False) -> list:
        return await asyncio.gather(
            *(getattr(self.shards, method)(s, *args) for s in range(self.shards.shards)),
            return_exceptions=return_exceptions,
        )

    async def _series_of(self, tenant: str, metric: str) -> list[str]:
        """Every series of the metric: recorded by a checkpoint, or held live by a shard."""
        stored, live = await asyncio.gather(
            asyncio.to_thread(self.store.catalog, tenant, metric),
            self._gather("series_of", tenant, metric),
        )
        return [*(k.sid for k in stored), *(sid for sids in live for sid in sids)]

    async def hourly(
        self, tenant: str, metric: str, where: dict[str, str], h0: int, h1: int
    ) -> np.ndarray:
        """Counts per UTC hour of [h0, h1), every matching series summed.

        Only the shards owning a matching series are asked, and each answers
        for every month of its series, stored ones included (it is their only
        writer), so there is no store round trip here and no overlap to undo.
        """
        groups, _ = await self.index.groups(tenant, metric, where)
        parts = await asyncio.gather(
            *(self.shards.hourly_of(s, sids, h0, h1) for s, sids in groups.items())
        )
        if not parts:
            return np.zeros(h1 - h0, np.int64)
        if len(parts) == 1:
            return parts[0]
        if any(p.dtype == object for p in parts):
            return sum(parts[1:], parts[0].astype(object))
        return exact_sum(np.vstack(parts), axis=0)

    async def totals(
        self, tenant: str, metric: str, where: dict[str, str], h0: int, h1: int
    ) -> dict[str, int]:
        """Per-series totals over [h0, h1)."""
        groups, _ = await self.index.groups(tenant, metric, where)
        return await self._totals(groups, h0, h1)

    async def _totals(self, groups: dict[int, list[str]], h0: int, h1: int) -> dict[str, int]:
        answers = await asyncio.gather(
            *(self.shards.totals_of(s, sids, h0, h1) for s, sids in groups.items())
        )
        out: dict[str, int] = {}
        for sids, totals in zip(groups.values(), answers, strict=True):
            out.update(zip(sids, totals, strict=True))
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
        """Totals per value of tag ``by``; series without that tag group under null.

        Largest total first, equal totals by value (null last); groups totalling
        zero are left out. The index's grouping gives each series its group's
        index, already in that tie order, so ranking is one stable sort.
        """
        grouping = await self.index.grouping(tenant, metric, where, by)
        owners = grouping.owners
        answers = await asyncio.gather(
            *(self.shards.totals_of(s, sids, plan.h0, plan.h1) for s, sids in owners.items())
        )
        sums = [0] * len(grouping.values)  # Python ints: exact however large
        for s, totals in zip(owners, answers, strict=True):
            for g, v in zip(grouping.group_of[s], totals, strict=True):
                sums[g] += v
        ranked = _ranked(sums)
        values = grouping.values
        top = [{"value": values[g], "total": sums[g]} for g in ranked[:limit]]
        total = sum(sums)
        return {
            "tenant": tenant,
            "metric": metric,
            "by": by,
            "where": where,
            "tz": plan.tz,
            "from": plan.from_label,
            "to": plan.to_label,
            "groups": top,
            "other": total - sum(group["total"] for group in top),  # (zero groups add 0)
            "total": total,
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


def _ranked(sums: list[int]) -> list[int]:
    """Indexes of the nonzero ``sums``, largest first, equal ones in index order."""
    try:
        t = np.array(sums, dtype=np.int64)
    except OverflowError:  # a total beyond int64
        return sorted((g for g, v in enumerate(sums) if v), key=lambda g: (-sums[g], g))
    nonzero = np.flatnonzero(t)
    # ~t (= -t - 1) orders largest first and, unlike -t, cannot wrap at INT64_MIN
    return nonzero[np.argsort(~t[nonzero], kind="stable")].tolist()
