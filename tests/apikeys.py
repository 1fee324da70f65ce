"""API keys for end-to-end tests, made by the real ``sdgate keys`` CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def keys_cli(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``sdgate keys ARGS --data-dir DATA_DIR`` (``env``: SDGATE_* settings, e.g. a PostgreSQL store);
    fails the test on a non-zero exit."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SDGATE_")}
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "sdgate.cli", "keys", *args, "--data-dir", str(data_dir)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"sdgate keys {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    return result


def create_key(data_dir: Path, name: str, *options: str, env: dict[str, str] | None = None) -> str:
    """A new key (``--rate R``, ``--quota Q`` in ``options``); the CLI prints it alone on stdout."""
    out = keys_cli(data_dir, "create", "--name", name, *options, env=env).stdout.strip()
    assert out.startswith("sdg_") and "\n" not in out, out
    return out
