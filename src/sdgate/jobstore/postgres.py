"""Job records in PostgreSQL, shared by several API nodes (``SDGATE_JOB_STORE=postgres``).

Every node reads and writes the same records, so a job made on one node is read, followed and
canceled from any other. Each unfinished job names the node that runs it, and each node holds a
lease (a row in ``nodes``) that it renews every third of ``SDGATE_NODE_LEASE_S``:

- a node that stops cleanly gives its lease up, one that dies lets it expire; either way the live
  nodes' sweeps then take its queued and interrupted jobs over, each job by exactly one node
  (``FOR UPDATE SKIP LOCKED``), and run them as a restart would (a job interrupted twice fails);
- a node that finds one of its jobs taken over (it lost its lease, paused too long) stops it and
  writes nothing more of it: no job runs twice at the same time with both writing;
- a terminal record is never overwritten by another status, so a cancel from another node wins
  over a run that ends a moment later; the running node sees the cancel at its next heartbeat.

Progress between steps goes to the ``step`` column at each heartbeat (not into the record), so other
nodes' event streams show it.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from sdgate import postgres
from sdgate.jobstore.record import DuplicateJob, JobRecord, NodeReport, list_query, record_from_json, record_to_json
from sdgate.schemas import JobStatus

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

_TERMINAL = ("succeeded", "failed", "canceled")
_ORPHANS_AT_ONCE = 100


class PostgresJobStore:
    """Job records in a PostgreSQL database; this process is one node among several."""

    shared = True

    def __init__(self, url: str, *, lease_s: float = 15.0, node_id: str | None = None):
        self.url = url
        self.lease_s = lease_s
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self._pool: ConnectionPool = postgres.pool(url)
        self._closed = False
        self._renew()

    # -- the node's lease -----------------------------------------------------------------------

    def _renew(self) -> None:
        now = time.time()
        with self._pool.connection() as conn:
            conn.execute(
                "INSERT INTO nodes (id, started, lease_until) VALUES (%s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET lease_until = excluded.lease_until",
                (self.node_id, now, now + self.lease_s),
            )

    def heartbeat(self, live: dict[str, int]) -> NodeReport:
        """Renew this node's lease and record the steps of its running jobs (``live``: id → step).

        Returns those of ``live`` that another node canceled (with their records) and those another
        node took over (this one must stop them without writing).
        """
        self._renew()
        if not live:
            return NodeReport({}, set())
        ids = list(live)
        with self._pool.connection() as conn:
            with conn.cursor() as cur:
                cur.executemany(
                    "UPDATE jobs SET step = %s WHERE id = %s AND node = %s AND status = 'running'",
                    [(step, job_id, self.node_id) for job_id, step in live.items()],
                )
            rows = conn.execute("SELECT id, status, node, body FROM jobs WHERE id = ANY(%s)", (ids,)).fetchall()
        canceled: dict[str, JobRecord] = {}
        lost: set[str] = set()
        for job_id, status, node, body in rows:
            if status == JobStatus.canceled.value:
                canceled[job_id] = _decode(body)
            elif status not in _TERMINAL and node != self.node_id:
                lost.add(job_id)
        return NodeReport(canceled, lost)

    def leave(self) -> None:
        """Give the lease up at once: the live nodes take this one's unfinished jobs at their next sweep."""
        with self._pool.connection() as conn:
            conn.execute("DELETE FROM nodes WHERE id = %s", (self.node_id,))

    # -- the JobStore protocol ------------------------------------------------------------------

    def insert(self, record: JobRecord) -> JobRecord:
        if record.idempotency_key is not None:
            existing = self.by_idempotency_key(record.owner, record.idempotency_key)
            if existing is not None:
                return existing
        with self._pool.connection() as conn:
            row = conn.execute(
                "INSERT INTO jobs (id, status, created, owner, idempotency_key, node, step, body) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING id",
                (
                    record.id,
                    record.status.value,
                    record.created,
                    record.owner,
                    record.idempotency_key,
                    self.node_id,
                    record.step,
                    record_to_json(record),
                ),
            ).fetchone()
        if row is not None:
            return record
        # Nothing inserted: the id exists (a bug), or the (owner, idempotency key) does (two requests with one
        # key raced past the lookup): the first one's job wins.
        if record.idempotency_key is not None:
            existing = self.by_idempotency_key(record.owner, record.idempotency_key)
            if existing is not None:
                return existing
        raise DuplicateJob(f"job {record.id} exists already")

    def save(self, record: JobRecord) -> None:
        # A terminal record keeps its status: another status written over it is dropped (a run that ended
        # after another node canceled it); the same status may be written again (its webhook's attempts).
        with self._pool.connection() as conn:
            conn.execute(
                "UPDATE jobs SET status = %s, step = %s, body = %s "
                "WHERE id = %s AND (status NOT IN ('succeeded', 'failed', 'canceled') OR status = %s)",
                (record.status.value, record.step, record_to_json(record), record.id, record.status.value),
            )

    def claim(self, job_id: str, now: float) -> JobRecord | None:
        with self._pool.connection() as conn, conn.transaction():
            row = conn.execute("SELECT body FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
            record = None if row is None else _decode(row[0])
            if record is None or record.status != JobStatus.queued:
                return None
            record.status, record.started, record.attempts = JobStatus.running, now, record.attempts + 1
            conn.execute(
                "UPDATE jobs SET status = %s, node = %s, body = %s WHERE id = %s",
                (record.status.value, self.node_id, record_to_json(record), record.id),
            )
        return record

    def by_idempotency_key(self, owner: str | None, key: str) -> JobRecord | None:
        with self._pool.connection() as conn:
            row = conn.execute(
                "SELECT body, step FROM jobs WHERE coalesce(owner, '') = %s AND idempotency_key = %s",
                (owner or "", key),
            ).fetchone()
        return None if row is None else _decode(row[0], row[1])

    def get(self, job_id: str) -> JobRecord | None:
        with self._pool.connection() as conn:
            row = conn.execute("SELECT body, step FROM jobs WHERE id = %s", (job_id,)).fetchone()
        return None if row is None else _decode(row[0], row[1])

    def list_jobs(self, *, owner: str | None, limit: int, before: float | None) -> list[JobRecord]:
        sql, args = list_query("SELECT body, step FROM jobs", owner=owner, limit=limit, before=before, mark="%s")
        with self._pool.connection() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [_decode(body, step) for body, step in rows]

    def unfinished(self) -> list[JobRecord]:
        """Takes over the unfinished jobs of nodes that are gone (lease expired or given up), oldest first.

        Not the live nodes' jobs: they are running them. Each orphan goes to exactly one node.
        """
        return self._take_over("j.status IN ('queued', 'running')", (), limit=_ORPHANS_AT_ONCE)

    def older_than(self, cutoff: float, limit: int = 500) -> list[JobRecord]:
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT body FROM jobs WHERE created < %s AND status IN ('succeeded', 'failed', 'canceled') "
                "ORDER BY created LIMIT %s",
                (cutoff, limit),
            ).fetchall()
        return [_decode(r[0]) for r in rows]

    def finished_since(self, cutoff: float) -> list[JobRecord]:
        """Takes over the ended jobs since ``cutoff`` of nodes that are gone, oldest first: recovery delivers
        the webhooks they still owed. A live node's jobs are not touched; each goes to one node, once."""
        return self._take_over("j.created >= %s AND j.status IN ('succeeded', 'failed', 'canceled')", (cutoff,))

    def _take_over(self, where: str, args: tuple[Any, ...], limit: int | None = None) -> list[JobRecord]:
        """The jobs matching ``where`` whose node is gone, oldest first, made this node's in one transaction.

        ``FOR UPDATE SKIP LOCKED``: nodes that sweep at the same moment each get other rows, never the same.
        """
        sql = (
            f"SELECT j.id, j.body FROM jobs j WHERE {where} AND (j.node IS NULL OR j.node <> %s) "
            "AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = j.node AND n.lease_until > %s) ORDER BY j.created"
        )
        params: tuple[Any, ...] = (*args, self.node_id, time.time())
        if limit is not None:
            sql += " LIMIT %s"
            params = (*params, limit)
        with self._pool.connection() as conn, conn.transaction():
            rows = conn.execute(sql + " FOR UPDATE OF j SKIP LOCKED", params).fetchall()
            if rows:
                conn.execute("UPDATE jobs SET node = %s WHERE id = ANY(%s)", (self.node_id, [r[0] for r in rows]))
        return [_decode(body) for _, body in rows]

    def delete(self, job_ids: list[str]) -> None:
        if job_ids:
            with self._pool.connection() as conn:
                conn.execute("DELETE FROM jobs WHERE id = ANY(%s)", (job_ids,))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.leave()
        finally:
            postgres.release(self.url)


def _decode(body: Any, step: int | None = None) -> JobRecord:
    # psycopg returns JSONB as parsed JSON; the record is validated from it like every store's body.
    record = JobRecord.model_validate(body) if not isinstance(body, str) else record_from_json(body)
    if step is not None and record.status == JobStatus.running:
        record.step = step  # the running node's latest heartbeat
    return record
