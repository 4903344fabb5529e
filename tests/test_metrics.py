"""/metrics as an operator reads it: exact counts after real requests, one valid exposition.

No Ray: shards run in-process (LocalShards) behind the real FastAPI app, the
shard-side registry is driven with a fake clock, and the shard actor's class
is used as a plain object over SQLite to check its checkpoint log lines.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import logging
from collections import Counter
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tally.actors.clients import LocalShards
from tally.actors.metrics import CheckpointLag, ShardMetrics
from tally.actors.shard import ShardActor
from tally.actors.shard_state import Outcome, ShardState
from tally.api.http import create_app
from tally.api.metrics import GatewayMetrics
from tally.api.service import Service
from tally.checkpoint.sqlite import SqliteStore
from tally.wire.batches import rows_batch

NOW = calendar.timegm((2026, 11, 20, 12, 0, 0))
DAY = calendar.timegm((2026, 11, 19, 0, 0, 0))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def rows(n: int, value: Any = 1) -> list[list[Any]]:
    return [["acme", "msgs", {"channel": f"c{k % 4}"}, DAY + 3600 * k, value] for k in range(n)]


class Scrape:
    """A parsed exposition, with the checks every scrape must pass built in."""

    def __init__(self, text: str) -> None:
        self.text = text
        families = list(text_string_to_metric_families(text))
        names = Counter(f.name for f in families)
        assert [n for n, c in names.items() if c > 1] == []
        types = Counter(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE"))
        assert [n for n, c in types.items() if c > 1] == []
        self.samples = [s for f in families for s in f.samples]

    def value(self, name: str, **labels: str) -> float | None:
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else None


@pytest.fixture
def env(tmp_path):
    store = SqliteStore(str(tmp_path / "t.db"))
    shards = LocalShards(store, 2)
    service = Service(shards, store, clock=lambda: NOW)
    yield shards, service
    store.close()


async def scrape(client: httpx.AsyncClient) -> Scrape:
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    return Scrape(r.text)


def test_http_ingest_queries_and_shard_gauges(env):
    shards, service = env
    app = create_app(service)
    query = {"tenant": "acme", "metric": "msgs", "from": "2026-11-01", "to": "2026-11-20"}

    async def scenario() -> Scrape:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
            ok = await client.post("/v1/increments", json={"rows": rows(7)})
            assert ok.json() == {"rows": 7}
            bad_row = await client.post("/v1/increments", json={"rows": rows(2) + [[1, 2]]})
            assert bad_row.json()["error"]["code"] == "bad_row"
            not_object = await client.post("/v1/increments", json=[1, 2])
            assert not_object.json()["error"]["code"] == "bad_request"
            for _ in range(3):
                assert (await client.get("/v1/series", params=query)).status_code == 200
            r = await client.get("/v1/breakdown", params={**query, "by": "channel"})
            assert r.json()["total"] == 7
            assert (await client.get("/v1/catalog", params={"tenant": "acme"})).status_code == 200
            assert (await client.get("/v1/series", params={"tenant": "acme"})).status_code == 400
            assert (await client.get("/no/such/page")).status_code == 404
            return await scrape(client)

    m = run(scenario())
    assert m.value("tally_increments_accepted_total", ingress="http") == 7
    assert m.value("tally_batches_total", ingress="http", outcome="accepted") == 1
    assert m.value("tally_batches_total", ingress="http", outcome="rejected") == 2
    assert m.value("tally_increments_rejected_total", ingress="http", reason="bad_row") == 3
    assert m.value("tally_increments_rejected_total", ingress="http", reason="bad_request") == 0
    # the bad-parameter series query is timed too: 4, not 3
    assert m.value("tally_query_duration_seconds_count", route="/v1/series") == 4
    assert m.value("tally_query_duration_seconds_count", route="/v1/breakdown") == 1
    assert m.value("tally_query_duration_seconds_count", route="/v1/catalog") == 1
    assert m.value("tally_http_requests_total", route="/v1/increments", status="200") == 1
    assert m.value("tally_http_requests_total", route="/v1/increments", status="400") == 2
    assert m.value("tally_http_requests_total", route="/v1/series", status="400") == 1
    assert m.value("tally_http_requests_total", route="other", status="404") == 1
    assert m.value("tally_http_requests_total", route="/no/such/page", status="404") is None
    # this scrape is counted after it answered: the next one shows it
    assert m.value("tally_http_requests_total", route="/metrics", status="200") is None
    dirty = [s.dirty_slots for s in shards.states]
    assert sum(dirty) == 7  # seven distinct (series, hour) slots
    for i, state in enumerate(shards.states):
        assert m.value("tally_dirty_slots", shard=str(i)) == state.dirty_slots
        assert m.value("tally_live_series", shard=str(i)) == len(state.series)
    assert "\ntally_increments_accepted_total{ingress=\"http\"} 7.0\n" in m.text

    shards.checkpoint()
    m = run(service.metrics.render(shards))
    m = Scrape(m.decode())
    assert [m.value("tally_dirty_slots", shard=str(i)) for i in range(2)] == [0, 0]


class FakeShards:
    """Shards whose metrics answers are scripted: some render, some fail."""

    def __init__(self, answers: list[Any] | BaseException, shards: int = 0) -> None:
        self.answers = answers
        self.shards = shards if isinstance(answers, BaseException) else len(answers)

    async def metrics(self) -> list[str | BaseException]:
        if isinstance(self.answers, BaseException):
            raise self.answers
        return list(self.answers)


def shard_text(shard: int, checkpoints: int) -> str:
    state = ShardState(shard)
    meters = ShardMetrics(shard, lambda: state, clock=lambda: 0.0)
    for ck in range(1, checkpoints + 1):
        meters.checkpoint_written(ck, 0.003)
    return meters.render()


def test_shard_families_merge_under_their_names_and_a_silent_shard_is_counted():
    gateway = GatewayMetrics()
    shards = FakeShards([shard_text(0, 2), RuntimeError("shard 1 is restarting"),
                         shard_text(2, 5), "garbage{"])
    m = Scrape(run(gateway.render(shards)).decode())
    assert m.value("tally_checkpoints_total", shard="0") == 2
    assert m.value("tally_checkpoints_total", shard="2") == 5
    assert m.value("tally_checkpoints_total", shard="1") is None
    assert m.value("tally_checkpoint_duration_seconds_count", shard="2") == 5
    assert m.value("tally_checkpoint_duration_seconds_bucket", shard="2", le="0.005") == 5
    assert m.value("tally_checkpoint_duration_seconds_bucket", shard="2", le="0.0025") == 0
    assert m.value("tally_shard_scrape_errors_total", shard="1") == 1
    assert m.value("tally_shard_scrape_errors_total", shard="3") == 1
    assert m.value("tally_shard_scrape_errors_total", shard="0") is None
    # the names a dashboard queries, exactly as they appear on the page
    assert m.text.count("# TYPE tally_checkpoints_total counter\n") == 1
    assert 'tally_checkpoints_total{shard="0"} 2.0\n' in m.text
    assert 'tally_checkpoints_total{shard="2"} 5.0\n' in m.text
    assert "# TYPE tally_checkpoint_lag_seconds gauge\n" in m.text
    assert "tally_checkpoints{" not in m.text and "_total_total" not in m.text

    m = Scrape(run(gateway.render(shards)).decode())
    assert m.value("tally_shard_scrape_errors_total", shard="1") == 2

    m = Scrape(run(gateway.render(FakeShards(ConnectionError("lost Ray"), shards=2))).decode())
    assert m.value("tally_shard_scrape_errors_total", shard="0") == 1
    assert m.value("tally_shard_scrape_errors_total", shard="1") == 3
    assert m.value("tally_connections_open") == 0


def test_gateway_counters_for_the_tcp_shell():
    g = GatewayMetrics()
    g.connection_opened()
    g.connection_opened()
    g.connection_closed()
    g.connection_refused("too_many")
    g.frame_error("bad_frame")
    g.batch_accepted("tcp", 1000)
    g.batch_accepted("tcp", 24)
    g.batch_rejected("tcp", "overloaded", 500)
    m = Scrape(run(g.render(FakeShards([]))).decode())
    assert m.value("tally_connections_open") == 1
    assert m.value("tally_connections_total") == 2
    assert m.value("tally_connections_refused_total", reason="too_many") == 1
    assert m.value("tally_frame_errors_total", code="bad_frame") == 1
    assert m.value("tally_increments_accepted_total", ingress="tcp") == 1024
    assert m.value("tally_batches_total", ingress="tcp", outcome="accepted") == 2
    assert m.value("tally_increments_rejected_total", ingress="tcp", reason="overloaded") == 500


def test_other_gateways_counters_appear_labelled_by_gateway():
    """With --http-gateways-per-node the TCP gateways take the increments and only the
    HTTP ones are scraped: their page must show the TCP ones' counters."""
    tcp, http, gone = GatewayMetrics("gw-tcp"), GatewayMetrics("gw-http"), GatewayMetrics("x")
    tcp.batch_accepted("tcp", 1000)
    tcp.connection_opened()
    http.batch_accepted("http", 7)
    http.observe_query("/v1/series", 0.003)
    peers = {"gw-tcp": tcp.own_text(), "gw-gone": RuntimeError("its node went"),
             "gw-bad": "garbage{"}
    m = Scrape(run(http.render(FakeShards([]), peers)).decode())
    assert m.value("tally_increments_accepted_total", ingress="tcp", gateway="gw-tcp") == 1000
    assert m.value("tally_increments_accepted_total", ingress="http", gateway="gw-http") == 7
    assert m.value("tally_connections_open", gateway="gw-tcp") == 1
    assert m.value("tally_connections_open", gateway="gw-http") == 0
    assert m.value("tally_query_duration_seconds_count", route="/v1/series",
                   gateway="gw-http") == 1
    assert m.value("tally_query_duration_seconds_count", route="/v1/series",
                   gateway="gw-tcp") is None  # (never observed there: no sample)
    assert 'gateway="gw-gone"' not in m.text and 'gateway="gw-bad"' not in m.text
    assert m.text.count("# TYPE tally_increments_accepted_total counter\n") == 1
    # one gateway alone: no gateway label, as before
    alone = Scrape(run(gone.render(FakeShards([]))).decode())
    assert "gateway=" not in alone.text


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_lag_grows_while_dirty_survives_a_failed_write_and_clears_when_durable():
    clock = Clock()
    state = ShardState(0)
    meters = ShardMetrics(0, lambda: state, clock=clock)

    def lag() -> float | None:
        return meters.registry.get_sample_value("tally_checkpoint_lag_seconds", {"shard": "0"})

    def apply(n: int) -> None:
        batch = rows_batch(rows(n), NOW)
        assert state.ingest(batch, lambda keys: {}).outcome is Outcome.APPLIED
        meters.applied(batch.increments)

    assert lag() == 0
    apply(3)
    clock.t += 4
    assert lag() == 4
    assert meters.registry.get_sample_value("tally_dirty_slots", {"shard": "0"}) == 3

    cp = state.begin_checkpoint()
    meters.lag.began(cp.ck)
    clock.t += 1
    apply(1)  # lands in the next checkpoint, 5 s after the first increment
    clock.t += 10  # the write fails; the retry is the same checkpoint
    meters.store_errors.inc()
    assert state.begin_checkpoint() is cp
    meters.lag.began(cp.ck)
    assert lag() == 15

    state.finish_checkpoint(cp.ck)
    assert meters.checkpoint_written(cp.ck, 0.004) == 15  # what the checkpoint log line says
    assert lag() == 10  # the increment applied during the write is not durable yet

    cp2 = state.begin_checkpoint()
    meters.lag.began(cp2.ck)
    clock.t += 2
    state.finish_checkpoint(cp2.ck)
    assert meters.checkpoint_written(cp2.ck, 0.2) == 12
    assert lag() == 0
    assert state.begin_checkpoint() is None
    meters.lag.clean()
    clock.t += 100
    assert lag() == 0

    sample = meters.registry.get_sample_value
    assert sample("tally_checkpoints_total", {"shard": "0"}) == 2
    assert sample("tally_checkpoint_duration_seconds_count", {"shard": "0"}) == 2
    assert sample("tally_checkpoint_duration_seconds_bucket", {"shard": "0", "le": "0.005"}) == 1
    assert sample("tally_checkpoint_duration_seconds_bucket", {"shard": "0", "le": "0.25"}) == 2
    assert sample("tally_shard_increments_total", {"shard": "0"}) == 4
    assert sample("tally_store_errors_total", {"shard": "0"}) == 1
    assert sample("tally_dirty_slots", {"shard": "0"}) == 0


def test_lag_of_an_undone_batch_clears_when_there_is_nothing_to_write():
    clock = Clock()
    lag = CheckpointLag(clock)
    lag.applied()
    clock.t += 3
    lag.applied()  # the oldest increment sets the age, not the newest
    assert lag.seconds() == 3
    lag.clean()
    assert lag.seconds() == 0
    assert lag.durable(ck=7) == 0  # a checkpoint this lag never saw begin


def test_shard_actor_logs_lag_per_checkpoint_and_nothing_for_an_empty_one(
    tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr("tally.actors.shard.gc.freeze", lambda: None)
    actor = ShardActor.__ray_actor_class__(0, f"sqlite:///{tmp_path}/t.db", 3600.0)
    caplog.set_level(logging.INFO, logger="tally.shard")

    def logged(event: str) -> list[dict[str, Any]]:
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tally.shard"]
        return [line for line in lines if line["event"] == event]

    async def scenario() -> None:
        await actor.ready()
        assert await actor.checkpoint() == 0
        assert logged("checkpoint") == []

        batch = rows_batch(rows(5), NOW)
        assert (await actor.apply(batch))["status"] == "applied"
        await asyncio.sleep(0.05)
        m = Scrape(await actor.metrics())
        assert m.value("tally_checkpoint_lag_seconds", shard="0") >= 0.05
        assert m.value("tally_shard_increments_total", shard="0") == 5
        assert m.value("tally_dirty_slots", shard="0") == 5

        write = actor.store.write_checkpoint

        def down(cp: Any) -> None:
            raise ConnectionError("store down")

        actor.store.write_checkpoint = down
        with pytest.raises(ConnectionError):
            await actor.checkpoint()
        assert len(logged("error")) == 1
        actor.store.write_checkpoint = write
        await asyncio.sleep(0.05)
        m = Scrape(await actor.metrics())
        assert m.value("tally_checkpoint_lag_seconds", shard="0") >= 0.1
        assert m.value("tally_store_errors_total", shard="0") == 1
        assert m.value("tally_checkpoints_total", shard="0") == 0

        assert await actor.checkpoint() == 1
        [line] = logged("checkpoint")
        assert line["ck"] == 1 and line["slots"] == 5 and line["lag_seconds"] >= 0.1
        m = Scrape(await actor.metrics())
        assert m.value("tally_checkpoint_lag_seconds", shard="0") == 0
        assert m.value("tally_checkpoints_total", shard="0") == 1
        assert m.value("tally_checkpoint_duration_seconds_count", shard="0") == 1
        assert m.value("tally_dirty_slots", shard="0") == 0
        assert (await actor.stats())["checkpoints"] == 1

        await actor.checkpoint()  # nothing new: no line
        assert len(logged("checkpoint")) == 1
        await actor.shutdown()

    try:
        run(scenario())
    finally:
        actor.store.close()
