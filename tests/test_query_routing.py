"""Queries ask only the shards owning matching series, and those answer for every month.

In-process shards (LocalShards) over a real SQLite store, counting the calls
each shard and the store receive, so what a user would notice — a series
acknowledged a moment ago is in the answer, a backfill into an old month is
counted, nothing is counted twice — is checked together with the routing that
makes a one-series query one shard call.
"""

from __future__ import annotations

import asyncio
import calendar
from collections import Counter

import numpy as np
import pytest

from tally.actors.clients import LocalShards
from tally.actors.history import History
from tally.api.service import Service
from tally.checkpoint.sqlite import SqliteStore
from tally.wire.batches import rows_batch
from tally.wire.series import series_id

NOW = calendar.timegm((2026, 11, 20, 12, 0, 0))
H0 = calendar.timegm((2026, 9, 1, 0, 0, 0)) // 3600
H1 = calendar.timegm((2026, 12, 1, 0, 0, 0)) // 3600
OCT = calendar.timegm((2026, 10, 10, 5, 0, 0)) // 3600 * 3600


class CountingShards(LocalShards):
    """LocalShards that count the query calls each shard gets."""

    def __init__(self, store, shards: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__(store, shards)
        self.calls: Counter[tuple[str, int]] = Counter()

    async def hourly_of(self, shard, sids, h0, h1):  # type: ignore[no-untyped-def]
        self.calls["hourly_of", shard] += 1
        return await super().hourly_of(shard, sids, h0, h1)

    async def totals_of(self, shard, sids, h0, h1):  # type: ignore[no-untyped-def]
        self.calls["totals_of", shard] += 1
        return await super().totals_of(shard, sids, h0, h1)


class CountingStore(SqliteStore):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.loaded: list[tuple[str, str]] = []
        self.catalog_down = False

    def load_months(self, keys):  # type: ignore[no-untyped-def]
        self.loaded += keys
        return super().load_months(keys)

    def catalog(self, tenant, metric=None):  # type: ignore[no-untyped-def]
        if self.catalog_down:
            raise RuntimeError("store down")
        return super().catalog(tenant, metric)


@pytest.fixture
def env(tmp_path):
    store = CountingStore(str(tmp_path / "t.db"))
    shards = CountingShards(store, 8)
    service = Service(shards, store, clock=lambda: NOW)
    yield store, shards, service
    store.close()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def ingest(service: Service, rows: list) -> None:
    run(service.ingest(rows_batch(rows, NOW)))


def total(service: Service, where: dict[str, str] | None = None, metric: str = "m") -> int:
    return int(run(service.hourly("acme", metric, where or {}, H0, H1)).sum())


def agents(n: int, ts: int = NOW - 60, value: int = 1) -> list:
    return [["acme", "m", {"agent": f"a{k}", "channel": "email"}, ts, value] for k in range(n)]


def test_a_one_series_query_is_one_call_to_the_shard_owning_it(env):
    _, shards, service = env
    ingest(service, agents(40))
    shards.calls.clear()
    assert total(service, {"agent": "a7"}) == 1
    owner = service.router.shard(series_id("acme", "m", {"agent": "a7", "channel": "email"}))
    assert shards.calls == {("hourly_of", owner): 1}
    shards.calls.clear()
    assert total(service, {"channel": "email"}) == 40
    assert len(shards.calls) == len({service.router.shard(series_id(*r[:3]))
                                     for r in agents(40)}) > 1


def test_no_matching_series_answers_zeros_without_asking_a_shard(env):
    _, shards, service = env
    ingest(service, agents(3))
    shards.calls.clear()
    got = run(service.hourly("acme", "m", {"agent": "nobody"}, H0, H1))
    assert got.shape == (H1 - H0,) and not got.any()
    assert total(service, metric="unknown") == 0
    assert run(service.totals("globex", "m", {}, H0, H1)) == {}
    assert shards.calls == {}


def test_a_series_acknowledged_after_the_index_was_loaded_is_in_the_next_answer(env):
    _, _, service = env
    ingest(service, agents(2))
    assert total(service) == 2  # loads the metric's index
    ingest(service, [["acme", "m", {"agent": "new"}, NOW - 60, 5]])
    assert total(service) == 7
    assert total(service, {"agent": "new"}) == 5
    assert run(service.totals("acme", "m", {"agent": "new"}, H0, H1)) == {
        series_id("acme", "m", {"agent": "new"}): 5}


def test_a_series_acknowledged_while_the_index_loads_is_found(env):
    """The entry exists before the shards are asked, so a batch applied meanwhile lands in it."""
    _, shards, service = env
    ingest(service, agents(2))
    release = asyncio.Event()
    asked = asyncio.Event()
    original = shards.series_of

    async def slow_series_of(shard, tenant, metric):  # type: ignore[no-untyped-def]
        answer = await original(shard, tenant, metric)  # taken before the new batch
        asked.set()
        await release.wait()
        return answer

    shards.series_of = slow_series_of  # type: ignore[method-assign]

    async def scenario() -> int:
        query = asyncio.create_task(service.hourly("acme", "m", {}, H0, H1))
        await asyncio.wait_for(asked.wait(), 30)  # the query waits for the shards' series
        await service.ingest(rows_batch([["acme", "m", {"agent": "late"}, NOW - 60, 9]], NOW))
        release.set()
        await query
        return int((await service.hourly("acme", "m", {}, H0, H1)).sum())

    assert run(scenario()) == 11


def test_a_fresh_gateway_finds_live_series_and_series_only_in_the_store(env):
    store, shards, service = env
    ingest(service, [["acme", "m", {"agent": "old"}, OCT, 3]])
    shards.checkpoint()
    for s in shards.states:
        s.evict("2026-11", idle=0)  # October is now only in the store
    ingest(service, [["acme", "m", {"agent": "live"}, NOW - 60, 4]])  # not checkpointed
    fresh = Service(shards, store, clock=lambda: NOW)
    assert run(fresh.totals("acme", "m", {}, H0, H1)) == {
        series_id("acme", "m", {"agent": "old"}): 3,
        series_id("acme", "m", {"agent": "live"}): 4,
    }


def test_stored_months_are_read_once_then_answered_by_the_owning_shard(env):
    store, shards, service = env
    ingest(service, [["acme", "m", {"agent": "x"}, OCT, 3], ["acme", "m", {"agent": "x"},
                                                            NOW - 60, 4]])
    shards.checkpoint()
    for s in shards.states:
        s.evict("2026-11", idle=0)
    store.loaded.clear()
    assert total(service) == 7
    first = list(store.loaded)
    sid = series_id("acme", "m", {"agent": "x"})
    assert sorted(first) == [(sid, "2026-09"), (sid, "2026-10")]  # November is live
    assert total(service) == 7 and total(service, {"agent": "x"}) == 7
    assert store.loaded == first  # no document read again, absent September included


def test_a_backfill_into_a_stored_month_is_counted_after_it_leaves_memory_again(env):
    store, shards, service = env
    ingest(service, [["acme", "m", {"agent": "x"}, OCT, 3]])
    shards.checkpoint()
    for s in shards.states:
        s.evict("2026-11", idle=0)
    assert total(service) == 3  # October now in the owning shard's copy
    ingest(service, [["acme", "m", {"agent": "x"}, OCT + 3600, 10]])  # loads October live
    assert total(service) == 13
    shards.checkpoint()
    for s in shards.states:
        assert s.evict("2026-11", idle=0) in (0, 1)
    assert sum(s.series_months for s in shards.states) == 0
    assert total(service) == 13  # read again from the store, not the stale copy


def test_the_shards_copy_of_stored_months_is_bounded(tmp_path):
    store = CountingStore(str(tmp_path / "t.db"))
    shards = LocalShards(store, 1)
    service = Service(shards, store, clock=lambda: NOW)
    rows = [["acme", "m", {"agent": f"a{k}"}, OCT, k + 1] for k in range(50)]
    ingest(service, rows)
    shards.checkpoint()
    state = shards.states[0]
    state.evict("2026-11", idle=0)
    state.history = History(max_bytes=10 * (744 * 8 + 200))
    want = sum(range(1, 51))
    assert total(service) == want
    # 50 series x 3 months, 50 of them Octobers of 744 hours: far more than the bound
    assert state.history.bytes <= state.history.max_bytes and len(state.history) < 100
    assert total(service) == want  # what fell out is read again
    store.close()


def test_an_index_load_that_fails_is_an_error_and_the_next_query_loads_again(env):
    store, _, service = env
    ingest(service, agents(3))
    store.catalog_down = True
    with pytest.raises(RuntimeError, match="store down"):
        total(service)
    store.catalog_down = False
    assert total(service) == 3


def test_breakdown_and_series_agree_across_shards_and_months(env):
    _, shards, service = env
    rows = [*agents(30), *agents(30, ts=OCT, value=2)]
    ingest(service, rows)
    shards.checkpoint()
    for s in shards.states:
        s.evict("2026-11", idle=0)
    ingest(service, agents(30, value=5))
    per = run(service.totals("acme", "m", {}, H0, H1))
    assert sorted(set(per.values())) == [8] and len(per) == 30
    got = run(service.hourly("acme", "m", {}, H0, H1))
    assert got[OCT // 3600 - H0] == 60 and int(np.asarray(got).sum()) == 240



def test_a_resend_with_other_rows_adds_no_series_and_a_later_batch_still_does(env):
    """Found by the connection fuzzer: the index once took a resend's (unapplied) series as
    known, and missed them when a later batch really brought them."""
    _, _, service = env
    run(service.ingest(rows_batch(agents(1), NOW), producer="p", seq=1))
    assert total(service) == 1  # the index is loaded
    resend = rows_batch([["acme", "m", {"agent": "ghost"}, NOW - 60, 7]], NOW)
    assert not run(service.ingest(resend, producer="p", seq=1)).fresh
    assert run(service.totals("acme", "m", {}, H0, H1)) == {
        series_id("acme", "m", {"agent": "a0", "channel": "email"}): 1}
    service.index._metrics.clear()  # as after a gateway restart: loaded again
    run(service.ingest(resend, producer="p", seq=1))  # seen while no entry exists
    assert total(service) == 1
    run(service.ingest(resend, producer="p", seq=2))
    assert total(service, {"agent": "ghost"}) == 7 and total(service) == 8
