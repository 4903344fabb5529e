"""Event fan-out rules: one event in, its metric increments out (sans I/O).

Producers that would rather not know metric names send events
(``{"type", "tenant", "ts", ...fields}``); a rule says which increments one
event of a type makes. The output is rows in the row ingest shape
(``[tenant, metric, tags|nil, ts, value]``), so everything after fan-out --
validation against the data model, aggregation, routing, dedup, durability --
is the row path's code, and events cannot drift from increments.

What fan-out itself refuses is what only it can see: an event that is not a
map, a missing or mistyped envelope (``type``, ``tenant``, ``ts``), a type no
rule covers, a field a rule needs that is missing or of the wrong type. It
never drops an event or a field silently (design: "never silently dropped");
fields no rule reads are ignored, since events carry more than metrics need.

Rules files (TOML, ``tally serve --rules FILE``)::

    builtin = true            # also apply the built-in customer-service rules

    [[rule]]
    name = "orders by country"   # optional; default "<event> -> <metric>"
    event = "order.placed"
    metric = "orders.placed"
    tags = ["country", "plan"]   # fields copied as tags (or a table: {tag = "field"})
    value = "items"              # optional: the field holding the increment (default 1)
    min = 0                      # optional: value / bucket field below this is refused

    [rule.bucket]                # optional: a numeric field becomes a tag by ranges
    field = "amount_cents"
    tag = "size"
    edges = [1000, 10000]        # ascending; a number equal to an edge goes above it
    labels = ["small", "medium", "large"]   # one more than edges

A file *replaces* the built-in rules unless it says ``builtin = true``. That
is what StatsD mappings and Prometheus relabelling configs do: the file is the
whole truth about what metrics an event makes, so a deployment for another
domain does not find customer-service metrics in its catalog, and reading one
file tells an operator everything that is counted. Keeping the built-ins is
one line.
"""

from __future__ import annotations

import math
import tomllib
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tally.wire.series import (
    MAX_TAGS,
    InvalidSeries,
    check_metric,
    check_tag_key,
    check_tag_value,
)

ENVELOPE = ("type", "tenant", "ts")  # every event's own keys; not fields a rule may read
MAX_EVENT_TYPE = 200
EVENT_SHAPE = "an event is a map {type, tenant, ts, ...fields}"


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the rule and the key."""


class BadEvent(ValueError):
    """An event fan-out refuses; ``event`` is its index in the batch, ``field`` the culprit.

    Answered as ``bad_row`` with ``row`` = ``event``; the whole batch is refused.
    """

    def __init__(self, event: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.event = event
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Buckets:
    """A numeric field turned into a tag by ranges (response times into ``lt_30m``...).

    ``labels[k]`` covers ``edges[k-1] <= x < edges[k]``: a number equal to an
    edge belongs to the bucket above it, so ``lt_30m`` really means "< 30 min".
    """

    field: str
    tag: str
    edges: tuple[float, ...]
    labels: tuple[str, ...]

    def label(self, x: float) -> str:
        return self.labels[bisect_right(self.edges, x)]


@dataclass(frozen=True, slots=True)
class Rule:
    """One increment per matching event: ``metric`` with tags from fields, at the event's ts."""

    name: str
    event: str
    metric: str
    tags: tuple[tuple[str, str], ...] = ()  # (tag key, event field)
    value: str | None = None  # the field holding the increment; None: 1
    bucket: Buckets | None = None
    minimum: float | None = None  # the value and bucket fields must be >= this

    def fields(self) -> list[str]:
        """Every event field the rule reads (for messages and documentation)."""
        out = [f for _, f in self.tags]
        if self.bucket is not None:
            out.append(self.bucket.field)
        if self.value is not None:
            out.append(self.value)
        return list(dict.fromkeys(out))


@dataclass(slots=True)
class FanOut:
    """The rows of a batch of events, and where each row came from.

    Rows are in event order (all of event 0's, then event 1's...), so
    ``origin`` is non-decreasing and "the first bad row" maps to "the first
    bad event". When ``error`` is set, ``rows`` hold only the events before
    it: a row problem among them (a bad tenant, a ts in the future) comes
    first and is the one to report.
    """

    rows: list[list[Any]] = field(default_factory=list)  # [tenant, metric, tags|nil, ts, value]
    origin: list[int] = field(default_factory=list)  # the event index of each row
    rule: list[str] = field(default_factory=list)  # the rule name of each row
    error: BadEvent | None = None


def _kind(x: Any) -> str:
    """What ``x`` is, with its article: 'an integer', 'a map'."""
    kind = {bool: "bool", float: "float", int: "integer", str: "string", type(None): "nil",
            list: "list", dict: "map", bytes: "binary"}.get(type(x), type(x).__name__)
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Rules:
    """A set of rules, indexed by event type; picklable (it travels to the gateway actor)."""

    rules: tuple[Rule, ...]
    source: str = "built-in rules"
    by_event: dict[str, tuple[Rule, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, list[Rule]] = {}
        for rule in self.rules:
            index.setdefault(rule.event, []).append(rule)
        object.__setattr__(self, "by_event", {k: tuple(v) for k, v in index.items()})

    @property
    def event_types(self) -> list[str]:
        return sorted(self.by_event)

    def fan_out(self, events: list[Any]) -> FanOut:
        """Rows for ``events``, stopping at the first event fan-out refuses."""
        out = FanOut()
        rows, origin, made_by = out.rows, out.origin, out.rule
        for n, event in enumerate(events):
            try:
                made = self.event_rows(n, event)
            except BadEvent as e:
                out.error = e
                return out
            for rule, row in made:
                rows.append(row)
                origin.append(n)
                made_by.append(rule.name)
        return out

    def event_rows(self, n: int, event: Any) -> list[tuple[Rule, list[Any]]]:
        """The rows of event ``n`` with the rule behind each; ``BadEvent`` names the field."""
        if type(event) is not dict:
            raise BadEvent(n, None, f"event {n}: {EVENT_SHAPE}, not {_kind(event)}")
        etype = event.get("type")
        if type(etype) is not str:
            raise BadEvent(n, "type", f"event {n}: {_envelope_problem('type', etype, event)}")
        rules = self.by_event.get(etype)
        if rules is None:
            covered = ", ".join(self.event_types[:20]) or "none"
            raise BadEvent(
                n, "type",
                f"event {n}: no rule for type {_short(etype)} ({self.source} cover: {covered})",
            )
        tenant = event.get("tenant")
        if type(tenant) is not str:
            raise BadEvent(n, "tenant", f"event {n}: {_envelope_problem('tenant', tenant, event)}")
        ts = event.get("ts")
        if type(ts) is not int:
            raise BadEvent(n, "ts", f"event {n}: {_envelope_problem('ts', ts, event)}")
        made = []
        for rule in rules:
            tags: dict[str, str] = {}
            for key, name in rule.tags:
                tags[key] = _text_field(n, event, name, rule, key)
            if rule.bucket is not None:
                x = _number_field(n, event, rule.bucket.field, rule)
                tags[rule.bucket.tag] = rule.bucket.label(x)
            value: int = 1
            if rule.value is not None:
                x = _number_field(n, event, rule.value, rule)
                value = x if type(x) is int else round(x)
            made.append((rule, [tenant, rule.metric, tags or None, ts, value]))
        return made


def _envelope_problem(key: str, x: Any, event: dict) -> str:
    want = "integer Unix seconds" if key == "ts" else "a string"
    if key not in event:
        return f"{key} is missing; {EVENT_SHAPE}"
    return f"{key} {_short(x)} is {_kind(x)}; {key} must be {want}"


def _missing(n: int, event: dict, name: str, rule: Rule, need: str) -> BadEvent:
    what = "is missing" if name not in event else "is nil"
    return BadEvent(
        n, name,
        f"event {n} ({event['type']}): field {name!r} {what}; rule {rule.name!r} needs {need}",
    )


def _text_field(n: int, event: dict, name: str, rule: Rule, key: str) -> str:
    x = event.get(name)
    if type(x) is str:
        return x
    if x is None:
        raise _missing(n, event, name, rule, f"it as a string (tag {key!r})")
    raise BadEvent(
        n, name,
        f"event {n} ({event['type']}): field {name!r} is {_kind(x)} ({_short(x)}); "
        f"rule {rule.name!r} makes it tag {key!r}, and tag values are strings",
    )


def _number_field(n: int, event: dict, name: str, rule: Rule) -> int | float:
    x = event.get(name)
    kind = type(x)
    if kind is int or (kind is float and math.isfinite(x)):
        if rule.minimum is not None and x < rule.minimum:
            raise BadEvent(
                n, name,
                f"event {n} ({event['type']}): field {name!r} is {x}; rule {rule.name!r} "
                f"needs a number >= {rule.minimum:g}",
            )
        return x
    if x is None:
        raise _missing(n, event, name, rule, "it as a number")
    problem = "not finite" if kind is float else f"{_kind(x)} ({_short(x)})"
    raise BadEvent(
        n, name,
        f"event {n} ({event['type']}): field {name!r} is {problem}; rule {rule.name!r} "
        "needs an integer or a finite float",
    )


# -- the built-in customer-service rules ------------------------------------------------

RESPONSE_BUCKETS = Buckets(
    "response_seconds", "bucket",
    (30 * 60, 60 * 60, 4 * 3600, 24 * 3600),
    ("lt_30m", "lt_1h", "lt_4h", "lt_24h", "gt_24h"),
)

BUILTIN_RULES: tuple[Rule, ...] = (
    Rule("messages.received", "message.received", "messages.received",
         (("channel", "channel"), ("sentiment", "sentiment"))),
    Rule("messages.handled", "message.replied", "messages.handled", (("agent", "agent"),)),
    Rule("response_time", "message.replied", "response_time", bucket=RESPONSE_BUCKETS,
         minimum=0),
    Rule("response_seconds.sum", "message.replied", "response_seconds.sum",
         (("agent", "agent"),), value="response_seconds", minimum=0),
    Rule("response_seconds.count", "message.replied", "response_seconds.count",
         (("agent", "agent"),)),
)
# The rules of one event are all or nothing: response_time and response_seconds.sum
# read response_seconds with minimum=0, so a reply with a negative or missing
# response time is refused whole, never counted as handled without its time (the
# average sum / count would drift). No increment needs channel, so a reply
# without one is accepted: the design lists it among the event's fields only.

BUILTIN = Rules(BUILTIN_RULES)


# -- rules files ------------------------------------------------------------------------

Complaint = Callable[[str, str], RulesError]  # (key, problem) -> the error naming the rule

_RULE_KEYS = ("name", "event", "metric", "tags", "value", "bucket", "min")
_BUCKET_KEYS = ("field", "tag", "edges", "labels")


def parse_rules(text: str, source: str = "rules file") -> Rules:
    """The rules a TOML text declares; ``RulesError`` names the rule and the key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RulesError(f"{source}: not valid TOML: {e}") from None
    unknown = set(doc) - {"builtin", "rule"}
    if unknown:
        raise RulesError(
            f"{source}: unknown top-level keys {', '.join(sorted(unknown))}; "
            "expected builtin = true|false and [[rule]] tables"
        )
    builtin = doc.get("builtin", False)
    if type(builtin) is not bool:
        raise RulesError(f"{source}: key 'builtin': must be true or false, not {_short(builtin)}")
    entries = doc.get("rule", [])
    if not isinstance(entries, list):
        raise RulesError(f"{source}: key 'rule': must be an array of tables: [[rule]]")
    if not entries and not builtin:
        raise RulesError(
            f"{source}: no [[rule]] entries and builtin = false: every event would be refused"
        )
    rules: list[Rule] = list(BUILTIN_RULES) if builtin else []
    for n, entry in enumerate(entries, start=1):
        rules.append(_parse_rule(entry, f"{source}: rule {n}", n))
    _check_unique(rules, source, len(BUILTIN_RULES) if builtin else 0)
    return Rules(tuple(rules), source + (" (and the built-in rules)" if builtin else ""))


def load_rules(path: str) -> Rules:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise RulesError(f"rules file {path}: {e.strerror or e}") from None
    return parse_rules(text, f"rules file {path}")


def _check_unique(rules: Iterable[Rule], source: str, builtins: int) -> None:
    """Two rules with one name make errors ambiguous; two with one (event, metric) count
    every such event twice in the same metric (a query summing it would double), so both
    are refused rather than guessed at."""
    names: dict[str, int] = {}
    made: dict[tuple[str, str], int] = {}

    def what(k: int) -> str:
        return f"built-in rule {k + 1}" if k < builtins else f"rule {k - builtins + 1}"

    for k, rule in enumerate(rules):
        if rule.name in names:
            raise RulesError(
                f"{source}: {what(k)} ({rule.name!r}): key 'name': {what(names[rule.name])} "
                "has the same name"
            )
        names[rule.name] = k
        pair = (rule.event, rule.metric)
        if pair in made:
            raise RulesError(
                f"{source}: {what(k)} ({rule.name!r}): key 'metric': {what(made[pair])} "
                f"already makes {rule.metric!r} from {rule.event!r} events (each would count "
                "twice)"
            )
        made[pair] = k


def _parse_rule(entry: Any, where: str, n: int) -> Rule:
    if not isinstance(entry, dict):
        raise RulesError(f"{where}: must be a table ([[rule]])")
    name = entry.get("name")
    if name is not None and (type(name) is not str or not name):
        raise RulesError(f"{where}: key 'name': must be a non-empty string")
    event, metric = entry.get("event"), entry.get("metric")
    label = name or (f"{event} -> {metric}" if isinstance(event, str)
                     and isinstance(metric, str) else None)
    if label is not None:
        where = f"{where} ({label!r})"
    unknown = set(entry) - set(_RULE_KEYS)
    if unknown:
        raise RulesError(
            f"{where}: unknown keys {', '.join(sorted(unknown))} (a rule has "
            f"{', '.join(_RULE_KEYS)})"
        )

    def bad(key: str, problem: str) -> RulesError:
        return RulesError(f"{where}: key {key!r}: {problem}")

    if "event" not in entry:
        raise bad("event", "is missing (the event type this rule applies to)")
    if type(event) is not str or not 0 < len(event) <= MAX_EVENT_TYPE:
        raise bad("event", f"must be a string of 1 to {MAX_EVENT_TYPE} characters")
    if "metric" not in entry:
        raise bad("metric", "is missing (the metric this rule increments)")
    try:
        check_metric(metric)
    except InvalidSeries as e:
        raise bad("metric", str(e)) from None

    tags = _parse_tags(entry.get("tags"), bad)
    bucket = _parse_bucket(entry.get("bucket"), bad)
    value = entry.get("value")
    if value is not None:
        _check_field(value, "value", bad)
    keys = [k for k, _ in tags] + ([bucket.tag] if bucket is not None else [])
    if bucket is not None and bucket.tag in dict(tags):
        raise bad("bucket", f"tag {bucket.tag!r} is also in 'tags'")
    if len(keys) > MAX_TAGS:
        raise bad("tags", f"{len(keys)} tags with the bucket; at most {MAX_TAGS}")
    minimum = entry.get("min")
    if minimum is not None:
        if type(minimum) not in (int, float) or not math.isfinite(minimum):
            raise bad("min", f"must be a finite number, not {_short(minimum)}")
        if value is None and bucket is None:
            raise bad("min", "applies to the 'value' and 'bucket' fields; this rule has neither")
    return Rule(label or f"rule {n}", event, metric, tags, value, bucket, minimum)


def _check_field(name: Any, key: str, bad: Complaint) -> str:
    if type(name) is not str or not name:
        raise bad(key, f"must name an event field (a non-empty string), not {_short(name)}")
    if name in ENVELOPE:
        raise bad(key, f"{name!r} is part of every event's envelope (type, tenant, ts), "
                  "not a field a rule may read")
    return name


def _parse_tags(raw: Any, bad: Complaint) -> tuple[tuple[str, str], ...]:
    """A list of fields (each becomes the tag of the same name) or a table {tag = "field"}."""
    if raw is None:
        return ()
    if isinstance(raw, list):
        pairs = [(f, f) for f in raw]
    elif isinstance(raw, dict):
        pairs = list(raw.items())
    else:
        raise bad("tags", "must be a list of field names or a table {tag = \"field\"}")
    out: list[tuple[str, str]] = []
    for key, name in pairs:
        _check_field(name, "tags", bad)
        try:
            check_tag_key(key)
        except InvalidSeries as e:
            raise bad("tags", f"{e} (a field used as a tag must be a valid tag key, or map "
                      "it: tags = {{tag = \"field\"}})") from None
        out.append((key, name))
    if len({k for k, _ in out}) != len(out):
        raise bad("tags", "names a tag twice")
    return tuple(out)


def _parse_bucket(raw: Any, bad: Complaint) -> Buckets | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise bad("bucket", "must be a table: [rule.bucket] with field, tag, edges, labels")
    unknown = set(raw) - set(_BUCKET_KEYS)
    if unknown:
        raise bad("bucket", f"unknown keys {', '.join(sorted(unknown))} (a bucket has "
                  f"{', '.join(_BUCKET_KEYS)})")
    for key in _BUCKET_KEYS:
        if key not in raw:
            raise bad(f"bucket.{key}", "is missing")
    name = _check_field(raw["field"], "bucket.field", bad)
    tag = raw["tag"]
    try:
        check_tag_key(tag)
    except InvalidSeries as e:
        raise bad("bucket.tag", str(e)) from None
    edges = raw["edges"]
    if (not isinstance(edges, list) or not edges
            or not all(type(x) in (int, float) and math.isfinite(x) for x in edges)):
        raise bad("bucket.edges", "must be a non-empty list of finite numbers")
    if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise bad("bucket.edges", f"must be strictly ascending: {edges}")
    labels = raw["labels"]
    if not isinstance(labels, list) or len(labels) != len(edges) + 1:
        raise bad("bucket.labels", f"must be a list of {len(edges) + 1} labels (one more than "
                  f"edges: below the first edge, between each pair, from the last one up)")
    try:
        for label in labels:
            check_tag_value(tag, label)
    except InvalidSeries as e:
        raise bad("bucket.labels", str(e)) from None
    if len(set(labels)) != len(labels):
        raise bad("bucket.labels", "has a label twice (the buckets would merge)")
    return Buckets(name, tag, tuple(edges), tuple(labels))
