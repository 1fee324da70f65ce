"""Image encoding and decoding, with the generation parameters embedded in the file."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from sdgate.formats import CONTENT_TYPES, EXTENSIONS, ImageFormat

_EXIF_IMAGE_DESCRIPTION = 0x010E
_EXIF_SOFTWARE = 0x0131


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    format: ImageFormat
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def encode(
    image: Image.Image, fmt: ImageFormat, quality: int = 90, metadata: dict[str, Any] | None = None
) -> EncodedImage:
    """Encode an RGB image; ``metadata`` goes into a PNG text chunk, a JPEG comment, or WebP EXIF."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    text = json.dumps(metadata, separators=(",", ":"), sort_keys=True) if metadata else None
    buf = io.BytesIO()
    if fmt == "jpeg":
        kwargs: dict[str, Any] = {"quality": quality, "optimize": False}
        if text:
            kwargs["comment"] = text.encode("utf-8")
        image.save(buf, format="JPEG", **kwargs)
    elif fmt == "png":
        info = PngImagePlugin.PngInfo()
        if text:
            info.add_itxt("parameters", text)
        image.save(buf, format="PNG", pnginfo=info, compress_level=6)
    elif fmt == "webp":
        exif = Image.Exif()
        exif[_EXIF_SOFTWARE] = "sdgate"
        if text:
            exif[_EXIF_IMAGE_DESCRIPTION] = text
        image.save(buf, format="WEBP", quality=quality, exif=exif.tobytes())
    else:  # pragma: no cover - ImageFormat is a closed Literal
        raise ValueError(f"unknown format {fmt!r}")
    return EncodedImage(buf.getvalue(), fmt, image.width, image.height)


def read_metadata(data: bytes) -> dict[str, Any] | None:
    """The parameters :func:`encode` embedded, or None."""
    with Image.open(io.BytesIO(data)) as im:
        text: Any = None
        if im.format == "JPEG":
            text = im.info.get("comment")
        elif im.format == "PNG":
            text = im.info.get("parameters")
        elif im.format == "WEBP":
            text = im.getexif().get(_EXIF_IMAGE_DESCRIPTION)
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    result: dict[str, Any] = json.loads(text)
    return result


def decode(data: bytes) -> Image.Image:
    """Decode any image bytes to an RGB image."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def to_rgb_lists(image: Image.Image) -> list[Any]:
    """JumpStart's ``application/json`` image form: ``[[[r, g, b], ...], ...]`` rows of pixels."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    rows: list[Any] = arr.tolist()
    return rows


def from_rgb_lists(rows: Any) -> Image.Image:
    """Inverse of :func:`to_rgb_lists`; raises ValueError on anything that is not HxWx3 of 0..255."""
    arr = np.asarray(rows)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise ValueError(f"expected an H x W x 3 list of RGB pixels, got shape {arr.shape}")
    # Strings, None or booleans would otherwise fail with a TypeError below, or pass as pixels.
    if arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and not np.isfinite(arr).all()):
        raise ValueError("pixel values must be numbers in 0..255")
    if arr.min() < 0 or arr.max() > 255:
        raise ValueError("pixel values must lie in 0..255")
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def to_base64_jpeg(image: Image.Image, quality: int = 90) -> str:
    return base64.b64encode(encode(image, "jpeg", quality).data).decode("ascii")
