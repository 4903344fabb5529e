"""Per-producer ordering in the gateway: what makes shard marks sound.

A shard skips a batch whose seq is at or below its mark for that producer,
which is only right if the producer's batches reach it in seq order with no
hole left behind. So the gateway runs one producer's batches one at a time
(across all its connections), sends each to every shard, and after a refusal
that the client will retry, it stops the producer from getting ahead: a later
seq is refused until the refused one comes back.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class ProducerState:
    name: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # the seq this gateway last applied for the producer; None when unknown
    # (a new gateway, or after a shard lost state): shards then check nothing
    last_seq: int | None = None
    # a seq refused for a reason the client retries; later seqs must wait for it
    blocked_at: int | None = None
    epoch: int = 0  # bumped by every hello: older connections are fenced


class Producers:
    def __init__(self) -> None:
        self.states: dict[str, ProducerState] = {}

    def get(self, name: str) -> ProducerState:
        st = self.states.get(name)
        if st is None:
            st = self.states[name] = ProducerState(name)
        return st

    def connect(self, name: str) -> int:
        """A new connection for the producer; returns its epoch.

        Older connections are fenced from here on, and the position is
        forgotten: the client now resends from ``welcome.durable_seq`` in order,
        and its first batch is where each shard picks up again.
        """
        st = self.get(name)
        st.epoch += 1
        st.last_seq = None
        st.blocked_at = None
        return st.epoch
