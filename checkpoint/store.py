"""The store protocol: the small interface every backend implements.

Shards write checkpoints and load the month documents they are about to
change; gateways read history for queries and the catalog. Everything is
keyed by series id and UTC month; hours are absolute hour indexes
(``ts // 3600``), converted to the backend's layout inside each backend.

Idempotence is the contract's core: ``write_checkpoint`` called again with
the same ``(shard, ck)`` and the same deltas — after a crash or a failed
attempt that got half way — leaves every count as if it ran once. Backends
get there by claiming ``ck`` in the shard record before touching documents
and by guarding each document update with ``ck < cp.ck``.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tally.checkpoint.slots import Slots
from tally.wire.series import SeriesKey

MonthKey = tuple[str, str]  # (series id, "YYYY-MM")


@dataclass(slots=True)
class MonthDoc:
    """One series' counts for one UTC month, as stored."""

    sid: str
    month: str
    hours: dict[int, int]  # absolute hour -> count (zero hours absent)
    ck: int = 0  # last checkpoint of the owning shard applied to this document


@dataclass(slots=True)
class Checkpoint:
    shard: int
    ck: int  # strictly increasing per shard, across restarts
    deltas: dict[MonthKey, dict[int, int]]  # (sid, month) -> absolute hour -> delta
    new_series: list[str] = field(default_factory=list)  # sids the catalog may not have yet
    # producer -> highest seq this shard had applied when the checkpoint was
    # taken; durable together with the deltas, never one without the other
    producers: dict[str, int] = field(default_factory=dict)
    # The same deltas by column (checkpoint/slots.py), as shards hand them over: a
    # checkpoint carries ``deltas`` or ``slots``, never both.
    slots: Slots | None = None

    def documents(self) -> dict[MonthKey, dict[int, int]]:
        """The deltas per document, whichever form the checkpoint carries."""
        return self.slots.to_deltas() if self.slots is not None else self.deltas


@dataclass(slots=True)
class ShardRecord:
    """What a shard starts from: its last checkpoint id and its producers' marks."""

    ck: int = 0  # highest checkpoint id ever claimed; the next one is ck + 1
    producers: dict[str, int] = field(default_factory=dict)  # durable high-water marks


class StoreError(RuntimeError):
    """The backend failed; the operation may be retried as it is."""


class LayoutMismatch(RuntimeError):
    """The store was created with another number of shards."""


class Store(Protocol):
    def ensure_layout(self, shards: int) -> None:
        """Record the shard count on first use; raise LayoutMismatch if it differs."""

    def open_shard(self, shard: int) -> ShardRecord:
        """Finish what a crash interrupted, then say where the shard stands.

        Replays every checkpoint of this shard that was committed (journaled)
        but not completely applied, discards any that never committed, and
        returns the highest claimed id with the producers' durable marks.
        """

    def write_checkpoint(self, cp: Checkpoint) -> None:
        """Apply deltas and producer marks durably, atomically and idempotently.

        Returns once durable. If it raises, the same checkpoint may be written
        again; if the process dies instead, ``open_shard`` finishes it or
        drops it as a whole, never half of it.
        """

    def load_months(self, keys: list[MonthKey]) -> dict[MonthKey, MonthDoc]:
        """Documents that exist among ``keys``; absent keys have no data yet."""

    def read_months(
        self, tenant: str, metric: str, where: dict[str, str], months: list[str],
        exclude: Container[MonthKey] = frozenset(),
    ) -> list[MonthDoc]:
        """Every document of the metric in those months whose tags include ``where``,
        but those in ``exclude`` (the caller has them: shards answer for what they hold,
        and their documents need not cross the wire or be read from disk)."""

    def catalog(self, tenant: str, metric: str | None = None) -> list[SeriesKey]:
        """Every series of the tenant (of one metric if given) that a checkpoint has recorded."""

    def close(self) -> None: ...


@runtime_checkable
class Folding(Protocol):
    """A store that keeps checkpoints as runs (checkpoint/runs.py) until the shard that
    wrote them folds them; reads see runs and folded rows alike."""

    runs: bool  # whether checkpoints are kept as runs (else written as they come)

    def fold(self, shard: int, budget: int) -> int:
        """Fold about ``budget`` slots of the shard's runs; the slots its runs hold after."""

    def unfolded(self, shard: int) -> int:
        """The slots the shard's runs hold."""
