"""The one place where errors become HTTP responses.

Native routes answer ``{"error": {"type", "message", ...}}``; SageMaker routes answer in the shape
SageMaker clients parse (``{"ErrorCode", "Message"}`` and the ``x-amzn-ErrorType`` header that botocore
reads the code from, plus the same ``error`` object); the original design's ``/text2image`` routes add
its Lambda's ``{"statusCode", "body"}``. Anything unexpected becomes an opaque 500 with an error id
that is in the log.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdgate.errors import SdgateError, internal_error_body

_SAGEMAKER_PATHS = ("/invocations", "/endpoints/")
# SageMaker's runtime maps model errors to 424 ModelError and validation to 400.
_SAGEMAKER_STATUS = {415: 400, 422: 400, 500: 424, 502: 424}
_SAGEMAKER_CODES = {
    400: "ValidationError",
    413: "ValidationError",
    415: "ValidationError",
    424: "ModelError",
    429: "ThrottlingException",
    503: "ServiceUnavailable",
}


def _respond(
    request: Request, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> JSONResponse:
    path = request.url.path
    if path.startswith(_SAGEMAKER_PATHS):
        status = _SAGEMAKER_STATUS.get(status, status)
        err = body.get("error", {})
        code = _SAGEMAKER_CODES.get(status, "InternalFailure")
        body = {"ErrorCode": code, "Message": err.get("message", ""), **body}
        headers = {**(headers or {}), "x-amzn-ErrorType": code}
    elif path == "/text2image":
        body = {"statusCode": status, "body": body.get("error", {}).get("message", ""), **body}
    return JSONResponse(body, status_code=status, headers=headers)


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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SdgateError)
    async def _sdgate_error(request: Request, exc: SdgateError) -> JSONResponse:
        return _respond(request, exc.status, exc.body(), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return _respond(
                request,
                400,
                {"error": {"type": "malformed_request", "message": "the body is not valid JSON"}},
            )
        field, message = _describe_validation_error(errors[0]) if errors else ("body", "invalid request")
        details = [_describe_validation_error(e)[1] for e in errors[1:5]]
        body: dict[str, Any] = {"error": {"type": "invalid_request", "message": message, "field": field}}
        if details:
            body["error"]["details"] = details
        return _respond(request, 422, body)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return _respond(
            request,
            exc.status_code,
            {"error": {"type": kind, "message": str(exc.detail)}},
            dict(exc.headers or {}),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        status, body = internal_error_body(exc, f"{request.method} {request.url.path}")
        return _respond(request, status, body)
