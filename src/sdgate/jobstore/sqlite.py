"""Job records in SQLite: the default store, one file under ``SDGATE_DATA_DIR``.

A record is written when a job is accepted, when it starts, and when it ends; progress between
steps stays in memory. The database lives under ``SDGATE_DATA_DIR`` in WAL mode, so readers never
block the writer and a crash loses nothing that was committed.

In a server (:meth:`SqliteJobStore.group_commits`) the updates of one turn of the event loop (a job
started, a job ended) are one transaction: a commit costs several times an update, and a batch's jobs
start in one turn and end in a few. A new job's record is committed at once, as before: accepting a job
is its commit. Nothing is answered before it is committed: :meth:`SqliteJobStore.flush` runs before
every response message, and before every read or insert, from any thread.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from pathlib import Path

from sdgate.jobstore.record import DuplicateJob, JobRecord, list_query, record_from_json, record_to_json
from sdgate.schemas import JobStatus

log = logging.getLogger(__name__)

_UPDATE = "UPDATE jobs SET status = ?, body = ? WHERE id = ?"
_INSERT = "INSERT INTO jobs (id, status, created, owner, idempotency_key, body) VALUES (?, ?, ?, ?, ?, ?)"


class SqliteJobStore:
    """Job records in one SQLite file. Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        # Group commits (off until group_commits()): the loop thread's writes wait here for their commit.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._queued: list[tuple[str, tuple[object, ...]]] = []
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a process crash (kill -9); only an OS crash can
            # lose the last transactions, which is the right trade for a job log.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS jobs (
                    id TEXT PRIMARY KEY,
                    status TEXT NOT NULL,
                    created REAL NOT NULL,
                    owner TEXT,
                    idempotency_key TEXT,
                    body TEXT NOT NULL
                );
                CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
                CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
                CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs (coalesce(owner, ''), idempotency_key)
                    WHERE idempotency_key IS NOT NULL;
                """
            )

    def group_commits(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on the updates made on ``loop``'s thread are committed together, once per turn of the loop.

        Call it on that loop. Whoever answers a client must :meth:`flush` first (the app's middleware does,
        before every response message), so that nothing is answered before its record is committed.
        """
        self._loop, self._loop_thread = loop, threading.get_ident()

    def flush(self) -> None:
        """Commit the queued updates now, in one transaction (nothing to do when none are queued)."""
        if self._queued:
            with self._lock:
                self._commit_queued()

    def _commit_queued(self) -> None:
        # Under the lock. One transaction; if it fails (a full disk), each update alone, so that one bad
        # write costs only itself; what fails is logged, naming its job.
        queued, self._queued = self._queued, []
        if not queued:
            return
        try:
            self._db.execute("BEGIN")
            try:
                for sql, args in queued:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
                return
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            log.warning("a group commit of %d job writes failed (%s); writing them one by one", len(queued), e)
        for sql, args in queued:
            try:
                self._db.execute(sql, args)
            except sqlite3.Error as e:
                job_id = args[-1]
                log.error("the record of job %s could not be written: %s", job_id, e)

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        """An update: queued for this turn's commit on the loop's thread, else at once (after the queue)."""
        if self._loop is not None and threading.get_ident() == self._loop_thread and not self._loop.is_closed():
            with self._lock:  # a reader on another thread may be taking the queue right now
                if not self._queued:
                    self._loop.call_soon(self.flush)
                self._queued.append((sql, args))
            return
        with self._lock:
            self._commit_queued()
            self._db.execute(sql, args)

    @staticmethod
    def _encode(record: JobRecord) -> str:
        return record_to_json(record)

    @staticmethod
    def _decode(row: sqlite3.Row) -> JobRecord:
        return record_from_json(row["body"])

    def by_idempotency_key(self, owner: str | None, key: str) -> JobRecord | None:
        with self._lock:
            self._commit_queued()
            row = self._db.execute(
                "SELECT body FROM jobs WHERE coalesce(owner, '') = ? AND idempotency_key = ?", (owner or "", key)
            ).fetchone()
        return None if row is None else self._decode(row)

    def insert(self, record: JobRecord) -> JobRecord:
        # Committed at once, never queued: a job is accepted only once its record is, and a failure
        # (a full disk, a key that raced another request) is the request's answer.
        if record.idempotency_key is not None:
            existing = self.by_idempotency_key(record.owner, record.idempotency_key)
            if existing is not None:
                return existing
        try:
            with self._lock:
                self._commit_queued()
                self._db.execute(
                    _INSERT,
                    (
                        record.id,
                        record.status.value,
                        record.created,
                        record.owner,
                        record.idempotency_key,
                        self._encode(record),
                    ),
                )
        except sqlite3.IntegrityError as e:
            # Two requests with the same idempotency key raced; the first one's job wins.
            existing = None
            if record.idempotency_key is not None:
                existing = self.by_idempotency_key(record.owner, record.idempotency_key)
            if existing is None:
                raise DuplicateJob(f"job {record.id} exists already") from e
            return existing
        return record

    def save(self, record: JobRecord) -> None:
        self._write(_UPDATE, (record.status.value, self._encode(record), record.id))

    def claim(self, job_id: str, now: float) -> JobRecord | None:
        with self._lock:
            self._commit_queued()
            # IMMEDIATE: the write lock first, so that another process cannot claim between read and write.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
                record = None if row is None else self._decode(row)
                if record is None or record.status != JobStatus.queued:
                    self._db.execute("COMMIT")
                    return None
                record.status, record.started, record.attempts = JobStatus.running, now, record.attempts + 1
                self._db.execute(_UPDATE, (record.status.value, self._encode(record), record.id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return record

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            self._commit_queued()
            row = self._db.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._decode(row)

    def list_jobs(self, *, owner: str | None, limit: int, before: float | None) -> list[JobRecord]:
        sql, args = list_query("SELECT body FROM jobs", owner=owner, limit=limit, before=before, mark="?")
        with self._lock:
            self._commit_queued()
            rows = self._db.execute(sql, args).fetchall()
        return [self._decode(r) for r in rows]

    def unfinished(self) -> list[JobRecord]:
        with self._lock:
            self._commit_queued()
            rows = self._db.execute(
                "SELECT body FROM jobs WHERE status IN ('queued', 'running') ORDER BY created"
            ).fetchall()
        return [self._decode(r) for r in rows]

    def older_than(self, cutoff: float, limit: int = 500) -> list[JobRecord]:
        with self._lock:
            self._commit_queued()
            rows = self._db.execute(
                "SELECT body FROM jobs WHERE created < ? AND status IN ('succeeded', 'failed', 'canceled') "
                "ORDER BY created LIMIT ?",
                (cutoff, limit),
            ).fetchall()
        return [self._decode(r) for r in rows]

    def finished_since(self, cutoff: float) -> list[JobRecord]:
        with self._lock:
            self._commit_queued()
            rows = self._db.execute(
                "SELECT body FROM jobs WHERE created >= ? AND status IN ('succeeded', 'failed', 'canceled') "
                "ORDER BY created",
                (cutoff,),
            ).fetchall()
        return [self._decode(r) for r in rows]

    def delete(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        with self._lock:
            self._commit_queued()
            self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in job_ids])

    def close(self) -> None:
        with self._lock:
            try:
                self._commit_queued()
            finally:
                self._loop = None
                self._db.close()
