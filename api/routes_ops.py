"""The gateway's own routes: ``GET /healthz`` for load balancers, ``GET /metrics`` for
Prometheus (the admin scope; left out of the API's schema)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from tally.api import openapi as doc
from tally.api.http_deps import AdminGrant, ServiceDep

router = APIRouter()


@router.get("/healthz", responses={200: {"model": doc.Health}})
async def healthz(service: ServiceDep) -> dict[str, Any]:
    return {"status": "ok", "shards": service.shards.shards}


@router.get("/metrics", include_in_schema=False)
async def metrics(service: ServiceDep, _: AdminGrant) -> Response:
    """Prometheus text: this gateway's counters and every shard's, merged."""
    text = await service.metrics.render(service.shards, await service.peer_metrics())
    return Response(text, media_type=CONTENT_TYPE_LATEST)
