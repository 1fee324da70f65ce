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
from typing import Any, Protocol

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


def today() -> str:
    """The quota's day (UTC), as both key stores count it."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")


KEY_COLUMNS = "id, name, salt, hash, created, revoked, rate_per_min, images_per_day"
"""A key's row, in the order :func:`verified` reads it (both key stores have these columns)."""
LIST_COLUMNS = "id, name, created, revoked, rate_per_min, images_per_day"


def mint(name: str, rate_per_min: int | None, images_per_day: int | None) -> tuple[str, ApiKey, bytes, str]:
    """A new key: the plain key (shown once), its record, and the salt and hash to store (never the key)."""
    key_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(24).replace("_", "").replace("-", "")
    salt = secrets.token_bytes(16)
    record = ApiKey(key_id, name, time.time(), False, rate_per_min, images_per_day)
    return f"{_PREFIX}_{key_id}_{secret}", record, salt, _hash(salt, secret)


def split(presented: str) -> tuple[str, str]:
    """(id, secret) of a presented key, or :class:`InvalidKey` when it is not shaped like one."""
    parts = presented.strip().split("_")
    if len(parts) != 3 or parts[0] != _PREFIX:
        raise InvalidKey("malformed API key")
    return parts[1], parts[2]


def verified(row: Any, secret: str) -> ApiKey:
    """The record of a key's row (``KEY_COLUMNS``; None when its id is unknown) if ``secret`` is its secret.

    Compares against a dummy when the id is unknown, so that timing does not reveal which ids exist.
    """
    salt, stored = (bytes(row[2]), row[3]) if row else (b"\0" * 16, "0" * 64)
    if not hmac.compare_digest(_hash(salt, secret), stored) or row is None:
        raise InvalidKey("invalid API key")
    record = ApiKey(row[0], row[1], row[4], bool(row[5]), row[6], row[7])
    if record.revoked:
        raise RevokedKey("this API key was revoked")
    return record


def listed(row: Any) -> ApiKey:
    """The record of a ``LIST_COLUMNS`` row."""
    return ApiKey(row[0], row[1], row[2], bool(row[3]), row[4], row[5])


class Keys(Protocol):
    """Where API keys and their daily usage live: :class:`KeyStore` (SQLite, under the data dir) or
    :class:`~sdgate.auth.postgres.PostgresKeyStore` (shared by several API nodes)."""

    def create(
        self, name: str, rate_per_min: int | None = None, images_per_day: int | None = None
    ) -> tuple[str, ApiKey]: ...

    def check(self, presented: str) -> ApiKey: ...

    def list(self) -> list[ApiKey]: ...

    def revoke(self, id_or_name: str) -> int: ...

    def count(self) -> int: ...

    def charge_images(self, key: ApiKey, images: int) -> int | None: ...

    def close(self) -> None: ...


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
        plain, record, salt, hashed = mint(name, rate_per_min, images_per_day)
        with self._lock:
            self._db.execute(
                f"INSERT INTO keys ({KEY_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                (record.id, name, salt, hashed, record.created, 0, rate_per_min, images_per_day),
            )
        return plain, record

    def check(self, presented: str) -> ApiKey:
        """The key's record, or :class:`InvalidKey` / :class:`RevokedKey`."""
        key_id, secret = split(presented)
        with self._lock:
            row = self._db.execute(f"SELECT {KEY_COLUMNS} FROM keys WHERE id = ?", (key_id,)).fetchone()
        return verified(row, secret)

    def list(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute(f"SELECT {LIST_COLUMNS} FROM keys ORDER BY created").fetchall()
        return [listed(r) for r in rows]

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
        day = today()
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
