"""The access policy of one app: which key is calling, and charging its generations."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import replace
from typing import Protocol, runtime_checkable

from sdgate.auth.keys import ApiKey, InvalidKey, Keys, RevokedKey
from sdgate.config import Settings
from sdgate.errors import Forbidden, RateLimited, Unauthorized


class RateLimiter:
    """Sliding one-minute window of request times per key (in memory: a restart forgives)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hits: dict[str, deque[float]] = {}

    def hit(self, key_id: str, per_min: int) -> float | None:
        """Record a request; None if allowed, else seconds until the next one would be."""
        now = time.monotonic()
        with self._lock:
            window = self._hits.setdefault(key_id, deque())
            while window and now - window[0] >= 60:
                window.popleft()
            if len(window) >= per_min:
                return 60 - (now - window[0])
            window.append(now)
        return None


@runtime_checkable
class Limiter(Protocol):
    """Counts a key's requests: :class:`RateLimiter` (this process) or the PostgreSQL key store (every node)."""

    def hit(self, key_id: str, per_min: int) -> float | None: ...


class Guard:
    """Settings + key store + limiter: authenticates callers and charges their generations."""

    def __init__(self, settings: Settings, keys: Keys, limiter: Limiter | None = None):
        self.settings = settings
        self.keys = keys
        self.limiter: Limiter = limiter or RateLimiter()

    def authenticate(self, presented: str | None) -> ApiKey:
        """The key behind ``presented``; 401 for none or an unknown one, 403 for a revoked one."""
        if presented is None:
            raise Unauthorized(
                "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            return self.keys.check(presented)
        except RevokedKey as e:
            raise Forbidden(str(e)) from None
        except InvalidKey as e:
            raise Unauthorized(str(e), headers={"WWW-Authenticate": "Bearer"}) from None

    def charge(self, key: ApiKey | None, images: int) -> None:
        """One generation request of ``images`` images: counted against the key's rate, then its daily quota.

        429 when either is used up; a request refused for its rate is not charged images. Without a
        key (auth off, an open route) nothing is counted.
        """
        if key is None:
            return
        per_min = key.rate_per_min or self.settings.rate_limit_per_min
        if per_min is not None:
            wait = self.limiter.hit(key.id, per_min)
            if wait is not None:
                raise RateLimited(
                    f"rate limit of {per_min} requests per minute reached",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        if key.images_per_day is None and self.settings.images_per_day is not None:
            key = replace(key, images_per_day=self.settings.images_per_day)
        quota = self.keys.charge_images(key, images)
        if quota is not None:
            until_midnight = 86400 - time.time() % 86400
            raise RateLimited(
                f"daily quota of {quota} images reached", headers={"Retry-After": str(int(until_midnight))}
            )
