"""Starting and stopping the service on Ray: store check, then the supervisor actor
(cluster/supervisor.py), which creates the shards and one gateway per node."""

from __future__ import annotations

import importlib.metadata
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tally.api.access import load_access
from tally.api.gateway import GatewayOptions
from tally.api.rules import BUILTIN, load_rules
from tally.api.tcp import TcpLimits
from tally.checkpoint.store import LayoutMismatch, StoreError
from tally.checkpoint.urls import open_store, redact_url
from tally.cluster.config import ConfigError, ServeConfig
from tally.cluster.supervisor import (
    PLACEMENT_MEMORY,
    SUPERVISOR_NAME,
    ServicePlan,
    Supervisor,
    head_node,
)

NAMESPACE = "tally"


def absolute_store_url(url: str) -> str:
    """Actors may run with another working directory: pin a relative SQLite path."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        return prefix + str(Path(url[len(prefix):]).resolve())
    return url


class Service:
    """The running service of one ``tally serve``: its supervisor actor and what it reports."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.store_url = absolute_store_url(cfg.store)
        self.supervisor: Any = None
        self.gateways: list[dict[str, Any]] = []  # endpoints, as the supervisor reports them
        self.adopted = False

    def check_store(self) -> None:
        """Open the store once here so a bad URL or shard count fails before Ray starts."""
        if self.store_url.startswith("memory://"):
            return
        try:
            store = open_store(self.store_url)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            store.ensure_layout(self.cfg.shards)
        except LayoutMismatch as e:
            raise ConfigError(str(e)) from None
        except StoreError as e:
            raise ConfigError(f"store {redact_url(self.cfg.store)} is not reachable: {e}") from None
        finally:
            store.close()

    def plan(self) -> ServicePlan:
        cfg = self.cfg
        options = GatewayOptions(
            TcpLimits(cfg.max_frame, cfg.max_connections, cfg.frame_timeout),
            load_access(cfg.tokens) if cfg.tokens else None,
            cfg.max_query_days,
            load_rules(cfg.rules) if cfg.rules else BUILTIN,
            statsd_port=cfg.statsd_port,
            statsd_tenant=cfg.statsd_tenant,
            statsd_host=cfg.statsd_host,
        )
        return ServicePlan(
            self.store_url, cfg.shards, cfg.checkpoint_interval, cfg.max_dirty_slots, options,
            cfg.host, cfg.http_port, cfg.tcp_port, detached=bool(cfg.address),
            gateways_per_node=cfg.gateways_per_node,
            http_gateways_per_node=cfg.http_gateways_per_node,
            cpu_affinity=cfg.cpu_affinity, summary_interval=cfg.log_summary_interval,
        )

    def start(self, stop: threading.Event) -> None:
        """Create (or, on a cluster, adopt) the service; raises StartAborted on a signal,
        when Ray never answers, or when a running service differs from this one."""
        plan = self.plan()
        if plan.detached:
            try:
                ray.get_actor(SUPERVISOR_NAME)
                self.adopted = True
            except ValueError:
                pass
        self.supervisor = Supervisor.options(
            name=SUPERVISOR_NAME, get_if_exists=True,
            lifetime="detached" if plan.detached else None, memory=PLACEMENT_MEMORY,
            # on the head: losing it loses the cluster anyway
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                head_node() or ray.get_runtime_context().get_node_id(), soft=True
            ),
        ).remote(plan)
        running = _wait(self.supervisor.identity.remote(), stop, "the supervisor")
        if running != plan.identity():
            raise StartAborted(
                f"a tally service with {running} already runs in this Ray cluster's namespace "
                f"{NAMESPACE!r}; this one would use {plan.identity()}: stop it first "
                "(SIGTERM to its tally serve, or ray.kill its actors)", by_signal=False,
            )
        self.gateways = _wait(self.supervisor.start.remote(), stop, "the service's actors")

    def refresh(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Gateways (started, lost) since the last call, as the supervisor reports them."""
        now = ray.get(self.supervisor.endpoints.remote(), timeout=30)
        if now is None:  # the supervisor restarted and is taking the service over again
            return [], []
        key = lambda g: (g["node"], g["http_port"], g["tcp_port"])  # noqa: E731
        before = {key(g) for g in self.gateways}
        after = {key(g) for g in now}
        started = [g for g in now if key(g) not in before]
        lost = [g for g in self.gateways if key(g) not in after]
        self.gateways = now
        return started, lost

    def abandon(self) -> None:
        """After a failed start on a cluster: kill the detached actors this command made."""
        if self.supervisor is None or not self.cfg.address or self.adopted:
            return
        try:
            names = ray.get(self.supervisor.actor_names.remote(), timeout=30)
        except (ray.exceptions.RayError, TimeoutError):
            names = [SUPERVISOR_NAME]
        _kill(names)

    def stop(self) -> list[int]:
        """Stop accepting, then a final checkpoint on every shard; their ck ids.

        On a cluster the actors are detached: they are killed here once the
        final checkpoint is written, or they would serve on without a driver.
        """
        cks = ray.get(self.supervisor.stop.remote())
        if self.cfg.address:
            _kill(ray.get(self.supervisor.actor_names.remote()))
        return cks


def _kill(names: list[str]) -> None:
    for name in names:
        try:
            ray.kill(ray.get_actor(name), no_restart=True)
        except ValueError:
            continue  # not running: a lost node's gateway, or a store host never made


def _report_gateways(service: Service) -> None:
    try:
        started, lost = service.refresh()
    except (ray.exceptions.RayError, TimeoutError) as e:
        print(f"tally: the supervisor did not answer ({type(e).__name__}); asking again",
              file=sys.stderr, flush=True)
        return
    for g in lost:
        print(f"tally: gateway lost with its node: {describe(g)}", flush=True)
    for g in started:
        print(f"tally: gateway on {describe(g)}", flush=True)


def describe(gateway: dict[str, Any]) -> str:
    return (f"node {gateway['ip']} ({gateway['node'][:12]}): HTTP http://{gateway['host']}:"
            f"{gateway['http_port']}, TCP {gateway['host']}:{gateway['tcp_port']}")


START_TIMEOUT = 120.0
LOG_FLUSH_SECONDS = 1.5


class StartAborted(RuntimeError):
    def __init__(self, message: str, by_signal: bool) -> None:
        super().__init__(message)
        self.by_signal = by_signal


def _wait(refs: Any, stop: threading.Event, what: str, timeout: float = START_TIMEOUT) -> Any:
    """ray.get that a signal can interrupt and that gives up when Ray never answers
    (a raylet that died during start-up would otherwise hang the command)."""
    pending = refs if isinstance(refs, list) else [refs]
    deadline = time.monotonic() + timeout
    while True:
        _, not_ready = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        if not not_ready:
            return ray.get(refs)
        if stop.is_set():
            raise StartAborted(f"stopped by a signal while waiting for {what}", by_signal=True)
        if time.monotonic() > deadline:
            raise StartAborted(f"{what} did not start within {timeout:g} s", by_signal=False)


# A gateway's call to a shard carries that shard's part of a frame, which a
# large columnar frame takes past Ray's default limit for inlined arguments
# (100 KB). Beyond it Ray puts them into the object store, a round trip to the
# raylet made on the calling thread: the gateway's event loop stands still for
# it on every call. Inlined in the call up to 4 MiB, they cost a copy.
# The cluster files pass the same to `ray start --head` (cluster/ray/*.yaml).
RAY_SYSTEM_CONFIG = {"max_direct_call_object_size": 4 * 1024 * 1024}


def init_ray(address: str | None) -> None:
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
    else:
        ray.init(
            address="local",  # never join a cluster found on this machine by accident
            namespace=NAMESPACE,
            include_dashboard=False,
            num_cpus=os.cpu_count() or 1,
            object_store_memory=256 * 1024 * 1024,
            log_to_driver=True,
            configure_logging=False,
            _system_config=RAY_SYSTEM_CONFIG,
        )


def version() -> str:
    try:
        return importlib.metadata.version("tally")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown"


def serve(cfg: ServeConfig) -> int:
    service = Service(cfg)
    service.check_store()
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop.set()

    init_ray(cfg.address)
    # After ray.init, which installs a SIGTERM handler of its own (it aborts
    # the process); before the actors start, so a signal during start-up
    # stops the service cleanly once it is up.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        try:
            service.start(stop)
        except (ray.exceptions.RayTaskError, StartAborted) as e:
            service.abandon()
            if isinstance(e, StartAborted):
                print(f"tally: {'' if e.by_signal else 'error: '}{e}", file=sys.stderr, flush=True)
                return 0 if e.by_signal else 1
            cause = e.cause if e.cause is not None else e
            print(f"tally: error: cannot start: {cause}", file=sys.stderr, flush=True)
            return 1
        here = ray.get_runtime_context().get_node_id()
        first = next((g for g in service.gateways if g["node"] == here), service.gateways[0])
        if service.adopted:
            print("tally: adopted the service already running in this Ray cluster", flush=True)
        print(
            f"tally: serving HTTP on http://{cfg.host}:{first['http_port']} and "
            f"TCP on {cfg.host}:{first['tcp_port']}; "
            + (f"StatsD (UDP and TCP) on {cfg.statsd_host or cfg.host}:"
               f"{first['statsd_port']}"
               f" (tenant {cfg.statsd_tenant or 'from tags only'}); "
               if "statsd_port" in first else "")
            + (f"{cfg.gateways_per_node} gateway processes per node sharing the ports; "
               if cfg.gateways_per_node > 1 and not cfg.http_gateways_per_node else "")
            + (f"gateway processes per node: {cfg.http_gateways_per_node} for HTTP, "
               f"{cfg.gateways_per_node} for TCP; " if cfg.http_gateways_per_node else "")
            + f"{cfg.shards} shards; "
            f"store {redact_url(service.store_url)}; "
            f"checkpoints every {cfg.checkpoint_interval:g} s; "
            f"{'tokens from ' + cfg.tokens if cfg.tokens else 'open access (no tokens)'}; "
            f"{'event rules from ' + cfg.rules if cfg.rules else 'built-in event rules'}; "
            f"Ray at {ray.get_runtime_context().gcs_address} (namespace {NAMESPACE}); "
            f"version {version()} (Ray {ray.__version__})",
            flush=True,
        )
        if cfg.address:  # one gateway per node: say where each listens, now and as nodes come
            for g in service.gateways:
                print(f"tally: gateway on {describe(g)}", flush=True)
        while not stop.wait(1.0):
            if cfg.address:
                _report_gateways(service)
        name = signal.Signals(received[0]).name
        print(f"tally: {name}: stopping ingress and writing a final checkpoint", flush=True)
        cks = service.stop()
        # Ray forwards the actors' log lines by polling their files: a moment
        # more, so the final checkpoints' lines reach this stdout before Ray goes.
        time.sleep(LOG_FLUSH_SECONDS)
        print(f"tally: final checkpoint written (checkpoint ids {cks}); bye", flush=True)
        return 0
    finally:
        ray.shutdown()
        sys.stdout.flush()
