"""The gateway's operational metrics, and the one /metrics page for the whole service.

Prometheus scrapes the gateway only: shards live in Ray actors it cannot
reach. So the gateway asks every shard for its exposition text and merges the
families of the same name (their samples differ by the ``shard`` label) with
its own into one valid exposition. A shard that does not answer costs the
scrape its samples, not the page. With several gateways (per node, or on
several nodes) it asks the other gateways for their counters too, and every
gateway's samples carry a ``gateway`` label: any gateway's page shows the
whole service, so HTTP-only gateways show what the TCP ones took.

The ingress shells (api/http.py, api/tcp.py) do the counting, not Service:
they know the ingress name and see the refusals (bad frames, bad tokens,
malformed bodies) that never reach Service.ingest.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from tally.actors.clients import ShardClient

log = logging.getLogger("tally.metrics")

# From a one-series query answered from memory up to a breakdown over thousands
# of series or a cold read of the store.
QUERY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
QUERY_ROUTES = frozenset({"/v1/series", "/v1/breakdown", "/v1/catalog"})


class GatewayMetrics:
    """Counters of one gateway; the method names are what the ingress shells call."""

    def __init__(self, name: str = "gateway") -> None:
        self.name = name  # the ``gateway`` label of its samples beside other gateways'
        # Never the global default registry: tests build many gateways in one process.
        self.registry = reg = CollectorRegistry(auto_describe=False)
        self._batches = Counter(
            "tally_batches_total", "Ingest batches by ingress and outcome",
            ["ingress", "outcome"], registry=reg,
        )
        self._accepted = Counter(
            "tally_increments_accepted_total", "Increments in accepted batches",
            ["ingress"], registry=reg,
        )
        self._rejected = Counter(
            "tally_increments_rejected_total",
            "Increments in refused batches, by wire error code",
            ["ingress", "reason"], registry=reg,
        )
        self._open = Gauge(
            "tally_connections_open", "TCP ingress connections open now", registry=reg
        )
        self._connections = Counter(
            "tally_connections_total", "TCP ingress connections accepted", registry=reg
        )
        self._refused = Counter(
            "tally_connections_refused_total", "TCP ingress connections refused",
            ["reason"], registry=reg,
        )
        self._cut_off = Counter(
            "tally_connections_cut_off_total",
            "TCP connections the server closed, by the code of its last error frame "
            "(bad_frame, too_large, timeout, unauthorized, bad_request, overloaded, "
            "max_connections); each is also logged, throttled",
            ["reason"], registry=reg,
        )
        self.cut_off = 0  # the same, all reasons: the supervisor's summary line reads it
        self._frame_errors = Counter(
            "tally_frame_errors_total", "TCP frames that could not be read",
            ["code"], registry=reg,
        )
        self._query_seconds = Histogram(
            "tally_query_duration_seconds", "HTTP query time, from request to last byte",
            ["route"], buckets=QUERY_BUCKETS, registry=reg,
        )
        self._http = Counter(
            "tally_http_requests_total", "HTTP requests by route template and status",
            ["route", "status"], registry=reg,
        )
        self._statsd_lines = Counter(
            "tally_statsd_lines_total", "StatsD lines received, by outcome (accepted, rejected)",
            ["outcome"], registry=reg,
        )
        self._statsd_rejected = Counter(
            "tally_statsd_rejected_lines_total", "StatsD lines refused, by reason",
            ["reason"], registry=reg,
        )
        self._scrape_errors = Counter(
            "tally_shard_scrape_errors_total",
            "Shards that did not answer a /metrics scrape (their samples are missing from it)",
            ["shard"], registry=reg,
        )

    # ---- ingress -------------------------------------------------------

    def batch_accepted(self, ingress: str, increments: int) -> None:
        self._batches.labels(ingress=ingress, outcome="accepted").inc()
        self._accepted.labels(ingress=ingress).inc(increments)

    def batch_rejected(self, ingress: str, reason: str, increments: int) -> None:
        self._batches.labels(ingress=ingress, outcome="rejected").inc()
        self._rejected.labels(ingress=ingress, reason=reason).inc(increments)

    def statsd_lines(self, accepted: int, rejected: dict[str, int]) -> None:
        """StatsD lines: a rejected line is never applied, whatever its reason."""
        if accepted:
            self._statsd_lines.labels(outcome="accepted").inc(accepted)
        for reason, n in rejected.items():
            self._statsd_lines.labels(outcome="rejected").inc(n)
            self._statsd_rejected.labels(reason=reason).inc(n)

    def connection_opened(self) -> None:
        self._open.inc()
        self._connections.inc()

    def connection_closed(self) -> None:
        self._open.dec()

    def connection_refused(self, reason: str) -> None:
        self._refused.labels(reason=reason).inc()

    def connection_cut_off(self, reason: str) -> None:
        self._cut_off.labels(reason=reason).inc()
        self.cut_off += 1

    def frame_error(self, code: str) -> None:
        self._frame_errors.labels(code=code).inc()

    # ---- HTTP ----------------------------------------------------------

    def observe_query(self, route: str, seconds: float) -> None:
        self._query_seconds.labels(route=route).observe(seconds)

    def http_request(self, route: str, status: int) -> None:
        self._http.labels(route=route, status=str(status)).inc()

    # ---- exposition ----------------------------------------------------

    def watch_channels(self, channels: Iterable[Any]) -> None:
        """Count the shard queries and batches each road answered (actors/channel.py):
        all of them by ``ray`` means the gateways cannot reach the shards' sockets."""
        self.registry.register(_ChannelUse(list(channels)))

    def own_text(self) -> str:
        """This gateway's samples alone, for another gateway's page."""
        return generate_latest(self.registry).decode()

    async def render(
        self, shards: ShardClient, peers: dict[str, str | BaseException] | None = None
    ) -> bytes:
        """This gateway's metrics, every shard's and ``peers``' (the other gateways'
        ``own_text`` by name), as one Prometheus text exposition."""
        try:
            texts = await shards.metrics()
        except Exception as e:  # nothing came back: every shard's samples are missing
            texts = [e] * shards.shards
        shard_families: list[Metric] = []
        for shard, text in enumerate(texts):
            if not isinstance(text, BaseException):
                try:
                    shard_families.extend(text_string_to_metric_families(text))
                    continue
                except ValueError as e:
                    text = e
            self._scrape_errors.labels(shard=str(shard)).inc()
            log.warning(json.dumps(
                {"event": "error", "where": "metrics", "shard": shard, "error": repr(text)}
            ))
        gateway_families: list[Metric] = []
        for name, text in (peers or {}).items():
            try:
                if isinstance(text, BaseException):
                    raise text
                gateway_families.extend(_labelled(text_string_to_metric_families(text), name))
            except Exception as e:  # that gateway's samples are missing from this page
                log.warning(json.dumps(
                    {"event": "error", "where": "metrics", "gateway": name, "error": repr(e)}
                ))
        # Collected after the shards answered, so this scrape counts its own errors.
        own = list(self.registry.collect())
        if peers:
            own = _labelled(own, self.name)
        merged = _merge([*own, *gateway_families, *shard_families])
        out = CollectorRegistry(auto_describe=False)
        out.register(_Families(merged))
        return generate_latest(out)


def body_increments(body: dict[str, Any]) -> int:
    """Increments an ingest body claims to carry, unvalidated: what a refusal refused."""
    rows, i = body.get("rows"), body.get("i")
    if isinstance(rows, list):
        return len(rows)
    if isinstance(i, list):
        return len(i)
    if isinstance(i, bytes | bytearray):
        return len(i) // 4  # little-endian uint32 series indexes
    return 0


def _merge(families: Iterable[Metric]) -> list[Metric]:
    """One family per name, samples concatenated; a family whose type disagrees is dropped.

    The text parser gives counters their OpenMetrics name (``_total``
    stripped, samples keep it), the same form the registry collects, so a
    counter from a shard and the exposition of the merge keep ``_total``.
    """
    merged: dict[str, Metric] = {}
    for family in families:
        into = merged.get(family.name)
        if into is None:
            into = merged[family.name] = Metric(family.name, family.documentation, family.type)
        elif into.type != family.type:
            log.warning(json.dumps({
                "event": "error", "where": "metrics", "family": family.name,
                "error": f"type {family.type} here, {into.type} elsewhere: dropped",
            }))
            continue
        into.samples.extend(family.samples)
    return list(merged.values())


def _labelled(families: Iterable[Metric], gateway: str) -> list[Metric]:
    """The families with ``gateway`` added to every sample's labels.

    ``_created`` samples are left out: inside a counter family as collected,
    a gauge family of their own once parsed, they would clash on one page.
    """
    out = []
    for family in families:
        if family.name.endswith("_created"):
            continue
        copy = Metric(family.name, family.documentation, family.type)
        copy.samples = [s._replace(labels={**s.labels, "gateway": gateway})
                        for s in family.samples if not s.name.endswith("_created")]
        out.append(copy)
    return out


class _ChannelUse:
    """``tally_shard_queries_total{path}`` and ``tally_shard_applies_total{path}``, read
    from the channels' own counts."""

    def __init__(self, channels: list[Any]) -> None:
        self.channels = channels

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "tally_shard_queries", "Shard queries of this gateway, by the road that answered "
            "(socket: the shard's query socket; ray: an actor call, the fallback)", labels=["path"])
        family.add_metric(["socket"], sum(c.answered for c in self.channels))
        family.add_metric(["ray"], sum(c.fell_back for c in self.channels))
        yield family
        applies = CounterMetricFamily(
            "tally_shard_applies", "Batch parts this gateway sent to shards, by road (socket; "
            "ray: an actor call, for batches without a producer or when the socket is "
            "unavailable; lost: sent by socket and the connection ended before the answer, "
            "so the batch was refused and is resent)", labels=["path"])
        applies.add_metric(["socket"], sum(c.applied for c in self.channels))
        applies.add_metric(["ray"], sum(c.applies_by_ray for c in self.channels))
        applies.add_metric(["lost"], sum(c.applies_lost for c in self.channels))
        yield applies


class _Families:
    """A collector that yields families already built (the merge of one scrape)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class HttpMetricsMiddleware:
    """Counts every HTTP request by route template and status, and times the queries.

    Pure ASGI (no BaseHTTPMiddleware task and stream per request): it is on
    the millisecond query path. The route template comes from the scope the
    router fills in, so the label set stays bounded whatever URLs arrive.
    """

    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "other"
            if route in QUERY_ROUTES:
                self.metrics.observe_query(route, time.perf_counter() - started)
            self.metrics.http_request(route, status)
