"""Recovery after a crash, and retention, over a real SqliteJobStore and LocalStorage.

The backend is a fast fake (the real engine is exercised end to end in tests/e2e/test_jobs*.py).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from sdgate.config import Settings
from sdgate.jobs import JobRunner
from sdgate.jobs.retention import sweep
from sdgate.jobstore import JobRecord, SqliteJobStore
from sdgate.schemas import JobStatus, StoredImage, WebhookAttempt, WebhookState
from sdgate.storage import new_key, sidecar_key
from sdgate.storage.local import LocalStorage
from tests.fakes import FakeBackend, record


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def make_runner(data_dir: Path) -> tuple[JobRunner, FakeBackend, SqliteJobStore, LocalStorage]:
    settings = Settings(data_dir=data_dir, warmup=False)
    backend = FakeBackend()
    storage = LocalStorage(settings.paths.images)
    store = SqliteJobStore(settings.paths.jobs_db)
    return JobRunner(settings, backend, storage, store), backend, store, storage


async def run_until_idle(runner: JobRunner, job_ids: list[str]) -> None:
    await runner.start()
    for job_id in job_ids:
        job = runner.find(job_id)
        assert await runner.wait(job, timeout=30), f"job {job_id} did not finish"
    await runner.close()


def test_recovery_reruns_unfinished_jobs_and_fails_those_interrupted_twice(data_dir: Path) -> None:
    runner, backend, store, storage = make_runner(data_dir)
    now = time.time()
    twice = store.insert(record(JobStatus.running, now - 30, attempts=2, seed=1))
    once = store.insert(record(JobStatus.running, now - 20, attempts=1, seed=2))
    queued = store.insert(record(JobStatus.queued, now - 10, seed=3))
    done = store.insert(record(JobStatus.canceled, now - 40, seed=4))

    asyncio.run(run_until_idle(runner, [twice.id, once.id, queued.id, done.id]))

    # Interrupted on its second run: failed, not run a third time.
    failed = store.get(twice.id)
    assert failed is not None and failed.status == JobStatus.failed
    assert failed.error is not None and failed.error.type == "interrupted"
    assert failed.finished is not None and failed.images == []
    # Interrupted once, and never started: run (again) and succeeded, with their images stored.
    for rec, attempts in ((once, 2), (queued, 1)):
        got = store.get(rec.id)
        assert got is not None and got.status == JobStatus.succeeded, got
        assert got.attempts == attempts
        [img] = got.images
        path = storage.path_for(img.key)
        assert path is not None and path.is_file()
        assert path.stat().st_size == img.bytes
    assert sorted(p.seeds[0] for p in backend.ran) == [2, 3]
    # A finished job is left as it was.
    assert store.get(done.id) == done
    assert store.unfinished() == []
    store.close()


def test_recovery_delivers_only_the_webhooks_owed_when_the_process_stopped(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, _backend, store, _storage = make_runner(data_dir)
    now = time.time()
    sent: list[str] = []

    async def fake_deliver(url: str, body: bytes, **kw: Any) -> list[WebhookAttempt]:
        sent.append(url)
        return [WebhookAttempt(at=time.time(), status=200)]

    monkeypatch.setattr("sdgate.jobs.runner.deliver", fake_deliver)

    def finished(created: float, webhook: WebhookState | None) -> JobRecord:
        rec = record(JobStatus.succeeded, created)
        rec.finished, rec.webhook = created + 2, webhook
        return store.insert(rec)

    tried = [WebhookAttempt(at=1)]
    owed = finished(now - 60, WebhookState(url="https://example.com/owed"))
    delivered = finished(now - 50, WebhookState(url="https://example.com/done", delivered=True, attempts=tried))
    exhausted = finished(now - 40, WebhookState(url="https://example.com/gave-up", delivered=False, attempts=tried))
    too_old = finished(now - 2 * 24 * 3600, WebhookState(url="https://example.com/old"))
    no_hook = finished(now - 30, None)

    async def scenario() -> None:
        await runner.start()
        deadline = time.monotonic() + 30
        while runner.find(owed.id).local:  # in memory until its delivery is over
            assert time.monotonic() < deadline, "the owed webhook was not delivered"
            await asyncio.sleep(0.01)
        await runner.close()

    asyncio.run(scenario())

    assert sent == ["https://example.com/owed"]
    got = store.get(owed.id)
    assert got is not None and got.webhook is not None
    assert got.webhook.delivered is True and [a.status for a in got.webhook.attempts] == [200]
    for untouched in (delivered, exhausted, too_old, no_hook):
        assert store.get(untouched.id) == untouched
    store.close()


def test_sweep_removes_old_finished_jobs_and_their_images(data_dir: Path) -> None:
    _runner, _backend, store, storage = make_runner(data_dir)
    now = time.time()

    def with_image(rec: JobRecord) -> tuple[JobRecord, list[Path]]:
        key = new_key("png")
        storage.put(b"png", key, "image/png")
        sidecar = sidecar_key(key)
        storage.put(b"{}", sidecar, "application/json")
        image = StoredImage(url=storage.url_for(key), key=key, seed=1, width=64, height=64, content_type="", bytes=3)
        rec.images = [image]
        store.insert(rec)
        paths = [storage.path_for(key), storage.path_for(sidecar)]
        assert all(p is not None and p.is_file() for p in paths)
        return rec, [p for p in paths if p is not None]

    old_done, old_files = with_image(record(JobStatus.succeeded, now - 7200))
    old_failed = store.insert(record(JobStatus.failed, now - 7000))
    old_queued = store.insert(record(JobStatus.queued, now - 7200))  # unfinished: never swept
    recent, recent_files = with_image(record(JobStatus.succeeded, now - 60))

    assert sweep(store, storage, max_age_s=3600) == 2

    assert store.get(old_done.id) is None
    assert store.get(old_failed.id) is None
    assert not any(p.exists() for p in old_files), "a swept job's image or sidecar was left behind"
    assert store.get(old_queued.id) is not None
    assert store.get(recent.id) is not None
    assert all(p.is_file() for p in recent_files)
    assert sweep(store, storage, max_age_s=3600) == 0
    store.close()


def test_sweep_pages_through_more_than_one_batch(data_dir: Path) -> None:
    _runner, _backend, store, storage = make_runner(data_dir)
    old = time.time() - 7200
    for i in range(510):  # older_than() hands out 500 at a time
        store.insert(record(JobStatus.succeeded, old + i * 0.001))
    assert sweep(store, storage, max_age_s=3600) == 510
    assert store.list_jobs(owner=None, limit=10, before=None) == []
    store.close()


def test_retention_setting_runs_the_sweep_in_the_background(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, warmup=False, retention="1h")
    store = SqliteJobStore(settings.paths.jobs_db)
    runner = JobRunner(settings, FakeBackend(), LocalStorage(settings.paths.images), store)
    old = store.insert(record(JobStatus.succeeded, time.time() - 2 * 3600))
    recent = store.insert(record(JobStatus.succeeded, time.time() - 60))

    async def scenario() -> None:
        await runner.start()
        deadline = time.monotonic() + 30
        while store.get(old.id) is not None:
            assert time.monotonic() < deadline, "SDGATE_RETENTION=1h did not sweep a two-hour-old job"
            await asyncio.sleep(0.02)
        await runner.close()

    asyncio.run(scenario())
    assert store.get(recent.id) is not None
    store.close()
