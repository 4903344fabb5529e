"""The other gateways of the service, told of new series before an ack leaves.

Each gateway keeps a series index (api/series_index.py) so that a query asks
only the shards owning the matches. A series first ingested through gateway A
must be found by a query to gateway B at once (read your writes, whichever
gateway a client reads from), so A tells every peer of the series its shards
had not held before it acknowledges the batch. That happens only when a
series is new to its shard, so a warmed-up stream costs nothing here.

A peer that is gone or restarting is skipped: its index starts empty when it
comes back and loads from the shards. A peer that does not answer in time is
logged and counted, never waited for without bound: the call is still queued
in Ray and lands in order, so the index is late, not wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

log = logging.getLogger("tally.gateway")

PEER_TIMEOUT = 5.0

Tell = Callable[[Any, list[str]], Awaitable[Any]]


class Peers:
    """Handles of the other gateways, replaced whenever the supervisor's set changes."""

    def __init__(self, tell: Tell, timeout: float = PEER_TIMEOUT) -> None:
        self._tell = tell  # (peer, sids) -> awaitable answered once the peer's index has them
        self.timeout = timeout
        self.handles: dict[str, Any] = {}  # peer name -> handle
        self.told = 0  # calls answered
        self.failures: dict[str, int] = {"gone": 0, "timeout": 0}

    def replace(self, handles: dict[str, Any]) -> None:
        self.handles = dict(handles)

    async def saw(self, sids: Sequence[str]) -> None:
        """Tell every peer of ``sids``; returns once each answered, is gone or timed out."""
        if not self.handles or not sids:
            return
        told = list(sids)
        results = await self.ask(lambda peer: self._tell(peer, told))
        for name, result in results.items():
            if not isinstance(result, BaseException):
                self.told += 1
                continue
            kind = "timeout" if isinstance(result, TimeoutError) else "gone"
            if kind == "gone" and not _is_actor_error(result):
                raise result  # not a peer's absence: a bug to surface, not to skip
            self.failures[kind] += 1
            log.warning(json.dumps({
                "event": "peer_unreachable", "peer": name, "why": kind,
                "error": repr(result)[:300], "series": len(sids),
            }))


    async def ask(self, call: Callable[[Any], Awaitable[Any]]) -> dict[str, Any]:
        """``call`` on every peer at once: its answer or its exception, by peer name."""
        names = list(self.handles)
        results = await asyncio.gather(
            *(asyncio.wait_for(call(self.handles[n]), self.timeout) for n in names),
            return_exceptions=True,
        )
        return dict(zip(names, results, strict=True))


def _is_actor_error(exc: BaseException) -> bool:
    import ray.exceptions

    return isinstance(exc, (
        ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
        ray.exceptions.ActorUnschedulableError,
    ))
