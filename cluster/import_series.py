"""The series of an import's rows: validated and packed once per distinct series, numbered.

``import_batch`` asks ``series_numbers`` for each row's series; the answer is
a number into the import's ``SeriesTable`` (or ``NO_SERIES``, for a row the
per-line path must judge), so a chunk's rows carry integers, not packed bytes,
from the reader to the client's producer table.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import repeat
from typing import Any, Generic, TypeVar

import msgpack
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tally.client.validation import SeriesCache
from tally.cluster.import_formats import RowError, csv_tags
from tally.wire.series import MAX_TAG_VALUE, MAX_TAGS, METRIC_RE, TAG_KEY_RE, TENANT_RE

__all__ = ["NO_SERIES", "SeriesTable", "series_numbers"]

T = TypeVar("T")
NO_SERIES = -1  # a row whose series the per-line path judges
# series numbered before the numbering starts over (``SeriesTable.trim``): as many as the
# client's producer table holds per connection (wire/client/table.py)
MAX_KNOWN = 1 << 21
SEP = "\x00"
_PACKER = msgpack.Packer(use_bin_type=True)


class SeriesTable:
    """What the import validated once, and every series it met, numbered.

    A chunk names each row's series by a number here (``number``): the packed
    entry is ``known[number]``, one bytes object per series for the whole
    import, so the client's producer table looks up the same objects chunk
    after chunk (their hashes kept) rather than new copies.

    Series are found three ways:

    - a CSV of ``tag.KEY`` columns, or JSON lines (``_coded_series``): each
      column's distinct cells get codes once per import, a row's codes make one
      integer, and each distinct integer is validated (``SeriesCache``, the
      client's own check) and packed once per import, so a chunk costs
      pyarrow's dictionary encoding of its columns and a lookup in C;
    - where a column is not strings, or has more distinct cells than its code's
      bits hold (``_packed_series``): checked and packed with pyarrow, column by
      column, then numbered per distinct entry;
    - a CSV ``tags`` cell, a JSON object (``_series_by_key``): parsed in Python
      once per distinct key (``by_text``: its packed entry, or None when the
      series is invalid and its rows go to the per-line path).
    """

    def __init__(self, limit: int = MAX_KNOWN) -> None:
        self.limit = limit
        self.cache = SeriesCache(limit=1 << 20)
        self.by_text: dict[tuple[tuple[str, ...], str], bytes | None] = {}
        self.keys: dict[str, bool] = {}  # tag key -> valid
        self._entries: Numbering[bytes] = Numbering()  # packed entries by number
        self._cells: dict[str, Numbering[str | None]] = {}  # column -> its cells by code
        self._valid: dict[str, list[bool]] = {}  # column -> code -> the cell may name a series
        # (columns, bits per code) -> the code combinations met (a row's codes as one
        # integer), or None once a column has more distinct cells than its bits hold
        self._combos: dict[tuple[tuple[str, ...], int], Combos | None] = {}

    def trim(self) -> None:
        """Start the numbering over once it holds more than ``limit`` series, so that a
        file of ever new series keeps the importer's memory bounded. Call it between
        chunks: a chunk's numbers mean something until ``encode`` has read them."""
        if len(self.known) > self.limit:
            self._entries, self.by_text = Numbering(), {}
            self._combos = {key: None if combos is None else Combos()
                            for key, combos in self._combos.items()}

    def packed(self, tenant: Any, metric: Any, tags: Any) -> bytes:
        """The series' entry, msgpack-packed; raises what the client's validation raises."""
        return _PACKER.pack(list(self.cache.lookup(tenant, metric, tags).wire))

    def key_ok(self, key: str) -> bool:
        ok = self.keys.get(key)
        if ok is None:
            ok = self.keys[key] = TAG_KEY_RE.fullmatch(key) is not None
        return ok

    @property
    def known(self) -> list[bytes]:
        """Packed entries by number."""
        return self._entries.values

    def number(self, entry: bytes) -> int:
        """The number of a packed entry (a new one is added)."""
        return self._entries.number(entry)

    def numbers(self, entries: list[bytes]) -> np.ndarray:
        """The number of each packed entry (new ones are added)."""
        return self._entries.numbers(entries)

    def numbers_of(self, entries: pa.Array) -> np.ndarray:
        """``numbers`` of a column of packed entries, each distinct one looked up once."""
        if not len(entries):
            return np.zeros(0, np.int64)
        enc = pc.dictionary_encode(entries)
        return self.numbers(enc.dictionary.to_pylist())[_np(enc.indices)]

    def encode(self, numbers: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        """The distinct packed entries of rows given by number, and each row's index
        among them (the client numbers them in its series table:
        TallyClient.send_columnar)."""
        if not len(numbers):
            return [], np.zeros(0, np.uint32)
        seen = np.zeros(len(self.known), np.bool_)
        seen[numbers] = True
        distinct = np.flatnonzero(seen)
        at = np.zeros(len(self.known), np.uint32)
        at[distinct] = np.arange(len(distinct), dtype=np.uint32)
        known = self.known
        return [known[k] for k in distinct.tolist()], at[numbers]

    def column_codes(self, name: str, cells: list[str | None]) -> np.ndarray:
        """The import's code of each cell of column ``name`` (new cells get the next)."""
        held = self._cells.setdefault(name, Numbering())
        valid = self._valid.setdefault(name, [])
        out = held.numbers(cells)
        valid += [self._cell_valid(name, cell) for cell in held.values[len(valid):]]
        return out

    def _cell_valid(self, name: str, cell: str | None) -> bool:
        """Whether a cell of column ``name`` may be part of a valid series: the checks of
        ``series_key`` that look at one part (a series' tag count is the other)."""
        if name in ("tenant", "json.tenant"):
            return isinstance(cell, str) and TENANT_RE.fullmatch(cell) is not None
        if name in ("metric", "json.metric"):
            return isinstance(cell, str) and METRIC_RE.fullmatch(cell) is not None
        if cell is None or (cell == "" and name.startswith("tag.")):
            return True  # no tag (a JSON null, an empty CSV cell)
        # (an empty JSON string is the per-line path's to judge)
        return (cell != "" and self.key_ok(_tag_key(name)) and isinstance(cell, str)
                and len(cell) <= MAX_TAG_VALUE)

    def combos(self, names: tuple[str, ...], bits: int) -> Combos | None:
        """The code combinations met so far over these columns, or None once a column
        had more distinct cells than ``bits`` hold."""
        key = (names, bits)
        if key not in self._combos:
            self._combos[key] = Combos()
        combos = self._combos[key]
        if combos is not None and any(len(self._cells[c].values) > 1 << bits
                                      for c in names if c in self._cells):
            combos = self._combos[key] = None
        return combos

    def combo_number(self, names: tuple[str, ...], bits: int, combo: int) -> int:
        """The number of the series a code combination names, or NO_SERIES if the
        per-line path must judge it (it says what is wrong, if anything). The entry is
        what the client's validation packs (``SeriesCache``): tags sorted by key."""
        codes = []
        for _ in names:
            codes.append(combo & ((1 << bits) - 1))
            combo >>= bits
        codes.reverse()
        if not all(self._valid[name][code] for name, code in zip(names, codes, strict=True)):
            return NO_SERIES
        tenant, metric, *tag_cells = (self._cells[name].values[code]
                                      for name, code in zip(names, codes, strict=True))
        tags = sorted((_tag_key(name), cell) for name, cell in
                      zip(names[2:], tag_cells, strict=True) if cell)
        if len(tags) > MAX_TAGS:
            return NO_SERIES
        return self.number(_PACKER.pack([tenant, metric, dict(tags) if tags else None]))


class Numbering(Generic[T]):
    """Values numbered 0, 1, 2, ... in the order first met."""

    __slots__ = ("values", "_of")

    def __init__(self) -> None:
        self.values: list[T] = []  # number -> value
        self._of: dict[T, int] = {}  # value -> number

    def number(self, value: T) -> int:
        n = self._of.get(value)
        if n is None:
            n = self._of[value] = len(self.values)
            self.values.append(value)
        return n

    def numbers(self, values: list[T]) -> np.ndarray:
        """Each value's number (new ones get the next), without a Python step per value
        met before."""
        found = np.fromiter(map(self._of.get, values, repeat(-1)), np.int64, len(values))
        for k in np.flatnonzero(found < 0).tolist():
            found[k] = self.number(values[k])
        return found


class Combos:
    """Code combinations (a row's column codes as one integer) and their series numbers,
    in the order met; a chunk's rows are looked up in C (pyarrow's ``index_in``)."""

    __slots__ = ("keys", "series", "_value_set")

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.int64)
        self.series = np.zeros(0, np.int64)  # (NO_SERIES: the combination is invalid)
        self._value_set = pa.array(self.keys)

    def numbers(self, rows: np.ndarray, number: Callable[[int], int]) -> np.ndarray:
        """Each row's series number; ``number`` gives that of a combination not met yet."""
        at = _np(pc.index_in(pa.array(rows), value_set=self._value_set).fill_null(-1)).astype(
            np.int64)  # (a copy: arrow's buffer is read-only)
        new_rows = np.flatnonzero(at < 0)
        if len(new_rows):
            new = np.unique(rows[new_rows])
            given = np.fromiter(map(number, new.tolist()), np.int64, len(new))
            at[new_rows] = len(self.keys) + np.searchsorted(new, rows[new_rows])
            self.keys = np.concatenate([self.keys, new])
            self.series = np.concatenate([self.series, given])
            self._value_set = pa.array(self.keys)
        return self.series[at]


def series_numbers(t: pa.Table, header: list[str] | None, table: SeriesTable
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's series number in ``table``, and whether the row's series is valid."""
    if header is not None and "tags" in header:
        return _series_by_key(t, header, table)
    coded = _coded_series(t, header, table)
    if coded is not None:
        return coded
    entries, ok = _packed_series(t, header, table)
    numbers = np.full(len(ok), NO_SERIES, np.int64)
    numbers[ok] = table.numbers_of(entries.filter(pa.array(ok)))
    return numbers, ok


def _series_columns(t: pa.Table, header: list[str] | None
                    ) -> list[tuple[str, pa.Array]] | None:
    """The columns that name a row's series, by the names ``SeriesTable`` codes them
    under: ``tenant``, ``metric`` and ``tag.KEY`` of a CSV; ``json.tenant``,
    ``json.metric`` and ``json.tags.KEY`` of JSON lines (whose cells may be null). None
    when a column is not strings (the packing path decides then)."""
    if header is not None:
        names = ["tenant", "metric", *(c for c in header if c.startswith("tag."))]
        if len(set(names)) < len(names):
            return None
        return [(name, t.column(name).combine_chunks()) for name in names]
    columns = [(f"json.{name}", t.column(name).combine_chunks()) for name in ("tenant", "metric")]
    if "tags" in t.column_names:
        tags = t.column("tags").combine_chunks()
        if pa.types.is_struct(tags.type):
            columns += [(f"json.tags.{tags.type.field(i).name}", child)
                        for i, child in enumerate(tags.flatten())
                        if not pa.types.is_null(child.type)]
        elif not pa.types.is_null(tags.type):
            return None
    if len({name for name, _ in columns}) < len(columns) or not all(
            pa.types.is_string(col.type) for _, col in columns):
        return None  # (a key twice in the tags objects, or cells that are not strings)
    return columns


def _coded_series(t: pa.Table, header: list[str] | None, table: SeriesTable
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """Each row's series from its columns' codes (see ``SeriesTable``), or None when the
    columns are not all strings or their codes do not fit one integer."""
    columns = _series_columns(t, header)
    if columns is None:
        return None
    names = tuple(name for name, _ in columns)
    bits = 63 // len(names)
    combos = table.combos(names, bits)
    if combos is None:
        return None
    key = np.zeros(t.num_rows, np.int64)
    for name, col in columns:
        enc = pc.dictionary_encode(col, null_encoding="encode")
        codes = table.column_codes(name, enc.dictionary.to_pylist())
        key = key << bits | codes[_np(enc.indices)]
    if table.combos(names, bits) is None:  # (a column outgrew its bits just now)
        return None
    numbers = combos.numbers(key, lambda combo: table.combo_number(names, bits, combo))
    return numbers, numbers != NO_SERIES


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
                   ) -> tuple[np.ndarray, np.ndarray]:
    """CSV with a ``tags`` column: each distinct (tenant, metric, tag cells) in Python once."""
    tag_keys = tuple(c for c in header if c.startswith("tag."))
    cols = [t.column("tenant"), t.column("metric"), *(t.column(c) for c in tag_keys),
            t.column("tags")]
    joined = pc.binary_join_element_wise(*cols, SEP)
    if isinstance(joined, pa.ChunkedArray):
        joined = joined.combine_chunks()
    enc = pc.dictionary_encode(joined)
    by_text = table.by_text
    numbers = np.full(len(enc.dictionary), NO_SERIES, np.int64)
    for j, key in enumerate(enc.dictionary.to_pylist()):
        entry = by_text.get((tag_keys, key), b"")
        if entry == b"":
            entry = by_text[(tag_keys, key)] = _validate(key, tag_keys, table)
        if entry is not None:
            numbers[j] = table.number(entry)
    rows = numbers[_np(enc.indices)] if len(enc.indices) else np.zeros(0, np.int64)
    return rows, rows != NO_SERIES


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


def _tag_key(column: str) -> str:
    """The tag key of a ``tag.KEY`` or ``json.tags.KEY`` column."""
    return column[4:] if column.startswith("tag.") else column[len("json.tags."):]


def _np(a: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(a.to_numpy(zero_copy_only=False))
