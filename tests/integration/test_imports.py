"""The gateway path (API, settings, backends protocol) must start without torch or diffusers."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "safetensors")


GATEWAY = [
    "sdgate.api",
    "sdgate.api.app",
    "sdgate.config",
    "sdgate.backends",
    "sdgate.schemas",
    "sdgate.imaging",
    "sdgate.storage",
    "sdgate.storage.local",
    "sdgate.jobs",
    "sdgate.jobs.runner",
    "sdgate.jobs.dispatch",
    "sdgate.generation",
    "sdgate.auth",
    "sdgate.paths",
    "sdgate.formats",
    "sdgate.aws.lambda_handler",
    "sdgate.client",
    "sdgate.cli",
    "sdgate.errors",
]


def test_importing_the_gateway_does_not_pull_in_the_model_libraries() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for name in {GATEWAY!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
        "print('fastapi' in sys.modules and 'sdgate.api.app' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    heavy, sanity = proc.stdout.strip().splitlines()[-2:]
    assert sanity == "True", "the check does not see what was imported"
    assert json.loads(heavy) == []
