"""Durable job records: a small protocol (:class:`JobStore`) and two implementations.

- ``sqlite`` (default): one file under ``SDGATE_DATA_DIR`` (:class:`SqliteJobStore`);
- ``dynamodb``: a DynamoDB table (:class:`sdgate.jobstore.dynamodb.DynamoJobStore`), for AWS Lambda,
  which has no lasting disk. boto3 is imported only when it is chosen;
- ``postgres``: a PostgreSQL database (:class:`sdgate.jobstore.postgres.PostgresJobStore`) that several
  API nodes share, each holding a lease on the jobs it runs (:class:`SharedJobStore`).

``SDGATE_JOB_STORE`` chooses; all behave the same (status, idempotency, ownership, recovery, retention),
and the same tests run against both.
"""

from __future__ import annotations

from sdgate.config import Settings
from sdgate.jobstore.record import DuplicateJob, JobRecord, JobStore, NodeReport, SharedJobStore
from sdgate.jobstore.sqlite import SqliteJobStore

__all__ = [
    "DuplicateJob",
    "JobRecord",
    "JobStore",
    "NodeReport",
    "SharedJobStore",
    "SqliteJobStore",
    "create_job_store",
]


def create_job_store(settings: Settings) -> JobStore:
    """The store the settings name."""
    if settings.job_store == "dynamodb":
        from sdgate.jobstore.dynamodb import DynamoJobStore

        assert settings.dynamodb_table, "Settings checks that job store dynamodb names a table"
        return DynamoJobStore(settings.dynamodb_table, ttl_s=settings.retention_s)
    if settings.job_store == "postgres":
        from sdgate.jobstore.postgres import PostgresJobStore

        assert settings.postgres_url, "Settings checks that job store postgres names a URL"
        return PostgresJobStore(settings.postgres_url, lease_s=settings.node_lease_s)
    return SqliteJobStore(settings.paths.jobs_db)
