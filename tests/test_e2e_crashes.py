"""Exactly once through crashes: the real service, killed, restarted, totals exact.

The client (wire.client.TallyClient) keeps every batch until it is durable
and resends after reconnecting; shards apply a (producer, seq) at most once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from datetime import date

import httpx
import pytest

from tests.oracle import Oracle
from tests.served import Served
from tests.test_e2e_serve import TENANTS, dataset
from wire.client import TallyClient

pytestmark = pytest.mark.e2e


class Feeder(threading.Thread):
    """Sends rows through one client, sampling its durable seq as it goes."""

    def __init__(self, served: Served, rows: list[list]) -> None:
        super().__init__(daemon=True)
        self.client = TallyClient("127.0.0.1", served.tcp_port, producer="crash-test",
                                  batch_size=5_000, timeout=10.0)
        self.rows = rows
        self.sent = 0
        self.error: BaseException | None = None
        self.durable_seen: list[int] = []

    def run(self) -> None:
        try:
            for n, (tenant, metric, tags, ts, value) in enumerate(self.rows):
                self.client.inc(tenant, metric, value, ts=ts, tags=tags)
                self.sent = n + 1
                if n % 10_000 == 0:
                    # paced by the server, so the kills land mid-stream
                    self.client.flush(durable=False, timeout=180)
                    self.durable_seen.append(self.client.durable_seq)
            self.client.flush(durable=True, timeout=180)
            self.durable_seen.append(self.client.durable_seq)
        except BaseException as e:  # surfaced by the test through self.error
            self.error = e
        finally:
            self.client.close(timeout=60)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def check_totals(served: Served, oracle: Oracle, start: date, end: date) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as http:
        for tenant in TENANTS:
            for metric in ("messages.received", "messages.handled", "logins"):
                r = http.get("/v1/series", params={
                    "tenant": tenant, "metric": metric, "granularity": "day",
                    "from": start.isoformat(), "to": end.isoformat()})
                points, total = oracle.series(tenant, metric, {}, start, end, "day", "UTC")
                assert (r.json()["points"], r.json()["total"]) == (points, total), metric


def shard_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::ShardActor"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def live_shards(count: int) -> list[int]:
    """The shard processes once all ``count`` are up (a killed one restarts first)."""
    wait_for(lambda: len(shard_pids()) == count, 60, f"{count} shard processes")
    return shard_pids()


def test_sigkill_of_the_whole_service_twice_mid_stream(tmp_path):
    now = int(time.time())
    rows = dataset(300_000, now, seed=11)
    oracle = Oracle()
    for r in rows:
        oracle.add(*r)
    served = Served(tmp_path, "sqlite:///data/tally.db", "--checkpoint-interval", "0.5",
                    shards=2).start()
    feeder = Feeder(served, rows)
    feeder.start()
    try:
        for fraction in (0.25, 0.6):
            wait_for(lambda f=fraction: feeder.sent >= f * len(rows) or not feeder.is_alive(),
                     120, "the stream to progress")
            served.kill()
            served.start()
        feeder.join(300)
        assert not feeder.is_alive() and feeder.error is None, feeder.error
        assert feeder.client.stats["resends"] > 0
        assert feeder.durable_seen == sorted(feeder.durable_seen)
        start, end = date.fromtimestamp(now - 95 * 86400), date.fromtimestamp(now)
        check_totals(served, oracle, start, end)
    finally:
        code = served.stop()
    assert code == 0, served.output()
    again = Served(tmp_path, "sqlite:///data/tally.db", shards=2).start()
    try:
        check_totals(again, oracle, start, end)
    finally:
        again.stop()


def test_sigkill_of_shard_actors_five_times_mid_stream(tmp_path):
    now = int(time.time())
    rows = dataset(400_000, now, seed=12)
    oracle = Oracle()
    for r in rows:
        oracle.add(*r)
    served = Served(tmp_path, "sqlite:///data/tally.db", "--checkpoint-interval", "0.5",
                    shards=2).start()
    feeder = Feeder(served, rows)
    feeder.start()
    try:
        for k in range(5):
            wait_for(lambda k=k: feeder.sent >= (k + 1) * len(rows) // 7
                     or not feeder.is_alive(), 120, "the stream to progress")
            pids = live_shards(2)
            os.kill(pids[k % len(pids)], signal.SIGKILL)
        feeder.join(300)
        assert not feeder.is_alive() and feeder.error is None, feeder.error
        assert feeder.client.stats["reconnects"] >= 1
        assert feeder.durable_seen == sorted(feeder.durable_seen)
        start, end = date.fromtimestamp(now - 95 * 86400), date.fromtimestamp(now)
        live_shards(2)
        check_totals(served, oracle, start, end)
    finally:
        assert served.stop() == 0, served.output()
