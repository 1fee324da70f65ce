"""The native v1 API: generations, jobs, models."""

from __future__ import annotations

from fastapi import APIRouter, Request

from sdgate.api.context import Ctx, JsonBody, absolute_url
from sdgate.errors import SdgateError
from sdgate.jobs import Job
from sdgate.schemas import (
    SCHEDULER_NAMES,
    ErrorBody,
    GenerationRequest,
    GenerationResponse,
    ModelCard,
    ModelList,
    resolve_request,
)

router = APIRouter(prefix="/v1", tags=["generations"], dependencies=[JsonBody])

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (400, 404, 409, 413, 415, 422, 429, 500, 502, 503)
}


def _public(request: Request, job: Job) -> GenerationResponse:
    resp = job.to_response()
    for img in resp.images:
        img.url = absolute_url(request, img.url)
    return resp


@router.post("/generations", response_model=GenerationResponse, responses=_ERRORS)
async def create_generation(body: GenerationRequest, request: Request, ctx: Ctx) -> GenerationResponse:
    """Generate images from a prompt; answers with the URLs of the stored images.

    Steps: validate (before any model work) → wait for the model if it is still loading →
    run the job → answer with the job, or with its error.
    """
    await ctx.jobs.wait_ready(timeout=ctx.settings.backend_timeout_s)
    params = resolve_request(body, ctx.settings, ctx.backend.defaults())
    job = ctx.jobs.create(params)
    await ctx.jobs.run(job)
    if job.error is not None:
        err: SdgateError = job.error
        err.headers.setdefault("X-Job-Id", job.id)
        raise err
    return _public(request, job)


@router.get("/jobs/{job_id}", response_model=GenerationResponse, responses=_ERRORS, tags=["jobs"])
async def get_job(job_id: str, request: Request, ctx: Ctx) -> GenerationResponse:
    """A job with its status, progress and, once succeeded, its images."""
    return _public(request, ctx.jobs.get(job_id))


@router.get("/models", response_model=ModelList, tags=["models"])
async def list_models(ctx: Ctx) -> ModelList:
    """The model this server runs, with the defaults a request gets when it leaves fields out."""
    d = ctx.backend.defaults()
    return ModelList(
        data=[
            ModelCard(
                id=ctx.backend.model_name,
                backend=ctx.backend.name,
                ready=ctx.backend.ready(),
                default_width=d.width,
                default_height=d.height,
                default_steps=ctx.settings.default_steps or d.num_inference_steps,
                default_guidance_scale=d.guidance_scale,
                schedulers=list(SCHEDULER_NAMES),
            )
        ]
    )
