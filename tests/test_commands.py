"""`tally demo`, `tally import` and `tally query` against the real servers, in process
(tests/inproc.py): what each command reports must be what the API then answers, exactly,
including after an import is interrupted and run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import accumulate
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from inproc import InProcessTally, tokens_file

from tally.api.access import parse_access
from tally.api.rules import BUILTIN, RESPONSE_BUCKETS
from tally.client import TallyClient
from tally.cluster import cli, importer
from tally.cluster.demo import (
    CHANNELS,
    SENTIMENTS,
    existing_data,
    expected_totals,
    generate,
    run_demo,
)
from tally.cluster.importer import (
    CsvFile,
    ImportFailed,
    ImportOptions,
    durable_offset,
    parse_ts,
    producer_for,
    run_import,
)
from tally.cluster.query import spark

ROOT = Path(__file__).resolve().parent.parent
NOW = int(time.time())
BASE = NOW - 3 * 86400  # every row of these tests is within the last few days


@pytest.fixture(scope="module")
def tally(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessTally]:
    server = InProcessTally(tmp_path_factory.mktemp("commands")).start()
    yield server
    server.stop()


def day(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def series(tally: InProcessTally, tenant: str, metric: str, first: str, last: str,
           **params: Any) -> dict[str, Any]:
    r = httpx.get(tally.url + "/v1/series", params={
        "tenant": tenant, "metric": metric, "from": first, "to": last, **params})
    assert r.status_code == 200, r.text
    return r.json()


def total(tally: InProcessTally, tenant: str, metric: str, **params: Any) -> int:
    """Everything the metric holds over the last two weeks (all these tests write)."""
    return series(tally, tenant, metric, day(NOW - 14 * 86400), day(NOW), **params)["total"]


def options(tally: InProcessTally, path: Path, **kw: Any) -> ImportOptions:
    return ImportOptions(str(path), tcp_port=tally.tcp_port, progress=False,
                         **{"timeout": 20, **kw})


# ---------------------------------------------------------------------------- demo


def test_demo_events_are_deterministic_and_shaped_like_a_support_desk() -> None:
    end = 1_780_000_000
    a, b = generate(7, 365, end), generate(7, 365, end)
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in
               ("ts", "replied", "channel", "sentiment", "agent", "response"))
    assert not np.array_equal(generate(8, 365, end).ts[:1000], a.ts[:1000])
    assert 100_000 <= len(a) <= 300_000
    assert a.ts.max() <= end and a.ts.min() > end - 366 * 86400
    assert np.all(np.diff(a.ts) >= 0)

    received = a.ts[~a.replied]
    weekday = ((received // 86400) + 3) % 7
    per_day = Counter(weekday.tolist())
    assert min(per_day[d] for d in range(5)) > 1.6 * max(per_day[5], per_day[6])
    hod = (received // 3600) % 24
    assert (hod == 11).sum() > 5 * (hod == 3).sum()
    # the business grows: the last quarter is busier than the first
    q = (received.max() - received.min()) // 4
    assert (received > received.max() - q).sum() > 1.15 * (received < received.min() + q).sum()

    assert set(a.channel.tolist()) == set(range(len(CHANNELS)))
    assert set(a.sentiment[~a.replied].tolist()) == set(range(len(SENTIMENTS)))
    buckets = Counter(RESPONSE_BUCKETS.label(x) for x in a.response[a.replied].tolist())
    assert set(buckets) == set(RESPONSE_BUCKETS.labels)
    assert min(buckets.values()) > 0.01 * a.replied_count
    # agents differ in speed
    medians = [np.median(a.response[a.replied & (a.agent == k)]) for k in range(6)]
    assert max(medians) > 5 * min(medians)


def test_demo_totals_are_what_the_api_answers(tally: InProcessTally) -> None:
    end = NOW - 60
    result = run_demo(tcp_port=tally.tcp_port, http_port=tally.http_port, tenant="demo",
                      days=21, seed=3, end=end, progress=False)
    events = generate(3, 21, end)
    assert result.events == len(events) == result.received + result.replied
    assert result.increments == result.received + 4 * result.replied
    assert result.totals == expected_totals(events)
    assert result.totals["messages.received"] == result.received
    assert result.totals["response_seconds.sum"] == int(events.response.sum())
    assert result.url == f"http://127.0.0.1:{tally.http_port}/?tenant=demo"
    for metric, want in result.totals.items():
        got = series(tally, "demo", metric, result.first_day, result.last_day)["total"]
        assert got == want, metric
    assert sum(result.totals[m] for m in result.totals) > 0

    # a breakdown by channel matches the events channel by channel
    r = httpx.get(tally.url + "/v1/breakdown", params={
        "tenant": "demo", "metric": "messages.received", "by": "channel",
        "from": result.first_day, "to": result.last_day}).json()
    want_channels = Counter(CHANNELS[c] for c in events.channel[~events.replied].tolist())
    assert {g["value"]: g["total"] for g in r["groups"]} == dict(want_channels)
    # running it again on the same tenant is flagged (the demo adds to what is there)
    assert "already has 5 metrics" in (existing_data(tally.url, "demo", None) or "")
    assert existing_data(tally.url, "nobody", None) is None


def test_demo_command_prints_counts_and_the_dashboard_url(
        tally: InProcessTally, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["demo", "--tcp-port", str(tally.tcp_port), "--http-port",
                   str(tally.http_port), "--tenant", "demo-cli", "--days", "3", "--seed", "5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"http://127.0.0.1:{tally.http_port}/?tenant=demo-cli" in out
    assert "events sent" in out and "increments, all durable" in out
    received = total(tally, "demo-cli", "messages.received")
    assert received > 0 and f"{received:,}" in out


# -------------------------------------------------------------------------- import


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_import_jsonl_increments_reports_bad_lines_and_counts_exactly(
        tally: InProcessTally, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = [{"tenant": "imp1", "metric": "orders", "tags": {"country": c}, "ts": BASE + n,
             "value": n % 7 + 1} for n, c in enumerate(["fr", "de", "uk"] * 50)]
    lines = [json.dumps(r) for r in good]
    bad = {  # line number -> (text, what the report must say)
        3: ("{not json", "not JSON"),
        10: (json.dumps({"tenant": "imp1", "ts": BASE}), "metric is missing"),
        20: (json.dumps({"tenant": "Bad Tenant", "metric": "orders", "ts": BASE}), "tenant"),
        30: (json.dumps({"tenant": "imp1", "metric": "orders", "ts": BASE, "value": 1.5}),
             "value"),
        40: (json.dumps({"tenant": "imp1", "metric": "orders",
                         "ts": int(time.time()) + 7200}), "ahead"),  # (now, not at import)
        50: (json.dumps({"tenant": "imp1", "metric": "orders", "ts": BASE, "vlaue": 2}),
             "unknown key 'vlaue'"),
        60: ("[1, 2]", "expected a JSON object"),
    }
    for line in sorted(bad):
        lines.insert(line - 1, bad[line][0])
    lines.insert(70, "")  # blank lines are allowed
    path = write_lines(tmp_path / "orders.jsonl", lines)

    rc = cli.main(["import", str(path), "--tcp-port", str(tally.tcp_port), "--timeout", "20"])
    out = capsys.readouterr().out
    assert rc == 1  # rows were rejected
    for line, (_, why) in bad.items():
        assert f"line {line}: " in out and why in out, (line, why)
    assert f"{len(good)}" in out and "rejected" in out

    want = sum(r["value"] for r in good)
    assert total(tally, "imp1", "orders") == want
    assert total(tally, "imp1", "orders", where="country:de") == sum(
        r["value"] for r in good if r["tags"]["country"] == "de")

    # run again: nothing is sent, nothing is counted twice
    res = run_import(options(tally, path))
    assert res.already_done and res.complete and res.sent == 0
    assert total(tally, "imp1", "orders") == want


def test_import_csv_increments_with_tag_columns_and_a_tags_column(
        tally: InProcessTally, tmp_path: Path) -> None:
    iso = datetime.fromtimestamp(BASE, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = [
        "tenant,metric,ts,value,tag.channel,tags",
        f"imp2,messages,{BASE},3,email,",
        f'imp2,messages,{iso},4,chat,"{{""agent"": ""ann""}}"',
        f"imp2,messages,{BASE},2,,",                                # no tags at all
        "imp2,messages,yesterday,1,email,",                         # 5: bad ts
        f"imp2,messages,{BASE},x,email,",                           # 6: bad value
        f'imp2,messages,{BASE},1,email,"{{""channel"": ""sms""}}"',  # 7: tag twice
        f"imp2,messages,{BASE},5,email",                            # 8: a cell short
        f"imp2,messages,{BASE},6,phone,",
    ]
    path = write_lines(tmp_path / "messages.csv", rows)
    res = run_import(options(tally, path))
    assert res.kind == "increments" and res.format == "csv" and res.complete
    assert res.rows == 8 and res.sent == 4
    assert {r.line: r.reason.split(":")[0] for r in res.rejected} == {
        5: "ts 'yesterday' is neither integer Unix seconds nor an ISO 8601 datetime",
        6: "value 'x' is not an integer",
        7: "tag 'channel' is both in tags and in column tag.channel",
        8: "5 cells, the header has 6",
    }
    assert total(tally, "imp2", "messages") == 3 + 4 + 2 + 6
    assert total(tally, "imp2", "messages", where="channel:email") == 3
    assert total(tally, "imp2", "messages", where="agent:ann") == 4


def test_import_csv_and_jsonl_events_checked_against_the_rules(
        tally: InProcessTally, tmp_path: Path) -> None:
    csv_rows = [
        "type,tenant,ts,agent,channel,response_seconds,sentiment",
        f"message.replied,imp3,{BASE},007,email,600,",      # agent "007" stays a string
        f"message.replied,imp3,{BASE},ann,chat,90000.4,",   # a float response, rounded
        f"message.received,imp3,{BASE},,twitter,,negative",
        f"message.replied,imp3,{BASE},,email,60,",           # 5: no agent
        f"message.replied,imp3,{BASE},bob,email,-3,",        # 6: negative response
        f"message.sent,imp3,{BASE},bob,email,1,",            # 7: no rule for the type
    ]
    res = run_import(options(tally, write_lines(tmp_path / "events.csv", csv_rows)))
    assert res.kind == "events" and res.sent == 3 and res.increments == 4 + 4 + 1
    reasons = {r.line: r.reason for r in res.rejected}
    assert set(reasons) == {5, 6, 7}
    assert "'agent' is missing" in reasons[5]
    assert "needs a number >= 0" in reasons[6]
    assert "no rule for type 'message.sent'" in reasons[7]
    assert total(tally, "imp3", "messages.handled", where="agent:007") == 1
    assert total(tally, "imp3", "response_seconds.sum") == 600 + 90000
    assert total(tally, "imp3", "response_time", where="bucket:gt_24h") == 1
    assert total(tally, "imp3", "messages.received", where="sentiment:negative") == 1

    events = [{"type": "message.received", "tenant": "imp4", "ts": BASE + n,
               "channel": "chat", "sentiment": "positive"} for n in range(100)]
    lines = [json.dumps(e) for e in events]
    lines.insert(41, json.dumps({"type": "message.received", "tenant": "imp4", "ts": BASE,
                                 "channel": 5, "sentiment": "positive"}))
    res = run_import(options(tally, write_lines(tmp_path / "events.ndjson", lines)))
    assert res.kind == "events" and res.sent == 100
    assert [(r.line, "tag values are strings" in r.reason) for r in res.rejected] == [(42, True)]
    assert total(tally, "imp4", "messages.received") == 100


def test_wide_rows_are_chunked_by_their_encoded_size_not_their_text(
        tally: InProcessTally, tmp_path: Path) -> None:
    # 60 extra columns with long names: each 130-byte line is a 3 KB event on the wire
    # (the names become keys), so 5,000 lines make 15 MB of frames from 650 KB of text.
    extra = [f"unused_field_with_a_rather_long_name_{k:03d}" for k in range(60)]
    rows = [",".join(["type", "tenant", "ts", "agent", "response_seconds", *extra])]
    rows += [",".join(["message.replied", "imp12", str(BASE + n), "ann", str(n % 100),
                       *["1"] * 60]) for n in range(5000)]
    res = run_import(options(tally, write_lines(tmp_path / "wide.csv", rows)))
    assert res.complete and res.sent == 5000 and not res.rejected
    assert total(tally, "imp12", "response_seconds.sum") == sum(n % 100 for n in range(5000))

    huge = json.dumps({"tenant": "imp12", "metric": "m", "ts": BASE, "tags": {"k": "v" * 190},
                       "value": 1})
    lines = [huge[:-1] + ', "pad": "' + "x" * 30_000 + '"}', huge]
    res = run_import(options(tally, write_lines(tmp_path / "huge.jsonl", lines),
                             chunk_bytes=64 * 1024))
    assert [r.line for r in res.rejected] == [1] and "too large" in res.rejected[0].reason
    assert total(tally, "imp12", "m") == 1


def test_a_batch_the_server_refuses_is_reported_with_its_lines(
        tally: InProcessTally, tmp_path: Path) -> None:
    # --rules none: events are not checked here, so the server's refusal takes the batch
    lines = [json.dumps({"type": "message.received", "tenant": "imp5", "ts": BASE,
                         "channel": "chat", "sentiment": "neutral"}) for _ in range(30)]
    lines[12] = json.dumps({"type": "message.received", "tenant": "imp5", "ts": BASE,
                            "channel": "chat"})
    res = run_import(options(tally, write_lines(tmp_path / "refused.jsonl", lines),
                             rules=None, chunk_rows=10))
    assert res.complete and res.sent == 30 and res.increments is None
    [rej] = res.rejected
    assert rej.by_server and rej.line == 13 and rej.rows == 10
    assert "lines 11-20" in rej.reason and "'sentiment' is missing" in rej.reason
    assert total(tally, "imp5", "messages.received") == 20


def increments_file(path: Path, tenant: str, n: int) -> tuple[Path, int]:
    """``n`` increments over 20 series; the file and the total of its values."""
    with open(path, "w") as f:
        for k in range(n):
            f.write(json.dumps({"tenant": tenant, "metric": "hits", "ts": BASE + k % 86400,
                                "tags": {"page": f"p{k % 20}"}, "value": k % 3 + 1}) + "\n")
    return path, sum(k % 3 + 1 for k in range(n))


def test_import_interrupted_before_anything_is_durable_resends_without_double_counting(
        tally: InProcessTally, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, want = increments_file(tmp_path / "hits.jsonl", "imp6", 1000)
    # No checkpoints: batches are applied (visible) but never durable, the worst case
    # for a resend (the server holds them and must not apply them again).
    monkeypatch.setattr(tally.shards, "checkpoint", lambda: None)
    first = run_import(options(tally, path, chunk_rows=100, stop_after_batches=4))
    assert first.interrupted and not first.complete and first.rows == 400
    four_chunks = sum(k % 3 + 1 for k in range(400))
    assert total(tally, "imp6", "hits") == four_chunks  # applied before the "crash"

    # Still no checkpoints: the second run starts from 0 and resends the four chunks the
    # server holds; they must be recognised, not applied again. (It cannot finish: its
    # durable flush times out.)
    second = run_import(options(tally, path, chunk_rows=100, timeout=2))
    assert not second.complete and "durable" in (second.problem or "")
    assert second.start_offset == 0 and second.rows == 1000 and second.sent == 1000
    assert total(tally, "imp6", "hits") == want

    monkeypatch.undo()
    third = run_import(options(tally, path, chunk_rows=100))
    assert third.complete
    assert total(tally, "imp6", "hits") == want


def test_import_interrupted_after_some_chunks_are_durable_resumes_from_there(
        tally: InProcessTally, tmp_path: Path) -> None:
    path, want = increments_file(tmp_path / "hits.jsonl", "imp7", 1000)
    first = run_import(options(tally, path, chunk_rows=100, stop_after_batches=5))
    assert first.interrupted
    producer = producer_for(str(path), "jsonl", "increments", 100, importer.CHUNK_BYTES)
    ends = list(accumulate(len(x) for x in path.read_bytes().splitlines(keepends=True)))
    deadline = time.monotonic() + 10  # let what was sent become durable
    while (durable_offset(options(tally, path), producer) < ends[299]
           and time.monotonic() < deadline):
        time.sleep(0.05)
    assert durable_offset(options(tally, path), producer) >= ends[299]

    second = run_import(options(tally, path, chunk_rows=100))
    assert second.complete
    done = ends.index(second.start_offset) + 1  # lines durable before the second run
    assert done % 100 == 0 and done >= 300
    assert second.start_line == done + 1 and second.rows == 1000 - done
    assert total(tally, "imp7", "hits") == want


def test_import_interrupted_mid_chunk_sends_nothing_of_that_chunk(
        tally: InProcessTally, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C while a chunk is being read: the half-read chunk must not go out (a flush on
    # the way out would seal it under a seq that is not its chunk's).
    path, want = increments_file(tmp_path / "hits.jsonl", "imp11", 1000)
    two_chunks = sum(k % 3 + 1 for k in range(200))
    batch = importer._Run.batch
    calls = []

    def interrupted_in_the_third(self: importer._Run, chunk: Any, table: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            deadline = time.monotonic() + 10  # let the two sent chunks be applied
            while total(tally, "imp11", "hits") < two_chunks and time.monotonic() < deadline:
                time.sleep(0.02)
            raise KeyboardInterrupt
        return batch(self, chunk, table)

    monkeypatch.setattr(importer._Run, "batch", interrupted_in_the_third)
    first = run_import(options(tally, path, chunk_rows=100))
    monkeypatch.undo()
    assert first.interrupted and first.sent == 200
    producer = producer_for(str(path), "jsonl", "increments", 100, importer.CHUNK_BYTES)
    ends = list(accumulate(len(x) for x in path.read_bytes().splitlines(keepends=True)))
    deadline = time.monotonic() + 10  # the two chunks become durable, and nothing more
    while (durable_offset(options(tally, path), producer) < ends[199]
           and time.monotonic() < deadline):
        time.sleep(0.05)
    assert durable_offset(options(tally, path), producer) == ends[199]
    assert total(tally, "imp11", "hits") == two_chunks

    second = run_import(options(tally, path, chunk_rows=100))
    assert second.complete and second.start_line == 201
    assert total(tally, "imp11", "hits") == want


def test_import_killed_mid_run_then_run_again_is_exact(
        tally: InProcessTally, tmp_path: Path) -> None:
    path, want = increments_file(tmp_path / "big.jsonl", "imp8", 150_000)
    cmd = [sys.executable, "-m", "tally.cluster.cli", "import", str(path),
           "--tcp-port", str(tally.tcp_port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while total(tally, "imp8", "hits") == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # mid-import (or just after: exact either way)
    finally:
        proc.wait(10)
    res = run_import(options(tally, path))
    assert res.complete and not res.rejected
    assert res.rows > 0  # the kill landed before the end (it takes over a second here)
    assert total(tally, "imp8", "hits") == want


def test_a_durable_offset_that_moves_before_the_hello_is_looked_up_again(
        tally: InProcessTally, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A killed run's last checkpoint can land between the import's look at the durable
    # offset and its client's hello; the client then sees seqs it has not sent as durable.
    path, want = increments_file(tmp_path / "race.jsonl", "imp10", 500)
    assert run_import(options(tally, path, chunk_rows=100)).complete
    real = importer.durable_offset
    looks: list[int] = []

    def stale_once(opts: ImportOptions, producer: str) -> int:
        looks.append(real(opts, producer))
        return 0 if len(looks) == 1 else looks[-1]

    monkeypatch.setattr(importer, "durable_offset", stale_once)
    res = run_import(options(tally, path, chunk_rows=100))
    assert len(looks) == 2 and res.already_done and res.complete
    assert total(tally, "imp10", "hits") == want


def test_a_producer_used_for_another_file_is_refused(
        tally: InProcessTally, tmp_path: Path) -> None:
    a, _ = increments_file(tmp_path / "a.jsonl", "imp9", 50)
    assert run_import(options(tally, a, producer="shared-name")).complete
    b = write_lines(tmp_path / "b.jsonl", [json.dumps({"tenant": "imp9", "metric": "x",
                                                       "ts": BASE, "value": 1})] * 100)
    with pytest.raises(ImportFailed, match="not a line boundary"):
        run_import(options(tally, b, producer="shared-name"))


def test_tokens_are_used_and_their_refusals_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    acme, reader = "ingest-acme-0123456789", "query-all-0123456789"
    access = parse_access(tokens_file(("acme", acme, ["acme"], ["ingest"]),
                                      ("reader", reader, ["*"], ["query"])))
    guarded = InProcessTally(tmp_path, access=access).start()
    try:
        rows = [json.dumps({"tenant": "acme", "metric": "m", "ts": BASE, "value": 2})] * 5
        rows.append(json.dumps({"tenant": "other", "metric": "m", "ts": BASE}))
        path = write_lines(tmp_path / "t.jsonl", rows)
        with pytest.raises(ImportFailed, match="unauthorized"):
            run_import(options(guarded, path, token="wrong-0123456789abcdef"))
        res = run_import(options(guarded, path, token=acme, chunk_rows=5))
        assert res.complete and res.sent == 6
        [rej] = res.rejected
        assert rej.by_server and rej.line == 6 and "unauthorized" in rej.reason

        args = ["query", "--url", guarded.url, "--tenant", "acme", "--metric", "m",
                "--from", day(BASE), "--to", day(NOW)]
        rc, _, err = run_cli(args, capsys)
        assert rc == 1 and "401" in err and "unauthorized" in err
        rc, out, _ = run_cli([*args, "--token", reader], capsys)
        assert rc == 0 and " 10 " in out
    finally:
        guarded.stop()


def test_import_refuses_what_it_cannot_read(tally: InProcessTally, tmp_path: Path) -> None:
    with pytest.raises(ImportFailed, match="no such file"):
        run_import(options(tally, tmp_path / "missing.jsonl"))
    with pytest.raises(ImportFailed, match="--format"):
        run_import(options(tally, write_lines(tmp_path / "x.txt", ["{}"])))
    with pytest.raises(ImportFailed, match="unknown column colour"):
        run_import(options(tally, write_lines(tmp_path / "x.csv",
                                              ["tenant,metric,ts,colour"])))
    with pytest.raises(ImportFailed, match="pass --kind"):
        run_import(options(tally, write_lines(tmp_path / "y.jsonl", ['{"a": 1}'])))
    with pytest.raises(ImportFailed, match="cannot reach"):
        run_import(ImportOptions(str(write_lines(tmp_path / "z.jsonl", ['{"metric": 1}'])),
                                 tcp_port=1, progress=False, timeout=2))


def test_timestamps_and_csv_cells() -> None:
    assert parse_ts(5) == 5 and parse_ts("17") == 17
    assert parse_ts("2026-01-02T03:04:05Z") == parse_ts("2026-01-02T04:04:05+01:00")
    assert parse_ts("2026-01-02 03:04:05") == 1767323045  # no offset: UTC
    with pytest.raises(ValueError, match="float"):
        parse_ts(1.5)


def test_long_series_fold_into_the_sparkline_width() -> None:
    line, step = spark(list(range(365)), 60)
    assert step == 7 and len(line) == 53 and line[0] == "▁" and line[-1] == "█"
    assert spark([5, 5, 5]) == ("███", 1)  # the scale starts at zero: flat and busy


def test_csv_event_cells_are_typed_by_the_rules(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "e.csv", ["type,tenant,ts,agent,response_seconds,note",
                                            "message.replied,t,1,42,1.5,7"])
    src = CsvFile(str(path), "events", BUILTIN)
    with open(path, "rb") as f:
        [(_, _, cells)] = list(src.records(f, src.data_start(), 2))
    assert src.parse(cells) == ("t", "message.replied", 1,
                                {"agent": "42", "response_seconds": 1.5, "note": 7})


# --------------------------------------------------------------------------- query


@pytest.fixture(scope="module")
def queried(tally: InProcessTally) -> dict[str, int]:
    """Known counts for tenant q: per channel, two days apart."""
    counts = {"email": 1234, "chat": 567, "twitter": 89}
    with TallyClient("127.0.0.1", tally.tcp_port) as client:
        for channel, n in counts.items():
            client.inc("q", "messages.received", n, ts=NOW - 120, tags={"channel": channel})
            client.inc("q", "messages.received", 10, ts=NOW - 120 - 2 * 86400,
                       tags={"channel": channel})
    return counts


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_query_series_prints_each_day_the_total_and_the_change(
        tally: InProcessTally, queried: dict[str, int],
        capsys: pytest.CaptureFixture[str]) -> None:
    today, first = day(NOW - 120), day(NOW - 120 - 2 * 86400)
    rc, out, _ = run_cli(["query", "--url", tally.url, "--tenant", "q", "--metric",
                          "messages.received", "--from", first, "--to", today], capsys)
    assert rc == 0
    assert "1,890" in out and "30" in out and "1,920" in out  # today, two days ago, total
    assert today in out and first in out and "trend" in out

    rc, out, _ = run_cli(["query", "--url", tally.url, "--tenant", "q", "--metric",
                          "messages.received", "--from", today, "--to", today,
                          "--where", "channel:email", "--compare", "previous_period"], capsys)
    assert rc == 0 and "1,234" in out and "change" in out
    # the day before today had nothing: the change is undefined, not infinite
    assert "n/a" in out

    rc, out, _ = run_cli(["query", "--url", tally.url, "--tenant", "q", "--metric",
                          "messages.received", "--from", first, "--to", today, "--json"],
                         capsys)
    assert rc == 0 and json.loads(out)["total"] == 1920


def test_query_breakdown_prints_groups_largest_first(
        tally: InProcessTally, queried: dict[str, int],
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(["query", "--url", tally.url, "--tenant", "q", "--metric",
                          "messages.received", "--by", "channel", "--limit", "2",
                          "--from", day(NOW - 120), "--to", day(NOW - 120)], capsys)
    assert rc == 0
    assert out.index("email") < out.index("chat")
    assert "1,234" in out and "567" in out and "(other)" in out and "89" in out
    assert "1,890" in out and "65.3%" in out


def test_query_errors_show_the_api_code_and_message(
        tally: InProcessTally, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(["query", "--url", tally.url, "--tenant", "q", "--metric", "m",
                            "--granularity", "fortnight"], capsys)
    assert rc == 1 and out == ""
    assert "bad_request" in err and "granularity 'fortnight'" in err
    rc, _, err = run_cli(["query", "--url", tally.url, "--tenant", "q", "--metric", "m",
                          "--tz", "Asia/Kolkata"], capsys)
    assert rc == 1 and "bad_request" in err and "Asia/Kolkata" in err
    rc, _, err = run_cli(["query", "--url", tally.url, "--tenant", "q", "--metric", "m",
                          "--from", "2026-02-01", "--to", "2026-01-01"], capsys)
    assert rc == 1 and "400" in err
    rc, _, err = run_cli(["query", "--url", tally.url, "--tenant", "q", "--metric", "m",
                          "--by", "channel", "--compare", "previous_year"], capsys)
    assert rc == 2 and "--compare does not apply to a breakdown" in err
    rc, _, err = run_cli(["query", "--url", "http://127.0.0.1:1", "--tenant", "q",
                          "--metric", "m"], capsys)
    assert rc == 1 and "cannot reach" in err


def test_bench_refuses_settings_it_cannot_run_naming_each(capsys) -> None:
    code = cli.main(["bench", "--queries", "-1", "--rows-per-frame", "0", "--shards", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--queries must not be negative, not -1" in err
    assert "--rows-per-frame must be at least 1, not 0" in err
    assert "--shards must be at least 1, not 0" in err
