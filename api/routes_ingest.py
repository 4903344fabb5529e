"""The ingest routes, ``POST /v1/increments`` and ``POST /v1/events``.

Both read the raw body, JSON or msgpack, under the size limit, rather than
declaring a pydantic body: a columnar batch's arrays may be binary, and a
refusal names the row it is about. Their request bodies are documented in
the schema by hand (api/openapi.py).
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
from fastapi import APIRouter, Request

from tally.api import openapi as doc
from tally.api.access import Grant
from tally.api.durability import ShardRestarted
from tally.api.http_deps import IngestGrant, ServiceDep, SettingsDep
from tally.api.http_errors import ApiError, bad
from tally.api.ingest import Incoming, build_batch, build_event_batch, check_ack, json_column
from tally.api.metrics import body_increments
from tally.api.service import Service
from tally.wire.vocabulary import ErrorCode

router = APIRouter()
_, REQUEST_BODIES = doc.body_schemas()


async def read_body(request: Request, max_body: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise ApiError(413, ErrorCode.TOO_LARGE, f"body of {declared} bytes; at most {max_body}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise ApiError(413, ErrorCode.TOO_LARGE, f"body over {max_body} bytes")
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
    request: Request, service: Service, durable_timeout: float, grant: Grant,
    incoming: Incoming, ack: str, producer: str | None, seq: int | None,
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
            raise ApiError(503, ErrorCode.OVERLOADED, str(e)) from None
        except TimeoutError:
            raise ApiError(
                503, ErrorCode.OVERLOADED,
                f"applied, but not checkpointed within {durable_timeout:g} s (store slow "
                "or down); resend with the same producer and seq to wait again",
            ) from None
    return {"rows": applied.rows}


@router.post(
    "/v1/increments",
    responses={200: {"model": doc.IngestAnswer}, **doc.INGEST_ERRORS},
    openapi_extra={"requestBody": REQUEST_BODIES["/v1/increments"]},
)
async def increments(
    request: Request, service: ServiceDep, settings: SettingsDep, grant: IngestGrant,
) -> dict[str, int]:
    """Apply a row or columnar batch, all or nothing; ``rows`` counts the increments."""
    body = await read_body(request, settings.max_body)
    request.state.increments = body_increments(body)  # for a refusal's count
    ack, producer, seq = envelope(body)
    i, ts, v = body.get("i"), body.get("ts"), body.get("v")
    if body.get("series") is not None:
        i, ts, v = json_column("i", i, "<u4"), json_column("ts", ts, "<i8"), json_column(
            "v", v, "<i8"
        )
    batch = build_batch(body.get("rows"), body.get("series"), i, ts, v, service.clock())
    return await ingest(request, service, settings.durable_timeout, grant, Incoming(batch),
                        ack, producer, seq)


@router.post(
    "/v1/events",
    responses={200: {"model": doc.IngestAnswer}, **doc.INGEST_ERRORS},
    openapi_extra={"requestBody": REQUEST_BODIES["/v1/events"]},
)
async def events(
    request: Request, service: ServiceDep, settings: SettingsDep, grant: IngestGrant,
) -> dict[str, int]:
    """Events fanned out by the rules, then applied exactly as ``/v1/increments`` rows;
    ``rows`` counts the increments made. A refusal names the event (``row``)."""
    body = await read_body(request, settings.max_body)
    events = body.get("events")
    # a refusal before fan-out counts the events (each makes at least one increment)
    request.state.increments = len(events) if isinstance(events, list) else 0
    ack, producer, seq = envelope(body)
    incoming = build_event_batch(events, settings.rules, service.clock())
    return await ingest(request, service, settings.durable_timeout, grant, incoming,
                        ack, producer, seq)
