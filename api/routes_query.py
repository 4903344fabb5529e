"""The query routes: ``GET /v1/series``, ``/v1/breakdown`` and ``/v1/catalog``.

Each checks its parameters itself, in the order a reader would (tenant and
metric, then the token's access to the tenant, then the range), so a refusal
names the parameter and the rule; a parameter a route does not take is
refused too (``only_declared_params``). A plain ``/v1/series`` request
usually never reaches its route: the FastSeries middleware (api/fast_series.py)
answers it with the same checks, and hands anything unusual to the route.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from tally.api import openapi as doc
from tally.api.http_deps import QueryGrant, ServiceDep, SettingsDep, only_declared_params
from tally.api.http_errors import ApiError, bad
from tally.api.timerange import GRANULARITIES, compare_plan, plan_range
from tally.wire.series import (
    InvalidSeries,
    check_metric,
    check_tag_key,
    check_tag_value,
    check_tenant,
)

router = APIRouter(dependencies=[Depends(only_declared_params)])


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


@router.get("/v1/series", responses={200: {"model": doc.SeriesAnswer}, **doc.QUERY_ERRORS})
async def series(
    service: ServiceDep,
    settings: SettingsDep,
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
    *,
    grant: QueryGrant,
) -> dict[str, Any]:
    """One metric's totals per bucket over a range, summing every series that matches
    `where`, optionally beside the period before."""
    parse_series_params(tenant, metric)
    grant.require_tenant(tenant)
    if granularity not in GRANULARITIES:
        raise bad(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    plan = plan_range(from_, to, granularity, tz, max_days=settings.max_query_days)
    prev = compare_plan(plan, compare) if compare else None
    return await service.series(tenant, metric, parse_where(where), plan, prev)


@router.get(
    "/v1/breakdown", responses={200: {"model": doc.BreakdownAnswer}, **doc.QUERY_ERRORS},
)
async def breakdown(
    service: ServiceDep,
    settings: SettingsDep,
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
    *,
    grant: QueryGrant,
) -> dict[str, Any]:
    """Totals per value of tag `by` over a range, largest first; the rest in `other`."""
    parse_series_params(tenant, metric)
    grant.require_tenant(tenant)
    try:
        check_tag_key(by)
    except InvalidSeries as e:
        raise bad(f"by: {e}") from None
    plan = plan_range(from_, to, "day", tz, max_days=settings.max_query_days)
    return await service.breakdown(tenant, metric, by, parse_where(where), plan, limit)


@router.get("/v1/catalog", responses={200: {"model": doc.CatalogAnswer}, **doc.QUERY_ERRORS})
async def catalog(
    service: ServiceDep, tenant: str = TENANT, *, grant: QueryGrant,
) -> dict[str, Any]:
    """The tenant's metrics, each with its number of series and its tag keys' values."""
    try:
        check_tenant(tenant)
    except InvalidSeries as e:
        raise bad(str(e)) from None
    grant.require_tenant(tenant)
    return await service.catalog(tenant)
