"""Errors on the SageMaker routes come in SageMaker's shape and codes, whatever the backend raised."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sdgate.api import create_app
from sdgate.backends import BackendState
from sdgate.config import Settings
from sdgate.errors import BackendError, Busy, GenerationFailed, NotReady, SdgateError
from tests.fakes import FakeBackend


def raising(error: SdgateError | None, ready: bool = True) -> FakeBackend:
    """A backend whose every generation raises ``error`` (or one whose model failed to load)."""
    return FakeBackend(error=error, state=BackendState.ready if ready else BackendState.failed)


@pytest.fixture
def client_for(tmp_path: Path) -> Iterator[Any]:
    clients: list[TestClient] = []

    def make(backend: FakeBackend) -> TestClient:
        client = TestClient(create_app(Settings(data_dir=tmp_path, backend_timeout_s=1), backend=backend))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (GenerationFailed("the model failed to generate (error id abc)"), 424, "ModelError"),
        (BackendError("could not reach the endpoint"), 424, "ModelError"),
        (Busy("the queue is full", headers={"Retry-After": "5"}), 429, "ThrottlingException"),
        (NotReady("shutting down"), 503, "ServiceUnavailable"),
    ],
)
@pytest.mark.parametrize("path", ["/invocations", "/endpoints/my-endpoint/invocations"])
def test_backend_errors_become_sagemaker_errors(
    client_for: Any, path: str, error: SdgateError, status: int, code: str
) -> None:
    client = client_for(raising(error))
    resp = client.post(path, json={"prompt": "a fox"}, headers={"Accept": "application/json;jpeg"})
    assert resp.status_code == status
    assert resp.headers["x-amzn-errortype"] == code  # where botocore reads the error code
    body = resp.json()
    assert body["ErrorCode"] == code
    assert body["Message"] == error.message
    assert body["error"]["type"] == error.type
    if status == 429:
        assert resp.headers["retry-after"] == "5"


def test_ping_and_invocations_before_the_model_is_usable(client_for: Any) -> None:
    client = client_for(raising(None, ready=False))
    ping = client.get("/ping")
    assert ping.status_code == 503
    assert "failed" in ping.json()["detail"]
    resp = client.post("/invocations", content="a fox", headers={"Content-Type": "application/x-text"})
    assert resp.status_code == 503
    assert resp.json()["ErrorCode"] == "ServiceUnavailable"


def test_native_routes_keep_their_own_error_shape(client_for: Any) -> None:
    client = client_for(raising(GenerationFailed("boom")))
    resp = client.post("/v1/generations", json={"prompt": "a fox"})
    assert resp.status_code == 500
    assert "ErrorCode" not in resp.json()
    assert "x-amzn-errortype" not in resp.headers
