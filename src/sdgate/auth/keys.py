"""API keys: created once, stored only as salted HMAC-SHA256 hashes, checked in constant time.

A key looks like ``sdg_<id>_<secret>``. The id (8 hex) finds the record; the secret is checked
against ``HMAC-SHA256(salt, secret)``. The plain key is shown once, at creation, and never stored.
Per-key daily image quotas are counted here too, so they survive a restart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_PREFIX = "sdg"


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created: float
    revoked: bool
    rate_per_min: int | None
    images_per_day: int | None


class KeyError_(Exception):
    """Base for key check failures (named with a trailing underscore: ``KeyError`` is a builtin)."""


class InvalidKey(KeyError_):
    pass


class RevokedKey(KeyError_):
    pass


def _hash(salt: bytes, secret: str) -> str:
    return hmac.new(salt, secret.encode(), hashlib.sha256).hexdigest()


def _today() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")


class KeyStore:
    """API keys and their daily usage in one SQLite file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS keys (
                    id TEXT PRIMARY KEY, name TEXT NOT NULL, salt BLOB NOT NULL, hash TEXT NOT NULL,
                    created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0,
                    rate_per_min INTEGER, images_per_day INTEGER
                );
                CREATE TABLE IF NOT EXISTS usage (
                    key_id TEXT NOT NULL, day TEXT NOT NULL, images INTEGER NOT NULL,
                    PRIMARY KEY (key_id, day)
                );
                """
            )

    def create(
        self, name: str, rate_per_min: int | None = None, images_per_day: int | None = None
    ) -> tuple[str, ApiKey]:
        """A new key: returns the plain key (show it once) and its record."""
        key_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(24).replace("_", "").replace("-", "")
        salt = secrets.token_bytes(16)
        created = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO keys (id, name, salt, hash, created, rate_per_min, images_per_day) VALUES (?,?,?,?,?,?,?)",
                (key_id, name, salt, _hash(salt, secret), created, rate_per_min, images_per_day),
            )
        return f"{_PREFIX}_{key_id}_{secret}", ApiKey(key_id, name, created, False, rate_per_min, images_per_day)

    def check(self, presented: str) -> ApiKey:
        """The key's record, or :class:`InvalidKey` / :class:`RevokedKey`."""
        parts = presented.strip().split("_")
        if len(parts) != 3 or parts[0] != _PREFIX:
            raise InvalidKey("malformed API key")
        _, key_id, secret = parts
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, salt, hash, created, revoked, rate_per_min, images_per_day FROM keys WHERE id = ?",
                (key_id,),
            ).fetchone()
        # Compare against a dummy when the id is unknown, so timing does not reveal which ids exist.
        salt, stored = (row[2], row[3]) if row else (b"\0" * 16, "0" * 64)
        if not hmac.compare_digest(_hash(salt, secret), stored) or row is None:
            raise InvalidKey("invalid API key")
        record = ApiKey(row[0], row[1], row[4], bool(row[5]), row[6], row[7])
        if record.revoked:
            raise RevokedKey("this API key was revoked")
        return record

    def list(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, created, revoked, rate_per_min, images_per_day FROM keys ORDER BY created"
            ).fetchall()
        return [ApiKey(r[0], r[1], r[2], bool(r[3]), r[4], r[5]) for r in rows]

    def revoke(self, id_or_name: str) -> int:
        """Revoke by id or name; returns how many keys were revoked."""
        with self._lock:
            cur = self._db.execute("UPDATE keys SET revoked = 1 WHERE id = ? OR name = ?", (id_or_name, id_or_name))
        return cur.rowcount

    def count(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT count(*) FROM keys WHERE revoked = 0").fetchone()
        return int(row[0])

    def charge_images(self, key: ApiKey, images: int) -> int | None:
        """Count ``images`` against today's quota. Returns None if allowed, else the quota that would be exceeded."""
        day = _today()
        with self._lock:
            row = self._db.execute("SELECT images FROM usage WHERE key_id = ? AND day = ?", (key.id, day)).fetchone()
            used = int(row[0]) if row else 0
            if key.images_per_day is not None and used + images > key.images_per_day:
                return key.images_per_day
            self._db.execute(
                "INSERT INTO usage (key_id, day, images) VALUES (?, ?, ?) "
                "ON CONFLICT (key_id, day) DO UPDATE SET images = images + excluded.images",
                (key.id, day, images),
            )
        return None

    def close(self) -> None:
        with self._lock:
            self._db.close()
