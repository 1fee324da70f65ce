"""The job runner: every generation, sync or async, is a durable job that runs backend → encode → store.

The middle layer between the generation service and the backend. It records and queues jobs, has
its dispatcher run them, runs them here (with a bound on the queue and on remote calls in flight),
answers reads, cancels, and follows events. Status changes belong to :class:`~sdgate.jobs.lifecycle.Job`.

Invariants:
- a job is recorded before it is acknowledged, and every recorded job reaches a terminal state,
  also across a crash and restart;
- its images are stored before it says ``succeeded``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sdgate.backends import Backend, BackendState
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
from sdgate.handoff import Handoff
from sdgate.imaging import ImageInputs, preview_jpeg
from sdgate.jobs.dispatch import Dispatcher, InProcess
from sdgate.jobs.events import TERMINAL_EVENTS, Event
from sdgate.jobs.inputs import delete_inputs, load_inputs, store_inputs
from sdgate.jobs.lifecycle import Job, Lifecycle, Output
from sdgate.jobs.outputs import delete_images, store_images
from sdgate.jobs.recovery import recover, resume, webhook_window
from sdgate.jobs.retention import retention_loop
from sdgate.jobs.webhooks import WebhookNotAllowed, check_url, deliver
from sdgate.jobstore import JobRecord, JobStore, SharedJobStore
from sdgate.metrics import Metrics
from sdgate.schemas import (
    ErrorInfo,
    GenerationParams,
    GenerationResponse,
    GenerationResult,
    JobParams,
    JobStatus,
    Previews,
    Progress,
    Surface,
    Timings,
    WebhookState,
)
from sdgate.storage import Storage

log = logging.getLogger("sdgate.jobs")


def request_hash(body: dict[str, Any]) -> str:
    """Fingerprint of a request body, for idempotency: same key + same body → same job."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class JobRunner:
    """Accepts, runs, tracks and finishes jobs."""

    # Between the answer and API Gateway's (or the Lambda's) own limit: time to answer, and to spare.
    DEADLINE_MARGIN_S = 2.0

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        storage: Storage,
        store: JobStore,
        metrics: Metrics | None = None,
        dispatcher: Dispatcher | None = None,
    ):
        self.settings = settings
        self.backend = backend
        self.storage = storage
        self.store = store
        self.metrics = metrics or Metrics()
        self.dispatcher = dispatcher or InProcess()
        self.lifecycle = Lifecycle(store=store, metrics=self.metrics, describe=self.view, ended=self._ended)
        self.deadline: float | None = None
        """``time.monotonic()`` by which the current request must be answered (AWS Lambda); None: no limit."""
        self._live: dict[str, Job] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        # Storing has threads of its own, one per image of a full batch: a batch's fsyncs are then all in
        # flight at once (the filesystem commits them together) instead of waiting for the default
        # executor's few threads, which every other to_thread call shares.
        self._storer = ThreadPoolExecutor(max(4, settings.max_batch_size), thread_name_prefix="sdgate-store")
        self._recent_ms: list[float] = []
        self._closing = False
        self._handoff: Handoff | None = None
        """Brings progress and previews from the engine's thread to the event loop, one wake-up for many."""
        self.shared: SharedJobStore | None = store if isinstance(store, SharedJobStore) else None
        """The store, when other API nodes share it (PostgreSQL): this node then leases its jobs."""

    # -- start and stop -------------------------------------------------------------------------

    async def start(self, *, recover_jobs: bool = True) -> None:
        """Recover what a previous process left unfinished, then start the retention sweep.

        Only where jobs run in this process; the CLI passes ``recover_jobs=False``: a server sharing
        its data directory may be running those jobs right now.
        """
        if not self.dispatcher.in_process or not recover_jobs:
            # On Lambda unfinished jobs belong to their workers, and DynamoDB's TTL and the bucket's
            # lifecycle rule remove old jobs and images.
            return
        recover(self)
        if self.settings.retention_s:
            self._spawn(retention_loop(self.store, self.storage, self.settings.retention_s))
        if self.shared is not None:
            self._spawn(self._node_loop(self.shared))

    # -- one node among several -----------------------------------------------------------------

    async def _node_loop(self, shared: SharedJobStore) -> None:
        """With a shared store: renew this node's lease and report its jobs' progress (every second, or a
        third of the lease when shorter); stop what other nodes canceled or took over; and every third
        of the lease, take over what nodes that are gone left behind."""
        beat_s = min(1.0, shared.lease_s / 3)
        sweep_s = shared.lease_s / 3
        last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(beat_s)
            live = {j.id: j.step for j in self._live.values() if j.local and not j.status.is_terminal()}
            try:
                report = await asyncio.to_thread(shared.heartbeat, live)
            except Exception as e:  # the database is away for a moment: the lease lasts a while yet
                log.warning("node %s: heartbeat failed: %s", shared.node_id, e)
                continue
            for record in report.canceled.values():
                self._canceled_by_another_node(record)
            for job_id in report.lost:
                self._lost_to_another_node(job_id)
            if time.monotonic() - last_sweep < sweep_s:
                continue
            last_sweep = time.monotonic()
            try:
                unfinished = await asyncio.to_thread(shared.unfinished)
                finished = await asyncio.to_thread(shared.finished_since, time.time() - webhook_window(self))
            except Exception as e:
                log.warning("node %s: taking over failed: %s", shared.node_id, e)
                continue
            if unfinished or finished:
                log.info(
                    "node %s takes over %d unfinished job(s) of nodes that are gone", shared.node_id, len(unfinished)
                )
            resume(self, unfinished, finished)

    def _canceled_by_another_node(self, record: JobRecord) -> None:
        """Canceled through another node while it runs here: stop it; its record says canceled already
        (that node counted it and sends its webhook)."""
        job = self._live.get(record.id)
        if job is None or job.status.is_terminal():
            return
        job.cancel_requested.set()
        job.adopt(record)
        job.publish(record.status.value)
        self._live.pop(job.id, None)

    def _lost_to_another_node(self, job_id: str) -> None:
        """Another node took this job over (this one's lease had run out): stop it, write nothing more."""
        job = self._live.pop(job_id, None)
        if job is None:
            return
        log.warning("job %s was taken over by another node; stopping it here", job_id)
        job.detach()

    async def close(self, grace_s: float = 30.0) -> None:
        """Graceful stop: take no new work, let running jobs finish (up to ``grace_s``), leave the rest.

        Queued jobs stay ``queued`` in the store and running ones that outlast the grace period stay
        ``running``; the next start recovers both.
        """
        self._closing = True
        for job in self._live.values():
            if job.status == JobStatus.queued:
                job.cancel_requested.set()  # the engine drops it; _execute leaves the record queued
        running = [asyncio.ensure_future(j.done.wait()) for j in self._live.values() if j.status == JobStatus.running]
        if running:
            log.info("waiting up to %.0f s for %d running job(s)", grace_s, len(running))
            await asyncio.wait(running, timeout=grace_s)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._storer.shutdown(wait=False)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def set_deadline(self, remaining_ms: int | None) -> None:
        """The time left to answer the current request (from the Lambda context), or None for no limit."""
        self.deadline = (
            None if remaining_ms is None else time.monotonic() + remaining_ms / 1000 - self.DEADLINE_MARGIN_S
        )

    # -- accepting ------------------------------------------------------------------------------

    def queued_count(self) -> int:
        return sum(1 for j in self._live.values() if j.status == JobStatus.queued)

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

    def check_capacity(self, jobs: int = 1) -> None:
        """Refuse, before anything is charged or recorded, what the queue cannot take."""
        if self._closing:
            raise NotReady("the server is shutting down; retry on another instance", headers={"Retry-After": "5"})
        if self.queued_count() + jobs > self.settings.queue_size:
            raise Busy(
                f"the queue is full ({self.settings.queue_size} jobs waiting); retry later",
                headers={"Retry-After": self._retry_after()},
            )

    def find_idempotent(self, owner: str | None, key: str, body_hash: str | None) -> Job | None:
        """The job an earlier request with this Idempotency-Key made; 422 when its body was another."""
        record = next(
            (j.record for j in self._live.values() if j.record.idempotency_key == key and j.record.owner == owner),
            None,
        ) or self.store.by_idempotency_key(owner, key)
        return None if record is None else self._idempotent(record, body_hash)

    async def keep_inputs(self, params: GenerationParams, inputs: ImageInputs | None) -> GenerationParams:
        """Store a request's input images (before its job is recorded); ``params`` with their keys."""
        if inputs is None:
            return params
        return await asyncio.to_thread(store_inputs, self.storage, params, inputs)

    def submit(
        self,
        params: GenerationParams,
        *,
        surface: Surface,
        inputs: ImageInputs | None = None,
        owner: str | None = None,
        idempotency_key: str | None = None,
        body_hash: str | None = None,
        webhook_url: str | None = None,
        base_url: str | None = None,
        user: str | None = None,
        previews: bool = False,
    ) -> tuple[Job, bool]:
        """Record the job and have it run. Returns (job, created); an idempotent repeat returns the first job.

        The store's insert finds the first job of an Idempotency-Key (atomically, also in a race); the
        generation service looks for it earlier still, before the key is charged. ``inputs`` are the
        decoded images that ``params`` refer to (stored by :meth:`keep_inputs`), kept for the run.
        """
        try:
            self.check_capacity()
        except SdgateError:
            delete_inputs(self.storage, params)
            raise
        record = JobRecord(
            id=uuid.uuid4().hex,
            status=JobStatus.queued,
            created=time.time(),
            params=params,
            model=params.model or self.backend.model_name,
            surface=surface,
            owner=owner,
            user=user,
            idempotency_key=idempotency_key,
            request_hash=body_hash,
            webhook=WebhookState(url=webhook_url) if webhook_url else None,
            base_url=base_url,
        )
        stored = self.store.insert(record)
        if stored.id != record.id:  # the key's first job (or a race with the same key, lost)
            delete_inputs(self.storage, params)
            return self._idempotent(stored, body_hash), False
        job = self.adopt(record, local=self.dispatcher.in_process)
        job.inputs = inputs
        job.wants_previews = previews
        try:
            self.dispatcher.run(job.id, lambda: self.schedule(job))
        except Exception as e:
            # Recorded but never handed over: it ends as a clear failure, not as a job queued forever.
            log.error("could not hand job %s to a worker", job.id, exc_info=e)
            job.fail(ErrorInfo(type="not_ready", message="no worker could take the job; retry"))
            raise NotReady("no worker could take the job; retry", headers={"Retry-After": "5"}) from None
        return job, True

    def adopt(self, record: JobRecord, *, local: bool = True) -> Job:
        """A :class:`Job` for ``record``; a local one is tracked in memory until it has ended."""
        job = Job(record, self.lifecycle, local=local)
        if local:
            self._live[record.id] = job
        return job

    def schedule(self, job: Job) -> None:
        """Run a recorded job as a task of this process."""
        self._spawn(self._execute(job))

    def _idempotent(self, record: JobRecord, body_hash: str | None) -> Job:
        if record.request_hash is not None and body_hash is not None and record.request_hash != body_hash:
            raise InvalidRequest(
                "Idempotency-Key was already used with a different request body", field="Idempotency-Key"
            )
        return self._job(record)

    def _job(self, record: JobRecord) -> Job:
        """The job of ``record``: the one in memory when it lives here, else one over the record."""
        return self._live.get(record.id) or Job(record, self.lifecycle, local=False)

    # -- reading --------------------------------------------------------------------------------

    def find(self, job_id: str, owner: str | None = None) -> Job:
        """The job; another owner's job is 404, exactly like a missing one.

        A job that runs elsewhere and has outlived ``SDGATE_WORKER_TIMEOUT_S`` lost its worker (a
        Lambda worker that timed out or crashed is not retried): it is ended as interrupted.
        """
        job = self._live.get(job_id)
        if job is None:
            record = self.store.get(job_id)
            job = None if record is None else self._job(record)
        if job is None or (owner is not None and job.record.owner != owner):
            raise NotFound(f"no job {job_id!r}")
        # (With a shared store, other nodes' jobs are theirs: a node that is gone is taken over instead.)
        lost = time.time() - job.record.created > self.settings.worker_timeout_s and self.shared is None
        if not job.local and not job.status.is_terminal() and lost:
            job.interrupt("the job's worker stopped before it finished")
        return job

    def live_jobs(self, *, owner: str | None) -> list[Job]:
        """The unfinished jobs in this process, oldest first: ``owner``'s, or everyone's when None."""
        jobs = [j for j in self._live.values() if not j.status.is_terminal()]
        if owner is not None:
            jobs = [j for j in jobs if j.record.owner == owner]
        return sorted(jobs, key=lambda j: j.record.created)

    def list_jobs(self, *, owner: str | None, limit: int, before: float | None) -> list[GenerationResponse]:
        records = self.store.list_jobs(owner=owner, limit=limit, before=before)
        return [self.view(self._job(r)) for r in records]

    def image_bytes(self, job: Job) -> list[bytes]:
        """A finished job's stored image files: from memory when it ran here, else read from storage."""
        if len(job.outputs) == len(job.record.images):
            return [o.data for o in job.outputs]
        return [self.storage.get(img.key) for img in job.record.images]  # run by a worker elsewhere

    def view(self, job: Job) -> GenerationResponse:
        """The public form of a job: record fields, plus live progress and queue position."""
        record = job.record
        progress = Progress(step=job.step, total_steps=job.total_steps, loading=job.loading)
        queue_position = None
        if not job.local or record.status.is_terminal():
            progress.eta_ms = 0 if record.status.is_terminal() else None
        elif record.status == JobStatus.running and record.started and job.step:
            per_step = (time.time() - record.started) * 1000 / job.step
            progress.eta_ms = round(per_step * (progress.total_steps - job.step), 1)
        elif record.status == JobStatus.queued:
            queue_position = sum(
                1 for o in self._live.values() if o.status == JobStatus.queued and o.record.created < record.created
            )
        return GenerationResponse(
            id=record.id,
            status=record.status,
            model=record.model,
            loras=list(record.params.loras),
            surface=record.surface,
            user=record.user,
            params=JobParams.of(record.params),
            created=int(record.created),
            images=[img.public() for img in record.images],
            timings=record.timings or Timings(),
            progress=progress,
            queue_position=queue_position,
            started=record.started,
            finished=record.finished,
            error=record.error,
            webhook=record.webhook.public() if record.webhook else None,
        )

    # -- control --------------------------------------------------------------------------------

    def cancel(self, job_id: str, owner: str | None = None) -> Job:
        """Cancel a queued job (ends at once) or a running one (stops at the next step).

        A job that runs elsewhere is canceled in its record: a worker that has not claimed it skips
        it, one that has discards its images.
        """
        job = self.find(job_id, owner)
        if job.status.is_terminal():
            raise Conflict(f"job {job_id} already {job.status.value}; nothing to cancel")
        job.cancel_requested.set()
        if job.status == JobStatus.queued or not job.local:
            job.cancel()  # a queued one is dropped by the backend when it reaches it
        return job

    async def wait(self, job: Job, timeout: float) -> bool:
        """Wait until the job is terminal; False on timeout or past the request's deadline (the job goes on).

        A job that runs elsewhere is followed in the store, and ``job`` is brought up to date in place.
        """
        end = time.monotonic() + timeout
        if self.deadline is not None:
            end = min(end, self.deadline)
        if job.local:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.done.wait(), max(0.0, end - time.monotonic()))
            return job.status.is_terminal()
        delay = 0.05
        while not job.status.is_terminal():
            now = time.monotonic()
            if now >= end:
                return False
            await asyncio.sleep(min(delay, end - now))
            delay = min(delay * 1.5, 0.5)
            fresh = await asyncio.to_thread(self.store.get, job.id)
            if fresh is not None:
                job.adopt(fresh)
        return True

    async def events(self, job_id: str, owner: str | None = None, *, previews: bool = False) -> AsyncIterator[Event]:
        """The job's events from now on, starting with its current state, ending with the terminal one.

        ``previews``: live previews come as ``progress`` events with ``preview``, a ``data:`` URL of a JPEG
        (without it they are not sent, and not made for this subscriber).
        """
        job = self.find(job_id, owner)
        if not job.local and self.shared is not None and not job.status.is_terminal():
            async for event in self._events_elsewhere(job):
                yield event
            return
        if not job.local or job.status.is_terminal():
            yield Event(job.status.value, self.view(job).model_dump(mode="json"))
            return
        queue: asyncio.Queue[Event] = asyncio.Queue()
        job.subscribers.add(queue)
        job.preview_listeners += previews
        try:
            first = "queued" if job.status == JobStatus.queued else "loading" if job.loading else "started"
            yield Event(first, self.view(job).model_dump(mode="json"))
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=15)
                except TimeoutError:
                    yield Event("", {})  # keep-alive comment
                    continue
                if event.name == "preview":
                    if previews and job.preview is not None:
                        url = "data:image/jpeg;base64," + base64.b64encode(job.preview).decode("ascii")
                        yield Event("progress", {**event.data, "preview": url})
                    continue
                yield event
                if event.name in TERMINAL_EVENTS:
                    return
        finally:
            job.subscribers.discard(queue)
            job.preview_listeners -= previews

    async def _events_elsewhere(self, job: Job, poll_s: float = 0.25) -> AsyncIterator[Event]:
        """The events of a job another node runs, from its record (its step as of that node's heartbeat)."""
        seen = (job.status, job.step)
        yield Event("queued" if job.status == JobStatus.queued else "started", self.view(job).model_dump(mode="json"))
        quiet = 0.0
        while True:
            await asyncio.sleep(poll_s)
            fresh = await asyncio.to_thread(self.store.get, job.id)
            if fresh is None:
                return
            job.adopt(fresh)
            now = (job.status, job.step)
            if now == seen:
                quiet += poll_s
                if quiet >= 15:
                    quiet = 0.0
                    yield Event("", {})  # keep-alive comment
                continue
            quiet = 0.0
            name = (
                job.status.value
                if job.status.is_terminal()
                else "started"
                if seen[0] == JobStatus.queued
                else "progress"
            )
            seen = now
            yield Event(name, self.view(job).model_dump(mode="json"))
            if job.status.is_terminal():
                return

    async def wait_ready(self, timeout: float) -> None:
        """Hold a request that arrives while the model is still loading, rather than refusing it."""
        deadline = time.monotonic() + timeout
        while (state := self.backend.state()) is not BackendState.ready:
            if state is BackendState.failed or time.monotonic() > deadline:
                raise NotReady(f"not ready: {self.backend.status_detail()}", headers={"Retry-After": "5"})
            await asyncio.sleep(0.05)

    # -- running --------------------------------------------------------------------------------

    async def run_claimed(self, job_id: str) -> JobRecord | None:
        """A worker's part: claim one queued job and run it to its end here, webhook included.

        None when it is not queued (run already, canceled, or gone): a job handed over twice runs once.
        """
        record = await asyncio.to_thread(self.store.claim, job_id, time.time())
        if record is None:
            log.info("job %s is not queued (run already, canceled or gone): nothing to do", job_id)
            return None
        job = self.adopt(record)
        already = set(self._tasks)
        await self._execute(job, claimed=True)
        # Its webhook delivery too: a Lambda worker is frozen once it returns.
        await asyncio.gather(*(self._tasks - already), return_exceptions=True)
        return job.record

    async def deliver_webhook(self, job_id: str) -> None:
        """A worker's part: deliver the webhook of a job that ended elsewhere, if it is still owed."""
        record = await asyncio.to_thread(self.store.get, job_id)
        if record is None or record.webhook is None or record.webhook.delivered is not None:
            return
        await self._send_webhook(Job(record, self.lifecycle, local=False))

    def _progress(self, job: Job, step: int, total: int) -> None:
        """Called on the engine thread; state changes and events happen on the event loop.

        A step of a job nobody subscribed to is only a number to read: it is set here, without waking
        the loop. Each wake-up takes the GIL and a core from the pipeline's threads while they compute;
        at 4 steps of 64x64 that was one wake-up per step of a call of ~50 ms. The start (step 0, a
        status change) and the loading phase always go through the loop.
        """
        assert self._handoff is not None
        if step > 0 and not job.subscribers and job.status is JobStatus.running:
            job.note_step(step, total)
            return
        self._handoff.post(job.advance, step, total)

    def _previews(self, job: Job) -> Previews | None:
        if not self.settings.preview_every:
            return None

        def send(_step: int, image: Any) -> None:  # on the engine thread: encoded there, kept on the loop
            data = preview_jpeg(image)
            assert self._handoff is not None
            self._handoff.post(job.set_preview, data)

        return Previews(wanted=job.previews_wanted, send=send)

    async def _execute(self, job: Job, *, claimed: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if self._handoff is None or self._handoff.loop is not loop:
            self._handoff = Handoff(loop)
        try:
            await self.wait_ready(timeout=self.settings.backend_timeout_s)
            # The local engine says when a task leaves its queue (progress step 0), so a job shows
            # `queued` until then; a remote call starts at once, within the bound on calls in flight.
            reports_start = getattr(self.backend, "reports_start", False)
            async with contextlib.nullcontext() if reports_start else self._slots:
                if job.status.is_terminal() or (self._closing and job.status == JobStatus.queued):
                    return  # ended already, or never started before the shutdown: stays queued for the next start
                if not reports_start:
                    job.start()
                t0 = time.perf_counter()
                inputs = job.inputs
                if inputs is None and job.params.image_key is not None:  # recovered, or run by a worker
                    inputs = await asyncio.to_thread(load_inputs, self.storage, job.params, self.settings.max_pixels)
                progress = functools.partial(self._progress, job)
                store = functools.partial(self._store, job)
                generate_then = getattr(self.backend, "generate_then", None)
                if generate_then is not None:  # the local engine: it hands the images to storing itself
                    result, stored = await generate_then(
                        job.params,
                        store,
                        self._storer,
                        progress,
                        job.cancel_requested,
                        inputs=inputs,
                        previews=self._previews(job),
                    )
                else:
                    result = await self.backend.generate(
                        job.params, progress, job.cancel_requested, inputs=inputs, previews=self._previews(job)
                    )
                    stored = None
            if job.status.is_terminal():  # canceled while it finished
                if stored is not None:
                    await loop.run_in_executor(self._storer, delete_images, self.storage, [o.image for o in stored[0]])
                return
            job.start()
            if stored is None:
                stored = await loop.run_in_executor(self._storer, store, result)
                if stored is None:  # canceled or handed to another node meanwhile: nothing was stored
                    return
            outputs, encode_ms, store_ms = stored
            if (claimed or self.shared is not None) and self._canceled_elsewhere(job):
                delete_images(self.storage, [o.image for o in outputs])
                return
            self._recent_ms = [*self._recent_ms[-19:], (time.perf_counter() - t0) * 1000]
            self.metrics.batch_images.observe(result.batch_images)
            timings = Timings(
                queue=round(result.queue_ms, 2),
                inference=round(result.inference_ms, 2),
                encode=round(encode_ms, 2),
                store=round(store_ms, 2),
            )
            job.succeed(outputs, timings)
        except asyncio.CancelledError:
            raise  # shutdown: the record stays queued/running and is recovered at next start
        except SdgateError as e:
            if self._closing and job.status == JobStatus.queued:
                return  # dropped by the shutdown, not by the user: stays queued for the next start
            if (claimed or self.shared is not None) and self._canceled_elsewhere(job):
                return
            if e.type == "canceled":
                job.cancel(ErrorInfo(type=e.type, message=e.message))
            else:
                job.fail(ErrorInfo(type=e.type, message=e.message, retry_after=e.headers.get("Retry-After")))
        except Exception as e:
            error_id = new_error_id()
            log.error("job %s failed unexpectedly (error id %s)", job.id, error_id, exc_info=e)
            if (claimed or self.shared is not None) and self._canceled_elsewhere(job):
                return
            err = GenerationFailed(f"internal error; reference {error_id} in the server log")
            job.fail(ErrorInfo(type=err.type, message=err.message))

    def _store(self, job: Job, result: GenerationResult) -> tuple[list[Output], float, float] | None:
        """On a storing thread: encode and store the job's images; None, storing nothing, once it is canceled."""
        if job.cancel_requested.is_set():
            return None
        return store_images(self.storage, job.id, job.record.model, job.params, result.images)

    def _canceled_elsewhere(self, job: Job) -> bool:
        """Canceled through the API while a worker ran it: it stays canceled (whatever the run's outcome)."""
        stored = self.store.get(job.id)
        if stored is None or stored.status != JobStatus.canceled:
            return False
        job.adopt(stored)
        self._live.pop(job.id, None)
        return True

    def _ended(self, job: Job) -> None:
        if job.record.webhook is None:
            self._live.pop(job.id, None)
            return
        if job.local or self.dispatcher.in_process:
            self.send_webhook(job)
        else:
            self.dispatcher.deliver(job.id, lambda: self.send_webhook(job))

    def send_webhook(self, job: Job) -> None:
        """Deliver the job's webhook as a task of this process."""
        self._spawn(self._send_webhook(job))

    async def _send_webhook(self, job: Job) -> None:
        try:
            webhook = job.record.webhook
            assert webhook is not None
            view = self.view(job)
            # The receiver is not the client: relative /images/ URLs get the base URL of the request.
            for img in view.images:
                if img.url.startswith("/") and job.record.base_url:
                    img.url = job.record.base_url.rstrip("/") + img.url
            attempts = await deliver(
                webhook.url,
                view.model_dump_json().encode(),
                secret=self.settings.webhook_secret,
                allow=self.settings.webhook_allow,
                max_attempts=self.settings.webhook_max_attempts,
                backoff_s=self.settings.webhook_backoff_s,
            )
            webhook.attempts = attempts
            webhook.delivered = bool(attempts) and 200 <= (attempts[-1].status or 0) < 300
            self.store.save(job.record)
        finally:
            self._live.pop(job.id, None)
