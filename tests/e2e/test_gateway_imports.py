"""The gateway path (API + SageMaker/http backend + S3) never imports the model libraries."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.aws_fixtures import FAKE_CREDENTIALS

_HEAVY = ("torch", "diffusers", "transformers", "accelerate", "safetensors")


def test_building_a_gateway_app_imports_no_model_library(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        from sdgate.api import create_app
        from sdgate.backends import create_backend
        from sdgate.cli import main
        from sdgate.config import Settings
        import sdgate.api.sagemaker, sdgate.api.text2image, sdgate.backends.http, sdgate.backends.sagemaker
        import sdgate.jumpstart, sdgate.storage.s3

        for backend in ("sagemaker", "http"):
            settings = Settings(
                data_dir={str(tmp_path)!r}, backend=backend, sagemaker_endpoint="sd",
                backend_url="http://127.0.0.1:9", storage="s3", s3_bucket="images",
            )
            create_app(settings)
            asyncio.run(create_backend(settings).start())
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {_HEAVY!r})
        assert not heavy, heavy
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDGATE_", "AWS_"))}
    env.update(FAKE_CREDENTIALS, AWS_DEFAULT_REGION="us-east-1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
