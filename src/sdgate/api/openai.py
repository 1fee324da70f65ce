"""The OpenAI Images API (``POST /v1/images/generations``, ``POST /v1/images/edits``): an adapter over the
generation service, so that apps built on the ``openai`` SDK switch to sdgate by changing a base URL.

- Requests map to a :class:`~sdgate.schemas.GenerationRequest` and take the one path (limits, keys,
  quotas, jobs, storage). An image is the same as from the native API for the same seed and fields.
- ``model``: a served model's name picks it; any other name (``dall-e-3``, ``gpt-image-1``) gets the
  default model, unless ``SDGATE_OPENAI_STRICT_MODELS`` is on, which makes it a 400.
- ``quality`` picks the step count as a share of the model's default (:data:`QUALITY_STEPS`);
  ``size`` is ``WIDTHxHEIGHT`` within sdgate's limits, or ``auto`` (the model's own size, or the
  input image's for edits).
- ``background=transparent`` is a 400 (the models draw opaque pictures); ``style`` and
  ``moderation`` are accepted and ignored; ``user`` (or ``safety_identifier``) is kept on the job.
- Errors answer ``{"error": {"message", "type", "param", "code"}}`` with the statuses the SDK maps
  to its exception classes (a refused value is a 400, as OpenAI's own API answers).
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from sdgate.api.access import caller_of
from sdgate.api.context import AppContext, Ctx, absolute_url
from sdgate.api.errors import DialectRoute
from sdgate.api.middleware import takes_images
from sdgate.errors import GenerationTimeout, InvalidRequest, MalformedRequest, UnsupportedMediaType
from sdgate.formats import ImageFormat
from sdgate.jobs import Job
from sdgate.jumpstart import media_type
from sdgate.schemas import GenerationRequest, Surface

QUALITY_STEPS: dict[str, float] = {
    "low": 0.5,
    "medium": 1.0,
    "standard": 1.0,
    "auto": 1.0,
    "high": 1.5,
    "hd": 1.5,
    "xhigh": 1.75,
    "max": 2.0,
}
"""``quality`` → the share of the model's default steps it runs (at least 1, at most 150)."""

Quality = Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"]

# sdgate's field → OpenAI's parameter, for error messages that name what the client sent.
_PARAMS = {
    "width": "size",
    "height": "size",
    "num_images": "n",
    "num_inference_steps": "quality",
    "image": "image",
    "mask": "mask",
}
_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


class OpenAIRoute(DialectRoute):
    """Errors in OpenAI's shape: a refused value is a 400 ``invalid_request_error`` naming its ``param``."""

    @staticmethod
    def shape(status: int, body: dict[str, Any], headers: dict[str, str]) -> Response:
        error = body.get("error", {})
        if status == 422:
            status = 400
        kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        field = error.get("field")
        out = {
            "error": {
                "message": error.get("message", ""),
                "type": kind,
                "param": _PARAMS.get(field, field) if field else None,
                "code": error.get("type"),
            }
        }
        retry_after = headers.get("Retry-After", "0")
        if status == 429 and retry_after.isdigit() and int(retry_after) > 60:
            # A daily quota: retrying within the SDK's backoff cannot succeed, and would be charged again later.
            headers = {**headers, "x-should-retry": "false"}
        return JSONResponse(out, status_code=status, headers=headers)


router = APIRouter(prefix="/v1/images", tags=["openai"], route_class=OpenAIRoute)


class ImageGenerationRequest(BaseModel):
    """Body of ``POST /v1/images/generations`` (and the fields of ``/v1/images/edits``), as OpenAI's API takes it."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., description="What to draw.")
    model: str | None = Field(None, description="A model from GET /v1/models; other names get the default model.")
    n: int | None = Field(None, ge=1, le=10, description="How many images.")
    size: str | None = Field(None, description="WIDTHxHEIGHT (multiples of 8 within sdgate's limits) or auto.")
    quality: Quality | None = Field(None, description="Steps as a share of the model's default: low 0.5, high 1.5.")
    response_format: Literal["url", "b64_json"] | None = Field(None, description="url (default) or b64_json.")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="png (default), jpeg or webp.")
    output_compression: int | None = Field(None, ge=0, le=100, description="JPEG/WebP quality, 0-100.")
    background: Literal["transparent", "opaque", "auto"] | None = Field(None, description="opaque or auto.")
    moderation: Literal["low", "auto"] | None = Field(None, description="Accepted and ignored.")
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted and ignored.")
    user: str | None = Field(None, max_length=256, description="Your end user's id, kept on the job.")
    safety_identifier: str | None = Field(None, max_length=256, description="Kept on the job, like user.")
    stream: bool | None = Field(None, description="Answer with server-sent events (the image at the end).")
    partial_images: int | None = Field(None, ge=0, le=3, description="Previews to stream before the image, 0-3.")
    input_fidelity: Literal["high", "low"] | None = Field(None, description="Edits: accepted and ignored.")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error, server_error, ...")
    param: str | None = Field(None, description="The request parameter at fault.")
    code: str | None = Field(None, description="sdgate's error type (invalid_request, quota_exceeded, ...).")


class OpenAIErrorBody(BaseModel):
    """Every error of these routes, in OpenAI's shape."""

    error: OpenAIErrorDetail


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorBody} for code in (400, 401, 403, 413, 415, 429, 500, 502, 503, 504)
}
_STREAM_DOC = {"text/event-stream": {"schema": {"type": "string"}}}
"""With ``stream: true``: ``image_generation.completed`` (or ``image_edit.completed``) events."""


class OpenAIImage(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    """OpenAI's answer: the images, and the settings they were made with."""

    created: int
    data: list[OpenAIImage]
    background: Literal["opaque"] = "opaque"
    output_format: ImageFormat
    size: str
    quality: str


_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


def _size(size: str | None) -> dict[str, int]:
    if size is None or size == "auto":
        return {}
    match = _SIZE.match(size)
    if match is None:
        raise InvalidRequest(f"size must be WIDTHxHEIGHT (for example 512x512) or auto, got {size!r}", field="size")
    return {"width": int(match[1]), "height": int(match[2])}


def to_request(ctx: AppContext, body: ImageGenerationRequest, **inputs: str) -> GenerationRequest:
    """The native request an OpenAI one asks for. Raises a 4xx naming OpenAI's parameter."""
    if body.background == "transparent":
        raise InvalidRequest(
            "background=transparent is not supported: the models draw opaque images; use opaque or auto",
            field="background",
        )
    model = body.model
    if model is not None and model not in ctx.backend.model_names():
        if ctx.settings.openai_strict_models:
            names = ", ".join(ctx.backend.model_names())
            raise InvalidRequest(f"unknown model {model!r}; valid: {names}", field="model")
        model = None  # dall-e-3, gpt-image-1, ...: the default model
    fields: dict[str, Any] = {"prompt": body.prompt, "model": model, **_size(body.size), **inputs}
    if body.n is not None:
        fields["num_images"] = body.n
    if body.quality is not None:
        default = ctx.service.defaults(model).num_inference_steps
        fields["num_inference_steps"] = max(1, min(150, round(default * QUALITY_STEPS[body.quality])))
    fields["output_format"] = body.output_format or "png"  # OpenAI's default
    if body.output_compression is not None:
        fields["quality"] = max(1, body.output_compression)
    try:
        return GenerationRequest(**fields)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None


async def _run(request: Request, ctx: AppContext, body: ImageGenerationRequest, **inputs: str) -> Response:
    """Steps: map → the generation service (waiting) → OpenAI's answer, or its event stream."""
    native = to_request(ctx, body, **inputs)
    generation = await ctx.service.generate(
        [native],
        surface=Surface.openai,
        caller=caller_of(request),
        # No 202 in this dialect: wait as long as a generation may take (the SDK's own timeout is 10 minutes).
        wait_s=None if body.stream else ctx.settings.backend_timeout_s,
        user=body.user or body.safety_identifier,
    )
    job = generation.job
    if body.stream:
        return StreamingResponse(
            _events(request, ctx, body, job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    if not generation.finished:
        raise _still_running(job)
    generation.raise_for_failure()
    return JSONResponse(_answer(request, ctx, body, job).model_dump(mode="json", exclude_none=True))


def _still_running(job: Job) -> GenerationTimeout:
    return GenerationTimeout(
        f"the image is still being made after the server's wait; it goes on as job {job.id} (GET /v1/jobs/{job.id})",
        headers={"x-should-retry": "false"},  # the SDK would otherwise retry, making it again
    )


def _quality(body: ImageGenerationRequest) -> str:
    return {"standard": "medium", "hd": "high", None: "auto"}.get(body.quality, body.quality or "auto")


def _answer(request: Request, ctx: AppContext, body: ImageGenerationRequest, job: Job) -> ImagesResponse:
    images = job.record.images
    if body.response_format == "b64_json":
        data = [
            OpenAIImage(b64_json=base64.b64encode(b).decode("ascii"), revised_prompt=job.params.prompt)
            for b in ctx.jobs.image_bytes(job)
        ]
    else:
        data = [OpenAIImage(url=absolute_url(request, i.url), revised_prompt=job.params.prompt) for i in images]
    return ImagesResponse(
        created=int(job.record.created),
        data=data,
        output_format=job.params.output_format,
        size=f"{job.params.width}x{job.params.height}",
        quality=_quality(body),
    )


async def _events(request: Request, ctx: AppContext, body: ImageGenerationRequest, job: Job) -> AsyncIterator[bytes]:
    """``stream: true``: up to ``partial_images`` previews as ``…partial_image`` events, spread over the
    steps, then the finished images as ``…completed`` events (an error as ``error``)."""
    kind = "image_edit" if request.url.path.endswith("/edits") else "image_generation"
    wanted = body.partial_images or 0
    common: dict[str, Any] = {
        "size": f"{job.params.width}x{job.params.height}",
        "quality": _quality(body),
        "background": "opaque",
        "output_format": job.params.output_format,
    }
    sent = 0
    async for event in ctx.jobs.events(job.id, previews=wanted > 0):
        if not event.name:
            yield b": keep-alive\n\n"
        preview = event.data.get("preview")
        step = int(event.data.get("progress", {}).get("step", 0))
        if preview and sent < wanted and step * (wanted + 1) >= (sent + 1) * job.params.steps_to_run:
            partial = {
                "type": f"{kind}.partial_image",
                "b64_json": preview.split(",", 1)[1],
                "partial_image_index": sent,
                "created_at": int(time.time()),
                **common,
                "output_format": "jpeg",  # previews are small JPEGs, whatever the final format
            }
            yield _sse(f"{kind}.partial_image", partial)
            sent += 1
    while not job.status.is_terminal():  # a job a worker elsewhere runs: followed in the store
        if not await ctx.jobs.wait(job, 15):
            yield b": keep-alive\n\n"
    if job.record.error is not None:
        error = {"message": job.record.error.message, "type": "server_error", "code": job.record.error.type}
        yield _sse("error", {"type": "error", "error": error})
        return
    common["created_at"] = int(time.time())
    for data in ctx.jobs.image_bytes(job):
        done = {"type": f"{kind}.completed", "b64_json": base64.b64encode(data).decode("ascii"), **common}
        yield _sse(f"{kind}.completed", done)


def _sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


@router.post(
    "/generations",
    response_model=ImagesResponse,
    responses={200: {"content": _STREAM_DOC, "description": "the images, or their event stream"}, **_ERRORS},
)
async def create_image(body: ImageGenerationRequest, request: Request, ctx: Ctx) -> Response:
    """OpenAI's ``images.generate``: text to images, answered with URLs or base64."""
    return await _run(request, ctx, body)


_EDIT_FILES = ("image", "image[]", "mask")


def _edit_form_doc() -> dict[str, Any]:
    schema = ImageGenerationRequest.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    schema["properties"].update(
        image={**binary, "description": "The picture to edit (PNG, JPEG or WebP)."},
        mask={**binary, "description": "PNG with alpha: its fully transparent pixels are repainted."},
    )
    schema["required"] = ["prompt", "image"]
    schema["title"] = "ImageEditForm"
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


@router.post(
    "/edits",
    response_model=ImagesResponse,
    responses={200: {"content": _STREAM_DOC, "description": "the images, or their event stream"}, **_ERRORS},
    openapi_extra=_edit_form_doc(),
)
@takes_images
async def edit_image(request: Request, ctx: Ctx) -> Response:
    """OpenAI's ``images.edit`` (multipart): ``image`` (or one ``image[]``) and an optional ``mask``, whose
    fully transparent pixels mark the area to repaint. Without a mask, the image is redrawn (image to image)."""
    fields, files = await _edit_form(request)
    images = files.get("image", []) + files.get("image[]", [])
    if not images:
        raise InvalidRequest("image is required: the picture to edit, as a file", field="image")
    if len(images) > 1:
        raise InvalidRequest(f"sdgate edits one image at a time; {len(images)} were sent", field="image")
    inputs = {"image": base64.b64encode(images[0]).decode("ascii")}
    masks = files.get("mask", [])
    if masks:
        inputs["mask"] = base64.b64encode(_transparent_repaints(masks[0])).decode("ascii")
    try:
        body = ImageGenerationRequest(**fields)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None
    return await _run(request, ctx, body, **inputs)


async def _edit_form(request: Request) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    if media_type(request.headers.get("content-type")) != "multipart/form-data":
        raise UnsupportedMediaType("send the edit as multipart/form-data, with the image as a file")
    try:
        form = await request.form(max_files=8, max_fields=len(ImageGenerationRequest.model_fields) + 8)
    except HTTPException as e:
        if e.status_code == 413:
            raise
        raise MalformedRequest(f"the multipart body could not be read: {e.detail}") from None
    fields: dict[str, Any] = {}
    files: dict[str, list[bytes]] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in _EDIT_FILES:
                    raise InvalidRequest(f"{name} cannot be a file; only image and mask can", field=name)
                files.setdefault(name, []).append(await value.read())
            elif name in _EDIT_FILES:
                raise InvalidRequest(f"{name} must be sent as a file", field=name)
            elif name in fields:
                raise InvalidRequest(f"{name} is given more than once", field=name)
            else:
                fields[name] = value
    finally:
        await form.close()
    return fields, files  # form values are text: pydantic reads "true" and "1" as booleans, "5" as numbers


def _transparent_repaints(data: bytes) -> bytes:
    """OpenAI's mask (a PNG whose fully transparent pixels are to be edited) as sdgate's: white repaints."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if not (im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info):
                raise InvalidRequest(
                    "mask must be a PNG with an alpha channel: transparent pixels are edited", field="mask"
                )
            alpha = im.convert("RGBA").getchannel("A")
    except (UnidentifiedImageError, OSError):
        raise InvalidRequest("mask is not a PNG image sdgate can read", field="mask") from None
    out = io.BytesIO()
    alpha.point(lambda a: 255 if a == 0 else 0).save(out, format="PNG")
    return out.getvalue()
