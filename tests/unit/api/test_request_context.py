"""RequestContext runs the job store's flush before each message of every response goes out."""

from __future__ import annotations

import asyncio

from starlette.types import Message, Receive, Scope, Send

from sdgate.api.middleware import RequestContext
from sdgate.metrics import Metrics


def test_before_answer_runs_before_every_response_message() -> None:
    events: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        events.append("app")
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        events.append(message["type"])

    scope: Scope = {"type": "http", "method": "POST", "path": "/v1/generations", "headers": []}
    middleware = RequestContext(app, Metrics(), before_answer=lambda: events.append("flush"))
    asyncio.run(middleware(scope, receive, send))
    assert events == [
        "app",
        "flush",
        "http.response.start",
        "flush",
        "http.response.body",
        "flush",
        "http.response.body",
    ]
