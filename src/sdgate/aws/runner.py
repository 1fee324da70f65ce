"""Jobs on AWS Lambda: the API invocation records a job, a second, asynchronous invocation runs it.

Why not run jobs in the process, as ``sdgate serve`` does: Lambda freezes the process as soon as an
invocation has answered, so a job left running in the background of a 202 would stop until some
later request happens to thaw that container, or forever. And API Gateway stops waiting after 29 s.

So every job, sync or async, goes the same way:

1. the API invocation records the job (DynamoDB) and invokes the worker function with
   ``InvocationType=Event`` and ``{"sdgate_job": "<id>"}``: Lambda queues the event and answers at once;
2. the worker invocation claims the job (queued → running, a conditional write: a twice-delivered
   event runs it once), calls the SageMaker endpoint, stores the images in S3, records the result
   and delivers the webhook, with up to 15 minutes to do it;
3. meanwhile the API invocation polls the record until the job ends (200 with the images) or until
   its own deadline, taken from the Lambda context a little before API Gateway gives up (202 with
   the job; the client polls ``GET /v1/jobs/{id}`` or gets the webhook).

A request is never cut off at 29 s nor run twice, and no answer waits on a guess of how long a
generation takes. Why a second Lambda invocation rather than SageMaker asynchronous inference: an
async endpoint takes only ``invoke_endpoint_async`` (input and output through S3), so sync requests
would need a second, real-time endpoint (a second GPU instance) or would poll S3 too; the worker
keeps one real-time endpoint, and the gateway code (per-image seeds, JPEG as it came, keys, URLs,
webhooks) is the same as on a server. Its limit: one image must come within SageMaker's 60 s
per invocation, which Stable Diffusion on a GPU does many times over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sdgate.backends import Backend
from sdgate.config import Settings
from sdgate.errors import Conflict, NotReady
from sdgate.jobs import JobRunner, LiveJob
from sdgate.jobstore import JobRecord, JobStore
from sdgate.metrics import Metrics
from sdgate.schemas import GenerationParams, JobStatus
from sdgate.storage import Storage

if TYPE_CHECKING:
    from mypy_boto3_lambda import LambdaClient

log = logging.getLogger("sdgate.aws")

WORKER_EVENT_KEY = "sdgate_job"
"""A worker event is ``{"sdgate_job": "<job id>"}``."""


class LambdaInvoker:
    """Hands a job to the worker function: one asynchronous invocation (``InvocationType=Event``).

    The Lambda service's URL comes from ``AWS_ENDPOINT_URL_LAMBDA`` when set, as boto3 does.
    """

    def __init__(self, function: str, client: LambdaClient | None = None):
        self.function = function
        self._client = client

    def __call__(self, job_id: str) -> None:
        if self._client is None:
            import boto3
            from botocore.config import Config

            # Retried: a duplicate event is harmless, the worker claims the job once.
            config = Config(connect_timeout=5, read_timeout=10, retries={"total_max_attempts": 3, "mode": "standard"})
            self._client = boto3.client("lambda", config=config)
        self._client.invoke(
            FunctionName=self.function,
            InvocationType="Event",
            Payload=json.dumps({WORKER_EVENT_KEY: job_id}).encode(),
        )


class LambdaJobRunner(JobRunner):
    """The job runner of both invocations: the API one (records, dispatches, waits) and the worker one."""

    # Between the answer and API Gateway's (or the Lambda's) own limit: time to answer, and to spare.
    DEADLINE_MARGIN_S = 2.0

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        storage: Storage,
        store: JobStore,
        metrics: Metrics | None = None,
        dispatch: Callable[[str], None] | None = None,
    ):
        super().__init__(settings, backend, storage, store, metrics)
        if dispatch is None:
            if not settings.worker_function:
                raise ValueError("jobs on AWS Lambda need SDGATE_WORKER_FUNCTION (the worker function's name)")
            dispatch = LambdaInvoker(settings.worker_function)
        self._dispatch = dispatch
        self.deadline: float | None = None
        """``time.monotonic()`` by which the current API invocation must answer; set per invocation."""

    async def start(self) -> None:
        # No recovery and no retention sweep here: unfinished jobs belong to their workers, and
        # DynamoDB's TTL and the bucket's lifecycle rule remove old jobs and images.
        self._loop = asyncio.get_running_loop()

    def set_deadline(self, remaining_ms: int | None) -> None:
        """The invocation's remaining time (from the Lambda context), or None for no limit."""
        self.deadline = (
            None if remaining_ms is None else time.monotonic() + remaining_ms / 1000 - self.DEADLINE_MARGIN_S
        )

    # -- the API invocation ---------------------------------------------------------------------

    def _schedule(self, record: JobRecord, params: GenerationParams) -> LiveJob | JobRecord:
        try:
            self._dispatch(record.id)
        except Exception as e:
            # Recorded but never handed over: it ends as a clear failure, not as a job queued forever.
            log.error("could not hand job %s to a worker", record.id, exc_info=e)
            record.status, record.finished = JobStatus.failed, time.time()
            record.error = {"type": "not_ready", "message": "no worker could take the job; retry"}
            self.store.save(record)
            raise NotReady("no worker could take the job; retry", headers={"Retry-After": "5"}) from None
        log.info("job %s handed to a worker", record.id)
        return record

    async def wait(self, job: LiveJob | JobRecord, timeout: float) -> bool:
        """Poll the record until the job ends (True) or the timeout or this invocation's deadline (False).

        ``job`` is brought up to date in place, as the routes view it after waiting.
        """
        if isinstance(job, LiveJob):
            return await super().wait(job, timeout)
        end = time.monotonic() + timeout
        if self.deadline is not None:
            end = min(end, self.deadline)
        delay = 0.05
        while not job.status.is_terminal():
            now = time.monotonic()
            if now >= end:
                return False
            await asyncio.sleep(min(delay, end - now))
            delay = min(delay * 1.5, 0.5)
            fresh = await asyncio.to_thread(self.store.get, job.id)
            if fresh is not None:
                _update(job, fresh)
        return True

    def find(self, job_id: str, owner: str | None = None) -> LiveJob | JobRecord:
        job = super().find(job_id, owner)
        stale = isinstance(job, JobRecord) and time.time() - job.created > self.settings.worker_timeout_s
        if isinstance(job, JobRecord) and stale and not job.status.is_terminal():
            # Its worker timed out or crashed (Lambda does not retry it): say so rather than "running" forever.
            job.status, job.finished = JobStatus.failed, time.time()
            job.error = {"type": "interrupted", "message": "the job's worker stopped before it finished"}
            self.store.save(job)
        return job

    def cancel(self, job_id: str, owner: str | None = None) -> LiveJob | JobRecord:
        """Mark the record canceled: a worker that has not claimed it yet skips it, one that has discards its images."""
        job = self.find(job_id, owner)
        if isinstance(job, LiveJob):
            return super().cancel(job_id, owner)
        if job.status.is_terminal():
            raise Conflict(f"job {job_id} already {job.status.value}; nothing to cancel")
        job.status, job.finished = JobStatus.canceled, time.time()
        job.error = {"type": "canceled", "message": "canceled by request"}
        self.store.save(job)
        return job

    # -- the worker invocation ------------------------------------------------------------------

    async def run_job(self, job_id: str) -> JobRecord | None:
        """Claim and run one job to its end; None when it is not queued (run already, or canceled)."""
        record = await asyncio.to_thread(self.store.claim, job_id, time.time())
        if record is None:
            log.info("job %s is not queued (run already, canceled or gone): nothing to do", job_id)
            return None
        return await self.run(record)

    def _finish(self, job: LiveJob, status: JobStatus, error: dict[str, Any] | None = None) -> None:
        if status == JobStatus.succeeded and not job.record.status.is_terminal():
            stored = self.store.get(job.record.id)
            if stored is not None and stored.status == JobStatus.canceled:
                # Canceled through the API while it ran: it stays canceled, and its images go.
                for image in job.record.images:
                    key = image.get("key")
                    if key:
                        self.storage.delete(key)
                        self.storage.delete(key.rsplit(".", 1)[0] + ".json")
                job.record.images = []
                status, error = JobStatus.canceled, stored.error
        super()._finish(job, status, error)


def _update(record: JobRecord, fresh: JobRecord) -> None:
    for f in dataclasses.fields(JobRecord):
        setattr(record, f.name, getattr(fresh, f.name))
