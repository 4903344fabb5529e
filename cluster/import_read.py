"""Columnar reading for ``tally import``: chunks cut from the file's bytes, parsed by pyarrow.

Parsing a line of JSON or CSV in Python costs about 2 us, which caps an import
near 0.1 M rows/s; pyarrow's readers parse a whole chunk in C++ at hundreds of
MB/s. What this module adds around them is what resume and exact reports need:

**Chunks are a function of the file's bytes only.** A chunk starts where the
previous one ended and ends after the first line at which either
``chunk_rows`` lines are reached or a bound on its frame (``len(line) +
overhead`` per line, summed) reaches ``chunk_bytes``; the last chunk ends at
the file's end. In CSV a chunk only ends where the count of ``"`` since its
start is even (a quoted field may hold a newline), unless the bound reaches
twice ``chunk_bytes`` first (a stray quote then cannot make a chunk unbounded;
only malformed quoting is affected, and its lines are reported). The
importer sends each chunk as one batch with seq = the offset where it ends.

**Rows keep their line numbers.** A JSON line is one record; a CSV line is
one record when every line with a quote in it is well formed (quotes
around whole fields, doubled inside), which is checked, so row ``k`` of a
parsed piece is its ``k``-th non-blank line. A chunk whose CSV has records
over several lines, or odd quoting, is read by the per-record path
(``import_formats``) whole.

**A piece that pyarrow cannot read exactly is halved.** A malformed line, a
type pyarrow would widen (a float value, a number where a tag should be a
string), a row count that does not match the lines: the piece is split in two
and each half tried again, down to ``LEAF_LINES`` lines, which go to the
per-line path. One bad line therefore costs a few re-reads of its
neighbourhood, not the whole chunk's speed.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json

__all__ = [
    "CHUNK_BYTES",
    "CHUNK_ROWS",
    "Chunk",
    "Piece",
    "chunks",
    "read_chunk",
]

# The bound a chunk's lines reach before it ends: its frame is at most about twice
# this (CSV's quote rule), under the 16 MiB frame the client is allowed.
CHUNK_BYTES = 6 << 20
CHUNK_ROWS = 200_000
# What one line can add to a columnar frame beyond its own bytes: 20 bytes of columns,
# and msgpack's headers of the strings, map and array of its series entry (the strings
# themselves come from the line; CSV adds its tag keys from the header, see overhead()).
LINE_OVERHEAD = 48
LEAF_LINES = 64
READ_BLOCK = 4 << 20
_WS = np.zeros(256, dtype=bool)
_WS[list(b" \t\n\r\x0b\x0c")] = True  # bytes.strip()'s whitespace: blank JSON lines
# A CSV line whose quotes are all around whole fields (doubled inside): one record, read
# the same by Python's csv module and by pyarrow.
_FIELD = rb'(?:[^",\r\n]*|"(?:[^"]|"")*")'
_WELL_QUOTED = re.compile(rb"%s(?:,%s)*\r?\n?" % (_FIELD, _FIELD))


@dataclass
class Chunk:
    """Lines ``first_line``.. of the file, bytes ``start``..``end`` (``data``)."""

    start: int
    end: int
    first_line: int
    data: bytes
    starts: np.ndarray  # each line's first byte, within data
    stops: np.ndarray  # each line's end, its newline included

    def __len__(self) -> int:
        return len(self.starts)

    def line(self, k: int) -> bytes:
        return self.data[int(self.starts[k]):int(self.stops[k])]


@dataclass
class Piece:
    """Part of a chunk: ``rows`` (line indexes) read by pyarrow as ``table``, or not.

    ``table`` None: the lines go to the per-line path; ``records`` True: the
    whole chunk goes to the per-record path (CSV records over several lines).
    """

    rows: np.ndarray
    table: pa.Table | None = None
    records: bool = False


def chunks(f: BinaryIO, start: int, first_line: int, *, chunk_bytes: int, chunk_rows: int,
           overhead: int, csv: bool) -> Iterator[Chunk]:
    """The file's chunks from ``start`` (a line boundary, line ``first_line``) to its end."""
    f.seek(start)
    buf = b""
    eof = False
    while True:
        cut = None if not buf else _cut(buf, chunk_bytes, chunk_rows, overhead, csv)
        while cut is None and not eof:
            more = f.read(max(READ_BLOCK, chunk_bytes))
            eof = not more
            buf += more
            cut = None if not buf else _cut(buf, chunk_bytes, chunk_rows, overhead, csv)
        if cut is None:
            cut = len(buf)  # the file's end: the last chunk takes the rest
        if cut == 0:
            return
        data, buf = buf[:cut], buf[cut:]
        starts, stops = line_bounds(data)
        yield Chunk(start, start + cut, first_line, data, starts, stops)
        start += cut
        first_line += len(starts)


def _cut(buf: bytes, chunk_bytes: int, chunk_rows: int, overhead: int, csv: bool) -> int | None:
    """Where the chunk at the start of ``buf`` ends, or None if ``buf`` is too short to say."""
    a = np.frombuffer(buf, dtype=np.uint8)
    nl = np.flatnonzero(a == 10)
    if not len(nl):
        return None
    lengths = np.diff(nl, prepend=-1)
    bound = np.cumsum(lengths + overhead)
    over = (bound >= chunk_bytes) | (np.arange(1, len(nl) + 1) >= chunk_rows)
    if csv:
        quotes = np.cumsum(_per_line(a, 34, nl))
        over &= (quotes % 2 == 0) | (bound >= 2 * chunk_bytes)
    k = np.flatnonzero(over)
    return int(nl[k[0]]) + 1 if len(k) else None


def _per_line(a: np.ndarray, byte: int, ends: np.ndarray) -> np.ndarray:
    """How many times ``byte`` occurs in each line (``ends``: each line's last byte)."""
    at = np.flatnonzero(a == byte)
    return np.bincount(np.searchsorted(ends, at), minlength=len(ends))[:len(ends)]


def line_bounds(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Each line's start and end (newline included) within ``data``."""
    a = np.frombuffer(data, dtype=np.uint8)
    stops = np.flatnonzero(a == 10) + 1
    if not len(stops) or stops[-1] != len(data):
        stops = np.append(stops, len(data))
    starts = np.concatenate(([0], stops[:-1]))
    return starts.astype(np.int64), stops.astype(np.int64)


def nonblank(chunk: Chunk, csv: bool) -> np.ndarray:
    """Which lines hold a record: JSON, not only whitespace; CSV, not empty (``\\r`` aside)."""
    a = np.frombuffer(chunk.data, dtype=np.uint8)
    if not len(a):
        return np.zeros(0, dtype=bool)
    if csv:
        body = chunk.stops - chunk.starts
        ends_nl = a[chunk.stops - 1] == 10
        body = body - ends_nl
        cr = (body > 0) & (a[np.maximum(chunk.starts + body - 1, 0)] == 13)
        return (body - cr) > 0
    first = a[chunk.starts]
    keep = ~_WS[first]  # most lines start with "{"; the others are looked at one by one
    for k in np.flatnonzero(~keep).tolist():
        keep[k] = bool(chunk.line(k).strip())
    return keep


def lines_with(chunk: Chunk, pattern: bytes) -> np.ndarray:
    """A mask of the lines that contain ``pattern`` (a few bytes)."""
    a = np.frombuffer(chunk.data, dtype=np.uint8)
    n = len(pattern)
    if len(a) < n:
        return np.zeros(len(chunk), dtype=bool)
    hit = a[: len(a) - n + 1] == pattern[0]
    for j in range(1, n):
        hit &= a[j: len(a) - n + 1 + j] == pattern[j]
    at = np.flatnonzero(hit)
    mask = np.zeros(len(chunk), dtype=bool)
    mask[np.searchsorted(chunk.stops, at, side="right")] = True
    return mask


def read_chunk(chunk: Chunk, fmt: str, header: list[str] | None,
               threads: bool = True) -> tuple[list[Piece], np.ndarray]:
    """The chunk's pieces, in line order, and which lines hold records."""
    csv = fmt == "csv"
    keep = nonblank(chunk, csv)
    rows = np.flatnonzero(keep)
    if csv and not _one_record_per_line(chunk, rows):
        return [Piece(rows, records=True)], keep
    assert header is not None or not csv
    pieces: list[Piece] = []
    _read(chunk, rows, csv, header, threads, pieces)
    return pieces, keep


def _one_record_per_line(chunk: Chunk, rows: np.ndarray) -> bool:
    a = np.frombuffer(chunk.data, dtype=np.uint8)
    if not len(a):
        return True
    last = chunk.stops - 1
    quoted = rows[_per_line(a, 34, last)[rows] > 0]
    crs = rows[_per_line(a, 13, last)[rows] > 0]
    return (all(_WELL_QUOTED.fullmatch(chunk.line(int(k))) for k in quoted)
            and all(chunk.line(int(k)).endswith(b"\r\n") and chunk.line(int(k)).count(b"\r") == 1
                    for k in crs))


def _read(chunk: Chunk, rows: np.ndarray, csv: bool, header: list[str] | None,
          threads: bool, out: list[Piece]) -> None:
    if not len(rows):
        return
    table = _parse(chunk, rows, csv, header, threads)
    if table is not None:
        out.append(Piece(rows, table))
    elif len(rows) <= LEAF_LINES:
        out.append(Piece(rows))
    else:
        half = len(rows) // 2
        _read(chunk, rows[:half], csv, header, threads, out)
        _read(chunk, rows[half:], csv, header, threads, out)


def _parse(chunk: Chunk, rows: np.ndarray, csv: bool, header: list[str] | None,
           threads: bool) -> pa.Table | None:
    """pyarrow's reading of lines ``rows`` (contiguous but for blank lines), or None."""
    data = chunk.data[int(chunk.starts[rows[0]]):int(chunk.stops[rows[-1]])]
    block = max(1 << 20, (len(data) >> 1) + 1) if threads else len(data) + 1
    try:
        if csv:
            assert header is not None
            table = pa_csv.read_csv(
                io.BytesIO(data),
                read_options=pa_csv.ReadOptions(column_names=header, use_threads=threads,
                                                block_size=block),
                parse_options=pa_csv.ParseOptions(newlines_in_values=False,
                                                  ignore_empty_lines=True),
                convert_options=pa_csv.ConvertOptions(
                    column_types={c: pa.string() for c in header}, strings_can_be_null=False,
                    quoted_strings_can_be_null=False, check_utf8=True),
            )
        else:
            table = _read_json(data, threads, block)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None  # the caller splits the part and, at the end, reads it line by line
    if table is None or table.num_rows != len(rows):
        return None
    return table


_JSON_BASE = [("tenant", pa.string()), ("metric", pa.string())]


def _read_json(data: bytes, threads: bool, block: int) -> pa.Table | None:
    """A JSON piece with strings kept strings (pyarrow would infer dates as timestamps)."""
    def read(schema: pa.Schema) -> pa.Table:
        return pa_json.read_json(
            io.BytesIO(data),
            read_options=pa_json.ReadOptions(use_threads=threads, block_size=block),
            parse_options=pa_json.ParseOptions(explicit_schema=schema,
                                               newlines_in_values=False),
        )

    base = pa.schema(_JSON_BASE)
    table = read(base)
    fields = list(_JSON_BASE)
    again = False
    for name in ("ts", "value", "tags"):
        if name not in table.column_names:
            continue
        t = table.schema.field(name).type
        if name == "ts" and pa.types.is_timestamp(t):
            fields.append(("ts", pa.string()))
            again = True
        elif name == "tags" and pa.types.is_struct(t) and any(
                pa.types.is_timestamp(t.field(i).type) for i in range(t.num_fields)):
            fields.append(("tags", pa.struct([
                (t.field(i).name, pa.string()) if pa.types.is_timestamp(t.field(i).type)
                else (t.field(i).name, t.field(i).type) for i in range(t.num_fields)])))
            again = True
    table = read(pa.schema(fields)) if again else table
    return table if _clean_json(table) else None


def _clean_json(table: pa.Table) -> bool:
    """The columns are what the vectorised checks understand; otherwise the piece is halved.

    Unknown keys, floats, booleans, nested values where strings belong: pyarrow
    would widen or coerce what the per-line path refuses by name.
    """
    for f in table.schema:
        t = f.type
        if f.name in ("tenant", "metric"):
            ok = pa.types.is_string(t)
        elif f.name == "ts":
            ok = pa.types.is_int64(t) or pa.types.is_string(t) or pa.types.is_null(t)
        elif f.name == "value":
            ok = pa.types.is_int64(t) or pa.types.is_null(t)
        elif f.name == "tags":
            ok = pa.types.is_null(t) or (pa.types.is_struct(t) and all(
                pa.types.is_string(t.field(i).type) or pa.types.is_null(t.field(i).type)
                for i in range(t.num_fields)))
        else:
            ok = False
        if not ok:
            return False
    return True
