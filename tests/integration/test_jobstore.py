"""Job stores, the durable record of every job: the same cases against SQLite, DynamoDB and PostgreSQL.

The DynamoDB store talks HTTP to a real DynamoDB-protocol server (moto) on a loopback port; the
PostgreSQL store to a real PostgreSQL server (:mod:`tests.postgres`), a fresh database per test.
What recovery reads (``unfinished``, ``finished_since``) is read after a restart: by the store opened
again, as a new process (on PostgreSQL, a new node) does.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest

from sdgate.jobstore import DuplicateJob, JobRecord, JobStore, SharedJobStore, SqliteJobStore
from sdgate.jobstore.dynamodb import DynamoJobStore
from sdgate.schemas import JobStatus, StoredImage, Timings, WebhookState
from tests import postgres
from tests.aws_fixtures import FAKE_CREDENTIALS, REGION
from tests.fakes import params

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient


def record(created: float, status: JobStatus = JobStatus.queued, **kw: object) -> JobRecord:
    kw.setdefault("id", uuid.uuid4().hex)
    return JobRecord(
        status=status,
        created=created,
        params=params(7),
        model="tiny",
        **kw,
    )


def image(key: str) -> StoredImage:
    return StoredImage(url=f"/images/{key}", key=key, seed=7, width=64, height=64, content_type="image/jpeg", bytes=9)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "jobs.sqlite3"


@pytest.fixture(params=["sqlite", "dynamodb", "postgres"])
def open_store(request: pytest.FixtureRequest, db_path: Path) -> Callable[[], JobStore]:
    """Opens the store under test; each call is a new connection to the same data (a restart)."""
    if request.param == "sqlite":
        return lambda: SqliteJobStore(db_path)
    if request.param == "postgres":
        from sdgate.jobstore.postgres import PostgresJobStore

        url = postgres.fresh_database()
        return lambda: PostgresJobStore(url)
    server: str = request.getfixturevalue("s3_server")  # moto speaks DynamoDB on the same port
    table: str = request.getfixturevalue("jobs_table")

    def open_dynamo() -> DynamoJobStore:
        client: DynamoDBClient = boto3.client(
            "dynamodb",
            endpoint_url=server,
            region_name=REGION,
            aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )
        return DynamoJobStore(table, client=client)

    return open_dynamo


@pytest.fixture
def store(open_store: Callable[[], JobStore]) -> Iterator[JobStore]:
    s = open_store()
    yield s
    s.close()


def test_insert_then_get_returns_every_field(store: JobStore) -> None:
    r = record(
        1000.5,
        owner="alice",
        idempotency_key="k1",
        request_hash="h",
        webhook=WebhookState(url="https://example.com/h", delivered=False),
    )
    assert store.insert(r) is r
    got = store.get(r.id)
    assert got == r
    assert got is not r
    assert isinstance(got.status, JobStatus)


def test_get_missing_is_none(store: JobStore) -> None:
    assert store.get("nope") is None


def test_save_writes_every_field(store: JobStore) -> None:
    r = store.insert(record(1000.0))
    r.status = JobStatus.succeeded
    r.started, r.finished, r.attempts = 1001.0, 1002.0, 1
    r.images = [image("k.jpeg")]
    r.timings = Timings(inference=12.5, total=20.0)
    store.save(r)
    got = store.get(r.id)
    assert got == r
    assert got is not None and got.status == JobStatus.succeeded


def test_list_jobs_is_newest_first_with_limit_before_and_owner(store: JobStore) -> None:
    rs = [store.insert(record(1000.0 + i, owner="alice" if i % 2 else "bob")) for i in range(6)]
    newest_first = [r.id for r in reversed(rs)]
    assert [r.id for r in store.list_jobs(owner=None, limit=100, before=None)] == newest_first
    assert [r.id for r in store.list_jobs(owner=None, limit=2, before=None)] == newest_first[:2]
    assert [r.id for r in store.list_jobs(owner=None, limit=2, before=1004.0)] == newest_first[2:4]
    assert [r.id for r in store.list_jobs(owner=None, limit=100, before=1000.0)] == []
    assert [r.id for r in store.list_jobs(owner="alice", limit=100, before=None)] == [rs[5].id, rs[3].id, rs[1].id]


def test_paging_with_before_visits_every_job_once(store: JobStore) -> None:
    ids = {store.insert(record(2000.0 + i * 0.001)).id for i in range(25)}
    seen: list[str] = []
    before = None
    while True:
        page = store.list_jobs(owner=None, limit=7, before=before)
        seen += [r.id for r in page]
        if len(page) < 7:
            break
        before = page[-1].created
    assert len(seen) == len(set(seen)) == 25
    assert set(seen) == ids


def restarted(store: JobStore, open_store: Callable[[], JobStore]) -> JobStore:
    """``store`` closed, as a process that stops, and the store opened again, as the next one."""
    store.close()
    return open_store()


def test_unfinished_are_queued_and_running_oldest_first(open_store: Callable[[], JobStore]) -> None:
    before = open_store()
    running = before.insert(record(1002.0, JobStatus.running, attempts=1))
    queued = before.insert(record(1001.0))
    for i, status in enumerate((JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)):
        before.insert(record(1000.0 + i, status))
    after = restarted(before, open_store)
    try:
        assert [r.id for r in after.unfinished()] == [queued.id, running.id]
    finally:
        after.close()
    before = open_store()
    queued.status = JobStatus.succeeded
    before.save(queued)
    after = restarted(before, open_store)
    try:
        assert [r.id for r in after.unfinished()] == [running.id]
    finally:
        after.close()


def test_older_than_returns_only_terminal_jobs_before_the_cutoff(store: JobStore) -> None:
    old_done = [store.insert(record(100.0 + i, s)) for i, s in enumerate(JobStatus) if s.is_terminal()]
    store.insert(record(50.0, JobStatus.queued))  # old but unfinished: never swept
    store.insert(record(60.0, JobStatus.running))
    store.insert(record(500.0, JobStatus.succeeded))  # finished but recent
    assert [r.id for r in store.older_than(200.0)] == [r.id for r in old_done]
    assert [r.id for r in store.older_than(200.0, limit=2)] == [r.id for r in old_done[:2]]
    assert store.older_than(100.0) == []


def test_finished_since_returns_only_terminal_jobs_from_the_cutoff_oldest_first(
    open_store: Callable[[], JobStore],
) -> None:
    store = open_store()
    store.insert(record(100.0, JobStatus.succeeded))  # finished, but before the cutoff
    at_cutoff = store.insert(record(200.0, JobStatus.failed))
    store.insert(record(250.0, JobStatus.queued))  # recent but unfinished
    running = store.insert(record(260.0, JobStatus.running))
    later = [store.insert(record(300.0 + i, s)) for i, s in enumerate(reversed(JobStatus)) if s.is_terminal()]
    store = restarted(store, open_store)
    try:
        assert store.finished_since(1000.0) == []
        assert [r.id for r in store.finished_since(200.1)] == [r.id for r in later]
        if not isinstance(store, SharedJobStore):  # a shared store hands each over once: to the first asking
            assert [r.id for r in store.finished_since(200.0)] == [at_cutoff.id, *(r.id for r in later)]
        # A job that ends later is found from then on, with its whole record.
        running.status, running.webhook = JobStatus.succeeded, WebhookState(url="https://example.com/h")
        store.save(running)
    finally:
        store.close()
    store = open_store()
    try:
        assert store.finished_since(250.0)[0] == running
    finally:
        store.close()


def test_delete(store: JobStore) -> None:
    a, b, c = (store.insert(record(1000.0 + i)) for i in range(3))
    store.delete([a.id, c.id])
    store.delete([])
    assert store.get(a.id) is None and store.get(c.id) is None
    assert store.get(b.id) == b


def test_idempotency_key_is_unique_per_owner(store: JobStore) -> None:
    first = store.insert(record(1000.0, owner="alice", idempotency_key="k"))
    again = store.insert(record(1001.0, owner="alice", idempotency_key="k"))
    assert again.id == first.id  # the existing job, not a new one
    assert len(store.list_jobs(owner="alice", limit=100, before=None)) == 1
    other_owner = store.insert(record(1002.0, owner="bob", idempotency_key="k"))
    assert other_owner.id != first.id
    no_owner = store.insert(record(1003.0, idempotency_key="k"))
    assert store.insert(record(1004.0, idempotency_key="k")).id == no_owner.id
    assert store.by_idempotency_key("alice", "k") == first
    assert store.by_idempotency_key(None, "k") == no_owner
    assert store.by_idempotency_key("alice", "other") is None
    # Without a key nothing is deduplicated.
    assert store.insert(record(1005.0)).id != store.insert(record(1005.0)).id


def test_idempotency_race_returns_the_winner(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two requests with one key both pass the lookup; the unique index lets one in, the other gets its job."""
    winner = store.insert(record(1000.0, owner="alice", idempotency_key="k"))
    real_lookup = store.by_idempotency_key
    calls = []

    def lookup_that_misses_once(owner: str | None, key: str) -> JobRecord | None:
        calls.append(key)
        return None if len(calls) == 1 else real_lookup(owner, key)

    monkeypatch.setattr(store, "by_idempotency_key", lookup_that_misses_once)
    loser = store.insert(record(1000.1, owner="alice", idempotency_key="k"))
    assert loser.id == winner.id
    assert len(calls) == 2  # it did reach the INSERT and fell back to the lookup


def test_duplicate_id_raises(store: JobStore) -> None:
    r = store.insert(record(1000.0))
    with pytest.raises(DuplicateJob):
        store.insert(r)
    keyed = store.insert(record(1001.0, idempotency_key="k"))
    with pytest.raises(DuplicateJob):  # the same id under a new key: neither the key nor the job is stored
        store.insert(record(1002.0, idempotency_key="other", id=keyed.id))
    assert store.by_idempotency_key(None, "other") is None
    assert store.get(keyed.id) == keyed


def test_claim_runs_a_queued_job_once(store: JobStore) -> None:
    queued = store.insert(record(1000.0))
    claimed = store.claim(queued.id, now=1005.0)
    assert claimed is not None
    assert (claimed.status, claimed.started, claimed.attempts) == (JobStatus.running, 1005.0, 1)
    assert store.get(queued.id) == claimed
    assert store.claim(queued.id, now=1006.0) is None  # a second delivery of the same job
    assert store.get(queued.id) == claimed
    canceled = store.insert(record(1001.0, JobStatus.canceled))
    assert store.claim(canceled.id, now=1007.0) is None
    assert store.get(canceled.id) == canceled
    assert store.claim("nope", now=1008.0) is None


def test_save_of_a_deleted_record_does_not_bring_it_back(store: JobStore) -> None:
    r = store.insert(record(1000.0))
    store.delete([r.id])
    r.status = JobStatus.succeeded
    store.save(r)
    assert store.get(r.id) is None


def test_delete_frees_the_idempotency_key(store: JobStore) -> None:
    first = store.insert(record(1000.0, owner="alice", idempotency_key="k"))
    store.delete([first.id])
    assert store.by_idempotency_key("alice", "k") is None
    second = store.insert(record(1001.0, owner="alice", idempotency_key="k"))
    assert second.id != first.id
    assert store.by_idempotency_key("alice", "k") == second


def test_records_survive_close_and_reopen(open_store: Callable[[], JobStore]) -> None:
    s = open_store()
    running = s.insert(record(1000.0, JobStatus.running, attempts=1, idempotency_key="k"))
    done = s.insert(record(1001.0))
    done.status, done.images = JobStatus.succeeded, [image("x.jpeg")]
    s.save(done)
    s.close()

    reopened = open_store()
    try:
        assert reopened.get(running.id) == running
        assert reopened.get(done.id) == done
        assert [r.id for r in reopened.unfinished()] == [running.id]
        assert reopened.by_idempotency_key(None, "k") == running  # the unique index survives too
        assert reopened.insert(record(1002.0, idempotency_key="k")).id == running.id
    finally:
        reopened.close()


def test_sqlite_database_is_in_wal_mode(db_path: Path) -> None:
    store = SqliteJobStore(db_path)
    store.insert(record(1000.0))
    store.close()
    with sqlite3.connect(db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # Another connection (e.g. `sqlite3` on the command line) reads what was committed.
        assert other.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1
