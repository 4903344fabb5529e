"""When a shard folds its checkpoint runs into the store's slot rows.

A store that keeps checkpoints as runs (checkpoint/runs.py) makes a checkpoint
cost its bytes and leaves the per-slot writing to folds. A shard folds when
it is idle (no batch since the last checkpoint interval), so a burst —
a backfill, an import, a catch-up after an outage — is absorbed at the speed of
memory, and folded once it is over; and whenever its runs hold more than
``backlog`` slots, so that under load that never pauses the folds keep up
(and take their share of the time) instead of the runs growing without end.
Each fold step is one transaction of about ``step`` slots: other shards'
checkpoints wait at most that long for the store's write lock, and the shard's
own checkpoints go between its steps.
"""

from __future__ import annotations

from dataclasses import dataclass

FOLD_BACKLOG = 1 << 23  # slots a shard's runs may hold while batches keep coming
FOLD_STEP = 1 << 18  # slots folded per transaction


@dataclass(slots=True)
class Folds:
    unfolded: int = 0  # slots the shard's runs hold, as the store last said
    backlog: int = FOLD_BACKLOG
    step: int = FOLD_STEP

    def written(self, slots: int) -> None:
        """A checkpoint of ``slots`` slots was written as a run."""
        self.unfolded += slots

    def budget(self, idle: bool) -> int:
        """Slots to fold now (0: none)."""
        if self.unfolded and (idle or self.unfolded > self.backlog):
            return self.step
        return 0

    def done(self, left: int) -> None:
        """A fold step ended with ``left`` slots in the runs."""
        self.unfolded = left
