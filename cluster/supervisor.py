"""The supervisor actor: it creates the service's actors and keeps one gateway per node.

``tally serve`` creates this actor and nothing else. On a cluster (``--address``)
every actor is named and detached, so the service outlives the command that
started it: a driver killed by a lost ssh session leaves the service serving,
and running ``tally serve`` again adopts it. Every second the supervisor
compares the alive nodes with its gateways:

- a new node gets a gateway, pinned there (hard node affinity), told of its
  peers before it listens (api/peers.py: a query to it must find series that
  another gateway acknowledged a moment before);
- a gateway whose worker died restarts on its node (Ray's ``max_restarts``) and
  comes back without listeners: the supervisor starts it again;
- a lost node's gateway is dropped from the others' peers.

Shards are spread over the nodes (``SPREAD``) and restart elsewhere when their
node goes (Ray's ``max_restarts``); a restarted shard recovers from the store
and the producers resend what was not yet durable (wire/client.py), so totals
stay exact. The supervisor holds no counts; when it restarts it adopts the
named actors it finds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.shard import SHARD_NAME, ShardActor
from api.gateway import GATEWAY_NAME, Gateway, GatewayOptions
from checkpoint.remote import HOST_NAME, StoreHost

log = logging.getLogger("tally.supervisor")

SUPERVISOR_NAME = "tally-supervisor"
WATCH_INTERVAL = 1.0
CALL_TIMEOUT = 5.0  # a gateway's status or peers call; a node going away can hang it
START_TIMEOUT = 60.0
RETRY_AFTER = 10.0  # a gateway that failed to start is tried again after this

# what a call to an actor on a node that is going (or gone) raises
UNREACHABLE = (
    ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
    ray.exceptions.ActorUnschedulableError, TimeoutError,
)


@dataclass(frozen=True)
class ServicePlan:
    """Everything the supervisor needs to create (or adopt) the service's actors."""

    store_url: str
    shards: int
    checkpoint_interval: float
    max_dirty_slots: int
    options: GatewayOptions
    host: str
    http_port: int
    tcp_port: int
    detached: bool  # on a cluster: the actors outlive the driver

    def identity(self) -> dict[str, Any]:
        """What another ``tally serve`` must agree on to adopt a running service."""
        return {"store": self.store_url, "shards": self.shards}


def gateway_name(node_id: str) -> str:
    return f"{GATEWAY_NAME}-{node_id[:16]}"


def gateway_changes(alive: set[str], have: set[str]) -> tuple[set[str], set[str]]:
    """(nodes that need a gateway, gateways whose node is gone)."""
    return alive - have, have - alive


@dataclass
class _Gateway:
    node: str
    handle: Any
    endpoint: dict[str, Any] | None = None  # ports once listening
    retry_at: float = 0.0  # loop time before which a failed start is not tried again


@ray.remote(num_cpus=0, max_restarts=-1, enable_task_events=False)
class Supervisor:
    def __init__(self, plan: ServicePlan) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        self.plan = plan
        self.lifetime = "detached" if plan.detached else None
        self.store_host: Any = None
        self.shards: list[Any] = []
        self.gateways: dict[str, _Gateway] = {}
        self.errors: list[str] = []  # the watch loop's, newest last (kept, never swallowed)
        self._watch: asyncio.Task | None = None
        self._stopping = False

    # ---- what tally serve calls ----------------------------------------

    async def identity(self) -> dict[str, Any]:
        return self.plan.identity()

    async def start(self) -> list[dict[str, Any]]:
        """Create or adopt every actor, one gateway per alive node listening; their endpoints.

        A gateway that cannot listen (a taken port) fails the start, naming
        the node and the port: the operator must hear of it now, not in a log.
        """
        plan = self.plan
        if plan.store_url.startswith("memory://"):
            self.store_host = StoreHost.options(
                name=HOST_NAME, get_if_exists=True, lifetime=self.lifetime
            ).remote(plan.store_url)
            await self.store_host.call.remote("ensure_layout", plan.shards)
        self.shards = [
            ShardActor.options(
                name=SHARD_NAME.format(i), get_if_exists=True, lifetime=self.lifetime,
                scheduling_strategy="SPREAD",
            ).remote(i, plan.store_url, plan.checkpoint_interval, plan.max_dirty_slots)
            for i in range(plan.shards)
        ]
        await asyncio.gather(*(s.ready.remote() for s in self.shards))
        await self._reconcile(strict=True)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())
            self._watch.add_done_callback(self._watch_ended)
        return await self.endpoints()

    async def endpoints(self) -> list[dict[str, Any]]:
        """Every listening gateway: node, ip, ports; and the watch loop's recent errors."""
        return [
            {"node": g.node, **g.endpoint} for g in self.gateways.values() if g.endpoint
        ]

    async def recent_errors(self) -> list[str]:
        return list(self.errors)

    async def stop(self) -> list[int]:
        """Stop every gateway, then a final checkpoint on every shard; their ck ids."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        for g in list(self.gateways.values()):
            try:
                await asyncio.wait_for(g.handle.stop.remote(), START_TIMEOUT)
            except UNREACHABLE as e:
                # gone: nothing to stop accepting there; the shards still checkpoint
                log.warning(json.dumps({"event": "gateway_gone_at_stop", "node": g.node,
                                        "error": type(e).__name__}))
        return [await _until_answered(s, i) for i, s in enumerate(self.shards)]

    async def actor_names(self) -> list[str]:
        """Every named actor of the service, this one last (for ``ray.kill`` after stop)."""
        names = [gateway_name(n) for n in self.gateways]
        names += [SHARD_NAME.format(i) for i in range(self.plan.shards)]
        if self.store_host is not None:
            names.append(HOST_NAME)
        return [*names, SUPERVISOR_NAME]

    # ---- the watch loop ----------------------------------------------------

    async def _watch_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                await self._reconcile(strict=False)
            except Exception as e:  # kept and logged; the next round tries again
                self._error(f"watch: {e!r}")

    def _watch_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._error(f"the watch loop died: {task.exception()!r}")

    def _error(self, message: str) -> None:
        self.errors = [*self.errors[-19:], message]
        log.error(json.dumps({"event": "error", "where": "supervisor", "error": message}))

    async def _reconcile(self, strict: bool) -> None:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        create, lost = gateway_changes(alive, set(self.gateways))
        for node in lost:
            g = self.gateways.pop(node)
            log.info(json.dumps({"event": "node_lost", "node": node, "gateway": g.endpoint}))
            ray.kill(g.handle, no_restart=True)
        for node in create:
            self.gateways[node] = _Gateway(node, self._gateway(node))
        if create or lost:
            await self._tell_peers()
        now = asyncio.get_running_loop().time()
        for g in list(self.gateways.values()):
            if g.endpoint is not None:
                g.endpoint = await self._still_listening(g)
                if g.endpoint is None:  # restarted without listeners, and without peers
                    await self._tell_peers(only=g)
            if g.endpoint is None and now >= g.retry_at:
                await self._start_gateway(g, strict)

    def _gateway(self, node: str) -> Any:
        plan = self.plan
        return Gateway.options(
            name=gateway_name(node), get_if_exists=True, lifetime=self.lifetime,
            max_restarts=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(plan.store_url, plan.shards, plan.options)

    async def _tell_peers(self, only: _Gateway | None = None) -> None:
        targets = [only] if only is not None else list(self.gateways.values())
        for g in targets:
            peers = {gateway_name(n): o.handle for n, o in self.gateways.items() if n != g.node}
            try:
                await asyncio.wait_for(g.handle.set_peers.remote(peers), CALL_TIMEOUT)
            except UNREACHABLE as e:
                g.endpoint = None  # told again before it listens
                self._error(f"gateway on node {g.node[:12]} did not take its peers: {e!r}")

    async def _still_listening(self, g: _Gateway) -> dict[str, Any] | None:
        try:
            status = await asyncio.wait_for(g.handle.status.remote(), CALL_TIMEOUT)
        except UNREACHABLE:
            return g.endpoint  # restarting or its node is going: the next round sees which
        if status["ports"] is None:
            log.info(json.dumps({"event": "gateway_restarted", "node": g.node}))
        return status["ports"]

    async def _start_gateway(self, g: _Gateway, strict: bool) -> None:
        plan = self.plan
        try:
            g.endpoint = await asyncio.wait_for(
                g.handle.start.remote(plan.host, plan.http_port, plan.tcp_port), START_TIMEOUT
            )
        except Exception as e:
            cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause else e
            if strict:
                raise RuntimeError(f"the gateway on node {g.node[:12]}: {cause}") from None
            g.retry_at = asyncio.get_running_loop().time() + RETRY_AFTER
            self._error(f"the gateway on node {g.node[:12]} cannot start: {cause}")
            return
        log.info(json.dumps({"event": "gateway_listening", "node": g.node, **g.endpoint}))


async def _until_answered(shard: Any, i: int, attempts: int = 40) -> int:
    """A shard's final checkpoint; a shard restarting at that moment is asked again.

    Its final checkpoint is what makes the acknowledged increments it recovers durable.
    """
    for attempt in range(attempts):
        try:
            return await shard.shutdown.remote()
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.ActorDiedError) as e:
            if attempt == attempts - 1:
                raise
            log.warning(json.dumps({"event": "shard_unavailable_at_stop", "shard": i,
                                    "error": type(e).__name__}))
            await asyncio.sleep(0.5)
    raise AssertionError("unreachable")
