"""Turning a decoded ingest body (TCP frame or HTTP body) into a Batch.

One place decides what an `inc` body may hold, so TCP and HTTP refuse the
same things with the same codes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from api.service import IngestError
from wire.batches import BadBatch, BadRow, Batch, KnownSeries, columnar_batch, rows_batch

ACKS = ("received", "durable")


def check_ack(ack: Any) -> str:
    if ack is None:
        return "received"
    if ack not in ACKS:
        raise IngestError("bad_request", f"ack must be 'received' or 'durable', not {ack!r}")
    return ack


def build_batch(
    rows: Any, series: Any, i: Any, ts: Any, v: Any, now: float,
    known: KnownSeries | None = None,
) -> Batch:
    """Validate either form; BadRow becomes ``bad_row`` with the row index."""
    try:
        if rows is not None:
            if series is not None:
                raise IngestError("bad_request", "send either rows or series/i/ts/v, not both")
            return rows_batch(rows, now, known)
        if series is None:
            raise IngestError("bad_request", "missing rows (or the columnar series/i/ts/v)")
        return columnar_batch(series, i, ts, v, now)
    except BadRow as e:
        raise IngestError("bad_row", str(e), row=e.row) from None
    except BadBatch as e:
        raise IngestError("bad_request", str(e)) from None


def json_column(name: str, values: Any, dtype: str) -> bytes:
    """JSON has no bytes: the columnar form's i/ts/v arrive there as integer lists."""
    if isinstance(values, bytes | bytearray):
        return bytes(values)
    if not isinstance(values, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in values
    ):
        raise IngestError("bad_request", f"{name} must be a list of integers (or msgpack bin)")
    info = np.iinfo(dtype)
    for n, x in enumerate(values):
        if not info.min <= x <= info.max:
            raise IngestError("bad_row", f"row {n}: {name} {x} is outside {dtype}", row=n)
    return np.asarray(values, dtype=dtype).tobytes()


def batch_tenants(batch: Batch) -> list[tuple[str, int]]:
    """Each tenant of a batch with the first input row that names it (for access checks)."""
    if not batch.sids:
        return []
    first = np.full(len(batch.sids), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, batch.series.astype(np.intp), batch.first_row)
    rows: dict[str, int] = {}
    for sid, row in zip(batch.sids, first.tolist(), strict=True):
        tenant = sid.split("|", 1)[0]
        if row < rows.get(tenant, row + 1):
            rows[tenant] = row
    return list(rows.items())
