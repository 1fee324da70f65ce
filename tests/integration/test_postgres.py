"""What only a store that several nodes share does, against a real PostgreSQL server (:mod:`tests.postgres`):
the schema, node leases and takeover, cancels from another node, and keys, quotas and rates counted
across nodes. (The cases every job store passes are in test_jobstore.py.)"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from sdgate import postgres as database
from sdgate.auth.keys import InvalidKey, RevokedKey
from sdgate.auth.postgres import PostgresKeyStore
from sdgate.jobstore import JobRecord
from sdgate.jobstore.postgres import PostgresJobStore
from sdgate.schemas import JobStatus
from tests import postgres
from tests.fakes import params


def record(created: float, status: JobStatus = JobStatus.queued, **kw: object) -> JobRecord:
    return JobRecord(id=uuid.uuid4().hex, status=status, created=created, params=params(7), model="tiny", **kw)


@pytest.fixture
def url() -> str:
    return postgres.fresh_database()


@pytest.fixture
def two_nodes(url: str) -> Iterator[tuple[PostgresJobStore, PostgresJobStore]]:
    a, b = PostgresJobStore(url, lease_s=30), PostgresJobStore(url, lease_s=30)
    yield a, b
    a.close()
    b.close()


def test_the_schema_is_made_once_and_a_newer_one_is_refused(url: str) -> None:
    pool = database.pool(url)
    try:
        assert database.migrate(pool) == len(database.MIGRATIONS)  # again: nothing to do, no error
        with pool.connection() as conn:
            versions = conn.execute("SELECT version FROM sdgate_schema ORDER BY version").fetchall()
            assert [v[0] for v in versions] == list(range(1, len(database.MIGRATIONS) + 1))
            conn.execute("INSERT INTO sdgate_schema VALUES (%s, 0)", (len(database.MIGRATIONS) + 1,))
        with pytest.raises(database.SchemaTooNew, match="upgrade sdgate"):
            database.migrate(pool)
    finally:
        database.release(url)


def test_nodes_racing_to_make_the_schema_make_it_once(url: str) -> None:
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: PostgresJobStore(url), range(4)))
    stores[0].insert(record(1.0))
    assert len(stores[1].list_jobs(owner=None, limit=10, before=None)) == 1
    for s in stores:
        s.close()


def test_an_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(ConnectionError, match=r"cannot reach PostgreSQL at postgresql://nobody@127\.0\.0\.1:1/x"):
        PostgresJobStore("postgresql://nobody:secret@127.0.0.1:1/x?connect_timeout=2")


def test_a_live_nodes_jobs_are_not_taken_over(two_nodes: tuple[PostgresJobStore, PostgresJobStore]) -> None:
    a, b = two_nodes
    a.insert(record(1.0))
    a.insert(record(2.0, JobStatus.running, attempts=1))
    assert b.unfinished() == []
    assert a.unfinished() == []  # its own: it runs them


def test_a_node_that_leaves_has_its_jobs_taken_over_once(url: str) -> None:
    a = PostgresJobStore(url)
    jobs = [a.insert(record(float(i))) for i in range(5)]
    done = a.insert(record(9.0, JobStatus.succeeded))
    a.close()  # a clean stop gives the lease up
    b, c = PostgresJobStore(url), PostgresJobStore(url)
    try:
        taken_b, taken_c = b.unfinished(), c.unfinished()
        assert sorted(r.id for r in taken_b + taken_c) == sorted(j.id for j in jobs)
        assert [r.id for r in taken_b] == [j.id for j in jobs]  # the first to ask, oldest first
        assert b.unfinished() == [] and c.unfinished() == []  # now b's: b is alive
        assert [r.id for r in c.finished_since(0.0)] == [done.id]
        assert b.finished_since(0.0) == []
    finally:
        b.close()
        c.close()


def test_concurrent_takeovers_split_the_orphans_without_overlap(url: str) -> None:
    a = PostgresJobStore(url)
    ids = {a.insert(record(float(i))).id for i in range(60)}
    a.close()
    nodes = [PostgresJobStore(url) for _ in range(4)]
    barrier = threading.Barrier(len(nodes))

    def take(node: PostgresJobStore) -> list[str]:
        barrier.wait()
        return [r.id for r in node.unfinished()]

    with ThreadPoolExecutor(len(nodes)) as pool:
        taken = list(pool.map(take, nodes))
    flat = [i for t in taken for i in t]
    assert len(flat) == len(set(flat)) == len(ids)  # FOR UPDATE SKIP LOCKED: each job to one node
    assert set(flat) == ids
    for n in nodes:
        n.close()


def test_an_expired_lease_is_taken_over_and_the_old_node_learns_it(url: str) -> None:
    a, b = PostgresJobStore(url, lease_s=1), PostgresJobStore(url, lease_s=30)
    try:
        job = a.insert(record(1.0, JobStatus.running, attempts=1))
        assert b.unfinished() == []
        time.sleep(1.2)  # a stops renewing (paused, or dead)
        assert [r.id for r in b.unfinished()] == [job.id]
        report = a.heartbeat({job.id: 3})
        assert report.lost == {job.id} and report.canceled == {}
        assert b.heartbeat({job.id: 5}).lost == set()
    finally:
        a.close()
        b.close()


def test_heartbeats_report_steps_and_cancels(two_nodes: tuple[PostgresJobStore, PostgresJobStore]) -> None:
    a, b = two_nodes
    job = a.insert(record(1.0, JobStatus.running, attempts=1))
    assert a.heartbeat({job.id: 7}) == ({}, set())
    seen = b.get(job.id)
    assert seen is not None and seen.step == 7  # another node reads the progress
    seen.status = JobStatus.canceled
    b.save(seen)
    report = a.heartbeat({job.id: 8})
    assert list(report.canceled) == [job.id] and report.canceled[job.id].status == JobStatus.canceled


def test_a_terminal_record_keeps_its_status(two_nodes: tuple[PostgresJobStore, PostgresJobStore]) -> None:
    """A run that ends after another node canceled it cannot write succeeded over canceled."""
    a, b = two_nodes
    job = a.insert(record(1.0, JobStatus.running, attempts=1))
    canceled = job.model_copy(update={"status": JobStatus.canceled})
    b.save(canceled)
    a.save(job.model_copy(update={"status": JobStatus.succeeded}))
    stored = a.get(job.id)
    assert stored is not None and stored.status == JobStatus.canceled
    canceled.error = None
    canceled.attempts = 2  # the same status again (a webhook's attempts): written
    b.save(canceled)
    stored = a.get(job.id)
    assert stored is not None and stored.attempts == 2


def test_keys_work_on_every_node_and_revocation_is_seen_at_once(url: str) -> None:
    a, b = PostgresKeyStore(url), PostgresKeyStore(url)
    try:
        plain, made = a.create("alice", rate_per_min=5, images_per_day=10)
        assert b.check(plain) == made
        assert [k.id for k in b.list()] == [made.id] and b.count() == 1
        with pytest.raises(InvalidKey):
            b.check(plain[:-1] + ("x" if plain[-1] != "x" else "y"))
        assert a.revoke("alice") == 1
        with pytest.raises(RevokedKey):
            b.check(plain)
        assert b.count() == 0
    finally:
        a.close()
        b.close()


def test_a_daily_quota_holds_across_nodes_under_concurrent_charges(url: str) -> None:
    nodes = [PostgresKeyStore(url) for _ in range(4)]
    try:
        _, key = nodes[0].create("bob", images_per_day=25)
        with ThreadPoolExecutor(8) as pool:
            refused = list(pool.map(lambda i: nodes[i % 4].charge_images(key, 1), range(40)))
        assert refused.count(None) == 25 and refused.count(25) == 15
        assert nodes[1].charge_images(key, 26) == 25  # more than the quota at once: never allowed
    finally:
        for n in nodes:
            n.close()


def test_a_rate_holds_across_nodes(url: str) -> None:
    a, b = PostgresKeyStore(url), PostgresKeyStore(url)
    try:
        with ThreadPoolExecutor(6) as pool:
            waits = list(pool.map(lambda i: (a, b)[i % 2].hit("k1", 4), range(10)))
        assert waits.count(None) == 4
        assert all(w is not None and 0 < w <= 60 for w in waits if w is not None)
        assert a.hit("other", 4) is None  # per key
    finally:
        a.close()
        b.close()
