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

With ``runs=True`` (what shards open) a checkpoint is written as one run
instead of its slot and month rows (checkpoint/runs.py, checkpoint/sqlite_runs.py),
and ``fold`` writes runs into the rows later; every read adds what runs hold.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
from collections.abc import Container, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from tally.checkpoint.ids import RowIds
from tally.checkpoint.layout import check_columns, check_month, check_where
from tally.checkpoint.runs import MONTH_BITS, decode_docs, runnable
from tally.checkpoint.slots import Slots
from tally.checkpoint.sqlite_runs import Pending, RunLog
from tally.checkpoint.sqlite_schema import (
    CLAIM,
    IN_CHUNK,
    MONTH_CK,
    PEAK_BOUND,
    SCHEMA,
    UPSERT_MARK,
    UPSERT_MONTH,
    UPSERT_SERIES,
    migrate,
    row_ids,
    series_row,
    write_slots,
)
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
from tally.wire.timeslots import month_hours, month_number


class SqliteStore:
    """Store in the SQLite file at ``path``; parent directories are created.

    ``busy_timeout`` (seconds) is how long an operation waits for another
    process's transaction before failing with StoreError. ``runs``: checkpoints
    are written as runs, which the writer folds (``fold``) when it sees fit.
    """

    def __init__(self, path: str, busy_timeout: float = 30.0, runs: bool = False) -> None:
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
        self.runs = runs
        self._runs = RunLog()
        with self._errors("creating the schema"), self._transaction(write=True) as conn:
            for statement in SCHEMA:
                conn.execute(statement)
            migrate(conn, self.path)

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
    def _transaction(self, write: bool, fresh: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction on this thread's connection, rolled back on any error;
        ``fresh``: on a connection of its own, closed after it.

        Writes take the write lock up front (IMMEDIATE): a deferred
        transaction that reads then writes can fail with SQLITE_BUSY at the
        write without the busy timeout helping.
        """
        if self._closed:
            raise RuntimeError(f"SqliteStore({self.path!r}) is closed")
        conn = self._connect() if fresh else self._conn()
        try:
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
        finally:
            if fresh:
                conn.close()

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
        series_rows = [series_row(sid) for sid in checked.series]
        mark_rows = [
            (checked.shard, name, seq, checked.ck) for name, seq in checked.producers.items()
        ]
        # (runs: on a connection of its own, as SQLite keeps the buffers of a statement's
        # largest row while the statement is cached: a run's size, for each connection)
        with (
            self._errors(f"writing checkpoint {checked.ck} of shard {checked.shard}"),
            self._transaction(write=True, fresh=self.runs) as conn,
        ):
            # A shard's documents are written only by its checkpoints, each in one
            # transaction with the shard's own record (CLAIM): so when that record is
            # below this checkpoint, no document of the shard has taken it or a newer
            # one, and none needs its ck read (a read per document was a fifth of a wide
            # checkpoint). Otherwise each document is checked, as a retry needs (a fold
            # gives its documents the ck of its last run); a retry whose run is still
            # unfolded writes no deltas at all. (A store whose series could move between
            # shards must read them always.)
            row = conn.execute("SELECT ck FROM shards WHERE shard = ?",
                               (checked.shard,)).fetchone()
            conn.execute(CLAIM, (checked.shard, checked.ck))
            conn.executemany(UPSERT_SERIES, series_rows)
            ids = self._ids.get(slots.sids)
            unknown = list(dict.fromkeys(slots.sids[k] for k in np.flatnonzero(ids < 0)))
            found = row_ids(conn, unknown)
            if len(found) < len(unknown):  # (a document's series always has its row)
                conn.executemany(UPSERT_SERIES, [series_row(sid) for sid in unknown
                                                  if sid not in found])
                found = row_ids(conn, unknown)
            for k in np.flatnonzero(ids < 0).tolist():
                ids[k] = found[slots.sids[k]]
            retried_run = False
            if row is not None and row[0] >= checked.ck:  # a retry: once is all
                taken = np.zeros(len(ids), bool)
                mnos = np.array([month_number(m) for m in slots.months], np.int64)
                for ck, *run in conn.execute(
                        "SELECT ck, ids, months FROM runs WHERE shard = ? AND ck >= ?",
                        (checked.shard, checked.ck)).fetchall():
                    # (documents in a run of this checkpoint or a newer one took it; any
                    # others go the direct way, as the run's key is taken)
                    retried_run = retried_run or ck == checked.ck
                    taken |= np.isin(ids << MONTH_BITS | mnos, decode_docs(*run))
                for k, (s, month) in enumerate(zip(ids.tolist(), slots.months, strict=True)):
                    # a document that took this checkpoint or a newer one is left alone
                    if not taken[k]:
                        done = conn.execute(MONTH_CK, (s, month)).fetchone()
                        taken[k] = done is not None and done[0] >= checked.ck
                slots, ids = slots.select(~taken), ids[~taken]
            if (self._bounded(conn, slots) and self.runs and not retried_run
                    and runnable(slots, ids)):
                if len(slots.sids):
                    RunLog.write(conn, checked.shard, checked.ck, slots, ids)
            else:
                write_slots(conn, slots, ids)
                by_id = np.argsort(ids, kind="stable")  # (in key order, as the slots)
                months = slots.months
                conn.executemany(UPSERT_MONTH, zip(ids[by_id].tolist(),
                                                   [months[k] for k in by_id.tolist()],
                                                   itertools.repeat(checked.ck)))
            conn.executemany(UPSERT_MARK, mark_rows)
        # committed: the ids are for good (held by the checkpoint's own id strings, which
        # the shard keeps anyway, not by the copies SQLite returned)
        self._ids.add({sid: found[sid] for sid in unknown})

    @staticmethod
    def _bounded(conn: sqlite3.Connection, slots: Slots) -> bool:
        """Raise the store's bound on every slot's magnitude by this checkpoint's largest
        delta; whether it stays below ``PEAK_BOUND``.

        A run is added to its slots only when folded, too late to refuse a checkpoint
        that takes a slot out of int64 as the contract wants; while the bound holds, no
        sum of deltas can, and beyond it checkpoints are written the direct way, where
        SQLite checks each slot.
        """
        (peak,) = conn.execute("SELECT value FROM meta WHERE key = 'peak'").fetchone()
        values = slots.values
        largest = max(-int(values.min()), int(values.max())) if len(values) else 0
        peak = min(peak + largest, PEAK_BOUND)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'peak'", (peak,))
        return peak < PEAK_BOUND

    def fold(self, shard: int, budget: int) -> int:
        """Fold about ``budget`` slots of the shard's runs into its slot and month rows, in
        one transaction; the slots its runs hold afterwards (0: none left)."""
        with (
            self._errors(f"folding the runs of shard {shard}"),
            self._transaction(write=True) as conn,
        ):
            left = self._runs.fold(conn, shard, budget)
        if not left:  # the pages a fold read and wrote go back to the heap (then the system)
            conn.execute("PRAGMA shrink_memory")
        return left

    def unfolded(self, shard: int) -> int:
        """The slots the shard's runs hold."""
        with self._errors(f"counting the runs of shard {shard}"):
            return RunLog.unfolded(self._conn(), shard)

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

    def load_months(self, keys: list[MonthKey]) -> dict[MonthKey, MonthDoc]:
        # A backfill asks for hundreds of thousands of months at once, most of them
        # never stored: the series' row ids come from the cache or a statement per
        # ``IN_CHUNK`` series, and the months and their slots from statements per month
        # and chunk, not a statement per document.
        out: dict[MonthKey, MonthDoc] = {}
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return out
        for month in {month for _, month in wanted}:
            check_month(month)
        with (
            self._errors(f"loading {len(wanted)} month documents"),
            self._transaction(write=False) as conn,
        ):
            sids = list(dict.fromkeys(sid for sid, _ in wanted))
            cached = self._ids.get(sids)
            ids = dict(zip(sids, cached.tolist(), strict=True))
            ids.update(row_ids(conn, [sids[k] for k in np.flatnonzero(cached < 0).tolist()]))
            stored = [(sid, ids[sid], month) for sid, month in wanted if ids[sid] >= 0]
            by_month: dict[str, dict[int, str]] = {}
            for sid, s, month in stored:
                by_month.setdefault(month, {})[s] = sid
            for month, sid_of in by_month.items():
                self._read_docs(conn, month, sid_of, out)
            pending = self._runs.pending(conn)
            if pending:
                self._add_runs(conn, pending, out, stored)
        return out

    @staticmethod
    def _read_docs(conn: sqlite3.Connection, month: str, sid_of: dict[int, str],
                   out: dict[MonthKey, MonthDoc]) -> None:
        """Add to ``out`` the stored documents of ``month`` of the series ``sid_of``
        (row id -> sid) that have one."""
        first, end = month_hours(month)
        ids = list(sid_of)
        for a in range(0, len(ids), IN_CHUNK):
            part = ids[a:a + IN_CHUNK]
            marks = ",".join("?" * len(part))
            docs: dict[int, MonthDoc] = {}
            for s, ck in conn.execute(
                    f"SELECT s, ck FROM months WHERE month = ? AND s IN ({marks})",
                    (month, *part)):
                sid = sid_of[s]
                docs[s] = out[(sid, month)] = MonthDoc(sid=sid, month=month, hours={}, ck=ck)
            if not docs:
                continue
            held = list(docs)
            for s, hour, value in conn.execute(
                    f"SELECT s, hour, value FROM slots WHERE s IN ({','.join('?' * len(held))}) "
                    "AND hour >= ? AND hour < ? AND value != 0", (*held, first, end)):
                docs[s].hours[hour] = value

    def _add_runs(self, conn: sqlite3.Connection, pending: list[Pending],
                  out: dict[MonthKey, MonthDoc], wanted: list[tuple[str, int, str]]) -> None:
        """Add to ``out`` the runs' deltas of the ``wanted`` documents (sid, row id,
        month), creating those only runs hold."""
        if not wanted:
            return
        number_of = {month: month_number(month) for month in {month for *_, month in wanted}}
        by_key = {s << MONTH_BITS | number_of[month]: (sid, month) for sid, s, month in wanted}
        keys = np.array(sorted(by_key), np.int64)
        for ck, found in self._runs.deltas(conn, pending, keys):
            for key, deltas in found.items():
                sid, month = by_key[key]
                doc = out.get((sid, month))
                if doc is None:
                    doc = out[(sid, month)] = MonthDoc(sid=sid, month=month, hours={}, ck=ck)
                hours = doc.hours
                for hour, delta in deltas.items():
                    total = hours.get(hour, 0) + delta
                    if total:
                        hours[hour] = total
                    else:
                        hours.pop(hour, None)
                doc.ck = max(doc.ck, ck)

    def read_months(
        self, tenant: str, metric: str, where: dict[str, str], months: list[str],
        exclude: Container[MonthKey] = frozenset(),
    ) -> list[MonthDoc]:
        # A series id starts with "tenant|metric|"; the series of the metric are found by
        # the (tenant, metric) index, and their months by the months key.
        prefix = f"{check_tenant(tenant)}|{check_metric(metric)}|"
        where = check_where(where)
        months = [check_month(month) for month in dict.fromkeys(months)]
        out: dict[MonthKey, MonthDoc] = {}
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
            for month in months:
                rows = conn.execute(
                    "SELECT n.sid, n.id, m.ck FROM series n JOIN months m ON m.s = n.id "
                    "WHERE n.tenant = ? AND n.metric = ? AND m.month = ?" + tag_filter,
                    (tenant, metric, month, *tag_params),
                ).fetchall()
                self._read_docs(conn, month, {s: sid for sid, s, _ in rows
                                              if (sid, month) not in exclude}, out)
            pending = self._runs.pending(conn)
            if pending:
                series = conn.execute(
                    "SELECT n.sid, n.id FROM series n WHERE n.tenant = ? AND n.metric = ?"
                    + tag_filter, (tenant, metric, *tag_params)).fetchall()
                self._add_runs(conn, pending, out, [
                    (sid, s, month) for sid, s in series for month in months
                    if (sid, month) not in exclude])
        return sorted(out.values(), key=lambda d: (d.sid, d.month))

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
