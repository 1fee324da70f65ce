"""Domain errors: each has a status and a stable type; :mod:`sdgate.api.errors` turns them into responses."""

from __future__ import annotations

import logging
import uuid
from typing import Any

log = logging.getLogger("sdgate.errors")


class SdgateError(Exception):
    """Base of every error sdgate reports to a client.

    ``status`` is the HTTP status, ``type`` a stable machine-readable name, ``message`` says
    what went wrong and, where possible, how to fix it.
    """

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.field:
            err["field"] = self.field
        return {"error": err}


class InvalidRequest(SdgateError):
    """The request is well-formed but a value is out of range or unknown."""

    status = 422
    type = "invalid_request"


class MalformedRequest(SdgateError):
    """The body could not be parsed at all."""

    status = 400
    type = "malformed_request"


class UnsupportedMediaType(SdgateError):
    status = 415
    type = "unsupported_media_type"


class PayloadTooLarge(SdgateError):
    status = 413
    type = "payload_too_large"


class Unauthorized(SdgateError):
    """No API key, or one that does not exist."""

    status = 401
    type = "unauthorized"


class Forbidden(SdgateError):
    """A known key that may not do this (revoked)."""

    status = 403
    type = "forbidden"


class RateLimited(SdgateError):
    """The key's request rate or daily image quota is used up."""

    status = 429
    type = "rate_limited"


class NotFound(SdgateError):
    status = 404
    type = "not_found"


class Conflict(SdgateError):
    status = 409
    type = "conflict"


class Busy(SdgateError):
    """The queue is full; come back later."""

    status = 429
    type = "busy"


class NotReady(SdgateError):
    status = 503
    type = "not_ready"


class GenerationFailed(SdgateError):
    """The model raised while generating; the request fails, the server keeps serving."""

    status = 500
    type = "generation_failed"


class BackendError(SdgateError):
    """A remote backend (SageMaker endpoint, another sdgate) failed or could not be reached."""

    status = 502
    type = "backend_error"


class GenerationTimeout(SdgateError):
    """A request that waits for its images waited longer than allowed; the job itself goes on."""

    status = 504
    type = "timeout"


class StorageError(SdgateError):
    """The image could not be stored."""

    status = 503
    type = "storage_error"


class Canceled(SdgateError):
    status = 409
    type = "canceled"


def error_of_type(type_: str, message: str, headers: dict[str, str] | None = None) -> SdgateError:
    """The error a job recorded (its ``type`` and ``message``) as an exception again, with its status."""
    classes: list[type[SdgateError]] = [SdgateError]
    while classes:
        cls = classes.pop()
        if cls.__dict__.get("type") == type_:  # its own, not inherited
            return cls(message, headers=headers)
        classes.extend(cls.__subclasses__())
    err = SdgateError(message, headers=headers)  # a type only jobs know (e.g. interrupted): a 500
    err.type = type_
    return err


def new_error_id() -> str:
    return uuid.uuid4().hex[:12]


def internal_error_body(exc: BaseException, where: str) -> tuple[int, dict[str, Any]]:
    """An opaque 500 for anything unexpected; the details go to the log under an error id."""
    error_id = new_error_id()
    log.error("unhandled error %s in %s", error_id, where, exc_info=exc)
    return 500, {
        "error": {
            "type": "internal_error",
            "message": f"internal error; reference {error_id} in the server log",
            "error_id": error_id,
        }
    }
