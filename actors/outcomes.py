"""What became of a batch at a shard: the typed result of ``ShardState.ingest``.

The shard tells outcomes apart that the gateway answers alike: a store that
cannot be read and a shard over its dirty bound are both ``overloaded`` to the
gateway and the producer (back off, resend), but only the first is a store
outage the shard actor counts and logs. So the outcome is decided where it
happens, in ShardState, and ``answer`` turns it into the dict the gateway
reads (api/service.py), unchanged on the wire: ``{"status": "applied" |
"duplicate", "ck": n}`` (plus ``"new"``), or ``{"code", "message"}`` (plus
``"aggregate"`` for a bad row).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from tally.wire.vocabulary import ErrorCode


class Outcome(Enum):
    """The outcomes of an ingest; ``code`` is how the gateway hears a refusal."""

    APPLIED = "applied"  # applied now; durable by checkpoint ``ck``
    DUPLICATE = "duplicate"  # a resend of a batch applied here; durable by ``ck``
    GAP = "gap"  # this shard lost the producer's earlier batches (it restarted)
    FULL = "full"  # over the bound of slots not yet checkpointed: retry later
    STORE_DOWN = "store_down"  # a month's stored base could not be read: retry later
    DELTA_OVERFLOW = "delta_overflow"  # an hour's change would leave int64 before a checkpoint
    BAD_ROW = "bad_row"  # an hour's or day's total would leave int64: the row is refused

    @property
    def accepted(self) -> bool:
        """Whether the batch is here (applied now or before): the answer names its ``ck``."""
        return self in (Outcome.APPLIED, Outcome.DUPLICATE)

    @property
    def code(self) -> str:
        """The error code of a refusal on the wire (a retriable one is ``overloaded``)."""
        return _CODES[self]


_CODES = {
    Outcome.GAP: "gap",
    Outcome.FULL: ErrorCode.OVERLOADED,
    Outcome.STORE_DOWN: ErrorCode.OVERLOADED,
    Outcome.DELTA_OVERFLOW: ErrorCode.OVERLOADED,
    Outcome.BAD_ROW: ErrorCode.BAD_ROW,
}


@dataclass(frozen=True, slots=True)
class Ingested:
    """The result of an ingest: its outcome and what the gateway needs to hear of it."""

    outcome: Outcome
    ck: int | None = None  # accepted: the checkpoint by which the batch is durable
    new: tuple[str, ...] = ()  # applied: series this shard did not hold before
    message: str = ""  # refused: why, for the producer
    aggregate: int | None = None  # BAD_ROW: the refused aggregate's index in the batch

    @classmethod
    def applied(cls, ck: int, new: list[str]) -> Ingested:
        return cls(Outcome.APPLIED, ck=ck, new=tuple(new))

    @classmethod
    def duplicate(cls, ck: int) -> Ingested:
        return cls(Outcome.DUPLICATE, ck=ck)

    @classmethod
    def refused(cls, outcome: Outcome, message: str, aggregate: int | None = None) -> Ingested:
        return cls(outcome, message=message, aggregate=aggregate)

    def answer(self) -> dict[str, Any]:
        """The dict the gateway reads, key for key as the shard has always answered."""
        outcome = self.outcome
        if outcome.accepted:
            out: dict[str, Any] = {"status": outcome.value, "ck": self.ck}
            if self.new:
                # series this shard did not hold: other gateways' series indexes must hear
                out["new"] = list(self.new)
            return out
        if outcome is Outcome.BAD_ROW:
            return {"code": outcome.code, "aggregate": self.aggregate, "message": self.message}
        return {"code": outcome.code, "message": self.message}
