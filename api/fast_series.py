"""The one-series query without FastAPI's per-request machinery, for well-formed requests.

FastAPI resolves a route's parameters and dependencies anew on every
request: for ``GET /v1/series`` that costs several times the query's own work
(plan, shard sums, JSON), and was most of what stood between the one-series
query and its latency target. This ASGI shell
answers the requests that need none of it, those whose every parameter is
known, present once and valid, and whose token may read the tenant, with the
same functions the route calls (``parse_where``, ``plan_range``,
``Service.series``). Anything else, every refusal included, goes on to the
FastAPI route unchanged, which answers it exactly as before: the error codes
and messages live in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from tally.api.access import AccessList, Denied
from tally.api.service import Service
from tally.api.timerange import GRANULARITIES, QueryError, compare_plan, plan_range

PATH = "/v1/series"
SINGLE = frozenset({"tenant", "metric", "from", "to", "granularity", "tz", "compare"})
REQUIRED = ("tenant", "metric", "from", "to")


class FastSeries:
    """ASGI middleware: answers plain ``GET /v1/series`` itself, passes the rest on."""

    def __init__(
        self, app: ASGIApp, service: Service, access: AccessList | None, max_query_days: int,
        check: Callable[[str, str, list[str]], dict[str, str] | None], route: Any,
    ) -> None:
        self.app = app
        self.service = service
        self.access = access
        self.max_query_days = max_query_days
        self.check = check  # (tenant, metric, where items) -> where; None: not valid
        self.route = route  # the FastAPI route, for the metrics' route label
        self.answered = 0  # here, not by the route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        query = self._plain(scope)
        if query is None:
            await self.app(scope, receive, send)
            return
        tenant, metric, where, plan, compare = query
        body = await self.service.series(tenant, metric, where, plan, compare)
        scope["route"] = self.route
        self.answered += 1
        await JSONResponse(body)(scope, receive, send)

    def _plain(self, scope: Scope) -> tuple | None:
        """The parsed query if nothing about it needs the route's checks or messages."""
        params: dict[str, str] = {}
        where_items: list[str] = []
        try:
            pairs = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True,
                              strict_parsing=False, errors="strict")
        except (UnicodeDecodeError, ValueError):
            return None
        for name, value in pairs:
            if name == "where":
                where_items.append(value)
            elif name in SINGLE and name not in params:
                params[name] = value
            else:
                return None  # unknown or repeated: the route says what is wrong
        if any(name not in params for name in REQUIRED):
            return None
        tenant, metric = params["tenant"], params["metric"]
        granularity = params.get("granularity", "day")
        if granularity not in GRANULARITIES or not self._may_read(scope, tenant):
            return None
        where = self.check(tenant, metric, where_items)
        if where is None:
            return None
        try:
            plan = plan_range(params["from"], params["to"], granularity,
                              params.get("tz", "UTC"), max_days=self.max_query_days)
            mode = params.get("compare")
            compare = compare_plan(plan, mode) if mode else None
        except QueryError:
            return None
        return tenant, metric, where, plan, compare

    def _may_read(self, scope: Scope, tenant: str) -> bool:
        if self.access is None:
            return True
        given = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(given) != 1:
            return False
        scheme, _, secret = given[0].decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not secret:
            return False
        try:
            grant = self.access.grant_for(secret)
            grant.require_scope("query")
            grant.require_tenant(tenant)
        except Denied:
            return False
        return True
