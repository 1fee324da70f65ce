"""Real ``sdgate serve`` processes with a model given by path: one that loads, one that does not."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx

from tests.server import start_server


def test_server_loads_a_pipeline_directory_by_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "my-sd-pipeline"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "sdgate-builtin.json").unlink()  # a plain diffusers directory, as a user would have
    server = start_server(tmp_path / "data", env={"SDGATE_MODEL": str(model_dir)})
    try:
        ready = httpx.get(f"{server.url}/readyz", timeout=10).json()
        assert ready["status"] == "ready"
        assert ready["model"] == str(model_dir)
        [card] = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
        assert card["id"] == str(model_dir)
        assert card["default_steps"] == 30  # a model's defaults, not the built-in's
        resp = httpx.post(
            f"{server.url}/v1/generations",
            json={"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 5},
            timeout=120,
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["model"] == str(model_dir)
        assert httpx.get(body["images"][0]["url"], timeout=30).status_code == 200
        # the built-in model was never built: the server used the directory it was given
        assert not (tmp_path / "data" / "models").exists()
    finally:
        server.stop()


def test_server_with_a_missing_model_path_is_alive_but_not_ready_and_says_why(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    server = start_server(tmp_path / "data", env={"SDGATE_MODEL": str(missing)}, ready=False)
    try:
        # /healthz answers while the model loads; /readyz says 503 until, and after, the load fails.
        deadline = time.monotonic() + 120
        while True:
            ready = httpx.get(f"{server.url}/readyz", timeout=10)
            assert ready.status_code == 503
            if "failed" in ready.json()["detail"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        detail = ready.json()["detail"]
        assert str(missing) in detail
        assert "does not exist" in detail
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200

        # a generation is refused at once with the reason, not held until a timeout
        resp = httpx.post(f"{server.url}/v1/generations", json={"prompt": "a fox"}, timeout=30)
        assert resp.status_code == 503
        err = resp.json()["error"]
        assert err["type"] == "not_ready"
        assert "does not exist" in err["message"]
        assert server.proc.poll() is None, "the server must keep running to report why it is not ready"
    finally:
        server.stop()
