"""The gateway's merge of live shard state with stored history, without Ray.

Shards run in-process (LocalShards) over a real SQLite store, so these
tests exercise the same ShardState, Router and Service code the actors run.
"""

from __future__ import annotations

import asyncio
import calendar
from collections import defaultdict

import pytest

from tally.actors.clients import LocalShards
from tally.api.service import IngestError, Service
from tally.api.timerange import compare_plan, plan_range
from tally.checkpoint.sqlite import SqliteStore
from tally.wire.batches import INT64_MAX, rows_batch
from tally.wire.series import series_id

NOW = calendar.timegm((2026, 11, 20, 12, 0, 0))


def ts(y: int, m: int, d: int, h: int = 0) -> int:
    return calendar.timegm((y, m, d, h, 0, 0))


# "runs": checkpoints kept as runs and never folded, so every read of the store, after an
# eviction too, goes through them (checkpoint/runs.py)
@pytest.fixture(params=["direct", "runs"])
def env(tmp_path, request):
    store = SqliteStore(str(tmp_path / "t.db"), runs=request.param == "runs")
    shards = LocalShards(store, 3)
    service = Service(shards, store, clock=lambda: NOW)
    yield store, shards, service
    store.close()


def run(coro):
    return asyncio.run(coro)


ROWS = [
    ["acme", "msgs", {"channel": "email"}, ts(2026, 10, 31, 23), 5],
    ["acme", "msgs", {"channel": "email"}, ts(2026, 11, 1, 0), 7],
    ["acme", "msgs", {"channel": "chat"}, ts(2026, 11, 1, 5), 11],
    ["acme", "msgs", {"channel": "chat"}, ts(2026, 11, 2, 5), -2],
    ["acme", "msgs", None, ts(2026, 11, 2, 6), 100],
    ["globex", "msgs", {"channel": "email"}, ts(2026, 11, 1, 1), 1000],
]


def day_points(service, where=None, tenant="acme", tz="UTC"):
    plan = plan_range("2026-10-31", "2026-11-02", "day", tz)
    answer = run(service.series(tenant, "msgs", where or {}, plan))
    return answer["points"], answer["total"]


def test_counts_are_the_same_live_in_flight_and_after_eviction(env):
    store, shards, service = env
    assert run(service.ingest(rows_batch(ROWS, NOW))).rows == 6
    expected = ([["2026-10-31", 5], ["2026-11-01", 18], ["2026-11-02", 98]], 121)
    assert day_points(service) == expected

    # A checkpoint written to the store but not yet finished in the shard:
    # the shard still answers for its months, the store copy is not added.
    cps = [s.begin_checkpoint() for s in shards.states]
    for cp in cps:
        if cp is not None:
            store.write_checkpoint(cp)
    assert day_points(service) == expected
    for state, cp in zip(shards.states, cps, strict=True):
        if cp is not None:
            state.finish_checkpoint(cp.ck)
        state.evict("2026-12", idle=0)  # every month is past: all answered by the store now
    assert all(not s.series for s in shards.states)
    assert day_points(service) == expected

    # New increments on evicted months reload their base exactly once.
    run(service.ingest(rows_batch([ROWS[0], ROWS[2]], NOW)))
    assert day_points(service) == (
        [["2026-10-31", 10], ["2026-11-01", 29], ["2026-11-02", 98]],
        137,
    )


def test_where_tenant_isolation_and_tz(env):
    _, _, service = env
    run(service.ingest(rows_batch(ROWS, NOW)))
    assert day_points(service, {"channel": "email"}) == (
        [["2026-10-31", 5], ["2026-11-01", 7], ["2026-11-02", 0]],
        12,
    )
    assert day_points(service, tenant="globex")[1] == 1000
    assert day_points(service, tenant="nobody")[1] == 0
    # Tokyo is UTC+9: 2026-10-31 23:00 UTC is 2026-11-01 08:00 there.
    assert day_points(service, tz="Asia/Tokyo")[0] == [
        ["2026-10-31", 0],
        ["2026-11-01", 23],
        ["2026-11-02", 98],
    ]


def test_overflow_on_one_shard_leaves_every_shard_unchanged(env):
    _, shards, service = env
    run(service.ingest(rows_batch(ROWS, NOW)))
    before = day_points(service)
    # Many distinct series so the batch spans every shard; the last row
    # overflows a slot that already holds 7.
    rows = [["acme", "msgs", {"n": str(k)}, ts(2026, 11, 1), 1] for k in range(30)]
    rows.append(["acme", "msgs", {"channel": "email"}, ts(2026, 11, 1, 0), INT64_MAX - 3])
    touched = {shards_for for shards_for in (service.router.shard(series_id(*r[:3])) for r in rows)}
    assert len(touched) == 3
    with pytest.raises(IngestError) as e:
        run(service.ingest(rows_batch(rows, NOW)))
    assert e.value.code == "bad_row" and e.value.row == 30
    assert day_points(service) == before


def test_breakdown_and_compare(env):
    _, _, service = env
    run(service.ingest(rows_batch(ROWS, NOW)))
    plan = plan_range("2026-11-01", "2026-11-02", "day", "UTC")
    b = run(service.breakdown("acme", "msgs", "channel", {}, plan, limit=1))
    assert b["groups"] == [{"value": None, "total": 100}]
    assert (b["other"], b["total"]) == (7 + 9, 116)
    prev = compare_plan(plan, "previous_period")
    answer = run(service.series("acme", "msgs", {}, plan, prev))
    assert answer["compare"]["from"] == "2026-10-30"
    assert answer["compare"]["total"] == 5
    assert answer["compare"]["change"] == pytest.approx((116 - 5) / 5)


def test_catalog_lists_live_and_stored_series_of_one_tenant(env):
    store, shards, service = env
    run(service.ingest(rows_batch(ROWS, NOW)))
    shards.checkpoint()
    run(service.ingest(rows_batch([["acme", "other", {"k": "v"}, NOW, 1]], NOW)))
    cat = run(service.catalog("acme"))
    assert cat == {
        "tenant": "acme",
        "metrics": [
            {"metric": "msgs", "series": 3, "tags": {"channel": ["chat", "email"]}},
            {"metric": "other", "series": 1, "tags": {"k": ["v"]}},
        ],
    }
    assert [m["metric"] for m in run(service.catalog("globex"))["metrics"]] == ["msgs"]


def test_hourly_matches_a_brute_force_oracle(env):
    import random

    _, shards, service = env
    rnd = random.Random(7)
    rows = []
    oracle = defaultdict(int)
    for _ in range(3000):
        t = rnd.randrange(ts(2026, 9, 20), NOW)
        tags = {"c": rnd.choice("abc")}
        v = rnd.randrange(-5, 50)
        rows.append(["acme", "m", tags, t, v])
        oracle[t // 3600] += v
    for k in range(0, len(rows), 500):
        run(service.ingest(rows_batch(rows[k : k + 500], NOW)))
        if k % 1000 == 0:
            shards.checkpoint()
            for s in shards.states:
                s.evict("2026-11", idle=0)
    h0, h1 = ts(2026, 9, 1) // 3600, ts(2026, 12, 1) // 3600
    got = run(service.hourly("acme", "m", {}, h0, h1))
    assert {h0 + i: int(v) for i, v in enumerate(got) if v} == {
        h: v for h, v in oracle.items() if v
    }


def test_a_day_total_leaving_int64_is_refused_although_every_hour_fits(env):
    """Month documents keep day totals too, so a day must stay inside int64."""
    _, _, service = env
    half = INT64_MAX // 2 + 1
    run(service.ingest(rows_batch([["acme", "big", None, ts(2026, 11, 3, 1), half]], NOW)))
    with pytest.raises(IngestError) as e:
        run(service.ingest(rows_batch([
            ["acme", "big", None, ts(2026, 11, 4, 1), half],  # another day: fine
            ["acme", "big", None, ts(2026, 11, 3, 2), half],  # same day: 2**63
        ], NOW)))
    assert e.value.code == "bad_row" and e.value.row == 1
    assert "2026-11-03" in e.value.message and "day" in e.value.message
    plan = plan_range("2026-11-03", "2026-11-04", "day", "UTC")
    assert run(service.series("acme", "big", {}, plan))["points"] == [
        ["2026-11-03", half], ["2026-11-04", 0]]
    run(service.ingest(rows_batch([["acme", "big", None, ts(2026, 11, 3, 2), half - 1]], NOW)))
    assert run(service.series("acme", "big", {}, plan))["total"] == INT64_MAX


def logins(service, tenant="acme") -> int:
    plan = plan_range("2026-11-01", "2026-11-30", "month", "UTC")
    return run(service.series(tenant, "logins", {}, plan))["total"]


def login_rows(n: int, tag: str = "x") -> list[list]:
    return [["acme", "logins", {"k": f"{tag}{i}"}, ts(2026, 11, 2), 1] for i in range(n)]


def test_a_resent_batch_is_applied_once_on_every_shard(env):
    _, shards, service = env
    for seq in (1, 2, 3):
        run(service.ingest(rows_batch(login_rows(10, str(seq)), NOW), "p", seq))
    assert logins(service) == 30
    run(service.ingest(rows_batch(login_rows(10, "2"), NOW), "p", 2))  # a resend
    assert logins(service) == 30
    shards.checkpoint()
    assert run(service.durable_seq("p")) == 3
    assert run(service.durable_seq("someone-else")) == 0


def test_a_shard_that_lost_its_memory_is_not_skipped_past(env):
    store, shards, service = env
    run(service.ingest(rows_batch(login_rows(12, "a"), NOW), "p", 1))
    shards.checkpoint()
    run(service.ingest(rows_batch(login_rows(12, "b"), NOW), "p", 2))
    # shard 1 dies: what it had not checkpointed (its part of seq 2) is gone
    from tally.actors.shard_state import ShardState
    shards.states[1] = ShardState(1, store.open_shard(1))
    with pytest.raises(IngestError) as e:
        run(service.ingest(rows_batch(login_rows(12, "c"), NOW), "p", 3))
    assert e.value.code == "overloaded" and e.value.fatal
    assert "resend" in e.value.message
    # the client reconnects: welcome says 1; it resends 2 and 3
    assert run(service.durable_seq("p")) == 1
    run(service.ingest(rows_batch(login_rows(12, "b"), NOW), "p", 2))
    run(service.ingest(rows_batch(login_rows(12, "c"), NOW), "p", 3))
    assert logins(service) == 36


def test_a_refused_batch_is_undone_everywhere_and_applies_when_resent(env):
    _, shards, service = env
    run(service.ingest(rows_batch(login_rows(20, "a"), NOW), "p", 1))
    shards.states[2].max_dirty = 1  # shard 2 is at its bound: it refuses
    with pytest.raises(IngestError) as e:
        run(service.ingest(rows_batch(login_rows(20, "b"), NOW), "p", 2))
    assert e.value.code == "overloaded" and not e.value.fatal
    assert logins(service) == 20
    # later seqs wait for the refused one
    with pytest.raises(IngestError) as e:
        run(service.ingest(rows_batch(login_rows(20, "c"), NOW), "p", 3))
    assert "seq 2" in e.value.message
    shards.checkpoint()  # a checkpoint between the refusal and the resend
    shards.states[2].max_dirty = 0
    run(service.ingest(rows_batch(login_rows(20, "b"), NOW), "p", 2))
    run(service.ingest(rows_batch(login_rows(20, "c"), NOW), "p", 3))
    assert logins(service) == 60
    shards.checkpoint()
    assert run(service.durable_seq("p")) == 3


class _RestartingShard0:
    """LocalShards whose shard 0 hangs on its first apply, then fails it (its node
    went: the call raises once the actor restarts); later applies go through."""

    def __init__(self, shards: LocalShards) -> None:
        self.inner = shards
        self.release = asyncio.Event()
        self.failed = False

    def __getattr__(self, name):  # noqa: ANN001 - everything else as LocalShards does
        return getattr(self.inner, name)

    async def apply(self, shard, batch, producer, seq, expect):  # noqa: ANN001
        if shard == 0 and not self.failed:
            self.failed = True
            await self.release.wait()
            raise RuntimeError("ActorUnavailableError: the actor is restarting")
        return await self.inner.apply(shard, batch, producer, seq, expect)


def test_a_failover_resend_found_on_a_shard_is_not_undone_there(tmp_path):
    """The producer's batch 2 hangs on gateway A (shard 0 is restarting) after shard 1
    applied it; the producer fails over to gateway B and resends 2 (a duplicate on
    shard 1, applied on shard 0); then A's call fails. Undoing 2 on shard 1 now
    would lose it: it stays, and every increment is counted once."""
    store = SqliteStore(str(tmp_path / "t.db"))
    shards = LocalShards(store, 2)
    flaky = _RestartingShard0(shards)
    gateway_a = Service(flaky, store, clock=lambda: NOW)
    gateway_b = Service(shards, store, clock=lambda: NOW)
    first, second = login_rows(30, "a"), login_rows(30, "b")
    assert len({shards.states[0].shard, shards.states[1].shard}) == 2

    async def scenario() -> None:
        await gateway_b.ingest(rows_batch(first, NOW), "p", 1)
        on_a = asyncio.ensure_future(gateway_a.ingest(rows_batch(second, NOW), "p", 2))
        while shards.states[1].applied.get("p") != 2:  # shard 1 took A's batch 2
            await asyncio.sleep(0.001)
        assert (await gateway_b.ingest(rows_batch(second, NOW), "p", 2)).rows == 30
        flaky.release.set()
        with pytest.raises(IngestError) as e:
            await on_a
        assert e.value.code == "overloaded" and e.value.fatal

    try:
        run(scenario())
        assert logins(gateway_b) == 60
        assert shards.states[0].applied == shards.states[1].applied == {"p": 2}
    finally:
        store.close()
