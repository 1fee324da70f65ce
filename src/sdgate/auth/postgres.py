"""API keys, their daily quotas and their request rates in PostgreSQL, shared by every API node.

With ``SDGATE_JOB_STORE=postgres`` a key made on one node (``sdgate keys create`` with the same
``SDGATE_POSTGRES_URL``) works on every node, and a key's quota and rate hold across all of them:
each charge is one atomic statement or one short transaction under the key's advisory lock.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sdgate import postgres
from sdgate.auth.keys import KEY_COLUMNS, LIST_COLUMNS, ApiKey, listed, mint, split, today, verified

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

RATE_WINDOW_S = 60.0


class PostgresKeyStore:
    """The :class:`~sdgate.auth.keys.Keys` of several API nodes, and their shared rate limiter."""

    def __init__(self, url: str):
        self.url = url
        self._pool: ConnectionPool = postgres.pool(url)
        self._closed = False

    def create(
        self, name: str, rate_per_min: int | None = None, images_per_day: int | None = None
    ) -> tuple[str, ApiKey]:
        plain, record, salt, hashed = mint(name, rate_per_min, images_per_day)
        with self._pool.connection() as conn:
            conn.execute(
                f"INSERT INTO keys ({KEY_COLUMNS}) VALUES (%s, %s, %s, %s, %s, false, %s, %s)",
                (record.id, name, salt, hashed, record.created, rate_per_min, images_per_day),
            )
        return plain, record

    def check(self, presented: str) -> ApiKey:
        key_id, secret = split(presented)
        with self._pool.connection() as conn:
            row = conn.execute(f"SELECT {KEY_COLUMNS} FROM keys WHERE id = %s", (key_id,)).fetchone()
        return verified(row, secret)

    def list(self) -> list[ApiKey]:
        with self._pool.connection() as conn:
            rows = conn.execute(f"SELECT {LIST_COLUMNS} FROM keys ORDER BY created").fetchall()
        return [listed(r) for r in rows]

    def revoke(self, id_or_name: str) -> int:
        with self._pool.connection() as conn:
            cur = conn.execute("UPDATE keys SET revoked = true WHERE id = %s OR name = %s", (id_or_name, id_or_name))
            return cur.rowcount

    def count(self) -> int:
        with self._pool.connection() as conn:
            row = conn.execute("SELECT count(*) FROM keys WHERE NOT revoked").fetchone()
        return int(row[0]) if row else 0

    def charge_images(self, key: ApiKey, images: int) -> int | None:
        """Count ``images`` against today's quota, atomically across nodes: None if allowed, else the quota."""
        quota = key.images_per_day
        if quota is not None and images > quota:
            return quota
        with self._pool.connection() as conn:
            row = conn.execute(
                "INSERT INTO key_usage (key_id, day, images) VALUES (%s, %s, %s) "
                "ON CONFLICT (key_id, day) DO UPDATE SET images = key_usage.images + excluded.images "
                "WHERE %s::integer IS NULL OR key_usage.images + excluded.images <= %s::integer RETURNING images",
                (key.id, today(), images, quota, quota),
            ).fetchone()
        return None if row is not None else quota

    def hit(self, key_id: str, per_min: int) -> float | None:
        """A request in the key's sliding one-minute window, counted across nodes: None if allowed, else the
        seconds until the next one would be. (The SQLite setup counts in memory, per process.)"""
        now = time.time()
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('sdgate-rate:' || %s))", (key_id,))
            conn.execute("DELETE FROM key_hits WHERE key_id = %s AND at <= %s", (key_id, now - RATE_WINDOW_S))
            row = conn.execute("SELECT count(*), min(at) FROM key_hits WHERE key_id = %s", (key_id,)).fetchone()
            count, oldest = (int(row[0]), row[1]) if row else (0, None)
            if count >= per_min and oldest is not None:
                return max(0.0, RATE_WINDOW_S - (now - float(oldest)))
            conn.execute("INSERT INTO key_hits (key_id, at) VALUES (%s, %s)", (key_id, now))
        return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            postgres.release(self.url)
