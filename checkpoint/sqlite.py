"""Embedded store in one SQLite file, shared by the shard and gateway processes.

Durability: WAL with ``synchronous=FULL`` syncs the log at every commit, so a
returned ``write_checkpoint`` survives a power cut, not just a process crash.
Concurrency: several processes open the file at once (WAL lets readers run
beside the one writer) and several threads of one process use the store, so
each thread gets its own connection and every write is one short
``BEGIN IMMEDIATE`` transaction that waits (``busy_timeout``) rather than
failing when another process holds the write lock.

Hours are stored as absolute hour indexes; a "month document" is its
``months`` row (which carries the ``ck`` guard) plus the ``slots`` rows of
the series inside the month's hours, both naming the series by its ``series``
row's integer id. Reads run in one transaction so a
document's ``ck`` and its counts come from the same snapshot: a query merging
live deltas newer than ``ck`` then counts every increment exactly once.

Atomicity needs no journal here, unlike MongoDB: a checkpoint (its claim,
catalog rows, slot and month rows, and producer marks) is one SQLite
transaction, so after a crash at any point either all of it is in the file or
none of it is, and ``open_shard`` has nothing to finish.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import threading
from collections.abc import Container, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from tally.checkpoint.ids import RowIds
from tally.checkpoint.layout import (
    check_columns,
    check_month,
    check_sid,
    check_where,
)
from tally.checkpoint.slots import Slots
from tally.checkpoint.store import (
    Checkpoint,
    LayoutMismatch,
    MonthDoc,
    MonthKey,
    ShardRecord,
    StoreError,
)
from tally.wire.series import (
    SeriesKey,
    check_metric,
    check_tenant,
    format_series_id,
    parse_series_id,
)
from tally.wire.timeslots import month_hours

# Layout 2: slots and months name their series by the series row's integer ``id``. With
# the id string as the key (layout 1) every slot row held it and every insert compared
# it: the rows were four times the size and a checkpoint's inserts nearly twice as slow.
# A file of layout 1 is migrated when a store opens it (``_migrate``).
LAYOUT = 2
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS series (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: processes cache ids
        sid TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        metric TEXT NOT NULL,
        tags TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS series_tenant_metric ON series (tenant, metric)",
    # SQLite silently turns an integer overflow into a float; the CHECK makes
    # it an error instead, as int64 counters must never wrap or go inexact.
    """CREATE TABLE IF NOT EXISTS slots (
        s INTEGER NOT NULL,
        hour INTEGER NOT NULL,
        value INTEGER NOT NULL CHECK (typeof(value) = 'integer'),
        PRIMARY KEY (s, hour)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS months (
        s INTEGER NOT NULL,
        month TEXT NOT NULL,
        ck INTEGER NOT NULL,
        PRIMARY KEY (s, month)
    ) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS shards (shard INTEGER PRIMARY KEY, ck INTEGER NOT NULL)",
    # Each producer's mark on a shard: the highest seq applied there as of
    # checkpoint ck, the latest checkpoint of the shard that carried it.
    """CREATE TABLE IF NOT EXISTS producers (
        shard INTEGER NOT NULL,
        producer TEXT NOT NULL,
        seq INTEGER NOT NULL,
        ck INTEGER NOT NULL,
        PRIMARY KEY (shard, producer)
    ) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)",
)

_CLAIM = (
    "INSERT INTO shards (shard, ck) VALUES (?, ?) "
    "ON CONFLICT (shard) DO UPDATE SET ck = max(ck, excluded.ck)"
)
# Set, not maxed, and guarded like a month (see tally.checkpoint.layout.mark_update).
_UPSERT_MARK = (
    "INSERT INTO producers (shard, producer, seq, ck) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (shard, producer) DO UPDATE SET seq = excluded.seq, ck = excluded.ck "
    "WHERE producers.ck < excluded.ck"
)
_UPSERT_SERIES = (
    "INSERT INTO series (sid, tenant, metric, tags) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (sid) DO NOTHING"
)
_UPSERT_SLOT = (
    "INSERT INTO slots (s, hour, value) VALUES (?, ?, ?) "
    "ON CONFLICT (s, hour) DO UPDATE SET value = value + excluded.value"
)
_UPSERT_MONTH = (
    "INSERT INTO months (s, month, ck) VALUES (?, ?, ?) "
    "ON CONFLICT (s, month) DO UPDATE SET ck = excluded.ck"
)
_MONTH_CK = "SELECT ck FROM months WHERE s = ? AND month = ?"
_CHUNK = 1 << 16  # slot rows built at a time
_IN_CHUNK = 500  # ids looked up per statement (SQLite's bound on parameters is far above)
_MONTH_SLOTS = (
    "SELECT hour, value FROM slots WHERE s = ? AND hour >= ? AND hour < ? AND value != 0"
)


def _series_row(sid: str) -> tuple[str, str, str, str]:
    key = check_sid(sid)
    return (sid, key.tenant, key.metric, json.dumps(dict(key.tags)))


def _ids(conn: sqlite3.Connection, sids: list[str]) -> dict[str, int]:
    """The series rows' ids of ``sids`` (those that have one)."""
    found: dict[str, int] = {}
    for a in range(0, len(sids), _IN_CHUNK):
        part = sids[a:a + _IN_CHUNK]
        found.update(conn.execute(
            f"SELECT sid, id FROM series WHERE sid IN ({','.join('?' * len(part))})",
            part).fetchall())
    return found


def _write_slots(conn: sqlite3.Connection, slots: Slots, ids: np.ndarray) -> None:
    """Add the slots' deltas (``ids``: each document's series id), ``_CHUNK`` rows at a
    time, in key order: a B-tree takes rows in its own order several times faster than
    scattered (the shard's order is its series numbers', not the ids')."""
    id_of_slot, hours, values = np.repeat(ids, slots.counts), slots.hours, slots.values
    key = (id_of_slot << 24) | hours  # (hours since 1970 below 2**24; any others: only an order)
    if len(key) > 1 and not (key[1:] > key[:-1]).all():
        order = np.argsort(key, kind="stable")
        id_of_slot, hours, values = id_of_slot[order], hours[order], values[order]
    for a in range(0, len(slots), _CHUNK):
        conn.executemany(_UPSERT_SLOT, zip(id_of_slot[a:a + _CHUNK].tolist(),
                                           hours[a:a + _CHUNK].tolist(),
                                           values[a:a + _CHUNK].tolist(), strict=True))


def _migrate(conn: sqlite3.Connection) -> None:
    """A file of layout 1 (slots and months keyed by the id string) to layout 2, in the
    caller's transaction: all of it or, on any failure, none of it."""
    columns = [row[1] for row in conn.execute("PRAGMA table_info(slots)")]
    if "sid" not in columns:
        return
    conn.execute("ALTER TABLE series RENAME TO series_v1")
    conn.execute("ALTER TABLE slots RENAME TO slots_v1")
    conn.execute("ALTER TABLE months RENAME TO months_v1")
    conn.execute("DROP INDEX IF EXISTS series_tenant_metric")
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.execute("INSERT INTO series (sid, tenant, metric, tags) "
                 "SELECT sid, tenant, metric, tags FROM series_v1 ORDER BY sid")
    # (a document's series always has its row: written by the same checkpoint; any that
    # had not would be given one here rather than lose its counts)
    orphans = [sid for (sid,) in conn.execute(
        "SELECT DISTINCT sid FROM months_v1 WHERE sid NOT IN (SELECT sid FROM series) "
        "UNION SELECT DISTINCT sid FROM slots_v1 WHERE sid NOT IN (SELECT sid FROM series)")]
    conn.executemany(_UPSERT_SERIES, [_series_row(sid) for sid in orphans])
    conn.execute("INSERT INTO slots (s, hour, value) SELECT n.id, o.hour, o.value "
                 "FROM slots_v1 o JOIN series n ON n.sid = o.sid")
    conn.execute("INSERT INTO months (s, month, ck) SELECT n.id, o.month, o.ck "
                 "FROM months_v1 o JOIN series n ON n.sid = o.sid")
    for table in ("series_v1", "slots_v1", "months_v1"):
        conn.execute(f"DROP TABLE {table}")


class SqliteStore:
    """Store in the SQLite file at ``path``; parent directories are created.

    ``busy_timeout`` (seconds) is how long an operation waits for another
    process's transaction before failing with StoreError.
    """

    def __init__(self, path: str, busy_timeout: float = 30.0) -> None:
        self.path = os.path.abspath(path)
        self._busy_ms = int(busy_timeout * 1000)
        self._local = threading.local()
        # Every connection with its thread: close() must reach the connections
        # of other threads, and those of finished threads are closed rather
        # than leaked when the next connection is made.
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._registry_lock = threading.Lock()
        self._closed = False
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # sid -> series row id, for the rows this process saw committed (AUTOINCREMENT:
        # an id is never given to another series)
        self._ids = RowIds()
        with self._errors("creating the schema"), self._transaction(write=True) as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            _migrate(conn)

    # -- connections and transactions ------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are begun explicitly, so each is
        # exactly as long as the code below makes it. check_same_thread=False
        # only so close() may close it from another thread; it is used by one.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise RuntimeError(f"SqliteStore({self.path!r}) is closed")
        conn = self._connect()
        with self._registry_lock:
            alive = []
            for thread, other in self._connections:
                if thread.is_alive():
                    alive.append((thread, other))
                else:
                    other.close()
            alive.append((threading.current_thread(), conn))
            self._connections = alive
        self._local.conn = conn
        return conn

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction on this thread's connection, rolled back on any error.

        Writes take the write lock up front (IMMEDIATE): a deferred
        transaction that reads then writes can fail with SQLITE_BUSY at the
        write without the busy timeout helping.
        """
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as rollback_error:
                    e.add_note(f"rolling back also failed: {rollback_error}")
            raise

    @contextmanager
    def _errors(self, operation: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError as e:
            raise StoreError(
                f"SQLite {self.path}: {operation} refused: {e} "
                "(a count would leave int64; nothing of this operation was written)"
                if "typeof(value)" in str(e)
                else f"SQLite {self.path}: {operation} refused: {e}"
            ) from e
        except sqlite3.Error as e:
            raise StoreError(f"SQLite {self.path}: {operation} failed: {e}") from e

    # -- writes ---------------------------------------------------------------

    def write_checkpoint(self, cp: Checkpoint) -> None:
        """The whole checkpoint in one transaction: all of it is durable, or none of it.

        Month rows and producer marks skip those whose ``ck`` is already at
        least this checkpoint's, so a retry changes nothing and an older
        checkpoint never overrides a newer one.
        """
        # Validate everything before the transaction: a bad checkpoint raises
        # ValueError and leaves the store as it was. The deltas go in by column,
        # a chunk of rows at a time (rows built for a large checkpoint all at once
        # would leave the shard's memory resident long after the write).
        checked, slots = check_columns(cp)
        series_rows = [_series_row(sid) for sid in checked.series]
        mark_rows = [
            (checked.shard, name, seq, checked.ck) for name, seq in checked.producers.items()
        ]
        with (
            self._errors(f"writing checkpoint {checked.ck} of shard {checked.shard}"),
            self._transaction(write=True) as conn,
        ):
            # A shard's documents are written only by its checkpoints, each in one
            # transaction with the shard's own record (_CLAIM): so when that record is
            # below this checkpoint, no document of the shard has taken it or a newer
            # one, and none needs its ck read (a read per document was a fifth of a wide
            # checkpoint). Otherwise each document is checked, as a retry needs.
            # (A store whose series could move between shards must read them always.)
            row = conn.execute("SELECT ck FROM shards WHERE shard = ?",
                               (checked.shard,)).fetchone()
            conn.execute(_CLAIM, (checked.shard, checked.ck))
            conn.executemany(_UPSERT_SERIES, series_rows)
            ids = self._ids.get(slots.sids)
            unknown = list(dict.fromkeys(slots.sids[k] for k in np.flatnonzero(ids < 0)))
            found = _ids(conn, unknown)
            if len(found) < len(unknown):  # (a document's series always has its row)
                conn.executemany(_UPSERT_SERIES, [_series_row(sid) for sid in unknown
                                                  if sid not in found])
                found = _ids(conn, unknown)
            for k in np.flatnonzero(ids < 0).tolist():
                ids[k] = found[slots.sids[k]]
            if row is not None and row[0] >= checked.ck:
                taken = [
                    (done := conn.execute(_MONTH_CK, (int(s), month)).fetchone()) is not None
                    and done[0] >= checked.ck
                    for s, month in zip(ids.tolist(), slots.months, strict=True)
                ]  # a document that took this checkpoint or a newer one is left alone
                keep = ~np.array(taken, dtype=bool).reshape(-1)
                slots, ids = slots.select(keep), ids[keep]
            _write_slots(conn, slots, ids)
            by_id = np.argsort(ids, kind="stable")  # (in key order, as the slots)
            months = slots.months
            conn.executemany(_UPSERT_MONTH, zip(ids[by_id].tolist(),
                                                [months[k] for k in by_id.tolist()],
                                                itertools.repeat(checked.ck)))
            conn.executemany(_UPSERT_MARK, mark_rows)
        # committed: the ids are for good (held by the checkpoint's own id strings, which
        # the shard keeps anyway, not by the copies SQLite returned)
        self._ids.add({sid: found[sid] for sid in unknown})

    def ensure_layout(self, shards: int) -> None:
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ValueError(f"shard count must be a positive integer, not {shards!r}")
        with self._errors("recording the shard layout"), self._transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('shards', ?) ON CONFLICT (key) DO NOTHING",
                (shards,),
            )
            (recorded,) = conn.execute("SELECT value FROM meta WHERE key = 'shards'").fetchone()
        if recorded != shards:
            raise LayoutMismatch(
                f"the store {self.path} was created with {recorded} shards, not {shards}; "
                f"start with --shards {recorded} or migrate it"
            )

    # -- reads ----------------------------------------------------------------

    def open_shard(self, shard: int) -> ShardRecord:
        """The shard's record; there is nothing to recover (see the module docstring)."""
        with (
            self._errors(f"reading the record of shard {shard}"),
            self._transaction(write=False) as conn,
        ):
            row = conn.execute("SELECT ck FROM shards WHERE shard = ?", (shard,)).fetchone()
            marks = conn.execute(
                "SELECT producer, seq FROM producers WHERE shard = ?", (shard,)
            ).fetchall()
        return ShardRecord(ck=row[0] if row else 0, producers=dict(marks))

    @staticmethod
    def _month_doc(conn: sqlite3.Connection, sid: str, s: int, month: str, ck: int
                   ) -> MonthDoc:
        first, end = month_hours(month)
        hours = dict(conn.execute(_MONTH_SLOTS, (s, first, end)).fetchall())
        return MonthDoc(sid=sid, month=month, hours=hours, ck=ck)

    def load_months(self, keys: list[MonthKey]) -> dict[MonthKey, MonthDoc]:
        out: dict[MonthKey, MonthDoc] = {}
        with (
            self._errors(f"loading {len(keys)} month documents"),
            self._transaction(write=False) as conn,
        ):
            for sid, month in dict.fromkeys(keys):
                row = conn.execute(
                    "SELECT n.id, m.ck FROM series n JOIN months m ON m.s = n.id "
                    "WHERE n.sid = ? AND m.month = ?", (sid, check_month(month))
                ).fetchone()
                if row is not None:
                    out[(sid, month)] = self._month_doc(conn, sid, row[0], month, row[1])
        return out

    def read_months(
        self, tenant: str, metric: str, where: dict[str, str], months: list[str],
        exclude: Container[MonthKey] = frozenset(),
    ) -> list[MonthDoc]:
        # A series id starts with "tenant|metric|"; the series of the metric are found by
        # the (tenant, metric) index, and their months by the months key.
        prefix = f"{check_tenant(tenant)}|{check_metric(metric)}|"
        where = check_where(where)
        out: list[MonthDoc] = []
        with (
            self._errors(f"reading {tenant}/{metric} for {len(months)} months"),
            self._transaction(write=False) as conn,
        ):
            # Each where pair is an exact ",k=v," item of the id's (escaped, sorted)
            # tag list, so SQLite filters without a row reaching Python.
            tag_filter = "".join(" AND instr(',' || substr(n.sid, ?) || ',', ?) > 0"
                                 for _ in where)
            tag_params: list[Any] = []
            for k, v in where.items():
                tag_params += [len(prefix) + 1, f",{format_series_id('', '', ((k, v),))[2:]},"]
            for month in dict.fromkeys(months):
                rows = conn.execute(
                    "SELECT n.sid, n.id, m.ck FROM series n JOIN months m ON m.s = n.id "
                    "WHERE n.tenant = ? AND n.metric = ? AND m.month = ?" + tag_filter,
                    (tenant, metric, check_month(month), *tag_params),
                ).fetchall()
                for sid, s, ck in rows:
                    if (sid, month) not in exclude:
                        out.append(self._month_doc(conn, sid, s, month, ck))
        out.sort(key=lambda d: (d.sid, d.month))
        return out

    def catalog(self, tenant: str, metric: str | None = None) -> list[SeriesKey]:
        sql, params = "SELECT sid FROM series WHERE tenant = ?", [check_tenant(tenant)]
        if metric is not None:
            sql, params = sql + " AND metric = ?", [*params, check_metric(metric)]
        with self._errors(f"reading the catalog of {tenant}"):
            rows = self._conn().execute(sql + " ORDER BY sid", params).fetchall()
        return [parse_series_id(sid) for (sid,) in rows]

    def close(self) -> None:
        """Close every thread's connection; the store cannot be used afterwards."""
        with self._registry_lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for _thread, conn in connections:
            conn.close()
        self._local = threading.local()
