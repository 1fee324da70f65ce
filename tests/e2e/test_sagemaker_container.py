"""The SageMaker inference container's contract: the ``serve`` entrypoint and its defaults.

The image itself cannot be built here (no registry, no GPU); its entrypoint script runs as SageMaker
would run it, and the Dockerfile is checked for what SageMaker needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sdgate.cli import build_settings
from sdgate.config import Settings
from tests.aws_fixtures import FAKE_CREDENTIALS
from tests.server import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_sagemaker_flag_sets_sagemakers_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("SDGATE_")]:
        monkeypatch.delenv(name)
    settings = build_settings({"sagemaker": True})
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    if not Path("/opt/ml/model").is_dir():
        assert settings.model == Settings.model_fields["model"].default
    # Anything set explicitly, by flag or environment, wins over the defaults.
    monkeypatch.setenv("SDGATE_PORT", "9000")
    settings = build_settings({"sagemaker": True, "host": "127.0.0.1", "model": "/models/sd"})
    assert (settings.host, settings.port, settings.model) == ("127.0.0.1", 9000, "/models/sd")


def test_serve_entrypoint_starts_sdgate_as_an_endpoint(tmp_path: Path) -> None:
    """``docker run IMAGE serve``: the script on PATH starts sdgate answering /ping on the port it is told."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDGATE_", "AWS_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        SAGEMAKER_BIND_TO_PORT=str(port),
        SDGATE_HOST="127.0.0.1",
        SDGATE_DATA_DIR=str(tmp_path),
        # A gateway backend: the entrypoint is under test here, not the model (no torch start-up).
        SDGATE_BACKEND="sagemaker",
        SDGATE_SAGEMAKER_ENDPOINT="unused",
        SDGATE_SAGEMAKER_REGION="us-east-1",
        **FAKE_CREDENTIALS,
    )
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(ROOT / "docker" / "serve")], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                resp = httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2)
                if resp.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(30)
    # SIGTERM (how SageMaker stops a container) is a graceful shutdown; uvicorn then exits by that signal.
    assert proc.returncode in (0, -15), log.read_text()
    assert "Application shutdown complete" in log.read_text()


def test_dockerfile_runs_serve_on_8080() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines() if line.strip() and not line.startswith("#")]
    assert any(line.startswith("FROM ") and "cuda" in line for line in lines)
    assert "COPY docker/serve /usr/local/bin/serve" in lines
    assert "EXPOSE 8080" in lines
    assert 'CMD ["serve"]' in lines
    assert not any(line.startswith("ENTRYPOINT") for line in lines)  # `docker run IMAGE serve` must reach serve
    assert os.access(ROOT / "docker" / "serve", os.X_OK)
