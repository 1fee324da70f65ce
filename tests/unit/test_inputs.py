"""Input images (image-to-image, inpainting): decoding, every refusal, the mask rule, and how a request
with an image resolves (its size, its mode, its strength)."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdgate.config import Settings
from sdgate.errors import InvalidRequest
from sdgate.generation import read_inputs, resolve_request
from sdgate.imaging import InputError, from_base64, limit_decoding, mask_pixels, read_input, repaint_overlay
from sdgate.schemas import GenerationRequest, Mode, ModelDefaults

LIMIT = 1024 * 1024


def encoded(image: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def noise(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height``: a decompression bomb's shape, a few bytes long."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def refusal(data: bytes, field: str = "image", **kw: Any) -> str:
    with pytest.raises(InputError) as caught:
        read_input(data, field, LIMIT, **kw)
    assert caught.value.field == field
    return str(caught.value)


# -- base64 -----------------------------------------------------------------------------------------


def test_base64_plain_with_line_breaks_and_as_a_data_url_give_the_same_bytes() -> None:
    data = encoded(noise())
    text = b64(data)
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    assert from_base64(text, "image") == data
    assert from_base64(wrapped, "image") == data
    assert from_base64(f"data:image/png;base64,{text}", "image") == data


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("not base64 at all!", "is not valid base64"),
        ("abc", "is not valid base64"),  # wrong padding
        ("", "is empty"),
        ("data:image/png,rawbytes", "a data: URL that is not base64"),
    ],
)
def test_what_is_not_base64_is_refused_naming_the_field(value: str, words: str) -> None:
    with pytest.raises(InputError, match=words) as caught:
        from_base64(value, "mask")
    assert caught.value.field == "mask"
    assert str(caught.value).startswith("mask ")


# -- formats and sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp")])
def test_png_jpeg_and_webp_are_read_as_rgb_keeping_the_bytes_as_sent(fmt: str, name: str) -> None:
    data = encoded(noise(80, 48), fmt)
    got = read_input(data, "image", LIMIT)
    assert (got.format, got.size, got.image.mode, got.data) == (name, (80, 48), "RGB", data)


@pytest.mark.parametrize(
    ("fmt", "words"), [("GIF", "is a GIF"), ("TIFF", "is a TIFF"), ("BMP", "is a BMP"), ("ICO", "is an ICO")]
)
def test_other_image_formats_are_refused_by_name(fmt: str, words: str) -> None:
    assert words in refusal(encoded(noise(32, 32), fmt))


def test_svg_and_other_bytes_are_refused() -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'
    assert "is an SVG" in refusal(svg)
    assert "is an SVG or other XML" in refusal(b'<?xml version="1.0"?>' + svg)
    assert refusal(b"just some text, not a picture") == "image is not a PNG, JPEG or WebP image"


def test_an_image_over_the_pixel_limit_is_refused_with_its_size() -> None:
    big = encoded(Image.new("RGB", (1100, 1000), (10, 20, 30)))
    assert refusal(big) == ("image is 1100x1000 = 1100000 pixels; the limit is 1048576. Send a smaller image")


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding() -> None:
    bomb = png_claiming(60_000, 60_000)  # 3.6 gigapixels, in 70 bytes
    assert len(bomb) < 100
    start = time.perf_counter()
    message = refusal(bomb)
    assert time.perf_counter() - start < 1.0  # (a decode would allocate 10 GB first)
    assert message == "image is 3600000000 pixels; the limit is 1048576. Send a smaller image"


def test_with_pillows_limit_at_sdgates_the_refusal_still_names_the_size() -> None:
    saved = Image.MAX_IMAGE_PIXELS
    try:
        limit_decoding(LIMIT)  # as the server sets it
        big = encoded(Image.new("RGB", (1100, 1000), (10, 20, 30)))  # over the limit: Pillow warns
        assert refusal(big) == "image is 1100x1000 = 1100000 pixels; the limit is 1048576. Send a smaller image"
        # Over twice the limit Pillow refuses to open it at all; its header's claim is still named.
        assert refusal(png_claiming(60_000, 60_000)) == (
            "image is 3600000000 pixels; the limit is 1048576. Send a smaller image"
        )
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_pillows_own_limit_is_set_to_sdgates() -> None:
    saved = Image.MAX_IMAGE_PIXELS
    try:
        limit_decoding(4096)
        assert Image.MAX_IMAGE_PIXELS == 4096
        # Pillow refuses outright past twice its limit, wherever an image is opened in the process.
        with pytest.raises(Image.DecompressionBombError):
            Image.open(io.BytesIO(encoded(Image.new("RGB", (100, 100)))))
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_a_truncated_image_is_refused_as_damaged() -> None:
    data = encoded(noise(64, 64))
    assert "could not be decoded" in refusal(data[: len(data) // 2])


# -- masks ----------------------------------------------------------------------------------------


def test_a_mask_is_read_by_brightness_and_kept_as_the_png_sdgate_uses() -> None:
    mask = Image.new("RGB", (64, 64), (0, 0, 0))
    mask.paste((255, 255, 255), (0, 0, 32, 64))
    got = read_input(encoded(mask, "JPEG", quality=95), "mask", LIMIT, mask=True)
    assert got.format == "png" and got.image.mode == "L"
    assert Image.open(io.BytesIO(got.data)).mode == "L"
    arr = np.asarray(got.image)
    assert arr[:, :30].min() > 200 and arr[:, 34:].max() < 50


def test_a_mask_with_transparency_repaints_where_it_is_transparent_whatever_the_colour() -> None:
    # OpenAI-style: the picture itself (bright pixels here), with a transparent hole to repaint.
    rgba = Image.new("RGBA", (64, 64), (250, 250, 250, 255))
    rgba.paste((250, 250, 250, 0), (10, 10, 20, 20))
    arr = np.asarray(mask_pixels(rgba))
    assert (arr[10:20, 10:20] == 255).all()
    assert (arr[:10] == 0).all() and (arr[20:] == 0).all()


def test_an_opaque_rgba_mask_is_read_by_brightness() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 255))
    rgba.paste((0, 0, 0, 255), (0, 0, 4, 8))
    arr = np.asarray(mask_pixels(rgba))
    assert (arr[:, :4] == 0).all() and (arr[:, 4:] == 255).all()


def test_the_overlay_keeps_the_original_where_the_mask_is_black() -> None:
    original, generated = noise(16, 16, seed=1), noise(16, 16, seed=2)
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 0, 8, 16))
    out = np.asarray(repaint_overlay(generated, original, mask))
    assert np.array_equal(out[:, :8], np.asarray(generated)[:, :8])
    assert np.array_equal(out[:, 8:], np.asarray(original)[:, 8:])


# -- a request with an image ------------------------------------------------------------------------

MODEL = ModelDefaults(width=512, height=512, num_inference_steps=10, guidance_scale=7.5)


def resolve(tmp_path: Path, **fields: Any) -> Any:
    s = Settings(data_dir=tmp_path)
    req = GenerationRequest(prompt="a fox", **fields)
    return resolve_request(req, s, MODEL, read_inputs(req, s))


def refused(tmp_path: Path, **fields: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        resolve(tmp_path, **fields)
    assert caught.value.status == 422
    return caught.value


def test_an_image_sets_the_size_rounded_down_to_8_and_the_mode_with_its_default_strength(tmp_path: Path) -> None:
    p = resolve(tmp_path, image=b64(encoded(noise(101, 75))))
    assert (p.mode, p.width, p.height, p.strength, p.steps_to_run) == (Mode.img2img, 96, 72, 0.8, 8)
    mask = b64(encoded(Image.new("L", (101, 75), 255)))
    p = resolve(tmp_path, image=b64(encoded(noise(101, 75))), mask=mask)
    assert (p.mode, p.strength, p.steps_to_run) == (Mode.inpaint, 1.0, 10)
    p = resolve(tmp_path, image=b64(encoded(noise(101, 75))), strength=0.3, width=256)
    assert (p.width, p.height, p.strength, p.steps_to_run) == (256, 72, 0.3, 3)


def test_text_to_image_is_unchanged(tmp_path: Path) -> None:
    p = resolve(tmp_path)
    assert (p.mode, p.strength, p.image_key, p.steps_to_run) == (Mode.txt2img, None, None, 10)
    assert "strength" not in p.public() and "mode" not in p.public()


@pytest.mark.parametrize("field", ["mask", "strength"])
def test_a_mask_or_a_strength_without_an_image_is_refused(tmp_path: Path, field: str) -> None:
    value: Any = b64(encoded(noise())) if field == "mask" else 0.5
    err = refused(tmp_path, **{field: value})
    assert err.field == field
    assert err.message == f"{field} needs an image: send image too (base64 or a data: URL)"


def test_a_mask_of_another_size_is_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, image=b64(encoded(noise(64, 64))), mask=b64(encoded(Image.new("L", (64, 72)))))
    assert (err.field, err.message) == ("mask", "mask is 64x72 but image is 64x64; send a mask of the image's size")


def test_an_image_too_small_for_a_generation_is_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, image=b64(encoded(noise(40, 80))))
    assert err.field == "image"
    assert err.message.startswith("image is 40x80; its width, rounded down to a multiple of 8, must be between 64")


def test_a_strength_too_small_for_one_step_is_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, image=b64(encoded(noise())), strength=0.05)
    assert (err.field, err.message) == (
        "strength",
        "strength 0.05 of 10 steps is less than one step; raise strength or num_inference_steps",
    )


@pytest.mark.parametrize("strength", [0, -0.5, 1.01, 2])
def test_a_strength_out_of_range_is_refused_by_the_schema(strength: float) -> None:
    with pytest.raises(ValueError, match="strength"):
        GenerationRequest(prompt="a fox", image="eA==", strength=strength)


def test_bad_image_bytes_in_a_request_are_a_422_naming_the_field(tmp_path: Path) -> None:
    err = refused(tmp_path, image=b64(b"GIF89a" + b"\x00" * 20))
    assert (err.field, err.message) == ("image", "image is a GIF; send a PNG, JPEG or WebP image")
    err = refused(tmp_path, image=b64(encoded(noise())), mask="%%%")
    assert err.field == "mask"
