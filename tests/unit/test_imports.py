"""The gateway path (API, settings, backends protocol) must start without torch or diffusers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_the_check_itself_sees_torch_when_the_engine_is_loaded() -> None:
    """The subprocess check would notice: the engine's loader does import torch."""
    pytest.importorskip("torch")
    code = "import sys, sdgate.engine.loader as l; l.pick_device('cpu'); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"
