"""A job's transitions: the only code that changes a status, and each one saves, measures and notifies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from sdgate.jobs import Event, Job, Output
from sdgate.jobs.lifecycle import CANCELED, Lifecycle
from sdgate.jobstore import JobRecord
from sdgate.metrics import Metrics
from sdgate.schemas import ErrorInfo, GenerationResponse, JobStatus, StoredImage, Timings
from tests.fakes import MemoryJobStore, record

STATUSES = [s.value for s in JobStatus]


@dataclass
class Harness:
    """A job over a memory store and real metrics, with its subscriber queue and its ``ended`` calls."""

    store: MemoryJobStore = field(default_factory=MemoryJobStore)
    metrics: Metrics = field(default_factory=Metrics)
    ended: list[Job] = field(default_factory=list)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)

    def job(self, status: JobStatus = JobStatus.queued, created: float | None = None) -> Job:
        rec = record(status, created=created)
        self.store.insert(rec)
        job = Job(rec, Lifecycle(store=self.store, metrics=self.metrics, describe=describe, ended=self.ended.append))
        job.subscribers.add(self.events)
        return job

    def saved(self, job: Job) -> JobRecord:
        stored = self.store.get(job.id)
        assert stored is not None
        return stored

    def published(self) -> list[Event]:
        out = []
        while not self.events.empty():
            out.append(self.events.get_nowait())
        return out

    def counts(self) -> dict[str, float]:
        """``sdgate_jobs_total`` by status, and the images and errors counted."""
        sample = self.metrics.registry.get_sample_value
        counts = {s: sample("sdgate_jobs_total", {"status": s}) or 0.0 for s in STATUSES}
        counts["images"] = sample("sdgate_images_generated_total") or 0.0
        for kind in ("backend_error", "canceled", "interrupted"):
            counts[f"error:{kind}"] = sample("sdgate_errors_total", {"type": kind}) or 0.0
        return counts


def describe(job: Job) -> GenerationResponse:
    r = job.record
    return GenerationResponse(id=r.id, status=r.status, model=r.model, created=int(r.created), error=r.error)


def output(seed: int = 1) -> Output:
    key = f"2026/01/01/{seed:032x}.png"
    image = StoredImage(
        url=f"/images/{key}", key=key, seed=seed, width=64, height=64, content_type="image/png", bytes=3
    )
    return Output(image=image, data=b"png", pixels=None)


def succeed(job: Job) -> None:
    job.succeed([output(1), output(2)], Timings(inference=5.0))


def fail(job: Job) -> None:
    job.fail(ErrorInfo(type="backend_error", message="the endpoint is down"))


def cancel(job: Job) -> None:
    job.cancel()


def interrupt(job: Job) -> None:
    job.interrupt("the server stopped twice")


ENDINGS: list[tuple[Callable[[Job], None], JobStatus, ErrorInfo | None]] = [
    (succeed, JobStatus.succeeded, None),
    (fail, JobStatus.failed, ErrorInfo(type="backend_error", message="the endpoint is down")),
    (cancel, JobStatus.canceled, CANCELED),
    (interrupt, JobStatus.failed, ErrorInfo(type="interrupted", message="the server stopped twice")),
]


# -- start, advance, requeue ------------------------------------------------------------------------


def test_start_runs_a_queued_job_saves_it_and_tells_subscribers() -> None:
    h = Harness()
    job = h.job(JobStatus.queued)
    before, saves = time.time(), h.store.saves
    job.start()
    stored = h.saved(job)
    assert job.status == stored.status == JobStatus.running
    assert stored.started is not None and before <= stored.started <= time.time()
    assert stored.attempts == 1
    assert h.store.saves == saves + 1
    assert [(e.name, e.data["status"]) for e in h.published()] == [("started", "running")]
    assert h.ended == []
    assert all(v == 0 for v in h.counts().values())  # only an ended job is counted


def test_start_of_a_job_that_is_not_queued_does_nothing() -> None:
    h = Harness()
    job = h.job(JobStatus.running)
    started, saves = job.record.started, h.store.saves
    job.start()
    assert (job.status, job.record.started, job.record.attempts) == (JobStatus.running, started, 0)
    assert h.store.saves == saves
    assert h.published() == []


def test_advance_reports_progress_in_memory_and_to_subscribers_not_to_the_store() -> None:
    h = Harness()
    job = h.job(JobStatus.queued)
    job.advance(0, 2)  # the work left the queue: the job has started
    assert job.status == JobStatus.running
    assert [e.name for e in h.published()] == ["started"]
    saves = h.store.saves
    job.advance(1, 2)
    assert (job.step, job.total_steps) == (1, 2)
    assert [e.name for e in h.published()] == ["progress"]
    assert h.store.saves == saves
    assert h.saved(job).step == 0


def test_a_step_handed_to_the_loop_late_never_moves_progress_back() -> None:
    h = Harness()
    job = h.job(JobStatus.running)
    job.note_step(2, 3)  # noted directly on the engine thread
    job.advance(1, 3)  # an earlier step, handed to the loop before anyone watched
    assert (job.step, job.total_steps) == (2, 3)
    job.requeue()  # a new attempt starts from the start
    job.advance(0, 3)
    assert job.step == 0


def test_requeue_puts_a_running_job_back_from_the_start() -> None:
    h = Harness()
    job = h.job(JobStatus.running)
    job.advance(1, 2)
    saves = h.store.saves
    job.requeue()
    assert job.status == h.saved(job).status == JobStatus.queued
    assert job.step == 0
    assert h.store.saves == saves + 1
    assert h.ended == []


@pytest.mark.parametrize("status", [JobStatus.queued, JobStatus.succeeded, JobStatus.failed, JobStatus.canceled])
def test_requeue_only_from_running(status: JobStatus) -> None:
    h = Harness()
    job = h.job(status)
    saves = h.store.saves
    job.requeue()
    assert job.status == h.saved(job).status == status
    assert h.store.saves == saves


# -- the endings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("end", "status", "error"), ENDINGS, ids=[e[0].__name__ for e in ENDINGS])
def test_an_ending_saves_stamps_measures_notifies_and_calls_ended_once(
    end: Callable[[Job], None], status: JobStatus, error: ErrorInfo | None
) -> None:
    h = Harness()
    job = h.job(JobStatus.running, created=time.time() - 2)
    job.advance(1, 2)
    h.published()
    counts, saves, before = h.counts(), h.store.saves, time.time()
    end(job)

    stored = h.saved(job)
    assert job.status == stored.status == status
    assert stored.error == error
    assert stored.finished is not None and before <= stored.finished <= time.time()
    assert stored.timings is not None and stored.timings.total >= 2000  # since it was created
    assert h.store.saves == saves + 1
    assert job.done.is_set()
    assert h.ended == [job]

    events = h.published()
    assert [e.name for e in events] == [status.value]
    assert events[0].data["id"] == job.id and events[0].data["status"] == status.value

    after = h.counts()
    assert after[status.value] == counts[status.value] + 1
    assert sum(after[s] for s in STATUSES) == sum(counts[s] for s in STATUSES) + 1
    if error is not None:
        assert after[f"error:{error.type}"] == counts[f"error:{error.type}"] + 1
        assert stored.step == 1  # how far it got


def test_succeed_records_the_images_and_timings_and_counts_the_images() -> None:
    h = Harness()
    job = h.job(JobStatus.running)
    succeed(job)
    stored = h.saved(job)
    assert [i.seed for i in stored.images] == [1, 2]
    assert [o.image for o in job.outputs] == stored.images
    assert stored.timings is not None and stored.timings.inference == 5.0
    assert job.step == job.total_steps == job.params.num_inference_steps
    assert h.counts()["images"] == 2


def test_cancel_also_flags_the_running_work_to_stop() -> None:
    h = Harness()
    job = h.job(JobStatus.running)
    job.cancel(ErrorInfo(type="canceled", message="stopped at step 1"))
    assert job.cancel_requested.is_set()
    assert h.saved(job).error == ErrorInfo(type="canceled", message="stopped at step 1")


def test_interrupt_fails_the_job_as_interrupted() -> None:
    h = Harness()
    job = h.job(JobStatus.running)
    job.interrupt("the worker stopped")
    stored = h.saved(job)
    assert stored.status == JobStatus.failed
    assert stored.error == ErrorInfo(type="interrupted", message="the worker stopped")


@pytest.mark.parametrize(("end", "status", "error"), ENDINGS, ids=[e[0].__name__ for e in ENDINGS])
def test_an_ended_job_ignores_every_later_transition(
    end: Callable[[Job], None], status: JobStatus, error: ErrorInfo | None
) -> None:
    h = Harness()
    job = h.job(JobStatus.running)
    end(job)
    h.published()
    stored, saves, counts = h.saved(job), h.store.saves, h.counts()

    job.start()
    job.advance(1, 2)
    job.requeue()
    succeed(job)
    fail(job)
    cancel(job)
    interrupt(job)

    assert job.status == status
    assert h.saved(job) == stored
    assert job.record.error == error
    assert h.store.saves == saves
    assert h.counts() == counts
    assert h.published() == []
    assert h.ended == [job]  # exactly once


def test_a_job_read_in_its_terminal_state_is_done_and_stays_so() -> None:
    h = Harness()
    job = h.job(JobStatus.failed)
    assert job.done.is_set()
    fail(job)
    assert h.ended == [] and h.store.saves == 0


def test_adopting_a_newer_record_takes_its_status() -> None:
    h = Harness()
    job = h.job(JobStatus.running)
    newer = job.record.model_copy(update={"status": JobStatus.canceled})
    job.adopt(newer)
    assert job.status == JobStatus.canceled
    assert job.done.is_set()
    assert h.store.saves == 0  # what another process wrote is not written again
