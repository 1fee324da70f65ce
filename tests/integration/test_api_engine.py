"""The app in process (TestClient runs its lifespan) with the real engine behind an injected loader.

A pipeline that raises must fail only its request, with an opaque 500 and an error id that is in
the log, and the server must go on serving.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sdgate.api import create_app
from sdgate.backends.local import LocalBackend
from sdgate.config import Settings
from sdgate.engine.loader import LoadedModel
from sdgate.engine.runner import Engine
from tests.integration.pipelines import ScriptedPipeline, loader_for

SMALL: dict[str, Any] = {"width": 64, "height": 64, "num_inference_steps": 2}


def client_for(settings: Settings, engine: Engine) -> TestClient:
    return TestClient(create_app(settings, backend=LocalBackend(settings, engine=engine)))


def wait_until_ready_or_failed(client: TestClient, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        resp = client.get("/readyz")
        if resp.status_code == 200 or "failed" in resp.json()["detail"] or time.monotonic() > deadline:
            return resp
        time.sleep(0.05)


@pytest.fixture
def failing(tiny_model: LoadedModel, tmp_path: Path) -> Iterator[tuple[TestClient, Engine]]:
    settings = Settings(data_dir=tmp_path, model="tiny", device="cpu", warmup=False)
    pipe = ScriptedPipeline(tiny_model.pipeline, fail_prompt="explode", fail_message="scripted failure: tensor soup")
    engine = Engine(settings, loader=loader_for(tiny_model, pipe))
    with client_for(settings, engine) as client:
        assert wait_until_ready_or_failed(client).status_code == 200
        yield client, engine


def test_a_failing_generation_is_an_opaque_500_with_an_error_id_in_the_log(
    failing: tuple[TestClient, Engine], caplog: pytest.LogCaptureFixture
) -> None:
    client, engine = failing
    with caplog.at_level(logging.ERROR):
        resp = client.post("/v1/generations", json={"prompt": "explode", **SMALL})
    assert resp.status_code == 500, resp.text
    err = resp.json()["error"]
    assert err["type"] == "generation_failed"
    m = re.search(r"error id ([0-9a-f]{12})", err["message"])
    assert m, err["message"]
    # The client gets a reference, not the internals; the log has the details under that reference.
    assert "tensor soup" not in resp.text
    logged = [r for r in caplog.records if m.group(1) in r.getMessage()]
    assert logged, "the error id is not in the log"
    assert logged[0].exc_info is not None
    assert "tensor soup" in str(logged[0].exc_info[1])
    assert engine.stats.failures == 1


def test_the_server_goes_on_serving_after_a_failure(failing: tuple[TestClient, Engine]) -> None:
    client, engine = failing
    assert client.post("/v1/generations", json={"prompt": "explode", **SMALL}).status_code == 500
    ok = client.post("/v1/generations", json={"prompt": "a calm lake", "seed": 1, **SMALL})
    assert ok.status_code == 200, ok.text
    [img] = ok.json()["images"]
    assert img["seed"] == 1
    got = client.get(img["url"])
    assert got.status_code == 200
    assert got.headers["content-type"] == "image/jpeg"
    assert engine.stats.failures == 1
    assert engine.stats.images == 1
    assert client.get("/readyz").status_code == 200


def test_the_failed_job_records_its_error(failing: tuple[TestClient, Engine]) -> None:
    client, _ = failing
    resp = client.post("/v1/generations", json={"prompt": "explode", **SMALL})
    job_id = resp.headers.get("x-job-id")
    assert job_id, "a failed sync request names its job"
    job = client.get(f"/v1/jobs/{job_id}")
    assert job.status_code == 200
    body = job.json()
    assert body["status"] == "failed"
    assert body["error"]["type"] == "generation_failed"
    assert body["error"]["message"] == resp.json()["error"]["message"]
    assert body["images"] == []


def test_out_of_memory_says_what_to_try(tiny_model: LoadedModel, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, model="tiny", device="cpu", warmup=False)
    pipe = ScriptedPipeline(tiny_model.pipeline, fail_prompt="huge", fail_message="CUDA out of memory. Tried 2 GiB")
    engine = Engine(settings, loader=loader_for(tiny_model, pipe))
    with client_for(settings, engine) as client:
        wait_until_ready_or_failed(client)
        resp = client.post("/v1/generations", json={"prompt": "huge", **SMALL})
    assert resp.status_code == 500
    assert "smaller size" in resp.json()["error"]["message"]


def test_a_model_that_cannot_load_makes_readyz_503_and_requests_503(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    settings = Settings(data_dir=tmp_path / "data", model=str(missing), device="cpu", warmup=False)
    engine = Engine(settings)
    with client_for(settings, engine) as client:
        ready = wait_until_ready_or_failed(client)
        assert ready.status_code == 503
        assert str(missing) in ready.json()["detail"]
        assert "does not exist" in ready.json()["detail"]
        assert client.get("/healthz").status_code == 200  # alive, just not ready
        resp = client.post("/v1/generations", json={"prompt": "a fox", **SMALL})
        assert resp.status_code == 503
        assert resp.json()["error"]["type"] == "not_ready"
        assert "does not exist" in resp.json()["error"]["message"]
        # Validation still comes first: a bad request is told what to fix, not that the model is down.
        bad = client.post("/v1/generations", json={"prompt": "a fox", "width": 65})
        assert bad.status_code == 422
    assert engine.stats.requests == 0
