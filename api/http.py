"""The HTTP API v1 as a FastAPI app over a Service, and the dashboard page at ``/``.

Errors follow the design's shape, ``{"error": {"code", "message"}}``, with
400 (not FastAPI's 422) for a bad parameter or body. `/openapi.json` (and
`/docs`) describe the routes as they are, answers and errors included
(api/openapi.py); tests/test_openapi.py holds the server to it with
schemathesis.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import msgpack
from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from tally.api import openapi as doc
from tally.api.access import OPEN, AccessList, Denied, Grant
from tally.api.dashboard import dashboard_router
from tally.api.durability import ShardRestarted
from tally.api.fast_series import FastSeries
from tally.api.ingest import Incoming, build_batch, build_event_batch, check_ack, json_column
from tally.api.metrics import HttpMetricsMiddleware, body_increments
from tally.api.rules import BUILTIN, Rules
from tally.api.service import IngestError, Service
from tally.api.timerange import GRANULARITIES, QueryError, compare_plan, plan_range
from tally.wire.series import (
    InvalidSeries,
    check_metric,
    check_tag_key,
    check_tag_value,
    check_tenant,
)

log = logging.getLogger("tally.http")
DEFAULT_MAX_BODY = 16 * 1024 * 1024
INGEST_ROUTES = ("/v1/increments", "/v1/events")
STATUS = {"bad_request": 400, "bad_row": 400, "too_large": 413, "overloaded": 503}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status)


def bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def parse_where(items: list[str]) -> dict[str, str]:
    where: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep:
            raise bad(f"where {item!r} must be key:value")
        try:
            where[check_tag_key(key)] = check_tag_value(key, value)
        except InvalidSeries as e:
            raise bad(f"where {item!r}: {e}") from None
    return where


def parse_series_params(tenant: str, metric: str) -> None:
    try:
        check_tenant(tenant)
        check_metric(metric)
    except InvalidSeries as e:
        raise bad(str(e)) from None


def valid_where(tenant: str, metric: str, items: list[str]) -> dict[str, str] | None:
    """The ``where`` of a query whose tenant, metric and filters are valid; else None."""
    try:
        parse_series_params(tenant, metric)
        return parse_where(items)
    except ApiError:
        return None


async def read_body(request: Request, max_body: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise ApiError(413, "too_large", f"body of {declared} bytes; at most {max_body}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise ApiError(413, "too_large", f"body over {max_body} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    try:
        if ctype in ("application/msgpack", "application/x-msgpack"):
            body = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        elif ctype in ("application/json", "", "application/x-www-form-urlencoded"):
            # (the last is what `curl -d` sends when no type is given)
            body = json.loads(raw)
        else:
            raise bad(f"content-type {ctype!r}: send application/json or application/msgpack")
    except (ValueError, msgpack.UnpackException) as e:
        raise bad(f"body is not valid {ctype}: {e}") from None
    if not isinstance(body, dict):
        raise bad("body must be an object")
    return body


# Query parameters shared by the query routes. Their patterns and allowed values are in the
# schema for clients, and checked by the routes themselves, whose messages name the rule.
TENANT = Query(description="the tenant", json_schema_extra={"pattern": doc.TENANT_PATTERN})
METRIC = Query(description="the metric", json_schema_extra={"pattern": doc.METRIC_PATTERN})
DAY_OR_TIME = {"anyOf": [{"format": "date"}, {"format": "date-time"}]}
FROM = Query(
    alias="from", json_schema_extra=DAY_OR_TIME,
    description="first day YYYY-MM-DD (inclusive) or an ISO datetime, in `tz`",
)
TO = Query(
    json_schema_extra=DAY_OR_TIME,
    description="last day YYYY-MM-DD (inclusive) or an ISO datetime, in `tz`",
)
TZ = Query(
    default="UTC",
    description="an IANA time zone name; zones with a fractional offset are refused",
)
WHERE = Query(
    default=[], description="repeatable key:value tag filter; every one must match",
)


async def only_declared_params(request: Request) -> None:
    """Refuse a query parameter the route does not take: a misspelt ``granularty=hour``
    would otherwise be ignored and answer days, which looks right and is not."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    declared = {p.alias for p in route.dependant.query_params}
    for name in request.query_params:
        if name not in declared:
            raise bad(f"unknown parameter {name!r}: {route.path} takes "
                      f"{', '.join(sorted(declared))}")


def authorizer(access: AccessList | None, scope: str) -> Any:
    """A dependency giving the request's Grant for ``scope``: 401 without a known token,
    403 when the token lacks the scope; every grant is OPEN when no tokens are configured."""
    bearer = HTTPBearer(auto_error=False, description="a secret from the tokens file")

    async def grant(
        credentials: HTTPAuthorizationCredentials | None = Security(bearer),
    ) -> Grant:
        if access is None:
            return OPEN
        if credentials is None:
            raise Denied("unauthorized", "a token is required: Authorization: Bearer <token>")
        found = access.grant_for(credentials.credentials)
        found.require_scope(scope)
        return found

    return grant


def create_app(
    service: Service,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    durable_timeout: float = 30.0,
    access: AccessList | None = None,
    max_query_days: int = 3660,
    rules: Rules = BUILTIN,
) -> FastAPI:
    app = FastAPI(
        title="tally", version="1", docs_url="/docs", redoc_url=None,
        description="Analytics counters: ingest increments and events, query series and "
        "breakdowns. Errors are `{\"error\": {\"code\", \"message\"}}`. The dashboard is at `/`.",
    )
    may_ingest = Depends(authorizer(access, "ingest"))
    may_query = Depends(authorizer(access, "query"))
    may_administer = Depends(authorizer(access, "admin"))  # /metrics
    only_declared = Depends(only_declared_params)

    def refused(request: Request, code: str) -> None:
        """Count a refused ingest batch once; the route stashed how many increments it held."""
        state = request.state
        if request.scope["path"] in INGEST_ROUTES and not getattr(state, "counted", False):
            state.counted = True
            service.metrics.batch_rejected("http", code, getattr(state, "increments", 0))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        refused(request, e.code)
        return error_response(e.status, e.code, e.message)

    @app.exception_handler(IngestError)
    async def _ingest_error(request: Request, e: IngestError) -> JSONResponse:
        refused(request, e.code)
        extra = {"row": e.row} if e.row is not None else {}
        return error_response(STATUS.get(e.code, 500), e.code, e.message, **extra)

    @app.exception_handler(Denied)
    async def _denied(request: Request, e: Denied) -> JSONResponse:
        refused(request, e.code)
        response = error_response(e.status, e.code, e.message)
        if e.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="tally"'
        return response

    @app.exception_handler(QueryError)
    async def _query_error(_: Request, e: QueryError) -> JSONResponse:
        return error_response(400, "bad_request", str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body"))
            parts.append(f"{where}: {err.get('msg')}")
        return error_response(400, "bad_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "bad_request")
        response = error_response(e.status_code, code, str(e.detail))
        # a 405 names the methods that would work (Allow), as HTTP asks
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        refused(request, "internal")
        log.error(json.dumps({"event": "error", "where": "http", "error": repr(e)}))
        return error_response(500, "internal", f"internal error: {e!r}")

    def openapi() -> dict[str, Any]:
        """FastAPI's schema of the routes, plus the ingest bodies' models, which no route
        parameter declares (the routes read the raw body: JSON or msgpack)."""
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes,
            )
            components, _ = doc.body_schemas()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(components)
            # FastAPI lists its 422 for every route with parameters; tally answers a bad
            # parameter 400 (the design's error shape), already listed.
            # The routes keep their `dict` return type as the response model (pydantic-core
            # serializes it faster than jsonable_encoder: ~1 ms on a 744-point series), so
            # FastAPI writes that beside the documented model; the model alone is the truth.
            for operations in schema["paths"].values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    responses.pop("422", None)
                    for answer in responses.get("200", {}).get("content", {}).values():
                        if "$ref" in answer.get("schema", {}):
                            answer["schema"] = {"$ref": answer["schema"]["$ref"]}
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    _, request_bodies = doc.body_schemas()
    app.include_router(dashboard_router())

    @app.get("/healthz", responses={200: {"model": doc.Health}})
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "shards": service.shards.shards}

    @app.get("/metrics", include_in_schema=False)
    async def metrics(_: Grant = may_administer) -> Response:
        """Prometheus text: this gateway's counters and every shard's, merged."""
        text = await service.metrics.render(service.shards, await service.peer_metrics())
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    def envelope(body: dict[str, Any]) -> tuple[str, str | None, int | None]:
        """``ack``, ``producer`` and ``seq`` of an ingest body: the same for rows and events."""
        ack = check_ack(body.get("ack"))
        producer, seq = body.get("producer"), body.get("seq")
        if (producer is None) != (seq is None):
            raise bad("producer and seq go together: send both (idempotent) or neither")
        if producer is not None:
            if not isinstance(producer, str) or not 0 < len(producer) <= 200:
                raise bad("producer must be a string of 1 to 200 characters")
            if type(seq) is not int or not 1 <= seq < 2**63:
                raise bad(f"seq {seq!r} must be an integer from 1 to 2**63-1")
        return ack, producer, seq

    async def ingest(
        request: Request, grant: Grant, incoming: Incoming, ack: str, producer: str | None,
        seq: int | None,
    ) -> dict[str, int]:
        """Access check, apply, and the durable wait when asked: the answer ``{"rows": n}``."""
        request.state.increments = incoming.batch.increments
        with incoming.blamed():
            grant.require_tenants(incoming.tenants)
            applied = await service.ingest(incoming.batch, producer, seq)
        # Applied, so accepted even if the durable wait below fails (the resend is a duplicate).
        service.metrics.batch_accepted("http", applied.rows)
        request.state.counted = True
        if ack == "durable":
            try:
                await service.tracker.wait(applied.token, timeout=durable_timeout)
            except ShardRestarted as e:
                raise ApiError(503, "overloaded", str(e)) from None
            except TimeoutError:
                raise ApiError(
                    503, "overloaded",
                    f"applied, but not checkpointed within {durable_timeout:g} s (store slow "
                    "or down); resend with the same producer and seq to wait again",
                ) from None
        return {"rows": applied.rows}

    @app.post(
        "/v1/increments",
        responses={200: {"model": doc.IngestAnswer}, **doc.INGEST_ERRORS},
        openapi_extra={"requestBody": request_bodies["/v1/increments"]},
    )
    async def increments(request: Request, grant: Grant = may_ingest) -> dict[str, int]:
        """Apply a row or columnar batch, all or nothing; ``rows`` counts the increments."""
        body = await read_body(request, max_body)
        request.state.increments = body_increments(body)  # for a refusal's count
        ack, producer, seq = envelope(body)
        i, ts, v = body.get("i"), body.get("ts"), body.get("v")
        if body.get("series") is not None:
            i, ts, v = json_column("i", i, "<u4"), json_column("ts", ts, "<i8"), json_column(
                "v", v, "<i8"
            )
        batch = build_batch(body.get("rows"), body.get("series"), i, ts, v, service.clock())
        return await ingest(request, grant, Incoming(batch), ack, producer, seq)

    @app.post(
        "/v1/events",
        responses={200: {"model": doc.IngestAnswer}, **doc.INGEST_ERRORS},
        openapi_extra={"requestBody": request_bodies["/v1/events"]},
    )
    async def events(request: Request, grant: Grant = may_ingest) -> dict[str, int]:
        """Events fanned out by the rules, then applied exactly as ``/v1/increments`` rows;
        ``rows`` counts the increments made. A refusal names the event (``row``)."""
        body = await read_body(request, max_body)
        events = body.get("events")
        # a refusal before fan-out counts the events (each makes at least one increment)
        request.state.increments = len(events) if isinstance(events, list) else 0
        ack, producer, seq = envelope(body)
        incoming = build_event_batch(events, rules, service.clock())
        return await ingest(request, grant, incoming, ack, producer, seq)

    @app.get(
        "/v1/series", dependencies=[only_declared],
        responses={200: {"model": doc.SeriesAnswer}, **doc.QUERY_ERRORS},
    )
    async def series(
        tenant: str = TENANT,
        metric: str = METRIC,
        from_: str = FROM,
        to: str = TO,
        granularity: str = Query(
            default="day", description="hour, day, week (ISO weeks) or month",
            json_schema_extra=doc.GRANULARITY_ENUM,
        ),
        tz: str = TZ,
        where: list[str] = WHERE,
        compare: str | None = Query(
            default=None,
            description="previous_period (the same number of days just before `from`) or "
            "previous_year (the same dates a year earlier)",
            json_schema_extra=doc.COMPARE_ENUM,
        ),
        grant: Grant = may_query,
    ) -> dict[str, Any]:
        """One metric's totals per bucket over a range, summing every series that matches
        `where`, optionally beside the period before."""
        parse_series_params(tenant, metric)
        grant.require_tenant(tenant)
        if granularity not in GRANULARITIES:
            raise bad(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
        plan = plan_range(from_, to, granularity, tz, max_days=max_query_days)
        prev = compare_plan(plan, compare) if compare else None
        return await service.series(tenant, metric, parse_where(where), plan, prev)

    @app.get(
        "/v1/breakdown", dependencies=[only_declared],
        responses={200: {"model": doc.BreakdownAnswer}, **doc.QUERY_ERRORS},
    )
    async def breakdown(
        tenant: str = TENANT,
        metric: str = METRIC,
        by: str = Query(
            description="the tag to group by",
            json_schema_extra={"pattern": doc.TAG_KEY_PATTERN},
        ),
        from_: str = FROM,
        to: str = TO,
        tz: str = TZ,
        where: list[str] = WHERE,
        limit: int = Query(default=10, ge=1, le=1000, description="groups answered one by one"),
        grant: Grant = may_query,
    ) -> dict[str, Any]:
        """Totals per value of tag `by` over a range, largest first; the rest in `other`."""
        parse_series_params(tenant, metric)
        grant.require_tenant(tenant)
        try:
            check_tag_key(by)
        except InvalidSeries as e:
            raise bad(f"by: {e}") from None
        plan = plan_range(from_, to, "day", tz, max_days=max_query_days)
        return await service.breakdown(tenant, metric, by, parse_where(where), plan, limit)

    @app.get(
        "/v1/catalog", dependencies=[only_declared],
        responses={200: {"model": doc.CatalogAnswer}, **doc.QUERY_ERRORS},
    )
    async def catalog(tenant: str = TENANT, grant: Grant = may_query) -> dict[str, Any]:
        """The tenant's metrics, each with its number of series and its tag keys' values."""
        try:
            check_tenant(tenant)
        except InvalidSeries as e:
            raise bad(str(e)) from None
        grant.require_tenant(tenant)
        return await service.catalog(tenant)

    # Inside the metrics middleware, which must count what the fast path answers too.
    series_route = next(r for r in app.routes if getattr(r, "path", None) == "/v1/series")
    app.add_middleware(FastSeries, service=service, access=access,
                       max_query_days=max_query_days, check=valid_where, route=series_route)
    app.add_middleware(HttpMetricsMiddleware, metrics=service.metrics)
    return app
