"""What the HTTP routes are given: the service, the settings, the caller's grant.

``create_app`` (api/http.py) puts the Service and the ``HttpSettings`` on
``app.state``; the routes take them as FastAPI dependencies (``ServiceDep``,
``SettingsDep``), so they are module-level functions that any app can mount.
Auth is a dependency too: ``IngestGrant``, ``QueryGrant`` and ``AdminGrant``
give the request's ``Grant`` for their scope, or refuse it (401 without a
known token, 403 when the token lacks the scope); every grant is ``OPEN``
when no tokens are configured.

The dependencies are coroutines: FastAPI runs a plain function dependency
on its thread pool, which would cost every request a thread hop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tally.api.access import OPEN, AccessList, Denied, Grant
from tally.api.http_errors import bad
from tally.api.rules import BUILTIN, Rules
from tally.api.service import Service
from tally.wire.vocabulary import ErrorCode

DEFAULT_MAX_BODY = 16 * 1024 * 1024


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP ingress's limits and policies, as ``create_app`` was given them."""

    max_body: int = DEFAULT_MAX_BODY  # bytes of an ingest body; over it, 413
    durable_timeout: float = 30.0  # seconds an ``ack: durable`` waits for its checkpoint
    access: AccessList | None = None  # None: no tokens configured, everything open
    max_query_days: int = 3660  # the longest range a query may span
    rules: Rules = BUILTIN  # how /v1/events fans events out into increments


async def service_of(request: Request) -> Service:
    return request.app.state.service


async def settings_of(request: Request) -> HttpSettings:
    return request.app.state.settings


ServiceDep = Annotated[Service, Depends(service_of)]
SettingsDep = Annotated[HttpSettings, Depends(settings_of)]

bearer = HTTPBearer(auto_error=False, description="a secret from the tokens file")


def authorized(scope: str) -> Callable[..., Awaitable[Grant]]:
    """A dependency giving the request's Grant for ``scope``, or refusing the request."""

    async def grant(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Security(bearer),
    ) -> Grant:
        access: AccessList | None = request.app.state.settings.access
        if access is None:
            return OPEN
        if credentials is None:
            raise Denied(ErrorCode.UNAUTHORIZED,
                    "a token is required: Authorization: Bearer <token>")
        found = access.grant_for(credentials.credentials)
        found.require_scope(scope)
        return found

    return grant


IngestGrant = Annotated[Grant, Depends(authorized("ingest"))]
QueryGrant = Annotated[Grant, Depends(authorized("query"))]
AdminGrant = Annotated[Grant, Depends(authorized("admin"))]  # /metrics


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
