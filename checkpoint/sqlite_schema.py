"""The SQLite store's tables, its statements, and the migration of older files.

Layout 2: slots and months name their series by the series row's integer ``id``.
Layout 3 adds checkpoint runs (checkpoint/runs.py): ``runs`` holds each
checkpoint not yet folded into ``slots``, and ``folds`` a fold's progress when
it takes several transactions.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np

from tally.checkpoint.layout import check_sid
from tally.checkpoint.runs import HOUR_BITS
from tally.checkpoint.slots import Slots

# Layout 2: slots and months name their series by the series row's integer ``id``. With
# the id string as the key (layout 1) every slot row held it and every insert compared
# it: the rows were four times the size and a checkpoint's inserts nearly twice as slow.
# A file of layout 1 is migrated when a store opens it (``migrate``).
LAYOUT = 3
SCHEMA = (
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
    # A checkpoint kept whole until folded (checkpoint/runs.py): its documents (series
    # row ids, month numbers, slots per document) and its slots (hours, deltas) as
    # little-endian arrays.
    """CREATE TABLE IF NOT EXISTS runs (
        shard INTEGER NOT NULL,
        ck INTEGER NOT NULL,
        slots INTEGER NOT NULL,
        ids BLOB NOT NULL,
        months BLOB NOT NULL,
        counts BLOB NOT NULL,
        hours BLOB NOT NULL,
        vals BLOB NOT NULL,
        PRIMARY KEY (shard, ck)
    ) WITHOUT ROWID""",
    # A fold under way: the shard's runs up to ``through`` are being folded, and the
    # slots (and documents) with keys up to ``after`` are in the tables already.
    """CREATE TABLE IF NOT EXISTS folds (
        shard INTEGER PRIMARY KEY,
        through INTEGER NOT NULL,
        after INTEGER NOT NULL
    )""",
)

# meta 'peak' bounds the magnitude of every slot: the largest at the first start of
# layout 3, plus each checkpoint's largest delta since (sqlite.SqliteStore._bounded).
# Runs are written only while it stays below this.
PEAK_BOUND = 2**62

CLAIM = (
    "INSERT INTO shards (shard, ck) VALUES (?, ?) "
    "ON CONFLICT (shard) DO UPDATE SET ck = max(ck, excluded.ck)"
)
# Set, not maxed, and guarded like a month (see tally.checkpoint.layout.mark_update).
UPSERT_MARK = (
    "INSERT INTO producers (shard, producer, seq, ck) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (shard, producer) DO UPDATE SET seq = excluded.seq, ck = excluded.ck "
    "WHERE producers.ck < excluded.ck"
)
UPSERT_SERIES = (
    "INSERT INTO series (sid, tenant, metric, tags) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (sid) DO NOTHING"
)
UPSERT_SLOT = (
    "INSERT INTO slots (s, hour, value) VALUES (?, ?, ?) "
    "ON CONFLICT (s, hour) DO UPDATE SET value = value + excluded.value"
)
UPSERT_MONTH = (
    "INSERT INTO months (s, month, ck) VALUES (?, ?, ?) "
    "ON CONFLICT (s, month) DO UPDATE SET ck = excluded.ck"
)
MONTH_CK = "SELECT ck FROM months WHERE s = ? AND month = ?"
CHUNK = 1 << 16  # slot rows built at a time
IN_CHUNK = 500  # ids looked up per statement (SQLite's bound on parameters is far above)


def series_row(sid: str) -> tuple[str, str, str, str]:
    key = check_sid(sid)
    return (sid, key.tenant, key.metric, json.dumps(dict(key.tags)))


def row_ids(conn: sqlite3.Connection, sids: list[str]) -> dict[str, int]:
    """The series rows' ids of ``sids`` (those that have one)."""
    found: dict[str, int] = {}
    for a in range(0, len(sids), IN_CHUNK):
        part = sids[a:a + IN_CHUNK]
        found.update(conn.execute(
            f"SELECT sid, id FROM series WHERE sid IN ({','.join('?' * len(part))})",
            part).fetchall())
    return found


def write_slots(conn: sqlite3.Connection, slots: Slots, ids: np.ndarray) -> None:
    """Add the slots' deltas (``ids``: each document's series id)."""
    write_slot_rows(conn, np.repeat(ids, slots.counts), slots.hours, slots.values)


def write_slot_rows(conn: sqlite3.Connection, ids: np.ndarray, hours: np.ndarray,
                    values: np.ndarray) -> None:
    """Add deltas to slot rows (``ids``: each slot's series id), ``CHUNK`` rows at a
    time, in key order: a B-tree takes rows in its own order several times faster than
    scattered (a shard's order is its series numbers', not the ids')."""
    key = (ids << HOUR_BITS) | hours  # (any hour outside the key's bits: only an order)
    if len(key) > 1 and not (key[1:] > key[:-1]).all():
        order = np.argsort(key, kind="stable")
        ids, hours, values = ids[order], hours[order], values[order]
    for a in range(0, len(ids), CHUNK):
        conn.executemany(UPSERT_SLOT, zip(ids[a:a + CHUNK].tolist(),
                                          hours[a:a + CHUNK].tolist(),
                                          values[a:a + CHUNK].tolist(), strict=True))


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """Bring the file to this layout in the caller's transaction (all of it or, on any
    failure, none of it); a file of a newer layout is refused, not misread."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'layout'").fetchone()
    if row is not None and row[0] > LAYOUT:
        raise RuntimeError(f"the store {path} has layout {row[0]}, written by a newer tally "
                           f"than this one (layout {LAYOUT}): upgrade tally to open it")
    _layout_2(conn)
    if conn.execute("SELECT 1 FROM meta WHERE key = 'peak'").fetchone() is None:
        high, low = conn.execute("SELECT max(value), min(value) FROM slots").fetchone()
        peak = min(max(high or 0, -(low or 0)), PEAK_BOUND)
        conn.execute("INSERT INTO meta (key, value) VALUES ('peak', ?)", (peak,))
    conn.execute("INSERT INTO meta (key, value) VALUES ('layout', ?) "
                 "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (LAYOUT,))


def _layout_2(conn: sqlite3.Connection) -> None:
    """A file of layout 1 (slots and months keyed by the id string) to layout 2."""
    columns = [row[1] for row in conn.execute("PRAGMA table_info(slots)")]
    if "sid" not in columns:
        return
    conn.execute("ALTER TABLE series RENAME TO series_v1")
    conn.execute("ALTER TABLE slots RENAME TO slots_v1")
    conn.execute("ALTER TABLE months RENAME TO months_v1")
    conn.execute("DROP INDEX IF EXISTS series_tenant_metric")
    for statement in SCHEMA:
        conn.execute(statement)
    conn.execute("INSERT INTO series (sid, tenant, metric, tags) "
                 "SELECT sid, tenant, metric, tags FROM series_v1 ORDER BY sid")
    # (a document's series always has its row: written by the same checkpoint; any that
    # had not would be given one here rather than lose its counts)
    orphans = [sid for (sid,) in conn.execute(
        "SELECT DISTINCT sid FROM months_v1 WHERE sid NOT IN (SELECT sid FROM series) "
        "UNION SELECT DISTINCT sid FROM slots_v1 WHERE sid NOT IN (SELECT sid FROM series)")]
    conn.executemany(UPSERT_SERIES, [series_row(sid) for sid in orphans])
    conn.execute("INSERT INTO slots (s, hour, value) SELECT n.id, o.hour, o.value "
                 "FROM slots_v1 o JOIN series n ON n.sid = o.sid")
    conn.execute("INSERT INTO months (s, month, ck) SELECT n.id, o.month, o.ck "
                 "FROM months_v1 o JOIN series n ON n.sid = o.sid")
    for table in ("series_v1", "slots_v1", "months_v1"):
        conn.execute(f"DROP TABLE {table}")
