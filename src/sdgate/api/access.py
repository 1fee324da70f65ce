"""The app-wide dependency that finds the caller: its API key (when keys are required) and owner.

Open without a key: health (``/healthz``, ``/readyz``, ``/ping``), ``/metrics``, the docs, the
playground's static files (``/`` and ``/playground/``: the page asks for a key itself), and
image GETs (their URLs are unguessable). In SageMaker mode ``/invocations`` is open too: IAM
guards the endpoint and SageMaker strips unknown headers. Everything that generates or reads
jobs needs ``Authorization: Bearer <key>``, ``X-API-Key: <key>``, or HTTP Basic with the key as the
password (as webui clients send it). Charging a generation is
the generation service's step, not this one's: it happens once per generation, on every surface.
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import Request

from sdgate.api.playground import PREFIX as PLAYGROUND_PREFIX
from sdgate.auth import Guard
from sdgate.generation import Caller
from sdgate.schemas import ErrorBody

_OPEN_PATHS = frozenset(
    {"/", "/healthz", "/readyz", "/ping", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
_OPEN_PREFIXES = ("/images/", PLAYGROUND_PREFIX)
_SAGEMAKER_OPEN = frozenset({"/invocations"})
OWNER_SCOPE_KEY = "sdgate.owner"

# In the OpenAPI schema of every route that needs a key (when keys are required).
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no API key, or an unknown or malformed one"},
    403: {"model": ErrorBody, "description": "the API key was revoked"},
}


def is_open(guard: Guard, path: str) -> bool:
    if path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES):
        return True
    return guard.settings.sagemaker and path in _SAGEMAKER_OPEN


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    if auth.lower().startswith("basic "):
        # HTTP Basic, as webui clients send it (webuiapi's username/password): the key is the password.
        try:
            _user, _, password = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return "malformed"  # refused like any unknown key
        return password or None
    return request.headers.get("x-api-key") or None


async def authenticate(request: Request) -> None:
    """Checks the key and leaves the caller on ``request.state.caller`` (its key, owner and base URL).

    Without an sdgate key the owner is what a trusted layer in front put in the ASGI scope under
    ``sdgate.owner`` (the AWS Lambda adapter: the API Gateway key), else nobody. Clients cannot set
    scope entries; only code wrapping the app can.
    """
    guard: Guard = request.app.state.guard
    key = None
    if guard.settings.auth_required and not is_open(guard, request.url.path):
        key = guard.authenticate(_presented_key(request))
    owner = key.id if key else request.scope.get(OWNER_SCOPE_KEY)
    request.state.caller = Caller(key=key, owner=owner, base_url=str(request.base_url))


def caller_of(request: Request) -> Caller:
    caller: Caller = request.state.caller
    return caller
