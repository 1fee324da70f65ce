"""Shared fixtures: a real sdgate server process with the built-in model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import background
from tests.server import ServerProcess, start_server, tiny_data


def _shared_server() -> ServerProcess:
    return start_server(background.workdir("server"), env={"SDGATE_MAX_BATCH_WAIT_MS": "50"})


_modules: list[Path] = []
"""The collected test modules, in the order they run."""


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start what the collected tests will need and is slow to make, while the first tests run."""
    for item in session.items:
        path = item.path.resolve()
        if path not in _modules:
            _modules.append(path)
    if any("server" in getattr(item, "fixturenames", ()) for item in session.items):
        background.prepare("server", _shared_server)
    if any("test_gateway_venv.py" in item.nodeid for item in session.items):
        from tests.e2e.test_gateway_venv import build_gateway_venv

        background.prepare("gateway-venv", build_gateway_venv)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Make what the next modules declared (``background.needs``) while this one runs."""
    background.prepare_ahead(_modules, item.path)


def _stop(made: Any) -> None:
    if isinstance(made, ServerProcess):
        made.stop()


def pytest_sessionfinish(session: pytest.Session) -> None:
    background.cleanup(_stop)


@pytest.fixture(scope="session")
def server() -> ServerProcess:
    """One `sdgate serve` process with the tiny built-in model, shared by the e2e tests (started in the
    background when collection ends; stopped when the session ends)."""
    srv: ServerProcess = background.get("server", _shared_server)
    return srv


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(scope="session")
def tiny_data_dir() -> Path:
    """A data directory whose ``models/`` already holds the built-in tiny model, built once per session.

    In-process engines share it (they only read models from it); build it once rather than per test.
    """
    return tiny_data()


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
