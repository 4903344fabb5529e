"""A SQLite file written by an older tally (layout 1: slots and months keyed by the
series id string) opens with every count, mark and catalog entry, and takes new
checkpoints on top; a file the migration cannot finish is left as it was."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tally.checkpoint.sqlite import SqliteStore
from tally.checkpoint.store import Checkpoint, ShardRecord, StoreError
from tally.wire.series import parse_series_id, series_id
from tally.wire.timeslots import month_first_hour

# layout 1, as tally wrote it until 2026-12
LAYOUT_1 = (
    "CREATE TABLE series (sid TEXT PRIMARY KEY, tenant TEXT NOT NULL, metric TEXT NOT NULL,"
    " tags TEXT NOT NULL)",
    "CREATE INDEX series_tenant_metric ON series (tenant, metric)",
    "CREATE TABLE slots (sid TEXT NOT NULL, hour INTEGER NOT NULL, value INTEGER NOT NULL"
    " CHECK (typeof(value) = 'integer'), PRIMARY KEY (sid, hour)) WITHOUT ROWID",
    "CREATE TABLE months (sid TEXT NOT NULL, month TEXT NOT NULL, ck INTEGER NOT NULL,"
    " PRIMARY KEY (sid, month)) WITHOUT ROWID",
    "CREATE TABLE shards (shard INTEGER PRIMARY KEY, ck INTEGER NOT NULL)",
    "CREATE TABLE producers (shard INTEGER NOT NULL, producer TEXT NOT NULL, seq INTEGER NOT"
    " NULL, ck INTEGER NOT NULL, PRIMARY KEY (shard, producer)) WITHOUT ROWID",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value)",
)
TW = series_id("acme", "messages.received", {"channel": "twitter"})
EMAIL = series_id("acme", "messages.received", {"channel": "email"})
OTHER = series_id("globex", "orders", None)
NOV = month_first_hour("2026-11")
DEC = month_first_hour("2026-12")


def layout_1(path: Path, orphan: bool = False) -> None:
    """A file of layout 1: three series over two months, two shards' records and marks;
    ``orphan``: one document whose series has no catalog row."""
    raw = sqlite3.connect(path)
    with raw:
        for statement in LAYOUT_1:
            raw.execute(statement)
        for sid in (TW, EMAIL, OTHER)[: 2 if orphan else 3]:
            key = parse_series_id(sid)
            raw.execute("INSERT INTO series VALUES (?, ?, ?, ?)",
                        (sid, key.tenant, key.metric, json.dumps(dict(key.tags))))
        raw.executemany("INSERT INTO slots VALUES (?, ?, ?)", [
            (TW, NOV, 5), (TW, NOV + 30, 2**62), (TW, DEC + 1, -3),
            (EMAIL, NOV + 2, 7), (OTHER, DEC, 11)])
        raw.executemany("INSERT INTO months VALUES (?, ?, ?)", [
            (TW, "2026-11", 4), (TW, "2026-12", 6), (EMAIL, "2026-11", 4),
            (OTHER, "2026-12", 3)])
        raw.executemany("INSERT INTO shards VALUES (?, ?)", [(0, 6), (1, 3)])
        raw.executemany("INSERT INTO producers VALUES (?, ?, ?, ?)",
                        [(0, "p1", 40, 6), (1, "p1", 38, 3)])
        raw.execute("INSERT INTO meta VALUES ('shards', 2)")
    raw.close()


def test_a_layout_1_file_opens_with_everything_it_held(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    layout_1(path)
    store = SqliteStore(str(path))
    store.ensure_layout(2)  # the recorded shard count is kept
    assert store.open_shard(0) == ShardRecord(6, {"p1": 40})
    assert store.open_shard(1) == ShardRecord(3, {"p1": 38})
    docs = store.load_months([(TW, "2026-11"), (TW, "2026-12"), (OTHER, "2026-12"),
                              (OTHER, "2026-11")])
    assert {k: (d.hours, d.ck) for k, d in docs.items()} == {
        (TW, "2026-11"): ({NOV: 5, NOV + 30: 2**62}, 4),
        (TW, "2026-12"): ({DEC + 1: -3}, 6),
        (OTHER, "2026-12"): ({DEC: 11}, 3),
    }
    got = store.read_months("acme", "messages.received", {"channel": "email"},
                            ["2026-11", "2026-12"])
    assert [(d.sid, d.month, d.hours) for d in got] == [(EMAIL, "2026-11", {NOV + 2: 7})]
    assert [k.tags for k in store.catalog("acme")] == [(("channel", "email"),),
                                                      (("channel", "twitter"),)]
    # a new checkpoint adds on top of the migrated counts, and a new series gets a row
    new = series_id("acme", "messages.received", {"channel": "sms"})
    store.write_checkpoint(Checkpoint(0, 7, {(TW, "2026-11"): {NOV: 1},
                                             (new, "2026-12"): {DEC: 9}}, [new], {"p1": 41}))
    store.close()
    reopened = SqliteStore(str(path))  # (already layout 2: opens as it is)
    docs = reopened.load_months([(TW, "2026-11"), (new, "2026-12")])
    assert {k: (d.hours, d.ck) for k, d in docs.items()} == {
        (TW, "2026-11"): ({NOV: 6, NOV + 30: 2**62}, 7), (new, "2026-12"): ({DEC: 9}, 7)}
    assert reopened.open_shard(0) == ShardRecord(7, {"p1": 41})
    reopened.close()
    raw = sqlite3.connect(path)
    tables = {name for (name,) in raw.execute("SELECT name FROM sqlite_master "
                                               "WHERE type = 'table'")}
    assert {"series", "slots", "months"} <= tables and not any("_v1" in t for t in tables)
    raw.close()


def test_a_document_without_its_catalog_row_keeps_its_counts(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    layout_1(path, orphan=True)
    store = SqliteStore(str(path))
    assert store.load_months([(OTHER, "2026-12")])[(OTHER, "2026-12")].hours == {DEC: 11}
    assert [k.metric for k in store.catalog("globex")] == ["orders"]
    store.close()


def test_a_migration_that_fails_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    layout_1(path)
    raw = sqlite3.connect(path)
    with raw:  # a table of the new layout's name in the way: the migration fails midway
        raw.execute("CREATE TABLE series_v1 (x)")
    raw.close()
    with pytest.raises(StoreError, match="creating the schema"):
        SqliteStore(str(path))
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT count(*) FROM slots WHERE sid = ?", (TW,)).fetchone() == (3,)
    assert [r[1] for r in raw.execute("PRAGMA table_info(slots)")] == ["sid", "hour", "value"]
    raw.close()
