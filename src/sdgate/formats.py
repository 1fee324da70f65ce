"""Image formats sdgate writes: their names, content types and file extensions.

A module of its own, free of Pillow, because settings, schemas and storage all name formats and the
gateway should not import an image library to read its configuration.
"""

from __future__ import annotations

from typing import Literal

ImageFormat = Literal["jpeg", "png", "webp"]

CONTENT_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
EXTENSIONS: dict[str, str] = {"jpeg": "jpeg", "png": "png", "webp": "webp"}
