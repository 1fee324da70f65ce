"""Jobs: every generation, sync or not, is a job that runs backend → encode → store.

The runner is the middle layer between transport (HTTP) and worker (backend): it owns the job's
state machine (:class:`JobStatus`), its progress and its timings. A failed generation is data on
the job; the API decides how to show it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from sdgate.backends import Backend
from sdgate.config import Settings
from sdgate.errors import NotFound, NotReady, SdgateError
from sdgate.imaging import CONTENT_TYPES, EXTENSIONS, encode
from sdgate.schemas import (
    ErrorInfo,
    GeneratedImage,
    GenerationParams,
    GenerationResponse,
    ImageResult,
    JobStatus,
    Progress,
    Timings,
)
from sdgate.storage import Storage, new_key

log = logging.getLogger("sdgate.jobs")

_KEEP_IN_MEMORY = 1000


@dataclass
class Job:
    id: str
    params: GenerationParams
    model: str
    created: float = field(default_factory=time.time)
    status: JobStatus = JobStatus.queued
    images: list[ImageResult] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    progress: Progress = field(default_factory=Progress)
    error: SdgateError | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def to_response(self) -> GenerationResponse:
        return GenerationResponse(
            id=self.id,
            status=self.status,
            model=self.model,
            created=int(self.created),
            images=self.images,
            timings=self.timings,
            progress=self.progress,
            error=ErrorInfo(type=self.error.type, message=self.error.message) if self.error else None,
        )


class JobRunner:
    """Runs jobs to a terminal state and remembers recent ones."""

    def __init__(self, settings: Settings, backend: Backend, storage: Storage):
        self.settings = settings
        self.backend = backend
        self.storage = storage
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        return job

    async def wait_ready(self, timeout: float) -> None:
        """Hold a request that arrives while the model is still loading, rather than refusing it."""
        deadline = time.monotonic() + timeout
        while not self.backend.ready():
            detail = self.backend.status_detail()
            if "failed" in detail or time.monotonic() > deadline:
                raise NotReady(f"not ready: {detail}", headers={"Retry-After": "5"})
            await asyncio.sleep(0.05)

    def create(self, params: GenerationParams) -> Job:
        job = Job(id=uuid.uuid4().hex, params=params, model=self.backend.model_name)
        self._jobs[job.id] = job
        while len(self._jobs) > _KEEP_IN_MEMORY:
            self._jobs.popitem(last=False)
        return job

    async def run(self, job: Job) -> Job:
        """Steps: generate → encode → store. Returns the job in a terminal state; never raises SdgateError."""
        t0 = time.perf_counter()
        job.status = JobStatus.running
        job.progress = Progress(step=0, total_steps=job.params.num_inference_steps)

        def on_progress(step: int, total: int) -> None:
            job.progress = Progress(step=step, total_steps=total)

        try:
            # 1. generate
            result = await self.backend.generate(job.params, on_progress, job.cancel)
            job.timings.queue = round(result.queue_ms, 2)
            job.timings.inference = round(result.inference_ms, 2)
            # 2. encode and 3. store, off the event loop
            encode_ms, store_ms, images = await asyncio.to_thread(self._encode_and_store, job, result.images)
            job.timings.encode = round(encode_ms, 2)
            job.timings.store = round(store_ms, 2)
            job.images = images
            job.status = JobStatus.succeeded
        except SdgateError as e:
            job.error = e
            job.status = JobStatus.canceled if e.type == "canceled" else JobStatus.failed
        job.timings.total = round((time.perf_counter() - t0) * 1000, 2)
        return job

    def _encode_and_store(self, job: Job, generated: list[GeneratedImage]) -> tuple[float, float, list[ImageResult]]:
        p = job.params
        encode_s = store_s = 0.0
        results = []
        for img in generated:
            t0 = time.perf_counter()
            # No job id in the file: the same request and seed give byte-identical images.
            meta = {**p.public(), "seed": img.seed, "model": job.model}
            if img.encoded is not None and img.encoded_format == p.output_format:
                data, width, height = img.encoded, img.image.width, img.image.height
            else:
                enc = encode(img.image, p.output_format, p.quality, meta)
                data, width, height = enc.data, enc.width, enc.height
            content_type = CONTENT_TYPES[p.output_format]
            t1 = time.perf_counter()
            key = new_key(EXTENSIONS[p.output_format])
            # The image first, then its sidecar: a sidecar never describes a missing image.
            stored = self.storage.put(data, key, content_type)
            sidecar = json.dumps(
                {**meta, "job_id": job.id, "key": key, "content_type": content_type, "bytes": len(data)}
            ).encode()
            self.storage.put(sidecar, key.rsplit(".", 1)[0] + ".json", "application/json")
            t2 = time.perf_counter()
            encode_s += t1 - t0
            store_s += t2 - t1
            results.append(
                ImageResult(
                    url=stored.url,
                    seed=img.seed,
                    width=width,
                    height=height,
                    content_type=content_type,
                    bytes=len(data),
                )
            )
        return encode_s * 1000, store_s * 1000, results
