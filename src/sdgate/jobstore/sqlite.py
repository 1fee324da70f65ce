"""Job records in SQLite: the default store, one file under ``SDGATE_DATA_DIR``.

A record is written when a job is accepted, when it starts, and when it ends; progress between
steps stays in memory. The database lives under ``SDGATE_DATA_DIR`` in WAL mode, so readers never
block the writer and a crash loses nothing that was committed.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from sdgate.jobstore.record import DuplicateJob, JobRecord, list_query, record_from_json, record_to_json
from sdgate.schemas import JobStatus


class SqliteJobStore:
    """Job records in one SQLite file. Thread-safe: one connection behind a lock."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
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

    @staticmethod
    def _encode(record: JobRecord) -> str:
        return record_to_json(record)

    @staticmethod
    def _decode(row: sqlite3.Row) -> JobRecord:
        return record_from_json(row["body"])

    def by_idempotency_key(self, owner: str | None, key: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT body FROM jobs WHERE coalesce(owner, '') = ? AND idempotency_key = ?", (owner or "", key)
            ).fetchone()
        return None if row is None else self._decode(row)

    def insert(self, record: JobRecord) -> JobRecord:
        if record.idempotency_key is not None:
            existing = self.by_idempotency_key(record.owner, record.idempotency_key)
            if existing is not None:
                return existing
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO jobs (id, status, created, owner, idempotency_key, body) VALUES (?, ?, ?, ?, ?, ?)",
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
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, body = ? WHERE id = ?",
                (record.status.value, self._encode(record), record.id),
            )

    def claim(self, job_id: str, now: float) -> JobRecord | None:
        with self._lock:
            # IMMEDIATE: the write lock first, so that another process cannot claim between read and write.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
                record = None if row is None else self._decode(row)
                if record is None or record.status != JobStatus.queued:
                    self._db.execute("COMMIT")
                    return None
                record.status, record.started, record.attempts = JobStatus.running, now, record.attempts + 1
                self._db.execute(
                    "UPDATE jobs SET status = ?, body = ? WHERE id = ?",
                    (record.status.value, self._encode(record), record.id),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return record

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._decode(row)

    def list_jobs(self, *, owner: str | None, limit: int, before: float | None) -> list[JobRecord]:
        sql, args = list_query("SELECT body FROM jobs", owner=owner, limit=limit, before=before, mark="?")
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [self._decode(r) for r in rows]

    def unfinished(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM jobs WHERE status IN ('queued', 'running') ORDER BY created"
            ).fetchall()
        return [self._decode(r) for r in rows]

    def older_than(self, cutoff: float, limit: int = 500) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM jobs WHERE created < ? AND status IN ('succeeded', 'failed', 'canceled') "
                "ORDER BY created LIMIT ?",
                (cutoff, limit),
            ).fetchall()
        return [self._decode(r) for r in rows]

    def finished_since(self, cutoff: float) -> list[JobRecord]:
        with self._lock:
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
            self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in job_ids])

    def close(self) -> None:
        with self._lock:
            self._db.close()
