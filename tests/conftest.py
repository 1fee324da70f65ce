"""Shared fixtures: a real sdgate server process with the built-in model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server import ServerProcess, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One `sdgate serve` process with the tiny built-in model, shared by the e2e tests."""
    srv = start_server(tmp_path_factory.mktemp("server"), env={"SDGATE_MAX_BATCH_WAIT_MS": "50"})
    yield srv
    srv.stop()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory whose ``models/`` already holds the built-in tiny model, built once per session.

    In-process engines share it (they only read models from it); build it once rather than per test.
    """
    from sdgate.engine.builtin import ensure_builtin

    root = tmp_path_factory.mktemp("tiny-data")
    ensure_builtin("tiny", root / "models")
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_data_dir: Path) -> Path:
    """The saved diffusers directory of the built-in tiny model (read-only: copy it before changing it)."""
    from sdgate.engine.builtin import ensure_builtin

    return ensure_builtin("tiny", tiny_data_dir / "models")


@pytest.fixture(scope="session")
def tiny_model(tiny_data_dir: Path) -> Any:
    """The tiny model loaded once on the CPU (a ``LoadedModel``) for engines with an injected loader."""
    from sdgate.engine.loader import load_model

    return load_model("tiny", device="cpu", dtype="float32", models_dir=tiny_data_dir / "models")


# The AWS design's fixtures (S3 server, SageMaker endpoint): one plugin, so that each session-scoped
# fixture is one instance for the whole run, not one per module that imports it.
pytest_plugins = ["tests.aws_fixtures"]
