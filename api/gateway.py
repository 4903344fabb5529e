"""The gateway actor: HTTP and TCP ingress in one async Ray actor.

A gateway holds no counts, only handles to the shard actors and a read
handle to the store, so several can run (one per node) and any of them can
be restarted without losing anything.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import ray
import uvicorn

from tally.actors import affinity, logs
from tally.actors.clients import RayShards
from tally.actors.shard import SHARD_NAME
from tally.api.access import AccessList
from tally.api.http import create_app
from tally.api.rules import BUILTIN, Rules
from tally.api.service import Service
from tally.api.statsd import StatsdIngress
from tally.api.tcp import TcpLimits, TcpServer
from tally.checkpoint.remote import open_store_in_actor

log = logging.getLogger("tally.gateway")
GATEWAY_NAME = "tally-gateway"


BIND_WAIT = 10.0


class PortInUse(RuntimeError):
    pass


def _bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The HTTP socket, bound here rather than by uvicorn: a taken port is an OSError
    to report (uvicorn would exit the process), and port 0 tells which port it got.
    ``reuse_port``: several gateways of a node share the port (SO_REUSEPORT)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def _tell(peer: Any, sids: list[str]) -> None:
    await peer.saw_series.remote(sids)


async def _own_metrics(peer: Any) -> str:
    return await peer.own_metrics.remote()


@dataclass(frozen=True)
class GatewayOptions:
    """What a gateway enforces; the access list holds digests only, never secrets.

    ``rules`` travel parsed: the file is read and checked once by ``tally serve``
    (a bad one stops it with exit 2), and a gateway on another node need not see it.
    """

    limits: TcpLimits = field(default_factory=TcpLimits)
    access: AccessList | None = None
    max_query_days: int = 3660
    rules: Rules = BUILTIN
    statsd_port: int | None = None  # None: no StatsD listeners (api/statsd.py)
    statsd_tenant: str | None = None  # the tenant of StatsD lines without a tenant tag
    statsd_host: str | None = None  # where StatsD binds; None: the gateway's host


@ray.remote(num_cpus=0, enable_task_events=False)
class Gateway:
    def __init__(self, store_url: str, shards: int, options: GatewayOptions) -> None:
        logs.configure()
        handles = [ray.get_actor(SHARD_NAME.format(i)) for i in range(shards)]
        self.store = open_store_in_actor(store_url)
        self.options = options
        shards = RayShards(handles)
        self.service = Service(shards, self.store, tell_peer=_tell,
                               ask_peer_metrics=_own_metrics)
        self.service.metrics.name = ray.get_runtime_context().get_actor_name() or "gateway"
        self.service.metrics.watch_channels(shards.channels)
        self.tcp = TcpServer(self.service, options.limits, options.access, options.rules)
        self.http: uvicorn.Server | None = None
        self._http_task: asyncio.Task | None = None
        self.statsd: StatsdIngress | None = None
        self.ports: dict[str, Any] | None = None  # set once listening

    # ---- the supervisor's calls (cluster/supervisor.py) ----------------

    async def status(self) -> dict[str, Any]:
        """Where this gateway listens (None until started: a restarted actor starts again)."""
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "ports": self.ports,
        }

    async def set_peers(self, peers: dict[str, Any]) -> None:
        """The other gateways, by name; set before this one listens and on every change."""
        self.service.peers.replace(peers)

    async def own_metrics(self) -> str:
        """This gateway's own samples, for a peer's /metrics page (api/metrics.py)."""
        return self.service.metrics.own_text()

    async def summary(self) -> dict[str, Any]:
        """Counts since start for the supervisor's summary line (cluster/supervisor.py)."""
        return {"connections": self.tcp.connections, "cut_off": self.service.metrics.cut_off,
                "errors": logs.errors_logged()}

    async def saw_series(self, sids: list[str]) -> None:
        """A peer's new series (api/peers.py); answered once this index holds them."""
        self.service.index.saw(sids)

    # ---- lifecycle -----------------------------------------------------

    async def start(
        self, host: str, http_port: int | None, tcp_port: int | None, reuse_port: bool = False,
        pin: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        """Listen on the ports given (0: any free port, None: not that one); raises
        PortInUse naming a taken port.

        Answers with the ports it listens on; a second call returns them again.
        With ``reuse_port`` the sockets take SO_REUSEPORT, so that the node's
        other gateways bind the same ports (``--gateways-per-node``). A gateway
        without HTTP serves TCP and StatsD for gateways that answer queries
        (``--http-gateways-per-node``), and one without TCP serves HTTP only.
        ``pin``: (this gateway's number on its node, TCP gateways per node that keep a
        core of their own), for ``--cpu-affinity`` (actors/affinity.py).
        """
        if self.ports is not None:
            return self.ports
        if pin is not None:
            affinity.pin(pin[1], pin[0], f"gateway {pin[0]}")
        self.service.start()
        # A gateway of a service killed a moment ago can hold the ports for a
        # few seconds more (its worker outlives the driver briefly): wait.
        deadline = time.monotonic() + BIND_WAIT
        while True:
            try:
                http_sock = None if http_port is None else _bind(host, http_port, reuse_port)
            except OSError as e:
                failing = ("HTTP", http_port, e)
            else:
                try:
                    tcp = None if tcp_port is None else await self.tcp.start(
                        host, tcp_port, reuse_port)
                    break
                except OSError as e:
                    if http_sock is not None:
                        http_sock.close()
                    failing = ("TCP", tcp_port, e)
            if time.monotonic() > deadline:
                which, port, err = failing
                raise PortInUse(f"{which} port {port} on {host}: {err.strerror}")
            await asyncio.sleep(0.25)
        opts = self.options
        ports: dict[str, Any] = {
            "http_port": None if http_sock is None else http_sock.getsockname()[1],
            "tcp_port": tcp, "host": host, "ip": ray.util.get_node_ip_address(),
        }
        if opts.statsd_port is not None and tcp_port is not None:
            self.statsd = StatsdIngress(self.service, opts.statsd_tenant)
            statsd_host = opts.statsd_host or host
            try:
                ports["statsd_port"] = await self.statsd.start(statsd_host, opts.statsd_port)
            except OSError as e:
                await self.tcp.stop()
                if http_sock is not None:
                    http_sock.close()
                raise PortInUse(f"StatsD port {opts.statsd_port} on {statsd_host}: {e}") from None
        if http_sock is not None:
            await self._serve_http(host, http_sock)
        gc.freeze()
        self.ports = ports
        return ports

    async def _serve_http(self, host: str, http_sock: socket.socket) -> None:
        """uvicorn on the bound socket, once it has started; PortInUse if it cannot."""
        opts = self.options
        http_port = http_sock.getsockname()[1]
        app = create_app(
            self.service, max_body=opts.limits.max_frame, access=opts.access,
            max_query_days=opts.max_query_days, rules=opts.rules,
        )
        config = uvicorn.Config(
            app,
            host=host,
            port=http_port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            # connections and requests in progress; over it uvicorn answers 503
            limit_concurrency=opts.limits.max_connections,
        )
        self.http = uvicorn.Server(config)
        self._http_task = asyncio.get_running_loop().create_task(self._run_http(http_sock))
        while not self.http.started:
            if self._http_task.done():
                await self.tcp.stop()
                if self.statsd is not None:
                    await self.statsd.stop()
                exc = self._http_task.exception()
                raise PortInUse(f"HTTP port {http_port} on {host}: {exc}")
            await asyncio.sleep(0.02)

    async def _run_http(self, sock: socket.socket) -> None:
        assert self.http is not None
        try:
            await self.http.serve(sockets=[sock])
        except SystemExit as e:
            # uvicorn exits the process when it cannot bind; inside an actor
            # that would hang it, so it becomes an error start() reports.
            raise RuntimeError(f"cannot listen (uvicorn exited with {e.code})") from None

    async def stop(self) -> None:
        """Stop accepting on both ports; requests in progress finish first."""
        await self.tcp.stop()
        if self.statsd is not None:
            await self.statsd.stop()  # its buffered lines are applied before the final checkpoint
        self.service.tracker.stop()
        if self.http is not None:
            self.http.should_exit = True
        if self._http_task is not None:
            await self._http_task

    async def stats(self) -> dict[str, Any]:
        return {
            "connections": self.tcp.connections,
            "increments": self.service.increments,
            "batches": self.service.batches,
            "statsd": self.statsd.stats.as_dict() if self.statsd is not None else None,
            "shards": await self.service.shards.stats(),
        }
