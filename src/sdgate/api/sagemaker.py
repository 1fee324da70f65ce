"""sdgate as a SageMaker model endpoint: the container contract and the runtime REST path.

- ``GET /ping``: 200 once the model is loaded (SageMaker's health check), 503 before.
- ``POST /invocations``: the container's inference route.
- ``POST /endpoints/{name}/invocations``: the SageMaker runtime's path, so that an unmodified
  ``boto3.client("sagemaker-runtime", endpoint_url=<sdgate>)`` works. Its SigV4 ``Authorization``
  header is accepted and ignored: sdgate's own auth (when on) guards this path like any other.

Bodies follow the JumpStart Stable Diffusion contract (see :mod:`sdgate.jumpstart`); errors come in
SageMaker's shape and codes (see :mod:`sdgate.api.errors`). These routes answer with the images
themselves, as an endpoint does: nothing is stored.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from sdgate.api.context import AppContext, Ctx
from sdgate.backends import BackendResult
from sdgate.errors import Busy, InvalidRequest, SdgateError
from sdgate.jumpstart import JPEG_ACCEPT, JSON, TEXT, Invocation, parse_invocation, render_image, render_response
from sdgate.jumpstart import generation_requests as jumpstart_requests
from sdgate.schemas import GenerationParams, resolve_request

router = APIRouter(tags=["sagemaker"])

_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {
                "schema": {"type": "object"},
                "example": {"prompt": "astronaut on a horse", "width": 512, "height": 512, "seed": 1},
            },
            TEXT: {"schema": {"type": "string"}, "example": "astronaut on a horse"},
        },
    },
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": f"`generated_images` (or `generated_image` for {TEXT}) and `prompt`; images as base64 "
        f"JPEG with `Accept: {JPEG_ACCEPT}`, as RGB pixel lists with `Accept: {JSON}`",
        "content": {JSON: {}},
    },
    400: {"description": "ValidationError"},
    401: {
        "description": "no API key, or an unknown one (when keys are required; /invocations is open in SageMaker mode)"
    },
    403: {"description": "the API key was revoked"},
    424: {"description": "ModelError: the model failed"},
    429: {"description": "ThrottlingException: busy, retry later"},
    503: {"description": "ServiceUnavailable: the model is not loaded yet"},
}


@router.get("/ping", responses={503: {"description": "model still loading or failed"}})
async def ping(ctx: Ctx) -> JSONResponse:
    """SageMaker's health check: 200 once the model is loaded and warmed up."""
    if ctx.backend.ready():
        return JSONResponse({"status": "Healthy"})
    return JSONResponse({"status": "Unhealthy", "detail": ctx.backend.status_detail()}, status_code=503)


@router.post("/invocations", openapi_extra=_BODY_DOC, responses=_RESPONSES)
async def invocations(request: Request, ctx: Ctx) -> Response:
    """Generate images in the JumpStart Stable Diffusion contract (SageMaker container route)."""
    return await _invoke(request, ctx)


@router.post("/endpoints/{endpoint_name}/invocations", openapi_extra=_BODY_DOC, responses=_RESPONSES)
async def runtime_invocations(endpoint_name: str, request: Request, ctx: Ctx) -> Response:
    """The SageMaker runtime's ``InvokeEndpoint`` path; any endpoint name reaches this server's model."""
    return await _invoke(request, ctx)


async def _invoke(request: Request, ctx: AppContext) -> Response:
    """Steps: check inputs → wait for the model → generate every prompt → answer with the images."""
    # 1. check inputs, before any model work
    invocation = parse_invocation(
        await request.body(), request.headers.get("content-type"), request.headers.get("accept")
    )
    # These calls skip the job queue (nothing is recorded or stored), so they get its bound here.
    if int(ctx.backend.stats().get("queue_depth", 0)) >= ctx.settings.queue_size:
        raise Busy(
            f"the model's queue is full ({ctx.settings.queue_size} waiting); retry later", headers={"Retry-After": "5"}
        )
    payload = invocation.payload
    total = len(payload.prompts) * payload.num_images_per_prompt
    if total > ctx.settings.max_images:
        what = f"{len(payload.prompts)} prompts x {payload.num_images_per_prompt} images is {total}"
        if len(payload.prompts) == 1:
            what = f"num_images_per_prompt is {total}"
        raise InvalidRequest(
            f"{what}; the limit is {ctx.settings.max_images} images per request", field="num_images_per_prompt"
        )
    await ctx.jobs.wait_ready(timeout=ctx.settings.backend_timeout_s)
    defaults = ctx.backend.defaults()  # known once the model is loaded
    params = [resolve_request(r, ctx.settings, defaults) for r in jumpstart_requests(payload)]
    # 2. generate: one backend call per prompt; the engine batches them into shared pipeline calls
    results = await _generate_all(ctx, params)
    # 3. answer (RGB lists of a large image take a while to serialise: off the event loop)
    content = await asyncio.to_thread(_render, invocation, params, results, ctx.backend.model_name)
    return Response(content, media_type=JSON, headers={"X-Amzn-Invoked-Production-Variant": "AllTraffic"})


async def _generate_all(ctx: AppContext, params: list[GenerationParams]) -> list[BackendResult]:
    if len(params) == 1:
        return [await ctx.backend.generate(params[0])]
    try:
        # A TaskGroup cancels the other prompts when one fails, so the device is not spent on them.
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(ctx.backend.generate(p)) for p in params]
    except* SdgateError as failed:
        raise failed.exceptions[0] from None
    return [t.result() for t in tasks]


def _render(invocation: Invocation, params: list[GenerationParams], results: list[BackendResult], model: str) -> bytes:
    images = [
        render_image(img, p, invocation.encoding, model)
        for p, result in zip(params, results, strict=True)
        for img in result.images
    ]
    return render_response(invocation, images)
