"""The whole app in process over the fakes: ``create_app`` with a fake backend, memory storage and job store.

``open_gate(settings)`` starts it (lifespan included) for the test and stops it afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sdgate.api.app import create_app
from sdgate.config import Settings
from tests.fakes import FakeBackend, MemoryJobStore, MemoryStorage
from tests.unit.api.gate import Gate, OpenGate


@pytest.fixture
def open_gate(tmp_path: Path) -> Iterator[OpenGate]:
    """``open_gate(settings=None, backend=None, **settings_fields)``: the app, started."""
    with ExitStack() as stack:

        def open_(settings: Settings | None = None, backend: FakeBackend | None = None, **kw: Any) -> Gate:
            settings = settings or Settings(data_dir=tmp_path, **kw)
            backend = backend or FakeBackend()
            storage, store = MemoryStorage(), MemoryJobStore()
            app = create_app(settings, backend=backend, storage=storage, store=store)
            client = stack.enter_context(TestClient(app))
            return Gate(client, settings, backend, storage, store)

        yield open_
