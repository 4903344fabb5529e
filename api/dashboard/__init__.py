"""The dashboard at ``GET /``: a static page that reads the public HTTP API from the browser.

The page (``static/``) holds no data and no secrets, so ``/`` and ``/assets/*``
need no token even when tokens are configured; the page sends the user's
token with each API call, and the API decides. Keeping the dashboard a
client of ``/v1/series``, ``/v1/breakdown`` and ``/v1/catalog`` only means it
can show nothing a token holder could not fetch with curl, and it exercises
the same routes users do.

The chart library is plotly.js as the ``plotly`` Python package ships it
(``plotly/package_data/plotly.min.js``): pinned and installed by pip with
tally itself, so the dashboard works offline and behind firewalls, with no
CDN and no vendored copy to keep up to date. It is found with
``find_spec`` (the ``plotly`` package is never imported: the gateway only
needs the file) and sent gzipped to browsers that accept it (minified
JavaScript compresses to a fraction of its size), compressed once, on first use.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

STATIC = Path(__file__).parent / "static"
# name -> (media type, Cache-Control). The page and its own code revalidate on every
# load (FileResponse sends an ETag), so an upgraded gateway shows its new page at once.
OWN_ASSETS = {
    "dashboard.js": ("text/javascript; charset=utf-8", "no-cache"),
    "dashboard.css": ("text/css; charset=utf-8", "no-cache"),
}
PLOTLY = "plotly.min.js"


def plotly_js_path() -> Path:
    """plotly.min.js inside the installed ``plotly`` package (a dependency of tally)."""
    spec = importlib.util.find_spec("plotly")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / "package_data" / PLOTLY
        if path.is_file():
            return path
    raise FileNotFoundError(
        "plotly/package_data/plotly.min.js not found: the dashboard needs the `plotly` "
        "package (pip install -e . installs it)"
    )


@cache
def _plotly_gzipped() -> bytes:
    # mtime=0: the same bytes on every gateway, so caches and ETags agree
    return gzip.compress(plotly_js_path().read_bytes(), compresslevel=6, mtime=0)


def _accepts_gzip(request: Request) -> bool:
    return any(
        part.split(";")[0].strip() == "gzip"
        for part in request.headers.get("accept-encoding", "").split(",")
    )


def not_found(name: str) -> StarletteHTTPException:
    return StarletteHTTPException(404, f"no dashboard asset {name!r}")


def dashboard_router() -> APIRouter:
    """``GET /`` and ``GET /assets/{name}``, left out of the OpenAPI schema (they are the
    page, not the API). One route template for every asset keeps the request metrics'
    ``route`` label bounded."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def page() -> FileResponse:
        return FileResponse(
            STATIC / "index.html", media_type="text/html; charset=utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    @router.get("/assets/{name}")
    async def asset(name: str, request: Request) -> Response:
        if name == PLOTLY:
            try:
                path = plotly_js_path()
            except FileNotFoundError as e:
                raise StarletteHTTPException(404, str(e)) from None
            # plotly.js changes only when the package is upgraded: let browsers keep it a day
            headers = {"Cache-Control": "public, max-age=86400", "Vary": "Accept-Encoding"}
            if _accepts_gzip(request):
                body = await asyncio.to_thread(_plotly_gzipped)
                return Response(
                    body, media_type="text/javascript; charset=utf-8",
                    headers={**headers, "Content-Encoding": "gzip"},
                )
            return FileResponse(path, media_type="text/javascript; charset=utf-8",
                                headers=headers)
        if name not in OWN_ASSETS:
            raise not_found(name)
        media_type, cache_control = OWN_ASSETS[name]
        return FileResponse(STATIC / name, media_type=media_type,
                            headers={"Cache-Control": cache_control})

    return router
