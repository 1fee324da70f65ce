"""The generation service: the one path from a request to stored images, for every surface.

Every surface (the native API, ``/text2image``, the SageMaker routes, the CLI in process, the Lambda
handler, and the dialects to come) is a thin adapter: it decodes its dialect into
:class:`~sdgate.schemas.GenerationRequest` objects, calls :meth:`GenerationService.generate`, and
encodes the jobs it gets back. The steps, the same for all:

1. resolve each request against the model's defaults (limits and input images first, before any
   model work);
2. authorize and charge the caller's key: one rate hit per request, its images against the quota;
3. store the input images, if any, and submit each request as a job (recorded before it is acknowledged);
4. wait for the jobs (sync), or hand them back at once (async: the caller answers 202);
5. the jobs run backend → encode once → store (:mod:`sdgate.jobs`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sdgate.auth import ApiKey, Guard
from sdgate.backends import Backend
from sdgate.config import Settings
from sdgate.errors import InvalidRequest, error_of_type
from sdgate.generation.request import effective_defaults, read_inputs, resolve_request
from sdgate.jobs import Job, JobRunner
from sdgate.schemas import GenerationRequest, JobStatus, LoraWeight, ModelDefaults, Surface


@dataclass(frozen=True)
class Caller:
    """Who asks: their API key (None without auth), the owner their jobs belong to, and the base URL
    that relative image URLs resolve against (for webhooks)."""

    key: ApiKey | None = None
    owner: str | None = None
    base_url: str | None = None


@dataclass
class Generation:
    """The jobs one call made (one per request, in order), and whether all of them have ended."""

    jobs: list[Job]
    finished: bool

    @property
    def job(self) -> Job:
        """The first (usually the only) job."""
        return self.jobs[0]

    def raise_for_failure(self) -> None:
        """Raise the first failed or canceled job's error, with its status, as the surface's answer."""
        for job in self.jobs:
            error = job.record.error
            if job.status in (JobStatus.failed, JobStatus.canceled) and error is not None:
                headers = {"X-Job-Id": job.id}
                if error.retry_after:
                    headers["Retry-After"] = error.retry_after
                raise error_of_type(error.type, error.message, headers=headers)


class GenerationService:
    """Resolve → charge → submit → wait | 202. One instance per app (or per CLI run)."""

    def __init__(self, settings: Settings, backend: Backend, jobs: JobRunner, guard: Guard | None = None):
        self.settings = settings
        self.backend = backend
        self.jobs = jobs
        self.guard = guard

    def defaults(self, model: str | None = None) -> ModelDefaults:
        """What a request that names nothing else gets on ``model`` (``GET /v1/models`` shows these)."""
        return effective_defaults(self.settings, self.backend.defaults(model))

    def model_of(self, request: GenerationRequest) -> str:
        """The model a request runs on: the one it names, else the default; 422 naming ``model`` if unknown."""
        names = self.backend.model_names()
        if request.model is None:
            return names[0]
        if request.model not in names:
            raise InvalidRequest(f"unknown model {request.model!r}; valid: {', '.join(names)}", field="model")
        return request.model

    async def loras_of(self, request: GenerationRequest, model: str) -> tuple[LoraWeight, ...]:
        """The request's LoRAs, each checked on ``model``; 422 naming ``loras`` for one unknown or unfit."""
        if not request.loras:
            return ()
        asked = [LoraWeight(lo.name, lo.weight) for lo in request.loras]

        def check() -> str | None:  # the first look at a file or a model's configs reads them: off the loop
            return next(filter(None, (self.backend.lora_problem(model, lo.name) for lo in asked)), None)

        problem = await asyncio.to_thread(check)
        if problem is not None:
            raise InvalidRequest(problem, field="loras")
        return tuple(asked)

    async def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        surface: Surface,
        caller: Caller,
        wait_s: float | None,
        idempotency_key: str | None = None,
        body_hash: str | None = None,
        webhook_url: str | None = None,
        user: str | None = None,
        previews: bool = False,
    ) -> Generation:
        """Run ``requests`` as one generation request of the caller.

        ``wait_s`` None answers at once (the jobs go on); otherwise wait up to that long for every job.
        ``user`` is the end user the caller names (kept on the jobs); ``previews`` makes live previews for
        the jobs whoever listens (a surface that is polled for them).
        Raises a 4xx :class:`SdgateError` for what the request or the key's limits refuse; a job that
        fails is data on the job (see :meth:`Generation.raise_for_failure`).
        """
        # 1. resolve: a waiting request holds until the model is loaded, whose defaults it gets
        if wait_s is not None:
            await self.jobs.wait_ready(timeout=self.settings.backend_timeout_s)
        if idempotency_key is not None:
            # A retry of a request already charged and recorded gets its job, whatever changed since
            # (a LoRA file removed, a model no longer offered).
            earlier = self.jobs.find_idempotent(caller.owner, idempotency_key, body_hash)
            if earlier is not None:
                return await self._answer([earlier], wait_s)
        models = [self.model_of(r) for r in requests]
        loras = [await self.loras_of(r, m) for r, m in zip(requests, models, strict=True)]
        # Decoding an image takes milliseconds of CPU: off the event loop.
        inputs = [
            await asyncio.to_thread(read_inputs, r, self.settings) if r.image else read_inputs(r, self.settings)
            for r in requests
        ]
        params = [
            resolve_request(r, self.settings, self.backend.defaults(m), i, m, lo)
            for r, i, m, lo in zip(requests, inputs, models, loras, strict=True)
        ]
        self.jobs.check_webhook(webhook_url)
        self.jobs.check_capacity(len(params))
        # 2. charge
        if self.guard is not None:
            self.guard.charge(caller.key, sum(p.num_images for p in params))
        # 3. store the inputs, submit
        params = [await self.jobs.keep_inputs(p, i) for p, i in zip(params, inputs, strict=True)]
        jobs = [
            self.jobs.submit(
                p,
                surface=surface,
                inputs=i,
                owner=caller.owner,
                idempotency_key=idempotency_key,
                body_hash=body_hash,
                webhook_url=webhook_url,
                base_url=caller.base_url,
                user=user,
                previews=previews,
            )[0]
            for p, i in zip(params, inputs, strict=True)
        ]
        # 4. wait, or not
        return await self._answer(jobs, wait_s)

    async def _answer(self, jobs: list[Job], wait_s: float | None) -> Generation:
        if wait_s is None:
            return Generation(jobs, finished=all(j.status.is_terminal() for j in jobs))
        end = time.monotonic() + wait_s
        finished = True
        for job in jobs:
            finished = await self.jobs.wait(job, max(0.0, end - time.monotonic())) and finished
        return Generation(jobs, finished)
