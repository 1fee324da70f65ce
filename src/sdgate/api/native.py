"""The native v1 API: generations (sync and async), jobs, progress events, models.

``POST /v1/generations`` takes its request as JSON (images in base64 or as ``data:`` URLs) or as
``multipart/form-data``, what browsers and ``curl -F`` send: files ``image`` and ``mask``, the other
fields as form fields. Both become the same :class:`~sdgate.schemas.GenerationRequest`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from sdgate.api.access import AUTH_RESPONSES, caller_of
from sdgate.api.context import Ctx, JsonBody, absolute_url
from sdgate.api.middleware import takes_images
from sdgate.backends import BackendState
from sdgate.errors import InvalidRequest, MalformedRequest, UnsupportedMediaType
from sdgate.jobs import request_hash
from sdgate.jumpstart import media_type
from sdgate.schemas import (
    SCHEDULER_NAMES,
    ErrorBody,
    GenerationRequest,
    GenerationResponse,
    JobList,
    LoraCard,
    LoraList,
    ModelCard,
    ModelList,
    Surface,
)

router = APIRouter(prefix="/v1", tags=["generations"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    **{code: {"model": ErrorBody} for code in (400, 404, 409, 413, 415, 422, 429, 500, 502, 503)},
}
_ASYNC: dict[int | str, dict[str, Any]] = {
    202: {"model": GenerationResponse, "description": "accepted; poll Location or read its events"}
}


def owner_of(request: Request) -> str | None:
    """The API key's owner once auth is on; None (everything visible) without auth."""
    return caller_of(request).owner


def _public(request: Request, resp: GenerationResponse) -> GenerationResponse:
    for img in resp.images:
        img.url = absolute_url(request, img.url)
    return resp


def _accepted(request: Request, resp: GenerationResponse) -> JSONResponse:
    return JSONResponse(
        _public(request, resp).model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/v1/jobs/{resp.id}", "Preference-Applied": "respond-async"},
    )


_FILES = ("image", "mask")
_STARTED = int(time.time())
# Parsing a large JSON body takes milliseconds: off the event loop above this size.
_LARGE_BODY = 256 * 1024


_SCHEMAS = "#/components/schemas/"


def request_schemas() -> dict[str, Any]:
    """The OpenAPI components of the generation body, JSON and form (the route reads its body itself,
    so FastAPI does not collect them: ``create_app`` adds them)."""
    schema = GenerationRequest.model_json_schema(ref_template=_SCHEMAS + "{model}")
    form = json.loads(json.dumps(schema))
    form["title"] = form["description"] = "Body of ``POST /v1/generations`` as multipart/form-data."
    for name in _FILES:
        form["properties"][name] = {
            "type": "string",
            "format": "binary",
            "description": schema["properties"][name]["description"].split(":", 1)[0] + " (a file).",
        }
    form["properties"]["loras"] = {
        "type": "string",
        "description": 'LoRAs as a JSON array of {"name", "weight"}, or "name:weight,name:weight".',
        "examples": ["style:0.8"],
    }
    return {"GenerationRequest": schema, "GenerationRequestForm": form}


def _request_body_doc() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": _SCHEMAS + "GenerationRequest"}},
                "multipart/form-data": {"schema": {"$ref": _SCHEMAS + "GenerationRequestForm"}},
            },
        }
    }


async def decode_generation(request: Request) -> GenerationRequest:
    """The request of a JSON or multipart body. Raises a 4xx that says what to fix."""
    media = media_type(request.headers.get("content-type"))
    data: Any
    if media == "multipart/form-data":
        data = await _form(request)
    elif not media or media == "application/json" or media.endswith("+json"):
        raw = await request.body()
        try:
            data = await asyncio.to_thread(json.loads, raw) if len(raw) > _LARGE_BODY else json.loads(raw)
        except ValueError:
            raise MalformedRequest("the body is not valid JSON") from None
    else:
        raise UnsupportedMediaType(f"send the body as application/json or multipart/form-data, not {media!r}")
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object with a prompt field", field="body")
    try:
        return GenerationRequest.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None


async def _form(request: Request) -> dict[str, Any]:
    """Form fields as request fields; the files ``image`` and ``mask`` in base64, like the JSON form."""
    try:
        form = await request.form(max_files=len(_FILES), max_fields=len(GenerationRequest.model_fields))
    except HTTPException as e:
        if e.status_code == 413:
            raise
        raise MalformedRequest(f"the multipart body could not be read: {e.detail}") from None
    data: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            if name in data:
                raise InvalidRequest(f"{name} is given more than once", field=name)
            if isinstance(value, UploadFile):
                if name not in _FILES:
                    raise InvalidRequest(f"{name} cannot be a file; only {' and '.join(_FILES)} can", field=name)
                content = await value.read()
                if content or value.filename:  # a browser's empty file input sends neither
                    data[name] = base64.b64encode(content).decode("ascii")
            elif value != "" or name == "prompt":  # an empty optional field of a browser form: not given
                data[name] = value
    finally:
        await form.close()
    return data


@router.post(
    "/generations",
    response_model=GenerationResponse,
    responses={**_ERRORS, **_ASYNC},
    openapi_extra=_request_body_doc(),
)
@takes_images
async def create_generation(
    request: Request,
    ctx: Ctx,
    prefer: Annotated[str | None, Header(description="`respond-async` answers 202 at once")] = None,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Any:
    """Generate images from a prompt, or from a prompt and an image (and a mask to inpaint);
    answers with the URLs of the stored images.

    The body is JSON (`image` and `mask` in base64 or as `data:` URLs) or `multipart/form-data`
    (files `image` and `mask`, the other fields as form fields).

    Steps: decode → validate (before any model work) → charge the key → store the inputs, record and
    queue the job → answer when it ends (sync), at once with 202 (``Prefer: respond-async``), or with
    202 when it outlasts ``SDGATE_SYNC_TIMEOUT``.
    """
    body = await decode_generation(request)
    want_async = prefer is not None and "respond-async" in prefer.lower()
    generation = await ctx.service.generate(
        [body],
        surface=Surface.native,
        caller=caller_of(request),
        wait_s=None if want_async else ctx.settings.sync_timeout,
        idempotency_key=idempotency_key,
        # Only an idempotent retry is compared with its first request: no key, nothing to hash.
        body_hash=None if idempotency_key is None else request_hash(body.model_dump(mode="json")),
        webhook_url=body.webhook_url,
    )
    view = ctx.jobs.view(generation.job)
    if want_async or not generation.finished:
        return _accepted(request, view)
    generation.raise_for_failure()
    return _public(request, view)


@router.get("/jobs", response_model=JobList, responses=_ERRORS, tags=["jobs"])
async def list_jobs(
    request: Request,
    ctx: Ctx,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    before: Annotated[float | None, Query(description="`next_before` of the previous page")] = None,
) -> JobList:
    """Recent jobs, newest first."""
    data = [_public(request, j) for j in ctx.jobs.list_jobs(owner=owner_of(request), limit=limit, before=before)]
    next_before = None
    if len(data) == limit:
        next_before = ctx.jobs.find(data[-1].id).record.created
    return JobList(data=data, next_before=next_before)


@router.get("/jobs/{job_id}", response_model=GenerationResponse, responses=_ERRORS, tags=["jobs"])
async def get_job(job_id: str, request: Request, ctx: Ctx) -> GenerationResponse:
    """A job with its status, progress (`step`, `total_steps`, `eta_ms`) and, once succeeded, its images."""
    return _public(request, ctx.jobs.view(ctx.jobs.find(job_id, owner_of(request))))


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=GenerationResponse,
    responses=_ERRORS,
    tags=["jobs"],
    dependencies=[JsonBody],
)
async def cancel_job(job_id: str, request: Request, ctx: Ctx) -> GenerationResponse:
    """Cancel a job: a queued one is removed, a running one stops at its next step; a finished one is 409."""
    job = ctx.jobs.cancel(job_id, owner_of(request))
    return _public(request, ctx.jobs.view(job))


@router.get(
    "/jobs/{job_id}/events",
    responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}, **_ERRORS},
    response_class=StreamingResponse,
    tags=["jobs"],
)
async def job_events(
    job_id: str,
    request: Request,
    ctx: Ctx,
    previews: Annotated[
        bool, Query(description="Live previews: some progress events carry `preview`, a data: URL of a small JPEG.")
    ] = False,
) -> StreamingResponse:
    """Server-sent events: queued/started/progress/succeeded/failed/canceled, ending with the terminal one;
    ``loading`` when the job's model is loaded for it first."""
    owner = owner_of(request)
    ctx.jobs.find(job_id, owner)  # 404 before the stream starts

    async def stream() -> AsyncIterator[bytes]:
        async for event in ctx.jobs.events(job_id, owner, previews=previews):
            for img in event.data.get("images", []):
                img["url"] = absolute_url(request, img["url"])
            yield event.encode()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/models", response_model=ModelList, responses=AUTH_RESPONSES, tags=["models"])
async def list_models(ctx: Ctx) -> ModelList:
    """The models this server offers (the default first), each with the defaults a request gets
    when it leaves fields out and whether it is in memory now."""
    ready = ctx.backend.state() is BackendState.ready
    cards = []
    for i, name in enumerate(ctx.backend.model_names()):
        d = ctx.service.defaults(name)
        cards.append(
            ModelCard(
                id=name,
                created=_STARTED,
                backend=ctx.backend.name,
                ready=ready,
                loaded=ctx.backend.is_loaded(name),
                default=i == 0,
                default_width=d.width,
                default_height=d.height,
                default_steps=d.num_inference_steps,
                default_guidance_scale=d.guidance_scale,
                schedulers=list(SCHEDULER_NAMES),
            )
        )
    return ModelList(data=cards)


@router.get("/loras", response_model=LoraList, responses=AUTH_RESPONSES, tags=["models"])
async def list_loras(ctx: Ctx) -> LoraList:
    """The LoRAs this server offers (the files of SDGATE_LORA_DIR), each with the models it fits.

    A request names them in ``loras``; one on a model it does not fit is refused with a 422."""
    infos = await asyncio.to_thread(ctx.backend.loras)  # a file's first look reads it
    return LoraList(
        data=[LoraCard(name=i.name, bytes=i.bytes, models=i.fits, unchecked=i.unknown, error=i.error) for i in infos]
    )
