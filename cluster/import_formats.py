"""The file formats of ``tally import``: records, their parsing, the per-line path.

What a line of JSON or a CSV record means is defined here, once, in plain
Python: ``Source.parse`` turns one record into an increment or an event, or
raises ``RowError`` saying what is wrong with it. The columnar reader
(``import_read``, ``import_batch``) is an optimisation held to exactly this
meaning: whenever a row is anything but plain, it is handed back to
``parse`` here, so both paths count the same increments and report the same
lines in the same words (``tests/test_import_differential.py`` holds them to
it). Events, which the fan-out rules judge field by field, only take this path.
"""

from __future__ import annotations

import csv
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from tally.api.rules import Rules

__all__ = [
    "FORMATS",
    "INCREMENT_KEYS",
    "CsvFile",
    "Event",
    "ImportFailed",
    "Increment",
    "JsonLines",
    "RowError",
    "Source",
    "csv_tags",
    "detect_format",
    "open_source",
    "parse_ts",
]

# What one record can take in an event frame, at most: msgpack never spends more than 3
# bytes per byte of JSON or CSV text (a float such as 1e1 becomes 9 bytes), plus the
# frame's headers, plus (CSV) the keys that come from the header rather than the line.
GROWTH = 3
RECORD_OVERHEAD = 96
INCREMENT_KEYS = frozenset(("tenant", "metric", "ts", "value", "tags"))
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
SNIFF_RECORDS = 1000
_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?")


class ImportFailed(Exception):
    """The import cannot start or go on (file, format, server); the message says why."""


class RowError(ValueError):
    """One record the import refuses; reported with its line number and skipped."""


# ------------------------------------------------------------------------ parsing


def parse_ts(x: Any) -> int:
    """Integer Unix seconds, from an int, a string of digits or an ISO 8601 datetime."""
    if type(x) is int:
        return x
    if isinstance(x, str):
        s = x.strip()
        if _INT_RE.fullmatch(s):
            return int(s)
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            raise RowError(f"ts {x!r} is neither integer Unix seconds nor an ISO 8601 "
                           "datetime") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return int(dt.timestamp() // 1)
    if x is None:
        raise RowError("ts is missing (integer Unix seconds or an ISO 8601 datetime)")
    raise RowError(f"ts {x!r} is a {type(x).__name__}; expected integer Unix seconds or an "
                   "ISO 8601 datetime")


def _number_or_text(cell: str) -> Any:
    if _INT_RE.fullmatch(cell):
        return int(cell)
    if _FLOAT_RE.fullmatch(cell):
        return float(cell)
    return cell


def _check_text(cells: list[str]) -> None:
    """Lone surrogates are the bytes that were not UTF-8 (decoded with surrogateescape)."""
    for cell in cells:
        if not cell.isascii():
            try:
                cell.encode("utf-8")
            except UnicodeEncodeError:
                raise RowError(f"cell {cell!r} is not valid UTF-8") from None


Increment = tuple[str, str, int, int, dict[str, str] | None]  # tenant, metric, value, ts, tags
Event = tuple[str, str, int, dict[str, Any]]  # tenant, type, ts, fields


def increment_from(obj: dict[str, Any]) -> Increment:
    """An increment from a JSON object; the client library checks the series and ranges."""
    if not obj.keys() <= INCREMENT_KEYS:
        extra = ", ".join(sorted(map(repr, obj.keys() - INCREMENT_KEYS)))
        raise RowError(f"unknown key {extra}: an increment has tenant, metric, ts, value, tags")
    tenant = obj.get("tenant")
    metric = obj.get("metric")
    if tenant is None:
        raise RowError("tenant is missing")
    if metric is None:
        raise RowError("metric is missing")
    value = obj.get("value", 1)
    return tenant, metric, value, parse_ts(obj.get("ts")), obj.get("tags")


def event_from(obj: dict[str, Any]) -> Event:
    """An event from a JSON object: the envelope apart, every other key is a field."""
    fields = dict(obj)
    etype = fields.pop("type", None)
    tenant = fields.pop("tenant", None)
    ts = fields.pop("ts", None)
    if etype is None:
        raise RowError("type is missing (an event is {type, tenant, ts, ...fields})")
    if tenant is None:
        raise RowError("tenant is missing")
    return tenant, etype, parse_ts(ts), fields


class Source(ABC):
    """A file's records from a byte offset: ``(first line, end offset, payload)``.

    Subclasses know the format; ``parse`` turns a payload into an increment or
    an event, or raises ``RowError``. Reading and parsing are apart so that the
    chunk boundaries (which decide the seqs) depend on the bytes only.
    """

    def __init__(self, path: str, kind: str, rules: Rules | None) -> None:
        self.path = path
        self.kind = kind
        self.rules = rules

    def data_start(self) -> int:
        """Where records begin (after a header)."""
        return 0

    def overhead(self) -> int:
        """Frame bytes a record may take beyond ``GROWTH`` times its own (see there)."""
        return RECORD_OVERHEAD

    @abstractmethod
    def records(self, f: BinaryIO, offset: int, line: int) -> Iterator[tuple[int, int, Any]]:
        """Every record from ``offset`` (which starts line ``line``), in file order."""

    @abstractmethod
    def parse(self, payload: Any) -> Increment | Event:
        """The increment or event of one record; ``RowError`` says what is wrong with it."""

    @abstractmethod
    def sniff(self) -> str | None:
        """``events`` or ``increments`` from the start of the file, or None if unclear."""


_JSON = json.JSONDecoder()  # json.loads without its per-call encoding sniffing


class JsonLines(Source):
    def records(self, f: BinaryIO, offset: int, line: int) -> Iterator[tuple[int, int, Any]]:
        f.seek(offset)
        for raw in f:
            offset += len(raw)
            if raw.strip():
                yield line, offset, raw
            line += 1

    def parse(self, payload: bytes) -> Increment | Event:
        try:
            obj = _JSON.decode(payload.decode("utf-8"))
        except json.JSONDecodeError as e:
            raise RowError(f"not JSON: {e.msg} (column {e.colno})") from None
        except UnicodeDecodeError:
            raise RowError("not valid UTF-8") from None
        if type(obj) is not dict:
            raise RowError(f"expected a JSON object, not {type(obj).__name__}")
        return increment_from(obj) if self.kind == "increments" else event_from(obj)

    def sniff(self) -> str | None:
        with open(self.path, "rb") as f:
            for n, (_, _, raw) in enumerate(self.records(f, 0, 1)):
                if n >= SNIFF_RECORDS:
                    break
                try:
                    obj = json.loads(raw)
                except ValueError:
                    continue
                if type(obj) is dict and "type" in obj:
                    return "events"
                if type(obj) is dict and "metric" in obj:
                    return "increments"
        return None


class _Lines:
    """Feeds ``csv.reader`` one line at a time, so the offset after each record is known."""

    def __init__(self, f: BinaryIO, offset: int, line: int) -> None:
        f.seek(offset)
        self.f = f
        self.offset = offset
        self.line = line  # the number of the next line to be read

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        raw = self.f.readline()
        if not raw:
            raise StopIteration
        self.offset += len(raw)
        self.line += 1
        return raw.decode("utf-8", "surrogateescape")


class CsvFile(Source):
    def __init__(self, path: str, kind: str, rules: Rules | None) -> None:
        super().__init__(path, kind, rules)
        with open(path, "rb") as f:
            lines = _Lines(f, 0, 1)
            try:
                self.header = [h.strip() for h in next(csv.reader(lines))]
            except StopIteration:
                raise ImportFailed(f"{path}: empty file (a CSV file needs a header row)") from None
            self._start = lines.offset
        self._check_header()
        self.text_fields: dict[str, frozenset[str]] = {}
        if rules is not None:
            for etype, type_rules in rules.by_event.items():
                self.text_fields[etype] = frozenset(f for r in type_rules for _, f in r.tags)

    def sniff(self) -> str | None:
        if "type" in self.header:
            return "events"
        if "metric" in self.header:
            return "increments"
        return None

    def _check_header(self) -> None:
        h = self.header
        if any(not c for c in h):
            raise ImportFailed(f"{self.path}: line 1: the header has an empty column name")
        dup = sorted({c for c in h if h.count(c) > 1})
        if dup:
            raise ImportFailed(f"{self.path}: line 1: column {', '.join(dup)} appears twice")

    def check_columns(self) -> None:
        """The header fits the kind (known after sniffing); refused whole, before sending."""
        h = set(self.header)
        need = ("tenant", "metric", "ts") if self.kind == "increments" else ("type", "tenant",
                                                                              "ts")
        missing = [c for c in need if c not in h]
        if missing:
            raise ImportFailed(f"{self.path}: line 1: {self.kind} need column "
                               f"{', '.join(missing)} (header: {', '.join(self.header)})")
        if self.kind == "increments":
            unknown = [c for c in self.header if c not in INCREMENT_KEYS
                       and not (c.startswith("tag.") and len(c) > 4)]
            if unknown:
                raise ImportFailed(
                    f"{self.path}: line 1: unknown column {', '.join(unknown)}: increments take "
                    "tenant, metric, ts, value, tags (a JSON object) and tag.KEY columns"
                )

    def data_start(self) -> int:
        return self._start

    def overhead(self) -> int:
        # Each column's name may become a key (an event field, a tag key) in every record.
        return RECORD_OVERHEAD + sum(len(c.encode()) + 3 for c in self.header)

    def records(self, f: BinaryIO, offset: int, line: int) -> Iterator[tuple[int, int, Any]]:
        lines = _Lines(f, offset, line)
        reader = csv.reader(lines)
        while True:
            first = lines.line
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield first, lines.offset, RowError(f"not CSV: {e}")
                continue
            if cells:
                yield first, lines.offset, cells

    def parse(self, payload: list[str] | RowError) -> Increment | Event:
        if isinstance(payload, RowError):
            raise payload
        if len(payload) != len(self.header):
            raise RowError(f"{len(payload)} cells, the header has {len(self.header)}")
        _check_text(payload)
        row = dict(zip(self.header, payload, strict=True))
        return self._increment(row) if self.kind == "increments" else self._event(row)

    def _increment(self, row: dict[str, str]) -> Increment:
        tags = csv_tags(row.pop("tags", ""), row.items())
        value_cell = row.get("value", "").strip()
        if value_cell == "":
            value = 1
        elif _INT_RE.fullmatch(value_cell):
            value = int(value_cell)
        else:
            raise RowError(f"value {value_cell!r} is not an integer")
        if not row["tenant"]:
            raise RowError("tenant is empty")
        if not row["metric"]:
            raise RowError("metric is empty")
        return row["tenant"], row["metric"], value, parse_ts(row["ts"]), tags or None

    def _event(self, row: dict[str, str]) -> Event:
        etype = row.pop("type")
        tenant = row.pop("tenant")
        ts = parse_ts(row.pop("ts"))
        if not etype:
            raise RowError("type is empty")
        if not tenant:
            raise RowError("tenant is empty")
        text = self.text_fields.get(etype, frozenset())
        fields = {k: (v if k in text else _number_or_text(v)) for k, v in row.items() if v != ""}
        return tenant, etype, ts, fields


def csv_tags(tags_cell: str, cells: Iterable[tuple[str, str]]) -> dict[str, str]:
    """A CSV record's tags: its ``tags`` cell (a JSON object) and its ``tag.KEY`` cells.

    ``cells`` are (column, cell) pairs; columns other than ``tag.KEY`` are
    ignored, and an empty cell is no tag.
    """
    tags: dict[str, str] = {}
    raw_tags = tags_cell.strip()
    if raw_tags:
        try:
            parsed = json.loads(raw_tags)
        except json.JSONDecodeError as e:
            raise RowError(f"tags: not JSON: {e.msg}") from None
        if parsed is not None:
            if type(parsed) is not dict:
                raise RowError(f"tags: expected a JSON object, not {type(parsed).__name__}")
            tags.update(parsed)
    for column, cell in cells:
        if column.startswith("tag.") and cell != "":
            key = column[4:]
            if key in tags:
                raise RowError(f"tag {key!r} is both in tags and in column {column}")
            tags[key] = cell
    return tags


def detect_format(path: str, given: str | None) -> str:
    if given is not None:
        if given not in ("jsonl", "csv"):
            raise ImportFailed(f"--format {given}: expected jsonl or csv")
        return given
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ImportFailed(f"{path}: cannot tell the format from the extension "
                           f"({', '.join(FORMATS)}); pass --format jsonl or --format csv")
    return fmt


def open_source(path: str, fmt: str, kind: str, rules: Rules | None) -> Source:
    """The file's reader, with the kind settled (sniffed from the file's start if auto).

    The kind comes from the start of the file, never from where a resumed run
    begins, so every run of one file reads it the same way.
    """
    if kind not in ("auto", "events", "increments"):
        raise ImportFailed(f"--kind {kind}: expected auto, events or increments")
    src: Source = CsvFile(path, kind, rules) if fmt == "csv" else JsonLines(path, kind, rules)
    if kind == "auto":
        src.kind = src.sniff() or ""
    if not src.kind:
        raise ImportFailed(f"{path}: cannot tell events (with a type) from increments (with a "
                           "metric) from the start of the file; pass --kind")
    if isinstance(src, CsvFile):
        src.check_columns()
    return src

