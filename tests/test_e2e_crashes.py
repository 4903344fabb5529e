"""Exactly once through crashes: the real service, killed, restarted, totals exact.

The client (tally.client.TallyClient) keeps every batch until it is durable
and resends after reconnecting; shards apply a (producer, seq) at most once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import date

import httpx
import pymongo
import pytest
from oracle import Oracle
from served import Served
from test_e2e_serve import TENANTS, dataset, recent_years

from tally.client import TallyClient

pytestmark = pytest.mark.e2e


class Feeder(threading.Thread):
    """Sends rows through one client, sampling its durable seq as it goes."""

    def __init__(self, served: Served, rows: list[list], batch_size: int = 5_000,
                 rate: float | None = None) -> None:
        super().__init__(daemon=True)
        # rows/s at most: a killed service's workers outlive it by a second or two and
        # go on acknowledging (and checkpointing), so an unpaced stream can end in that
        # time, durable, before the kill has any effect
        self.rate = rate
        self.client = TallyClient("127.0.0.1", served.tcp_port, producer="crash-test",
                                  batch_size=batch_size, timeout=10.0)
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
                    if self.rate:  # never a burst to catch up: the kill must find work
                        time.sleep(10_000 / self.rate)
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


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (Ray's workers are its raylet's children)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def shard_pids(served: Served) -> list[int]:
    """The shard actor processes of this service: not those of another Ray session (a
    service stopped a moment ago whose workers have not exited yet, or another run's)."""
    assert served.proc is not None
    pids = []
    for pid in descendants(served.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"ray::ShardActor" in f.read():
                    pids.append(pid)
        except OSError:
            continue
    return sorted(pids)


def live_shards(served: Served, count: int) -> list[int]:
    """The shard processes once all ``count`` are up (a killed one restarts first)."""
    wait_for(lambda: len(shard_pids(served)) == count, 60, f"{count} shard processes")
    return shard_pids(served)


def stream(n: int, seed: int) -> tuple[list[list], Oracle, date, date]:
    """``n`` increments over the last ~3 months, the oracle of them, and the days to check."""
    now = int(time.time())
    rows = dataset(n, now, seed=seed)
    oracle = Oracle()
    for r in rows:
        oracle.add(*r)
    return rows, oracle, date.fromtimestamp(now - 95 * 86400), date.fromtimestamp(now)


def serve_sqlite(tmp_path, *extra: str) -> Served:
    return Served(tmp_path, "sqlite:///data/tally.db", "--checkpoint-interval", "0.5", *extra,
                  shards=2).start()


def test_sigkill_of_the_whole_service_twice_mid_stream(tmp_path):
    rows, oracle, start, end = stream(300_000, 11)
    served = serve_sqlite(tmp_path)
    feeder = Feeder(served, rows, rate=40_000)
    feeder.start()
    try:
        for fraction in (0.25, 0.6):
            wait_for(lambda f=fraction: feeder.sent >= f * len(rows) or not feeder.is_alive(),
                     120, "the stream to progress")
            served.kill()
            served.start()
        feeder.join(300)
        assert not feeder.is_alive() and feeder.error is None, feeder.error
        # Both kills cut the client off mid-stream. (Whether it then resends depends on
        # whether the killed service's workers, which outlive it by a second or two,
        # checkpointed what was in flight before dying: not something to assert.)
        assert feeder.client.stats["reconnects"] >= 2, feeder.client.stats
        assert feeder.durable_seen == sorted(feeder.durable_seen)
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
    rows, oracle, start, end = stream(2_000_000, 12)
    served = serve_sqlite(tmp_path)
    feeder = Feeder(served, rows)
    feeder.start()
    try:
        for k in range(5):
            wait_for(lambda k=k: feeder.sent >= (k + 1) * len(rows) // 7
                     or not feeder.is_alive(), 120, "the stream to progress")
            pids = live_shards(served, 2)
            os.kill(pids[k % len(pids)], signal.SIGKILL)
        feeder.join(300)
        assert not feeder.is_alive() and feeder.error is None, feeder.error
        assert feeder.client.stats["reconnects"] >= 1
        assert feeder.durable_seen == sorted(feeder.durable_seen)
        for pid in live_shards(served, 2):  # restarted shards keep numpy's huge pages off
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert b"NUMPY_MADVISE_HUGEPAGE=0" in f.read().split(b"\0")
        check_totals(served, oracle, start, end)
    finally:
        assert served.stop() == 0, served.output()


def test_resent_durable_batches_are_acked_not_applied(tmp_path):
    from tally.client import Connection

    served = Served(tmp_path, "sqlite:///data/tally.db", "--checkpoint-interval", "0.2",
                    shards=2).start()
    now = int(time.time()) - 60
    batches = [[["acme", "logins", {"k": str(i % 7)}, now - i * 600, seq] for i in range(50)]
               for seq in range(1, 11)]
    expected = sum(sum(r[4] for r in b) for b in batches)

    def total() -> int:
        r = httpx.get(served.url + "/v1/series", params={
            "tenant": "acme", "metric": "logins", **recent_years(), "granularity": "month"})
        return r.json()["total"]

    try:
        with Connection("127.0.0.1", served.tcp_port, producer="resender") as conn:
            assert conn.welcome["durable_seq"] == 0
            for seq, rows in enumerate(batches, 1):
                reply = conn.request({"op": "inc", "seq": seq, "rows": rows})
                assert reply == {"op": "ack", "seq": seq, "rows": 50}

        def durable_seq() -> int:
            with Connection("127.0.0.1", served.tcp_port, producer="resender") as c:
                return c.welcome["durable_seq"]

        wait_for(lambda: durable_seq() == 10, 30, "all ten batches to be durable")
        assert total() == expected
        with Connection("127.0.0.1", served.tcp_port, producer="resender") as conn:
            for seq, rows in enumerate(batches, 1):
                reply = conn.request({"op": "inc", "seq": seq, "ack": "durable", "rows": rows})
                assert reply == {"op": "ack", "seq": seq, "rows": 50}
                assert conn.receive() == {"op": "durable", "seq": seq}
        assert total() == expected
    finally:
        assert served.stop() == 0, served.output()


def test_a_store_outage_answers_overloaded_then_everything_lands(tmp_path):
    """30 s in which the store cannot be written (another process holds SQLite's
    write lock): shards absorb up to their bound, then ingress says overloaded;
    afterwards the client's resends make the totals exact."""
    import sqlite3

    served = Served(tmp_path, "sqlite:///data/tally.db", "--checkpoint-interval", "0.3",
                    "--max-dirty-slots", "4000", shards=2).start()
    rows, oracle, start, end = stream(120_000, 13)
    try:
        feeder = Feeder(served, rows[:20_000])
        feeder.start()
        feeder.join(120)
        assert feeder.error is None
        lock = sqlite3.connect(tmp_path / "data" / "tally.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            feeder = Feeder(served, rows[20_000:], batch_size=1_000)
            feeder.start()
            wait_for(lambda: feeder.client.stats["overloaded"] > 0, 60, "overloaded")
            time.sleep(30)
            assert feeder.is_alive()  # held back, not failed
            assert feeder.error is None
            stats = shard_stats(ray_address(served))
            assert all(s["dirty_slots"] <= 4000 for s in stats), stats  # memory stays bounded
            assert max(s["dirty_slots"] for s in stats) > 1000, stats  # and it was the bound
        finally:
            lock.execute("COMMIT")
            lock.close()
        feeder.join(300)
        assert not feeder.is_alive() and feeder.error is None, feeder.error
        check_totals(served, oracle, start, end)
    finally:
        assert served.stop() == 0, served.output()


def ray_address(served: Served) -> str:
    match = re.search(r"Ray at (\S+) \(namespace", served.output())
    assert match, served.output()
    return match.group(1)


def ray_kill(address: str, name: str) -> None:
    """ray.kill from another driver, as an operator would (the actor restarts).

    It joins with ``address="auto"`` (the explicit GCS address is refused with
    InvalidAuthToken under Ray 2.60's token auth here, while "auto" is not) and
    checks that it reached the service's cluster before killing anything.
    """
    script = (
        "import ray, sys\n"
        "ray.init(address='auto', namespace='tally', log_to_driver=False)\n"
        "assert ray.get_runtime_context().gcs_address == sys.argv[1]\n"
        "ray.kill(ray.get_actor(sys.argv[2]), no_restart=False)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, address, name], timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def shard_stats(address: str) -> list[dict]:
    """Every shard's own account (dirty slots, store errors), read through Ray."""
    script = (
        "import json, ray, sys\n"
        "ray.init(address='auto', namespace='tally', log_to_driver=False)\n"
        "assert ray.get_runtime_context().gcs_address == sys.argv[1]\n"
        "gw = [a['name'] for a in ray.util.list_named_actors(all_namespaces=True)\n"
        "      if a['name'].startswith('tally-gateway')][0]\n"
        "print(json.dumps(ray.get(ray.get_actor(gw).stats.remote())['shards']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, address], timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_ray_kill_of_shard_actors_five_times_mid_stream(tmp_path):
    rows, oracle, start, end = stream(2_000_000, 14)
    served = serve_sqlite(tmp_path)
    address = ray_address(served)
    feeder = Feeder(served, rows)
    feeder.start()
    try:
        for k in range(5):
            wait_for(lambda k=k: feeder.sent >= (k + 1) * len(rows) // 7
                     or not feeder.is_alive(), 120, "the stream to progress")
            live_shards(served, 2)
            ray_kill(address, f"tally-shard-{k % 2}")
        feeder.join(300)
        assert not feeder.is_alive() and feeder.error is None, feeder.error
        assert feeder.client.stats["reconnects"] >= 1
        live_shards(served, 2)
        check_totals(served, oracle, start, end)
    finally:
        assert served.stop() == 0, served.output()


def test_a_mongodb_write_outage_answers_overloaded_then_everything_lands(tmp_path, secantus):
    """30 s in which MongoDB refuses every write (a failCommand fail point on
    SecantusDB): checkpoints fail and are retried, shards stop at their bound,
    ingress says overloaded, and afterwards the totals are exact."""
    url = secantus.url("tally_outage")
    served = Served(tmp_path, url, "--checkpoint-interval", "0.3", "--max-dirty-slots", "3000",
                    shards=2).start()
    rows, oracle, start, end = stream(40_000, 15)
    admin = pymongo.MongoClient(secantus.url("admin")).admin
    try:
        feeder = Feeder(served, rows[:5_000])
        feeder.start()
        feeder.join(120)
        assert feeder.error is None
        admin.command({"configureFailPoint": "failCommand", "mode": "alwaysOn",
                       "data": {"failCommands": ["insert", "update", "delete"],
                                "errorCode": 91}})
        try:
            feeder = Feeder(served, rows[5_000:], batch_size=1_000)
            feeder.start()
            wait_for(lambda: feeder.client.stats["overloaded"] > 0, 60, "overloaded")
            time.sleep(30)
            assert feeder.is_alive() and feeder.error is None
            stats = shard_stats(ray_address(served))
            assert all(s["dirty_slots"] <= 3000 for s in stats), stats
            assert all(s["store_errors"] > 0 for s in stats), stats
        finally:
            admin.command({"configureFailPoint": "failCommand", "mode": "off"})
        feeder.join(300)
        assert not feeder.is_alive() and feeder.error is None, feeder.error
        check_totals(served, oracle, start, end)
    finally:
        assert served.stop() == 0, served.output()
