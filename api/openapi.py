"""What `/openapi.json` (and `/docs`) says about HTTP API v1: models used only for the schema.

The routes validate by hand (the ingest routes read the raw body, JSON or
msgpack, and the query routes give messages that name the parameter and the
rule), and they answer plain dicts: validating every answer through a
pydantic ``response_model`` would cost time on the millisecond query path
for nothing the tests do not already check. So the models here describe
the requests and answers for clients and for schemathesis
(tests/test_openapi.py checks every answer against them) and are never
instantiated on a request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from tally.api.timerange import COMPARE_MODES, GRANULARITIES

TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
METRIC_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
TAG_KEY_PATTERN = r"^[a-z_][a-z0-9_]{0,63}$"

# -- errors -----------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(
        description="bad_request, bad_row, too_large, unauthorized, forbidden, overloaded, "
        "not_found, method_not_allowed, internal",
        examples=["bad_request"],
    )
    message: str = Field(description="what is wrong, naming the parameter, row or field")
    row: int | None = Field(
        default=None,
        description="ingest only: the index of the first bad row (or event) of the batch",
    )


class ErrorBody(BaseModel):
    """Every error of the API: ``{"error": {"code", "message"}}``."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entries of a route for the error statuses it can answer."""
    meaning = {
        400: "an invalid parameter or body (code bad_request, or bad_row with `row`)",
        401: "no token, or an unknown one, while tokens are configured (unauthorized)",
        403: "a token without this tenant or scope (forbidden)",
        413: "a body over the size limit (too_large)",
        503: "shards at their bound of unwritten slots, or the store unreachable (overloaded)",
    }
    return {s: {"model": ErrorBody, "description": meaning[s]} for s in statuses}


QUERY_ERRORS = error_responses(400, 401, 403, 503)
INGEST_ERRORS = error_responses(400, 401, 403, 413, 503)

# -- answers ----------------------------------------------------------------------------

Point = tuple[str, int]  # [label, value]


class Compared(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    from_: str = Field(alias="from")
    to: str
    points: list[Point]
    total: int
    change: float | None = Field(
        description="(total - previous total) / previous total; null when the previous is 0"
    )


class SeriesAnswer(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    tenant: str
    metric: str
    where: dict[str, str]
    granularity: Literal["hour", "day", "week", "month"]
    tz: str
    from_: str = Field(alias="from")
    to: str
    points: list[Point] = Field(
        description="[label, value] for every bucket of the range, zeros included"
    )
    total: int
    compare: Compared | None


class Group(BaseModel):
    value: str | None = Field(description="a value of tag `by`; null for series without it")
    total: int


class BreakdownAnswer(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    tenant: str
    metric: str
    by: str
    where: dict[str, str]
    tz: str
    from_: str = Field(alias="from")
    to: str
    groups: list[Group] = Field(description="largest first, at most `limit`")
    other: int = Field(description="the sum of the groups past `limit`")
    total: int


class CatalogMetric(BaseModel):
    metric: str
    series: int
    tags: dict[str, list[str]] = Field(description="tag keys, each with up to 100 values")


class CatalogAnswer(BaseModel):
    tenant: str
    metrics: list[CatalogMetric]


class IngestAnswer(BaseModel):
    rows: int = Field(description="increments applied (after fan-out, for events)")


class Health(BaseModel):
    status: str
    shards: int


# -- request bodies (read raw by the routes) ----------------------------------------------

Row = tuple[str, str, dict[str, str] | None, int, int]  # tenant, metric, tags, ts, value
SeriesRef = tuple[str, str, dict[str, str] | None]  # tenant, metric, tags


class Envelope(BaseModel):
    producer: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="with `seq`: a resend of the same (producer, seq) is applied once",
    )
    seq: int | None = Field(default=None, ge=1, le=2**63 - 1)
    ack: Literal["received", "durable"] | None = Field(
        default=None, description="`durable`: answer once checkpointed (default `received`)"
    )


class RowsBody(Envelope):
    rows: list[Row] = Field(description="[tenant, metric, tags|null, ts (Unix s), value]")


class ColumnarBody(Envelope):
    series: list[SeriesRef] = Field(description="[tenant, metric, tags|null]")
    i: list[int] = Field(description="index into `series`, one per increment")
    ts: list[int] = Field(description="Unix seconds, one per increment")
    v: list[int] = Field(description="int64 values, one per increment")


class Event(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = Field(description="e.g. message.received, message.replied")
    tenant: str
    ts: int = Field(description="Unix seconds")


class EventsBody(Envelope):
    events: list[Event] = Field(
        description="each {type, tenant, ts, ...fields}; the rules read the fields they need"
    )


def body_schemas() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The request bodies' schemas for `components.schemas`, and the `requestBody` of each
    ingest route (JSON or msgpack, same shape)."""
    _, top = models_json_schema(
        [(RowsBody, "validation"), (ColumnarBody, "validation"), (EventsBody, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    components = top.get("$defs", {})

    def body(schema: dict[str, Any], what: str) -> dict[str, Any]:
        return {
            "required": True,
            "description": f"{what}; JSON, or the same map as application/msgpack "
            "(where i, ts and v may be binary little-endian arrays)",
            "content": {
                "application/json": {"schema": schema},
                "application/msgpack": {"schema": schema},
            },
        }

    increments = {"anyOf": [{"$ref": "#/components/schemas/RowsBody"},
                            {"$ref": "#/components/schemas/ColumnarBody"}]}
    bodies = {
        "/v1/increments": body(increments, "a row batch or a columnar batch"),
        "/v1/events": body({"$ref": "#/components/schemas/EventsBody"}, "a batch of events"),
    }
    return components, bodies


def query_enum(values: tuple[str, ...]) -> Callable[[dict[str, Any]], None]:
    """``json_schema_extra`` documenting a parameter's allowed values while the route checks
    them itself, so a wrong value gets the route's message naming them, not a generic one.
    An optional parameter's ``anyOf [string, null]`` goes: a query string has no null."""

    def extra(schema: dict[str, Any]) -> None:
        schema.pop("anyOf", None)
        schema.update(type="string", enum=list(values))

    return extra


GRANULARITY_ENUM = query_enum(GRANULARITIES)
COMPARE_ENUM = query_enum(COMPARE_MODES)
