"""End to end: ``tally serve`` as a subprocess, fed through every ingress,
checked against a brute-force oracle, before and after a clean restart."""

from __future__ import annotations

import os
import random
import socket
import sqlite3
import subprocess
import time
from datetime import date, timedelta

import httpx
import msgpack
import numpy as np
import pymongo
import pytest
from oracle import Oracle
from served import TALLY, Served, free_port

from tally.bench.run import scrape, summed
from tally.client import Connection, ServerError

pytestmark = pytest.mark.e2e

TENANTS = ("acme", "globex")
CHANNELS = ("email", "chat", "twitter")
SENTIMENTS = ("positive", "neutral", "negative")
AGENTS = ("ann", "bob", "cho", "dev")
BUCKETS = ("lt_30m", "lt_1h", "lt_4h", "lt_24h", "gt_24h")
ZONES = ("UTC", "Europe/London", "America/New_York", "Asia/Tokyo", "Australia/Sydney")


def dataset(n: int, now: int, seed: int = 2026) -> list[list]:
    """~40 series over the last ~3 months, two tenants, some negative corrections."""
    rnd = random.Random(seed)
    series = []
    for tenant in TENANTS:
        series += [(tenant, "messages.received", {"channel": c, "sentiment": s})
                   for c in CHANNELS for s in SENTIMENTS]
        series += [(tenant, "messages.handled", {"agent": a}) for a in AGENTS]
        series += [(tenant, "response_time", {"bucket": b}) for b in BUCKETS]
        series += [(tenant, "logins", None)]
    start = now - 93 * 86400
    rows = []
    for _ in range(n):
        tenant, metric, tags = rnd.choice(series)
        ts = rnd.randrange(start, now - 60)
        value = rnd.choice((1, 1, 1, 2, 3, rnd.randrange(1, 500), -1))
        rows.append([tenant, metric, tags, ts, value])
    return rows


def send_everything(served: Served, rows: list[list], oracle: Oracle) -> None:
    third = len(rows) // 3
    tcp_rows, columnar, http_rows = rows[:third], rows[third : 2 * third], rows[2 * third :]
    with Connection("127.0.0.1", served.tcp_port, producer="e2e-rows") as conn:
        for k in range(0, len(tcp_rows), 2000):
            chunk = tcp_rows[k : k + 2000]
            assert conn.send_rows(chunk) == {"op": "ack", "seq": conn.seq, "rows": len(chunk)}
    with Connection("127.0.0.1", served.tcp_port, producer="e2e-columnar") as conn:
        for k in range(0, len(columnar), 5000):
            chunk = columnar[k : k + 5000]
            keys = sorted({(r[0], r[1], tuple(sorted((r[2] or {}).items()))) for r in chunk})
            index = {key: n for n, key in enumerate(keys)}
            ser = [(t, m, dict(tags) if tags else None) for t, m, tags in keys]
            idx = [index[(r[0], r[1], tuple(sorted((r[2] or {}).items())))] for r in chunk]
            reply = conn.send_columnar(ser, idx, [r[3] for r in chunk], [r[4] for r in chunk])
            assert reply["rows"] == len(chunk)
    with httpx.Client(base_url=served.url, timeout=30) as http:
        half = len(http_rows) // 2
        for k in range(0, half, 3000):
            chunk = http_rows[k : min(k + 3000, half)]
            r = http.post("/v1/increments", json={"rows": chunk})
            assert r.status_code == 200 and r.json() == {"rows": len(chunk)}, r.text
        for k in range(half, len(http_rows), 3000):
            chunk = http_rows[k : k + 3000]
            series = sorted({(r[0], r[1], tuple(sorted((r[2] or {}).items()))) for r in chunk})
            index = {key: n for n, key in enumerate(series)}
            body = {
                "series": [[t, m, dict(tags) if tags else None] for t, m, tags in series],
                "i": np.array([index[(r[0], r[1], tuple(sorted((r[2] or {}).items())))]
                               for r in chunk], "<u4").tobytes(),
                "ts": np.array([r[3] for r in chunk], "<i8").tobytes(),
                "v": np.array([r[4] for r in chunk], "<i8").tobytes(),
            }
            r = http.post("/v1/increments", content=msgpack.packb(body),
                          headers={"content-type": "application/msgpack"})
            assert r.status_code == 200 and r.json() == {"rows": len(chunk)}, r.text
    for r in rows:
        oracle.add(*r)


def check_queries(served: Served, oracle: Oracle, today: date) -> int:
    """Every answer equals the oracle's; returns how many queries were checked."""
    start, end = today - timedelta(days=95), today
    month_to = today.replace(day=1) - timedelta(days=1)
    month_from = month_to.replace(day=1)
    prev_to = month_from - timedelta(days=1)
    prev_from = month_from - timedelta(days=(month_to - month_from).days + 1)
    wheres = [{}, {"channel": "email"}, {"channel": "chat", "sentiment": "negative"}]
    n = 0
    with httpx.Client(base_url=served.url, timeout=30) as http:

        def get(path: str, **params: object) -> dict:
            nonlocal n
            n += 1
            r = http.get(path, params=params)
            assert r.status_code == 200, r.text
            return r.json()

        for tenant in TENANTS:
            for tz in ZONES:
                for gran in ("day", "week", "month"):
                    for where in wheres:
                        got = get("/v1/series", tenant=tenant, metric="messages.received",
                                  **{"from": start.isoformat(), "to": end.isoformat()},
                                  granularity=gran, tz=tz,
                                  where=[f"{k}:{v}" for k, v in where.items()])
                        points, total = oracle.series(tenant, "messages.received", where,
                                                      start, end, gran, tz)
                        assert (got["points"], got["total"]) == (points, total), (tz, gran, where)
                # hours across the last Sunday of October (DST ends in Europe)
                got = get("/v1/series", tenant=tenant, metric="messages.handled", tz=tz,
                          granularity="hour", **{"from": "2026-10-24", "to": "2026-10-26"})
                points, total = oracle.series(tenant, "messages.handled", {},
                                              date(2026, 10, 24), date(2026, 10, 26), "hour", tz)
                assert (got["points"], got["total"]) == (points, total), (tz, "hour")
                # the last whole month against as many days before it (both in the data's
                # 93 days whatever the date; a fixed month left it, and prev_total was 0)
                got = get("/v1/series", tenant=tenant, metric="logins", tz=tz,
                          compare="previous_period",
                          **{"from": month_from.isoformat(), "to": month_to.isoformat()})
                prev_points, prev_total = oracle.series(tenant, "logins", {}, prev_from,
                                                        prev_to, "day", tz)
                points, total = oracle.series(tenant, "logins", {}, month_from, month_to,
                                              "day", tz)
                assert got["total"] == total and got["points"] == points
                cmp = got["compare"]
                assert (cmp["from"], cmp["to"]) == (prev_from.isoformat(), prev_to.isoformat())
                assert (cmp["points"], cmp["total"]) == (prev_points, prev_total)
                assert cmp["change"] == pytest.approx((total - prev_total) / prev_total)
                for metric, by, where in (
                    ("messages.received", "channel", {}),
                    ("messages.received", "sentiment", {"channel": "twitter"}),
                    ("messages.handled", "agent", {}),
                ):
                    got = get("/v1/breakdown", tenant=tenant, metric=metric, by=by, tz=tz,
                              limit=2, where=[f"{k}:{v}" for k, v in where.items()],
                              **{"from": start.isoformat(), "to": end.isoformat()})
                    groups = oracle.breakdown(tenant, metric, by, where, start, end, tz)
                    ranked = sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))
                    assert got["groups"] == [{"value": k, "total": v} for k, v in ranked[:2]]
                    assert got["other"] == sum(v for _, v in ranked[2:])
                    assert got["total"] == sum(groups.values())
        catalog = get("/v1/catalog", tenant="acme")
        assert [m["metric"] for m in catalog["metrics"]] == [
            "logins", "messages.handled", "messages.received", "response_time"]
        assert catalog["metrics"][2]["tags"] == {"channel": sorted(CHANNELS),
                                                 "sentiment": sorted(SENTIMENTS)}
    return n


def test_exact_counts_through_every_ingress_and_a_restart(tmp_path):
    now = int(time.time())
    today = time.gmtime(now)
    today_d = date(today.tm_year, today.tm_mon, today.tm_mday)
    rows = dataset(60_000, now)
    oracle = Oracle()
    served = Served(tmp_path, "sqlite:///data/tally.db", "--checkpoint-interval", "0.5").start()
    try:
        send_everything(served, rows, oracle)
        assert check_queries(served, oracle, today_d) > 100
        r = httpx.get(served.url + "/v1/series", params={
            "tenant": "acme", "metric": "logins", "from": "2026-10-01", "to": "2026-10-31",
            "tz": "Asia/Kolkata"})
        assert r.status_code == 400
        assert "+05:30" in r.json()["error"]["message"]
        assert "whole" in r.json()["error"]["message"]
        # Idle, the shards fold their checkpoint runs into slot rows (actors/folds.py).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            shards = scrape(served.url)
            unfolded = summed(shards, "tally_unfolded_slots")
            folded = summed(shards, "tally_folded_slots_total")
            if folded and not unfolded:
                break
            time.sleep(0.2)
        assert folded > 0 and unfolded == 0, (folded, unfolded)
        assert check_queries(served, oracle, today_d) > 100
    finally:
        code = served.stop()
    assert code == 0, served.output()
    assert "final checkpoint written" in served.output()
    # stopped, every run is folded: the slot rows hold every count
    raw = sqlite3.connect(tmp_path / "data" / "tally.db")
    assert raw.execute("SELECT count(*) FROM runs").fetchone() == (0,)
    assert raw.execute("SELECT sum(value) FROM slots").fetchone() == (sum(r[4] for r in rows),)
    raw.close()

    again = Served(tmp_path, "sqlite:///data/tally.db").start()
    try:
        check_queries(again, oracle, today_d)
    finally:
        assert again.stop() == 0, again.output()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("serve"), "memory://", shards=2).start()
    yield served
    served.stop()


def recent_years() -> dict[str, str]:
    """A query window over last year and this one: rows stamped about now are in it on
    whatever date the suite runs (a fixed year left them out from its 1 January)."""
    year = time.gmtime().tm_year
    return {"from": f"{year - 1}-01-01", "to": f"{year}-12-31"}


def logins_total(served: Served, tenant: str) -> int:
    r = httpx.get(served.url + "/v1/series", params={
        "tenant": tenant, "metric": "logins", **recent_years(), "granularity": "month"})
    assert r.status_code == 200, r.text
    return r.json()["total"]


BAD_ROWS = [
    ("a string value", ["badco", "logins", None, 0, "7"]),
    ("a float value", ["badco", "logins", None, 0, 1.5]),
    ("an int64 overflow", ["badco", "logins", None, 0, 2**63]),
    ("a bad tenant", ["Bad Co", "logins", None, 0, 1]),
    ("a bad metric", ["badco", "log ins", None, 0, 1]),
    ("a bad tag key", ["badco", "logins", {"Bad": "x"}, 0, 1]),
    ("a future timestamp", ["badco", "logins", None, 7200, 1]),
    ("a float timestamp", ["badco", "logins", None, 0.5, 1]),
    ("a short row", ["badco", "logins", None, 0]),
]


@pytest.mark.parametrize("what,bad", BAD_ROWS, ids=[w for w, _ in BAD_ROWS])
def test_a_bad_row_refuses_the_whole_batch_on_tcp_and_http(server, what, bad):
    now = int(time.time())
    bad = list(bad)
    if len(bad) == 5 and isinstance(bad[3], int):
        bad[3] += now  # relative timestamps: 0 is now, 7200 two hours ahead
    good = ["badco", "logins", None, now - 10, 1]
    before = logins_total(server, "badco")
    with Connection("127.0.0.1", server.tcp_port) as conn:
        with pytest.raises(ServerError) as e:
            conn.send_rows([good, good, good, bad, good])
        assert e.value.code == "bad_row" and e.value.row == 3, e.value.frame
        assert e.value.frame["seq"] == 1 and "row 3" in e.value.frame["message"]
        assert conn.ping() == {"op": "pong"}  # the connection survives a bad row
    body = msgpack.packb({"rows": [good, bad]})
    r = httpx.post(server.url + "/v1/increments", content=body,
                   headers={"content-type": "application/msgpack"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_row" and r.json()["error"]["row"] == 1
    assert logins_total(server, "badco") == before


def test_slot_overflow_refuses_the_batch_on_every_shard(server):
    now = int(time.time()) - 10
    with Connection("127.0.0.1", server.tcp_port) as conn:
        conn.send_rows([["ovf", "logins", None, now, 2**63 - 10]])
        rows = [["ovf", "logins", {"n": str(k)}, now, 1] for k in range(20)]
        rows.append(["ovf", "logins", None, now, 11])
        with pytest.raises(ServerError) as e:
            conn.send_rows(rows)
        assert e.value.code == "bad_row" and e.value.row == 20
    assert logins_total(server, "ovf") == 2**63 - 10


def test_tenants_never_see_each_other(server):
    now = int(time.time()) - 10
    with Connection("127.0.0.1", server.tcp_port) as conn:
        conn.send_rows([["tenant-a", "logins", {"secret": "a"}, now, 5],
                        ["tenant-b", "logins", {"secret": "b"}, now, 7]])
    assert logins_total(server, "tenant-a") == 5
    assert logins_total(server, "tenant-b") == 7
    cat = httpx.get(server.url + "/v1/catalog", params={"tenant": "tenant-a"}).json()
    assert cat["metrics"] == [{"metric": "logins", "series": 1, "tags": {"secret": ["a"]}}]
    r = httpx.get(server.url + "/v1/breakdown", params={
        "tenant": "tenant-b", "metric": "logins", "by": "secret", **recent_years()})
    assert r.json()["groups"] == [{"value": "b", "total": 7}]


def test_events_are_fanned_out_by_the_gateway_actor(server):
    # the built-in rules reach the gateway through Ray (GatewayOptions)
    event = {"type": "message.replied", "tenant": "evco", "ts": int(time.time()) - 10,
             "agent": "ann", "channel": "chat", "response_seconds": 4000}
    r = httpx.post(server.url + "/v1/events", json={"events": [event]})
    assert (r.status_code, r.json()) == (200, {"rows": 4}), r.text
    with Connection("127.0.0.1", server.tcp_port) as conn:
        assert conn.send_events([event, event])["rows"] == 8
        with pytest.raises(ServerError) as e:
            conn.send_events([event, {**event, "agent": None}])
        assert e.value.code == "bad_row" and e.value.row == 1, e.value.frame
    r = httpx.get(server.url + "/v1/breakdown", params={
        "tenant": "evco", "metric": "response_time", "by": "bucket", **recent_years()})
    assert r.json()["groups"] == [{"value": "lt_4h", "total": 3}], r.text


@pytest.mark.parametrize("params,needle", [
    ({"tz": "Asia/Kolkata"}, "+05:30"),
    ({"tz": "Mars/Olympus"}, "Mars/Olympus"),
    ({"granularity": "fortnight"}, "fortnight"),
    ({"from": "2026-11-05", "to": "2026-11-01"}, "after"),
    ({"from": "2026-13-01"}, "2026-13-01"),
    ({"where": "channel"}, "key:value"),
])
def test_bad_query_parameters_are_400_with_a_reason(server, params, needle):
    query = {"tenant": "acme", "metric": "logins", "from": "2026-11-01", "to": "2026-11-03"}
    query.update(params)
    r = httpx.get(server.url + "/v1/series", params=query)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "bad_request" and needle in err["message"], err


def run_serve(tmp_path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([TALLY, "serve", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout)


def test_a_taken_port_is_an_error_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_serve(tmp_path, "--store", "memory://", "--shards", "1",
                         "--http-port", str(port), "--tcp-port", str(free_port()))
    assert done.returncode == 1
    assert f"HTTP port {port}" in done.stderr


@pytest.mark.parametrize("args,needle", [
    (["--host", "0.0.0.0"], "not a loopback address"),
    (["--shards", "0"], "shards"),
    (["--rules", "no-such-rules.toml"], "rules file no-such-rules.toml: No such file"),
    (["--store", "postgres://x"], "postgres://x"),
    (["--store", "mongodb://127.0.0.1:9/t?serverSelectionTimeoutMS=300"], "not reachable"),
])
def test_settings_that_cannot_work_are_refused_before_starting(tmp_path, args, needle):
    done = run_serve(tmp_path, *args)
    assert done.returncode == 2
    assert "tally: error:" in done.stderr and needle in done.stderr


def test_the_shard_count_is_fixed_for_a_stores_life(tmp_path):
    from tally.checkpoint.sqlite import SqliteStore

    SqliteStore(str(tmp_path / "s.db")).ensure_layout(3)
    done = run_serve(tmp_path, "--store", "sqlite:///s.db", "--shards", "2")
    assert done.returncode == 2 and "3" in done.stderr and "2" in done.stderr, done.stderr


def test_exact_counts_on_mongodb_through_a_restart(tmp_path, secantus):
    """The production store over the real wire protocol (SecantusDB), smaller data."""
    now = int(time.time())
    rows = dataset(3_000, now, seed=7)
    oracle = Oracle()
    url = secantus.url("tally_e2e")
    served = Served(tmp_path, url, "--checkpoint-interval", "0.5", shards=2).start()
    try:
        send_everything(served, rows, oracle)
    finally:
        assert served.stop() == 0, served.output()
    docs = pymongo.MongoClient(url).get_database().months
    doc = docs.find_one({"tenant": "acme", "metric": "logins"})
    assert set(doc) == {"_id", "tenant", "metric", "tags", "month", "d", "h", "ck"}
    assert sum(doc["d"].values()) == sum(sum(day.values()) for day in doc["h"].values())
    again = Served(tmp_path, url, shards=2).start()
    try:
        for tenant in TENANTS:
            for tz in ("UTC", "America/New_York"):
                r = httpx.get(again.url + "/v1/series", params={
                    "tenant": tenant, "metric": "messages.received", "granularity": "week",
                    "tz": tz, "from": "2026-08-01", "to": "2026-12-31"})
                points, total = oracle.series(tenant, "messages.received", {}, date(2026, 8, 1),
                                              date(2026, 12, 31), "week", tz)
                assert (r.json()["points"], r.json()["total"]) == (points, total)
    finally:
        assert again.stop() == 0, again.output()


def allowed_cpus(served: Served, tcp_port: int) -> dict[str, list[int]] | None:
    """The CPUs each kind of the service's processes may run on, the same for each of
    its threads (None if any is not pinned): "tcp" for the gateway listening on
    ``tcp_port``, "http" for the other gateway, "shard" for the shards."""
    assert served.proc is not None
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(pid))
    mine, todo = [], [served.proc.pid]
    while todo:
        pid = todo.pop()
        mine.append(pid)
        todo.extend(children.get(pid, ()))
    listener = _listener_inode(tcp_port)
    found: dict[str, list[int]] = {}
    for pid in mine:
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read()
            masks = {_thread_cpus(int(t)) for t in os.listdir(f"/proc/{pid}/task")} - {None}
            fds = os.listdir(f"/proc/{pid}/fd")
            sockets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds}
        except OSError:
            continue
        if cmd.startswith("ray::ShardActor"):
            kind = "shard"
        elif cmd.startswith("ray::Gateway"):
            kind = "tcp" if f"socket:[{listener}]" in sockets else "http"
        else:
            continue
        assert len(masks) == 1, (kind, masks)  # every thread alike
        (mask,) = masks
        assert found.setdefault(kind, list(mask)) == list(mask), (kind, found, mask)
    if set(found) != {"tcp", "http", "shard"}:
        raise AssertionError(f"processes found: {found}")
    everything = sorted(os.sched_getaffinity(0))
    return None if all(v == everything for v in found.values()) else found


def _thread_cpus(tid: int) -> tuple[int, ...] | None:
    try:
        return tuple(sorted(os.sched_getaffinity(tid)))
    except OSError:  # a thread that ended meanwhile
        return None


def _listener_inode(port: int) -> str:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    return fields[9]
    raise AssertionError(f"nothing listens on {port}")


def listening(port: int) -> int:
    """Sockets listening on ``port`` on this host (LISTEN is state 0A in /proc/net/tcp)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    count += 1
    return count


def test_gateways_per_node_share_the_ports_and_find_each_others_series(tmp_path):
    """Two gateway processes on one node's ports (SO_REUSEPORT). The kernel hands
    each new connection to either, so a series acknowledged through one is queried,
    often, through the other: the answer must hold it (their peers broadcast)."""
    from tally.client import TallyClient

    served = Served(tmp_path, "sqlite:///data/tally.db", "--gateways-per-node", "2",
                    shards=2).start()
    try:
        deadline = time.monotonic() + 60  # the second gateway starts after the first
        while listening(served.tcp_port) < 2 or listening(served.http_port) < 2:
            assert time.monotonic() < deadline, served.output()
            time.sleep(0.2)
        assert "2 gateway processes per node sharing the ports" in served.output()
        params = {"tenant": "acme", "metric": "shared", "from": "2026-09-01",
                  "to": "2026-09-30", "granularity": "month"}
        for n in range(16):
            with TallyClient("127.0.0.1", served.tcp_port) as client:  # a new connection each
                client.inc("acme", "shared", 10 + n, tags={"k": f"s{n}"}, ts=1_790_000_000)
                client.flush(durable=False)
            r = httpx.get(served.url + "/v1/series", params={**params, "where": f"k:s{n}"})
            assert r.status_code == 200 and r.json()["total"] == 10 + n, (n, r.text)
        r = httpx.get(served.url + "/v1/series", params=params)
        assert r.json()["total"] == sum(10 + n for n in range(16))
    finally:
        code = served.stop()
    assert code == 0, served.output()
    assert "final checkpoint written" in served.output()


def test_http_gateways_take_the_http_port_alone_and_find_what_tcp_gateways_acknowledged(
    tmp_path,
):
    """--http-gateways-per-node 1: one process listens on HTTP only, one on TCP only.
    Every query reaches the HTTP one; it must count what the TCP one acknowledged a
    moment before (its peers' new series), and the StatsD port stays with TCP."""
    from tally.client import TallyClient

    statsd = free_port()
    served = Served(tmp_path, "sqlite:///data/tally.db", "--http-gateways-per-node", "1",
                    "--statsd-port", str(statsd), "--statsd-tenant", "acme",
                    "--cpu-affinity", "gateways", shards=2).start()
    try:
        deadline = time.monotonic() + 60
        while listening(served.tcp_port) < 1 or listening(served.http_port) < 1:
            assert time.monotonic() < deadline, served.output()
            time.sleep(0.2)
        assert (listening(served.tcp_port), listening(served.http_port)) == (1, 1)
        assert "gateway processes per node: 1 for HTTP, 1 for TCP" in served.output()
        # --cpu-affinity gateways: the TCP gateway on a core of its own, every thread of the
        # shards on the others, the HTTP gateway anywhere (nothing pinned on one core)
        cpus = sorted(os.sched_getaffinity(0))
        expected = {"tcp": cpus[:1], "http": cpus, "shard": cpus[1:]} if len(cpus) > 1 else None
        assert allowed_cpus(served, tcp_port=served.tcp_port) == expected, served.output()
        params = {"tenant": "acme", "metric": "split", "from": "2026-09-01",
                  "to": "2026-09-30", "granularity": "month"}
        with TallyClient("127.0.0.1", served.tcp_port) as client:
            for n in range(8):
                client.inc("acme", "split", 10 + n, tags={"k": f"s{n}"}, ts=1_790_000_000)
                client.flush(durable=False)
                r = httpx.get(served.url + "/v1/series", params={**params, "where": f"k:s{n}"})
                assert r.status_code == 200 and r.json()["total"] == 10 + n, (n, r.text)
        body = {"rows": [["acme", "split", {"k": "http"}, 1_790_000_000, 5]]}
        r = httpx.post(served.url + "/v1/increments", json=body)  # through the HTTP gateway
        assert r.status_code == 200, r.text
        r = httpx.get(served.url + "/v1/series", params=params)
        assert r.json()["total"] == sum(10 + n for n in range(8)) + 5
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:  # StatsD: the TCP one's
            u.sendto(b"split:7|c|#k:statsd\n", ("127.0.0.1", statsd))
        today = time.strftime("%Y-%m-%d", time.gmtime())
        query = {**params, "from": today, "to": today, "where": "k:statsd"}
        while httpx.get(served.url + "/v1/series", params=query).json()["total"] != 7:
            assert time.monotonic() < deadline + 30, served.output()
            time.sleep(0.1)
        # /metrics is served by the HTTP gateway: it shows the TCP one's counters too
        from prometheus_client.parser import text_string_to_metric_families

        samples = [s for f in text_string_to_metric_families(
            httpx.get(served.url + "/metrics").text) for s in f.samples]
        accepted = {(s.labels["ingress"], s.labels["gateway"]): s.value
                    for s in samples if s.name == "tally_increments_accepted_total"}
        by_ingress = {ingress: v for (ingress, _), v in accepted.items()}
        assert by_ingress == {"tcp": 8, "http": 1, "statsd": 1}, accepted
        gateways = {g for (_, g) in accepted}
        assert len(gateways) == 2 and all(g.startswith("tally-gateway-") for g in gateways)
        # the queries reached the shards by their sockets, none by the Ray fallback
        (http_gateway,) = {g for (ingress, g) in accepted if ingress == "http"}
        roads = {s.labels["path"]: s.value for s in samples
                 if s.name == "tally_shard_queries_total" and s.labels["gateway"] == http_gateway}
        assert roads["socket"] >= 10 and roads["ray"] == 0, roads
        # the client's batches (it names a producer) went to both shards by socket
        (tcp_gateway,) = {g for (ingress, g) in accepted if ingress == "tcp"}
        applies = {s.labels["path"]: s.value for s in samples
                   if s.name == "tally_shard_applies_total" and s.labels["gateway"] == tcp_gateway}
        assert applies["socket"] >= 8 * 2 and applies["lost"] == 0, applies
    finally:
        code = served.stop()
    assert code == 0, served.output()
