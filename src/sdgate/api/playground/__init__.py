"""The web playground at ``/``: a static page (HTML, CSS and JavaScript, no build step, no dependencies)
that uses only sdgate's public API, with the same keys, limits and jobs as any other client.

The files ship inside the package, beside this module, and are read once. They are open without a key:
the page asks for one when the API answers 401, keeps it in the browser's storage and sends it as
``Authorization: Bearer``.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.resources import files
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import Response

from sdgate.errors import NotFound

router = APIRouter(include_in_schema=False)

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
PREFIX = "/playground/"
"""Where the page's own files are served (``/`` is ``index.html``)."""

# Scripts and styles from this server only; images from anywhere (the storage may be S3 or a CDN),
# ``blob:`` and ``data:`` for the input image, the mask and the live previews; API calls to this server,
# and reads of its images where they are served from elsewhere ("Use as input" fetches one).
_POLICY = (
    "default-src 'self'; img-src * data: blob:; connect-src 'self'{images}; "
    "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    # Revalidated on every load (a 304 when unchanged), so an upgraded server never serves a stale page.
    "Cache-Control": "no-cache",
}


@cache
def _asset(name: str) -> tuple[bytes, str]:
    data = files(__package__).joinpath(name).read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _policy(request: Request) -> str:
    """The page's Content-Security-Policy: ``connect-src`` also names where images are served from, when that
    is another origin (``SDGATE_PUBLIC_BASE_URL``: a CDN or a bucket; it must answer with CORS headers)."""
    base = request.app.state.ctx.settings.public_base_url
    images = ""
    if base:
        parts = urlsplit(base)
        images = f" {parts.scheme}://{parts.netloc}"
    return _POLICY.format(images=images)


def _serve(name: str, request: Request) -> Response:
    data, etag = _asset(name)
    headers = {**_HEADERS, "ETag": etag, "Content-Security-Policy": _policy(request)}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=ASSETS[name], headers=headers)


@router.get("/")
async def playground(request: Request) -> Response:
    """The playground page."""
    return _serve("index.html", request)


@router.get(PREFIX + "{name}")
async def playground_asset(name: str, request: Request) -> Response:
    """The page's script, style sheet and icon; anything else is 404."""
    if name not in ASSETS or name == "index.html":
        raise NotFound(f"no such playground file: {name}")
    return _serve(name, request)
