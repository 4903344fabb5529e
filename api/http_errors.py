"""The HTTP API's refusals: one body, ``{"error": {"code", "message"}}``, whatever refused.

A route raises (``ApiError``, or ``IngestError``, ``Denied``, ``QueryError`` from
the layers below) and a handler here answers; FastAPI's own refusals (a
parameter its validation rejects, a path or method that does not exist) get
the same shape, with 400 rather than FastAPI's 422 for a bad parameter or
body. An ingest batch refused is counted once in the gateway's metrics, with
the increments it held.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tally.api.access import Denied
from tally.api.service import IngestError
from tally.api.timerange import QueryError
from tally.wire.vocabulary import ErrorCode

log = logging.getLogger("tally.http")

INGEST_ROUTES = ("/v1/increments", "/v1/events")
STATUS = {"bad_request": 400, "bad_row": 400, "too_large": 413, "overloaded": 503}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status)


def bad(message: str) -> ApiError:
    return ApiError(400, ErrorCode.BAD_REQUEST, message)


def _refused(request: Request, code: str) -> None:
    """Count a refused ingest batch once; the route stashed how many increments it held."""
    state = request.state
    if request.scope["path"] in INGEST_ROUTES and not getattr(state, "counted", False):
        state.counted = True
        metrics = request.app.state.service.metrics
        metrics.batch_rejected("http", code, getattr(state, "increments", 0))


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    _refused(request, e.code)
    return error_response(e.status, e.code, e.message)


async def _ingest_error(request: Request, e: IngestError) -> JSONResponse:
    _refused(request, e.code)
    extra = {"row": e.row} if e.row is not None else {}
    return error_response(STATUS.get(e.code, 500), e.code, e.message, **extra)


async def _denied(request: Request, e: Denied) -> JSONResponse:
    _refused(request, e.code)
    response = error_response(e.status, e.code, e.message)
    if e.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="tally"'
    return response


async def _query_error(_: Request, e: QueryError) -> JSONResponse:
    return error_response(400, ErrorCode.BAD_REQUEST, str(e))


async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body"))
        parts.append(f"{where}: {err.get('msg')}")
    return error_response(400, ErrorCode.BAD_REQUEST, "; ".join(parts) or "invalid request")


async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, ErrorCode.BAD_REQUEST)
    response = error_response(e.status_code, code, str(e.detail))
    # a 405 names the methods that would work (Allow), as HTTP asks
    response.headers.update(e.headers or {})
    return response


async def _internal(request: Request, e: Exception) -> JSONResponse:
    _refused(request, ErrorCode.INTERNAL)
    log.error(json.dumps({"event": "error", "where": "http", "error": repr(e)}))
    return error_response(500, ErrorCode.INTERNAL, f"internal error: {e!r}")


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal of ``app`` in the API's error shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(IngestError, _ingest_error)
    app.add_exception_handler(Denied, _denied)
    app.add_exception_handler(QueryError, _query_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _internal)
