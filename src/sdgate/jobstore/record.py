"""A job's durable record, and the small protocol every job store implements."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from sdgate.schemas import ErrorInfo, GenerationParams, JobStatus, StoredImage, Surface, Timings, WebhookState


class JobRecord(BaseModel):
    """Everything about a job that must survive a restart: one JSON document in every store."""

    id: str
    status: JobStatus
    created: float
    params: GenerationParams
    model: str
    surface: Surface | None = None  # None on records written before surfaces were recorded
    owner: str | None = None
    user: str | None = None  # the end user a caller named (OpenAI's ``user``), for its own records
    idempotency_key: str | None = None
    request_hash: str | None = None
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    step: int = 0
    base_url: str | None = None
    images: list[StoredImage] = Field(default_factory=list)
    error: ErrorInfo | None = None
    timings: Timings | None = None  # set when the job ends
    webhook: WebhookState | None = None


class DuplicateJob(ValueError):
    """A record with this id exists already (ids are random: this is a bug, never a user error)."""


def list_query(
    table_sql: str, *, owner: str | None, limit: int, before: float | None, mark: str
) -> tuple[str, list[Any]]:
    """The SQL stores' ``list_jobs`` query: ``table_sql`` (``SELECT ... FROM jobs``) filtered by owner and
    ``before``, newest first; ``mark`` is the driver's placeholder (``?`` or ``%s``)."""
    sql = table_sql + " WHERE 1=1"
    args: list[Any] = []
    if owner is not None:
        sql += f" AND owner = {mark}"
        args.append(owner)
    if before is not None:
        sql += f" AND created < {mark}"
        args.append(before)
    return sql + f" ORDER BY created DESC LIMIT {mark}", [*args, limit]


def record_to_json(record: JobRecord) -> str:
    """The whole record as one JSON document: the body every store keeps."""
    return record.model_dump_json()


def record_from_json(text: str) -> JobRecord:
    return JobRecord.model_validate_json(text)


class JobStore(Protocol):
    """Where job records live: :class:`~sdgate.jobstore.SqliteJobStore` (default, one file under the
    data dir) or :class:`~sdgate.jobstore.dynamodb.DynamoJobStore` (a DynamoDB table, for AWS Lambda)."""

    def insert(self, record: JobRecord) -> JobRecord:
        """Store a new record; if its (owner, idempotency_key) exists, return the existing one instead.

        Atomic: of two inserts racing with one key, exactly one record is stored and both get it.
        A second record with an existing id raises :class:`DuplicateJob`.
        """
        ...

    def save(self, record: JobRecord) -> None:
        """Write every field of an existing record (a record that is gone stays gone)."""
        ...

    def claim(self, job_id: str, now: float) -> JobRecord | None:
        """Move a queued job to running (``started=now``, one more attempt) and return it.

        None when it is not queued (another worker claimed it, it was canceled, it is gone): a job
        handed to workers more than once still runs once.
        """
        ...

    def by_idempotency_key(self, owner: str | None, key: str) -> JobRecord | None: ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def list_jobs(self, *, owner: str | None, limit: int, before: float | None) -> list[JobRecord]:
        """Newest first; ``before`` is the ``created`` of the last record of the previous page."""
        ...

    def unfinished(self) -> list[JobRecord]:
        """Jobs that were queued or running, oldest first (for recovery after a restart)."""
        ...

    def older_than(self, cutoff: float, limit: int = 500) -> list[JobRecord]:
        """Terminal jobs created before ``cutoff``, oldest first."""
        ...

    def finished_since(self, cutoff: float) -> list[JobRecord]:
        """Terminal jobs created at or after ``cutoff``, oldest first (for webhooks owed after a restart)."""
        ...

    def delete(self, job_ids: list[str]) -> None: ...

    def close(self) -> None: ...


class NodeReport(NamedTuple):
    """What a node's heartbeat learns about the jobs it runs."""

    canceled: dict[str, JobRecord]
    """Canceled by another node: stop them (their records say so already)."""
    lost: set[str]
    """Taken over by another node (this one's lease had expired): stop them and write nothing more."""


@runtime_checkable
class SharedJobStore(JobStore, Protocol):
    """A store that several API nodes share at once (:class:`~sdgate.jobstore.postgres.PostgresJobStore`).

    Each node holds a lease; :meth:`JobStore.unfinished` and :meth:`JobStore.finished_since` take over
    only what nodes that are gone left behind.
    """

    node_id: str
    lease_s: float

    def heartbeat(self, live: dict[str, int]) -> NodeReport:
        """Renew the lease, record the running jobs' steps (``live``: id → step), report on them."""
        ...

    def leave(self) -> None:
        """Give the lease up (a clean stop): the other nodes take the unfinished jobs over at once."""
        ...
