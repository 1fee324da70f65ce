"""Who may call what: API keys, per-key request rates and daily image quotas.

Open without a key: health (``/healthz``, ``/readyz``, ``/ping``), ``/metrics``, the docs, and
image GETs (their URLs are unguessable). In SageMaker mode ``/invocations`` is open too: IAM
guards the endpoint and SageMaker strips unknown headers. Everything that generates or reads
jobs needs ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

from fastapi import Request

from sdgate.config import Settings
from sdgate.errors import Forbidden, RateLimited, Unauthorized
from sdgate.keys import ApiKey, InvalidKey, KeyStore, RevokedKey
from sdgate.schemas import ErrorBody

_OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/ping", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
_SAGEMAKER_OPEN = frozenset({"/invocations"})
OWNER_SCOPE_KEY = "sdgate.owner"

# In the OpenAPI schema of every route that needs a key (when keys are required).
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no API key, or an unknown or malformed one"},
    403: {"model": ErrorBody, "description": "the API key was revoked"},
}


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


class Guard:
    """The access policy of one app: settings + key store + limiter."""

    def __init__(self, settings: Settings, keys: KeyStore):
        self.settings = settings
        self.keys = keys
        self.limiter = RateLimiter()

    def is_open(self, path: str) -> bool:
        if path in _OPEN_PATHS or path.startswith("/images/"):
            return True
        return self.settings.sagemaker and path in _SAGEMAKER_OPEN

    def authenticate(self, request: Request) -> ApiKey | None:
        """The caller's key, None when no key is needed; raises 401/403/429."""
        if not self.settings.auth_required or self.is_open(request.url.path):
            return None
        presented = _presented_key(request)
        if presented is None:
            raise Unauthorized(
                "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            key = self.keys.check(presented)
        except RevokedKey as e:
            raise Forbidden(str(e)) from None
        except InvalidKey as e:
            raise Unauthorized(str(e), headers={"WWW-Authenticate": "Bearer"}) from None
        per_min = key.rate_per_min or self.settings.rate_limit_per_min
        if request.method == "POST" and per_min is not None:
            wait = self.limiter.hit(key.id, per_min)
            if wait is not None:
                raise RateLimited(
                    f"rate limit of {per_min} requests per minute reached",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )
        return key

    def charge_images(self, key: ApiKey | None, images: int) -> None:
        """Count images against the key's daily quota (persisted); 429 when it would be exceeded."""
        if key is None:
            return
        if key.images_per_day is None and self.settings.images_per_day is not None:
            key = ApiKey(key.id, key.name, key.created, key.revoked, key.rate_per_min, self.settings.images_per_day)
        quota = self.keys.charge_images(key, images)
        if quota is not None:
            now = time.time()
            until_midnight = 86400 - now % 86400
            raise RateLimited(
                f"daily quota of {quota} images reached", headers={"Retry-After": str(int(until_midnight))}
            )


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


async def authenticate(request: Request) -> None:
    """App-wide dependency: checks the key and leaves it (and its id as owner) on ``request.state``.

    Without an sdgate key the owner is what a trusted layer in front put in the ASGI scope under
    ``sdgate.owner`` (the AWS Lambda adapter: the API Gateway key), else nobody. Clients cannot set
    scope entries; only code wrapping the app can.
    """
    guard: Guard = request.app.state.guard
    key = guard.authenticate(request)
    request.state.api_key = key
    request.state.owner = key.id if key else request.scope.get(OWNER_SCOPE_KEY)
