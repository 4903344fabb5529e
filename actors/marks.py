"""Producer marks: which of each producer's batches a shard holds, and when they are durable.

A producer numbers its batches (``seq``); the gateway sends each to every
shard in seq order. A shard keeps, per producer, the highest seq applied here
(``applied``) and the highest the store holds (``durable``, written with each
checkpoint). That is what makes a resend after a failover exactly-once: a seq
at or below the applied mark is a duplicate, and a restarted shard, whose
applied marks fall back to the durable ones, applies the lost batches again.

The checkpoint ids live here too, because an answer names the checkpoint
that will make the batch durable (``holding_ck``): the gateway holds the
producer's acknowledgement until that checkpoint is durable. That must be a
checkpoint that will happen, so naming the next one is a *promise* that
``begin_checkpoint`` keeps even when nothing is left to write.
"""

from __future__ import annotations

from tally.checkpoint.store import Checkpoint, ShardRecord

NO_SEQ = -1  # the mark of a producer none of whose batches is applied here


class Marks:
    """Per producer the applied and durable seqs; the claimed and durable checkpoint ids."""

    def __init__(self, record: ShardRecord) -> None:
        self.last_ck = record.ck  # highest checkpoint id claimed in the store
        self.durable_ck = record.ck  # highest checkpoint id known durable
        # producer -> highest seq applied here; durable marks are what the
        # store holds. A restarted shard starts with applied == durable.
        self.applied: dict[str, int] = dict(record.producers)
        self.durable: dict[str, int] = dict(record.producers)
        # producer -> (its last applied seq, the mark before it): what revert may undo
        self._undo: dict[str, tuple[int, int | None]] = {}
        self._promised = False  # holding_ck answered last_ck + 1 since the last claim

    def is_resend(self, producer: str, seq: int) -> bool:
        """Whether ``seq`` is at or below the producer's mark here.

        Another connection of the producer (a resend after a failover) is then
        told its batch is here: from now on it must stay, whatever the
        connection that applied it meets on the other shards, so it is no
        longer one ``undo`` may take back.
        """
        mark = self.applied.get(producer)
        if mark is not None and seq <= mark:
            self._undo.pop(producer, None)
            return True
        return False

    def applied_now(self, producer: str, seq: int) -> None:
        """The producer's batch ``seq`` applied: the new mark, and the one undo goes back to."""
        self._undo[producer] = (seq, self.applied.get(producer))
        self.applied[producer] = seq

    def undoable(self, producer: str, seq: int | None) -> bool:
        """Whether ``seq`` is the producer's last batch here and no resend found it since."""
        undo = self._undo.get(producer)
        return undo is not None and undo[0] == seq

    def undo(self, producer: str) -> None:
        """Put the mark back to before the producer's last batch (``undoable`` said yes).

        The next checkpoint records the lower mark (marks are set, not maxed):
        the client resends this seq and it must apply here again, also after a
        restart.
        """
        _, previous = self._undo.pop(producer)
        self.applied[producer] = NO_SEQ if previous is None else previous

    def holding_ck(self, producer: str | None, changed: bool,
                   inflight: Checkpoint | None) -> int:
        """The checkpoint by which everything applied so far is durable.

        ``changed``: something not yet taken by a checkpoint (deltas, even ones
        that sum to nothing, or series not recorded). Never a checkpoint that
        will not happen: a waiter for it would wait forever.
        """
        if changed:
            return self.promise()
        if producer is not None:
            # the mark the store will hold once the in-flight checkpoint lands (it may
            # carry a lower one: a batch undone after an earlier checkpoint took it)
            pending = inflight.producers if inflight is not None else {}
            if pending.get(producer, self.durable.get(producer)) != self.applied.get(producer):
                return self.promise()
        if inflight is not None:
            return inflight.ck
        return self.durable_ck

    def promise(self) -> int:
        """The next checkpoint id, which the next claim then takes even if empty."""
        self._promised = True
        return self.last_ck + 1

    def unsaved(self) -> dict[str, int]:
        """Producers whose applied mark the store does not hold: a checkpoint's to write."""
        return {p: s for p, s in self.applied.items() if self.durable.get(p) != s}

    def take_promise(self) -> bool:
        """Whether a checkpoint was promised since the last claim; no longer after this.

        A waiter may hold the promise: that checkpoint happens even if the
        deltas summed to nothing meanwhile (a batch and its undo).
        """
        promised, self._promised = self._promised, False
        return promised

    def claim(self) -> int:
        """The next checkpoint id, claimed."""
        self.last_ck += 1
        return self.last_ck

    def durable_at(self, cp: Checkpoint) -> None:
        """Checkpoint ``cp`` is in the store: its marks are durable."""
        self.durable.update(cp.producers)
        self.durable_ck = cp.ck
