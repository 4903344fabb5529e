"""StatsD / DogStatsD line protocol, sans I/O: bytes in, tally rows and per-line refusals out.

A StatsD client cannot be told "no" (UDP has no answer), so the parser never
raises on input: every line either becomes rows ``[tenant, metric, tags, ts,
value]`` already checked against tally's data model, or a ``Rejection``
naming its line index and a reason from a small fixed set (the reason is a
metric label, so it must stay bounded). Validating here, line by line, is
what lets the listener ingest the good lines of a datagram while the bad ones
are refused alone: tally's batches are all or nothing.

Line format (one per ``\\n``-separated line of a datagram or TCP stream)::

    name:value|type[|@rate][|#key:value,key2:value2][|T<unix seconds>]

- ``c`` counters: ``round_half_even(value / rate)`` of the exact decimals
  (``Fraction``, never a float), so ``1|c|@0.3`` is 3 (3.33...), ``1|c|@0.4``
  is 2 (2.5 rounds to even) and ``3|c|@0.4`` is 8 (7.5).
- ``ms`` timers, ``h`` histograms and ``d`` distributions become three
  counters: ``<name>.count`` (``round_half_even(1 / rate)``), ``<name>.sum``
  (``round_half_even(value / rate)``) and ``<name>`` tagged ``le`` with the
  smallest bucket edge the value is at most (``le:inf`` beyond the last). The
  buckets are not cumulative (unlike Prometheus): the ``le`` counts of a name
  add up to its ``.count``, which is what a tally breakdown by ``le`` shows.
- ``g`` gauges and ``s`` sets are refused (``unsupported_type``): a gauge is a
  last value and a set a distinct count, and tally only keeps sums. DogStatsD
  events (``_e{``) and service checks (``_sc|``) likewise.
- Names are tally metrics, checked as they are (``:`` cannot be part of one: it
  starts the value; DogStatsD's packed ``name:1:2:3`` are three values).
- Tags: keys and values as tally's data model says (wire/series.py), no
  renaming. A tag without a value (``#canary``) gets the empty value. The tag
  ``tenant`` picks the tenant and is not kept as a tag; it wins over the
  listener's default tenant, and a line with neither is refused (``no_tenant``).
- The timestamp is the server's receive time; the DogStatsD extension
  ``|T<unix seconds>`` is honoured (checked like any tally ts: at most an hour
  ahead of the server clock).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from tally.wire.series import (
    MAX_TAGS,
    InvalidSeries,
    check_metric,
    check_tag_key,
    check_tag_value,
    check_tenant,
)
from tally.wire.timeslots import FUTURE_TOLERANCE
from tally.wire.vocabulary import INT64_MAX, INT64_MIN

# The largest UDP payload is 65,507 bytes; anything bigger came some other way.
MAX_DATAGRAM = 64 * 1024
# A line longer than this cannot hold a valid series (200-character metric,
# 16 tags of 64 + 200 characters): TCP stops buffering it and refuses it.
MAX_LINE = 8 * 1024
# Bucket edges of timers (milliseconds), histograms and distributions.
DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
TENANT_TAG = "tenant"
BUCKET_TAG = "le"

# Every reason a line can be refused for; bounded, since it labels a metric.
REASONS = (
    "malformed", "bad_value", "bad_rate", "bad_name", "bad_tag", "bad_tenant", "no_tenant",
    "bad_timestamp", "unsupported_type", "not_utf8", "too_long", "overflow", "overloaded",
)

_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]{1,3})?")
_TIMER_TYPES = frozenset({"ms", "h", "d"})
_UNSUPPORTED = {
    "g": "gauges hold a last value; tally keeps sums only (send a counter)",
    "s": "sets count distinct values; tally keeps sums only",
}


@dataclass(frozen=True, slots=True)
class Rejection:
    """Line ``line`` (0-based, within what was parsed) was refused for ``reason``."""

    line: int
    reason: str
    message: str


@dataclass(slots=True)
class Parsed:
    """What a datagram (or a run of TCP lines) gave: rows, the line of each, refusals."""

    rows: list[list[Any]] = field(default_factory=list)
    row_lines: list[int] = field(default_factory=list)  # input line index of each row
    rejections: list[Rejection] = field(default_factory=list)
    lines: int = 0  # non-empty lines seen

    @property
    def accepted_lines(self) -> int:
        return self.lines - len(self.rejections)


@dataclass(frozen=True, slots=True)
class _Spec:
    """Everything of a line but its value, checked. ``tags`` is shared by the rows of
    every line with the same spec: nothing downstream changes a row's tags."""

    kind: str
    counter: bool
    rate: Fraction | None  # None: 1, no scaling
    tenant: str
    tags: dict[str, str] | None
    ts: int | None  # the line's |T timestamp; None: the receive time


class _Refused(Exception):
    """Internal: a line is refused; carried to the one place that records it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def round_half_even(x: Fraction) -> int:
    """Round an exact rational to the nearest integer, ties to even (Python's ``round``)."""
    return round(x)


def _number(text: str, what: str, reason: str) -> Fraction:
    if not _NUMBER.fullmatch(text):
        raise _Refused(reason, f"{what} {text[:40]!r} is not a number")
    return Fraction(text)


def _int64(x: int, what: str) -> int:
    if not INT64_MIN <= x <= INT64_MAX:
        raise _Refused("overflow", f"{what} {x} is outside int64")
    return x


class StatsdParser:
    """Parses StatsD lines into tally rows for one listener (its default tenant, buckets).

    Keeps a bounded cache of validated names and tag sections: clients send
    the same few series over and over, and checking each once is most of the
    cost of a line.
    """

    def __init__(
        self, default_tenant: str | None = None, buckets: tuple[int, ...] = DEFAULT_BUCKETS,
        cache_limit: int = 100_000,
    ) -> None:
        if default_tenant is not None:
            check_tenant(default_tenant)
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError("buckets must be distinct and increasing")
        self.default_tenant = default_tenant
        self.buckets = tuple(Fraction(b) for b in buckets)
        self.bucket_labels = tuple(str(b) for b in buckets)
        self._tags: dict[str, tuple[str | None, dict[str, str]]] = {}
        self._specs: dict[tuple[str, str], _Spec] = {}
        self._names: set[str] = set()
        self.cache_limit = cache_limit

    def parse(
        self, data: bytes, now: float, first_line: int = 0, datagram: bool = True
    ) -> Parsed:
        """Parse a datagram (or complete TCP lines); never raises on any input bytes.

        ``now`` is the server's receive time (Unix seconds); ``first_line``
        offsets the line indexes of rejections (a TCP stream numbers its lines).
        A datagram over MAX_DATAGRAM is refused whole (it cannot have come as
        one UDP datagram; its last line may be cut); TCP lines (``datagram``
        False) are only held to MAX_LINE each.
        """
        out = Parsed()
        if datagram and len(data) > MAX_DATAGRAM:
            out.lines = 1
            out.rejections.append(Rejection(
                first_line, "too_long",
                f"datagram of {len(data)} bytes; at most {MAX_DATAGRAM}: refused whole"))
            return out
        try:  # decoded once as a whole: a bad byte only costs its own line below
            lines: list[str] | list[bytes] = data.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            lines = data.split(b"\n")
        index = first_line
        now_s = int(now)
        rows, row_lines = out.rows, out.row_lines
        for raw in lines:
            if not raw or raw.isspace():
                continue
            out.lines += 1
            try:
                if isinstance(raw, bytes):
                    try:
                        raw = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise _Refused("not_utf8", "line is not UTF-8") from None
                got = self._line(raw.strip(), now_s)
            except _Refused as e:
                out.rejections.append(Rejection(index, e.reason, e.message))
            else:
                rows.extend(got)
                row_lines.extend([index] * len(got))
            index += 1
        return out

    def _line(self, line: str, now: int) -> list[list[Any]]:
        """The rows of one stripped line. The part that is not the value (name, type,
        rate, tags) is checked once and cached: clients repeat it line after line."""
        if len(line) > MAX_LINE:
            raise _Refused("too_long", f"line of {len(line)} characters; at most {MAX_LINE}")
        head, sep, rest = line.partition("|")
        name, colon, value_text = head.partition(":")
        key = (name, rest)
        spec = self._specs.get(key)
        if spec is None:
            if line.startswith(("_e{", "_sc|")):
                kind = "events" if line.startswith("_e{") else "service checks"
                raise _Refused("unsupported_type", f"DogStatsD {kind} are not counters")
            if not sep:
                raise _Refused("malformed", "no |type: expected name:value|type")
            if not colon or not name:
                raise _Refused("malformed", "no name:value before the first |")
            spec = self._spec(name, rest, now)
            if spec.ts is None:  # a line's own timestamp is checked against each line's now
                if len(self._specs) >= self.cache_limit:
                    self._specs.clear()
                self._specs[key] = spec
        ts = now if spec.ts is None else spec.ts
        if spec.counter and spec.rate is None and value_text.isascii() and value_text.isdigit() \
                and len(value_text) < 19:  # the hot path: name:12|c, exact and in int64
            return [[spec.tenant, name, spec.tags, ts, int(value_text)]]
        values = [_number(v, "value", "bad_value") for v in value_text.split(":")]
        rate = spec.rate if spec.rate is not None else 1
        if spec.counter:
            return [[spec.tenant, name, spec.tags, ts,
                     _int64(round_half_even(v / rate), "scaled value")] for v in values]
        if any(v < 0 for v in values):
            raise _Refused("bad_value", f"{spec.kind} value in {value_text[:40]!r} is negative")
        count = _int64(round_half_even(1 / rate), "scaled count")
        rows: list[list[Any]] = []
        tags = spec.tags or {}
        for v in values:
            bucket = next((label for edge, label in zip(self.buckets, self.bucket_labels,
                                                        strict=True) if v <= edge), "inf")
            rows += [
                [spec.tenant, f"{name}.count", spec.tags, ts, count],
                [spec.tenant, f"{name}.sum", spec.tags, ts,
                 _int64(round_half_even(v / rate), "scaled sum")],
                [spec.tenant, name, {**tags, BUCKET_TAG: bucket}, ts, count],
            ]
        return rows

    def _spec(self, name: str, rest: str, now: int) -> _Spec:
        """Check everything of a line but its value; raises _Refused naming the problem."""
        fields = rest.split("|")
        kind = fields[0]
        if kind in _UNSUPPORTED:
            raise _Refused("unsupported_type", f"type {kind!r}: {_UNSUPPORTED[kind]}")
        if kind != "c" and kind not in _TIMER_TYPES:
            raise _Refused("malformed", f"type {kind[:20]!r}: expected c, ms, h, d (g, s refused)")
        rate: Fraction | None = None
        tags_text: str | None = None
        ts: int | None = None
        seen: set[str] = set()
        for f in fields[1:]:
            tag = f[:1]
            if tag in seen or tag not in ("@", "#", "T"):
                what = "repeated" if tag in seen else "unknown"
                raise _Refused("malformed", f"{what} field {f[:20]!r}: expected @rate, #tags, T")
            seen.add(tag)
            if tag == "@":
                rate = _number(f[1:], "sample rate", "bad_rate")
                if not 0 < rate <= 1:
                    raise _Refused("bad_rate", f"sample rate {f[1:]} is not in (0, 1]")
                if rate == 1:
                    rate = None
            elif tag == "#":
                tags_text = f[1:]
            else:
                ts = self._timestamp(f[1:], now)
        tenant, tags = self._tags_of(tags_text)
        counter = kind == "c"
        if counter:
            self._check_name(name)
        else:
            if BUCKET_TAG in tags:
                raise _Refused("bad_tag",
                               f"tag {BUCKET_TAG!r} is tally's bucket tag on {kind} lines")
            if len(tags) >= MAX_TAGS:
                raise _Refused("bad_tag", f"{len(tags)} tags and the {BUCKET_TAG!r} bucket "
                               f"tag; at most {MAX_TAGS}")
            for n in (name, f"{name}.count", f"{name}.sum"):
                self._check_name(n)
        return _Spec(kind, counter, rate, tenant, tags or None, ts)

    @staticmethod
    def _timestamp(text: str, now: int) -> int:
        if not text.isascii() or not text.isdigit() or len(text) > 12:
            raise _Refused("bad_timestamp", f"timestamp {text[:20]!r} is not Unix seconds")
        ts = int(text)
        if ts > now + FUTURE_TOLERANCE:
            raise _Refused(
                "bad_timestamp", f"timestamp {ts} is {ts - now} s ahead of the server clock; "
                f"at most {FUTURE_TOLERANCE} s is accepted")
        return ts

    def _check_name(self, name: str) -> None:
        if name in self._names:
            return
        try:
            check_metric(name)
        except InvalidSeries as e:
            raise _Refused("bad_name", str(e)) from None
        if len(self._names) >= self.cache_limit:
            self._names.clear()
        self._names.add(name)

    def _tags_of(self, text: str | None) -> tuple[str, dict[str, str]]:
        """The line's tenant and its other tags (shared with the cache: not to be changed)."""
        if text is None:
            tenant, tags = None, {}
        else:
            cached = self._tags.get(text)
            if cached is None:
                cached = self._parse_tags(text)
                if len(self._tags) >= self.cache_limit:
                    self._tags.clear()
                self._tags[text] = cached
            tenant, tags = cached
        tenant = tenant if tenant is not None else self.default_tenant
        if tenant is None:
            raise _Refused("no_tenant", "no tenant tag and no --statsd-tenant on this listener")
        return tenant, tags

    @staticmethod
    def _parse_tags(text: str) -> tuple[str | None, dict[str, str]]:
        tags: dict[str, str] = {}
        tenant: str | None = None
        for item in text.split(","):
            key, _, value = item.partition(":")
            try:
                if key == TENANT_TAG:
                    if tenant is not None:
                        raise _Refused("bad_tenant", "tenant tag given twice")
                    try:
                        tenant = check_tenant(value)
                    except InvalidSeries as e:
                        raise _Refused("bad_tenant", str(e)) from None
                    continue
                check_tag_key(key)
                check_tag_value(key, value)
            except InvalidSeries as e:
                raise _Refused("bad_tag", str(e)) from None
            if key in tags:
                raise _Refused("bad_tag", f"tag {key!r} given twice")
            tags[key] = value
        if len(tags) > MAX_TAGS:
            raise _Refused("bad_tag", f"{len(tags)} tags; at most {MAX_TAGS}")
        return tenant, tags


# ---- folding: many datagrams into one sum per (series, hour) ---------------------------


class Series:
    """One series of folded lines. Hashed by identity: the fold's dicts key on the object
    the line cache hands out, which costs no tuple hashing per line."""

    __slots__ = ("metric", "tags", "tenant")

    def __init__(self, tenant: str, metric: str, tags: dict[str, str] | None) -> None:
        self.tenant, self.metric, self.tags = tenant, metric, tags


# One datagram (or run of TCP lines) as it came: (data, receive time, its first line's
# number, datagram or TCP, peer). Kept until its window is applied, so that a window the
# shards refuse can be parsed again line by line (``StatsdFolder.replay``); a tuple, as it
# costs least to make.
Received = tuple[bytes, float, int, bool, Any]


@dataclass(slots=True)
class Window:
    """What a listener received between two flushes, folded.

    ``sums``: hour -> series -> sum of the values of its lines (an exact Python
    int, which may be outside int64: the batch then names it); ``rows``: rows of
    lines that were not folded (``|T`` timestamps, a buffer near its bound), as
    the parser gives them; ``lines``: the good lines behind both, and
    ``increments`` their rows before folding (what the metrics count).
    """

    sums: dict[int, dict[Series, int]] = field(default_factory=dict)
    rows: list[list[Any]] = field(default_factory=list)
    lines: int = 0
    increments: int = 0  # rows of those lines, before folding (a timer line is three)
    received: list[Received] = field(default_factory=list)

    def batch_rows(self) -> list[list[Any]]:
        """One row per (series, hour) with a folded sum, then the unfolded rows."""
        out = [[s.tenant, s.metric, s.tags, hour * 3600, v]
               for hour, sums in self.sums.items() for s, v in sums.items()]
        out += self.rows
        return out


_BLANK: list[tuple[Series, int]] = []  # a blank line: no row, not counted as a line


class StatsdFolder:
    """Folds datagrams into sums per (series, hour) as they arrive: bytes in, a Window out.

    Why: a StatsD client sends the same lines over and over (``hits:1|c``), and
    the cost that matters is per line. Each distinct line, value included, is
    parsed once (by ``StatsdParser``, with its own per-shape cache) and its rows
    kept as ``(Series, value)`` pairs; afterwards a line costs one dict lookup
    and one add, and a window of a million lines crosses to the shards as one
    row per series and hour. Lines with a ``|T`` timestamp are parsed each time
    (the future check depends on the receive time) and kept as rows.

    The semantics are the parser's: a line is refused or accepted exactly as
    ``StatsdParser.parse`` would at the same receive second. ``max_rows``
    bounds the rows a window holds (a timer line is three): the good lines of a
    datagram that would pass it are refused as ``overloaded``, whole datagrams
    at a time. Refusals collect in ``refused`` with the peer given, for the
    caller to count and log.
    """

    def __init__(self, parser: StatsdParser, max_rows: int = 2_000_000,
                 cache_limit: int = 100_000) -> None:
        self.parser = parser
        self.max_rows = max_rows
        self.cache_limit = cache_limit
        self.refused: list[tuple[Rejection, Any]] = []
        self.rows = 0  # rows of the window so far
        self._entries: dict[bytes, tuple[Series, int] | list[tuple[Series, int]]] = {
            b"": _BLANK}
        self._series: dict[tuple[Any, ...], Series] = {}
        self._once: set[bytes] = set()  # lines parsed once, cached when seen again
        self._window = Window()
        self.lines = 0  # good lines of the window so far
        self._received: list[Received] = []
        self._hour_from = self._hour_to = 0.0  # the hour that ``_sums`` adds up
        self._sums: dict[Series, int] = {}

    def take(self) -> Window:
        """The window so far; the next one starts empty."""
        window, self._window = self._window, Window()
        window.lines, window.increments, window.received = self.lines, self.rows, self._received
        self._hour_from = self._hour_to = 0.0
        self._sums, self.rows, self.lines, self._received = {}, 0, 0, []
        return window

    def fold(self, data: bytes, now: float, first_line: int = 0, datagram: bool = True,
             peer: Any = None) -> int:
        """Fold one datagram (or complete TCP lines); returns its non-empty lines.

        ``first_line`` numbers its first line, as in ``StatsdParser.parse``. The
        loop is kept to a lookup and an add per line: it is the listener's cost.
        """
        pieces = data.split(b"\n")
        if self.rows + 3 * len(pieces) > self.max_rows or (datagram and len(data) > MAX_DATAGRAM):
            return self._unfolded(data, now, first_line, datagram, peer)
        if not self._hour_from <= now < self._hour_to:
            self._enter_hour(now)
        sums = self._sums
        add = sums.get
        get = self._entries.get
        good = extra = refused = 0
        for line in pieces:
            e = get(line)
            if e is None:
                e = self._miss(line, now, first_line + good + refused, peer)
                if e is None:
                    refused += 1
                    continue
                if e.__class__ is int:  # a |T line, kept as its rows
                    good += 1
                    extra += e - 1  # type: ignore[operator]
                    continue
            if e.__class__ is tuple:
                s, v = e  # type: ignore[misc]
                sums[s] = add(s, 0) + v
                good += 1
            elif e:
                for s, v in e:  # type: ignore[union-attr]
                    sums[s] = add(s, 0) + v
                good += 1
                extra += len(e) - 1  # type: ignore[arg-type]
        if good:
            self.lines += good
            self.rows += good + extra
            self._received.append((data, now, first_line, datagram, peer))
        return good + refused

    def _enter_hour(self, now: float) -> None:
        hour = int(now) // 3600
        self._hour_from, self._hour_to = hour * 3600, hour * 3600 + 3600
        self._sums = self._window.sums.setdefault(hour, {})

    def _miss(self, line: bytes, now: float, index: int,
              peer: Any) -> tuple[Series, int] | list[tuple[Series, int]] | int | None:
        """A line not in the cache: parse it. Its entry when it is seen a second time and
        its rows hold at any receive time (cached; ``_BLANK`` for whitespace); the number
        of rows kept as they are when it is new, or has its own ``|T`` timestamp (checked
        against each receive time, so never cached); None when it is refused (recorded in
        ``refused``)."""
        # (parse()'s steps for one line, without its per-call costs)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.refused.append((Rejection(index, "not_utf8", "line is not UTF-8"), peer))
            return None
        if not text or text.isspace():
            self._cache(line, _BLANK)
            return _BLANK
        try:
            rows = self.parser._line(text.strip(), int(now))
        except _Refused as e:
            self.refused.append((Rejection(index, e.reason, e.message), peer))
            return None
        # Kept as rows, not cached: a |T line (no name or tag holds a |: this is the
        # timestamp field), and a line seen for the first time; a client that never
        # repeats a line (a timer's every value distinct) would fill the cache for nothing.
        if b"|T" in line or line not in self._once:
            if b"|T" not in line:
                if len(self._once) >= self.cache_limit:
                    self._once.clear()
                self._once.add(line)
            self._window.rows.extend(rows)
            return len(rows)
        self._once.discard(line)
        pairs = [(self._series_of(r[0], r[1], r[2]), r[4]) for r in rows]
        entry: tuple[Series, int] | list[tuple[Series, int]] = (
            pairs[0] if len(pairs) == 1 else pairs)
        self._cache(line, entry)
        return entry

    def _cache(self, line: bytes, entry: Any) -> None:
        if len(self._entries) >= self.cache_limit:
            self._entries.clear()
            self._entries[b""] = _BLANK
        self._entries[line] = entry

    def _series_of(self, tenant: str, metric: str, tags: dict[str, str] | None) -> Series:
        key = (tenant, metric, *(tags.items() if tags else ()))
        s = self._series.get(key)
        if s is None:
            if len(self._series) >= self.cache_limit:
                self._series.clear()
            s = self._series[key] = Series(tenant, metric, tags)
        return s

    def _unfolded(self, data: bytes, now: float, first_line: int, datagram: bool,
                  peer: Any) -> int:
        """Parse as rows (a window near its bound, an oversize datagram): the bound is
        checked against the datagram's exact rows before any is kept."""
        parsed = self.parser.parse(data, now, first_line, datagram)
        self.refused.extend((r, peer) for r in parsed.rejections)
        if parsed.rows:
            if self.rows + len(parsed.rows) > self.max_rows:
                message = (f"{self.rows} rows wait for the shards; at most {self.max_rows}: "
                           "the datagram's good lines are refused")
                self.refused.extend((Rejection(line, "overloaded", message), peer)
                                    for line in sorted(set(parsed.row_lines)))
            else:
                self._window.rows.extend(parsed.rows)
                self.lines += parsed.accepted_lines
                self._received.append((data, now, first_line, datagram, peer))
                self.rows += len(parsed.rows)
        return parsed.lines

    def replay(self, window: Window) -> tuple[list[list[Any]], list[int], dict[int, Any]]:
        """A window's good lines parsed again one row per line value, as the parser gives
        them: (rows, the line number of each, the peer of each datagram by first line).
        Its refusals were recorded when it was folded and are not repeated."""
        rows: list[list[Any]] = []
        lines: list[int] = []
        peers: dict[int, Any] = {}
        for data, now, first_line, datagram, peer in window.received:
            parsed = self.parser.parse(data, now, first_line, datagram)
            rows += parsed.rows
            lines += parsed.row_lines
            peers[first_line] = peer
        return rows, lines, peers
