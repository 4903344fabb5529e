"""Series identity: validation, the canonical series id, and the shard hash.

The series id is what every layer agrees on: shards are chosen by its hash,
month documents are keyed by it (``<sid>|YYYY-MM``), and it parses back into
tenant, metric and tags so nothing else needs to travel with it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from sys import intern
from typing import Any

TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
METRIC_RE = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
TAG_KEY_RE = re.compile(r"[a-z_][a-z0-9_]{0,63}")
MAX_TAGS = 16
MAX_TAG_VALUE = 200

# Characters with a meaning inside a series id; escaped in tag values only
# (tenant, metric and tag keys cannot contain them).
_ESCAPES = {"%": "%25", ",": "%2C", "=": "%3D", "|": "%7C"}
_ESCAPE_RE = re.compile(r"[%,=|]")
_UNESCAPE_RE = re.compile(r"%(25|2C|3D|7C)")
_UNESCAPES = {v[1:]: k for k, v in _ESCAPES.items()}


class InvalidSeries(ValueError):
    """A tenant, metric or tag that breaks the data model; the message names it."""


@dataclass(frozen=True, slots=True)
class SeriesKey:
    tenant: str
    metric: str
    tags: tuple[tuple[str, str], ...]  # sorted by key

    @property
    def sid(self) -> str:
        return format_series_id(self.tenant, self.metric, self.tags)

    def tag_dict(self) -> dict[str, str]:
        return dict(self.tags)


def check_tenant(tenant: Any) -> str:
    if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
        raise InvalidSeries(
            f"tenant {tenant!r} is invalid: expected [a-z0-9][a-z0-9_-]{{0,63}}"
        )
    return tenant


def check_metric(metric: Any) -> str:
    if not isinstance(metric, str) or not METRIC_RE.fullmatch(metric):
        raise InvalidSeries(f"metric {metric!r} is invalid: expected [A-Za-z0-9_.:-]{{1,200}}")
    return metric


def check_tag_key(key: Any) -> str:
    if not isinstance(key, str) or not TAG_KEY_RE.fullmatch(key):
        raise InvalidSeries(f"tag key {key!r} is invalid: expected [a-z_][a-z0-9_]{{0,63}}")
    return key


def check_tag_value(key: str, value: Any) -> str:
    if not isinstance(value, str):
        kind = type(value).__name__
        raise InvalidSeries(f"tag {key!r} has a {kind} value; tag values are strings")
    if len(value) > MAX_TAG_VALUE:
        raise InvalidSeries(
            f"tag {key!r} value is {len(value)} characters; at most {MAX_TAG_VALUE}"
        )
    return value


def check_tags(tags: Any) -> tuple[tuple[str, str], ...]:
    if tags is None:
        return ()
    if not isinstance(tags, dict):
        raise InvalidSeries(f"tags must be a map or nil, not {type(tags).__name__}")
    if len(tags) > MAX_TAGS:
        raise InvalidSeries(f"{len(tags)} tags; at most {MAX_TAGS}")
    return tuple(sorted((check_tag_key(k), check_tag_value(k, v)) for k, v in tags.items()))


def series_key(tenant: Any, metric: Any, tags: Any) -> SeriesKey:
    """Validate the three parts of a series; raises InvalidSeries naming the bad part."""
    return SeriesKey(check_tenant(tenant), check_metric(metric), check_tags(tags))


def _escape(value: str) -> str:
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group(0)], value)


def _unescape(value: str) -> str:
    return _UNESCAPE_RE.sub(lambda m: _UNESCAPES[m.group(1)], value)


def format_series_id(tenant: str, metric: str, tags: tuple[tuple[str, str], ...]) -> str:
    """``tenant|metric|k=v,k2=v2`` with tags sorted; readable in a Mongo shell."""
    return f"{tenant}|{metric}|" + ",".join(f"{k}={_escape(v)}" for k, v in tags)


def parse_series_id(sid: str) -> SeriesKey:
    """The key of a series id. Tenants, metrics and tag keys are interned: a shard
    holding a million series of a few metrics keeps one copy of each name."""
    tenant, metric, tag_part = sid.split("|", 2)
    tags: list[tuple[str, str]] = []
    if tag_part:
        for item in tag_part.split(","):
            k, v = item.split("=", 1)
            tags.append((intern(k), _unescape(v)))
    return SeriesKey(intern(tenant), intern(metric), tuple(tags))


_VALUE_CHARS = r"(?:[^%,=|]|%(?:25|2C|3D|7C))*"
_PAIR = rf"[a-z_][a-z0-9_]{{0,63}}={_VALUE_CHARS}"
# the shape of a canonical id; what a pattern cannot say (keys in order, lengths of
# unescaped values, how many tags) ``plainly_canonical`` checks after it
_SHAPE_RE = re.compile(
    rf"[a-z0-9][a-z0-9_-]{{0,63}}\|[A-Za-z0-9_.:-]{{1,200}}\|(?:{_PAIR}(?:,{_PAIR})*)?")


def plainly_canonical(sid: str) -> bool:
    """True when ``sid`` is certainly a canonical series id (a pattern and a pass over its
    tags: several times cheaper than parsing it and formatting it again); False when in
    any doubt, for ``series_key`` to decide and name the problem."""
    if type(sid) is not str or _SHAPE_RE.fullmatch(sid) is None:
        return False
    tag_part = sid.split("|", 2)[2]
    if not tag_part:
        return True
    items = tag_part.split(",")
    if len(items) > MAX_TAGS:
        return False
    last = ""
    for item in items:
        key, value = item.split("=", 1)
        if key <= last or len(value) - 2 * value.count("%") > MAX_TAG_VALUE:
            return False
        last = key
    return True


def series_id(tenant: Any, metric: Any, tags: Any) -> str:
    return series_key(tenant, metric, tags).sid


def shard_of(sid: str, shards: int) -> int:
    """Stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.blake2b(sid.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def matches(tags: tuple[tuple[str, str], ...] | dict[str, str], where: dict[str, str]) -> bool:
    """True when the series' tags include every ``where`` pair."""
    if not where:
        return True
    d = tags if isinstance(tags, dict) else dict(tags)
    return all(d.get(k) == v for k, v in where.items())
