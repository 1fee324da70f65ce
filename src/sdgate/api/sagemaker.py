"""sdgate as a SageMaker model endpoint: the container contract and the runtime REST path.

- ``GET /ping``: 200 once the model is loaded (SageMaker's health check), 503 before.
- ``POST /invocations``: the container's inference route.
- ``POST /endpoints/{name}/invocations``: the SageMaker runtime's path, so that an unmodified
  ``boto3.client("sagemaker-runtime", endpoint_url=<sdgate>)`` works. Its SigV4 ``Authorization``
  header is accepted and ignored: sdgate's own auth (when on) guards this path like any other.

Bodies follow the JumpStart Stable Diffusion contract (see :mod:`sdgate.jumpstart`), the inpainting
model's ``image`` and ``mask_image`` included; errors come in
SageMaker's shape and codes (see :mod:`sdgate.api.errors`). These routes answer with the images
themselves, as an endpoint does: nothing is stored.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from sdgate.api.access import caller_of
from sdgate.api.context import AppContext, Ctx
from sdgate.api.errors import DialectRoute
from sdgate.api.middleware import takes_images
from sdgate.backends import BackendState
from sdgate.errors import BackendError, GenerationTimeout, InvalidRequest
from sdgate.jobs import Job
from sdgate.jumpstart import (
    JPEG_ACCEPT,
    JSON,
    TEXT,
    Invocation,
    in_payload_terms,
    parse_invocation,
    render_image,
    render_response,
)
from sdgate.jumpstart import generation_requests as jumpstart_requests
from sdgate.schemas import Surface

# SageMaker's runtime maps model errors to 424 ModelError and validation to 400.
_SAGEMAKER_STATUS = {415: 400, 422: 400, 500: 424, 502: 424, 504: 424}
_SAGEMAKER_CODES = {
    400: "ValidationError",
    401: "UnrecognizedClientException",
    403: "AccessDeniedException",
    404: "ValidationError",
    409: "ValidationError",
    413: "ValidationError",
    424: "ModelError",
    429: "ThrottlingException",
    503: "ServiceUnavailable",
}


class SageMakerRoute(DialectRoute):
    """Errors in the shape SageMaker clients parse: ``{"ErrorCode", "Message"}`` and the
    ``x-amzn-ErrorType`` header botocore reads the code from, plus the same ``error`` object."""

    @staticmethod
    def shape(status: int, body: dict[str, Any], headers: dict[str, str]) -> Response:
        status = _SAGEMAKER_STATUS.get(status, status)
        code = _SAGEMAKER_CODES.get(status, "InternalFailure")
        message = body.get("error", {}).get("message", "")
        wrapped = {"ErrorCode": code, "Message": message, **body}
        return JSONResponse(wrapped, status_code=status, headers={**headers, "x-amzn-ErrorType": code})


router = APIRouter(tags=["sagemaker"], route_class=SageMakerRoute)

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
    if ctx.backend.state() is BackendState.ready:
        return JSONResponse({"status": "Healthy"})
    return JSONResponse({"status": "Unhealthy", "detail": ctx.backend.status_detail()}, status_code=503)


@router.post("/invocations", openapi_extra=_BODY_DOC, responses=_RESPONSES)
@takes_images
async def invocations(request: Request, ctx: Ctx) -> Response:
    """Generate images in the JumpStart Stable Diffusion contract (SageMaker container route)."""
    return await _invoke(request, ctx)


@router.post("/endpoints/{endpoint_name}/invocations", openapi_extra=_BODY_DOC, responses=_RESPONSES)
@takes_images
async def runtime_invocations(endpoint_name: str, request: Request, ctx: Ctx) -> Response:
    """The SageMaker runtime's ``InvokeEndpoint`` path; any endpoint name reaches this server's model."""
    return await _invoke(request, ctx)


async def _invoke(request: Request, ctx: AppContext) -> Response:
    """Steps: decode the JumpStart body → the generation service, waiting → JumpStart's answer."""
    # 1. decode, before any model work
    invocation = parse_invocation(
        await request.body(), request.headers.get("content-type"), request.headers.get("accept")
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
    # 2. generate: a job per prompt (the engine batches them into shared pipeline calls), charged as one request
    try:
        generation = await ctx.service.generate(
            jumpstart_requests(payload),
            surface=Surface.sagemaker,
            caller=caller_of(request),
            wait_s=ctx.settings.backend_timeout_s,
        )
    except InvalidRequest as e:
        raise in_payload_terms(e) from None
    if not generation.finished:
        pending = ", ".join(j.id for j in generation.jobs if not j.status.is_terminal())
        raise GenerationTimeout(
            f"the generation did not finish within {ctx.settings.backend_timeout_s:g}s; it goes on as job(s) {pending}"
        )
    generation.raise_for_failure()
    # 3. answer with the stored images (RGB lists of a large image take a while to serialise: off the loop)
    content = await asyncio.to_thread(_render, invocation, generation.jobs)
    return Response(content, media_type=JSON, headers={"X-Amzn-Invoked-Production-Variant": "AllTraffic"})


def _render(invocation: Invocation, jobs: list[Job]) -> bytes:
    if any(len(job.outputs) != len(job.record.images) for job in jobs):
        # Only where jobs run in another process (AWS Lambda) are their images not in memory here.
        raise BackendError("the images were made by another process; fetch them from GET /v1/jobs/{id}")
    images = [render_image(out.data, out.pixels, invocation.encoding) for job in jobs for out in job.outputs]
    return render_response(invocation, images)
