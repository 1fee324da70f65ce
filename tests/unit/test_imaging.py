"""Encoding with embedded parameters, and JumpStart's nested-list image form."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdgate.formats import CONTENT_TYPES
from sdgate.imaging import (
    decode,
    encode,
    from_rgb_lists,
    read_metadata,
    to_base64_jpeg,
    to_rgb_lists,
)

FORMATS = ("jpeg", "png", "webp")
PIL_NAMES = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def noise_image(width: int = 48, height: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


META: dict[str, Any] = {
    "prompt": 'a red fox in the snow, 여우 🦊 "quoted"\nsecond line',
    "negative_prompt": None,
    "seed": 4294967295,
    "width": 48,
    "height": 32,
    "guidance_scale": 7.5,
    "num_inference_steps": 4,
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_roundtrips_through_each_format(fmt: str) -> None:
    enc = encode(noise_image(), fmt, 85, META)  # type: ignore[arg-type]
    assert read_metadata(enc.data) == META
    assert enc.content_type == CONTENT_TYPES[fmt] == f"image/{fmt}"
    assert (enc.width, enc.height) == (48, 32)
    with Image.open(io.BytesIO(enc.data)) as im:
        assert im.format == PIL_NAMES[fmt]
        assert im.size == (48, 32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_metadata_there_is_none_to_read(fmt: str) -> None:
    assert read_metadata(encode(noise_image(), fmt).data) is None  # type: ignore[arg-type]


def test_a_foreign_png_has_no_sdgate_metadata() -> None:
    buf = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "someone else")
    noise_image().save(buf, format="PNG", pnginfo=info)
    assert read_metadata(buf.getvalue()) is None


def test_png_is_lossless_and_jpeg_quality_changes_the_bytes() -> None:
    img = noise_image()
    assert np.array_equal(np.asarray(decode(encode(img, "png").data)), np.asarray(img))
    low, high = encode(img, "jpeg", 10).data, encode(img, "jpeg", 95).data
    assert len(low) < len(high)


def test_encoding_is_deterministic() -> None:
    img = noise_image()
    for fmt in FORMATS:
        assert encode(img, fmt, 90, META).data == encode(img, fmt, 90, META).data  # type: ignore[arg-type]


def test_non_rgb_images_are_encoded_as_rgb() -> None:
    rgba = noise_image().convert("RGBA")
    enc = encode(rgba, "jpeg")
    assert decode(enc.data).mode == "RGB"
    assert (enc.width, enc.height) == (48, 32)


def test_rgb_lists_roundtrip_exactly() -> None:
    img = noise_image(5, 3)
    rows = to_rgb_lists(img)
    assert len(rows) == 3  # rows of pixels: height first
    assert all(len(row) == 5 for row in rows)
    assert all(len(px) == 3 and all(isinstance(v, int) for v in px) for row in rows for px in row)
    pixel = img.getpixel((4, 1))
    assert isinstance(pixel, tuple) and rows[1][4] == list(pixel)
    back = from_rgb_lists(rows)
    assert back.mode == "RGB"
    assert np.array_equal(np.asarray(back), np.asarray(img))


def test_rgb_lists_of_a_non_rgb_image_are_rgb() -> None:
    gray = Image.new("L", (2, 2), 200)
    assert to_rgb_lists(gray) == [[[200, 200, 200]] * 2] * 2


@pytest.mark.parametrize(
    "rows",
    [
        pytest.param([], id="empty"),
        pytest.param([[]], id="no-pixels"),
        pytest.param([[1, 2, 3]], id="2d"),
        pytest.param([[[1, 2]]], id="two-channels"),
        pytest.param([[[1, 2, 3, 4]]], id="four-channels"),
        pytest.param([[[[1, 2, 3]]]], id="4d"),
        pytest.param([[[0, 0, 256]]], id="above-255"),
        pytest.param([[[-1, 0, 0]]], id="negative"),
        pytest.param([[[1, 2, 3], [1, 2]]], id="ragged"),
        pytest.param([[["a", "b", "c"]]], id="strings"),
        pytest.param([[[None, 1, 2]]], id="null"),
        pytest.param([[[True, False, True]]], id="booleans"),
        pytest.param([[[float("nan"), 1, 2]]], id="nan"),
        pytest.param("not an image", id="string"),
    ],
)
def test_from_rgb_lists_rejects_what_is_not_hxwx3_of_0_to_255(rows: Any) -> None:
    with pytest.raises(ValueError):
        from_rgb_lists(rows)


def test_base64_jpeg_decodes_to_the_same_size() -> None:
    data = base64.b64decode(to_base64_jpeg(noise_image(16, 24)))
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG"
        assert im.size == (16, 24)
