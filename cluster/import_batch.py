"""One chunk of increments as one columnar batch: vectorised checks, per-line fallback.

``import_read`` gives a chunk's rows as pyarrow tables; this module turns
them into what the wire's columnar ``inc`` frame carries (a series table
plus ``i``/``ts``/``v`` columns), with the same verdicts, row by row, as the
per-line path (``import_formats`` parsing, then the client's validation):

- The series of a row is the tuple of its tenant, metric and tag cells,
  joined into one string per row and dictionary-encoded by pyarrow, so each
  *distinct* series of a chunk is looked at once in Python, and each
  distinct series of the file is validated once (``SeriesCache``, the
  client's own check) and msgpack-packed once (``SeriesTable``).
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

from tally.client.validation import SeriesCache, prepare_increment
from tally.cluster.import_formats import (
    GROWTH,
    CsvFile,
    RowError,
    Source,
    csv_tags,
    parse_ts,
)
from tally.cluster.import_read import Chunk, Piece, lines_with, read_chunk
from tally.wire.series import MAX_TAG_VALUE, MAX_TAGS, METRIC_RE, TAG_KEY_RE, TENANT_RE
from tally.wire.vocabulary import ts_limit

__all__ = ["ChunkBatch", "SeriesTable", "build_batch", "parse_ts_column"]

SEP = "\x00"
_INT = r"^-?[0-9]{1,18}$"
_DATE = r"[1-9][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
_TIME = r"[T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?"
_ZONE = r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
_NAIVE = f"^{_DATE}({_TIME})?$"
_AWARE = f"^{_DATE}{_TIME}{_ZONE}$"
_PACKER = msgpack.Packer(use_bin_type=True)


class SeriesTable:
    """What the import validated once: CSV ``tags`` cells' series, and tag key names.

    Most series are validated and packed with pyarrow, column by column
    (``_packed_series``); a CSV ``tags`` cell (a JSON object) is parsed in
    Python once per distinct key (``by_text``: its packed entry, or None when
    the series is invalid and its rows go to the per-line path).
    """

    def __init__(self) -> None:
        self.cache = SeriesCache(limit=1 << 20)
        self.by_text: dict[tuple[tuple[str, ...], str], bytes | None] = {}
        self.keys: dict[str, bool] = {}  # tag key -> valid

    def packed(self, tenant: Any, metric: Any, tags: Any) -> bytes:
        """The series' entry, msgpack-packed; raises what the client's validation raises."""
        return _PACKER.pack(list(self.cache.lookup(tenant, metric, tags).wire))

    def key_ok(self, key: str) -> bool:
        ok = self.keys.get(key)
        if ok is None:
            ok = self.keys[key] = TAG_KEY_RE.fullmatch(key) is not None
        return ok

    @staticmethod
    def encode(entries: pa.Array) -> tuple[list[bytes], np.ndarray]:
        """The distinct packed entries of these rows, and each row's index among them
        (the client numbers them in its series table: TallyClient.send_columnar)."""
        enc = pc.dictionary_encode(entries)
        index = enc.indices.to_numpy(zero_copy_only=False).astype(np.uint32)
        return enc.dictionary.to_pylist(), index


@dataclass
class ChunkBatch:
    """A chunk's accepted rows (file order) and its refused lines."""

    entries: pa.Array  # each row's series, a packed msgpack entry (binary)
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
    parts: list[tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]] = []
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
        keep = pa.array(ok)
        e = pa.concat_arrays([entries.filter(keep), back[0]])
        r = np.concatenate([piece.rows[ok], back[3]])
        order = np.argsort(r, kind="stable")
        parts.append((e.take(pa.array(order)), np.concatenate([ts[ok], back[1]])[order],
                      np.concatenate([values[ok], back[2]])[order], r[order]))
    if parts:
        entries = pa.concat_arrays([p[0] for p in parts])
        ts = np.concatenate([p[1] for p in parts]).astype(np.int64)
        values = np.concatenate([p[2] for p in parts]).astype(np.int64)
        lines = np.concatenate([p[3] for p in parts]).astype(np.int64) + chunk.first_line
    else:
        entries = pa.array([], pa.binary())
        ts = values = lines = np.zeros(0, dtype=np.int64)
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

    def lines(self, rows: np.ndarray) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]:
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
        return _columns(out)

    def records(self) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]:
        """The whole chunk by the per-record reader (CSV records over several lines)."""
        chunk = self.chunk
        out: list[tuple[bytes, int, int, int]] = []
        prev = 0
        for line_no, end, payload in self.src.records(io.BytesIO(chunk.data), 0,
                                                      chunk.first_line):
            self.rows += 1
            self._one(line_no, payload, end - prev, out, line_no - chunk.first_line)
            prev = end
        return _columns(out)


def _columns(out: list[tuple[bytes, int, int, int]]
             ) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]:
    entries = pa.array([o[0] for o in out], pa.binary())
    if not out:
        z = np.zeros(0, dtype=np.int64)
        return entries, z, z, z
    a = np.array([o[1:] for o in out], dtype=np.int64)
    return entries, a[:, 0], a[:, 1], a[:, 2]


# ------------------------------------------------------------------- vectorised


def _vectorised(piece: Piece, header: list[str] | None, table: SeriesTable, limit: int
                ) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]:
    """Series entries, ts, values and which rows the vectorised path vouches for."""
    t = piece.table
    assert t is not None
    n = t.num_rows
    if header is not None and "tags" in header:
        entries, ok = _series_by_key(t, header, table)
    else:
        entries, ok = _packed_series(t, header, table)
    ts, ts_ok = _ts(t, header is not None, n)
    ok &= ts_ok & (ts >= 0) & (ts <= limit)
    values, v_ok = _values(t, header is not None, n)
    ok &= v_ok
    return entries, ts, values, ok


def _str_header(col: pa.Array) -> pa.Array:
    """msgpack's str16 header of each cell (3 bytes: valid for any length we accept)."""
    lengths = _np(pc.binary_length(col)).astype(np.int64)
    h = np.empty((len(col), 3), dtype=np.uint8)
    h[:, 0] = 0xDA
    h[:, 1] = (lengths >> 8) & 0xFF
    h[:, 2] = lengths & 0xFF
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(3), len(col), [None, pa.py_buffer(h.tobytes())]).cast(pa.binary())


def _packed(col: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(_str_header(col), col.cast(pa.binary()), b"")


def _packed_series(t: pa.Table, header: list[str] | None, table: SeriesTable
                   ) -> tuple[pa.Array, np.ndarray]:
    """Each row's series entry, packed, and whether it is valid -- all with pyarrow.

    The checks are ``tally.wire.series``'s: the tenant and metric patterns
    (RE2 and ``re`` agree on them), tag keys (per column, once), at most
    ``MAX_TAGS`` tags, values at most ``MAX_TAG_VALUE`` characters. An absent
    tag is an empty CSV cell or a JSON null (an empty JSON string went to the
    per-line path).
    """
    n = t.num_rows
    ok = np.ones(n, dtype=bool)
    tenant = t.column("tenant").combine_chunks()
    metric = t.column("metric").combine_chunks()
    if header is None:  # JSON: a missing tenant or metric is the per-line path's to name
        ok &= ~_np(tenant.is_null()) & ~_np(metric.is_null())
        tenant, metric = tenant.fill_null(""), metric.fill_null("")
    ok &= _np(pc.match_substring_regex(tenant, "^" + TENANT_RE.pattern + "$")).astype(bool)
    ok &= _np(pc.match_substring_regex(metric, "^" + METRIC_RE.pattern + "$")).astype(bool)
    tags: list[tuple[str, pa.Array]] = []
    if header is not None:
        tags = [(c[4:], t.column(c).combine_chunks()) for c in header if c.startswith("tag.")]
    elif "tags" in t.column_names:
        col = t.column("tags").combine_chunks()
        if pa.types.is_struct(col.type):
            for i, child in enumerate(col.flatten()):
                if pa.types.is_null(child.type):
                    continue
                ok &= ~_np(pc.fill_null(pc.equal(child, ""), False))
                tags.append((col.type.field(i).name, child.fill_null("")))
    count = np.zeros(n, dtype=np.int64)
    parts = [pa.array(np.full(n, b"\x93", dtype=object), pa.binary()), _packed(tenant),
             _packed(metric)]
    tag_parts = []
    for key, col in tags:
        present = _np(pc.not_equal(col, "")).astype(bool)
        if not table.key_ok(key):
            ok &= ~present
        ok &= ~present | (_np(pc.utf8_length(col)) <= MAX_TAG_VALUE)
        count += present
        packed_key = _PACKER.pack(key)
        pair = pc.binary_join_element_wise(
            pa.array(np.full(n, packed_key, dtype=object), pa.binary()), _packed(col), b"")
        tag_parts.append(pc.if_else(pa.array(present), pair, pa.scalar(b"", pa.binary())))
    ok &= count <= MAX_TAGS
    h = np.empty((n, 3), dtype=np.uint8)
    h[:, 0] = 0xDE
    h[:, 1] = 0
    h[:, 2] = np.minimum(count, 255)
    map16 = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(3), n, [None, pa.py_buffer(h.tobytes())]).cast(pa.binary())
    parts.append(pc.if_else(pa.array(count > 0), map16, pa.scalar(b"\xc0", pa.binary())))
    entries = pc.binary_join_element_wise(*parts, *tag_parts, b"")
    return entries, ok


def _series_by_key(t: pa.Table, header: list[str], table: SeriesTable
                   ) -> tuple[pa.Array, np.ndarray]:
    """CSV with a ``tags`` column: each distinct (tenant, metric, tag cells) in Python once."""
    tag_keys = tuple(c for c in header if c.startswith("tag."))
    cols = [t.column("tenant"), t.column("metric"), *(t.column(c) for c in tag_keys),
            t.column("tags")]
    joined = pc.binary_join_element_wise(*cols, SEP)
    if isinstance(joined, pa.ChunkedArray):
        joined = joined.combine_chunks()
    enc = pc.dictionary_encode(joined)
    by_text = table.by_text
    packed: list[bytes] = []
    valid = np.empty(len(enc.dictionary), dtype=bool)
    for j, key in enumerate(enc.dictionary.to_pylist()):
        entry = by_text.get((tag_keys, key), b"")
        if entry == b"":
            entry = by_text[(tag_keys, key)] = _validate(key, tag_keys, table)
        valid[j] = entry is not None
        packed.append(entry or b"")
    indices = enc.indices
    ok = valid[indices.to_numpy(zero_copy_only=False)] if len(indices) else np.zeros(0, bool)
    return pa.array(packed, pa.binary()).take(indices), ok


def _validate(key: str, tag_keys: tuple[str, ...], table: SeriesTable) -> bytes | None:
    """The packed entry of the series a joined key names, or None (per-line path)."""
    parts = key.split(SEP)
    if len(parts) != 3 + len(tag_keys):
        return None  # a NUL inside a cell: the per-line path decides
    try:
        tags = csv_tags(parts[-1], zip(tag_keys, parts[2:-1], strict=True))
        return table.packed(parts[0], parts[1], tags or None)
    except (RowError, ValueError, TypeError):
        return None


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
