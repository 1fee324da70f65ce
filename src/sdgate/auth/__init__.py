"""Who may call, and what it costs them: API keys, per-key request rates and daily image quotas.

One :class:`Guard` per app authenticates every request and charges every generation, whatever the
surface it came through: the same rate and quota counters hold for the native API, ``/text2image``,
the SageMaker routes and every dialect to come.
"""

from __future__ import annotations

from sdgate.auth.guard import Guard, RateLimiter
from sdgate.auth.keys import ApiKey, InvalidKey, KeyStore, RevokedKey

__all__ = ["ApiKey", "Guard", "InvalidKey", "KeyStore", "RateLimiter", "RevokedKey"]
