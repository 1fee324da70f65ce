"""ASGI middleware: a cap on request bodies (enforced while reading), request ids, access log, HTTP metrics."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdgate import logs
from sdgate.metrics import Metrics

_access = logging.getLogger("sdgate.access")
F = TypeVar("F", bound=Callable[..., Any])


def takes_images(endpoint: F) -> F:
    """Mark a route whose body may carry input images: its body limit is ``SDGATE_MAX_UPLOAD_BYTES``."""
    endpoint.takes_images = True  # type: ignore[attr-defined]
    return endpoint


class BodyLimit:
    """Refuses request bodies over their limit with 413, while they are read.

    The limit is ``max_bytes``, or ``upload_bytes`` where the route is marked :func:`takes_images`;
    the route is known by then, since the refusal is raised when the route reads the body (a
    ``Content-Length`` over the limit on the first read, before any byte is taken). So it also
    reaches that route's error shape: an oversized SageMaker request gets a SageMaker-shaped error.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, upload_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = upload_bytes or max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = 0
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            endpoint = getattr(scope.get("route"), "endpoint", None)  # set by the router before any read
            limit = self.upload_bytes if getattr(endpoint, "takes_images", False) else self.max_bytes
            if declared > limit:
                raise self._too_large(limit)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise self._too_large(limit)
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self, limit: int) -> HTTPException:
        # An HTTPException passes through FastAPI's body parsing unchanged (other exceptions there
        # become a generic 400) and reaches the route's error shape.
        return HTTPException(413, f"request body exceeds {limit} bytes")


_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestContext:
    """Request id in and out (``X-Request-Id``), one access-log line and HTTP metrics per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        # A client's id is kept only if it is harmless in headers and logs (no header injection).
        rid = incoming if _REQUEST_ID_OK.match(incoming) else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - start
            self.metrics.http_requests.labels(template, scope["method"], str(status)).inc()
            self.metrics.http_latency.labels(template).observe(elapsed)
            if template not in ("/healthz", "/readyz", "/ping", "/metrics"):
                _access.info(
                    "%s %s %d",
                    scope["method"],
                    template,
                    status,
                    extra={
                        "method": scope["method"],
                        "route": template,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )
            logs.request_id.reset(token)
