"""The HTTP API v1 as a FastAPI app over a Service.

Errors follow the design's shape, ``{"error": {"code", "message"}}``, with
400 (not FastAPI's 422) for a bad parameter or body.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import msgpack
from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.access import OPEN, AccessList, Denied, Grant
from api.durability import ShardRestarted
from api.ingest import Incoming, build_batch, build_event_batch, check_ack, json_column
from api.metrics import HttpMetricsMiddleware, body_increments
from api.rules import BUILTIN, Rules
from api.service import IngestError, Service
from api.timerange import GRANULARITIES, QueryError, compare_plan, plan_range
from wire.series import InvalidSeries, check_metric, check_tag_key, check_tag_value, check_tenant

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
    app = FastAPI(title="tally", version="1", docs_url="/docs", redoc_url=None)
    may_ingest = Depends(authorizer(access, "ingest"))
    may_query = Depends(authorizer(access, "query"))
    may_administer = Depends(authorizer(access, "admin"))  # /metrics
    app.add_middleware(HttpMetricsMiddleware, metrics=service.metrics)

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
        return error_response(e.status_code, code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        refused(request, "internal")
        log.error(json.dumps({"event": "error", "where": "http", "error": repr(e)}))
        return error_response(500, "internal", f"internal error: {e!r}")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "shards": service.shards.shards}

    @app.get("/metrics", include_in_schema=False)
    async def metrics(_: Grant = may_administer) -> Response:
        """Prometheus text: this gateway's counters and every shard's, merged."""
        text = await service.metrics.render(service.shards)
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
            grant.require_tenants(incoming.tenants())
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

    @app.post("/v1/increments")
    async def increments(request: Request, grant: Grant = may_ingest) -> dict[str, int]:
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

    @app.post("/v1/events")
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

    @app.get("/v1/series")
    async def series(
        tenant: str,
        metric: str,
        from_: str = Query(alias="from"),
        to: str = Query(),
        granularity: str = "day",
        tz: str = "UTC",
        where: list[str] = Query(default=[]),
        compare: str | None = None,
        grant: Grant = may_query,
    ) -> dict[str, Any]:
        parse_series_params(tenant, metric)
        grant.require_tenant(tenant)
        if granularity not in GRANULARITIES:
            raise bad(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
        plan = plan_range(from_, to, granularity, tz, max_days=max_query_days)
        prev = compare_plan(plan, compare) if compare else None
        return await service.series(tenant, metric, parse_where(where), plan, prev)

    @app.get("/v1/breakdown")
    async def breakdown(
        tenant: str,
        metric: str,
        by: str,
        from_: str = Query(alias="from"),
        to: str = Query(),
        tz: str = "UTC",
        where: list[str] = Query(default=[]),
        limit: int = Query(default=10, ge=1, le=1000),
        grant: Grant = may_query,
    ) -> dict[str, Any]:
        parse_series_params(tenant, metric)
        grant.require_tenant(tenant)
        try:
            check_tag_key(by)
        except InvalidSeries as e:
            raise bad(f"by: {e}") from None
        plan = plan_range(from_, to, "day", tz, max_days=max_query_days)
        return await service.breakdown(tenant, metric, by, parse_where(where), plan, limit)

    @app.get("/v1/catalog")
    async def catalog(tenant: str, grant: Grant = may_query) -> dict[str, Any]:
        try:
            check_tenant(tenant)
        except InvalidSeries as e:
            raise bad(str(e)) from None
        grant.require_tenant(tenant)
        return await service.catalog(tenant)

    return app
