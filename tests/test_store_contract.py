"""The store contract: every backend must count exactly the same, whatever happens.

One suite, parametrized over every store: SQLite on a temporary file,
mongomock (``memory://``) and SecantusDB, a real server speaking MongoDB's
wire protocol, so MongoStore's pymongo path is tested against real BSON
types and real duplicate-key and overflow errors. The numbers are what a user
would see in a query, so every assertion is exact.
"""

from __future__ import annotations

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

from checkpoint.memory import MemoryStore
from checkpoint.mongo import MongoStore
from checkpoint.sqlite import SqliteStore
from checkpoint.store import Checkpoint, LayoutMismatch, MonthDoc, Store, StoreError
from checkpoint.urls import open_store
from tests.secantus import REPO_ROOT, SecantusServer
from wire.series import InvalidSeries, SeriesKey, parse_series_id, series_id
from wire.timeslots import month_first_hour

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

# -- backends -------------------------------------------------------------------


@dataclass
class Backend:
    """A store under test, and what the suite needs to look behind it."""

    name: str
    open: Callable[[], Store]  # a new, independent handle on the same data
    persistent: bool  # whether a second handle sees the first one's data
    raw_months: Callable[[], Any] | None = None  # the months collection, Mongo-backed only
    bson_types: bool = False  # real BSON on the wire: numbers come back as Int64
    opened: list[Store] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.store = self.reopen()

    def reopen(self) -> Store:
        store = self.open()
        self.opened.append(store)
        return store


_database_numbers = itertools.count()


@pytest.fixture(params=["sqlite", "memory", "secantus"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    clients: list[pymongo.MongoClient] = []
    if request.param == "sqlite":
        path = tmp_path / "nested" / "dir" / "tally.db"  # parents do not exist yet
        b = Backend("sqlite", lambda: SqliteStore(str(path)), persistent=True)
    elif request.param == "memory":
        memory = MemoryStore()
        b = Backend(
            "memory",
            lambda: memory,
            persistent=False,
            raw_months=lambda: memory.database["months"],
        )
    else:
        server: SecantusServer = request.getfixturevalue("secantus")
        name = f"tally_test_{next(_database_numbers)}"
        url = server.url(name)

        def raw_months() -> Any:
            client = pymongo.MongoClient(url, serverSelectionTimeoutMS=5000)
            clients.append(client)
            return client[name]["months"]

        b = Backend(
            "secantus", lambda: MongoStore(url), True, raw_months=raw_months, bson_types=True
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
    key = (TW_POS, "2026-11")
    top, bottom = hour("2026-11", 3, 4), hour("2026-11", 4, 4)
    store.write_checkpoint(Checkpoint(0, 1, {key: {top: INT64_MAX - 1, bottom: INT64_MIN + 1}}))
    with pytest.raises(StoreError, match="int64|\\$inc"):
        store.write_checkpoint(Checkpoint(0, 2, {key: {top: 2}}))
    with pytest.raises(StoreError, match="int64|\\$inc"):
        store.write_checkpoint(Checkpoint(0, 3, {key: {bottom: -2}}))
    assert store.load_months([key]) == {
        key: MonthDoc(TW_POS, "2026-11", {top: INT64_MAX - 1, bottom: INT64_MIN + 1}, ck=1)
    }
    # MongoDB claims the id before touching documents and applies the others
    # of an unordered bulk; SQLite rolls the whole transaction back, claim
    # included. Both are safe: nothing of checkpoint 3 reached a document.
    assert store.open_shard(0) == (3 if backend.raw_months is not None else 1)
    store.write_checkpoint(Checkpoint(0, 4, {key: {top: 1, bottom: -1}}))
    assert store.load_months([key])[key].hours == {top: INT64_MAX, bottom: INT64_MIN}


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
    assert store.open_shard(0) == 0
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
    assert store.open_shard(0) == 1


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
    assert store.open_shard(0) == 5


# -- shards and layout --------------------------------------------------------------


def test_open_shard_returns_the_highest_claimed_checkpoint(backend: Backend) -> None:
    store = backend.store
    assert [store.open_shard(s) for s in range(3)] == [0, 0, 0]
    store.write_checkpoint(Checkpoint(1, 7, {(TW_POS, "2026-11"): {NOV_FIRST: 1}}))
    store.write_checkpoint(Checkpoint(1, 4, {(TW_POS, "2026-11"): {NOV_FIRST: 1}}))
    store.write_checkpoint(Checkpoint(2, 3, {}))  # nothing dirty still claims the id
    store.write_checkpoint(Checkpoint(2, 2**40, {}))
    assert [store.open_shard(s) for s in range(3)] == [0, 7, 2**40]
    if not backend.persistent:
        return
    store.close()
    reopened = backend.reopen()
    assert [reopened.open_shard(s) for s in range(3)] == [0, 7, 2**40]
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
    assert [store.open_shard(w) for w in range(writers)] == [rounds] * writers


# -- the MongoDB document layout ----------------------------------------------------------


def test_month_document_layout_is_exactly_the_designs(backend: Backend) -> None:
    if backend.raw_months is None:
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
    raw = backend.raw_months().find_one({"_id": f"{TW_POS}|2026-11"})
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


# -- store-specific behaviour ----------------------------------------------------------------


def test_sqlite_file_is_durable_wal_and_shared_by_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    store = SqliteStore(str(path))
    store.ensure_layout(2)
    script = textwrap.dedent(
        """
        import sys
        from checkpoint.sqlite import SqliteStore
        from checkpoint.store import Checkpoint
        from wire.series import series_id
        from wire.timeslots import month_first_hour

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
    assert [store.open_shard(s) for s in range(2)] == [30, 30]
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
    assert second.open_shard(0) == 0


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
