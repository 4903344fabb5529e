"""Starting and stopping the service on Ray: store check, shards, gateway."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray

from actors.shard import SHARD_NAME, ShardActor
from api.access import load_access
from api.gateway import GATEWAY_NAME, Gateway, GatewayOptions
from api.rules import BUILTIN, load_rules
from api.tcp import TcpLimits
from checkpoint.remote import HOST_NAME, StoreHost
from checkpoint.store import LayoutMismatch, StoreError
from checkpoint.urls import open_store, redact_url
from cluster.config import ConfigError, ServeConfig

NAMESPACE = "tally"


def absolute_store_url(url: str) -> str:
    """Actors may run with another working directory: pin a relative SQLite path."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        return prefix + str(Path(url[len(prefix):]).resolve())
    return url


class Service:
    """The running actors of one ``tally serve``."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.store_url = absolute_store_url(cfg.store)
        self.shards: list[Any] = []
        self.gateway: Any = None
        self.ports: dict[str, int] = {}
        self.store_host: Any = None  # memory:// only; the handle keeps the actor alive

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

    def start(self, stop: threading.Event) -> None:
        """Create the actors; raises StartAborted on a signal or when Ray never answers."""
        cfg = self.cfg
        if self.store_url.startswith("memory://"):
            self.store_host = StoreHost.options(name=HOST_NAME).remote(self.store_url)
            _wait(self.store_host.call.remote("ensure_layout", cfg.shards), stop, "the store")
        self.shards = [
            ShardActor.options(name=SHARD_NAME.format(i)).remote(
                i, self.store_url, cfg.checkpoint_interval, cfg.max_dirty_slots
            )
            for i in range(cfg.shards)
        ]
        _wait([s.ready.remote() for s in self.shards], stop, "the shard actors")
        options = GatewayOptions(
            TcpLimits(cfg.max_frame, cfg.max_connections, cfg.frame_timeout),
            load_access(cfg.tokens) if cfg.tokens else None,
            cfg.max_query_days,
            load_rules(cfg.rules) if cfg.rules else BUILTIN,
            statsd_port=cfg.statsd_port,
            statsd_tenant=cfg.statsd_tenant,
            statsd_host=cfg.statsd_host,
        )
        self.gateway = Gateway.options(name=GATEWAY_NAME).remote(
            self.store_url, cfg.shards, options
        )
        self.ports = _wait(
            self.gateway.start.remote(cfg.host, cfg.http_port, cfg.tcp_port), stop, "the gateway"
        )

    def stop(self) -> list[int]:
        """Stop accepting, then a final checkpoint on every shard; their ck ids.

        A shard that is restarting at that moment (it crashed just before) is
        asked again until it answers: its final checkpoint is what makes the
        acknowledged increments it recovers durable.
        """
        if self.gateway is not None:
            try:
                ray.get(self.gateway.stop.remote())
            except ray.exceptions.RayActorError as e:
                # gone already: nothing to stop accepting; the shards still checkpoint
                print(f"tally: the gateway was already gone ({type(e).__name__})",
                      file=sys.stderr, flush=True)
        return [
            _call_until_answered(lambda s=s: s.shutdown.remote(), f"shard {i}")
            for i, s in enumerate(self.shards)
        ]


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


def _call_until_answered(call: Any, what: str, attempts: int = 20) -> Any:
    for attempt in range(attempts):
        try:
            return ray.get(call())
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.ActorDiedError) as e:
            if attempt == attempts - 1:
                raise
            print(f"tally: {what} is unavailable ({type(e).__name__}); asking again",
                  file=sys.stderr, flush=True)
            time.sleep(0.5)
    raise AssertionError("unreachable")


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
        )


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
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if e.cause is not None else e
            print(f"tally: error: cannot start: {cause}", file=sys.stderr, flush=True)
            return 1
        except StartAborted as e:
            print(f"tally: {'' if e.by_signal else 'error: '}{e}", file=sys.stderr, flush=True)
            return 0 if e.by_signal else 1
        print(
            f"tally: serving HTTP on http://{cfg.host}:{service.ports['http_port']} and "
            f"TCP on {cfg.host}:{service.ports['tcp_port']}; "
            + (f"StatsD (UDP and TCP) on {cfg.statsd_host or cfg.host}:"
               f"{service.ports['statsd_port']}"
               f" (tenant {cfg.statsd_tenant or 'from tags only'}); "
               if "statsd_port" in service.ports else "")
            + f"{cfg.shards} shards; "
            f"store {redact_url(service.store_url)}; "
            f"checkpoints every {cfg.checkpoint_interval:g} s; "
            f"{'tokens from ' + cfg.tokens if cfg.tokens else 'open access (no tokens)'}; "
            f"{'event rules from ' + cfg.rules if cfg.rules else 'built-in event rules'}; "
            f"Ray at {ray.get_runtime_context().gcs_address} (namespace {NAMESPACE})",
            flush=True,
        )
        while not stop.wait(1.0):
            pass
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
