"""`tally serve` with a tokens file on a non-loopback address, its metrics and its logs."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from inproc import RawConnection, tokens_file
from prometheus_client.parser import text_string_to_metric_families
from served import Served
from test_e2e_serve import run_serve

from tally.client import TallyClient

pytestmark = pytest.mark.e2e

NOW = int(time.time())
DAY = time.strftime("%Y-%m-%d", time.gmtime(NOW - 60))
TS = NOW - 60 - (NOW - 60) % 86400 + 1
INGEST, QUERY, ADMIN = "ingest-0123456789abcdef", "query-0123456789abcdef", "admin-0123456789ab"
TOKENS = tokens_file(
    ("acme writer", INGEST, ["acme"], ["ingest"]),
    (None, QUERY, ["acme"], ["query"]),
    ("prometheus", ADMIN, ["*"], ["admin"]),
)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def summary_lines(out: str) -> list[dict]:
    return [e for e in map(json.loads, (line for line in out.splitlines()
                                         if line.startswith("{")))
            if e["event"] == "summary"]


def test_tokens_on_every_interface_with_metrics_and_a_log_an_operator_can_read(tmp_path):
    (tmp_path / "tokens.toml").write_text(TOKENS)
    # Output to a file, as under systemd or docker: no terminal.
    served = Served(tmp_path, "sqlite:///t.db", "--host", "0.0.0.0", "--tokens", "tokens.toml",
                    "--checkpoint-interval", "0.5", "--log-summary-interval", "1",
                    shards=2).start()
    started = time.monotonic()
    try:
        query = {"tenant": "acme", "metric": "m", "from": DAY, "to": DAY}
        assert httpx.get(served.url + "/v1/series", params=query).status_code == 401
        bearer = {"Authorization": f"Bearer {QUERY}"}
        assert httpx.get(served.url + "/v1/series", params={**query, "tenant": "globex"},
                         headers=bearer).status_code == 403
        with TallyClient("127.0.0.1", served.tcp_port, token=INGEST, producer="e2e") as client:
            for n in range(5000):
                client.inc("acme", "m", 1 + n % 3, tags={"k": f"v{n % 7}"}, ts=TS)
            client.flush(durable=True, timeout=60)
        r = httpx.get(served.url + "/v1/series", params=query, headers=bearer)
        assert r.status_code == 200 and r.json()["total"] == 9999
        r = httpx.post(served.url + "/v1/increments", headers={"Authorization": f"Bearer {INGEST}"},
                       json={"rows": [["acme", "m", None, TS, "x"]]})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "bad_row")

        assert httpx.get(served.url + "/metrics", headers=bearer).status_code == 403
        r = httpx.get(served.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        got = samples(r.text)
        assert got[("tally_increments_accepted_total", (("ingress", "tcp"),))] == 5000
        assert got[("tally_increments_rejected_total",
                    (("ingress", "http"), ("reason", "bad_row")))] == 1
        shards = {dict(labels)["shard"] for name, labels in got if name == "tally_dirty_slots"}
        assert shards == {"0", "1"}
        applied = sum(v for (name, _), v in got.items()
                      if name == "tally_shard_increments_total")
        assert applied == 5000
        assert sum(v for (name, _), v in got.items() if name == "tally_checkpoints_total") >= 2
        assert sum(v for (name, _), v in got.items()
                   if name == "tally_checkpoint_slots_total") >= 7  # 7 series, one hour
        assert sum(v for (name, _), v in got.items()
                   if name == "tally_checkpoint_wait_seconds_count") >= 2

        # Two clients the server cuts off: a frame that is not msgpack, a hello without a token.
        with RawConnection(served.tcp_port) as conn:
            conn.send(b"\x00\x00\x00\x05hello")
            assert conn.receive()["code"] == "bad_frame"
        with RawConnection(served.tcp_port) as conn:
            conn.send({"op": "hello", "v": 1, "producer": "no-token"})
            assert conn.receive()["code"] == "unauthorized"
        # A summary line after the cut-offs: awaited, not slept for (Ray forwards the
        # supervisor's lines by polling its log file; a busy machine takes longer).
        deadline = time.monotonic() + 60
        while sum(e["cut_off"] for e in summary_lines(served.output())) < 2:
            assert time.monotonic() < deadline, served.output()
            time.sleep(0.2)
    finally:
        assert served.stop() == 0, served.output()
    ran = time.monotonic() - started
    out = served.output()
    assert "\x1b" not in out, "ANSI escape sequences in a log that is not a terminal"
    assert "pid=" not in out  # Ray's "(ShardActor pid=…)" prefix
    [start] = [line for line in out.splitlines() if line.startswith("tally: serving HTTP")]
    assert f"TCP on 0.0.0.0:{served.tcp_port}" in start and "2 shards" in start
    assert "store sqlite:///" in start and "version " in start
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert all({"ts", "level", "pid", "event"} <= set(e) for e in events), events
    # checkpoints are in /metrics: none is logged unless slow or failed
    assert not [e for e in events if e["event"] == "checkpoint"]
    assert all(e["event"] in ("checkpoint_slow", "checkpoint_failed", "checkpoint_recovered")
               for e in events if e["event"].startswith("checkpoint"))
    cut = {e["reason"]: e for e in events if e["event"] == "client_cut_off"}
    assert {"bad_frame", "unauthorized"} <= set(cut), events
    assert cut["unauthorized"]["producer"] is None and cut["bad_frame"]["level"] == "warning"
    summaries = summary_lines(out)
    assert summaries and sum(e["checkpoints"] for e in summaries) >= 2
    assert sum(e["cut_off"] for e in summaries) >= 2
    assert {"increments_per_s", "slowest_checkpoint_s", "dirty_slots", "connections",
            "errors"} <= set(summaries[0])
    # nothing per increment, batch or checkpoint: a few dozen lines, and one summary a
    # second (as many as the run took seconds: a busy machine's run takes longer)
    assert len(out.splitlines()) - len(summaries) < 60, out
    assert len(summaries) <= ran + 2, (ran, out)


def test_a_bad_tokens_file_is_refused_before_starting(tmp_path):
    (tmp_path / "tokens.toml").write_text('[[token]]\nsecret = "short"\n')
    done = run_serve(tmp_path, "--host", "0.0.0.0", "--tokens", "tokens.toml")
    assert done.returncode == 2
    assert "tokens file tokens.toml: token 1: secret must be a string of at least 16" in \
        done.stderr, done.stderr
