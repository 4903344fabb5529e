"""Knowing when acknowledged batches are durable, from one long poll per shard.

An applied batch comes back with, per shard, the shard's incarnation and the
checkpoint id that will hold it. It is durable once every such shard reports
that checkpoint done *in the same incarnation*: a restarted shard lost what
it had not checkpointed, and its new checkpoints reuse no promise of the old.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("tally.durability")

Token = dict[int, tuple[str, int]]  # shard -> (incarnation, checkpoint id)
Poll = Callable[[int, int, float], Awaitable[dict[str, Any]]]


class ShardRestarted(RuntimeError):
    """A shard restarted before a batch became durable; the producer must resend."""


@dataclass
class ShardProgress:
    incarnation: str | None = None
    durable_ck: int = 0


class DurableTracker:
    def __init__(self, shards: int, poll: Poll, poll_timeout: float = 5.0) -> None:
        self.progress = [ShardProgress() for _ in range(shards)]
        self.poll = poll
        self.poll_timeout = poll_timeout
        self.changed = asyncio.Condition()
        self.restarts = 0
        self.on_restart: list[Callable[[int], None]] = []
        self.tasks: list[asyncio.Task] = []
        self.poll_errors = 0

    def start(self) -> None:
        for shard in range(len(self.progress)):
            task = asyncio.get_running_loop().create_task(self._watch(shard))
            task.add_done_callback(self._watch_ended)
            self.tasks.append(task)

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()

    def _watch_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(json.dumps({"event": "error", "where": "durability watcher",
                                  "error": repr(task.exception())}))

    async def _watch(self, shard: int) -> None:
        while True:
            p = self.progress[shard]
            try:
                answer = await self.poll(shard, p.durable_ck, self.poll_timeout)
            except Exception as e:  # a restarting shard: counted, logged, polled again
                self.poll_errors += 1
                log.warning(json.dumps({"event": "error", "where": "durability poll",
                                        "shard": shard, "error": repr(e)}))
                await asyncio.sleep(0.2)
                continue
            await self.observe(shard, answer["incarnation"], answer["durable_ck"])

    async def observe(self, shard: int, incarnation: str, durable_ck: int) -> None:
        p = self.progress[shard]
        restarted = p.incarnation is not None and incarnation != p.incarnation
        if restarted or durable_ck != p.durable_ck or p.incarnation is None:
            p.incarnation, p.durable_ck = incarnation, durable_ck
            if restarted:
                self.restarts += 1
                for callback in self.on_restart:
                    callback(shard)
            async with self.changed:
                self.changed.notify_all()

    def is_durable(self, token: Token) -> bool:
        """True when durable; raises ShardRestarted when it never will be."""
        for shard, (incarnation, ck) in token.items():
            p = self.progress[shard]
            if p.incarnation is not None and p.incarnation != incarnation:
                raise ShardRestarted(
                    f"shard {shard} restarted before checkpoint {ck}; resend from the "
                    "last durable seq"
                )
            if p.incarnation is None or p.durable_ck < ck:
                return False
        return True

    async def wait(self, token: Token, timeout: float | None = None) -> None:
        async with self.changed:
            await asyncio.wait_for(
                self.changed.wait_for(lambda: self.is_durable(token)), timeout
            )
