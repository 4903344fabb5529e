"""/metrics as an operator reads it: exact counts after real requests, one valid exposition.

No Ray: shards run in-process (LocalShards) behind the real FastAPI app, the
shard-side registry is driven with a fake clock, and the shard actor's class
is used as a plain object over SQLite to check its checkpoint metrics and the
few log lines it still writes.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import logging
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tally.actors import logs
from tally.actors.clients import LocalShards
from tally.actors.metrics import CheckpointLag, ShardMetrics
from tally.actors.shard import ShardActor
from tally.actors.shard_state import Outcome, ShardState
from tally.api.http import create_app
from tally.api.metrics import GatewayMetrics
from tally.api.service import Service
from tally.checkpoint.sqlite import SqliteStore
from tally.cluster.supervisor import summary
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


def test_shard_actor_counts_checkpoints_and_logs_only_a_failure_and_the_recovery(
    tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr("tally.actors.shard.gc.freeze", lambda: None)
    actor = ShardActor.__ray_actor_class__(0, f"sqlite:///{tmp_path}/t.db", 3600.0)
    caplog.set_level(logging.INFO, logger="tally.shard")

    def logged(event: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tally.shard"]
        return [line for line in lines if event is None or line["event"] == event]

    async def scenario() -> None:
        await actor.ready()
        assert await actor.checkpoint() == 0

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
        for _ in range(3):  # an outage: logged once, counted every time
            with pytest.raises(ConnectionError):
                await actor.checkpoint()
        [failed] = logged()
        assert failed["event"] == "checkpoint_failed" and failed["failures"] == 1
        assert "store down" in failed["error"] and failed["shard"] == 0
        actor.store.write_checkpoint = write
        await asyncio.sleep(0.05)
        m = Scrape(await actor.metrics())
        assert m.value("tally_checkpoint_lag_seconds", shard="0") >= 0.1
        assert m.value("tally_store_errors_total", shard="0") == 3
        assert m.value("tally_checkpoint_failures_total", shard="0") == 3
        assert m.value("tally_checkpoints_total", shard="0") == 0

        assert await actor.checkpoint() == 1
        [recovered] = logged("checkpoint_recovered")
        assert recovered["failures"] == 3 and recovered["outage_seconds"] >= 0.05
        assert [e["event"] for e in logged()] == ["checkpoint_failed", "checkpoint_recovered"]
        m = Scrape(await actor.metrics())
        assert m.value("tally_checkpoint_lag_seconds", shard="0") == 0
        assert m.value("tally_checkpoints_total", shard="0") == 1
        assert m.value("tally_checkpoint_duration_seconds_count", shard="0") == 1
        assert m.value("tally_checkpoint_slots_total", shard="0") == 5
        assert m.value("tally_checkpoint_documents_total", shard="0") == 4  # 4 series, 1 month
        assert m.value("tally_checkpoint_new_series_total", shard="0") == 4
        assert m.value("tally_checkpoint_wait_seconds_count", shard="0") == 1
        assert m.value("tally_checkpoint_wait_seconds_sum", shard="0") >= 0.1
        assert m.value("tally_checkpoint_slow_total", shard="0") == 0
        assert m.value("tally_dirty_slots", shard="0") == 0
        assert (await actor.stats())["checkpoints"] == 1
        summary = await actor.summary()
        assert summary["checkpoints"] == 1 and summary["failed_checkpoints"] == 3
        assert summary["increments"] == 5 and summary["slowest_checkpoint"] > 0
        assert (await actor.summary())["slowest_checkpoint"] == 0  # since the last call

        await actor.checkpoint()  # nothing new: no line
        assert len(logged()) == 2
        await actor.shutdown()

    try:
        run(scenario())
    finally:
        actor.store.close()


def test_a_slow_checkpoint_is_logged_and_its_repeats_are_throttled(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("tally.actors.shard.gc.freeze", lambda: None)
    actor = ShardActor.__ray_actor_class__(0, f"sqlite:///{tmp_path}/t.db", 0.05)
    caplog.set_level(logging.INFO, logger="tally.shard")
    write = actor.store.write_checkpoint

    def slow(cp: Any) -> None:
        time.sleep(0.08)  # longer than the interval
        write(cp)

    actor.store.write_checkpoint = slow

    async def scenario() -> None:
        await actor.ready()
        for k in range(2):
            assert (await actor.apply(rows_batch(rows(2 + k), NOW)))["status"] == "applied"
            await actor.checkpoint()
        m = Scrape(await actor.metrics())
        assert m.value("tally_checkpoint_slow_total", shard="0") == 2
        await actor.shutdown()

    try:
        run(scenario())
    finally:
        actor.store.close()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tally.shard"]
    [line] = lines  # the second within REPEAT_SECONDS is counted, not logged
    assert line["event"] == "checkpoint_slow" and line["seconds"] > line["interval"] == 0.05
    assert line["slots"] == 2 and line["not_logged"] == 0


def test_the_summary_line_is_the_difference_of_two_rounds_of_counts():
    shard = {"increments": 1000, "checkpoints": 10, "slow_checkpoints": 0,
             "failed_checkpoints": 1, "errors": 1, "slowest_checkpoint": 0.01, "lag": 0.5,
             "dirty_slots": 7}
    before = {"tally-shard-0": shard, "tally-shard-1": shard,
              "gw": {"connections": 3, "cut_off": 2, "errors": 0},
              "tally-supervisor": {"errors": 0}}
    now = {
        "tally-shard-0": {**shard, "increments": 7000, "checkpoints": 40,
                          "slowest_checkpoint": 0.25, "dirty_slots": 3},
        # restarted: its counts start again from zero
        "tally-shard-1": {**shard, "increments": 600, "checkpoints": 5, "failed_checkpoints": 0,
                          "errors": 0, "lag": 2.5},
        "gw": {"connections": 4, "cut_off": 5, "errors": 2},
        "gw2": None,
        "tally-supervisor": {"errors": 1},
    }
    line = summary(before, now, 60.0)
    assert line == {
        "seconds": 60.0, "increments_per_s": 110.0, "checkpoints": 35, "slow_checkpoints": 0,
        "failed_checkpoints": 0, "slowest_checkpoint_s": 0.25, "max_lag_s": 2.5,
        "dirty_slots": 10, "connections": 4, "cut_off": 3, "errors": 3, "shards": 2,
        "gateways": 1, "unanswered": ["gw2"],
    }


def test_log_lines_are_json_with_time_level_and_pid_and_repeats_are_throttled():
    record = logging.LogRecord("tally.x", logging.ERROR, __file__, 1,
                               json.dumps({"event": "error", "shard": 3}), None, None)
    line = json.loads(logs.JsonLines().format(record))
    assert line["level"] == "error" and line["event"] == "error" and line["shard"] == 3
    assert line["ts"].endswith("Z") and line["pid"] == record.process
    other = logging.LogRecord("uvicorn", logging.WARNING, __file__, 1, "plain %s", ("text",), None)
    assert json.loads(logs.JsonLines().format(other))["message"] == "plain text"

    clock = [0.0]
    throttle = logs.Throttle(10, clock=lambda: clock[0])
    assert throttle.admit("a") == 0
    assert throttle.admit("a") is None and throttle.admit("a") is None
    assert throttle.admit("b") == 0  # each key its own
    clock[0] = 10
    assert throttle.admit("a") == 2  # the line says how many were left out
    throttle.reset("a")
    assert throttle.admit("a") == 0  # a new episode is told at once


def test_ray_output_is_plain_off_a_terminal_and_the_operator_decides_first():
    env: dict[str, str] = {}
    logs.ray_output_env(env, terminal=True)
    assert env == {"RAY_DEDUP_LOGS": "0"}
    env = {"RAY_COLOR_PREFIX": "1"}
    logs.ray_output_env(env, terminal=False)
    assert env == {"RAY_DEDUP_LOGS": "0", "RAY_COLOR_PREFIX": "1",
                   "RAY_DISABLE_WORKER_LOG_PREFIX": "1"}
