"""`tally import`'s columnar path against its per-line path, and against a real service.

The per-line path (``import_formats`` parsing, then the client's validation) is the
definition of what a line means; the columnar path (``import_read``,
``import_batch``) must count the same increments and report the same lines in the
same words, for any mix of good and bad lines.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from inproc import InProcessTally

from tally.client.validation import SeriesCache, prepare_increment
from tally.cluster.import_batch import build_batch
from tally.cluster.import_formats import CsvFile, RowError, Source, open_source
from tally.cluster.import_read import LINE_OVERHEAD, chunks
from tally.cluster.import_series import SeriesTable
from tally.cluster.importer import ImportOptions, run_import
from tally.wire.series import MAX_TAGS

NOW = int(time.time())
BASE = NOW - 5 * 86400


def iso(ts: int, shape: int) -> str:
    d = datetime.fromtimestamp(ts, UTC)
    return [d.strftime("%Y-%m-%dT%H:%M:%SZ"), d.strftime("%Y-%m-%d %H:%M:%S"),
            d.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+00:00", d.strftime("%Y-%m-%d"),
            d.strftime("%Y-%m-%dT%H:%M")][shape]


GOOD_TS = [lambda r: str(BASE + r.randrange(86400)),
           lambda r: iso(BASE + r.randrange(86400), r.randrange(5))]
BAD_TS = ["yesterday", "", " 12", "+5", "2026-02-30T00:00:00", "2026-01-02T03:04:05.1234567Z",
          str(NOW + 7200), "-5", "1e9", "99999999999999999999"]


def jsonl_line(r: random.Random) -> str:
    if r.random() < 0.1:
        return r.choice(["{not json", "[1, 2]", "", "   ", '{"tenant": "a", "tenant": "b"}',
                         '{"tenant": "t1", "metric": "m", "ts": 1.5}'])
    obj: dict[str, Any] = {"tenant": r.choice(["t1", "t2", "Bad T", ""]) if r.random() < 0.1
                           else r.choice(["t1", "t2"]), "metric": r.choice(["m", "n.x"])}
    obj["ts"] = (r.choice(GOOD_TS)(r) if r.random() < 0.95 else r.choice(BAD_TS))
    if isinstance(obj["ts"], str) and obj["ts"].isdigit() and r.random() < 0.5:
        obj["ts"] = int(obj["ts"])
    if r.random() < 0.7:
        obj["value"] = r.choice([1, 2, 7, -3, None, 2**62]) if r.random() < 0.95 else 1.5
    if r.random() < 0.6:
        obj["tags"] = {k: r.choice(["a", "b", "", "2026-01-01", "é", "x" * 201])
                       for k in r.sample(["agent", "channel", "Bad-Key"], r.randrange(4))}
    elif r.random() < 0.1:
        obj["tags"] = None
    if r.random() < 0.02:
        obj["vlaue"] = 3
    return json.dumps(obj)


def csv_line(r: random.Random) -> str:
    if r.random() < 0.05:
        return r.choice(["t1,m", "", 't1,m,x"y"z,1,a,b', 't1,m,"5"x,1,a,b', "t1,m,5,1,a,b,c,d"])
    tenant = r.choice(["t1", "t2"]) if r.random() < 0.95 else r.choice(["", "Bad"])
    ts = r.choice(GOOD_TS)(r) if r.random() < 0.95 else r.choice(BAD_TS)
    value = r.choice(["", "1", "3", "-2", " 4", "x", "+5"])
    agent = r.choice(["", "ann", "bob", "a,b", 'q"q', "x" * 201])
    cells = [tenant, "m", ts, value, agent, r.choice(["", "email"])]
    return ",".join(f'"{c.replace(chr(34), chr(34) * 2)}"' if ("," in c or '"' in c) else c
                    for c in cells)


def per_line(src: Source, path: Path) -> tuple[Counter, list[tuple[int, str]]]:
    """What the per-line path makes of a file: increments and refused lines."""
    cache, now = SeriesCache(), time.time()
    got: Counter = Counter()
    bad = []
    with open(path, "rb") as f:
        for line, _, payload in src.records(f, src.data_start(), 2 if isinstance(
                src, CsvFile) else 1):
            try:
                tenant, metric, value, ts, tags = src.parse(payload)  # type: ignore[misc]
                entry, ts, value = prepare_increment(cache, tenant, metric, value, ts, tags, now)
            except (RowError, ValueError, TypeError) as e:
                bad.append((line, str(e)))
            else:
                got[(*_norm(list(entry.wire)), ts)] += value
    return got, _clock(bad)


def _clock(bad: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The reports without how far ahead a ts was (each path read the clock itself)."""
    return [(line, re.sub(r"is \d+ s ahead", "is N s ahead", why)) for line, why in bad]


def _norm(entry: list[Any]) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    tenant, metric, tags = entry
    return tenant, metric, tuple(sorted((tags or {}).items()))


def columnar(src: Source, path: Path, chunk_bytes: int, chunk_rows: int,
             table: SeriesTable | None = None) -> tuple[Counter, list[tuple[int, str]]]:
    table = table or SeriesTable()
    got: Counter = Counter()
    bad = []
    header = sum(len(c) + 3 for c in src.header) if isinstance(src, CsvFile) else 0
    with open(path, "rb") as f:
        for chunk in chunks(f, src.data_start(), 2 if isinstance(src, CsvFile) else 1,
                            chunk_bytes=chunk_bytes, chunk_rows=chunk_rows,
                            overhead=LINE_OVERHEAD + header, csv=isinstance(src, CsvFile)):
            b = build_batch(chunk, src, table, chunk_bytes=chunk_bytes, overhead=src.overhead())
            bad += b.rejected
            if not len(b.ts):
                continue
            series, index = table.encode(b.entries)
            table.trim()
            entries = [msgpack.unpackb(e, raw=False) for e in series]
            assert len(b.lines) == len(b.ts) and np.all(np.diff(b.lines) > 0)
            for i, ts, v in zip(index.tolist(), b.ts.tolist(), b.values.tolist(), strict=True):
                got[(*_norm(entries[i]), ts)] += v
    return got, _clock(bad)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_the_columnar_path_counts_and_reports_what_the_per_line_path_does(
        tmp_path: Path, fmt: str, seed: int) -> None:
    r = random.Random(seed)
    if fmt == "jsonl":
        lines = [jsonl_line(r) for _ in range(3000)]
    else:
        lines = ["tenant,metric,ts,value,tag.agent,tag.channel"]
        lines += [csv_line(r) for _ in range(3000)]
    path = tmp_path / f"f.{fmt}"
    path.write_text("".join(x + "\n" for x in lines))
    src = open_source(str(path), fmt, "increments", None)
    want_counts, want_bad = per_line(src, path)
    for chunk_bytes, chunk_rows in ((1 << 20, 200_000), (20_000, 300), (4096, 7)):
        counts, bad = columnar(src, path, chunk_bytes, chunk_rows)
        if chunk_bytes == 4096:  # records over ~1 KB are "too large" here: compare the rest
            large = {line for line, why in bad if "too large" in why}
            bad = [b for b in bad if b[0] not in large]
            want = [b for b in want_bad if b[0] not in large]
            assert bad == want
            continue
        assert bad == want_bad
        assert counts == want_counts
    assert want_bad and sum(want_counts.values()) > 0  # the mix had both


def test_csv_columns_with_more_distinct_cells_than_their_codes_hold_count_the_same(
        tmp_path: Path) -> None:
    # Eleven columns leave each code 5 bits (32 cells): the first chunks' agents fit,
    # later ones do not, and the import goes on by packing each row's entry instead.
    r = random.Random(3)
    keys = [f"k{k}" for k in range(9)]
    lines = [",".join(["tenant", "metric", "ts", "value", *(f"tag.{k}" for k in keys)])]
    for n in range(2000):
        cells = [f"a{r.randrange(1 + n // 20)}", *(r.choice(["", "x", "y"]) for _ in keys[1:])]
        if n % 97 == 0:
            cells[1] = "Bad Value" if n % 2 else "z" * 201  # invalid: the per-line path's
        lines.append(",".join([r.choice(["t1", "t2"]), "m", str(BASE + r.randrange(86400)),
                               str(r.randrange(1, 5)), *cells]))
    path = tmp_path / "wide.csv"
    path.write_text("".join(x + "\n" for x in lines))
    src = open_source(str(path), "csv", "increments", None)
    want = per_line(src, path)
    assert want[1] and len({line.split(",")[4] for line in lines[1:]}) > 32
    for chunk_bytes, chunk_rows in ((1 << 20, 200_000), (20_000, 300), (20_000, 41)):
        assert columnar(src, path, chunk_bytes, chunk_rows) == want
    # a numbering that starts over after every chunk of 41 rows counts the same
    table = SeriesTable(limit=10)
    assert columnar(src, path, 20_000, 41, table) == want
    assert len(table.known) <= 10 + 41


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_rows_with_more_tags_than_a_series_may_have_are_refused_as_per_line(
        tmp_path: Path, fmt: str) -> None:
    keys = [f"k{k}" for k in range(MAX_TAGS + 1)]
    rows = [(n, {k: f"v{n % 3}" for k in keys[:MAX_TAGS + n % 2]}) for n in range(40)]
    if fmt == "jsonl":
        lines = [json.dumps({"tenant": "t1", "metric": "m", "ts": BASE + n, "value": 1,
                             "tags": tags}) for n, tags in rows]
    else:
        lines = [",".join(["tenant", "metric", "ts", "value", *(f"tag.{k}" for k in keys)])]
        lines += [",".join(["t1", "m", str(BASE + n), "1", *(tags.get(k, "") for k in keys)])
                  for n, tags in rows]
    path = tmp_path / f"many.{fmt}"
    path.write_text("".join(x + "\n" for x in lines))
    src = open_source(str(path), fmt, "increments", None)
    want = per_line(src, path)
    assert len(want[1]) == 20 and sum(want[0].values()) == 20  # every other row refused
    assert columnar(src, path, 1 << 20, 1000) == want


def test_a_csv_record_over_several_lines_takes_the_per_record_path(tmp_path: Path) -> None:
    path = tmp_path / "multi.csv"
    path.write_text('tenant,metric,ts,value,tag.note\nt1,m,100,2,"two\nlines"\nt1,m,100,3,\n'
                    "t1,m,100,x,\n")
    src = open_source(str(path), "csv", "increments", None)
    want = per_line(src, path)
    assert columnar(src, path, 1 << 20, 1000) == want
    assert want[1] == [(5, "value 'x' is not an integer")]


# ------------------------------------------------------------------ a real service


@pytest.fixture(scope="module")
def tally(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessTally]:
    server = InProcessTally(tmp_path_factory.mktemp("import-columnar")).start()
    yield server
    server.stop()


def total(tally: InProcessTally, tenant: str, metric: str, **params: Any) -> int:
    day = lambda ts: datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")  # noqa: E731
    r = httpx.get(tally.url + "/v1/series", params={
        "tenant": tenant, "metric": metric, "from": day(NOW - 14 * 86400), "to": day(NOW),
        **params})
    assert r.status_code == 200, r.text
    return r.json()["total"]


def test_csv_with_iso_timestamps_and_tag_columns_imports_exactly_after_an_interruption(
        tally: InProcessTally, tmp_path: Path) -> None:
    r = random.Random(7)
    rows = ["tenant,metric,ts,value,tag.agent,tag.channel"]
    want: Counter = Counter()
    bad_lines = []
    for k in range(20_000):
        agent, channel = f"a{r.randrange(50)}", r.choice(["email", "chat", ""])
        ts = BASE + r.randrange(3 * 86400)
        value = r.randrange(1, 9)
        cell = iso(ts, k % 3) if k % 2 else str(ts)
        if k % 997 == 5:
            rows.append(f"col1,m,{cell},nope,{agent},{channel}")
            bad_lines.append(len(rows))
            continue
        rows.append(f"col1,m,{cell},{value},{agent},{channel}")
        want[channel] += value
    path = tmp_path / "history.csv"
    path.write_text("".join(x + "\n" for x in rows))

    def opts(**kw: Any) -> ImportOptions:
        return ImportOptions(str(path), tcp_port=tally.tcp_port, progress=False, timeout=20,
                             chunk_rows=2000, **kw)

    first = run_import(opts(stop_after_batches=3))
    assert first.interrupted
    second = run_import(opts())
    assert second.complete
    reported = sorted(x.line for x in first.rejected + second.rejected)
    assert sorted(set(reported)) == bad_lines  # each reported (the first run's again, maybe)
    assert all("value 'nope' is not an integer" in x.reason for x in second.rejected)
    assert total(tally, "col1", "m") == sum(want.values())
    assert total(tally, "col1", "m", where="channel:chat") == want["chat"]
    assert run_import(opts()).already_done


def test_jsonl_with_iso_timestamps_counts_exactly(tally: InProcessTally, tmp_path: Path) -> None:
    lines = []
    want = 0
    for k in range(5000):
        ts = BASE + k * 37
        obj = {"tenant": "col2", "metric": "hits", "ts": iso(ts, k % 5) if k % 2 else ts,
               "tags": {"page": f"p{k % 30}"}, "value": k % 4 + 1}
        want += k % 4 + 1
        lines.append(json.dumps(obj))
    lines.insert(100, json.dumps({"tenant": "col2", "metric": "hits", "ts": BASE, "value": 1.5}))
    path = tmp_path / "hits.jsonl"
    path.write_text("".join(x + "\n" for x in lines))
    res = run_import(ImportOptions(str(path), tcp_port=tally.tcp_port, progress=False,
                                   timeout=20))
    assert res.complete and res.sent == 5000
    [rejected] = res.rejected
    assert rejected.line == 101 and "value must be an int, not float" in rejected.reason
    assert total(tally, "col2", "hits") == want
    assert total(tally, "col2", "hits", where="page:p7") == sum(
        k % 4 + 1 for k in range(5000) if k % 30 == 7)
