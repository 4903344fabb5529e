"""What the caller gives, checked on the caller's thread before anything is buffered.

The server refuses a batch all or nothing, so one bad increment that got
into a batch would take up to ``batch_size - 1`` good ones down with it. So
``inc`` and ``event`` check here what is cheap to check -- types, the series
(with the server's own rules, cached per series), int64 ranges, a ts at
most an hour ahead of this machine's clock -- and raise ``TypeError`` or
``ValueError`` (``InvalidSeries``) at once. The range checks are the
server's own (``tally.wire.vocabulary``), so both refuse the same values in
the same words. The client's options are checked here too.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import msgpack

from tally.client.errors import Tags, short
from tally.wire.frames import DEFAULT_MAX_FRAME, MAX_PRODUCER
from tally.wire.series import check_tenant, series_key
from tally.wire.vocabulary import ts_limit, ts_problem, value_problem

__all__ = [
    "SeriesCache",
    "SeriesEntry",
    "as_int",
    "check_options",
    "check_ts",
    "prepare_event",
    "prepare_increment",
]

MIN_MAX_BATCH_BYTES = 64 * 1024  # the largest valid series entry (16 long tags) fits ~4 times


@dataclass(slots=True, frozen=True, eq=False)
class SeriesEntry:
    """A validated series as it goes on the wire, with its packed size (for the byte cap).

    Compared and hashed by identity: the open batch indexes its series table
    by entry, and an identity hash costs nothing, where hashing the nested
    tuple of a series key again would cost time on every increment. (Two
    entries for one series, after the cache was cleared, only mean a
    duplicate table row, which the server merges.)
    """

    wire: tuple[str, str, Tags]
    size: int


SeriesCacheKey = tuple[str, str, tuple[tuple[str, str], ...]]


class SeriesCache:
    """Validates each distinct (tenant, metric, tags) once, with the server's rules.

    ``series_key`` runs regular expressions over every part; a dict hit costs
    a tuple and a hash, so repeated series cost almost nothing. Bounded: it
    is cleared when it reaches ``limit`` entries (a cheap, safe eviction: a
    miss only re-validates).
    """

    __slots__ = ("_map", "_limit")

    def __init__(self, limit: int = 100_000) -> None:
        self._map: dict[SeriesCacheKey, SeriesEntry] = {}
        self._limit = limit

    def lookup(self, tenant: Any, metric: Any, tags: Any) -> SeriesEntry:
        """The series' wire entry; raises ``InvalidSeries`` (a ``ValueError``)."""
        try:
            hit = self._map.get(_cache_key(tenant, metric, tags))
        except TypeError:
            hit = None  # unhashable or unorderable parts: series_key below says what is wrong
        if hit is not None:
            return hit
        sk = series_key(tenant, metric, tags)
        wire = (sk.tenant, sk.metric, dict(sk.tags) if sk.tags else None)
        entry = SeriesEntry(wire, len(msgpack.packb(list(wire), use_bin_type=True)))
        if len(self._map) >= self._limit:
            self._map.clear()
        self._map[(sk.tenant, sk.metric, sk.tags)] = entry
        return entry


def _cache_key(tenant: Any, metric: Any, tags: Any) -> Any:
    """The key a valid series is cached under (tags sorted), or None for tags of another type."""
    if tags is None:
        return (tenant, metric, ())
    if type(tags) is not dict:
        return None
    items = tuple(tags.items())
    return (tenant, metric, items if len(items) < 2 else tuple(sorted(items)))


def as_int(x: Any, what: str) -> int:
    """``x`` as a Python int: any integral number (numpy's too), never a bool or a float."""
    if type(x) is int:
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{what} must be an int, not {type(x).__name__}")
    return int(x)


def check_ts(ts: Any, now: float) -> int:
    """A valid ts (Unix seconds) at wall clock ``now``; None means now."""
    if ts is None:
        return int(now)
    ts = as_int(ts, "ts")
    problem = ts_problem(ts, ts_limit(now), "this machine's clock")
    if problem is not None:
        raise ValueError(f"{problem} (the server refuses it, and the whole batch with it)")
    return ts


def prepare_increment(
    cache: SeriesCache, tenant: Any, metric: Any, value: Any, ts: Any, tags: Any, now: float
) -> tuple[SeriesEntry, int, int]:
    """Validate one increment on the caller's thread; the error names what is wrong."""
    ts = check_ts(ts, now)
    value = as_int(value, "value")
    problem = value_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return cache.lookup(tenant, metric, tags), ts, value


def prepare_event(
    tenant: Any, type: Any, ts: Any, fields: dict[str, Any], now: float
) -> tuple[dict[str, Any], int]:
    """Validate one event's envelope on the caller's thread; the event and its packed size.

    The rules are the server's, so only what any rule set would refuse is
    checked here: the tenant, the type, the ts, and fields msgpack can carry.
    """
    check_tenant(tenant)
    if not isinstance(type, str) or not type:
        raise TypeError(f"event type must be a non-empty string, not {short(type)}")
    event = {"type": type, "tenant": tenant, "ts": check_ts(ts, now), **fields}
    try:
        size = len(msgpack.packb(event, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"event fields must be msgpack values (str, int, float, bool, None, "
                        f"lists, maps): {exc}") from None
    return event, size


def check_options(
    producer: Any,
    token: Any,
    *,
    batch_size: Any,
    linger: float | None,
    timeout: float,
    max_pending: Any,
    max_batch_bytes: int,
    max_in_flight: Any,
    backoff: tuple[float, float],
) -> None:
    """Refuse options the client cannot work with, naming the option (see ``TallyClient``)."""
    if type(producer) is not str or not 1 <= len(producer) <= MAX_PRODUCER:
        raise ValueError(f"producer must be a string of 1 to {MAX_PRODUCER} characters")
    if token is not None and type(token) is not str:
        raise TypeError("token must be a string or None")
    if as_int(batch_size, "batch_size") < 1:
        raise ValueError("batch_size must be at least 1")
    if linger is not None and not linger >= 0:
        raise ValueError("linger must be >= 0 seconds, or None (no linger)")
    if not timeout > 0:
        raise ValueError("timeout must be > 0 seconds")
    if as_int(max_pending, "max_pending") < 1:
        raise ValueError("max_pending must be at least 1")
    if not MIN_MAX_BATCH_BYTES <= max_batch_bytes <= DEFAULT_MAX_FRAME:
        raise ValueError(
            f"max_batch_bytes must be in [{MIN_MAX_BATCH_BYTES}, {DEFAULT_MAX_FRAME}] "
            "(the server's default frame limit)"
        )
    if as_int(max_in_flight, "max_in_flight") < 1:
        raise ValueError("max_in_flight must be at least 1")
    base, cap = backoff
    if not 0 < base <= cap:
        raise ValueError("backoff must be (first delay, cap) with 0 < first <= cap")
