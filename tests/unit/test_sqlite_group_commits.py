"""SQLite's group commits: a turn of the event loop's updates in one transaction, none answered uncommitted.

Each test reads the file through a second connection, as another process (or a restart after
``kill -9``) would: what it sees is what is committed.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import uuid
from pathlib import Path

import pytest

from sdgate.jobstore import SqliteJobStore
from sdgate.jobstore.record import JobRecord
from sdgate.schemas import JobStatus
from tests.fakes import params


def record(status: JobStatus = JobStatus.queued, **kw: object) -> JobRecord:
    kw.setdefault("id", uuid.uuid4().hex)
    return JobRecord(status=status, created=1.0, params=params(7), model="tiny", **kw)


def committed(path: Path) -> dict[str, str]:
    """Status by job id, as a second connection sees the file."""
    with sqlite3.connect(path) as other:
        return dict(other.execute("SELECT id, status FROM jobs").fetchall())


def test_a_turns_updates_are_committed_when_the_turn_ends(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = tmp_path / "jobs.sqlite3"
        store = SqliteJobStore(path)
        store.group_commits(asyncio.get_running_loop())
        jobs = [record() for _ in range(3)]
        for job in jobs:
            store.insert(job)
        assert committed(path) == {j.id: "queued" for j in jobs}, "an insert is committed at once"
        for job in jobs[:2]:
            job.status = JobStatus.running
            store.save(job)
        assert set(committed(path).values()) == {"queued"}, "updated before the turn ended"
        await asyncio.sleep(0)  # the commit was scheduled before anything that runs after this turn
        assert committed(path) == {jobs[0].id: "running", jobs[1].id: "running", jobs[2].id: "queued"}
        store.close()

    asyncio.run(scenario())


def test_a_read_from_another_thread_sees_the_queued_updates(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = tmp_path / "jobs.sqlite3"
        store = SqliteJobStore(path)
        store.group_commits(asyncio.get_running_loop())
        job = record()
        store.insert(job)
        job.status = JobStatus.succeeded
        store.save(job)
        seen: list[JobRecord | None] = []
        reader = threading.Thread(target=lambda: seen.append(store.get(job.id)))
        reader.start()
        reader.join()  # without yielding to the loop: the commit callback has not run
        assert seen[0] is not None and seen[0].status == JobStatus.succeeded
        assert committed(path) == {job.id: "succeeded"}
        store.close()

    asyncio.run(scenario())


def test_flush_commits_at_once_and_close_commits_what_is_left(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = tmp_path / "jobs.sqlite3"
        store = SqliteJobStore(path)
        store.group_commits(asyncio.get_running_loop())
        first, second = record(), record()
        store.insert(first)
        store.insert(second)
        first.status = second.status = JobStatus.failed
        store.save(first)
        store.flush()
        assert committed(path) == {first.id: "failed", second.id: "queued"}
        store.save(second)
        store.close()
        assert committed(path) == {first.id: "failed", second.id: "failed"}

    asyncio.run(scenario())


def test_an_update_that_fails_costs_only_itself(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        path = tmp_path / "jobs.sqlite3"
        store = SqliteJobStore(path)
        store.group_commits(asyncio.get_running_loop())
        bad, good = record(), record()
        store.insert(bad)
        store.insert(good)
        with sqlite3.connect(path) as other:  # the stand-in for a write the disk refuses
            other.execute(
                f"CREATE TRIGGER refuse BEFORE UPDATE ON jobs WHEN old.id = '{bad.id}' "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        bad.status = good.status = JobStatus.succeeded
        store.save(bad)
        store.save(good)
        with caplog.at_level(logging.ERROR, logger="sdgate.jobstore.sqlite"):
            store.flush()
        assert committed(path) == {bad.id: "queued", good.id: "succeeded"}
        assert f"the record of job {bad.id} could not be written: refused" in caplog.text
        store.close()

    asyncio.run(scenario())


def test_off_the_loops_thread_and_without_group_commits_an_update_is_committed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    job = record()
    store.insert(job)
    job.status = JobStatus.canceled
    store.save(job)
    assert committed(path) == {job.id: "canceled"}
    loop = asyncio.new_event_loop()
    try:
        store.group_commits(loop)
        job.status = JobStatus.running
        writer = threading.Thread(target=store.save, args=(job,))
        writer.start()
        writer.join()
        assert committed(path) == {job.id: "running"}
    finally:
        store.close()
        loop.close()


def test_an_idempotent_insert_is_decided_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = tmp_path / "jobs.sqlite3"
        store = SqliteJobStore(path)
        store.group_commits(asyncio.get_running_loop())
        first = store.insert(record(idempotency_key="k", owner="o"))
        again = store.insert(record(idempotency_key="k", owner="o"))
        assert again.id == first.id
        assert committed(path) == {first.id: "queued"}
        store.close()

    asyncio.run(scenario())
