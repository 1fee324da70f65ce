"""Who may call, and what it costs them: API keys, per-key request rates and daily image quotas.

One :class:`Guard` per app authenticates every request and charges every generation, whatever the
surface it came through: the same rate and quota counters hold for the native API, ``/text2image``,
the SageMaker routes and every dialect to come.
"""

from __future__ import annotations

from sdgate.auth.guard import Guard, Limiter, RateLimiter
from sdgate.auth.keys import ApiKey, InvalidKey, Keys, KeyStore, RevokedKey
from sdgate.config import Settings

__all__ = [
    "ApiKey",
    "Guard",
    "InvalidKey",
    "KeyStore",
    "Keys",
    "Limiter",
    "RateLimiter",
    "RevokedKey",
    "create_guard",
    "open_keys",
]


def open_keys(settings: Settings) -> Keys:
    """The key store the settings name: PostgreSQL with job store postgres (shared by every node), else
    SQLite under the data dir."""
    if settings.job_store == "postgres":
        from sdgate.auth.postgres import PostgresKeyStore

        assert settings.postgres_url, "Settings checks that job store postgres names a URL"
        return PostgresKeyStore(settings.postgres_url)
    return KeyStore(settings.paths.keys_db)


def create_guard(settings: Settings) -> Guard:
    """The app's guard: its key store, and a rate limiter shared by every node when the keys are."""
    keys = open_keys(settings)
    limiter = keys if isinstance(keys, Limiter) else None
    return Guard(settings, keys, limiter)
