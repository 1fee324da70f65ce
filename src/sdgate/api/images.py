"""``GET /images/{key}``: images of the local storage, immutable and cacheable forever."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from sdgate.api.context import Ctx
from sdgate.errors import NotFound
from sdgate.formats import CONTENT_TYPES
from sdgate.storage import is_public_key
from sdgate.storage.local import LocalStorage

router = APIRouter(tags=["images"])

_CACHE = "public, max-age=31536000, immutable"


@router.get("/images/{key:path}", response_class=FileResponse, responses={404: {"description": "no such image"}})
async def get_image(key: str, request: Request, ctx: Ctx) -> Response:
    """A stored image. Keys are made by sdgate; anything else (``..``, absolute paths, sidecars) is 404."""
    storage = ctx.storage
    # Not a sidecar (private/...): an image's URL may be shared, the prompt its sidecar holds may not.
    path = storage.path_for(key) if is_public_key(key) and isinstance(storage, LocalStorage) else None
    if path is None or not path.is_file():
        raise NotFound("no such image")
    content_type = CONTENT_TYPES[key.rsplit(".", 1)[-1]]
    # The key holds 128 random bits and its bytes never change: it is a perfect entity tag.
    etag = '"' + key.rsplit("/", 1)[-1].split(".")[0] + '"'
    # Readable from any page (the playground on another origin, a user's own app): the URL is a public,
    # unguessable capability already, and reading it sends no credentials.
    headers = {
        "Cache-Control": _CACHE,
        "ETag": etag,
        "X-Content-Type-Options": "nosniff",
        "Access-Control-Allow-Origin": "*",
    }
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=content_type, headers=headers)
