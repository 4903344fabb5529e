"""Checkpoint runs in the SQLite store: writing them, folding them, reading through them.

A checkpoint written as a run (checkpoint/runs.py) is one row: durable at once,
and read exactly by every read of the store, which adds the deltas of the runs
not folded yet to what the slot rows hold. A fold writes some runs' summed
deltas into the slot and month rows and deletes the runs, in transactions of a
bounded number of slots so that no other shard waits long for the write lock;
``folds`` records how far a fold of several transactions got, so a fold that a
crash interrupted goes on from there (the runs it sums are the same ones, so
the sums are too).

Reads run in one transaction (WAL: one snapshot), so a fold committing beside
them is seen whole or not at all: a slot is never counted both in its row and
in its run.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import numpy as np

from tally.checkpoint.runs import (
    HOUR_BITS,
    MONTH_BITS,
    Merged,
    Run,
    decode,
    decode_docs,
    deltas_of,
    encode,
    merge,
)
from tally.checkpoint.slots import Slots
from tally.checkpoint.sqlite_schema import write_slot_rows
from tally.wire.timeslots import month_name

# A fold sums runs up to about this many slots (at least one run), kept in memory
# while its transactions write them.
FOLD_SET = 1 << 22
_HOURS = (1 << HOUR_BITS) - 1
# (maxed: a checkpoint written the direct way meanwhile may have a later ck)
_FOLD_MONTH = (
    "INSERT INTO months (s, month, ck) VALUES (?, ?, ?) "
    "ON CONFLICT (s, month) DO UPDATE SET ck = max(ck, excluded.ck)"
)


@dataclass(slots=True)
class Pending:
    """A run not folded yet, as a read sees it."""

    shard: int
    ck: int
    after: int  # slots (and documents) with keys up to this are folded already


class RunLog:
    """The runs of one SQLite file, with what this process keeps of them: each run's
    sorted document keys (to tell which runs a read needs) and the sums of the fold
    under way (so its transactions do not read the runs again)."""

    def __init__(self) -> None:
        self._docs: dict[tuple[int, int], np.ndarray] = {}
        self._fold: tuple[int, int, Merged] | None = None  # (shard, through, sums)

    # -- writes -------------------------------------------------------------------

    @staticmethod
    def write(conn: sqlite3.Connection, shard: int, ck: int, slots: Slots,
              ids: np.ndarray) -> None:
        """The checkpoint as one run row, in the caller's transaction."""
        conn.execute("INSERT INTO runs (shard, ck, slots, ids, months, counts, hours, vals) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (shard, ck) DO NOTHING",
                     (shard, ck, len(slots), *encode(slots, ids)))

    @staticmethod
    def unfolded(conn: sqlite3.Connection, shard: int) -> int:
        """Slots in the shard's runs (those a fold under way wrote already included)."""
        (n,) = conn.execute("SELECT coalesce(sum(slots), 0) FROM runs WHERE shard = ?",
                            (shard,)).fetchone()
        return int(n)

    def fold(self, conn: sqlite3.Connection, shard: int, budget: int) -> int:
        """Fold the shard's runs, about ``budget`` slot rows of them, in the caller's
        (write) transaction; the slots left in the shard's runs afterwards."""
        row = conn.execute("SELECT through, after FROM folds WHERE shard = ?",
                           (shard,)).fetchone()
        if row is None:
            through = self._fold_set(conn, shard)
            if through is None:
                return 0
            after = -1
        else:
            through, after = row
        merged = self._sums(conn, shard, through)
        a = int(np.searchsorted(merged.keys, after, side="right"))
        b = min(len(merged), a + max(1, budget))
        last = b >= len(merged)
        upto = np.iinfo(np.int64).max if last else int(merged.keys[b - 1])
        keys, values = merged.keys[a:b], merged.values[a:b]
        nonzero = values != 0
        keys, values = keys[nonzero], values[nonzero]
        write_slot_rows(conn, keys >> HOUR_BITS, keys & _HOURS, values)
        firsts = merged.doc_firsts()
        docs = merged.docs[(firsts > after) & (firsts <= upto)]
        mnos = (docs & ((1 << MONTH_BITS) - 1)).tolist()
        names = {m: month_name(m) for m in set(mnos)}  # (a few months, many documents)
        conn.executemany(_FOLD_MONTH, zip(
            (docs >> MONTH_BITS).tolist(), map(names.__getitem__, mnos),
            [through] * len(docs), strict=True))
        if last:
            conn.execute("DELETE FROM runs WHERE shard = ? AND ck <= ?", (shard, through))
            conn.execute("DELETE FROM folds WHERE shard = ?", (shard,))
            self._fold = None  # (should the commit fail, the next fold sums them again)
        else:
            conn.execute("INSERT INTO folds (shard, through, after) VALUES (?, ?, ?) "
                         "ON CONFLICT (shard) DO UPDATE SET through = excluded.through, "
                         "after = excluded.after", (shard, through, upto))
        (later,) = conn.execute("SELECT coalesce(sum(slots), 0) FROM runs WHERE shard = ? "
                                "AND ck > ?", (shard, through)).fetchone()
        return int(later) + len(merged) - b

    def _fold_set(self, conn: sqlite3.Connection, shard: int) -> int | None:
        """The last ck of the runs the next fold sums: the oldest, up to ``FOLD_SET``
        slots; one run alone if their sums would leave int64 (one run's deltas fit)."""
        total, through = 0, None
        for ck, slots in conn.execute(
                "SELECT ck, slots FROM runs WHERE shard = ? ORDER BY ck", (shard,)):
            if through is not None and total + slots > FOLD_SET:
                break
            total, through = total + slots, ck
        if through is None:
            return None
        merged = self._sums(conn, shard, through)
        if merged.values.dtype == object:
            self._fold = None
            (through,) = conn.execute("SELECT min(ck) FROM runs WHERE shard = ?",
                                      (shard,)).fetchone()
        return through

    def _sums(self, conn: sqlite3.Connection, shard: int, through: int) -> Merged:
        if self._fold is not None and self._fold[:2] == (shard, through):
            return self._fold[2]
        runs = [decode(shard, *row) for row in conn.execute(
            "SELECT ck, ids, months, counts, hours, vals FROM runs "
            "WHERE shard = ? AND ck <= ? ORDER BY ck", (shard, through))]
        merged = merge(runs)
        self._fold = (shard, through, merged)
        return merged

    # -- reads ----------------------------------------------------------------------

    def pending(self, conn: sqlite3.Connection) -> list[Pending]:
        """Every run not folded yet, in the caller's (read) transaction."""
        cursors = dict((s, (t, a)) for s, t, a in conn.execute(
            "SELECT shard, through, after FROM folds"))
        out = []
        for shard, ck in conn.execute("SELECT shard, ck FROM runs"):
            through, after = cursors.get(shard, (-1, -1))
            out.append(Pending(shard, ck, after if ck <= through else -1))
        alive = {(p.shard, p.ck) for p in out}
        for key in [k for k in self._docs if k not in alive]:
            del self._docs[key]
        return out

    def deltas(self, conn: sqlite3.Connection, pending: list[Pending],
               wanted: np.ndarray) -> list[tuple[int, dict[int, dict[int, int]]]]:
        """The unfolded deltas of the documents ``wanted`` (sorted document keys), per
        run that has any: (ck, document key -> hour -> delta)."""
        out = []
        for p in pending:
            docs = self._docs.get((p.shard, p.ck))
            if docs is None:
                ids, months = conn.execute("SELECT ids, months FROM runs WHERE shard = ? AND "
                                           "ck = ?", (p.shard, p.ck)).fetchone()
                docs = self._docs[(p.shard, p.ck)] = decode_docs(ids, months)
            if not len(docs):
                continue
            at = np.minimum(np.searchsorted(docs, wanted), len(docs) - 1)
            if not (docs[at] == wanted).any():
                continue
            row = conn.execute("SELECT ids, months, counts, hours, vals FROM runs WHERE "
                               "shard = ? AND ck = ?", (p.shard, p.ck)).fetchone()
            run: Run = decode(p.shard, p.ck, *row)
            found = deltas_of(run, wanted, p.after)
            if found:
                out.append((p.ck, found))
        return out
