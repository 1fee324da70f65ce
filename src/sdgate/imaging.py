"""Image encoding and decoding, with the generation parameters embedded in the file, and the checks of
input images (image-to-image, inpainting) before any pixel of them is decoded."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

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


# -- input images (image-to-image, inpainting) ----------------------------------------------------

# What sdgate reads as an input, by the name Pillow gives the format.
INPUT_FORMATS: dict[str, ImageFormat] = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
# Formats people send by mistake, by their first bytes: named in the refusal, never decoded.
_OTHER_FORMATS = (
    (b"GIF8", "a GIF"),
    (b"II*\x00", "a TIFF"),
    (b"MM\x00*", "a TIFF"),
    (b"BM", "a BMP"),
    (b"<?xml", "an SVG or other XML"),
    (b"<svg", "an SVG"),
    (b"\x00\x00\x01\x00", "an ICO"),
)


_LEADING_SPACE = re.compile(rb"\s*")


class InputError(ValueError):
    """An input image that sdgate will not read; the message says why and what to send instead."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class InputImage:
    """A checked input: the bytes to keep (as sent, or a PNG for a mask) and the decoded pixels.

    The pixels are RGB for an image and L (white: repaint, black: keep) for a mask.
    """

    data: bytes
    format: ImageFormat
    image: Image.Image

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


@dataclass(frozen=True)
class ImageInputs:
    """What an image-to-image (``image``) or inpainting (``image`` and ``mask``) request starts from."""

    image: InputImage
    mask: InputImage | None = None


def limit_decoding(max_pixels: int) -> None:
    """Set Pillow's own decompression-bomb limit to sdgate's pixel limit (process-wide).

    sdgate checks every input's size from its header before decoding; this is the second line, for
    any image Pillow opens elsewhere in the process.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels


def from_base64(value: str, field: str) -> bytes:
    """The bytes of a base64 string or a ``data:`` URL (``data:image/png;base64,...``)."""
    text = value.strip()
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InputError(f"{field} is a data: URL that is not base64; send data:image/png;base64,<data>", field)
    text = "".join(text.split())  # line breaks, as base64 tools write them
    if not text:
        raise InputError(f"{field} is empty; send a PNG, JPEG or WebP image in base64", field)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            f"{field} is not valid base64 (nor a data: URL); send a PNG, JPEG or WebP in base64", field
        ) from None


def read_input(data: bytes, field: str, max_pixels: int, *, mask: bool = False) -> InputImage:
    """Check and decode an input image. Raises :class:`InputError` naming ``field``.

    Order matters: the format and the size are read from the header, and only an image within
    ``max_pixels`` is decoded, so a small file that claims a huge canvas (a decompression bomb)
    costs nothing.
    """
    # 1. what it is, from its first bytes and its header
    # Past leading whitespace (an SVG may start with a blank line), without copying the data per format.
    space = _LEADING_SPACE.match(data)
    start = space.end() if space else 0
    for magic, name in _OTHER_FORMATS:
        if data.startswith(magic, start):
            raise InputError(f"{field} is {name}; send a PNG, JPEG or WebP image", field)
    try:
        with warnings.catch_warnings():
            # Over Pillow's limit (set to sdgate's, see limit_decoding) it warns: the check below says more.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=list(INPUT_FORMATS))
    except Image.DecompressionBombError as e:  # over twice Pillow's limit: refused from the header
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{claimed.group(1)} pixels" if claimed else f"larger than {max_pixels} pixels"
        raise InputError(f"{field} is {size}; the limit is {max_pixels}. Send a smaller image", field) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise InputError(f"{field} is not a PNG, JPEG or WebP image", field) from None
    with opened as im:
        # 2. its size, before any pixel is decoded
        width, height = im.size
        if width * height > max_pixels:
            raise InputError(
                f"{field} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}. "
                "Send a smaller image",
                field,
            )
        fmt = INPUT_FORMATS[str(im.format)]
        # 3. decode
        try:
            im.load()
            pixels = mask_pixels(im) if mask else im.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:
            raise InputError(
                f"{field} could not be decoded ({e}); send an undamaged PNG, JPEG or WebP", field
            ) from None
    if mask:
        # Kept as the mask sdgate uses, so that a repeat of the job reads the same mask.
        buf = io.BytesIO()
        pixels.save(buf, format="PNG")
        return InputImage(buf.getvalue(), "png", pixels)
    return InputImage(data, fmt, pixels)


def mask_pixels(im: Image.Image) -> Image.Image:
    """A mask as sdgate reads it, in L: white (255) repaints, black keeps.

    A mask with transparency marks the area to repaint by its alpha (transparent repaints, whatever
    the colour: OpenAI-style masks are the picture with a hole); any other by its brightness.
    """
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        alpha = im.convert("RGBA").getchannel("A")
        low, _high = alpha.getextrema()
        if isinstance(low, int) and low < 255:
            return ImageOps.invert(alpha)
    return im.convert("L")


def repaint_overlay(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """The generated image where the mask repaints, the original pixels elsewhere.

    The model works in latents 8x smaller than the image, and its decoder changes every pixel a
    little: pasting the kept area back is what makes "black keeps" exact.
    """
    repaint = mask.point(lambda v: 255 if v >= 128 else 0)
    return Image.composite(generated, original.convert("RGB"), repaint)


def preview_jpeg(image: Image.Image) -> bytes:
    """A live preview as the small JPEG that events and progress answers carry."""
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=70)
    return out.getvalue()
