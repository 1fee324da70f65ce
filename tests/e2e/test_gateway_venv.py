"""The gateway installs and runs without the engine extra: a fresh virtual environment with no torch.

Slow (a real install of sdgate with the ``aws`` extra: uv where the suite's venv has it, as ``make test``
installs it, else pip), but it is the only honest proof that the gateway path does not need the model libraries.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests import background
from tests.aws_fixtures import FAST, jpeg_size, make_endpoint
from tests.server import ServerProcess, start_server

background.needs(__file__, endpoint=make_endpoint)

ROOT = Path(__file__).resolve().parents[2]


def build_gateway_venv() -> Path:
    """A new virtual environment holding ``sdgate[aws]`` and nothing else; returns its interpreter.

    Built in the background from the start of the session (tests/background.py): it is mostly the installer,
    uv when the suite's own environment has it (seconds; pip's resolution is a minute of CPU taken from the
    tests running beside it).
    """
    root = background.workdir("gateway-venv")
    project = root / "project"  # a copy, so that building it leaves the working tree alone
    project.mkdir()
    shutil.copy(ROOT / "pyproject.toml", project)
    shutil.copy(ROOT / "README.md", project)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    uv = Path(sys.executable).with_name("uv")
    installer = (
        [str(uv), "pip", "install", "--python", str(python)] if uv.exists() else [str(python), "-m", "pip", "install"]
    )
    subprocess.run(
        [*installer, "-q", f"{project}[aws]"],
        check=True,
        timeout=600,
        capture_output=True,
    )
    return python


@pytest.fixture(scope="module")
def gateway_python() -> Path:
    """The interpreter of the gateway's torch-free virtual environment."""
    python: Path = background.get("gateway-venv", build_gateway_venv)
    return python


@pytest.mark.slow
@pytest.mark.timeout(900)  # a pip install on a busy machine
def test_gateway_without_the_engine_extra_serves_text2image(
    gateway_python: Path,
    tmp_path: Path,
    endpoint: ServerProcess,
    aws_env: dict[str, str],
    bucket: str,
) -> None:
    for module in ("torch", "diffusers", "transformers"):
        probe = subprocess.run([str(gateway_python), "-c", f"import {module}"], capture_output=True, timeout=60)
        assert probe.returncode != 0, f"{module} is installed in the gateway's environment"

    gateway = start_server(
        tmp_path,
        python=str(gateway_python),
        env={
            **aws_env,
            **FAST,
            "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": endpoint.url,
            "SDGATE_BACKEND": "sagemaker",
            "SDGATE_SAGEMAKER_ENDPOINT": "jumpstart-sd",
            "SDGATE_STORAGE": "s3",
            "SDGATE_S3_BUCKET": bucket,
        },
        timeout=60,
    )
    try:
        resp = httpx.post(f"{gateway.url}/text2image", json={"text": "a paper boat"}, timeout=120)
        assert resp.status_code == 200, resp.text + gateway.log()
        got = httpx.get(resp.json()["body"], timeout=30)
    finally:
        gateway.stop()
    assert got.status_code == 200
    assert jpeg_size(got.content) == (64, 64)
