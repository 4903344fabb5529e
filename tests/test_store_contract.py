"""The store contract: every backend must count exactly the same, whatever happens.

One suite, parametrized over every store: SQLite on a temporary file,
mongomock (``memory://``) and SecantusDB, a real server speaking MongoDB's
wire protocol, so MongoStore's pymongo path is tested against real BSON
types and real duplicate-key and overflow errors. The numbers are what a user
would see in a query, so every assertion is exact.

The MongoDB stores also get crash simulations: a checkpoint is stopped at
each step of its journal (see ``checkpoint.mongo``) and a new store object on
the same database must then finish it or drop it, whole.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymongo
import pytest
from bson.int64 import Int64
from secantus import REPO_ROOT, SecantusServer

from tally.checkpoint.layout import JOURNAL_PART_BYTES, check_checkpoint, journal_documents
from tally.checkpoint.memory import MemoryStore
from tally.checkpoint.mongo import MongoStore
from tally.checkpoint.slots import Slots
from tally.checkpoint.sqlite import SqliteStore
from tally.checkpoint.store import (
    Checkpoint,
    LayoutMismatch,
    MonthDoc,
    ShardRecord,
    Store,
    StoreError,
)
from tally.checkpoint.urls import open_store
from tally.wire.series import InvalidSeries, SeriesKey, parse_series_id, series_id
from tally.wire.timeslots import month_first_hour

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

# -- backends -------------------------------------------------------------------


@dataclass
class Backend:
    """A store under test, and what the suite needs to look behind it."""

    name: str
    open: Callable[[], Store]  # a new, independent handle on the same data
    persistent: bool  # whether a second handle sees the first one's data
    raw_db: Callable[[], Any] | None = None  # the database, Mongo-backed only
    # a new MongoStore on the same data whose journal parts hold at most this many bytes
    open_mongo: Callable[[int], MongoStore] | None = None
    bson_types: bool = False  # real BSON on the wire: numbers come back as Int64
    opened: list[Store] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.store = self.reopen()

    def reopen(self) -> Store:
        store = self.open()
        self.opened.append(store)
        return store

    def reopen_mongo(self, journal_part_bytes: int = JOURNAL_PART_BYTES) -> MongoStore:
        """A new MongoStore object on this backend's database, as a restarted process opens."""
        assert self.open_mongo is not None, f"{self.name} is not a MongoDB store"
        store = self.open_mongo(journal_part_bytes)
        self.opened.append(store)
        return store

    @property
    def is_mongo(self) -> bool:
        return self.raw_db is not None

    def raw(self, collection: str) -> Any:
        assert self.raw_db is not None, f"{self.name} is not a MongoDB store"
        return self.raw_db()[collection]


_database_numbers = itertools.count()


def by_columns(cp: Checkpoint) -> Checkpoint:
    """The same checkpoint with its deltas by column, as shards hand them over."""
    if cp.slots is not None or not cp.deltas:
        return cp
    return dataclasses.replace(cp, deltas={}, slots=Slots.from_deltas(cp.deltas))


class SqliteByColumns(SqliteStore):
    def write_checkpoint(self, cp: Checkpoint) -> None:
        super().write_checkpoint(by_columns(cp))


class SqliteRuns(SqliteStore):
    """Checkpoints kept as runs, never folded: every read must add what they hold."""

    def __init__(self, path: str) -> None:
        super().__init__(path, runs=True)


class SqliteFolding(SqliteStore):
    """Checkpoints kept as runs, then folded two slots at a time, one transaction after
    each checkpoint: reads meet runs, slot rows and folds half done, all at once."""

    def __init__(self, path: str) -> None:
        super().__init__(path, runs=True)

    def write_checkpoint(self, cp: Checkpoint) -> None:
        super().write_checkpoint(by_columns(cp))
        self.fold(cp.shard, 2)


class MemoryByColumns(MemoryStore):
    def write_checkpoint(self, cp: Checkpoint) -> None:
        super().write_checkpoint(by_columns(cp))


SQLITE_KINDS = {"sqlite": SqliteStore, "sqlite-columns": SqliteByColumns,
                "sqlite-runs": SqliteRuns, "sqlite-folding": SqliteFolding}


# "-columns": every checkpoint the suite writes goes by column (checkpoint/slots.py);
# "-runs", "-folding": as runs (checkpoint/runs.py), as shards write them
@pytest.fixture(params=[*SQLITE_KINDS, "memory", "memory-columns", "secantus"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    clients: list[pymongo.MongoClient] = []
    if request.param.startswith("sqlite"):
        path = tmp_path / "nested" / "dir" / "tally.db"  # parents do not exist yet
        sqlite = SQLITE_KINDS[request.param]
        b = Backend(request.param, lambda: sqlite(str(path)), persistent=True)
    elif request.param.startswith("memory"):
        memory = MemoryStore()
        kind = MemoryByColumns if request.param.endswith("columns") else MemoryStore
        b = Backend(
            request.param,
            lambda: kind(shared_with=memory),
            persistent=True,
            raw_db=lambda: memory.database,
            open_mongo=lambda part_bytes: kind(part_bytes, shared_with=memory),
        )
    else:
        server: SecantusServer = request.getfixturevalue("secantus")
        name = f"tally_test_{next(_database_numbers)}"
        url = server.url(name)
        raw_client: list[pymongo.MongoClient] = []

        def raw_db() -> Any:
            if not raw_client:
                raw_client.append(pymongo.MongoClient(url, serverSelectionTimeoutMS=5000))
                clients.append(raw_client[0])
            return raw_client[0][name]

        b = Backend(
            "secantus",
            lambda: MongoStore(url),
            True,
            raw_db=raw_db,
            open_mongo=lambda part_bytes: MongoStore(url, journal_part_bytes=part_bytes),
            bson_types=True,
        )
    yield b
    for store in b.opened:
        store.close()
    for client in clients:
        client.close()


# -- helpers ----------------------------------------------------------------------


def hour(month: str, day: int, hour_of_day: int) -> int:
    """The absolute hour of a UTC month's day (from 1) and hour of day."""
    return month_first_hour(month) + (day - 1) * 24 + hour_of_day


TW_POS = series_id("acme", "messages.received", {"channel": "twitter", "sentiment": "pos"})
TW_NEG = series_id("acme", "messages.received", {"channel": "twitter", "sentiment": "neg"})
EMAIL = series_id("acme", "messages.received", {"channel": "email", "sentiment": "pos"})
UNTAGGED = series_id("acme", "messages.received", None)
HANDLED = series_id("acme", "messages.handled", {"agent": "ann"})
GLOBEX = series_id("globex", "messages.received", {"channel": "twitter", "sentiment": "pos"})

OCT_FIRST = hour("2026-10", 1, 0)
OCT_LAST = hour("2026-10", 31, 23)  # the hour before the month boundary...
NOV_FIRST = hour("2026-11", 1, 0)  # ...and the one after it
NOV_LAST = hour("2026-11", 30, 23)
FEB_LAST = hour("2024-02", 29, 23)  # leap day


def docs_by_key(docs: list[MonthDoc]) -> dict[tuple[str, str], MonthDoc]:
    by_key = {(d.sid, d.month): d for d in docs}
    assert len(by_key) == len(docs), f"duplicate documents in {docs}"
    return by_key


# -- round trip -------------------------------------------------------------------


def test_deltas_round_trip_across_series_months_and_boundaries(backend: Backend) -> None:
    store = backend.store
    assert OCT_LAST + 1 == NOV_FIRST
    store.write_checkpoint(
        Checkpoint(
            shard=0,
            ck=1,
            deltas={
                (TW_POS, "2026-10"): {OCT_FIRST: 7, OCT_LAST: 5},
                (TW_POS, "2026-11"): {NOV_FIRST: 3, NOV_LAST: -2, hour("2026-11", 15, 12): 2**40},
                (EMAIL, "2026-11"): {hour("2026-11", 2, 5): -9},
                (HANDLED, "2024-02"): {FEB_LAST: 1},
            },
            new_series=[TW_POS, EMAIL, HANDLED],
        )
    )
    store.write_checkpoint(
        Checkpoint(
            shard=0,
            ck=2,
            deltas={(TW_POS, "2026-11"): {NOV_FIRST: 4, NOV_LAST: 2}},  # last hour back to 0
        )
    )
    expected = {
        (TW_POS, "2026-10"): MonthDoc(TW_POS, "2026-10", {OCT_FIRST: 7, OCT_LAST: 5}, ck=1),
        (TW_POS, "2026-11"): MonthDoc(
            TW_POS, "2026-11", {NOV_FIRST: 7, hour("2026-11", 15, 12): 2**40}, ck=2
        ),
        (EMAIL, "2026-11"): MonthDoc(EMAIL, "2026-11", {hour("2026-11", 2, 5): -9}, ck=1),
        (HANDLED, "2024-02"): MonthDoc(HANDLED, "2024-02", {FEB_LAST: 1}, ck=1),
    }
    assert store.load_months(list(expected)) == expected
    docs = store.read_months("acme", "messages.received", {}, ["2026-10", "2026-11"])
    assert docs_by_key(docs) == {k: v for k, v in expected.items() if k[0] != HANDLED}
    assert store.read_months("acme", "messages.handled", {}, ["2024-02"]) == [
        expected[(HANDLED, "2024-02")]
    ]


def test_values_near_int64_limits_sum_exactly(backend: Backend) -> None:
    store = backend.store
    a, b, c = hour("2026-11", 1, 0), hour("2026-11", 1, 1), hour("2026-11", 2, 0)
    key = (TW_POS, "2026-11")
    store.write_checkpoint(Checkpoint(0, 1, {key: {a: 2**62, b: -(2**62), c: -(2**62)}}))
    store.write_checkpoint(Checkpoint(0, 2, {key: {a: 2**62 - 1, b: -(2**62 - 1), c: -(2**62)}}))
    expected = MonthDoc(TW_POS, "2026-11", {a: INT64_MAX, b: -INT64_MAX, c: INT64_MIN}, ck=2)
    assert store.load_months([key]) == {key: expected}
    assert store.read_months("acme", "messages.received", {}, ["2026-11"]) == [expected]


def test_increment_past_int64_is_refused_not_wrapped(backend: Backend) -> None:
    store = backend.store
    key, other = (TW_POS, "2026-11"), (EMAIL, "2026-11")
    top, bottom = hour("2026-11", 3, 4), hour("2026-11", 4, 4)
    store.write_checkpoint(Checkpoint(0, 1, {key: {top: INT64_MAX - 1}}, producers={"p": 1}))
    store.write_checkpoint(Checkpoint(1, 1, {other: {bottom: INT64_MIN + 1}}, producers={"p": 1}))
    for _ in range(2):  # a shard retries a failed checkpoint as it is
        with pytest.raises(StoreError, match="int64|\\$inc"):
            store.write_checkpoint(Checkpoint(0, 2, {key: {top: 2}}, producers={"p": 2}))
        with pytest.raises(StoreError, match="int64|\\$inc"):
            store.write_checkpoint(Checkpoint(1, 2, {other: {bottom: -2}}, producers={"p": 2}))
    assert store.load_months([key, other]) == {
        key: MonthDoc(TW_POS, "2026-11", {top: INT64_MAX - 1}, ck=1),
        other: MonthDoc(EMAIL, "2026-11", {bottom: INT64_MIN + 1}, ck=1),
    }
    if backend.is_mongo:
        # The journal committed checkpoint 2 before a document refused it, and
        # a committed checkpoint is applied whole or the shard does not start:
        # dropping it, or recording its marks without its deltas, would lose
        # counts. (Shard state refuses such batches long before, at ingest.)
        for shard in (0, 1):
            with pytest.raises(StoreError, match=f"checkpoint 2 of shard {shard}"):
                backend.reopen().open_shard(shard)
        marks = backend.raw("marks").find({}, {"_id": 0, "p": 1, "seq": 1})
        assert sorted(m["seq"] for m in marks) == [1, 1]
    else:
        # One transaction: nothing of checkpoint 2 was written, not even its id.
        assert store.open_shard(0) == ShardRecord(1, {"p": 1})
        store.write_checkpoint(Checkpoint(0, 2, {key: {top: 1}}, producers={"p": 2}))
        assert store.load_months([key])[key].hours == {top: INT64_MAX}
        assert store.open_shard(0) == ShardRecord(2, {"p": 2})


def test_invalid_checkpoint_is_refused_before_anything_is_written(backend: Backend) -> None:
    store = backend.store
    bad_hour = {(TW_POS, "2026-11"): {hour("2026-12", 1, 0): 1}}
    with pytest.raises(ValueError, match="outside the month"):
        store.write_checkpoint(Checkpoint(0, 5, bad_hour, new_series=[TW_POS]))
    with pytest.raises(ValueError, match="outside int64"):
        store.write_checkpoint(Checkpoint(0, 6, {(TW_POS, "2026-11"): {NOV_FIRST: 2**63}}))
    with pytest.raises(ValueError, match="not an integer"):
        store.write_checkpoint(Checkpoint(0, 7, {(TW_POS, "2026-11"): {NOV_FIRST: 1.5}}))
    # Each hour fits in int64 but the day total of the document could not.
    day_overflow = {(TW_POS, "2026-11"): {NOV_FIRST: 2**62, NOV_FIRST + 1: 2**62}}
    with pytest.raises(ValueError, match="day 1 adds up to"):
        store.write_checkpoint(Checkpoint(0, 8, day_overflow))
    unsorted_tags = "acme|messages.received|sentiment=pos,channel=twitter"
    with pytest.raises(ValueError, match="not canonical"):
        store.write_checkpoint(Checkpoint(0, 10, {(unsorted_tags, "2026-11"): {NOV_FIRST: 1}}))
    with pytest.raises(ValueError, match="not canonical"):
        store.write_checkpoint(Checkpoint(0, 11, {}, new_series=[unsorted_tags]))
    with pytest.raises(ValueError, match="invalid"):
        store.write_checkpoint(Checkpoint(0, 12, {}, new_series=["Acme|m|"]))
    with pytest.raises(ValueError, match="YYYY-MM"):
        store.write_checkpoint(Checkpoint(0, 9, {(TW_POS, "2026-13"): {NOV_FIRST: 1}}))
    assert store.open_shard(0) == ShardRecord(0, {})
    assert store.catalog("acme") == []
    assert store.load_months([(TW_POS, "2026-11")]) == {}


def test_zero_deltas_create_nothing(backend: Backend) -> None:
    store = backend.store
    store.write_checkpoint(
        Checkpoint(
            0,
            1,
            {
                (TW_POS, "2026-11"): {NOV_FIRST: 0},
                (EMAIL, "2026-11"): {NOV_FIRST: 0, NOV_LAST: 4},
            },
        )
    )
    assert store.load_months([(TW_POS, "2026-11"), (EMAIL, "2026-11")]) == {
        (EMAIL, "2026-11"): MonthDoc(EMAIL, "2026-11", {NOV_LAST: 4}, ck=1)
    }


# -- idempotence ------------------------------------------------------------------

FULL = {
    (TW_POS, "2026-11"): {NOV_FIRST: 10, NOV_LAST: -3},
    (TW_NEG, "2026-11"): {hour("2026-11", 5, 5): 20},
    (TW_POS, "2026-10"): {OCT_LAST: 30},
}
FULL_RESULT = {
    (TW_POS, "2026-11"): MonthDoc(TW_POS, "2026-11", {NOV_FIRST: 10, NOV_LAST: -3}, ck=1),
    (TW_NEG, "2026-11"): MonthDoc(TW_NEG, "2026-11", {hour("2026-11", 5, 5): 20}, ck=1),
    (TW_POS, "2026-10"): MonthDoc(TW_POS, "2026-10", {OCT_LAST: 30}, ck=1),
}


def test_retrying_a_checkpoint_does_not_double_count(backend: Backend) -> None:
    store = backend.store
    for _ in range(3):
        store.write_checkpoint(Checkpoint(0, 1, FULL, new_series=[TW_POS, TW_NEG]))
    assert store.load_months(list(FULL)) == FULL_RESULT
    assert len(store.catalog("acme")) == 2


def test_half_applied_checkpoint_ends_exact(backend: Backend) -> None:
    store = backend.store
    # A crash after two of the three documents took checkpoint 1...
    half = {k: FULL[k] for k in [(TW_POS, "2026-11"), (TW_POS, "2026-10")]}
    store.write_checkpoint(Checkpoint(0, 1, half))
    # ...then the replay of the whole checkpoint from the journal.
    store.write_checkpoint(Checkpoint(0, 1, FULL))
    assert store.load_months(list(FULL)) == FULL_RESULT
    assert store.open_shard(0) == ShardRecord(1, {})


def test_older_checkpoint_is_a_noop_for_newer_documents(backend: Backend) -> None:
    store = backend.store
    store.write_checkpoint(Checkpoint(0, 5, {(TW_POS, "2026-11"): {NOV_FIRST: 10}}))
    store.write_checkpoint(
        Checkpoint(
            0,
            3,
            {(TW_POS, "2026-11"): {NOV_FIRST: 100}, (TW_NEG, "2026-11"): {NOV_FIRST: 7}},
        )
    )
    assert store.load_months([(TW_POS, "2026-11"), (TW_NEG, "2026-11")]) == {
        (TW_POS, "2026-11"): MonthDoc(TW_POS, "2026-11", {NOV_FIRST: 10}, ck=5),
        (TW_NEG, "2026-11"): MonthDoc(TW_NEG, "2026-11", {NOV_FIRST: 7}, ck=3),
    }
    assert store.open_shard(0) == ShardRecord(5, {})


# -- shards and layout --------------------------------------------------------------


def test_open_shard_returns_the_highest_claimed_checkpoint(backend: Backend) -> None:
    store = backend.store
    assert [store.open_shard(s).ck for s in range(3)] == [0, 0, 0]
    store.write_checkpoint(Checkpoint(1, 7, {(TW_POS, "2026-11"): {NOV_FIRST: 1}}))
    store.write_checkpoint(Checkpoint(1, 4, {(TW_POS, "2026-11"): {NOV_FIRST: 1}}))
    store.write_checkpoint(Checkpoint(2, 3, {}))  # nothing dirty still claims the id
    store.write_checkpoint(Checkpoint(2, 2**40, {}))
    assert [store.open_shard(s).ck for s in range(3)] == [0, 7, 2**40]
    if not backend.persistent:
        return
    store.close()
    reopened = backend.reopen()
    assert [reopened.open_shard(s).ck for s in range(3)] == [0, 7, 2**40]
    assert reopened.load_months([(TW_POS, "2026-11")])[(TW_POS, "2026-11")].hours == {NOV_FIRST: 1}


def test_ensure_layout_records_and_refuses_another_shard_count(backend: Backend) -> None:
    store = backend.store
    store.ensure_layout(4)
    store.ensure_layout(4)
    with pytest.raises(LayoutMismatch, match="4 shards"):
        store.ensure_layout(5)
    with pytest.raises(ValueError):
        store.ensure_layout(0)
    if backend.persistent:
        store.close()
        reopened = backend.reopen()
        reopened.ensure_layout(4)
        with pytest.raises(LayoutMismatch, match="4 shards, not 3"):
            reopened.ensure_layout(3)


# -- producer marks ------------------------------------------------------------------

# Names that would break a naive layout: field-path dots and operators for
# MongoDB, the id separator, multi-byte text, the longest name allowed.
ODD_MARKS = {
    "a.b": 5,
    "$x": 7,
    "$": 8,
    "a|b": 0,
    "1|p": 11,  # looks like another shard's id prefix
    "ünïcødé ✓ 日本語": 1,
    "🦜" * 200: 2**62,
    "n" * 200: INT64_MAX,
    "nul\x00byte": 12,
    "started-late": -1,  # shard state's mark for "nothing applied here"
}


def test_producer_marks_round_trip_and_follow_the_latest_checkpoint(backend: Backend) -> None:
    store = backend.store
    nov = "2026-11"
    store.write_checkpoint(
        Checkpoint(1, 1, {(TW_POS, nov): {NOV_FIRST: 1}}, [TW_POS], producers=ODD_MARKS)
    )
    # Shards 10 and 11 share digits with shard 1: their marks stay theirs.
    store.write_checkpoint(Checkpoint(10, 1, {}, producers={"a.b": 99}))
    store.write_checkpoint(Checkpoint(11, 4, {(EMAIL, nov): {NOV_FIRST: 2}}, producers={"q": 3}))
    assert store.open_shard(1) == ShardRecord(1, ODD_MARKS)
    assert store.open_shard(10) == ShardRecord(1, {"a.b": 99})
    assert store.open_shard(11) == ShardRecord(4, {"q": 3})
    assert store.open_shard(0) == ShardRecord(0, {})

    # A checkpoint sets the marks it carries, lower ones included (a batch
    # reverted after checkpoint 1 held it); the others keep their values.
    later = {"a.b": 6, "$x": 3, "started-late": 0, "new": 1}
    store.write_checkpoint(Checkpoint(1, 2, {(TW_POS, nov): {NOV_FIRST: 1}}, producers=later))
    store.write_checkpoint(Checkpoint(1, 3, {(TW_POS, nov): {NOV_LAST: 1}}, producers={"a.b": 4}))
    store.write_checkpoint(Checkpoint(1, 4, {(TW_POS, nov): {NOV_LAST: 1}}))  # no marks at all
    expected = ShardRecord(4, {**ODD_MARKS, **later, "a.b": 4})
    assert store.open_shard(1) == expected
    # Checkpoint order decides, not arrival: older checkpoints written again
    # (a replay, a late retry) change no mark and no count.
    store.write_checkpoint(Checkpoint(1, 2, {(TW_POS, nov): {NOV_FIRST: 1}}, producers=later))
    store.write_checkpoint(Checkpoint(1, 1, {}, producers=ODD_MARKS))
    assert store.open_shard(1) == expected
    assert store.load_months([(TW_POS, nov)])[(TW_POS, nov)].hours == {NOV_FIRST: 2, NOV_LAST: 2}

    store.close()
    reopened = backend.reopen()
    assert reopened.open_shard(1) == expected
    assert reopened.open_shard(10) == ShardRecord(1, {"a.b": 99})
    assert reopened.open_shard(11) == ShardRecord(4, {"q": 3})
    if backend.is_mongo:
        assert backend.raw("journal").count_documents({}) == 0


@pytest.mark.parametrize(
    ("producers", "message"),
    [
        ({"": 1}, "non-empty string"),
        ({"x" * 201: 1}, "201 characters; at most 200"),
        ({"\ud800": 1}, "not valid Unicode"),
        ({7: 1}, "non-empty string"),
        ({"p": INT64_MAX + 1}, "outside int64"),
        ({"p": 1.0}, "not an integer"),
        ({"p": "3"}, "not an integer"),
    ],
)
def test_invalid_producer_marks_are_refused_before_anything_is_written(
    backend: Backend, producers: dict, message: str
) -> None:
    store = backend.store
    good = {"fine": 1}
    with pytest.raises(ValueError, match=message):
        store.write_checkpoint(
            Checkpoint(0, 1, {(TW_POS, "2026-11"): {NOV_FIRST: 1}}, [TW_POS], {**good, **producers})
        )
    assert store.open_shard(0) == ShardRecord(0, {})
    assert store.load_months([(TW_POS, "2026-11")]) == {}
    assert store.catalog("acme") == []
    if backend.is_mongo:
        assert backend.raw("journal").count_documents({}) == 0


def test_checkpoint_bigger_than_a_journal_part_round_trips_exactly(backend: Backend) -> None:
    # Small parts on the MongoDB stores, so one checkpoint spans many of
    # them; one month entry (every hour of November) is bigger than a part.
    parts: list[str] = []
    if backend.is_mongo:
        store: Store = backend.reopen_mongo(journal_part_bytes=2000)
        put = store._put_journal_part  # type: ignore[attr-defined]

        def counting_put(doc: dict) -> None:
            parts.append(doc["_id"])
            put(doc)

        store._put_journal_part = counting_put  # type: ignore[attr-defined]
    else:
        store = backend.store
    nov = "2026-11"
    sids = [series_id("acme", "big", {"n": str(n)}) for n in range(12)]
    deltas: dict[tuple[str, str], dict[int, int]] = {
        (sid, nov): {NOV_FIRST + 24 * d + n % 24: (n + 1) * (d + 1) * (-1) ** d for d in range(30)}
        for n, sid in enumerate(sids)
    }
    every_hour = series_id("acme", "big", {"n": "all"})
    deltas[(every_hour, nov)] = {h: h - NOV_FIRST + 2**40 for h in range(NOV_FIRST, NOV_LAST + 1)}
    producers = {f"producer-{i}": i * 1000 for i in range(20)}
    new_series = [*sids, every_hour]
    store.write_checkpoint(Checkpoint(0, 1, deltas, new_series, producers))

    expected = {key: MonthDoc(key[0], nov, hours, ck=1) for key, hours in deltas.items()}
    assert store.load_months(list(deltas)) == expected
    assert sorted(k.sid for k in store.catalog("acme")) == sorted(new_series)
    assert store.open_shard(0) == ShardRecord(1, producers)
    if backend.is_mongo:
        assert len(parts) > 12, parts  # one per month entry at least, and the marker last
        assert parts[-1] == "0|1|0"
        assert backend.raw("journal").count_documents({}) == 0
    reopened = backend.reopen()
    assert reopened.load_months(list(deltas)) == expected
    assert reopened.open_shard(0) == ShardRecord(1, producers)


# -- reads ------------------------------------------------------------------------


def _write_tenants(store: Store) -> None:
    day = hour("2026-11", 3, 9)
    store.write_checkpoint(
        Checkpoint(
            0,
            1,
            {
                (TW_POS, "2026-11"): {day: 1},
                (TW_NEG, "2026-11"): {day: 10},
                (EMAIL, "2026-11"): {day: 100},
                (UNTAGGED, "2026-11"): {day: 1000},
                (HANDLED, "2026-11"): {day: 10000},
                (TW_POS, "2026-12"): {hour("2026-12", 1, 0): 5},
            },
            new_series=[TW_POS, TW_NEG, EMAIL, UNTAGGED, HANDLED],
        )
    )
    store.write_checkpoint(
        Checkpoint(1, 1, {(GLOBEX, "2026-11"): {day: 99999}}, new_series=[GLOBEX])
    )


def _totals(docs: list[MonthDoc]) -> dict[tuple[str, str], int]:
    return {key: sum(doc.hours.values()) for key, doc in docs_by_key(docs).items()}


def test_read_months_filters_by_tags_and_months(backend: Backend) -> None:
    store = backend.store
    _write_tenants(store)

    def read(where: dict[str, str], months: list[str] | None = None) -> dict:
        return _totals(store.read_months("acme", "messages.received", where, months or ["2026-11"]))

    nov = "2026-11"
    assert read({}) == {
        (TW_POS, nov): 1,
        (TW_NEG, nov): 10,
        (EMAIL, nov): 100,
        (UNTAGGED, nov): 1000,
    }
    assert read({"channel": "twitter"}) == {(TW_POS, nov): 1, (TW_NEG, nov): 10}
    assert read({"sentiment": "pos"}) == {(TW_POS, nov): 1, (EMAIL, nov): 100}
    assert read({"channel": "twitter", "sentiment": "neg"}) == {(TW_NEG, nov): 10}
    assert read({"channel": "sms"}) == {}
    assert read({"channel": "twitter", "sentiment": "meh"}) == {}
    assert read({"channel": "twitter"}, ["2026-11", "2026-12"]) == {
        (TW_POS, nov): 1,
        (TW_NEG, nov): 10,
        (TW_POS, "2026-12"): 5,
    }
    assert read({}, ["2026-12"]) == {(TW_POS, "2026-12"): 5}
    assert read({}, ["2025-11"]) == {}
    with pytest.raises(InvalidSeries):
        store.read_months("acme", "messages.received", {"tags.channel": "x"}, [nov])


def test_read_months_leaves_out_what_the_caller_holds(backend: Backend) -> None:
    store = backend.store
    _write_tenants(store)
    nov = "2026-11"
    got = store.read_months("acme", "messages.received", {"channel": "twitter"},
                            [nov, "2026-12"], {(TW_POS, nov), (EMAIL, nov)})
    assert _totals(got) == {(TW_NEG, nov): 10, (TW_POS, "2026-12"): 5}
    everything = {(TW_POS, nov), (TW_NEG, nov), (EMAIL, nov), (UNTAGGED, nov)}
    assert store.read_months("acme", "messages.received", {}, [nov], everything) == []


def test_where_matches_tag_values_with_separator_characters(backend: Backend) -> None:
    store = backend.store
    odd = series_id("acme", "odd", {"k": "a,b=c|d%e", "z": "1"})
    near = series_id("acme", "odd", {"k": "a", "z": "b=c|d%e"})
    day = month_first_hour("2026-11") + 5
    store.write_checkpoint(
        Checkpoint(0, 1, {(odd, "2026-11"): {day: 3}, (near, "2026-11"): {day: 4}},
                   new_series=[odd, near])
    )
    got = store.read_months("acme", "odd", {"k": "a,b=c|d%e"}, ["2026-11"])
    assert _totals(got) == {(odd, "2026-11"): 3}
    assert _totals(store.read_months("acme", "odd", {"k": "a"}, ["2026-11"])) == {
        (near, "2026-11"): 4}
    assert store.read_months("acme", "odd", {"k": "a,b"}, ["2026-11"]) == []


def test_read_months_isolates_tenants_and_metrics(backend: Backend) -> None:
    store = backend.store
    _write_tenants(store)
    assert _totals(store.read_months("globex", "messages.received", {}, ["2026-11"])) == {
        (GLOBEX, "2026-11"): 99999
    }
    assert _totals(store.read_months("acme", "messages.handled", {}, ["2026-11"])) == {
        (HANDLED, "2026-11"): 10000
    }
    assert store.read_months("acme", "messages", {}, ["2026-11"]) == []  # a prefix, not a metric
    assert store.read_months("acm", "messages.received", {}, ["2026-11"]) == []
    assert store.read_months("initech", "messages.received", {}, ["2026-11"]) == []


def test_load_months_returns_existing_documents_only(backend: Backend) -> None:
    store = backend.store
    _write_tenants(store)
    nobody = series_id("acme", "messages.received", {"channel": "fax"})
    got = store.load_months(
        [(TW_POS, "2026-11"), (TW_POS, "2027-01"), (nobody, "2026-11"), (GLOBEX, "2026-11")]
    )
    assert got == {
        (TW_POS, "2026-11"): MonthDoc(TW_POS, "2026-11", {hour("2026-11", 3, 9): 1}, ck=1),
        (GLOBEX, "2026-11"): MonthDoc(GLOBEX, "2026-11", {hour("2026-11", 3, 9): 99999}, ck=1),
    }
    assert store.load_months([]) == {}



def test_a_backfill_loads_many_months_at_once_exactly(backend: Backend) -> None:
    # A backfill asks for many (series, month) pairs in one call: more series than
    # one statement names, months stored for some of them only, a second checkpoint
    # adding to some documents, and series the store never saw.
    store = backend.store
    sids = [series_id("acme", "backfill", {"n": str(n)}) for n in range(1_100)]
    months = ("2026-09", "2026-10", "2026-11")
    first: dict[tuple[str, str], dict[int, int]] = {}
    second: dict[tuple[str, str], dict[int, int]] = {}
    for n, sid in enumerate(sids):
        for m, month in enumerate(months):
            if (n + m) % 3:
                first[(sid, month)] = {hour(month, 1 + n % 28, m): n + 1}
            if n % 7 == m:
                second[(sid, month)] = {hour(month, 2 + n % 27, 5): -(n + 2)}
    store.write_checkpoint(Checkpoint(0, 1, first, sids, {}))
    store.write_checkpoint(Checkpoint(0, 2, second, [], {}))
    expected: dict[tuple[str, str], MonthDoc] = {}
    for key in {*first, *second}:
        hours = {**first.get(key, {})}
        for h, v in second.get(key, {}).items():
            hours[h] = hours.get(h, 0) + v
        expected[key] = MonthDoc(key[0], key[1], hours, ck=2 if key in second else 1)
    never = [series_id("acme", "backfill", {"n": f"never-{n}"}) for n in range(600)]
    asked = [(sid, month) for sid in [*sids, *never] for month in (*months, "2026-12")]
    assert store.load_months(asked) == expected
    assert backend.reopen().load_months(asked[::-1]) == expected  # (no ids cached)

def test_catalog_lists_each_tenants_series_only(backend: Backend) -> None:
    store = backend.store
    _write_tenants(store)
    store.write_checkpoint(Checkpoint(0, 2, {}, new_series=[TW_POS, EMAIL]))  # already known
    acme = store.catalog("acme")
    assert sorted(acme, key=lambda k: k.sid) == sorted(
        (parse_series_id(s) for s in [TW_POS, TW_NEG, EMAIL, UNTAGGED, HANDLED]),
        key=lambda k: k.sid,
    )
    assert len(acme) == 5
    assert (
        SeriesKey("acme", "messages.received", (("channel", "twitter"), ("sentiment", "pos")))
        in acme
    )
    assert SeriesKey("acme", "messages.received", ()) in acme
    assert store.catalog("globex") == [parse_series_id(GLOBEX)]
    assert store.catalog("initech") == []


# -- concurrency ----------------------------------------------------------------------


def test_threads_write_and_read_concurrently(backend: Backend) -> None:
    store = backend.store
    writers, rounds = 4, 5
    sids = [series_id("acme", "load", {"writer": str(w)}) for w in range(writers)]
    errors: list[BaseException] = []
    done = threading.Event()

    def write(w: int) -> None:
        try:
            for ck in range(1, rounds + 1):
                store.write_checkpoint(
                    Checkpoint(
                        w, ck, {(sids[w], "2026-11"): {NOV_FIRST: ck, NOV_LAST: 1}}, [sids[w]]
                    )
                )
        except BaseException as e:  # reported by the main thread below
            errors.append(e)

    def read() -> None:
        try:
            while not done.is_set():
                for doc in store.read_months("acme", "load", {}, ["2026-11"]):
                    # A document is never seen half updated: its two hours move together.
                    assert doc.hours[NOV_FIRST] == doc.ck * (doc.ck + 1) // 2
                    assert doc.hours[NOV_LAST] == doc.ck
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers + threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert errors == []
    total = rounds * (rounds + 1) // 2
    assert _totals(store.read_months("acme", "load", {}, ["2026-11"])) == {
        (sid, "2026-11"): total + rounds for sid in sids
    }
    assert [store.open_shard(w) for w in range(writers)] == [ShardRecord(rounds, {})] * writers


# -- the MongoDB document layout ----------------------------------------------------------


def test_month_document_layout_is_exactly_the_designs(backend: Backend) -> None:
    if not backend.is_mongo:
        pytest.skip(f"{backend.name} does not store month documents")
    store = backend.store
    key = (TW_POS, "2026-11")
    store.write_checkpoint(
        Checkpoint(
            0,
            3,
            {key: {NOV_FIRST: 30, hour("2026-11", 1, 23): 41, hour("2026-11", 2, 5): 754}},
            [TW_POS],
        )
    )
    store.write_checkpoint(Checkpoint(0, 4, {key: {NOV_FIRST: 2**40, NOV_LAST: 3_000_000_000}}))
    raw = backend.raw("months").find_one({"_id": f"{TW_POS}|2026-11"})
    assert raw == {
        "_id": "acme|messages.received|channel=twitter,sentiment=pos|2026-11",
        "tenant": "acme",
        "metric": "messages.received",
        "tags": {"channel": "twitter", "sentiment": "pos"},
        "month": "2026-11",
        "d": {"1": 71 + 2**40, "2": 754, "30": 3_000_000_000},
        "h": {
            "1": {"0": 30 + 2**40, "23": 41},
            "2": {"5": 754},
            "30": {"23": 3_000_000_000},
        },
        "ck": 4,
    }
    if backend.bson_types:
        # Every number is a BSON long: an int32 field would be a different
        # type per document, and a double would lose counts above 2**53.
        numbers = [raw["ck"], *raw["d"].values()]
        numbers += [v for by_hour in raw["h"].values() for v in by_hour.values()]
        assert all(type(n) is Int64 for n in numbers), [type(n) for n in numbers]


# -- the journal: crashes at every step (MongoDB stores) -------------------------------------


class Crash(Exception):
    """The process dies here: nothing after this point of the checkpoint runs."""


CRASH_PART_BYTES = 800  # each month entry below gets a part of its own
NOV = "2026-11"
BASE = Checkpoint(
    0,
    1,
    {(TW_POS, NOV): {NOV_FIRST: 1}, (TW_NEG, NOV): {NOV_FIRST: 2}},
    [TW_POS, TW_NEG],
    {"p": 1, "q.q": 4},
)
SECOND = Checkpoint(
    0,
    2,
    {
        (TW_POS, NOV): {NOV_FIRST: 10, NOV_LAST: 3},
        (TW_NEG, NOV): {hour(NOV, 5, 5): 20},
        (EMAIL, NOV): {hour(NOV, 6, 6): 30},
        (UNTAGGED, "2026-10"): {OCT_LAST: 40},
    },
    [EMAIL, UNTAGGED],
    {"p": 9, "$r": 2, "q.q": 3},  # q.q falls: a batch held by BASE was reverted since
)
SECOND_PARTS = len(journal_documents(check_checkpoint(SECOND), CRASH_PART_BYTES))
KEYS = [*SECOND.deltas]
MARKS_BEFORE = {"p": 1, "q.q": 4}
MARKS_AFTER = {"p": 9, "q.q": 3, "$r": 2}
CATALOG_BEFORE = sorted([TW_POS, TW_NEG])
CATALOG_AFTER = sorted([TW_POS, TW_NEG, EMAIL, UNTAGGED])


def months_before() -> dict:
    return {
        (TW_POS, NOV): MonthDoc(TW_POS, NOV, {NOV_FIRST: 1}, ck=1),
        (TW_NEG, NOV): MonthDoc(TW_NEG, NOV, {NOV_FIRST: 2}, ck=1),
    }


def months_after(ck: int) -> dict:
    return {
        (TW_POS, NOV): MonthDoc(TW_POS, NOV, {NOV_FIRST: 11, NOV_LAST: 3}, ck=ck),
        (TW_NEG, NOV): MonthDoc(TW_NEG, NOV, {NOV_FIRST: 2, hour(NOV, 5, 5): 20}, ck=ck),
        (EMAIL, NOV): MonthDoc(EMAIL, NOV, {hour(NOV, 6, 6): 30}, ck=ck),
        (UNTAGGED, "2026-10"): MonthDoc(UNTAGGED, "2026-10", {OCT_LAST: 40}, ck=ck),
    }


def crash_on_call(
    monkeypatch: pytest.MonkeyPatch,
    store: MongoStore,
    method: str,
    call: int,
    when: Callable[..., bool] = lambda *args: True,
    first_half: bool = False,
) -> None:
    """Make ``store.<method>`` crash on its ``call``-th call among those ``when`` accepts.

    With ``first_half``, the crashing call first does half of its operations
    (the first half of the ``ops`` list passed to ``_upsert_all``).
    """
    original = getattr(store, method)
    calls = 0

    def crashing(*args: Any) -> Any:
        nonlocal calls
        if not when(*args):
            return original(*args)
        calls += 1
        if calls < call:
            return original(*args)
        if first_half:
            collection, ops, what = args
            original(collection, ops[: len(ops) // 2], what)
        raise Crash(f"{method} call {calls}")

    monkeypatch.setattr(store, method, crashing)


def _is(name: str) -> Callable[..., bool]:
    return lambda collection, *rest: collection.name == name


@dataclass(frozen=True)
class CrashPoint:
    """Where a checkpoint dies, and what the database holds at that moment."""

    name: str
    method: str  # the MongoStore step that crashes...
    call: int  # ...on this call of it (counting only the calls ``when`` accepts)
    committed: bool  # whether the marker was written
    journal_left: int  # journal documents at the crash
    months_done: int  # month documents of SECOND that took it at the crash
    when: Callable[..., bool] | None = None
    first_half: bool = False  # the crashing call does half its operations first

    @property
    def marker_left(self) -> bool:
        return self.committed and self.journal_left == SECOND_PARTS


N = SECOND_PARTS
CRASH_POINTS = [
    CrashPoint("before the journal", "_put_journal_part", 1, False, 0, 0),
    CrashPoint("after two journal parts", "_put_journal_part", 3, False, 2, 0),
    CrashPoint("after every part but the marker", "_put_journal_part", N, False, N - 1, 0),
    CrashPoint("after the marker", "_upsert_all", 1, True, N, 0),
    CrashPoint("after half the months", "_upsert_all", 1, True, N, 2, _is("months"), True),
    CrashPoint("after the months", "_upsert_all", 1, True, N, 4, _is("marks")),
    CrashPoint("after the marks", "_claim", 1, True, N, 4),
    CrashPoint("after the shard record", "_delete_journal", 1, True, N, 4),
    CrashPoint("after the marker's deletion", "_delete_journal", 2, True, N - 1, 4),
]


def _journal_state(backend: Backend) -> tuple[int, bool]:
    journal = backend.raw("journal")
    return journal.count_documents({}), journal.find_one({"_id": "0|2|0"}) is not None


def _assert_state(
    backend: Backend, store: Store, months: dict, marks: dict, ck: int, catalog: list
) -> None:
    assert store.open_shard(0) == ShardRecord(ck, marks)
    assert store.load_months(KEYS) == months
    assert sorted(k.sid for k in store.catalog("acme")) == catalog
    assert _journal_state(backend) == (0, False)


@pytest.fixture
def mongo_backend(backend: Backend) -> Backend:
    if not backend.is_mongo:
        pytest.skip(f"{backend.name} needs no journal: a checkpoint is one transaction")
    return backend


@pytest.mark.parametrize("then", ["restart", "retry"])
@pytest.mark.parametrize("point", CRASH_POINTS, ids=[p.name for p in CRASH_POINTS])
def test_crash_at_each_journal_step_ends_exact(
    mongo_backend: Backend, monkeypatch: pytest.MonkeyPatch, then: str, point: CrashPoint
) -> None:
    backend = mongo_backend
    store = backend.reopen_mongo(CRASH_PART_BYTES)
    store.write_checkpoint(BASE)
    assert SECOND_PARTS >= 4
    when = point.when or (lambda *args: True)
    crash_on_call(monkeypatch, store, point.method, point.call, when, point.first_half)
    with pytest.raises(Crash):
        store.write_checkpoint(SECOND)
    # The database is in the state the crash point names.
    assert _journal_state(backend) == (point.journal_left, point.marker_left)
    took = backend.raw("months").count_documents({"ck": 2})
    assert took == point.months_done

    if then == "retry":
        # The write raised instead of killing the process: the shard writes
        # the same checkpoint again, whatever step the first attempt reached.
        monkeypatch.undo()
        store.write_checkpoint(SECOND)
        _assert_state(backend, store, months_after(2), MARKS_AFTER, 2, CATALOG_AFTER)
        _assert_state(
            backend, backend.reopen_mongo(), months_after(2), MARKS_AFTER, 2, CATALOG_AFTER
        )
        return

    # The process died: a new one opens the same database.
    restarted = backend.reopen_mongo()
    record = restarted.open_shard(0)
    if point.committed:
        # Committed: finished whole, nothing to resend.
        _assert_state(backend, restarted, months_after(2), MARKS_AFTER, 2, CATALOG_AFTER)
    else:
        # Never committed: nothing of it is anywhere, though an id that got as
        # far as the journal is not handed out again.
        ck = 2 if point.journal_left else 1
        _assert_state(backend, restarted, months_before(), MARKS_BEFORE, ck, CATALOG_BEFORE)
        # The shard restarts from checkpoint 1's state and its producers resend.
        resent = Checkpoint(0, ck + 1, SECOND.deltas, SECOND.new_series, SECOND.producers)
        restarted.write_checkpoint(resent)
        _assert_state(backend, restarted, months_after(ck + 1), MARKS_AFTER, ck + 1, CATALOG_AFTER)
        record = restarted.open_shard(0)
    # Either way the shard goes on from the record open_shard gave it.
    restarted.write_checkpoint(
        Checkpoint(0, record.ck + 1, {(TW_POS, NOV): {NOV_FIRST: 100}}, producers={"p": 10})
    )
    after = restarted.load_months([(TW_POS, NOV)])[(TW_POS, NOV)]
    assert after == MonthDoc(TW_POS, NOV, {NOV_FIRST: 111, NOV_LAST: 3}, ck=record.ck + 1)
    assert restarted.open_shard(0) == ShardRecord(record.ck + 1, {**MARKS_AFTER, "p": 10})


@pytest.mark.parametrize(
    ("method", "call", "when", "first_half"),
    [
        ("_upsert_all", 1, _is("months"), True),
        ("_claim", 1, None, False),
        ("_delete_journal", 2, None, False),
    ],
    ids=["after half the months", "after the marks", "after the marker's deletion"],
)
def test_recovery_interrupted_by_a_crash_is_finished_by_the_next(
    mongo_backend: Backend,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    call: int,
    when: Callable[..., bool] | None,
    first_half: bool,
) -> None:
    backend = mongo_backend
    store = backend.reopen_mongo(CRASH_PART_BYTES)
    store.write_checkpoint(BASE)
    crash_on_call(monkeypatch, store, "_upsert_all", 1, _is("months"), first_half=True)
    with pytest.raises(Crash):
        store.write_checkpoint(SECOND)
    recovering = backend.reopen_mongo()
    crash_on_call(monkeypatch, recovering, method, call, when or (lambda *args: True), first_half)
    with pytest.raises(Crash):
        recovering.open_shard(0)
    _assert_state(backend, backend.reopen_mongo(), months_after(2), MARKS_AFTER, 2, CATALOG_AFTER)


def test_recovery_replays_committed_checkpoints_in_id_order(mongo_backend: Backend) -> None:
    # Two committed journals on one document: replaying 10 before 9 would
    # make the document (ck 10) ignore 9. The ids also sort wrongly as text.
    backend = mongo_backend
    store = backend.reopen_mongo()
    for ck, delta in [(10, 5), (9, 7)]:
        checked = check_checkpoint(
            Checkpoint(0, ck, {(TW_POS, NOV): {NOV_FIRST: delta}}, producers={"p": ck})
        )
        store._write_journal(checked, journal_documents(checked))
    # and, above both, one that crashed before its marker: dropped, its id kept
    uncommitted = check_checkpoint(
        Checkpoint(0, 11, {(TW_POS, NOV): {NOV_FIRST: 1000}, (EMAIL, NOV): {NOV_FIRST: 1}})
    )
    marker, *others = journal_documents(uncommitted, CRASH_PART_BYTES)
    assert others and "parts" in marker
    for doc in others:
        store._put_journal_part(doc)
    restarted = backend.reopen_mongo()
    assert restarted.open_shard(0) == ShardRecord(11, {"p": 10})
    assert restarted.load_months([(TW_POS, NOV)]) == {
        (TW_POS, NOV): MonthDoc(TW_POS, NOV, {NOV_FIRST: 12}, ck=10)
    }
    assert _journal_state(backend) == (0, False)


def test_a_small_checkpoint_costs_one_journal_write_and_one_delete(
    mongo_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = mongo_backend.reopen_mongo()
    calls: list[str] = []
    for method in ("_put_journal_part", "_delete_journal"):
        original = getattr(store, method)

        def spy(arg: dict, method: str = method, original: Callable = original) -> None:
            calls.append(method)
            original(arg)

        monkeypatch.setattr(store, method, spy)
    store.write_checkpoint(SECOND)
    assert calls == ["_put_journal_part", "_delete_journal"]
    assert store.open_shard(0) == ShardRecord(2, {"p": 9, "$r": 2, "q.q": 3})
    assert _journal_state(mongo_backend) == (0, False)


def test_committed_journal_missing_a_part_is_refused_and_kept(mongo_backend: Backend) -> None:
    backend = mongo_backend
    store = backend.reopen_mongo(CRASH_PART_BYTES)
    checked = check_checkpoint(SECOND)
    store._write_journal(checked, journal_documents(checked, CRASH_PART_BYTES))
    backend.raw("journal").delete_one({"_id": "0|2|1"})  # only a second writer could do this
    with pytest.raises(StoreError, match="checkpoint 2 of shard 0 is committed but unreadable"):
        backend.reopen_mongo().open_shard(0)
    assert _journal_state(backend) == (SECOND_PARTS - 1, True)
    assert store.load_months(KEYS) == {}


# -- store-specific behaviour ----------------------------------------------------------------


def test_sqlite_file_is_durable_wal_and_shared_by_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    store = SqliteStore(str(path))
    store.ensure_layout(2)
    script = textwrap.dedent(
        """
        import sys
        from tally.checkpoint.sqlite import SqliteStore
        from tally.checkpoint.store import Checkpoint
        from tally.wire.series import series_id
        from tally.wire.timeslots import month_first_hour

        path, shard = sys.argv[1], int(sys.argv[2])
        store = SqliteStore(path)
        sid = series_id("acme", "procs", {"shard": str(shard)})
        first = month_first_hour("2026-11")
        for ck in range(1, 31):
            store.write_checkpoint(Checkpoint(shard, ck, {(sid, "2026-11"): {first: 1}}, [sid]))
        store.close()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), str(shard)], env=env)
        for shard in range(2)
    ]
    deadline = time.monotonic() + 60
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        for doc in store.read_months("acme", "procs", {}, ["2026-11"]):
            assert sum(doc.hours.values()) == doc.ck  # never a torn read
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert _totals(store.read_months("acme", "procs", {}, ["2026-11"])) == {
        (series_id("acme", "procs", {"shard": str(s)}), "2026-11"): 30 for s in range(2)
    }
    assert [store.open_shard(s) for s in range(2)] == [ShardRecord(30, {})] * 2
    # Durable on return means the WAL is synced at every commit.
    assert store._conn().execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    store.close()

    import sqlite3

    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        raw.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.open_shard(0)


def test_memory_stores_are_isolated() -> None:
    first, second = MemoryStore(), MemoryStore()
    first.write_checkpoint(Checkpoint(0, 1, {(TW_POS, "2026-11"): {NOV_FIRST: 1}}, [TW_POS]))
    assert second.load_months([(TW_POS, "2026-11")]) == {}
    assert second.catalog("acme") == []
    assert second.open_shard(0) == ShardRecord(0, {})


def test_mongo_store_starts_without_a_server_and_fails_per_call() -> None:
    # Port 1: nothing listens. The URL's own timeout replaces the 5 s default.
    store = MongoStore("mongodb://127.0.0.1:1/somewhere?serverSelectionTimeoutMS=200")
    try:
        assert store.database.name == "somewhere"
        with pytest.raises(StoreError, match="127.0.0.1:1"):
            store.open_shard(0)
        with pytest.raises(StoreError, match="127.0.0.1:1"):
            store.write_checkpoint(Checkpoint(0, 1, {(TW_POS, "2026-11"): {NOV_FIRST: 1}}))
    finally:
        store.close()


# -- URLs -------------------------------------------------------------------------------------


def test_open_store_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = open_store("sqlite:///data/rel.db")
    absolute_path = tmp_path / "abs" / "abs.db"
    absolute = open_store("sqlite:///" + str(absolute_path))  # sqlite:////tmp/...
    try:
        assert isinstance(relative, SqliteStore)
        assert relative.path == str(tmp_path / "data" / "rel.db")
        assert (tmp_path / "data" / "rel.db").is_file()
        assert isinstance(absolute, SqliteStore)
        assert absolute.path == str(absolute_path)
        assert absolute_path.is_file()
    finally:
        relative.close()
        absolute.close()


def test_open_store_mongodb_and_memory_urls() -> None:
    mongo = open_store("mongodb://127.0.0.1:1")
    named = open_store("mongodb://user:pw@127.0.0.1:1,127.0.0.1:2/analytics?replicaSet=rs0")
    try:
        assert isinstance(mongo, MongoStore)
        assert mongo.database.name == "tally"
        assert isinstance(named, MongoStore)
        assert named.database.name == "analytics"
    finally:
        mongo.close()
        named.close()
    with pytest.raises(ValueError, match="invalid"):
        open_store("mongodb://")  # no host
    first, second = open_store("memory://"), open_store("memory://")
    assert isinstance(first, MemoryStore)
    assert first is not second


@pytest.mark.parametrize(
    "url",
    [
        "postgres://user:secret@db/tally",
        "sqlite://",
        "sqlite:///",
        "sqlite://relative.db",
        "sqlite:///tally.db?mode=ro",
        "memory://other",
        "tally.db",
        "",
    ],
)
def test_open_store_refuses_other_urls(url: str) -> None:
    with pytest.raises(ValueError) as info:
        open_store(url)
    message = str(info.value)
    assert "sqlite:///relative/path" in message and "mongodb://" in message
    assert "memory://" in message
    assert "secret" not in message
    if url.startswith("postgres"):
        assert "postgres://user:***@db/tally" in message
