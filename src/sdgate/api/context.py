"""What every route needs, handed in through one dependency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from sdgate.auth import Guard
from sdgate.backends import Backend
from sdgate.config import Settings
from sdgate.errors import UnsupportedMediaType
from sdgate.generation import GenerationService
from sdgate.jobs import JobRunner
from sdgate.storage import Storage


@dataclass
class AppContext:
    """The app's collaborators. Routes generate through ``service``; they read and cancel jobs through ``jobs``."""

    settings: Settings
    backend: Backend
    storage: Storage
    jobs: JobRunner
    guard: Guard
    service: GenerationService


# Dependencies are ``async def`` although they never await: FastAPI runs a plain ``def`` dependency
# in its thread pool, a thread hop (and a wait for the GIL) on every request for a dictionary lookup.


async def get_context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


Ctx = Annotated[AppContext, Depends(get_context)]


async def require_json(request: Request) -> None:
    """JSON routes refuse other bodies with 415 rather than a confusing validation error."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if (
        request.method in ("POST", "PUT", "PATCH")
        and media
        and media != "application/json"
        and not media.endswith("+json")
    ):
        raise UnsupportedMediaType(f"send the body as application/json, not {media!r}")


JsonBody = Depends(require_json)


def absolute_url(request: Request, url: str) -> str:
    """Storage hands back ``/images/...`` for local files; clients get a full URL they can share."""
    if url.startswith("/"):
        return str(request.base_url).rstrip("/") + url
    return url
