"""One chunk of increments as one columnar batch: vectorised checks, per-line fallback.

``import_read`` gives a chunk's rows as pyarrow tables; this module turns
them into what the wire's columnar ``inc`` frame carries (a series table
plus ``i``/``ts``/``v`` columns), with the same verdicts, row by row, as the
per-line path (``import_formats`` parsing, then the client's validation):

- The series of a row is its number in the import's ``SeriesTable``
  (``import_series``): each distinct series of the file is validated once
  (``SeriesCache``, the client's own check) and msgpack-packed once, and a
  chunk finds its rows' series from pyarrow's dictionary encoding of its
  columns, without a Python step per row.
- ``ts`` (integers, or ISO 8601 strings of the common shapes, UTC when they
  have no offset) and ``value`` (default 1) are parsed and range-checked
  with numpy and pyarrow.
- Any row the vectorised path cannot vouch for -- a cell it does not parse,
  a series that fails validation, a ts out of range, a JSON line with
  ``null`` or an escape in it, a line too large -- goes to the per-line path,
  which either accepts it (then it joins the batch) or says what is wrong in
  the words the per-line import always used. Rows stay in file order, so the
  row a server refusal names maps to its line.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tally.client.validation import prepare_increment
from tally.cluster.import_formats import (
    GROWTH,
    CsvFile,
    RowError,
    Source,
    parse_ts,
)
from tally.cluster.import_read import Chunk, Piece, lines_with, read_chunk
from tally.cluster.import_series import SeriesTable, series_numbers
from tally.wire.vocabulary import ts_limit

__all__ = ["ChunkBatch", "build_batch", "parse_ts_column"]

_INT = r"^-?[0-9]{1,18}$"
_DATE = r"[1-9][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
_TIME = r"[T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?"
_ZONE = r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_NAIVE = f"^{_DATE}({_TIME})?$"
_AWARE = f"^{_DATE}{_TIME}{_ZONE}$"
_PACKER = msgpack.Packer(use_bin_type=True)


@dataclass
class ChunkBatch:
    """A chunk's accepted rows (file order) and its refused lines."""

    entries: np.ndarray  # each row's series, by its number in the import's SeriesTable
    ts: np.ndarray
    values: np.ndarray
    lines: np.ndarray  # each row's line number
    rejected: list[tuple[int, str]] = field(default_factory=list)
    rows: int = 0  # records read (accepted + rejected)


def build_batch(chunk: Chunk, src: Source, table: SeriesTable, *, chunk_bytes: int,
                overhead: int, threads: bool = True) -> ChunkBatch:
    """The chunk's batch; every record is either in it or in ``rejected``."""
    fmt = "csv" if isinstance(src, CsvFile) else "jsonl"
    header = src.header if isinstance(src, CsvFile) else None
    pieces, _ = read_chunk(chunk, fmt, header, threads)
    now = time.time()
    limit = ts_limit(now)
    sizes = chunk.stops - chunk.starts
    too_large = GROWTH * sizes + overhead > chunk_bytes
    odd = too_large.copy()
    if fmt == "jsonl":
        odd |= lines_with(chunk, b"null") | lines_with(chunk, b"\\u")
    odd |= lines_with(chunk, b"\x00")
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    rejected: list[tuple[int, str]] = []
    rows = 0
    slow = _Slow(chunk, src, table, now, chunk_bytes, overhead, rejected)
    for piece in pieces:
        if piece.records:
            parts.append(slow.records())
            rows += slow.rows
            continue
        rows += len(piece.rows)
        if piece.table is None:
            parts.append(slow.lines(piece.rows))
            continue
        entries, ts, values, ok = _vectorised(piece, header, table, limit)
        ok &= ~odd[piece.rows]
        if ok.all():
            parts.append((entries, ts, values, piece.rows))
            continue
        # Suspect rows take the per-line path; merged back in file order.
        back = slow.lines(piece.rows[~ok])
        e = np.concatenate([entries[ok], back[0]])
        r = np.concatenate([piece.rows[ok], back[3]])
        order = np.argsort(r, kind="stable")
        parts.append((e[order], np.concatenate([ts[ok], back[1]])[order],
                      np.concatenate([values[ok], back[2]])[order], r[order]))
    if parts:
        entries = np.concatenate([p[0] for p in parts]).astype(np.int64)
        ts = np.concatenate([p[1] for p in parts]).astype(np.int64)
        values = np.concatenate([p[2] for p in parts]).astype(np.int64)
        lines = np.concatenate([p[3] for p in parts]).astype(np.int64) + chunk.first_line
    else:
        entries = ts = values = lines = np.zeros(0, dtype=np.int64)
    rejected.sort()
    return ChunkBatch(entries, ts, values, lines, rejected, rows)


class _Slow:
    """The per-line path for some rows of a chunk: ``import_formats`` parsing, then the
    client's validation, exactly as ``tally import`` did row by row."""

    def __init__(self, chunk: Chunk, src: Source, table: SeriesTable, now: float,
                 chunk_bytes: int, overhead: int, rejected: list[tuple[int, str]]) -> None:
        self.chunk, self.src, self.table, self.now = chunk, src, table, now
        self.chunk_bytes, self.overhead = chunk_bytes, overhead
        self.rejected = rejected
        self.rows = 0

    def _one(self, line_no: int, payload: Any, size: int | None,
             out: list[tuple[bytes, int, int, int]], row: int) -> None:
        try:
            if size is not None and GROWTH * size + self.overhead > self.chunk_bytes:
                raise RowError(f"a record of {size:,} bytes is too large for one batch (at "
                               f"most about {(self.chunk_bytes - self.overhead) // GROWTH:,})")
            tenant, metric, value, ts, tags = self.src.parse(payload)  # type: ignore[misc]
            entry, ts, value = prepare_increment(self.table.cache, tenant, metric, value, ts,
                                                 tags, self.now)
            packed = _PACKER.pack(list(entry.wire))
        except (RowError, ValueError, TypeError) as e:
            self.rejected.append((line_no, str(e)))
        else:
            out.append((packed, ts, value, row))

    def lines(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        chunk = self.chunk
        out: list[tuple[bytes, int, int, int]] = []
        is_csv = isinstance(self.src, CsvFile)
        for k in rows.tolist():
            raw = chunk.line(k)
            payload: Any = raw
            if is_csv:
                try:
                    payload = next(csv.reader([raw.decode("utf-8", "surrogateescape")]))
                except csv.Error as e:
                    payload = RowError(f"not CSV: {e}")
            self._one(chunk.first_line + k, payload, len(raw), out, k)
        return _columns(out, self.table)

    def records(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The whole chunk by the per-record reader (CSV records over several lines)."""
        chunk = self.chunk
        out: list[tuple[bytes, int, int, int]] = []
        prev = 0
        for line_no, end, payload in self.src.records(io.BytesIO(chunk.data), 0,
                                                      chunk.first_line):
            self.rows += 1
            self._one(line_no, payload, end - prev, out, line_no - chunk.first_line)
            prev = end
        return _columns(out, self.table)


def _columns(out: list[tuple[bytes, int, int, int]], table: SeriesTable
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    entries = table.numbers([o[0] for o in out])
    if not out:
        z = np.zeros(0, dtype=np.int64)
        return entries, z, z, z
    a = np.array([o[1:] for o in out], dtype=np.int64)
    return entries, a[:, 0], a[:, 1], a[:, 2]


# ------------------------------------------------------------------- vectorised


def _vectorised(piece: Piece, header: list[str] | None, table: SeriesTable, limit: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Series numbers, ts, values and which rows the vectorised path vouches for."""
    t = piece.table
    assert t is not None
    n = t.num_rows
    entries, ok = series_numbers(t, header, table)
    ts, ts_ok = _ts(t, header is not None, n)
    ok &= ts_ok & (ts >= 0) & (ts <= limit)
    values, v_ok = _values(t, header is not None, n)
    ok &= v_ok
    return entries, ts, values, ok


def _np(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(a.to_numpy(zero_copy_only=False))


def _ts(t: pa.Table, is_csv: bool, n: int) -> tuple[np.ndarray, np.ndarray]:
    if "ts" not in t.column_names:
        return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    col = t.column("ts").combine_chunks()
    if pa.types.is_integer(col.type):
        valid = ~_np(col.is_null())
        return _np(col.fill_null(0)).astype(np.int64), valid
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return parse_ts_column(col)
    return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)


def parse_ts_column(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Unix seconds of string cells, and which were parsed; the rest are for ``parse_ts``.

    Integers, and ISO 8601 datetimes of the common shapes (``YYYY-MM-DD``, then
    optionally ``[T ]hh:mm[:ss[.ffffff]]``, then optionally ``Z`` or ``±hh:mm``;
    no offset is UTC), the same seconds ``parse_ts`` gives (fractions floored).
    """
    n = len(col)
    out = np.zeros(n, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    try:
        out[:] = _np(pc.cast(col, pa.int64()))
        ok[:] = ~_np(col.is_null())
        return out, ok
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass  # not all integers: each cell is tried by shape below; what none parses is
        # left not ok, and the per-line path names its line (nothing is dropped)
    for pattern, unit in ((_INT, None), (_NAIVE, pa.timestamp("s")),
                          (_AWARE, pa.timestamp("s", tz="UTC"))):
        mask = _np(pc.fill_null(pc.match_substring_regex(col, pattern), False)).astype(bool)
        if not mask.any():
            continue
        cells = col.filter(pa.array(mask))
        try:
            if unit is None:
                parsed = pc.cast(cells, pa.int64())
            else:
                whole = pc.replace_substring_regex(cells, r"\.[0-9]+", "")
                parsed = pc.cast(pc.cast(whole, unit), pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue  # e.g. 2026-02-30: the per-line path says what is wrong
        out[mask] = _np(parsed)
        ok[mask] = True
    return out, ok


def _values(t: pa.Table, is_csv: bool, n: int) -> tuple[np.ndarray, np.ndarray]:
    if "value" not in t.column_names:
        return np.ones(n, dtype=np.int64), np.ones(n, dtype=bool)
    col = t.column("value").combine_chunks()
    if pa.types.is_null(col.type):
        return np.ones(n, dtype=np.int64), np.ones(n, dtype=bool)
    if pa.types.is_integer(col.type):  # JSON: null is absent (explicit nulls went slow)
        return _np(col.fill_null(1)).astype(np.int64), np.ones(n, dtype=bool)
    if not is_csv:
        return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool)
    empty = _np(pc.equal(col, "")).astype(bool)
    out = np.ones(n, dtype=np.int64)
    ok = empty.copy()
    mask = _np(pc.match_substring_regex(col, _INT)).astype(bool)
    if mask.any():
        out[mask] = _np(pc.cast(col.filter(pa.array(mask)), pa.int64()))
        ok |= mask
    return out, ok


__all__ += ["parse_ts"]  # the per-line ts parser, beside its vectorised twin
