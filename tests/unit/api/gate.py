"""Helpers of the API tests: a running app over the fakes (:class:`Gate`), keys, images in answers."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from sdgate.auth import KeyStore
from sdgate.config import Settings
from tests.fakes import FakeBackend, MemoryJobStore, MemoryStorage


class Answer(Protocol):
    """What the test client answers (an httpx or httpx2 response, whichever Starlette uses)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


@dataclass
class Gate:
    """A running app and the fakes behind it."""

    client: TestClient
    settings: Settings
    backend: FakeBackend
    storage: MemoryStorage
    store: MemoryJobStore

    def image_bytes(self, url: str) -> bytes:
        """The stored bytes behind an image URL of an answer."""
        key = url.split("/images/", 1)[1]
        return self.storage.objects[key][0]


OpenGate = Callable[..., Gate]
"""``open_gate(settings=None, backend=None, **settings_fields)`` (the fixture): a started app."""


def create_key(
    settings: Settings,
    name: str,
    *,
    images_per_day: int | None = None,
    rate_per_min: int | None = None,
    revoked: bool = False,
) -> str:
    """A key in the app's key store, made before the app starts (as ``sdgate keys create`` does)."""
    keys = KeyStore(settings.paths.keys_db)
    try:
        plain, _ = keys.create(name, rate_per_min=rate_per_min, images_per_day=images_per_day)
        if revoked:
            keys.revoke(name)
        return plain
    finally:
        keys.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def pixels(data: bytes) -> list[Any]:
    """An encoded image's pixels as JumpStart's RGB rows."""
    rows: list[Any] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).tolist()
    return rows


def b64(data: str) -> bytes:
    return base64.b64decode(data, validate=True)
