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
_STEM = r"\d{4}/\d{2}/\d{2}/[0-9a-f]{32}"
PRIVATE_PREFIX = "private/"
"""Where sidecars and input images go. An image URL is made to be shared; its sidecar holds the prompt
and an input image is the user's own picture, neither of which is: neither ``GET /images`` nor the CDN
of the AWS stack serves anything under this prefix."""
IMAGE_KEY_PATTERN = re.compile(rf"{_STEM}\.(jpeg|png|webp)")
# A sidecar beside its image (``<stem>.json``) is where sidecars went before they moved under
# PRIVATE_PREFIX: still a valid key, so that those can be deleted and writers not yet on sidecar_key()
# keep working, but no more public than any other sidecar.
KEY_PATTERN = re.compile(rf"{_STEM}\.(jpeg|png|webp|json)|{PRIVATE_PREFIX}{_STEM}\.(json|jpeg|png|webp)")


def new_key(extension: str, now: dt.datetime | None = None) -> str:
    """A fresh storage key such as ``2026/11/25/<32 hex>.jpeg``."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y/%m/%d}/{secrets.token_hex(16)}.{extension}"


def input_key(extension: str) -> str:
    """A fresh key for an input image (image-to-image, inpainting), under :data:`PRIVATE_PREFIX`."""
    return PRIVATE_PREFIX + new_key(extension)


def sidecar_key(image_key: str) -> str:
    """The key of an image's JSON sidecar (its parameters, prompt included), under :data:`PRIVATE_PREFIX`.

    ``2026/12/01/<32 hex>.jpeg`` → ``private/2026/12/01/<32 hex>.json``.
    """
    if not is_public_key(image_key):
        raise ValueError(f"not an image key: {image_key!r}")
    return PRIVATE_PREFIX + image_key.rsplit(".", 1)[0] + ".json"


def is_valid_key(key: str) -> bool:
    """A key sdgate could have made, an image's or a sidecar's: the only keys storage puts or deletes."""
    # fullmatch, not match: the patterns have no anchors, and nothing may follow a valid start (``\n``, ``/..``).
    return bool(KEY_PATTERN.fullmatch(key))


def is_public_key(key: str) -> bool:
    """An image's key: what anyone with its URL may fetch. A sidecar's key is not public."""
    return bool(IMAGE_KEY_PATTERN.fullmatch(key))


@dataclass(frozen=True)
class StoredObject:
    key: str
    url: str
    """Absolute URL, or a path starting with ``/`` that the API resolves against its own base URL."""


class Storage(Protocol):
    """Puts bytes under a key and says where clients can fetch them."""

    name: str

    def put(self, data: bytes, key: str, content_type: str, *, durable: bool = True) -> StoredObject:
        """Store ``data`` atomically under ``key``; raise :class:`sdgate.errors.StorageError` on failure.

        ``durable``: on the device before it returns (a power cut cannot take it back). False for what
        can be lost without breaking a promise (a sidecar: the image file embeds the same parameters).
        """
        ...

    def get(self, key: str) -> bytes:
        """The bytes stored under ``key`` (an input image, for a job that runs again or elsewhere).

        Raises :class:`sdgate.errors.StorageError` when they cannot be read, a missing key included.
        """
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

    return LocalStorage(settings.paths.images, settings.public_base_url)
