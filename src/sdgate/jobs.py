"""Jobs: every generation, sync or async, is a durable job that runs backend → encode → store.

The runner is the middle layer between transport (HTTP) and worker (backend). It owns the job
state machine (``queued → running → succeeded | failed | canceled``), the bounded queue, progress
events, cancel, webhooks, recovery after a crash and retention. A failed generation is data on
the job; the API decides how to show it.

Invariants:
- a job is recorded before it is acknowledged, and every recorded job reaches a terminal state,
  also across a crash and restart;
- its images are stored before it says ``succeeded``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from sdgate.backends import Backend
from sdgate.config import Settings
from sdgate.errors import (
    Busy,
    Conflict,
    GenerationFailed,
    InvalidRequest,
    NotFound,
    NotReady,
    SdgateError,
    new_error_id,
)
from sdgate.imaging import CONTENT_TYPES, EXTENSIONS, encode
from sdgate.jobstore import JobRecord, JobStore
from sdgate.metrics import Metrics
from sdgate.schemas import (
    ErrorInfo,
    GeneratedImage,
    GenerationParams,
    GenerationResponse,
    ImageResult,
    JobStatus,
    Progress,
    Timings,
    WebhookStatus,
)
from sdgate.storage import Storage, new_key
from sdgate.webhooks import WebhookNotAllowed, check_url, deliver

log = logging.getLogger("sdgate.jobs")

# A job that was running when the process died is run once more; a second interruption fails it.
MAX_ATTEMPTS = 2
# How far back a restart looks for finished jobs whose webhook was never delivered (or the
# retention window, when that is shorter).
WEBHOOK_RECOVERY_S = 24 * 3600.0


def request_hash(body: dict[str, Any]) -> str:
    """Fingerprint of a request body, for idempotency: same key + same body → same job."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def params_to_dict(params: GenerationParams) -> dict[str, Any]:
    d = dataclasses.asdict(params)
    d["seeds"] = list(params.seeds)
    return d


def params_from_dict(d: dict[str, Any]) -> GenerationParams:
    return GenerationParams(**{**d, "seeds": tuple(d["seeds"])})


@dataclass
class Event:
    """One server-sent event: its name and the job as JSON."""

    name: str
    data: dict[str, Any]

    def encode(self) -> bytes:
        return f"event: {self.name}\ndata: {json.dumps(self.data, separators=(',', ':'))}\n\n".encode()


@dataclass
class LiveJob:
    """A job while it is queued or running (and until its webhook is delivered)."""

    record: JobRecord
    params: GenerationParams
    cancel: threading.Event = field(default_factory=threading.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    step: int = 0
    total_steps: int = 0
    subscribers: set[asyncio.Queue[Event]] = field(default_factory=set)


class JobRunner:
    """Accepts, runs, tracks and finishes jobs."""

    def __init__(
        self, settings: Settings, backend: Backend, storage: Storage, store: JobStore, metrics: Metrics | None = None
    ):
        self.settings = settings
        self.backend = backend
        self.storage = storage
        self.store = store
        self.metrics = metrics or Metrics()
        self._live: dict[str, LiveJob] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self._recent_ms: list[float] = []
        self._closing = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous process left unfinished, then start the retention sweep."""
        self._loop = asyncio.get_running_loop()
        self._recover()
        if self.settings.retention_s:
            self._spawn(self._retention_loop(self.settings.retention_s))

    async def close(self, grace_s: float = 30.0) -> None:
        """Graceful stop: take no new work, let running jobs finish (up to ``grace_s``), leave the rest.

        Queued jobs stay ``queued`` in the store and running ones that outlast the grace period stay
        ``running``; the next start recovers both.
        """
        self._closing = True
        for job in self._live.values():
            if job.record.status == JobStatus.queued:
                job.cancel.set()  # the engine drops it; _execute leaves the record queued
        running = [j.done.wait() for j in self._live.values() if j.record.status == JobStatus.running]
        if running:
            log.info("waiting up to %.0f s for %d running job(s)", grace_s, len(running))
            await asyncio.wait([asyncio.ensure_future(w) for w in running], timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # Whatever was still queued or running stays so in the store and is recovered at next start.

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _recover(self) -> None:
        for record in self.store.unfinished():
            if record.status == JobStatus.running and record.attempts >= MAX_ATTEMPTS:
                record.status = JobStatus.failed
                record.error = {
                    "type": "interrupted",
                    "message": "the server stopped twice while running this job; not retried again",
                }
                record.finished = time.time()
                self.store.save(record)
                log.warning("job %s interrupted twice; failed", record.id)
                continue
            record.status = JobStatus.queued
            self.store.save(record)
            live = LiveJob(record=record, params=params_from_dict(record.params))
            self._live[record.id] = live
            self._spawn(self._execute(live))
            log.info("job %s recovered and re-queued (attempts so far: %d)", record.id, record.attempts)
        self._recover_webhooks()

    def _recover_webhooks(self) -> None:
        """Deliver the webhooks of finished jobs whose delivery the previous process did not complete.

        ``webhook["delivered"]`` is written only when a delivery ends (delivered or out of attempts),
        so a webhook without it was owed when the process stopped.
        """
        window = min(WEBHOOK_RECOVERY_S, self.settings.retention_s or WEBHOOK_RECOVERY_S)
        for record in self.store.finished_since(time.time() - window):
            if not record.webhook or not record.webhook.get("url") or "delivered" in record.webhook:
                continue
            params = params_from_dict(record.params)
            live = LiveJob(record=record, params=params, step=record.step, total_steps=params.num_inference_steps)
            live.done.set()
            self._live[record.id] = live
            self._spawn(self._send_webhook(live))
            log.info("job %s: webhook delivery interrupted by a restart; delivering it now", record.id)

    # -- accepting ------------------------------------------------------------------------------

    def queued_count(self) -> int:
        return sum(1 for j in self._live.values() if j.record.status == JobStatus.queued)

    def _retry_after(self) -> str:
        avg_ms = sum(self._recent_ms) / len(self._recent_ms) if self._recent_ms else 1000.0
        waves = self.queued_count() / max(1, self.settings.max_batch_size)
        return str(max(1, round(avg_ms * waves / 1000)))

    def check_webhook(self, url: str | None) -> None:
        if url is None:
            return
        try:
            check_url(url, self.settings.webhook_allow)
        except WebhookNotAllowed as e:
            raise InvalidRequest(str(e), field="webhook_url") from None

    def submit(
        self,
        params: GenerationParams,
        *,
        owner: str | None = None,
        idempotency_key: str | None = None,
        body_hash: str | None = None,
        webhook_url: str | None = None,
        base_url: str | None = None,
    ) -> tuple[LiveJob | JobRecord, bool]:
        """Record and queue a job. Returns (job, created); an idempotent repeat returns the first job."""
        if self._closing:
            raise NotReady("the server is shutting down; retry on another instance", headers={"Retry-After": "5"})
        if idempotency_key is not None:
            existing = self._find_idempotent(owner, idempotency_key)
            if existing is not None:
                return self._idempotent(existing, body_hash), False
        if self.queued_count() >= self.settings.queue_size:
            raise Busy(
                f"the queue is full ({self.settings.queue_size} jobs waiting); retry later",
                headers={"Retry-After": self._retry_after()},
            )
        record = JobRecord(
            id=uuid.uuid4().hex,
            status=JobStatus.queued,
            created=time.time(),
            params=params_to_dict(params),
            model=self.backend.model_name,
            owner=owner,
            idempotency_key=idempotency_key,
            request_hash=body_hash,
            # No "delivered" until a delivery ends: its absence tells a restart that one is owed.
            webhook={"url": webhook_url, "attempts": []} if webhook_url else None,
            base_url=base_url,
        )
        stored = self.store.insert(record)
        if stored.id != record.id:  # lost a race with the same key
            return self._idempotent(stored, body_hash), False
        return self._schedule(record, params), True

    def _schedule(self, record: JobRecord, params: GenerationParams) -> LiveJob | JobRecord:
        """Start a freshly recorded job: here, as a task of this process (on Lambda: another invocation)."""
        live = LiveJob(record=record, params=params)
        self._live[record.id] = live
        self._spawn(self._execute(live))
        return live

    def _find_idempotent(self, owner: str | None, key: str) -> JobRecord | None:
        for live in self._live.values():
            if live.record.idempotency_key == key and live.record.owner == owner:
                return live.record
        return self.store.by_idempotency_key(owner, key)

    def _idempotent(self, record: JobRecord, body_hash: str | None) -> LiveJob | JobRecord:
        if record.request_hash is not None and body_hash is not None and record.request_hash != body_hash:
            raise InvalidRequest(
                "Idempotency-Key was already used with a different request body", field="Idempotency-Key"
            )
        return self._live.get(record.id, record)

    # -- reading --------------------------------------------------------------------------------

    def find(self, job_id: str, owner: str | None = None) -> LiveJob | JobRecord:
        """A live job or its record; another owner's job is 404, exactly like a missing one."""
        live = self._live.get(job_id)
        record = live.record if live is not None else self.store.get(job_id)
        if record is None or (owner is not None and record.owner != owner):
            raise NotFound(f"no job {job_id!r}")
        return live if live is not None else record

    def list_jobs(self, *, owner: str | None, limit: int, before: float | None) -> list[GenerationResponse]:
        records = self.store.list_jobs(owner=owner, limit=limit, before=before)
        return [self.view(self._live.get(r.id, r)) for r in records]

    def view(self, job: LiveJob | JobRecord) -> GenerationResponse:
        """The public form of a job: record fields, plus live progress and queue position."""
        record = job.record if isinstance(job, LiveJob) else job
        progress = Progress()
        queue_position = None
        if isinstance(job, LiveJob):
            progress = Progress(step=job.step, total_steps=job.total_steps or job.params.num_inference_steps)
            if record.status == JobStatus.running and record.started and job.step:
                per_step = (time.time() - record.started) * 1000 / job.step
                progress.eta_ms = round(per_step * (progress.total_steps - job.step), 1)
            if record.status == JobStatus.queued:
                queue_position = sum(
                    1
                    for o in self._live.values()
                    if o.record.status == JobStatus.queued and o.record.created < record.created
                )
        else:
            steps = int(record.params.get("num_inference_steps", 0))
            progress = Progress(step=record.step, total_steps=steps, eta_ms=0 if record.status.is_terminal() else None)
        return GenerationResponse(
            id=record.id,
            status=record.status,
            model=record.model,
            created=int(record.created),
            images=[ImageResult(**{k: v for k, v in img.items() if k != "key"}) for img in record.images],
            timings=Timings(**record.timings),
            progress=progress,
            queue_position=queue_position,
            started=record.started,
            finished=record.finished,
            error=ErrorInfo(type=record.error["type"], message=record.error["message"]) if record.error else None,
            webhook=WebhookStatus(**record.webhook) if record.webhook else None,
        )

    # -- control --------------------------------------------------------------------------------

    def cancel(self, job_id: str, owner: str | None = None) -> LiveJob | JobRecord:
        """Cancel a queued job (removed at once) or a running one (stops at the next step)."""
        job = self.find(job_id, owner)
        record = job.record if isinstance(job, LiveJob) else job
        if record.status.is_terminal() or not isinstance(job, LiveJob):
            raise Conflict(f"job {job_id} already {record.status.value}; nothing to cancel")
        job.cancel.set()
        if record.status == JobStatus.queued:
            # Not started: finish it now; the backend drops it when it reaches it.
            self._finish(job, JobStatus.canceled, error={"type": "canceled", "message": "canceled by request"})
        return job

    async def wait(self, job: LiveJob | JobRecord, timeout: float) -> bool:
        """Wait until the job is terminal; False on timeout (the job goes on)."""
        if not isinstance(job, LiveJob):
            return job.status.is_terminal()
        try:
            await asyncio.wait_for(job.done.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def events(self, job_id: str, owner: str | None = None) -> AsyncIterator[Event]:
        """The job's events from now on, starting with its current state, ending with the terminal one."""
        job = self.find(job_id, owner)
        if not isinstance(job, LiveJob) or job.record.status.is_terminal():
            record = job.record if isinstance(job, LiveJob) else job
            yield Event(record.status.value, self.view(job).model_dump(mode="json"))
            return
        queue: asyncio.Queue[Event] = asyncio.Queue()
        job.subscribers.add(queue)
        try:
            first = "queued" if job.record.status == JobStatus.queued else "started"
            yield Event(first, self.view(job).model_dump(mode="json"))
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=15)
                except TimeoutError:
                    yield Event("", {})  # keep-alive comment
                    continue
                yield event
                if event.name in ("succeeded", "failed", "canceled"):
                    return
        finally:
            job.subscribers.discard(queue)

    def _publish(self, job: LiveJob, name: str) -> None:
        if not job.subscribers:
            return
        event = Event(name, self.view(job).model_dump(mode="json"))
        for q in job.subscribers:
            q.put_nowait(event)

    async def wait_ready(self, timeout: float) -> None:
        """Hold a request that arrives while the model is still loading, rather than refusing it."""
        deadline = time.monotonic() + timeout
        while not self.backend.ready():
            detail = self.backend.status_detail()
            if "failed" in detail or time.monotonic() > deadline:
                raise NotReady(f"not ready: {detail}", headers={"Retry-After": "5"})
            await asyncio.sleep(0.05)

    # -- running --------------------------------------------------------------------------------

    async def run(self, record: JobRecord) -> JobRecord:
        """Run one recorded job to its end in this process, webhook included; returns its final record.

        For a worker handed a job that another process accepted (the AWS Lambda worker): the job
        skips the queue, and its record is expected to be claimed (running) already.
        """
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        live = LiveJob(record=record, params=params_from_dict(record.params))
        self._live[record.id] = live
        already = set(self._tasks)
        await self._execute(live)
        # Its webhook delivery too: a Lambda worker is frozen once it returns.
        await asyncio.gather(*(self._tasks - already), return_exceptions=True)
        return live.record

    def _mark_running(self, job: LiveJob) -> None:
        if job.record.status != JobStatus.queued:
            return
        job.record.status = JobStatus.running
        job.record.started = time.time()
        job.record.attempts += 1
        self.store.save(job.record)
        self._publish(job, "started")

    def _on_progress(self, job: LiveJob, step: int, total: int) -> None:
        """Called on the engine thread; state changes happen on the event loop."""
        assert self._loop is not None

        def apply() -> None:
            if job.record.status.is_terminal():
                return
            if job.record.status == JobStatus.queued:
                self._mark_running(job)
            job.step, job.total_steps = step, total
            if step > 0:
                self._publish(job, "progress")

        self._loop.call_soon_threadsafe(apply)

    async def _execute(self, job: LiveJob) -> None:
        try:
            await self.wait_ready(timeout=self.settings.backend_timeout_s)
            reports_start = getattr(self.backend, "reports_start", False)
            async with self._slots if not reports_start else _nullcontext():
                if job.record.status.is_terminal():
                    return
                if not reports_start:
                    self._mark_running(job)
                t0 = time.perf_counter()
                result = await self.backend.generate(job.params, lambda s, t: self._on_progress(job, s, t), job.cancel)
            if job.record.status.is_terminal():  # canceled while it finished
                return
            self._mark_running(job)
            encode_ms, store_ms, images = await asyncio.to_thread(self._encode_and_store, job, result.images)
            job.record.images = images
            job.record.timings = {
                "queue": round(result.queue_ms, 2),
                "inference": round(result.inference_ms, 2),
                "encode": round(encode_ms, 2),
                "store": round(store_ms, 2),
                "total": round((time.time() - job.record.created) * 1000, 2),
            }
            self._recent_ms = [*self._recent_ms[-19:], (time.perf_counter() - t0) * 1000]
            self.metrics.batch_images.observe(result.batch_images)
            job.step = job.total_steps = job.params.num_inference_steps
            self._finish(job, JobStatus.succeeded)
        except asyncio.CancelledError:
            raise  # shutdown: the record stays queued/running and is recovered at next start
        except SdgateError as e:
            if self._closing and job.record.status == JobStatus.queued:
                return  # dropped by the shutdown, not by the user: stays queued for the next start
            status = JobStatus.canceled if e.type == "canceled" else JobStatus.failed
            self._finish(job, status, error={"type": e.type, "message": e.message})
        except Exception as e:
            error_id = new_error_id()
            log.error("job %s failed unexpectedly (error id %s)", job.record.id, error_id, exc_info=e)
            err = GenerationFailed(f"internal error; reference {error_id} in the server log")
            self._finish(job, JobStatus.failed, error={"type": err.type, "message": err.message})

    def _finish(self, job: LiveJob, status: JobStatus, error: dict[str, Any] | None = None) -> None:
        if job.record.status.is_terminal():
            return
        job.record.status = status
        job.record.error = error
        job.record.step = job.step
        job.record.finished = time.time()
        if "total" not in job.record.timings:
            job.record.timings["total"] = round((job.record.finished - job.record.created) * 1000, 2)
        self.store.save(job.record)
        self.metrics.job_finished(
            status.value, job.record.timings, len(job.record.images), error["type"] if error else None
        )
        self._publish(job, status.value)
        job.done.set()
        if job.record.webhook:
            self._spawn(self._send_webhook(job))
        else:
            self._live.pop(job.record.id, None)

    async def _send_webhook(self, job: LiveJob) -> None:
        try:
            assert job.record.webhook is not None
            view = self.view(job)
            # The receiver is not the client: relative /images/ URLs get the base URL of the request.
            for img in view.images:
                if img.url.startswith("/") and job.record.base_url:
                    img.url = job.record.base_url.rstrip("/") + img.url
            body = view.model_dump_json().encode()
            attempts = await deliver(
                job.record.webhook["url"],
                body,
                secret=self.settings.webhook_secret,
                allow=self.settings.webhook_allow,
                max_attempts=self.settings.webhook_max_attempts,
                backoff_s=self.settings.webhook_backoff_s,
            )
            job.record.webhook["attempts"] = attempts
            job.record.webhook["delivered"] = bool(attempts) and 200 <= attempts[-1].get("status", 0) < 300
            self.store.save(job.record)
        finally:
            self._live.pop(job.record.id, None)

    def _encode_and_store(
        self, job: LiveJob, generated: list[GeneratedImage]
    ) -> tuple[float, float, list[dict[str, Any]]]:
        p = job.params
        encode_s = store_s = 0.0
        results = []
        for img in generated:
            t0 = time.perf_counter()
            # No job id in the file: the same request and seed give byte-identical images.
            meta = {**p.public(), "seed": img.seed, "model": job.record.model}
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
                {**meta, "job_id": job.record.id, "key": key, "content_type": content_type, "bytes": len(data)}
            ).encode()
            self.storage.put(sidecar, key.rsplit(".", 1)[0] + ".json", "application/json")
            t2 = time.perf_counter()
            encode_s += t1 - t0
            store_s += t2 - t1
            results.append(
                {
                    "url": stored.url,
                    "key": key,
                    "seed": img.seed,
                    "width": width,
                    "height": height,
                    "content_type": content_type,
                    "bytes": len(data),
                }
            )
        return encode_s * 1000, store_s * 1000, results

    # -- retention ------------------------------------------------------------------------------

    def sweep(self, max_age_s: float) -> int:
        """Delete terminal jobs older than ``max_age_s`` and their images; returns how many jobs went."""
        removed = 0
        cutoff = time.time() - max_age_s
        while True:
            old = self.store.older_than(cutoff)
            if not old:
                return removed
            for record in old:
                for img in record.images:
                    key = img.get("key")
                    if key:
                        self.storage.delete(key)
                        self.storage.delete(key.rsplit(".", 1)[0] + ".json")
            self.store.delete([r.id for r in old])
            removed += len(old)

    async def _retention_loop(self, max_age_s: float) -> None:
        interval = min(max(max_age_s / 10, 1.0), 3600.0)
        while True:
            try:
                n = await asyncio.to_thread(self.sweep, max_age_s)
                if n:
                    log.info("retention: removed %d old jobs and their images", n)
            except Exception:
                log.exception("retention sweep failed")
            await asyncio.sleep(interval)


class _nullcontext:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None
