"""Turning a decoded ingest body (TCP frame or HTTP body) into a Batch.

One place decides what an `inc` or `event` body may hold, so TCP and HTTP
refuse the same things with the same codes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from tally.api.access import Denied
from tally.api.rules import Rules
from tally.api.service import IngestError
from tally.wire.batches import BadBatch, BadRow, Batch, KnownSeries, rows_batch
from tally.wire.columnar import columnar_batch
from tally.wire.registry import SeriesRegistry
from tally.wire.vocabulary import ErrorCode

ACKS = ("received", "durable")


def check_ack(ack: Any) -> str:
    if ack is None:
        return "received"
    if ack not in ACKS:
        raise IngestError(ErrorCode.BAD_REQUEST,
                f"ack must be 'received' or 'durable', not {ack!r}")
    return ack


def build_batch(
    rows: Any, series: Any, i: Any, ts: Any, v: Any, now: float,
    known: KnownSeries | None = None, registry: SeriesRegistry | None = None,
) -> Batch:
    """Validate either form; BadRow becomes ``bad_row`` with the row index. ``registry``:
    the gateway's, for rows a TCP decoder read as a block (``rows_batch``)."""
    try:
        if rows is not None:
            if series is not None:
                raise IngestError(ErrorCode.BAD_REQUEST,
                        "send either rows or series/i/ts/v, not both")
            return rows_batch(rows, now, known, registry)
        if series is None:
            raise IngestError(ErrorCode.BAD_REQUEST, "missing rows (or the columnar series/i/ts/v)")
        return columnar_batch(series, i, ts, v, now, known)
    except BadRow as e:
        raise IngestError(ErrorCode.BAD_ROW, str(e), row=e.row) from None
    except BadBatch as e:
        raise IngestError(ErrorCode.BAD_REQUEST, str(e)) from None


def json_column(name: str, values: Any, dtype: str) -> bytes:
    """JSON has no bytes: the columnar form's i/ts/v arrive there as integer lists."""
    if isinstance(values, bytes | bytearray):
        return bytes(values)
    if not isinstance(values, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in values
    ):
        raise IngestError(ErrorCode.BAD_REQUEST,
                f"{name} must be a list of integers (or msgpack bin)")
    info = np.iinfo(dtype)
    for n, x in enumerate(values):
        if not info.min <= x <= info.max:
            raise IngestError(ErrorCode.BAD_ROW, f"row {n}: {name} {x} is outside {dtype}", row=n)
    return np.asarray(values, dtype=dtype).tobytes()


def batch_tenants(batch: Batch, registry: SeriesRegistry | None = None
                  ) -> list[tuple[str, int]]:
    """Each tenant of a batch with the first input row that names it (for access checks).
    With ``registry`` and a batch named by its gateway numbers, the tenants come from the
    registry's tenant numbers: no step per series."""
    if not len(batch.sids):
        return []
    first = np.full(len(batch.sids), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, batch.series.astype(np.intp), batch.first_row)
    if registry is not None and batch.gn is not None and batch.gn_epoch == registry.epoch:
        tenant = registry.tenant[batch.gn]
        per = np.full(len(registry.tenant_names), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(per, tenant, first)
        named = np.flatnonzero(per < np.iinfo(np.int64).max)
        return [(registry.tenant_names[t], int(per[t])) for t in named.tolist()]
    rows: dict[str, int] = {}
    for sid, row in zip(batch.sids, first.tolist(), strict=True):
        tenant = sid.split("|", 1)[0]
        if row < rows.get(tenant, row + 1):
            rows[tenant] = row
    return list(rows.items())


# -- events ------------------------------------------------------------------------

_ROW_PREFIX = re.compile(r"row (\d+): ")


@dataclass(slots=True, eq=False)
class Incoming:
    """A validated batch, and how to name its rows to the client that sent it.

    Increments are the client's own rows: errors name them as they are. The
    rows of events were made by fan-out and the client never saw them, so an
    error about one (a bad tenant, a ts in the future, a slot pushed out of
    int64 on a shard, a tenant outside the token) must name the event behind
    it instead; ``origin`` maps one to the other.
    """

    batch: Batch
    origin: list[int] | None = None  # events: the event index of each fan-out row
    rule: list[str] | None = None  # events: the rule that made each fan-out row
    registry: SeriesRegistry | None = None  # whose gateway numbers the batch may carry

    def tenants(self) -> list[tuple[str, int]]:
        """Each tenant with its first row, for the access check (inside ``blamed``)."""
        return batch_tenants(self.batch, self.registry)

    def event_of(self, row: int | None, message: str, rule: bool = True) -> tuple[int | None, str]:
        """The event behind fan-out row ``row``, and ``message`` reworded to name it.

        ``rule`` adds which rule made the row: what a data-model problem (a tag
        value too long, a slot out of int64) needs to be understood.
        """
        if self.origin is None or row is None or not 0 <= row < len(self.origin):
            return row, message
        event = self.origin[row]
        match = _ROW_PREFIX.match(message)
        problem = message[match.end():] if match and int(match.group(1)) == row else message
        made_by = ""
        # (a tenant or ts problem is the event's own, whichever rule made the row)
        if rule and self.rule is not None and not problem.startswith(("tenant ", "ts ")):
            made_by = f" (in the increment of rule {self.rule[row]!r})"
        return event, f"event {event}: {problem}{made_by}"

    @contextmanager
    def blamed(self) -> Iterator[None]:
        """Errors raised inside that name a row name its event instead (no-op for rows)."""
        try:
            yield
        except IngestError as e:
            if self.origin is None or e.row is None:
                raise
            event, message = self.event_of(e.row, e.message, rule=e.code == ErrorCode.BAD_ROW)
            raise IngestError(e.code, message, row=event, fatal=e.fatal) from None
        except Denied as e:
            if self.origin is None or e.row is None:
                raise
            event, message = self.event_of(e.row, e.message, rule=False)
            raise Denied(e.code, message, row=event) from None


def build_event_batch(
    events: Any, rules: Rules, now: float, known: KnownSeries | None = None
) -> Incoming:
    """Fan ``events`` out into rows and validate them as the row path does, all or nothing.

    The first bad event wins, whatever is wrong with it: a row problem of an
    earlier event (found by ``rows_batch``) comes before a fan-out problem of
    a later one. ``bad_row`` carries the event index as ``row``.
    """
    if type(events) is not list:
        what = "missing" if events is None else f"a {type(events).__name__}, not a list"
        raise IngestError(ErrorCode.BAD_REQUEST, f"events is {what}")
    fanned = rules.fan_out(events)
    incoming = Incoming(Batch.empty(), fanned.origin, fanned.rule)
    try:
        incoming.batch = rows_batch(fanned.rows, now, known)
    except BadRow as e:
        event, message = incoming.event_of(e.row, e.message)
        raise IngestError(ErrorCode.BAD_ROW, message, row=event) from None
    except BadBatch as e:  # pragma: no cover - fan-out makes a list of 5-field rows
        raise IngestError(ErrorCode.BAD_REQUEST, str(e)) from None
    if fanned.error is not None:
        raise IngestError(ErrorCode.BAD_ROW, fanned.error.message, row=fanned.error.event)
    return incoming
