"""The supervisor actor: it creates the service's actors and keeps gateways on every node.

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

With ``--gateways-per-node N`` every node has N gateways sharing its ports
(SO_REUSEPORT): the first binds them, the others bind the same ones, and
all of them are peers of each other like gateways on different nodes.
With ``--http-gateways-per-node M`` the node has M more that take the HTTP
port alone, and the N take only TCP (and StatsD): a query then never waits
while a gateway decodes frames.

Shards are spread over the nodes (round robin) and restart elsewhere when their
node goes (Ray's ``max_restarts``); a restarted shard recovers from the store
and the producers resend what was not yet durable (tally.client), so totals
stay exact. The supervisor holds no counts; when it restarts it adopts the
named actors it finds.

Once a minute (``ServicePlan.summary_interval``) it logs the service's one
summary line, from the shards' and gateways' counts: the log says the
service is alive and how it fares without a line per shard per checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tally.actors import logs
from tally.actors.shard import SHARD_NAME, ShardActor
from tally.api.gateway import GATEWAY_NAME, Gateway, GatewayOptions
from tally.checkpoint.remote import HOST_NAME, StoreHost

log = logging.getLogger("tally.supervisor")

SUPERVISOR_NAME = "tally-supervisor"
WATCH_INTERVAL = 1.0
CALL_TIMEOUT = 5.0  # a gateway's status or peers call; a node going away can hang it
START_TIMEOUT = 60.0
RETRY_AFTER = 10.0  # a gateway that failed to start is tried again after this
# Ray places an actor that asks for no resource at all on a random node, its
# node affinity ignored (Ray 2.60): the shards and the supervisor
# ask for this much of the logical ``memory`` resource so that theirs holds.
PLACEMENT_MEMORY = 1 << 20


def shard_runtime_env() -> dict[str, Any]:
    """The shards' environment: numpy without transparent huge pages.

    numpy asks the kernel for huge pages on every large array. Where the kernel
    compacts memory to find them on a fault (``defrag`` set to ``madvise``, the
    common default), a shard that grows its slab and day tables under a
    backfill stalls in those faults; at steady state its arrays do not grow and
    gain nothing measurable from huge pages (docs/performance.md, "tally import").
    A value the operator set for the supervisor's node wins.
    """
    return {"env_vars": {"NUMPY_MADVISE_HUGEPAGE": os.environ.get("NUMPY_MADVISE_HUGEPAGE",
                                                                     "0")}}

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
    gateways_per_node: int = 1  # sharing the node's ports (SO_REUSEPORT) when more than 1
    http_gateways_per_node: int = 0  # >0: these take HTTP, the others TCP and StatsD only
    cpu_affinity: str = "off"  # "gateways": actors/affinity.py
    summary_interval: float = 60.0  # seconds between summary log lines; 0: none

    def identity(self) -> dict[str, Any]:
        """What another ``tally serve`` must agree on to adopt a running service."""
        return {"store": self.store_url, "shards": self.shards,
                "gateways_per_node": self.gateways_per_node,
                "http_gateways_per_node": self.http_gateways_per_node}

    @property
    def per_node(self) -> int:
        return self.gateways_per_node + self.http_gateways_per_node

    def listens(self, k: int) -> tuple[bool, bool]:
        """Whether a node's gateway ``k`` takes the (HTTP, TCP) port."""
        if not self.http_gateways_per_node:
            return True, True
        return (True, False) if k >= self.gateways_per_node else (False, True)

    @property
    def pinned_gateways(self) -> int:
        """TCP gateways per node that get a core of their own (0: nothing is pinned)."""
        return self.gateways_per_node if self.cpu_affinity == "gateways" else 0

    def sharing(self, k: int) -> bool:
        """Whether gateway ``k`` shares its ports with others of its node (SO_REUSEPORT)."""
        same = [j for j in range(self.per_node) if self.listens(j) == self.listens(k)]
        return len(same) > 1


HEAD = "node:__internal_head__"  # the resource Ray gives the head node only


def shard_placement(nodes: list[dict[str, Any]], shards: int) -> list[str]:
    """The node each shard starts on: round robin over the alive nodes, workers first.

    Ray's ``SPREAD`` is best effort (it can leave a node without a shard
    while another has several); explicit soft affinity spreads them evenly, and a
    shard whose node is gone when it restarts is placed wherever Ray can.
    The head comes last: it carries the GCS, and with fewer shards than
    nodes it gets none.
    """
    alive = sorted((HEAD in n["Resources"], n["NodeID"]) for n in nodes if n["Alive"])
    if not alive:
        raise RuntimeError("Ray reports no alive node")
    return [alive[i % len(alive)][1] for i in range(shards)]


def head_node() -> str | None:
    """The head's node id: the supervisor runs there (losing the head loses the cluster)."""
    for node in ray.nodes():
        if node["Alive"] and HEAD in node["Resources"]:
            return node["NodeID"]
    return None


def gateway_name(node_id: str, k: int = 0) -> str:
    """The node's first gateway ``tally-gateway-<node>``, its others ``...-<k>``."""
    return f"{GATEWAY_NAME}-{node_id[:16]}" + (f"-{k}" if k else "")


def gateway_changes(alive: set[str], have: set[str]) -> tuple[set[str], set[str]]:
    """(nodes that need a gateway, gateways whose node is gone)."""
    return alive - have, have - alive


@dataclass
class _Gateway:
    node: str
    k: int  # which of the node's gateways: the first (0) picks the ports, the others share them
    name: str
    handle: Any
    endpoint: dict[str, Any] | None = None  # ports once listening
    knows: set[str] | None = None  # the peers' names it took last (None: none yet)
    retry_at: float = 0.0  # loop time before which a failed start is not tried again


@ray.remote(num_cpus=0, max_restarts=-1, enable_task_events=False)
class Supervisor:
    def __init__(self, plan: ServicePlan) -> None:
        logs.configure()
        self.plan = plan
        self.lifetime = "detached" if plan.detached else None
        self.store_host: Any = None
        self.shards: list[Any] = []
        self.gateways: dict[str, _Gateway] = {}
        self.errors: list[str] = []  # the watch loop's, newest last (kept, never swallowed)
        self._watch: asyncio.Task | None = None
        self._summary: asyncio.Task | None = None
        self._stopping = False
        self._starting = asyncio.Lock()  # the driver's start and a resume may overlap
        self._resuming: asyncio.Task | None = None
        with warnings.catch_warnings():  # Ray's own use of a deprecated call inside
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if restarted:
            # Restarted (its process or its node died): nobody will call start
            # again, and the watch loop went with the old process. Take the
            # service over at once; the actors it finds are adopted by name.
            # Ray runs an async actor's __init__ on its event loop (a call to
            # its own handle from here was not always delivered).
            self._resuming = asyncio.get_running_loop().create_task(self.resume())

    # ---- what tally serve calls ----------------------------------------

    async def identity(self) -> dict[str, Any]:
        return self.plan.identity()

    async def start(self, strict: bool = True) -> list[dict[str, Any]] | None:
        """Create or adopt every actor, one gateway per alive node listening; their endpoints.

        A gateway that cannot listen (a taken port) fails the start, naming
        the node and the port: the operator must hear of it now, not in a log.
        """
        async with self._starting:
            await self._start(strict)
        return await self.endpoints()

    async def resume(self) -> None:
        """start() after a restart of this actor; a failure is logged and kept."""
        log.info(json.dumps({"event": "supervisor_restarted"}))
        try:
            await self.start(strict=False)  # a gateway that cannot start is retried later
        except Exception as e:
            self._error(f"resuming after a restart: {e!r}")

    async def _start(self, strict: bool) -> None:
        plan = self.plan
        if plan.store_url.startswith("memory://"):
            self.store_host = StoreHost.options(
                name=HOST_NAME, get_if_exists=True, lifetime=self.lifetime
            ).remote(plan.store_url)
            await self.store_host.call.remote("ensure_layout", plan.shards)
        self.shards = [
            ShardActor.options(
                name=SHARD_NAME.format(i), get_if_exists=True, lifetime=self.lifetime,
                memory=PLACEMENT_MEMORY, runtime_env=shard_runtime_env(),
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
            ).remote(i, plan.store_url, plan.checkpoint_interval, plan.max_dirty_slots,
                     plan.pinned_gateways)
            for i, node in enumerate(shard_placement(ray.nodes(), plan.shards))
        ]
        await asyncio.gather(*(s.ready.remote() for s in self.shards))
        await self._reconcile(strict)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())
            self._watch.add_done_callback(self._watch_ended)
        if self._summary is None and plan.summary_interval > 0:
            self._summary = asyncio.get_running_loop().create_task(self._summary_loop())
            self._summary.add_done_callback(self._watch_ended)

    async def endpoints(self) -> list[dict[str, Any]] | None:
        """Every listening gateway: node, ip, ports (None while starting or resuming)."""
        if self._watch is None:
            return None
        seen: dict[str, dict[str, Any]] = {}  # a node's gateways share their ports
        for g in sorted(self.gateways.values(), key=lambda g: g.k):
            if g.endpoint:
                node = seen.setdefault(g.node, {"node": g.node, **g.endpoint})
                for key, port in g.endpoint.items():  # HTTP and TCP from separate gateways
                    if node.get(key) is None:
                        node[key] = port
        return list(seen.values())

    async def recent_errors(self) -> list[str]:
        return list(self.errors)

    async def stop(self) -> list[int]:
        """Stop every gateway, then a final checkpoint on every shard; their ck ids."""
        self._stopping = True
        for task in (self._watch, self._summary):
            if task is not None:
                task.cancel()
        for g in list(self.gateways.values()):
            try:
                await asyncio.wait_for(g.handle.stop.remote(), START_TIMEOUT)
            except UNREACHABLE as e:
                # gone: nothing to stop accepting there; the shards still checkpoint
                log.warning(json.dumps({"event": "gateway_gone_at_stop", "gateway": g.name,
                                        "error": type(e).__name__}))
        return [await _until_answered(s, i) for i, s in enumerate(self.shards)]

    async def actor_names(self) -> list[str]:
        """Every named actor of the service, this one last (for ``ray.kill`` after stop)."""
        names = list(self.gateways)
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
            self._error(f"the {task.get_coro().__name__} died: {task.exception()!r}")

    async def _summary_loop(self) -> None:
        """One summary line per interval, from one place whatever the number of shards."""
        loop = asyncio.get_running_loop()
        before, started = await self._counts(), loop.time()
        while not self._stopping:
            await asyncio.sleep(self.plan.summary_interval)
            now, ended = await self._counts(), loop.time()
            logs.event(log, logging.INFO, "summary", **summary(before, now, ended - started))
            before, started = now, ended

    async def _counts(self) -> dict[str, dict[str, Any] | None]:
        """Every shard's and gateway's ``summary()`` by name; None: it did not answer."""
        actors = {SHARD_NAME.format(i): s for i, s in enumerate(self.shards)}
        actors.update({name: g.handle for name, g in self.gateways.items()
                       if g.endpoint is not None})
        names = list(actors)
        answers = await asyncio.gather(
            *(asyncio.wait_for(actors[n].summary.remote(), CALL_TIMEOUT) for n in names),
            return_exceptions=True,
        )
        counts: dict[str, dict[str, Any] | None] = {
            n: None if isinstance(a, BaseException) else a
            for n, a in zip(names, answers, strict=True)}
        counts[SUPERVISOR_NAME] = {"errors": logs.errors_logged()}
        return counts

    def _error(self, message: str) -> None:
        self.errors = [*self.errors[-19:], message]
        log.error(json.dumps({"event": "error", "where": "supervisor", "error": message}))

    async def _reconcile(self, strict: bool) -> None:
        """One round: gateways for new nodes, lost ones dropped, peers told, starts.

        A gateway listens only once it has taken its peers and every listening
        gateway has taken it as a peer: from its first query on, it must hear
        of every series another gateway acknowledges.
        """
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        create, lost = gateway_changes(alive, {g.node for g in self.gateways.values()})
        for name, g in list(self.gateways.items()):
            if g.node in lost:
                del self.gateways[name]
                log.info(json.dumps({"event": "node_lost", "node": g.node, "gateway": name,
                                     "endpoint": g.endpoint}))
                ray.kill(g.handle, no_restart=True)
        for node in sorted(create):
            for k in range(self.plan.per_node):  # the first ones first: they pick ports
                name = gateway_name(node, k)
                self.gateways[name] = _Gateway(node, k, name, self._gateway(node, k, name))
        gateways = list(self.gateways.values())
        listening = [g for g in gateways if g.endpoint is not None]
        for g, still in zip(listening, await asyncio.gather(
                *(self._still_listening(g) for g in listening)), strict=True):
            if not still:  # restarted: without listeners, and without peers
                g.endpoint, g.knows = None, None
        names = set(self.gateways)
        await asyncio.gather(
            *(self._tell_peers(g) for g in gateways if g.knows != names - {g.name})
        )
        now = asyncio.get_running_loop().time()
        for g in gateways:
            if g.endpoint is not None or g.knows is None or now < g.retry_at:
                continue
            if not all(o.knows is not None and g.name in o.knows
                       for o in gateways if o.endpoint is not None):
                continue
            ports = self._ports_for(g, gateways)
            if ports is not None:
                await self._start_gateway(g, strict, *ports)
        waiting = [g.name for g in gateways if g.endpoint is None]
        if strict and waiting:
            raise RuntimeError(f"the gateways {waiting} did not start: "
                               f"{self.errors[-1] if self.errors else 'no answer'}")

    def _ports_for(
        self, g: _Gateway, gateways: list[_Gateway]
    ) -> tuple[int | None, int | None] | None:
        """The (HTTP, TCP) ports ``g`` is to bind (None: not that one), or None: not yet.

        The node's first gateway to take a port binds the configured one; the
        others bind whichever it got (with port 0, the one the kernel chose).
        """
        ports: list[int | None] = []
        for which, (takes, configured) in enumerate(zip(
                self.plan.listens(g.k), (self.plan.http_port, self.plan.tcp_port), strict=True)):
            if not takes:
                ports.append(None)
                continue
            key = ("http_port", "tcp_port")[which]
            bound = next((o.endpoint[key] for o in gateways if o.node == g.node
                          and o.endpoint is not None and o.endpoint[key] is not None), None)
            first = min(k for k in range(self.plan.per_node) if self.plan.listens(k)[which])
            if bound is None and g.k != first:
                return None  # it follows the first, which is not listening yet
            ports.append(configured if bound is None else bound)
        return ports[0], ports[1]

    def _gateway(self, node: str, k: int, name: str) -> Any:
        plan = self.plan
        # StatsD listens in the node's first gateway only: its UDP port is not shared
        options = plan.options if k == 0 else replace(plan.options, statsd_port=None)
        return Gateway.options(
            name=name, get_if_exists=True, lifetime=self.lifetime, max_restarts=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(plan.store_url, plan.shards, options)

    async def _tell_peers(self, g: _Gateway) -> None:
        peers = {n: o.handle for n, o in self.gateways.items() if n != g.name}
        # a gateway not listening yet may still be starting its process
        timeout = CALL_TIMEOUT if g.endpoint is not None else START_TIMEOUT
        try:
            await asyncio.wait_for(g.handle.set_peers.remote(peers), timeout)
        except UNREACHABLE as e:
            self._error(f"gateway {g.name} did not take its peers: {e!r}")
            return
        g.knows = set(peers)

    async def _still_listening(self, g: _Gateway) -> bool:
        try:
            status = await asyncio.wait_for(g.handle.status.remote(), CALL_TIMEOUT)
        except UNREACHABLE:
            return True  # restarting or its node is going: the next round sees which
        if status["ports"] is None:
            log.info(json.dumps({"event": "gateway_restarted", "gateway": g.name}))
            return False
        return True

    async def _start_gateway(
        self, g: _Gateway, strict: bool, http: int | None, tcp: int | None
    ) -> None:
        shared = self.plan.sharing(g.k)
        try:
            g.endpoint = await asyncio.wait_for(
                g.handle.start.remote(self.plan.host, http, tcp, shared,
                                      (g.k, self.plan.pinned_gateways)), START_TIMEOUT
            )
        except Exception as e:
            cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause else e
            if strict:
                raise RuntimeError(f"the gateway {g.name} on node {g.node[:12]}: {cause}") from None
            g.retry_at = asyncio.get_running_loop().time() + RETRY_AFTER
            self._error(f"the gateway {g.name} on node {g.node[:12]} cannot start: {cause}")
            return
        log.info(json.dumps({"event": "gateway_listening", "gateway": g.name, "node": g.node,
                             **g.endpoint}))


def summary(before: dict[str, dict[str, Any] | None], now: dict[str, dict[str, Any] | None],
            seconds: float) -> dict[str, Any]:
    """The summary line's fields: what changed between two rounds of ``summary()`` answers.

    Shards answer ``checkpoints``, gateways ``connections``. A count lower than
    before belongs to an actor that restarted (its new process counts from
    zero); an actor that did not answer is named in ``unanswered`` and left out.
    """
    def delta(name: str, key: str) -> float:
        value = (now[name] or {}).get(key, 0)
        prev = (before.get(name) or {}).get(key, 0)
        return value - prev if value >= prev else value

    answered = [n for n, c in now.items() if c is not None]
    shards = [n for n in answered if "checkpoints" in (now[n] or {})]
    gateways = [n for n in answered if "connections" in (now[n] or {})]

    def total(names: list[str], key: str) -> float:
        return sum(delta(n, key) for n in names)

    return {
        "seconds": round(seconds, 1),
        "increments_per_s": round(total(shards, "increments") / seconds, 1) if seconds else 0,
        "checkpoints": int(total(shards, "checkpoints")),
        "slow_checkpoints": int(total(shards, "slow_checkpoints")),
        "failed_checkpoints": int(total(shards, "failed_checkpoints")),
        "slowest_checkpoint_s": round(max(
            [(now[n] or {}).get("slowest_checkpoint", 0.0) for n in shards], default=0.0), 4),
        "max_lag_s": round(max([(now[n] or {}).get("lag", 0.0) for n in shards], default=0.0), 3),
        "dirty_slots": sum((now[n] or {}).get("dirty_slots", 0) for n in shards),
        "connections": sum((now[n] or {}).get("connections", 0) for n in gateways),
        "cut_off": int(total(gateways, "cut_off")),
        "errors": int(total(answered, "errors")),
        "shards": len(shards),
        "gateways": len(gateways),
        "unanswered": sorted(n for n, c in now.items() if c is None),
    }


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
