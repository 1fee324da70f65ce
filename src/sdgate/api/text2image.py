"""The original AWS design's routes, for its clients to move over unchanged.

- ``POST /text2image`` with ``{"text": "..."}`` answers ``{"statusCode": 200, "body": "<image url>"}``,
  the Lambda's answer; errors keep that shape too (``statusCode`` is the HTTP status, ``body`` the message).
- ``GET /text2image?prompt=...`` answers an HTML page with the prompt and the image.

Both run as jobs through the same runner as the native API, so images are recorded and stored
the same way (local directory or S3, same keys, same URLs).
"""

from __future__ import annotations

import html
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sdgate.api.access import AUTH_RESPONSES, caller_of
from sdgate.api.context import AppContext, Ctx, JsonBody, absolute_url
from sdgate.api.errors import DialectRoute
from sdgate.errors import InvalidRequest
from sdgate.schemas import ErrorBody, GenerationRequest, GenerationResponse, JobStatus, Surface, check_prompt


class Text2ImageRoute(DialectRoute):
    """Errors in the original Lambda's shape too: ``statusCode`` is the HTTP status, ``body`` the message."""

    @staticmethod
    def shape(status: int, body: dict[str, Any], headers: dict[str, str]) -> Response:
        wrapped = {"statusCode": status, "body": body.get("error", {}).get("message", ""), **body}
        return JSONResponse(wrapped, status_code=status, headers=headers)


router = APIRouter(tags=["text2image"], route_class=Text2ImageRoute)


class Text2ImageRequest(BaseModel):
    """Body of ``POST /text2image``, as the original API Gateway took it."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(..., description="The prompt.", examples=["astronaut on a horse"])

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        return check_prompt(v, "text")


class Text2ImageResponse(BaseModel):
    """The original Lambda's answer: ``body`` is the image URL."""

    statusCode: int = Field(200, description="200, or 202 when the job outlasts the wait (body: its job URL).")
    body: str = Field(..., description="The image URL.")


_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    **{code: {"model": ErrorBody} for code in (400, 409, 413, 415, 422, 429, 500, 502, 503)},
}
# The page route's errors are JSON too: spelled out, since FastAPI would list a model under text/html.
_PAGE_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {
        "description": doc.get("description", "error"),
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    for code, doc in _ERRORS.items()
}


@router.post(
    "/text2image",
    response_model=Text2ImageResponse,
    responses={202: {"model": Text2ImageResponse, "description": "still running; body: its job URL"}, **_ERRORS},
    dependencies=[JsonBody],
)
async def text2image(body: Text2ImageRequest, request: Request, ctx: Ctx) -> Any:
    """Generate one image from ``text``; answers ``{"statusCode": 200, "body": "<image url>"}``."""
    job = await _generate(body.text, request, ctx)
    if job.status != JobStatus.succeeded:
        return JSONResponse(
            {"statusCode": 202, "body": f"/v1/jobs/{job.id}"},
            status_code=202,
            headers={"Location": f"/v1/jobs/{job.id}"},
        )
    return Text2ImageResponse(statusCode=200, body=absolute_url(request, job.images[0].url))


@router.get(
    "/text2image",
    response_class=HTMLResponse,
    responses={
        200: {"content": {"text/html": {}}, "description": "a page with the prompt and the image"},
        202: {"content": {"text/html": {}}, "description": "a page that says the image is still being drawn"},
        **_PAGE_ERRORS,
    },
)
async def text2image_page(
    request: Request,
    ctx: Ctx,
    # Bounded so that any prompt the schema allows fits in a URL the HTTP server accepts (about 64 KiB,
    # percent-encoded); longer prompts go through POST.
    prompt: Annotated[str, Query(description="What to draw.", max_length=2000)],
) -> HTMLResponse:
    """An HTML page that shows the prompt and its image."""
    try:
        checked = Text2ImageRequest(text=prompt)
    except ValidationError:
        raise InvalidRequest("prompt must not be empty", field="prompt") from None
    job = await _generate(checked.text, request, ctx)
    if job.status != JobStatus.succeeded:
        page = _page(prompt, None, f"Still drawing: see /v1/jobs/{job.id}")
        return HTMLResponse(page, status_code=202, headers=_PAGE_HEADERS)
    image = job.images[0]
    return HTMLResponse(
        _page(prompt, absolute_url(request, image.url), None, image.width, image.height), headers=_PAGE_HEADERS
    )


async def _generate(prompt: str, request: Request, ctx: AppContext) -> GenerationResponse:
    """Steps: the prompt as a request → the generation service, waiting → the job, or its error.

    A job that outlasts the backend timeout is answered as running (the caller says 202), never dropped.
    """
    generation = await ctx.service.generate(
        [GenerationRequest(prompt=prompt)],
        surface=Surface.text2image,
        caller=caller_of(request),
        wait_s=ctx.settings.backend_timeout_s,
    )
    generation.raise_for_failure()
    return ctx.jobs.view(generation.job)


# The page shows only what it was given: no scripts, images from anywhere (CDN, S3, this server).
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src * data:; style-src 'unsafe-inline'"}


def _page(prompt: str, url: str | None, note: str | None, width: int = 0, height: int = 0) -> str:
    p = html.escape(prompt, quote=True)
    if url is not None:
        u = html.escape(url, quote=True)
        figure = (
            f'<figure><img src="{u}" alt="{p}" width="{width}" height="{height}">'
            f'<figcaption><a href="{u}">{html.escape(url)}</a></figcaption></figure>'
        )
    else:
        figure = f"<p>{html.escape(note or '')}</p>"
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{p} · sdgate</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
        "img{max-width:100%;height:auto}</style></head>\n"
        f'<body><h1>{p}</h1>{figure}<p><a href="/">Open the playground</a>: models, LoRAs, image inputs, '
        "progress and a gallery.</p></body></html>\n"
    )
