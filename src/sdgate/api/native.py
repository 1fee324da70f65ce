"""The native v1 API: generations (sync and async), jobs, progress events, models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from sdgate.api.access import AUTH_RESPONSES, caller_of
from sdgate.api.context import Ctx, JsonBody, absolute_url
from sdgate.backends import BackendState
from sdgate.jobs import request_hash
from sdgate.schemas import (
    SCHEDULER_NAMES,
    ErrorBody,
    GenerationRequest,
    GenerationResponse,
    JobList,
    ModelCard,
    ModelList,
    Surface,
)

router = APIRouter(prefix="/v1", tags=["generations"], dependencies=[JsonBody])

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


@router.post("/generations", response_model=GenerationResponse, responses={**_ERRORS, **_ASYNC})
async def create_generation(
    body: GenerationRequest,
    request: Request,
    ctx: Ctx,
    prefer: Annotated[str | None, Header(description="`respond-async` answers 202 at once")] = None,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Any:
    """Generate images from a prompt; answers with the URLs of the stored images.

    Steps: validate (before any model work) → charge the key → record and queue the job → answer
    when it ends (sync), at once with 202 (``Prefer: respond-async``), or with 202 when it outlasts
    ``SDGATE_SYNC_TIMEOUT``.
    """
    want_async = prefer is not None and "respond-async" in prefer.lower()
    generation = await ctx.service.generate(
        [body],
        surface=Surface.native,
        caller=caller_of(request),
        wait_s=None if want_async else ctx.settings.sync_timeout,
        idempotency_key=idempotency_key,
        body_hash=request_hash(body.model_dump(mode="json")),
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


@router.post("/jobs/{job_id}/cancel", response_model=GenerationResponse, responses=_ERRORS, tags=["jobs"])
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
async def job_events(job_id: str, request: Request, ctx: Ctx) -> StreamingResponse:
    """Server-sent events: queued/started/progress/succeeded/failed/canceled, ending with the terminal one."""
    owner = owner_of(request)
    ctx.jobs.find(job_id, owner)  # 404 before the stream starts

    async def stream() -> AsyncIterator[bytes]:
        async for event in ctx.jobs.events(job_id, owner):
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
    """The model this server runs, with the defaults a request gets when it leaves fields out."""
    d = ctx.service.defaults()
    return ModelList(
        data=[
            ModelCard(
                id=ctx.backend.model_name,
                backend=ctx.backend.name,
                ready=ctx.backend.state() is BackendState.ready,
                default_width=d.width,
                default_height=d.height,
                default_steps=d.num_inference_steps,
                default_guidance_scale=d.guidance_scale,
                schedulers=list(SCHEDULER_NAMES),
            )
        ]
    )
