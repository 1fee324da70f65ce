"""Jobs handed to another process (an AWS Lambda worker): the runner with a dispatcher that does not run
them here, a fast fake backend, SQLite records and a local image directory.

The whole path (API Gateway events, worker invocations, SageMaker, S3, DynamoDB) runs in
tests/e2e/test_lambda_handler.py; these are the cases that are slow or awkward to provoke there.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from sdgate.config import Settings
from sdgate.errors import Conflict, NotReady
from sdgate.jobs import JobRunner
from sdgate.jobs.dispatch import Here
from sdgate.jobstore import JobStore, SqliteJobStore
from sdgate.schemas import ErrorInfo, GenerationParams, GenerationResult, JobStatus, ProgressFn, Surface
from sdgate.storage.local import LocalStorage
from tests.fakes import FakeBackend, params, record


class Dispatcher:
    """Hands jobs "to a worker" by noting their ids (or fails as an unreachable Lambda would)."""

    in_process = False

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[str] = []
        self.webhooks: list[str] = []
        self.fail = fail

    def run(self, job_id: str, here: Here) -> None:
        if self.fail:
            raise ConnectionError("Lambda is unreachable")
        self.sent.append(job_id)

    def deliver(self, job_id: str, here: Here) -> None:
        self.webhooks.append(job_id)


def make(tmp_path: Path, dispatch: Dispatcher, backend: FakeBackend | None = None) -> JobRunner:
    settings = Settings(data_dir=tmp_path, warmup=False, worker_timeout_s=600)
    store = SqliteJobStore(settings.paths.jobs_db)
    return JobRunner(
        settings, backend or FakeBackend(), LocalStorage(settings.paths.images), store, dispatcher=dispatch
    )


def resolved(seed: int) -> GenerationParams:
    return params(seed)


def test_a_job_is_recorded_then_handed_to_a_worker_not_run_here(tmp_path: Path) -> None:
    dispatch = Dispatcher()
    runner = make(tmp_path, dispatch)
    job, created = runner.submit(resolved(1), surface=Surface.native, owner="k1", idempotency_key="i", body_hash="h")
    assert created and not job.local
    assert dispatch.sent == [job.id]
    assert runner.store.get(job.id) == job.record and job.status == JobStatus.queued
    again, created = runner.submit(resolved(1), surface=Surface.native, owner="k1", idempotency_key="i", body_hash="h")
    assert (again.id, created, dispatch.sent) == (job.id, False, [job.id])  # not handed over twice


def test_a_job_no_worker_could_take_fails_visibly(tmp_path: Path) -> None:
    runner = make(tmp_path, Dispatcher(fail=True))
    with pytest.raises(NotReady) as refused:
        runner.submit(resolved(1), surface=Surface.native)
    assert refused.value.status == 503 and refused.value.headers["Retry-After"]
    [stored] = runner.store.list_jobs(owner=None, limit=10, before=None)
    assert stored.status == JobStatus.failed and stored.error is not None


def test_waiting_ends_at_the_invocations_deadline(tmp_path: Path) -> None:
    runner = make(tmp_path, Dispatcher())
    job, _ = runner.submit(resolved(1), surface=Surface.native)
    runner.set_deadline(0)  # no time left in this invocation
    assert asyncio.run(runner.wait(job, timeout=60)) is False
    assert not job.local and job.status == JobStatus.queued


def test_waiting_sees_the_workers_result(tmp_path: Path) -> None:
    dispatch = Dispatcher()
    api, worker = make(tmp_path, dispatch), make(tmp_path, Dispatcher())
    job, _ = api.submit(resolved(3), surface=Surface.native)

    async def scenario() -> bool:
        waiting = asyncio.ensure_future(api.wait(job, timeout=30))
        done = await worker.run_claimed(dispatch.sent[0])  # the worker invocation, elsewhere
        assert done is not None and done.status == JobStatus.succeeded
        return await waiting

    assert asyncio.run(scenario()) is True
    assert job.status == JobStatus.succeeded and len(job.record.images) == 1
    assert asyncio.run(worker.run_claimed(job.id)) is None  # a second delivery: nothing to do


def test_a_job_older_than_the_worker_timeout_is_reported_interrupted(tmp_path: Path) -> None:
    runner = make(tmp_path, Dispatcher())
    lost = runner.store.insert(record(JobStatus.running, time.time() - 601, attempts=1))
    recent = runner.store.insert(record(JobStatus.running, time.time() - 60, attempts=1))
    found = runner.find(lost.id)
    assert found.status == JobStatus.failed
    assert found.record.error is not None and found.record.error.type == "interrupted"
    assert runner.store.get(lost.id) == found.record
    assert runner.find(recent.id).status == JobStatus.running


def test_cancel_before_the_worker_starts_and_after_it_ended(tmp_path: Path) -> None:
    dispatch = Dispatcher()
    runner = make(tmp_path, dispatch)
    job, _ = runner.submit(resolved(1), surface=Surface.native)
    canceled = runner.cancel(job.id)
    assert canceled.status == JobStatus.canceled and runner.store.get(job.id) == canceled.record
    assert asyncio.run(make(tmp_path, Dispatcher()).run_claimed(job.id)) is None  # the worker skips it
    with pytest.raises(Conflict):
        runner.cancel(job.id)


class CanceledMidway(FakeBackend):
    """Generates, while the API marks the job canceled (as another invocation would)."""

    def __init__(self, store: JobStore) -> None:
        super().__init__()
        self.store = store

    async def generate(
        self, params: GenerationParams, progress: ProgressFn | None = None, cancel: object = None, **_: object
    ) -> GenerationResult:
        [running] = self.store.unfinished()
        running.status, running.error = JobStatus.canceled, ErrorInfo(type="canceled", message="canceled by request")
        self.store.save(running)
        return await super().generate(params, progress)


def test_a_job_canceled_while_its_worker_ran_stays_canceled_and_its_images_go(tmp_path: Path) -> None:
    api = make(tmp_path, dispatch := Dispatcher())
    job, _ = api.submit(resolved(5), surface=Surface.native)
    worker = make(tmp_path, Dispatcher())
    worker.backend = CanceledMidway(worker.store)

    final = asyncio.run(worker.run_claimed(dispatch.sent[0]))

    assert final is not None and final.status == JobStatus.canceled and final.images == []
    assert api.store.get(job.id) == final
    assert not [p for p in (tmp_path / "images").rglob("*") if p.is_file()], "a canceled job's image was kept"
