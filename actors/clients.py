"""How the gateway reaches shards: Ray actor handles, or in-process state.

Both expose the same coroutine methods, so the gateway's merging logic
(api/service.py) runs unchanged in unit tests without Ray.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import numpy as np
from prometheus_client import CollectorRegistry

from tally.actors.channel import FALLBACK, ShardChannel
from tally.actors.metrics import render, state_gauges
from tally.actors.shard_state import NO_SEQ, ShardState
from tally.checkpoint.store import Store
from tally.wire.batches import Batch


class ShardClient(Protocol):
    shards: int

    async def apply(
        self, shard: int, batch: Batch, producer: str | None, seq: int | None,
        expect: int | None,
    ) -> dict[str, Any]: ...
    async def revert(
        self, shard: int, batch: Batch, producer: str | None, seq: int | None
    ) -> bool: ...
    async def wait_checkpoint(self, shard: int, after_ck: int, timeout: float) -> dict: ...
    async def durable_mark(self, shard: int, producer: str) -> int: ...
    async def hourly_of(self, shard: int, sids: list[str], h0: int, h1: int) -> np.ndarray:
        """Summed counts per hour of the shard's ``sids``, every month (see ShardState)."""
        ...
    async def totals_of(self, shard: int, sids: list[str], h0: int, h1: int) -> list[int]: ...
    async def series_of(self, shard: int, tenant: str, metric: str) -> list[str]: ...
    async def catalog(self, shard: int, tenant: str) -> list[str]: ...
    async def stats(self) -> list[dict[str, Any]]: ...
    async def metrics(self) -> list[str | BaseException]:
        """Prometheus text per shard, in shard order; a shard that did not answer is its error."""
        ...


class RayShards:
    """Named shard actors; ObjectRefs are awaited so the gateway's loop never blocks."""

    # A restarting shard holds its calls until it is back: a scrape does not wait that long.
    METRICS_TIMEOUT = 5.0

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles
        self.shards = len(handles)
        # queries take a socket to the shard when they can (far cheaper than a Ray call)
        self.channels = [ShardChannel(h.query_channel.remote) for h in handles]

    async def apply(self, shard, batch, producer, seq, expect):  # type: ignore[no-untyped-def]
        """By the shard's socket when the batch has a producer (a resend is recognised, so
        an answer lost on the way fails the batch and the client sends it again), else by
        the actor method; ``AnswerLost`` is raised like a Ray call's error."""
        channel = self.channels[shard]
        if producer is not None:
            got = await channel.apply(batch, producer, seq, expect)
            if got is not FALLBACK:
                return got
        channel.applies_by_ray += 1
        return await self.handles[shard].apply.remote(batch, producer, seq, expect)

    async def revert(
        self, shard: int, batch: Batch, producer: str | None, seq: int | None
    ) -> bool:
        return await self.handles[shard].revert.remote(batch, producer, seq)

    async def wait_checkpoint(self, shard: int, after_ck: int, timeout: float) -> dict:
        return await self.handles[shard].wait_checkpoint.remote(after_ck, timeout)

    async def durable_mark(self, shard: int, producer: str) -> int:
        return await self.handles[shard].durable_mark.remote(producer)

    async def hourly_of(self, shard: int, sids: list[str], h0: int, h1: int) -> np.ndarray:
        return await self._query(shard, "hourly_of", sids, h0, h1)

    async def totals_of(self, shard: int, sids: list[str], h0: int, h1: int) -> list[int]:
        return await self._query(shard, "totals_of", sids, h0, h1)

    async def _query(self, shard: int, method: str, sids: list[str], h0: int, h1: int) -> Any:
        """By the shard's socket, else by the actor method of the same name."""
        got = await self.channels[shard].call(method, sids, h0, h1)
        if got is FALLBACK:
            return await getattr(self.handles[shard], method).remote(sids, h0, h1)
        return got

    async def series_of(self, shard: int, tenant: str, metric: str) -> list[str]:
        return await self.handles[shard].series_of.remote(tenant, metric)

    async def catalog(self, shard: int, tenant: str) -> list[str]:
        return await self.handles[shard].catalog.remote(tenant)

    async def stats(self) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(h.stats.remote() for h in self.handles)))

    async def metrics(self) -> list[str | BaseException]:
        async def one(handle: Any) -> str:
            return await asyncio.wait_for(handle.metrics.remote(), self.METRICS_TIMEOUT)

        return list(await asyncio.gather(*(one(h) for h in self.handles), return_exceptions=True))


class LocalShards:
    """Shard state in this process over one store: for tests and tools, not serving."""

    incarnation = "local"

    def __init__(self, store: Store, shards: int) -> None:
        self.store = store
        self.shards = shards
        self.states = [ShardState(i, store.open_shard(i)) for i in range(shards)]
        self.registries = [CollectorRegistry(auto_describe=False) for _ in range(shards)]
        for i, registry in enumerate(self.registries):
            state_gauges(registry, i, lambda i=i: self.states[i])

    async def apply(self, shard, batch, producer, seq, expect):  # type: ignore[no-untyped-def]
        result = self.states[shard].ingest(batch, self.store.load_months, producer, seq, expect)
        answer = result.answer()
        answer["incarnation"] = self.incarnation
        return answer

    async def revert(
        self, shard: int, batch: Batch, producer: str | None, seq: int | None
    ) -> bool:
        return self.states[shard].revert(batch, self.store.load_months, producer, seq)

    async def wait_checkpoint(self, shard: int, after_ck: int, timeout: float) -> dict:
        state = self.states[shard]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while state.durable_ck <= after_ck and loop.time() < deadline:
            await asyncio.sleep(0.01)  # checkpoint() runs outside any loop here: poll
        return {"incarnation": self.incarnation, "durable_ck": state.durable_ck}

    async def durable_mark(self, shard: int, producer: str) -> int:
        return self.states[shard].durable.get(producer, NO_SEQ)

    async def hourly_of(self, shard: int, sids: list[str], h0: int, h1: int) -> np.ndarray:
        return self.states[shard].hourly_of(sids, h0, h1, self.store.load_months)

    async def totals_of(self, shard: int, sids: list[str], h0: int, h1: int) -> list[int]:
        return self.states[shard].totals_of(sids, h0, h1, self.store.load_months)

    async def series_of(self, shard: int, tenant: str, metric: str) -> list[str]:
        return self.states[shard].series_of(tenant, metric)

    async def catalog(self, shard: int, tenant: str) -> list[str]:
        return self.states[shard].catalog(tenant)

    async def stats(self) -> list[dict[str, Any]]:
        return [
            {"shard": s.shard, "ck": s.last_ck, "dirty_slots": s.dirty_slots} for s in self.states
        ]

    async def metrics(self) -> list[str | BaseException]:
        """State gauges only: checkpoints here run without a clock or an actor loop."""
        return [render(r) for r in self.registries]

    def checkpoint(self) -> None:
        """Write every shard's pending deltas, as the actors' loop would."""
        for state in self.states:
            for _ in range(2):
                cp = state.begin_checkpoint()
                if cp is None:
                    break
                self.store.write_checkpoint(cp)
                state.finish_checkpoint(cp.ck)
