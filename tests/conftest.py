"""Shared fixtures: a real sdgate server process with the built-in model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
