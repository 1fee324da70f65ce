"""The AWS Lambda entry point, ``sdgate.aws.lambda_handler.handler``: sdgate's app behind API Gateway.

It is the same FastAPI app as ``sdgate serve`` (the native v1 API and the ``/text2image`` routes),
built by :func:`sdgate.api.create_app` from ``SDGATE_*`` variables — on AWS: backend ``sagemaker``,
storage ``s3`` with URLs through the CloudFront domain, job store ``dynamodb`` — and adapted to
Lambda by Mangum. One function takes two kinds of events:

- API Gateway proxy events, REST API (v1) and HTTP API (v2) shapes: answered by the app;
- worker events ``{"sdgate_job": "<id>"}``: the job is run to its end (see :mod:`sdgate.jobs.dispatch`
  for why jobs run in a second invocation), and ``{"sdgate_webhook": "<id>"}``: a job's webhook is delivered.

Per container, the app is built and started once, on one event loop kept for its lifetime (Mangum
alone would run the app's startup and shutdown around every event). Jobs belong to the API Gateway
key that made them, when the REST API requires keys: another key's job is a 404.

The package holds sdgate with its ``aws`` extra only (boto3 and Mangum): no torch, no diffusers
(they would not fit, and the gateway never needs them).
"""

from __future__ import annotations

import asyncio
import os
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI
from mangum import Mangum
from starlette.types import ASGIApp, Receive, Scope, Send

from sdgate import logs
from sdgate.api import create_app
from sdgate.api.access import OWNER_SCOPE_KEY
from sdgate.config import Settings
from sdgate.jobs import JobRunner, LambdaDispatcher
from sdgate.jobs.dispatch import WEBHOOK_EVENT_KEY, WORKER_EVENT_KEY

__all__ = ["LambdaGateway", "handler"]


class _GatewayOwner:
    """Puts the API Gateway key of a REST API request in the scope, where the app takes it as the owner."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        event = scope.get("aws.event") or {}
        identity = (event.get("requestContext") or {}).get("identity") or {}
        key_id = identity.get("apiKeyId")
        if key_id:  # set by API Gateway from the key it checked; a client cannot send it
            scope[OWNER_SCOPE_KEY] = f"apigw:{key_id}"
        await self.app(scope, receive, send)


class LambdaGateway:
    """The app of one Lambda container, and how it answers each event."""

    def __init__(self, settings: Settings, dispatcher: LambdaDispatcher | None = None):
        # 1. one event loop for the container's lifetime: the app's clients and state live on it
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        # 2. the app, with a dispatcher that hands jobs to worker invocations
        if dispatcher is None:
            if not settings.worker_function:
                raise ValueError("jobs on AWS Lambda need SDGATE_WORKER_FUNCTION (the worker function's name)")
            dispatcher = LambdaDispatcher(settings.worker_function)
        self.app: FastAPI = create_app(settings, dispatcher=dispatcher)
        self.runner: JobRunner = self.app.state.ctx.jobs
        # 3. its startup, once (storage check, backend client); never its shutdown: Lambda has none
        self._lifespan: AbstractAsyncContextManager[Any] = self.app.router.lifespan_context(self.app)
        self.loop.run_until_complete(self._lifespan.__aenter__())
        self.adapter = Mangum(_GatewayOwner(self.app), lifespan="off")

    @classmethod
    def from_environment(cls) -> LambdaGateway:
        """Settings from ``SDGATE_*`` variables; jobs go to the function itself unless a worker is named."""
        settings = Settings()
        if settings.worker_function is None and os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
            settings = settings.model_copy(update={"worker_function": os.environ["AWS_LAMBDA_FUNCTION_NAME"]})
        if os.environ.get("AWS_LAMBDA_RUNTIME_API"):  # on Lambda: JSON lines to CloudWatch
            logs.setup(settings.log_level, settings.log_format)
        return cls(settings)

    def handle(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        """Answer one event: a worker event runs its job, anything else is an API Gateway request."""
        asyncio.set_event_loop(self.loop)
        if WORKER_EVENT_KEY in event:
            job_id = str(event[WORKER_EVENT_KEY])
            record = self.loop.run_until_complete(self.runner.run_claimed(job_id))
            return {"job": job_id, "status": record.status.value if record else "skipped"}
        if WEBHOOK_EVENT_KEY in event:
            job_id = str(event[WEBHOOK_EVENT_KEY])
            self.loop.run_until_complete(self.runner.deliver_webhook(job_id))
            return {"job": job_id, "webhook": "done"}
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        self.runner.set_deadline(remaining() if callable(remaining) else None)
        try:
            response = self.adapter(event, context)
        finally:
            self.runner.set_deadline(None)
        return _under_stage(event, response)

    def close(self) -> None:
        """Run the app's shutdown and close the loop: Lambda never does, tests and local runs do."""
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._lifespan.__aexit__(None, None, None))
        finally:
            self.loop.close()
            asyncio.set_event_loop(None)


def _under_stage(event: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    """Prefix root-relative ``Location`` headers with the REST API's stage (``/prod``).

    Behind a REST API's own URL every path starts with the stage, which the event's ``path`` leaves
    out; ``Location: /v1/jobs/<id>`` must become ``/prod/v1/jobs/<id>`` there. Behind a custom domain
    (or an HTTP API's default stage) both paths agree and nothing changes.
    """
    full = str((event.get("requestContext") or {}).get("path") or "")
    path = str(event.get("path") or "")
    if not path or full == path or not full.endswith(path):
        return response
    prefix = full[: -len(path)]
    headers = response.get("headers") or {}
    for name, value in list(headers.items()):
        if name.lower() == "location" and isinstance(value, str) and value.startswith("/"):
            headers[name] = prefix + value
    return response


_gateway: LambdaGateway | None = None


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The Lambda handler: builds the app on the container's first event, then answers every event."""
    global _gateway
    if _gateway is None:
        _gateway = LambdaGateway.from_environment()
    return _gateway.handle(event, context)
