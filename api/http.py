"""The HTTP API v1 as a FastAPI app over a Service, and the dashboard page at ``/``.

The routes live on ``APIRouter``s by concern, each a module of its own:

- ``routes_ingest.py``: ``POST /v1/increments`` and ``/v1/events``;
- ``routes_query.py``: ``GET /v1/series``, ``/v1/breakdown`` and ``/v1/catalog``;
- ``routes_ops.py``: ``GET /healthz`` and ``/metrics``;
- ``dashboard/``: the page at ``/`` and its assets.

They reach the Service and the settings through ``app.state``, as FastAPI
dependencies, and auth is a dependency too (``http_deps.py``). Errors follow
the design's shape, ``{"error": {"code", "message"}}``, with 400 (not
FastAPI's 422) for a bad parameter or body (``http_errors.py``).
``/openapi.json`` (and ``/docs``) describe the routes as they are, answers and
errors included (``openapi.py``); tests/test_openapi.py holds the server to it
with schemathesis.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from tally.api import openapi as doc
from tally.api import routes_ingest, routes_ops, routes_query
from tally.api.access import AccessList
from tally.api.dashboard import dashboard_router
from tally.api.fast_series import FastSeries
from tally.api.http_deps import DEFAULT_MAX_BODY, HttpSettings
from tally.api.http_errors import add_error_handlers
from tally.api.metrics import HttpMetricsMiddleware
from tally.api.rules import BUILTIN, Rules
from tally.api.service import Service


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
    app.state.service = service
    app.state.settings = HttpSettings(
        max_body=max_body, durable_timeout=durable_timeout, access=access,
        max_query_days=max_query_days, rules=rules,
    )
    add_error_handlers(app)
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    app.include_router(dashboard_router())
    app.include_router(routes_ops.router)
    app.include_router(routes_ingest.router)
    app.include_router(routes_query.router)

    # Inside the metrics middleware, which must count what the fast path answers too, under
    # the route's own label: the fast path puts the route in the scope as routing would.
    series_route = next(
        r for r in routes_query.router.routes if getattr(r, "path", None) == "/v1/series"
    )
    app.add_middleware(FastSeries, service=service, access=access,
                       max_query_days=max_query_days, check=routes_query.valid_where,
                       route=series_route)
    app.add_middleware(HttpMetricsMiddleware, metrics=service.metrics)
    return app


def openapi_schema(app: FastAPI) -> dict[str, Any]:
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
        # serializes a dict faster than jsonable_encoder walks it), so FastAPI writes that
        # beside the documented model; the model alone is the truth.
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
