"""Settings for ``tally serve``: flag, then ``TALLY_*`` variable, then TOML file, then default."""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tally.actors.affinity import MODES
from tally.api.access import AccessFileError, load_access
from tally.api.rules import RulesError, load_rules
from tally.wire.series import InvalidSeries, check_tenant

MAX_GATEWAYS_PER_NODE = 64


class ConfigError(ValueError):
    """A setting that cannot work; the message names it."""


@dataclass(frozen=True)
class ServeConfig:
    store: str = "sqlite:///tally-data/tally.db"
    host: str = "127.0.0.1"
    http_port: int = 8780
    tcp_port: int = 8781
    shards: int = 2 * (os.cpu_count() or 1)
    checkpoint_interval: float = 2.0
    address: str | None = None
    max_frame: int = 16 * 1024 * 1024
    # per shard: (series, hour) slots applied but not yet checkpointed before
    # ingest answers `overloaded` (a few hundred bytes each)
    max_dirty_slots: int = 2_000_000
    tokens: str | None = None  # TOML access list (api/access.py); None: open, loopback only
    # TCP connections per gateway; over it a connection is answered `overloaded`
    # and closed (HTTP: uvicorn's limit on connections and requests in progress)
    max_connections: int = 1000
    # a frame must arrive whole within this many seconds of its first byte, and
    # a client must take its answers within it: slow clients never hold memory
    frame_timeout: float = 30.0
    max_query_days: int = 3660  # longest from..to range a query may ask for
    rules: str | None = None  # TOML fan-out rules (api/rules.py); None: the built-in ones
    # StatsD line protocol over UDP and TCP on this one port (api/statsd.py); None: off
    statsd_port: int | None = None
    statsd_tenant: str | None = None  # tenant of StatsD lines without a `tenant` tag
    # where the StatsD listeners bind (None: --host); beyond loopback only when named here
    statsd_host: str | None = None
    # gateway processes on every node, sharing its ports (SO_REUSEPORT: the kernel
    # spreads new connections over them); a gateway is one process, one core
    gateways_per_node: int = 1
    # more gateway processes per node that take the HTTP port alone (queries, HTTP
    # ingest, the dashboard), leaving TCP and StatsD to the others; 0: all take both
    http_gateways_per_node: int = 0
    # "gateways": each TCP gateway gets a core of its own, the shards share the rest
    # (actors/affinity.py); "off": the kernel places them
    cpu_affinity: str = "off"
    # seconds between the service's summary log lines (cluster/supervisor.py); 0: none
    log_summary_interval: float = 60.0


def load_config(flags: dict[str, Any], config_file: str | None, env: dict[str, str]) -> ServeConfig:
    file_values: dict[str, Any] = {}
    path = config_file or env.get("TALLY_CONFIG")
    if path:
        try:
            file_values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"config file {path}: {e}") from None
    values: dict[str, Any] = {}
    for f in fields(ServeConfig):
        raw: Any = flags.get(f.name)
        if raw is None:
            raw = env.get(f"TALLY_{f.name.upper()}")
        if raw is None:
            raw = file_values.get(f.name, file_values.get(f.name.replace("_", "-")))
        if raw is None:
            continue
        values[f.name] = _coerce(f.name, raw, f.type)
    unknown = set(file_values) - {f.name for f in fields(ServeConfig)} - {
        f.name.replace("_", "-") for f in fields(ServeConfig)
    }
    if unknown:
        raise ConfigError(f"config file {path}: unknown settings {', '.join(sorted(unknown))}")
    cfg = ServeConfig(**values)
    check(cfg)
    return cfg


def _coerce(name: str, raw: Any, typ: Any) -> Any:
    kind = str(typ)
    try:
        if "int" in kind:
            return int(raw)
        if "float" in kind:
            return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {raw!r} is not a number") from None
    return str(raw)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass  # a name, not an address: resolve it below
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as e:
        raise ConfigError(f"host {host!r} does not resolve: {e}") from None
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def _check_statsd(cfg: ServeConfig) -> None:
    """StatsD carries no token: a listener beyond loopback would let anyone write any tenant."""
    if cfg.statsd_tenant is not None:
        try:
            check_tenant(cfg.statsd_tenant)
        except InvalidSeries as e:
            raise ConfigError(f"statsd-tenant: {e}") from None
        if cfg.statsd_port is None:
            raise ConfigError("statsd-tenant is set but statsd-port is not: StatsD is off")
    if cfg.statsd_host is not None and cfg.statsd_port is None:
        raise ConfigError("statsd-host is set but statsd-port is not: StatsD is off")
    if cfg.statsd_port is None:
        return
    if not 0 < cfg.statsd_port < 65536:
        raise ConfigError(f"statsd-port: {cfg.statsd_port} is not a port")
    if cfg.statsd_port in (cfg.http_port, cfg.tcp_port):
        raise ConfigError(f"statsd-port {cfg.statsd_port} is also the HTTP or wire TCP port")
    if cfg.statsd_host is not None:
        is_loopback(cfg.statsd_host)  # resolves, or says it does not
        return  # named on purpose: a trusted network's address, or a firewalled port
    if not is_loopback(cfg.host):
        raise ConfigError(
            f"statsd-port with host {cfg.host}: the StatsD protocol carries no token, so a "
            "StatsD listener there would let anyone who reaches it write any tenant; name "
            "the address StatsD may listen on with --statsd-host (a private network's, or "
            "a firewalled port), or run a StatsD relay beside a loopback tally"
        )


def check(cfg: ServeConfig) -> None:
    if cfg.shards < 1:
        raise ConfigError(f"shards: {cfg.shards}; at least 1")
    if cfg.max_dirty_slots < 1:
        raise ConfigError(f"max-dirty-slots: {cfg.max_dirty_slots}; at least 1")
    if cfg.log_summary_interval < 0:
        raise ConfigError(f"log-summary-interval: {cfg.log_summary_interval}; must be 0 (no "
                          "summary) or positive")
    if cfg.checkpoint_interval <= 0:
        raise ConfigError(f"checkpoint-interval: {cfg.checkpoint_interval}; must be positive")
    for name in ("http_port", "tcp_port"):
        port = getattr(cfg, name)
        if not 0 <= port < 65536:  # 0: any free port, as the gateways report it
            raise ConfigError(f"{name.replace('_', '-')}: {port} is not a TCP port")
    if cfg.http_port == cfg.tcp_port and cfg.http_port:
        raise ConfigError(f"http-port and tcp-port are both {cfg.http_port}")
    _check_statsd(cfg)
    if not 1 <= cfg.gateways_per_node <= MAX_GATEWAYS_PER_NODE:
        raise ConfigError(f"gateways-per-node: {cfg.gateways_per_node}; "
                          f"from 1 to {MAX_GATEWAYS_PER_NODE}")
    if not 0 <= cfg.http_gateways_per_node <= MAX_GATEWAYS_PER_NODE:
        raise ConfigError(f"http-gateways-per-node: {cfg.http_gateways_per_node}; "
                          f"from 0 to {MAX_GATEWAYS_PER_NODE}")
    if cfg.cpu_affinity not in MODES:
        raise ConfigError(f"cpu-affinity: {cfg.cpu_affinity!r}; one of {', '.join(MODES)}")
    for name in ("max_connections", "max_query_days"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name.replace('_', '-')}: {getattr(cfg, name)}; at least 1")
    if cfg.frame_timeout <= 0:
        raise ConfigError(f"frame-timeout: {cfg.frame_timeout}; must be positive")
    if cfg.tokens is not None:
        try:
            load_access(cfg.tokens)
        except AccessFileError as e:
            raise ConfigError(str(e)) from None
    if cfg.rules is not None:
        try:
            load_rules(cfg.rules)
        except RulesError as e:
            raise ConfigError(str(e)) from None
    if cfg.tokens is None and not is_loopback(cfg.host):
        raise ConfigError(
            f"host {cfg.host} is not a loopback address: listening beyond this machine "
            "requires access tokens (--tokens FILE); without them anyone who can reach "
            "the port could read and write every tenant's counts"
        )
