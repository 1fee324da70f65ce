"""Where encoded images go: a local directory (default) or S3."""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass
from typing import Protocol

from sdgate.config import Settings

# Keys are made here, never from user input: a date prefix for humans and lifecycle rules,
# 128 random bits so that URLs are unguessable and two images never share a key.
KEY_PATTERN = re.compile(r"^\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.(jpeg|png|webp|json)$")


def new_key(extension: str, now: dt.datetime | None = None) -> str:
    """A fresh storage key such as ``2026/11/25/<32 hex>.jpeg``."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y/%m/%d}/{secrets.token_hex(16)}.{extension}"


def is_valid_key(key: str) -> bool:
    # fullmatch: with match, ``$`` also accepts a key that ends in a newline.
    return bool(KEY_PATTERN.fullmatch(key))


@dataclass(frozen=True)
class StoredObject:
    key: str
    url: str
    """Absolute URL, or a path starting with ``/`` that the API resolves against its own base URL."""


class Storage(Protocol):
    """Puts bytes under a key and says where clients can fetch them."""

    name: str

    def put(self, data: bytes, key: str, content_type: str) -> StoredObject:
        """Store ``data`` atomically under ``key``; raise :class:`sdgate.errors.StorageError` on failure."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key`` if present (retention); missing keys are not an error."""
        ...

    def check(self) -> None:
        """Raise :class:`sdgate.errors.StorageError` if the store cannot be written."""
        ...


def create_storage(settings: Settings) -> Storage:
    """The storage the settings ask for; S3 support is imported only when used."""
    if settings.storage == "s3":
        from sdgate.storage.s3 import S3Storage

        return S3Storage(settings)
    from sdgate.storage.local import LocalStorage

    return LocalStorage(settings.images_dir, settings.public_base_url)
