"""A TCP connection's series table: series named once, then referred to by index.

A columnar frame carries its own series table, and a producer writing over
100,000 series sends most of them again in every frame: decoding and
resolving that table was nearly all of a wide frame's cost in the gateway. The
``series`` op (docs/protocol.md) appends entries to a table the connection
keeps; an ``inc`` frame without ``series`` then indexes that table with ``i``,
and costs the gateway numpy alone (``wire.batches.table_batch``).

Entries are validated when they are defined, all or nothing: a bad entry
refuses the whole ``series`` frame (``bad_row`` naming it) and the table is
unchanged, so the producer's idea of its table and the server's never differ
by a frame. The table lives as long as the connection: after a reconnect the
producer defines it again before resending what it kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tally.api.service import IngestError
from tally.wire.batches import BadBatch, BadRow, Batch
from tally.wire.columnar import table_batch
from tally.wire.frames import SeriesTable
from tally.wire.registry import SeriesNumbers, SeriesRegistry
from tally.wire.series import InvalidSeries, series_key
from tally.wire.vocabulary import ErrorCode, short_repr

MAX_ENTRIES = 1 << 21  # per connection: a wider producer opens more connections


class ConnectionTable:
    """The entries' series ids, numbered in order, and their gateway numbers."""

    def __init__(self) -> None:
        self.entries = SeriesNumbers()
        self.distinct = True  # no two entries name the same series

    def __len__(self) -> int:
        return len(self.entries)

    def define(self, m: SeriesTable, registry: SeriesRegistry) -> dict[str, Any]:
        """Append the frame's entries (all or nothing); the ``defined`` answer."""
        count = len(self.entries)
        if m.base != count:
            return _error(ErrorCode.BAD_REQUEST, f"series: base {m.base} is not the length of "
                          f"this connection's table ({count} entries)")
        if count + len(m.series) > MAX_ENTRIES:
            return _error(ErrorCode.BAD_REQUEST, f"series: the table would pass {MAX_ENTRIES} "
                          "entries; spread the series over more connections")
        new: list[str] = []
        for k, entry in enumerate(m.series):
            if (type(entry) is not list and type(entry) is not tuple) or len(entry) != 3:
                return _error(ErrorCode.BAD_ROW, f"series[{k}]: a series is [tenant, metric, "
                              f"tags|nil], not {short_repr(entry)}", row=k)
            try:
                new.append(series_key(*entry).sid)
            except InvalidSeries as e:
                return _error(ErrorCode.BAD_ROW, f"series[{k}] is invalid: {e}", row=k)
        self.entries.sids += new
        gn = self.entries.gateway_numbers(registry)
        self.distinct = self.distinct and len(np.unique(gn)) == len(gn)
        return {"op": "defined", "base": m.base, "count": len(self.entries)}

    def batch(self, registry: SeriesRegistry, i: Any, ts: Any, v: Any, now: float) -> Batch:
        """A columnar batch over this table; ``bad_row``/``bad_request`` as ``build_batch``."""
        if not len(self.entries):
            raise IngestError(ErrorCode.BAD_REQUEST, "inc: columnar batch lacks series, and "
                              "this connection defined no series table (the series op)")
        try:
            batch = table_batch(self.entries.gateway_numbers(registry), self.distinct,
                                registry, i, ts, v, now)
        except BadRow as e:
            raise IngestError(ErrorCode.BAD_ROW, str(e), row=e.row) from None
        except BadBatch as e:
            raise IngestError(ErrorCode.BAD_REQUEST, str(e)) from None
        batch.gn_epoch = registry.epoch
        return batch


def _error(code: ErrorCode, message: str, **extra: Any) -> dict[str, Any]:
    return {**extra, "op": "error", "seq": None, "code": code, "message": message}
