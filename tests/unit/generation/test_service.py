"""The generation service: resolve → charge → submit → wait | 202, over a real Guard and KeyStore.

The key store is the real SQLite one in ``tmp_path`` (fast); the backend, storage and job store are
the fakes of tests/fakes.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sdgate.auth import ApiKey, Guard, KeyStore
from sdgate.backends import BackendState
from sdgate.config import Settings
from sdgate.errors import (
    BackendError,
    Busy,
    Canceled,
    GenerationFailed,
    InvalidRequest,
    NotReady,
    RateLimited,
    SdgateError,
    StorageError,
)
from sdgate.generation import Caller, Generation, GenerationService, effective_defaults
from sdgate.jobs import JobRunner
from sdgate.schemas import GenerationRequest, JobStatus, ModelDefaults, Surface
from tests.fakes import FakeBackend, MemoryJobStore, MemoryStorage, record

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class CountingGuard(Guard):
    """The real guard, remembering each charge it was asked for (refused ones included)."""

    def __init__(self, settings: Settings, keys: KeyStore):
        super().__init__(settings, keys)
        self.charges: list[int] = []

    def charge(self, key: ApiKey | None, images: int) -> None:
        self.charges.append(images)
        super().charge(key, images)


@dataclass
class World:
    settings: Settings
    backend: FakeBackend
    store: MemoryJobStore
    runner: JobRunner
    keys: KeyStore
    guard: CountingGuard
    service: GenerationService

    def caller(self, rate_per_min: int | None = None, images_per_day: int | None = None) -> Caller:
        """A caller with a new key of its own limits."""
        _, key = self.keys.create("alice", rate_per_min=rate_per_min, images_per_day=images_per_day)
        return Caller(key=key, owner=key.id)

    async def generate(self, *requests: GenerationRequest, caller: Caller, **kw: Any) -> Generation:
        kw.setdefault("wait_s", 5.0)
        return await self.service.generate(list(requests), surface=Surface.native, caller=caller, **kw)


def world(tmp_path: Path, backend: FakeBackend | None = None, **settings_kw: Any) -> World:
    settings = Settings(data_dir=tmp_path, **settings_kw)
    backend = backend or FakeBackend()
    store = MemoryJobStore()
    runner = JobRunner(settings, backend, MemoryStorage(), store)
    keys = KeyStore(settings.paths.keys_db)
    guard = CountingGuard(settings, keys)
    return World(settings, backend, store, runner, keys, guard, GenerationService(settings, backend, runner, guard))


def req(num_images: int = 1, **kw: Any) -> GenerationRequest:
    return GenerationRequest(prompt="a fox", num_images=num_images, **kw)


def images_used(keys: KeyStore, key: ApiKey | None) -> int:
    """Today's images charged to ``key``, read through the quota check itself without charging anything:
    a quota of n refuses 0 more images exactly when more than n are used."""
    assert key is not None
    return next(n for n in range(1000) if keys.charge_images(replace(key, images_per_day=n), 0) is None)


# -- 1. resolve -------------------------------------------------------------------------------------

MODEL = ModelDefaults(width=96, height=128, num_inference_steps=3, guidance_scale=4.0, scheduler="ddim")


def test_a_request_gets_the_models_defaults(tmp_path: Path) -> None:
    w = world(tmp_path, FakeBackend(defaults=MODEL))
    gen = run(w.generate(req(seed=1), caller=Caller()))
    p = gen.job.params
    assert (p.width, p.height, p.num_inference_steps, p.guidance_scale, p.scheduler) == (96, 128, 3, 4.0, "ddim")
    assert gen.job.record.images[0].width == 96
    assert w.service.defaults() == MODEL


def test_sdgate_defaults_win_over_the_models_and_the_request_over_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SDGATE_DEFAULT_WIDTH", "64")
    monkeypatch.setenv("SDGATE_DEFAULT_STEPS", "2")
    w = world(tmp_path, FakeBackend(defaults=MODEL))

    async def scenario() -> tuple[Generation, Generation]:
        defaulted = await w.generate(req(seed=1), caller=Caller())
        explicit = await w.generate(req(seed=1, width=72, num_inference_steps=1), caller=Caller())
        return defaulted, explicit

    defaulted, explicit = run(scenario())
    d, e = defaulted.job.params, explicit.job.params
    assert (d.width, d.height, d.num_inference_steps) == (64, 128, 2)
    assert (e.width, e.height, e.num_inference_steps) == (72, 128, 1)
    assert w.service.defaults() == effective_defaults(w.settings, MODEL)
    assert w.service.defaults().width == 64


def test_an_invalid_request_is_refused_before_any_charge(tmp_path: Path) -> None:
    w = world(tmp_path, max_images=2)
    caller = w.caller(images_per_day=10)
    with pytest.raises(InvalidRequest) as caught:
        run(w.generate(req(), req(num_images=3), caller=caller))
    assert caught.value.field == "num_images"
    assert w.guard.charges == []
    assert w.store.records == {}


def test_a_webhook_that_may_not_be_reached_is_refused_before_any_charge(tmp_path: Path) -> None:
    w = world(tmp_path)
    caller = w.caller(images_per_day=10)
    with pytest.raises(InvalidRequest) as caught:
        run(w.generate(req(), caller=caller, webhook_url="http://127.0.0.1:9/hook"))
    assert caught.value.field == "webhook_url"
    assert w.guard.charges == []


def test_a_waiting_request_to_a_failed_backend_is_refused_before_any_charge(tmp_path: Path) -> None:
    w = world(tmp_path, FakeBackend(state=BackendState.failed))
    caller = w.caller(images_per_day=10)
    with pytest.raises(NotReady):
        run(w.generate(req(), caller=caller))
    assert w.guard.charges == []
    assert w.store.records == {}


# -- 2. charge --------------------------------------------------------------------------------------


def test_one_call_is_one_charge_of_all_its_images(tmp_path: Path) -> None:
    w = world(tmp_path)
    caller = w.caller(rate_per_min=1, images_per_day=10)

    async def scenario() -> Generation:
        gen = await w.generate(req(num_images=2), req(num_images=3), caller=caller)
        # One rate hit for the whole call: the key's one request a minute is spent.
        with pytest.raises(RateLimited):
            await w.generate(req(), caller=caller)
        return gen

    gen = run(scenario())
    assert w.guard.charges == [5, 1]
    assert images_used(w.keys, caller.key) == 5
    assert [j.status for j in gen.jobs] == [JobStatus.succeeded, JobStatus.succeeded]
    assert [len(j.record.images) for j in gen.jobs] == [2, 3]


def test_over_the_quota_is_429_and_no_job_is_recorded(tmp_path: Path) -> None:
    w = world(tmp_path)
    caller = w.caller(images_per_day=2)
    with pytest.raises(RateLimited) as caught:
        run(w.generate(req(num_images=3), caller=caller))
    assert caught.value.status == 429
    assert caught.value.message == "daily quota of 2 images reached"
    assert int(caught.value.headers["Retry-After"]) > 0
    assert w.store.records == {}
    assert w.backend.ran == []
    assert images_used(w.keys, caller.key) == 0


def test_the_settings_quota_holds_for_a_key_without_its_own(tmp_path: Path) -> None:
    w = world(tmp_path, images_per_day=1)
    caller = w.caller()

    async def scenario() -> None:
        await w.generate(req(), caller=caller)
        with pytest.raises(RateLimited, match="daily quota of 1 images"):
            await w.generate(req(), caller=caller)

    run(scenario())
    assert len(w.store.records) == 1


def test_over_the_rate_is_429_and_the_quota_is_not_charged(tmp_path: Path) -> None:
    w = world(tmp_path)
    caller = w.caller(rate_per_min=1, images_per_day=5)

    async def scenario() -> None:
        await w.generate(req(), caller=caller)
        with pytest.raises(RateLimited) as caught:
            await w.generate(req(num_images=2), caller=caller)
        assert caught.value.message == "rate limit of 1 requests per minute reached"
        assert int(caught.value.headers["Retry-After"]) >= 1

    run(scenario())
    assert images_used(w.keys, caller.key) == 1
    assert len(w.store.records) == 1


def test_without_a_key_nothing_is_counted(tmp_path: Path) -> None:
    w = world(tmp_path, rate_limit_per_min=1, images_per_day=1)

    async def scenario() -> None:
        for _ in range(3):
            await w.generate(req(num_images=2), caller=Caller())

    run(scenario())
    assert len(w.store.records) == 3


def test_a_full_queue_is_busy_before_anything_is_charged(tmp_path: Path) -> None:
    # A loading backend keeps the first job queued.
    w = world(tmp_path, FakeBackend(state=BackendState.loading), queue_size=1)
    caller = w.caller(rate_per_min=10, images_per_day=5)

    async def scenario() -> None:
        first = await w.generate(req(), caller=caller, wait_s=None)
        assert first.job.status == JobStatus.queued
        with pytest.raises(Busy) as caught:
            await w.generate(req(), caller=caller, wait_s=None)
        assert caught.value.status == 429
        assert "Retry-After" in caught.value.headers
        await w.runner.close(0)

    run(scenario())
    assert w.guard.charges == [1]
    assert images_used(w.keys, caller.key) == 1
    assert len(w.store.records) == 1


def test_an_idempotent_repeat_is_the_first_job_and_is_not_charged_again(tmp_path: Path) -> None:
    w = world(tmp_path)
    caller = w.caller(images_per_day=1)  # a second charge would be refused

    async def scenario() -> tuple[Generation, Generation]:
        first = await w.generate(req(seed=3), caller=caller, idempotency_key="k1", body_hash="h1")
        again = await w.generate(req(seed=3), caller=caller, idempotency_key="k1", body_hash="h1")
        with pytest.raises(InvalidRequest) as caught:
            await w.generate(req(seed=4), caller=caller, idempotency_key="k1", body_hash="h2")
        assert caught.value.field == "Idempotency-Key"
        return first, again

    first, again = run(scenario())
    assert again.job.id == first.job.id
    assert again.finished and again.job.status == JobStatus.succeeded
    assert w.guard.charges == [1]
    assert images_used(w.keys, caller.key) == 1
    assert len(w.store.records) == 1
    assert len(w.backend.ran) == 1


# -- 3. submit, 4. wait -----------------------------------------------------------------------------


def test_without_waiting_it_answers_at_once_with_the_jobs_queued_and_recorded(tmp_path: Path) -> None:
    w = world(tmp_path)

    async def scenario() -> Generation:
        gen = await w.generate(req(), req(), caller=Caller(), wait_s=None)
        assert not gen.finished
        assert [j.status for j in gen.jobs] == [JobStatus.queued, JobStatus.queued]
        assert all(w.store.records[j.id].status == JobStatus.queued for j in gen.jobs)
        for job in gen.jobs:  # they go on
            assert await w.runner.wait(job, 5)
        return gen

    gen = run(scenario())
    assert [j.status for j in gen.jobs] == [JobStatus.succeeded, JobStatus.succeeded]
    assert all(j.record.surface == Surface.native for j in gen.jobs)


def test_a_wait_that_ends_first_answers_unfinished_and_the_job_goes_on(tmp_path: Path) -> None:
    async def scenario() -> tuple[Generation, bool]:
        hold = asyncio.Event()
        w = world(tmp_path, FakeBackend(hold=hold))
        t0 = time.monotonic()
        gen = await w.generate(req(), caller=Caller(), wait_s=0.05)
        assert time.monotonic() - t0 < 2
        assert not gen.finished
        assert gen.job.status == JobStatus.running
        gen.raise_for_failure()  # nothing failed yet
        hold.set()
        return gen, await w.runner.wait(gen.job, 5)

    gen, ended = run(scenario())
    assert ended and gen.job.status == JobStatus.succeeded


@pytest.mark.parametrize(
    "error", [BackendError("the endpoint is down"), GenerationFailed("out of memory"), StorageError("disk full")]
)
def test_raise_for_failure_raises_the_jobs_error_with_its_status(tmp_path: Path, error: SdgateError) -> None:
    w = world(tmp_path, FakeBackend(error=error))
    gen = run(w.generate(req(), caller=Caller()))
    assert gen.finished and gen.job.status == JobStatus.failed
    with pytest.raises(SdgateError) as caught:
        gen.raise_for_failure()
    raised = caught.value
    assert type(raised) is type(error)
    assert (raised.status, raised.type, raised.message) == (error.status, error.type, error.message)
    assert raised.headers == {"X-Job-Id": gen.job.id}


def test_raise_for_failure_of_a_canceled_job_is_409_and_of_an_interrupted_one_500(tmp_path: Path) -> None:
    w = world(tmp_path)
    canceled, interrupted = w.runner.adopt(record(JobStatus.queued)), w.runner.adopt(record(JobStatus.running))
    canceled.cancel()
    interrupted.interrupt("the worker stopped")
    with pytest.raises(Canceled) as was_canceled:
        Generation([canceled], finished=True).raise_for_failure()
    assert was_canceled.value.status == 409
    with pytest.raises(SdgateError) as was_interrupted:
        Generation([interrupted], finished=True).raise_for_failure()
    assert (was_interrupted.value.status, was_interrupted.value.type) == (500, "interrupted")
    assert was_interrupted.value.message == "the worker stopped"


def test_raise_for_failure_names_the_first_failed_job_of_several(tmp_path: Path) -> None:
    w = world(tmp_path)
    ok, failed = w.runner.adopt(record(JobStatus.running)), w.runner.adopt(record(JobStatus.running))
    failed.interrupt("gone")
    Generation([ok], finished=False).raise_for_failure()  # a job still running is no failure
    with pytest.raises(SdgateError) as caught:
        Generation([ok, failed], finished=False).raise_for_failure()
    assert caught.value.headers["X-Job-Id"] == failed.id
