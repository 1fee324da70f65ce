"""Where errors become HTTP responses: one translation, and a shape per dialect.

:func:`describe` turns any exception into a status, an sdgate error body (``{"error": {"type",
"message", ...}}``) and headers; anything unexpected becomes an opaque 500 with an error id that is in
the log. Each router then answers in its own dialect: its routes are a :class:`DialectRoute`
subclass whose :meth:`~DialectRoute.shape` wraps that body (the SageMaker routes in SageMaker's
shape, ``/text2image`` in its Lambda's). Nothing is chosen by path; what no route handles (an unknown
path, a wrong method) gets the native shape from the app's handlers.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdgate.errors import SdgateError, internal_error_body

ErrorParts = tuple[int, dict[str, Any], dict[str, str]]


def _describe_validation_error(err: dict[str, Any]) -> tuple[str, str]:
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    field = ".".join(loc) or "body"
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    if kind == "extra_forbidden":
        return field, f"unknown field {field!r}"
    if kind == "missing":
        return field, f"{field} is required"
    msg = msg.removeprefix("Value error, ")
    if msg.startswith(field.rsplit(".", 1)[-1] + " "):
        return field, msg
    return field, f"{field}: {msg}"


def describe(exc: Exception, request: Request) -> ErrorParts:
    """Status, sdgate error body and headers for ``exc``."""
    if isinstance(exc, SdgateError):
        return exc.status, exc.body(), exc.headers
    if isinstance(exc, RequestValidationError):
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return 400, {"error": {"type": "malformed_request", "message": "the body is not valid JSON"}}, {}
        field, message = _describe_validation_error(errors[0]) if errors else ("body", "invalid request")
        body: dict[str, Any] = {"error": {"type": "invalid_request", "message": message, "field": field}}
        details = [_describe_validation_error(e)[1] for e in errors[1:5]]
        if details:
            body["error"]["details"] = details
        return 422, body, {}
    if isinstance(exc, StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return exc.status_code, {"error": {"type": kind, "message": str(exc.detail)}}, dict(exc.headers or {})
    status, body = internal_error_body(exc, f"{request.method} {request.url.path}")
    return status, body, {}


def native_shape(status: int, body: dict[str, Any], headers: dict[str, str]) -> Response:
    """The native API's error: the sdgate body as it is."""
    return JSONResponse(body, status_code=status, headers=headers)


class DialectRoute(APIRoute):
    """A route that answers errors in its dialect's shape. Subclasses override :meth:`shape`."""

    @staticmethod
    def shape(status: int, body: dict[str, Any], headers: dict[str, str]) -> Response:
        return native_shape(status, body, headers)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        shape = self.shape

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # what reaches a client, authentication and body limits included
                return shape(*describe(exc, request))

        return route


def install_error_handlers(app: FastAPI) -> None:
    """The native shape for everything no dialect route answered (unknown paths, methods, native routes)."""

    async def handle(request: Request, exc: Exception) -> Response:
        return native_shape(*describe(exc, request))

    for kind in (SdgateError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)
