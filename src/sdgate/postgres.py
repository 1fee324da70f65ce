"""PostgreSQL for state that several API nodes share: one connection pool per process, and the schema.

``SDGATE_JOB_STORE=postgres`` with ``SDGATE_POSTGRES_URL`` puts job records
(:mod:`sdgate.jobstore.postgres`), API keys with their rate and quota counters
(:mod:`sdgate.auth.postgres`) and the nodes' leases in one database, through psycopg 3 and its pool.

The schema is made and upgraded here, in code: numbered steps, each applied once, in order, in one
transaction under an advisory lock, so that nodes starting together never race and a node that
finds the schema newer than it knows refuses to start rather than misread it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

log = logging.getLogger("sdgate.postgres")

MIGRATIONS: tuple[str, ...] = (
    # 1: jobs, with the node that owns each unfinished one; nodes and their leases; keys and counters.
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        owner TEXT,
        idempotency_key TEXT,
        node TEXT,
        step INTEGER NOT NULL DEFAULT 0,
        body JSONB NOT NULL
    );
    CREATE INDEX jobs_created ON jobs (created);
    CREATE INDEX jobs_owner_created ON jobs (owner, created);
    CREATE INDEX jobs_unfinished ON jobs (node) WHERE status IN ('queued', 'running');
    CREATE INDEX jobs_node_created ON jobs (node, created);
    CREATE UNIQUE INDEX jobs_idem ON jobs (coalesce(owner, ''), idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE TABLE nodes (
        id TEXT PRIMARY KEY,
        started DOUBLE PRECISION NOT NULL,
        lease_until DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        salt BYTEA NOT NULL,
        hash TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        revoked BOOLEAN NOT NULL DEFAULT false,
        rate_per_min INTEGER,
        images_per_day INTEGER
    );
    CREATE TABLE key_usage (
        key_id TEXT NOT NULL,
        day TEXT NOT NULL,
        images INTEGER NOT NULL,
        PRIMARY KEY (key_id, day)
    );
    CREATE TABLE key_hits (
        key_id TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX key_hits_key_at ON key_hits (key_id, at);
    """,
)
"""The schema's steps: append, never edit one that has shipped (a database that applied it keeps it)."""

_LOCK_ID = 0x5D6A7E  # the advisory lock that serializes schema changes across nodes

_pools: dict[str, ConnectionPool] = {}
_users: dict[str, int] = {}
_guard = threading.Lock()


class SchemaTooNew(RuntimeError):
    """The database was upgraded by a newer sdgate: this one would misread it."""


def migrate(pool: ConnectionPool) -> int:
    """Apply the steps the database lacks; returns its version. Idempotent, and safe for nodes that race."""
    with pool.connection() as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS sdgate_schema (version INTEGER PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM sdgate_schema").fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise SchemaTooNew(
                f"the database's schema is version {version}, newer than this sdgate knows ({len(MIGRATIONS)}): "
                "upgrade sdgate on this node"
            )
        for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.execute(step)
            conn.execute("INSERT INTO sdgate_schema (version, applied) VALUES (%s, %s)", (number, time.time()))
            log.info("PostgreSQL schema upgraded to version %d", number)
        return len(MIGRATIONS)


def pool(url: str) -> ConnectionPool:
    """The process's pool for ``url``, opened (and the schema brought up to date) on first use.

    Shared by the job store and the key store of a process; each :func:`release` ends one use, and
    the last closes it. A server that cannot be reached is a clear error at start, not a hang.
    """
    from psycopg_pool import ConnectionPool

    with _guard:
        existing = _pools.get(url)
        if existing is not None:
            _users[url] += 1
            return existing
        # One plain connection first: it fails at once with the server's own reason (refused, no such
        # database, bad password), where a pool would retry until its timeout and say only that.
        import psycopg

        try:
            psycopg.connect(url, connect_timeout=10).close()
        except psycopg.Error as e:
            raise ConnectionError(f"cannot reach PostgreSQL at {_redacted(url)}: {str(e).strip()}") from None
        opened: ConnectionPool = ConnectionPool(
            url, min_size=1, max_size=16, kwargs={"autocommit": True}, open=False, name="sdgate"
        )
        try:
            opened.open(wait=True, timeout=15)
        except Exception as e:
            opened.close()
            raise ConnectionError(f"cannot reach PostgreSQL at {_redacted(url)}: {e}") from None
        migrate(opened)
        _pools[url], _users[url] = opened, 1
        return opened


def release(url: str) -> None:
    """One user of the pool is done; the last one closes it."""
    with _guard:
        if url not in _pools:
            return
        _users[url] -= 1
        if _users[url] <= 0:
            _pools.pop(url).close()
            del _users[url]


def _redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{host}"
