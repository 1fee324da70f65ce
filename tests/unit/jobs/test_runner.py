"""The job runner over the fakes: submit → run → store, cancel, owners, dispatchers, workers, lost workers."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from PIL import Image

from sdgate.backends import BackendState
from sdgate.config import Settings
from sdgate.errors import BackendError, Busy, Canceled, Conflict, NotFound, NotReady, SdgateError
from sdgate.jobs import Dispatcher, Job, JobRunner
from sdgate.jobstore import JobStore
from sdgate.schemas import GenerationParams, GenerationResult, JobStatus, ProgressFn, Surface
from sdgate.storage import sidecar_key
from tests.fakes import FakeBackend, MemoryJobStore, MemoryStorage, RecordingDispatcher, params, record, seed_colour

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def runner(
    tmp_path: Path,
    backend: FakeBackend | None = None,
    *,
    store: MemoryJobStore | None = None,
    storage: MemoryStorage | None = None,
    dispatcher: Dispatcher | None = None,
    **settings_kw: Any,
) -> JobRunner:
    return JobRunner(
        Settings(data_dir=tmp_path, **settings_kw),
        backend or FakeBackend(),
        storage or MemoryStorage(),
        store or MemoryJobStore(),
        dispatcher=dispatcher,
    )


def stored_status(r: JobRunner, job_id: str) -> JobStatus | None:
    return stored_status_in(r.store, job_id)


def stored_status_in(store: JobStore, job_id: str) -> JobStatus | None:
    found = store.get(job_id)
    return None if found is None else found.status


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.005)


# -- running here -----------------------------------------------------------------------------------


def test_a_submitted_job_runs_and_succeeds_with_its_images_stored(tmp_path: Path) -> None:
    storage = MemoryStorage()
    r = runner(tmp_path, storage=storage)

    async def scenario() -> tuple[Job, bool]:
        job, created = r.submit(params(seed=3, seeds=(3, 4)), surface=Surface.native, owner="alice")
        assert created
        assert stored_status(r, job.id) == JobStatus.queued  # recorded before it is acknowledged
        return job, await r.wait(job, 5)

    job, ended = run(scenario())
    assert ended and job.status == JobStatus.succeeded
    saved = r.store.get(job.id)
    assert saved is not None and saved.status == JobStatus.succeeded
    assert (saved.surface, saved.owner, saved.model) == (Surface.native, "alice", "fake-model")
    assert [i.seed for i in saved.images] == [3, 4]
    for image, out in zip(saved.images, job.outputs, strict=True):
        data, content_type = storage.objects[image.key]
        assert (content_type, image.content_type, image.bytes) == ("image/png", "image/png", len(data))
        assert data == out.data
        assert image.url == f"/images/{image.key}"
        assert Image.open(io.BytesIO(data)).getpixel((0, 0)) == seed_colour(image.seed)
        sidecar_data, sidecar_type = storage.objects[sidecar_key(image.key)]
        sidecar = json.loads(sidecar_data)
        assert sidecar_type == "application/json"
        assert (sidecar["job_id"], sidecar["seed"], sidecar["key"]) == (job.id, image.seed, image.key)
        assert sidecar["prompt"] == "job 3"
    assert len(storage.objects) == 4
    assert saved.timings is not None and saved.timings.total > 0


def test_a_failing_backend_fails_the_job_with_its_error_type(tmp_path: Path) -> None:
    r = runner(tmp_path, FakeBackend(error=BackendError("the endpoint is down")))

    async def scenario() -> Job:
        job, _ = r.submit(params(), surface=Surface.native)
        await r.wait(job, 5)
        return job

    job = run(scenario())
    saved = r.store.get(job.id)
    assert saved is not None and saved.status == JobStatus.failed
    assert saved.error is not None
    assert (saved.error.type, saved.error.message) == ("backend_error", "the endpoint is down")
    assert saved.images == []


class CrashingBackend(FakeBackend):
    async def generate(
        self,
        params: GenerationParams,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        **_: object,
    ) -> GenerationResult:
        raise RuntimeError("a bug with a secret path /srv/x")


def test_an_unexpected_error_fails_the_job_opaquely(tmp_path: Path) -> None:
    r = runner(tmp_path, CrashingBackend())

    async def scenario() -> Job:
        job, _ = r.submit(params(), surface=Surface.native)
        await r.wait(job, 5)
        return job

    job = run(scenario())
    assert job.status == JobStatus.failed
    assert job.record.error is not None
    assert job.record.error.type == "generation_failed"
    assert "reference" in job.record.error.message and "/srv/x" not in job.record.error.message


# -- cancel and owners ------------------------------------------------------------------------------


def test_a_queued_job_is_canceled_at_once_and_a_second_cancel_is_409(tmp_path: Path) -> None:
    async def scenario() -> tuple[JobRunner, FakeBackend, Job]:
        backend = FakeBackend(hold=asyncio.Event())
        r = runner(tmp_path, backend)
        job, _ = r.submit(params(), surface=Surface.native)
        assert job.status == JobStatus.queued
        canceled = r.cancel(job.id)
        assert canceled is job
        assert canceled.status == JobStatus.canceled
        with pytest.raises(Conflict) as caught:
            r.cancel(job.id)
        assert caught.value.status == 409
        await asyncio.sleep(0.05)  # its task sees it ended and runs nothing
        return r, backend, job

    r, backend, job = run(scenario())
    assert backend.ran == []
    assert stored_status(r, job.id) == JobStatus.canceled
    assert job.record.error is not None and job.record.error.type == "canceled"


def test_a_running_job_stops_at_its_next_step_when_canceled(tmp_path: Path) -> None:
    async def scenario() -> tuple[JobRunner, Job]:
        r = runner(tmp_path, FakeBackend(hold=asyncio.Event()))
        job, _ = r.submit(params(), surface=Surface.native)
        await until(lambda: job.status == JobStatus.running)
        r.cancel(job.id)
        assert await r.wait(job, 5)
        return r, job

    r, job = run(scenario())
    assert job.status == stored_status(r, job.id) == JobStatus.canceled
    assert job.record.error is not None and job.record.error.type == "canceled"
    assert job.record.images == []


def test_another_owners_job_is_not_found(tmp_path: Path) -> None:
    async def scenario() -> None:
        r = runner(tmp_path)
        job, _ = r.submit(params(), surface=Surface.native, owner="alice")
        for act in (r.find, r.cancel):
            with pytest.raises(NotFound) as caught:
                act(job.id, "bob")
            assert caught.value.status == 404
        assert r.find(job.id, "alice") is job
        assert r.find(job.id) is job  # no owner: everything visible (auth off)
        with pytest.raises(NotFound):
            r.find("no-such-job")
        assert job.status == JobStatus.queued  # bob's cancel changed nothing
        await r.wait(job, 5)

    run(scenario())


def test_submit_beyond_the_queue_is_busy(tmp_path: Path) -> None:
    async def scenario() -> None:
        r = runner(tmp_path, FakeBackend(state=BackendState.loading), queue_size=2)
        first, _ = r.submit(params(), surface=Surface.native)
        second, _ = r.submit(params(), surface=Surface.native)
        assert [r.view(first).queue_position, r.view(second).queue_position] == [0, 1]
        with pytest.raises(Busy):
            r.submit(params(), surface=Surface.native)
        assert len(r.store.list_jobs(owner=None, limit=10, before=None)) == 2
        await r.close(0)

    run(scenario())


# -- jobs that run elsewhere ------------------------------------------------------------------------


def test_with_a_remote_dispatcher_a_job_is_recorded_queued_and_handed_over_not_run_here(tmp_path: Path) -> None:
    dispatcher = RecordingDispatcher()
    backend = FakeBackend()

    async def scenario() -> Job:
        r = runner(tmp_path, backend, dispatcher=dispatcher)
        job, created = r.submit(params(), surface=Surface.sagemaker)
        await asyncio.sleep(0.05)
        assert created and not job.local
        assert stored_status(r, job.id) == JobStatus.queued
        return job

    job = run(scenario())
    assert dispatcher.sent == [job.id]
    assert backend.ran == []
    assert job.status == JobStatus.queued


def test_a_job_no_worker_could_take_fails_as_not_ready(tmp_path: Path) -> None:
    store = MemoryJobStore()
    r = runner(tmp_path, store=store, dispatcher=RecordingDispatcher(error=RuntimeError("lambda is down")))
    with pytest.raises(NotReady) as caught:
        r.submit(params(), surface=Surface.native)
    assert caught.value.status == 503
    assert caught.value.headers["Retry-After"] == "5"
    [saved] = store.records.values()
    assert saved.status == JobStatus.failed
    assert saved.error is not None and saved.error.type == "not_ready"


def test_a_worker_claims_a_job_once(tmp_path: Path) -> None:
    store, storage, dispatcher, backend = MemoryJobStore(), MemoryStorage(), RecordingDispatcher(), FakeBackend()
    api = runner(tmp_path, store=store, storage=storage, dispatcher=dispatcher)
    worker = runner(tmp_path, backend, store=store, storage=storage)

    async def scenario() -> None:
        job, _ = api.submit(params(seed=5), surface=Surface.native)
        [job_id] = dispatcher.sent
        finished = await worker.run_claimed(job_id)
        assert finished is not None and finished.status == JobStatus.succeeded
        assert await worker.run_claimed(job_id) is None  # delivered twice: runs once
        assert await api.wait(job, 5)  # the API side follows the record
        assert job.status == JobStatus.succeeded
        assert [i.seed for i in job.record.images] == [5]

    run(scenario())
    assert len(backend.ran) == 1


def test_a_job_canceled_while_its_worker_ran_stays_canceled_and_its_images_go(tmp_path: Path) -> None:
    store, storage, dispatcher = MemoryJobStore(), MemoryStorage(), RecordingDispatcher()
    api = runner(tmp_path, store=store, storage=storage, dispatcher=dispatcher)

    async def scenario() -> None:
        hold = asyncio.Event()
        backend = FakeBackend(hold=hold)
        worker = runner(tmp_path, backend, store=store, storage=storage)
        job, _ = api.submit(params(), surface=Surface.native)
        running = asyncio.ensure_future(worker.run_claimed(job.id))
        await until(lambda: bool(backend.ran))
        assert stored_status(api, job.id) == JobStatus.running
        api.cancel(job.id)  # through the API, in the record: the worker does not know yet
        hold.set()
        final = await running
        assert final is not None and final.status == JobStatus.canceled

    run(scenario())
    saved = store.records
    assert [r.status for r in saved.values()] == [JobStatus.canceled]
    assert storage.objects == {}  # the images it stored went again


def test_a_remote_job_older_than_the_worker_timeout_is_failed_as_interrupted(tmp_path: Path) -> None:
    store = MemoryJobStore()
    r = runner(tmp_path, store=store, dispatcher=RecordingDispatcher(), worker_timeout_s=10)
    lost = record(JobStatus.running, created=time.time() - 11)
    recent = record(JobStatus.running, created=time.time() - 5)
    old_done = record(JobStatus.succeeded, created=time.time() - 100)
    for rec in (lost, recent, old_done):
        store.insert(rec)

    job = r.find(lost.id)
    assert job.status == stored_status(r, lost.id) == JobStatus.failed
    assert job.record.error is not None and job.record.error.type == "interrupted"
    assert r.find(recent.id).status == stored_status(r, recent.id) == JobStatus.running
    assert r.find(old_done.id).status == JobStatus.succeeded
    assert r.metrics.registry.get_sample_value("sdgate_jobs_total", {"status": "failed"}) == 1


def test_a_local_job_is_never_ended_for_its_age(tmp_path: Path) -> None:
    r = runner(tmp_path, worker_timeout_s=10)
    old = record(JobStatus.queued, created=time.time() - 100)
    r.store.insert(old)
    r.adopt(old)  # recovered into this process: it runs here
    assert r.find(old.id).status == JobStatus.queued


# -- shutdown and cancel races ----


class RemoteLikeBackend(FakeBackend):
    """Behaves as the remote backends do (sdgate.backends.remote): a call whose cancel flag is already set
    raises Canceled at once, and a failure comes when the held call is let go."""

    def __init__(self, *, fail_with: SdgateError | None = None, hold: asyncio.Event | None = None) -> None:
        super().__init__(hold=hold)
        self.fail_with = fail_with

    async def generate(
        self,
        params: GenerationParams,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        **_: object,
    ) -> GenerationResult:
        if cancel is not None and cancel.is_set():
            raise Canceled("the job was canceled")
        result = await super().generate(params, progress, cancel)
        if self.fail_with is not None:
            raise self.fail_with
        return result


def test_a_job_still_queued_when_the_server_stops_stays_queued_for_the_next_start(tmp_path: Path) -> None:
    store = MemoryJobStore()

    async def scenario() -> tuple[Job, Job]:
        hold = asyncio.Event()
        r = runner(tmp_path, RemoteLikeBackend(hold=hold), store=store, max_concurrency=1)
        running, _ = r.submit(params(seed=1), surface=Surface.native)
        waiting, _ = r.submit(params(seed=2), surface=Surface.native)  # waits for the one slot
        await until(lambda: running.status == JobStatus.running)
        assert waiting.status == JobStatus.queued
        closing = asyncio.ensure_future(r.close(grace_s=5))
        await asyncio.sleep(0.02)
        hold.set()  # the running job finishes within the grace period and frees its slot
        await closing
        return running, waiting

    running, waiting = run(scenario())
    assert stored_status_in(store, running.id) == JobStatus.succeeded
    # close(): "Queued jobs stay queued in the store ...; the next start recovers both."
    assert stored_status_in(store, waiting.id) == JobStatus.queued


def test_a_job_canceled_while_its_worker_ran_stays_canceled_when_the_worker_then_fails(tmp_path: Path) -> None:
    store, storage, dispatcher = MemoryJobStore(), MemoryStorage(), RecordingDispatcher()
    api = runner(tmp_path, store=store, storage=storage, dispatcher=dispatcher)

    async def scenario() -> None:
        hold = asyncio.Event()
        backend = RemoteLikeBackend(hold=hold, fail_with=BackendError("the endpoint is down"))
        worker = runner(tmp_path, backend, store=store, storage=storage)
        job, _ = api.submit(params(), surface=Surface.native)
        running = asyncio.ensure_future(worker.run_claimed(job.id))
        await until(lambda: bool(backend.ran))
        api.cancel(job.id)  # the client is told: canceled
        hold.set()
        await running

    run(scenario())
    [saved] = store.records.values()
    assert saved.status == JobStatus.canceled


# -- progress -----------------------------------------------------------------------------------------


class _StepsSeen(FakeBackend):
    """Records the job's step as the runner shows it right after each progress report, before yielding."""

    def __init__(self, r: Callable[[], JobRunner], **kw: Any) -> None:
        super().__init__(**kw)
        self._runner = r
        self.seen: list[int] = []

    async def generate(
        self,
        params: GenerationParams,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        **kw: Any,
    ) -> GenerationResult:
        [job] = list(self._runner()._live.values())

        def report(step: int, total: int) -> None:
            assert progress is not None
            progress(step, total)
            self.seen.append(job.step)

        result = await super().generate(params, report, cancel, **kw)
        await asyncio.sleep(0.05)  # what the loop owes is done by now
        self.seen.append(job.step)
        return result


def test_the_steps_of_a_job_nobody_watches_are_noted_at_once_without_waking_the_loop(tmp_path: Path) -> None:
    backend = _StepsSeen(lambda: r)
    r = runner(tmp_path, backend)

    async def scenario() -> Job:
        job, _ = r.submit(params(num_inference_steps=3), surface=Surface.native)
        assert await r.wait(job, 5)
        return job

    job = run(scenario())
    assert job.status == JobStatus.succeeded
    assert backend.seen == [1, 2, 3, 3]  # each step visible the moment it was reported


def test_a_subscriber_gets_every_step_as_an_event(tmp_path: Path) -> None:
    hold = asyncio.Event()
    backend = _StepsSeen(lambda: r, hold=hold)
    r = runner(tmp_path, backend)

    async def scenario() -> list[tuple[str, int]]:
        job, _ = r.submit(params(num_inference_steps=3), surface=Surface.native)
        got: list[tuple[str, int]] = []

        async def listen() -> None:
            async for event in r.events(job.id):
                got.append((event.name, event.data["progress"]["step"]))

        listener = asyncio.create_task(listen())
        await until(lambda: bool(got) and job.status == JobStatus.running)
        hold.set()
        await asyncio.wait_for(listener, 5)
        return got

    got = run(scenario())
    # Through the loop: a step shows once the loop has run it, then as an event.
    assert backend.seen == [0, 0, 0, 3]
    assert [step for name, step in got if name == "progress"] == [1, 2, 3]
    assert got[-1][0] == "succeeded"
