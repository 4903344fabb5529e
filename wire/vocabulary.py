"""What client and server must agree on, defined once: error codes, int64, value and ts checks.

Both sides of the wire protocol judge the same increments. When the client
checks a value or a timestamp before buffering it, it must refuse exactly
what the server would refuse (a batch is refused all or nothing, so one
increment the client let through takes its whole batch down), and the two
must name the problem in the same words. So the checks live here, and the
client (``tally.client``) and the server's batch validation
(``tally.wire.batches``) both call them.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

from tally.wire.timeslots import FUTURE_TOLERANCE

__all__ = [
    "FUTURE_TOLERANCE",
    "INT64_MAX",
    "INT64_MIN",
    "ErrorCode",
    "kind_of",
    "short_repr",
    "ts_limit",
    "ts_problem",
    "value_problem",
]

# Counts, values and seqs are signed 64-bit integers: what numpy columns, BSON and
# SQLite hold exactly. Anything outside is refused, never wrapped or made a float.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` frame (wire protocol v1).

    A ``StrEnum``: a member equals the string on the wire, so
    ``msg["code"] == ErrorCode.OVERLOADED`` works on a decoded frame.
    """

    BAD_FRAME = "bad_frame"  # not a frame, or not msgpack: the server closes the connection
    TOO_LARGE = "too_large"  # over the server's frame limit: it closes the connection
    BAD_REQUEST = "bad_request"  # a well-formed frame the protocol does not allow
    UNAUTHORIZED = "unauthorized"  # no valid token, or a tenant the token does not cover
    BAD_ROW = "bad_row"  # an increment breaks the data model; ``row`` names the first
    OVERLOADED = "overloaded"  # the server is at its memory bound (or connection limit)
    INTERNAL = "internal"  # the server failed while handling the frame

    @property
    def retriable(self) -> bool:
        """True when sending the very same frame again later can succeed.

        ``overloaded`` and ``internal`` say nothing about the frame: the batch
        was not applied because of the server's state (a store outage filling
        its memory bound, a crashed actor), which passes. Every other code
        judges the frame itself (or the token), so the same bytes would be
        refused again: resending them would only loop.
        """
        return self in _RETRIABLE


_RETRIABLE = frozenset((ErrorCode.OVERLOADED, ErrorCode.INTERNAL))

_KINDS = {
    bool: "bool",
    float: "float",
    str: "string",
    bytes: "binary",
    type(None): "nil",
    list: "list",
    tuple: "list",
    dict: "map",
}


def kind_of(x: Any) -> str:
    """The msgpack kind of ``x`` in words ("string", "float", "nil"), for error messages."""
    return _KINDS.get(type(x), type(x).__name__)


def short_repr(x: Any, limit: int = 60) -> str:
    """``repr(x)``, cut to ``limit`` characters: an error message must stay readable."""
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ts_limit(now: float) -> int:
    """The latest ts accepted at clock ``now``, as an int so comparisons are exact."""
    return min(math.floor(now) + FUTURE_TOLERANCE, INT64_MAX)


def ts_problem(ts: Any, limit: int, clock: str = "the server clock") -> str | None:
    """What is wrong with ``ts`` (Unix seconds), or None; ``limit`` is ``ts_limit(now)``.

    ``clock`` names whose clock ``now`` was, so a refusal says where the
    hour of tolerance was measured.
    """
    if type(ts) is not int:
        return f"ts {short_repr(ts)} is a {kind_of(ts)}; timestamps are integer Unix seconds"
    if ts < 0:
        return f"ts {ts} is negative; timestamps are Unix seconds"
    if ts > limit:
        return (
            f"ts {ts} is {ts - (limit - FUTURE_TOLERANCE)} s ahead of {clock}; "
            f"at most {FUTURE_TOLERANCE} s is accepted"
        )
    return None


def value_problem(value: Any) -> str | None:
    """What is wrong with an increment's ``value``, or None: it must be an int64."""
    if type(value) is not int:
        return f"value {short_repr(value)} is a {kind_of(value)}; values are int64"
    if not INT64_MIN <= value <= INT64_MAX:
        return f"value {value} is outside int64"
    return None
