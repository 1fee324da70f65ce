"""Image inputs (image-to-image and inpainting) through a real ``sdgate serve`` process.

The session's server runs the random-weight ``tiny`` model: its images are noise, so pixels are compared
only where the contract says what they are — the same request and seed give the same bytes through JSON
(base64 or a ``data:`` URL), multipart and JumpStart's ``/invocations`` (JPEG); inpainting keeps the
unmasked area exactly (PNG) and changes the masked one; a mask with an alpha hole is the same mask as
its black and white equivalent. Input images are stored privately, named by the job's sidecar and never
served. Every bad input is a 4xx naming its field, before any model work and with nothing stored, and
the server goes on answering a good request.
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from sdgate.storage import sidecar_key
from tests.server import ServerProcess

TIMEOUT = 120
STEPS: dict[str, Any] = {"num_inference_steps": 2}
JPEG_ACCEPT = "application/json;jpeg"
BOX = (16, 16, 48, 48)  # the repainted square of the masks: left, top, right, bottom


# -- inputs ---------------------------------------------------------------------------------------


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB picture with every pixel its own: an exact comparison of it means something."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def bw_mask(width: int, height: int, box: tuple[int, int, int, int] = BOX) -> Image.Image:
    """Black (keep) with a white (repaint) rectangle."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


def alpha_mask(width: int, height: int, box: tuple[int, int, int, int] = BOX) -> Image.Image:
    """A picture with a transparent hole (repaint there), as OpenAI-style masks are."""
    mask = noise(width, height, seed=99).convert("RGBA")
    alpha = Image.new("L", (width, height), 255)
    alpha.paste(0, box)
    mask.putalpha(alpha)
    return mask


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def decompression_bomb() -> bytes:
    """A valid PNG header claiming 60000x60000 RGB with a tiny IDAT: a few dozen bytes, 10 GiB decoded."""
    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


PHOTO = encoded(noise(64, 64, seed=1))  # the usual input: 64x64 PNG
PHOTO_100x75 = encoded(noise(100, 75, seed=2))
MASK = encoded(bw_mask(64, 64))
HOLE = encoded(alpha_mask(64, 64))


# -- requests -------------------------------------------------------------------------------------


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def download(url: str) -> bytes:
    resp = httpx.get(url, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.content


def generate(server: ServerProcess, **fields: Any) -> dict[str, Any]:
    """A JSON ``POST /v1/generations`` that must succeed; the response body."""
    resp = httpx.post(f"{server.url}/v1/generations", json={**STEPS, **fields}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert body["status"] == "succeeded", body
    return body


def only_image(body: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The one image of a response and its downloaded bytes."""
    [img] = body["images"]
    return img, download(img["url"])


def multipart(server: ServerProcess, files: dict[str, Any], data: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/generations", files=files, data=data, timeout=TIMEOUT)


def key_of(url: str) -> str:
    return url.split("/images/", 1)[1]


def private_inputs(server: ServerProcess) -> set[Path]:
    """The input images stored under the private prefix (sidecars are ``.json``)."""
    root = server.data_dir / "images" / "private"
    return {p for p in root.rglob("*") if p.suffix in (".png", ".jpeg", ".webp")} if root.exists() else set()


def metrics(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(sdgate_\w+) ([0-9.e+]+)$", text, re.M)}


def jobs(server: ServerProcess) -> dict[str, dict[str, Any]]:
    """The newest jobs by id (the suite's requests run one after the other: a new one is among them)."""
    resp = httpx.get(f"{server.url}/v1/jobs", params={"limit": 100}, timeout=30)
    assert resp.status_code == 200, resp.text
    return {j["id"]: j for j in resp.json()["data"]}


# -- image-to-image: the same request is the same image, however it is sent -----------------------

PROMPT = "a harbour at noon"


@pytest.fixture(scope="module")
def json_img2img(server: ServerProcess) -> tuple[dict[str, Any], bytes]:
    """img2img of the 100x75 input with seed 11, as JSON base64: the image and its PNG bytes."""
    return only_image(generate(server, prompt=PROMPT, image=b64(PHOTO_100x75), seed=11, output_format="png"))


def test_img2img_size_defaults_to_the_input_rounded_down_to_multiples_of_8(
    json_img2img: tuple[dict[str, Any], bytes],
) -> None:
    img, data = json_img2img
    assert (img["width"], img["height"]) == (96, 72)
    with Image.open(io.BytesIO(data)) as im:
        assert (im.format, im.size) == ("PNG", (96, 72))
    assert img["seed"] == 11


def test_img2img_as_a_data_url_gives_the_same_bytes_as_base64(
    server: ServerProcess, json_img2img: tuple[dict[str, Any], bytes]
) -> None:
    url = "data:image/png;base64," + b64(PHOTO_100x75)
    _, data = only_image(generate(server, prompt=PROMPT, image=url, seed=11, output_format="png"))
    assert data == json_img2img[1]


def test_img2img_as_multipart_gives_the_same_bytes_as_json(
    server: ServerProcess, json_img2img: tuple[dict[str, Any], bytes]
) -> None:
    fields = {"prompt": PROMPT, "seed": "11", "num_inference_steps": "2", "output_format": "png"}
    resp = multipart(server, {"image": ("in.png", PHOTO_100x75, "image/png")}, fields)
    assert resp.status_code == 200, resp.text
    img, data = only_image(resp.json())
    assert (img["width"], img["height"]) == (96, 72)
    assert data == json_img2img[1]


def test_img2img_with_another_seed_gives_another_image(
    server: ServerProcess, json_img2img: tuple[dict[str, Any], bytes]
) -> None:
    _, data = only_image(generate(server, prompt=PROMPT, image=b64(PHOTO_100x75), seed=12, output_format="png"))
    assert data != json_img2img[1]


def test_img2img_with_width_and_height_resizes_the_input(server: ServerProcess) -> None:
    body = generate(server, prompt=PROMPT, image=b64(PHOTO_100x75), seed=11, width=64, height=128)
    img, data = only_image(body)
    assert (img["width"], img["height"]) == (64, 128)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (64, 128)


def test_img2img_from_jpeg_and_webp_inputs(server: ServerProcess) -> None:
    for fmt in ("JPEG", "WEBP"):
        img, data = only_image(generate(server, prompt=PROMPT, image=b64(encoded(noise(72, 64), fmt)), seed=3))
        assert (img["width"], img["height"]) == (72, 64), fmt
        assert pixels(data).shape == (64, 72, 3), fmt


def test_invocations_jpeg_is_the_same_bytes_as_the_native_jpeg(server: ServerProcess) -> None:
    """JumpStart's ``image`` and ``strength``, answered as base64 JPEG, are the bytes the native API stores."""
    fields = {"prompt": "a red boat", "seed": 21, "strength": 0.6, "width": 64, "height": 64, **STEPS}
    native = only_image(generate(server, image=b64(PHOTO), output_format="jpeg", **fields))[1]
    before = jobs(server)
    resp = httpx.post(
        f"{server.url}/invocations",
        json={"image": b64(PHOTO), **fields},
        headers={"Accept": JPEG_ACCEPT},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 200, resp.text
    [image] = resp.json()["generated_images"]
    assert base64.b64decode(image) == native
    new = [job for job_id, job in jobs(server).items() if job_id not in before]
    assert [job["surface"] for job in new] == ["sagemaker"]


def test_an_inpainting_invocation_keeps_the_unmasked_area(server: ServerProcess) -> None:
    payload = {"prompt": "a red boat", "seed": 22, "image": b64(PHOTO), "mask_image": b64(MASK), **STEPS}
    resp = httpx.post(
        f"{server.url}/invocations", json=payload, headers={"Accept": "application/json"}, timeout=TIMEOUT
    )
    assert resp.status_code == 200, resp.text
    [rows] = resp.json()["generated_images"]
    got = np.asarray(rows, dtype=np.int16)
    assert got.shape == (64, 64, 3)
    keep = np.asarray(bw_mask(64, 64)) == 0
    assert np.array_equal(got[keep], pixels(PHOTO)[keep])
    assert not np.array_equal(got[~keep], pixels(PHOTO)[~keep])


# -- inpainting -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inpainted(server: ServerProcess) -> dict[str, Any]:
    """PHOTO inpainted in BOX with a black and white mask, seed 31, PNG: the response and the bytes."""
    body = generate(server, prompt="a lantern", image=b64(PHOTO), mask=b64(MASK), seed=31, output_format="png")
    img, data = only_image(body)
    return {"body": body, "image": img, "data": data}


def test_inpainting_keeps_the_unmasked_area_exactly_and_changes_the_masked_one(inpainted: dict[str, Any]) -> None:
    got, sent = pixels(inpainted["data"]), pixels(PHOTO)
    assert got.shape == sent.shape == (64, 64, 3)
    keep = np.asarray(bw_mask(64, 64)) == 0
    assert keep.sum() == 64 * 64 - 32 * 32
    assert np.array_equal(got[keep], sent[keep])
    changed = np.any(got != sent, axis=-1)[~keep]
    assert changed.mean() > 0.5, f"only {changed.mean():.0%} of the masked pixels changed"


def test_a_mask_with_an_alpha_hole_is_the_same_as_its_black_and_white_mask(
    server: ServerProcess, inpainted: dict[str, Any]
) -> None:
    body = generate(server, prompt="a lantern", image=b64(PHOTO), mask=b64(HOLE), seed=31, output_format="png")
    assert only_image(body)[1] == inpainted["data"]


def test_inpainting_as_multipart_gives_the_same_bytes_as_json(server: ServerProcess, inpainted: dict[str, Any]) -> None:
    files = {"image": ("in.png", PHOTO, "image/png"), "mask": ("mask.png", MASK, "image/png")}
    fields = {"prompt": "a lantern", "seed": "31", "num_inference_steps": "2", "output_format": "png"}
    resp = multipart(server, files, fields)
    assert resp.status_code == 200, resp.text
    assert only_image(resp.json())[1] == inpainted["data"]


def test_inpainting_at_another_size_keeps_the_resized_inputs_unmasked_area(server: ServerProcess) -> None:
    """Input and mask 100x75, result 64x64: the kept area is the input resized to 64x64 (Lanczos), the
    mask resized with nearest neighbours."""
    source, mask = noise(100, 75, seed=5), bw_mask(100, 75, (30, 20, 70, 55))
    body = generate(
        server, prompt="a lantern", image=b64(encoded(source)), mask=b64(encoded(mask)), seed=32,
        width=64, height=64, output_format="png",
    )  # fmt: skip
    got = pixels(only_image(body)[1])
    assert got.shape == (64, 64, 3)
    resized = np.asarray(source.resize((64, 64), Image.Resampling.LANCZOS), dtype=np.int16)
    keep = np.asarray(mask.resize((64, 64), Image.Resampling.NEAREST)) < 128
    assert 0 < keep.sum() < 64 * 64
    assert np.array_equal(got[keep], resized[keep])
    assert not np.array_equal(got[~keep], resized[~keep])


# -- the inputs are stored privately ----------------------------------------------------------------


def test_inputs_are_stored_privately_named_by_the_sidecar_and_never_served(
    server: ServerProcess, inpainted: dict[str, Any]
) -> None:
    key = key_of(inpainted["image"]["url"])
    sidecar = json.loads((server.data_dir / "images" / sidecar_key(key)).read_text())
    assert sidecar["mode"] == "inpaint"
    assert sidecar["strength"] == 1.0  # inpainting's default
    inputs = sidecar["inputs"]
    assert set(inputs) == {"image", "mask"}
    image_path = server.data_dir / "images" / inputs["image"]
    mask_path = server.data_dir / "images" / inputs["mask"]
    for input_key, path in ((inputs["image"], image_path), (inputs["mask"], mask_path)):
        assert input_key.startswith("private/"), input_key
        assert path.is_file(), path
        assert httpx.get(f"{server.url}/images/{input_key}", timeout=30).status_code == 404
    assert image_path.read_bytes() == PHOTO  # the image as sent
    assert np.array_equal(pixels(mask_path.read_bytes()), pixels(MASK))  # the mask as sdgate reads it
    job = jobs(server)[inpainted["body"]["id"]]
    assert job["surface"] == "native"


def test_an_img2img_sidecar_names_its_image_and_no_mask(
    server: ServerProcess, json_img2img: tuple[dict[str, Any], bytes]
) -> None:
    key = key_of(json_img2img[0]["url"])
    sidecar = json.loads((server.data_dir / "images" / sidecar_key(key)).read_text())
    assert (sidecar["mode"], sidecar["strength"]) == ("img2img", 0.8)
    assert sidecar["inputs"]["mask"] is None
    stored = server.data_dir / "images" / sidecar["inputs"]["image"]
    assert stored.suffix == ".png"
    assert stored.read_bytes() == PHOTO_100x75
    assert httpx.get(f"{server.url}/images/{sidecar['inputs']['image']}", timeout=30).status_code == 404


def test_each_request_stores_its_own_inputs(server: ServerProcess) -> None:
    before = private_inputs(server)
    generate(server, prompt=PROMPT, image=b64(PHOTO), mask=b64(MASK), seed=4)
    new = private_inputs(server) - before
    assert len(new) == 2, new


# -- every bad input is a 4xx naming its field ------------------------------------------------------


def gif() -> bytes:
    return encoded(noise(64, 64).convert("P"), "GIF")


def tiff() -> bytes:
    return encoded(noise(64, 64), "TIFF")


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'
XML_SVG = b'<?xml version="1.0"?>\n' + SVG
OVER_PIXELS = encoded(Image.new("RGB", (1100, 1000), (40, 80, 120)))

# (id, JSON body, field, words in the message)
BAD_JSON: list[tuple[str, dict[str, Any], str, str]] = [
    ("not base64", {"image": "this is not base64!"}, "image", "not valid base64"),
    ("empty image", {"image": ""}, "image", "empty"),
    ("data URL not base64", {"image": "data:image/png,abc"}, "image", "data: URL"),
    ("base64 of text", {"image": b64(b"just some text, not a picture at all")}, "image", "not a PNG, JPEG or WebP"),
    ("GIF", {"image": b64(gif())}, "image", "is a GIF"),
    ("TIFF", {"image": b64(tiff())}, "image", "is a TIFF"),
    ("SVG", {"image": b64(SVG)}, "image", "is an SVG"),
    ("SVG with an XML declaration", {"image": b64(XML_SVG)}, "image", "SVG"),
    ("mask is a GIF", {"image": b64(PHOTO), "mask": b64(gif())}, "mask", "mask is a GIF"),
    (
        "mask of another size",
        {"image": b64(PHOTO), "mask": b64(encoded(bw_mask(64, 72)))},
        "mask",
        "mask is 64x72 but image is 64x64",
    ),
    ("strength 0", {"image": b64(PHOTO), "strength": 0}, "strength", "greater than 0"),
    ("strength 1.5", {"image": b64(PHOTO), "strength": 1.5}, "strength", "less than or equal to 1"),
    ("strength -1", {"image": b64(PHOTO), "strength": -1}, "strength", "greater than 0"),
    (
        "strength under one step",
        {"image": b64(PHOTO), "strength": 0.05, "num_inference_steps": 10},
        "strength",
        "less than one step",
    ),
    ("mask without image", {"mask": b64(MASK)}, "mask", "mask needs an image"),
    ("strength without image", {"strength": 0.5}, "strength", "strength needs an image"),
    ("image over the pixel limit", {"image": b64(OVER_PIXELS)}, "image", "1100x1000 = 1100000 pixels"),
    ("decompression bomb", {"image": b64(decompression_bomb())}, "image", "pixels"),
    ("image under 64 after rounding", {"image": b64(encoded(noise(100, 60)))}, "image", "100x60"),
]


@pytest.fixture
def refused_then_healthy(server: ServerProcess) -> Iterator[None]:
    """The test's request reaches no model and stores no input; then a good img2img request is a 200."""
    before, stored = metrics(server), private_inputs(server)
    yield
    after = metrics(server)
    for name in ("sdgate_requests_total", "sdgate_pipeline_calls_total", "sdgate_images_total"):
        assert after[name] == before[name], f"{name} changed: a bad request reached the engine"
    assert private_inputs(server) == stored, "a refused request stored an input"
    body = generate(server, prompt="still fine", image=b64(PHOTO), seed=1)
    assert (body["images"][0]["width"], body["images"][0]["height"]) == (64, 64)


@pytest.mark.parametrize(("case", "fields", "field", "words"), BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_a_bad_input_is_a_422_naming_the_field(
    server: ServerProcess, refused_then_healthy: None, case: str, fields: dict[str, Any], field: str, words: str
) -> None:
    resp = httpx.post(f"{server.url}/v1/generations", json={"prompt": "x", **STEPS, **fields}, timeout=TIMEOUT)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request"
    assert err["field"] == field
    assert words in err["message"], err["message"]


def test_a_bad_image_in_multipart_is_a_422_naming_the_field(server: ServerProcess, refused_then_healthy: None) -> None:
    resp = multipart(server, {"image": ("in.gif", gif(), "image/gif")}, {"prompt": "x", "num_inference_steps": "2"})
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert (err["field"], err["type"]) == ("image", "invalid_request")
    assert "is a GIF" in err["message"]


def test_a_file_in_another_multipart_field_is_a_422(server: ServerProcess, refused_then_healthy: None) -> None:
    files = {"image": ("in.png", PHOTO, "image/png"), "negative_prompt": ("np.txt", b"blurry", "text/plain")}
    resp = multipart(server, files, {"prompt": "x", "num_inference_steps": "2"})
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert (err["field"], err["type"]) == ("negative_prompt", "invalid_request")
    assert "cannot be a file" in err["message"]


def test_a_multipart_upload_over_8_mib_is_a_413(server: ServerProcess, refused_then_healthy: None) -> None:
    big = PHOTO + b"\x00" * (9 << 20)  # a PNG header, then 9 MiB
    resp = multipart(server, {"image": ("big.png", big, "image/png")}, {"prompt": "x"})
    assert resp.status_code == 413, resp.text
    err = resp.json()["error"]
    assert err["type"] == "payload_too_large"
    assert str(8 << 20) in err["message"]


def test_a_json_body_over_8_mib_is_a_413(server: ServerProcess, refused_then_healthy: None) -> None:
    big = b64(PHOTO + b"\x00" * (7 << 20))  # 7 MiB and a bit, about 9.4 MiB in base64
    resp = httpx.post(f"{server.url}/v1/generations", json={"prompt": "x", "image": big}, timeout=TIMEOUT)
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["type"] == "payload_too_large"


def test_a_json_body_under_8_mib_with_an_image_is_not_capped_at_64_kib(server: ServerProcess) -> None:
    """The other routes' 64 KiB cap is not the image routes': a 200 KiB PNG goes through."""
    photo = encoded(noise(256, 256, seed=8))
    assert len(photo) > 128 * 1024
    img, _ = only_image(generate(server, prompt=PROMPT, image=b64(photo), seed=2, width=64, height=64))
    assert (img["width"], img["height"]) == (64, 64)


@pytest.mark.parametrize("path", ["/invocations", "/endpoints/sd-inputs/invocations"])
def test_a_bad_mask_image_on_jumpstart_is_a_400_validation_error_naming_mask_image(
    server: ServerProcess, refused_then_healthy: None, path: str
) -> None:
    payload = {"prompt": "x", **STEPS, "image": b64(PHOTO), "mask_image": b64(gif())}
    resp = httpx.post(f"{server.url}{path}", json=payload, headers={"Accept": JPEG_ACCEPT}, timeout=TIMEOUT)
    assert resp.status_code == 400, resp.text
    assert resp.headers["x-amzn-errortype"] == "ValidationError"
    body = resp.json()
    assert body["ErrorCode"] == "ValidationError"
    assert body["error"]["field"] == "mask_image"
    assert body["Message"].startswith("mask_image "), body["Message"]
    assert "GIF" in body["Message"]


def test_a_mask_image_of_another_size_on_jumpstart_names_mask_image(
    server: ServerProcess, refused_then_healthy: None
) -> None:
    payload = {"prompt": "x", **STEPS, "image": b64(PHOTO), "mask_image": b64(encoded(bw_mask(64, 72)))}
    resp = httpx.post(f"{server.url}/invocations", json=payload, headers={"Accept": JPEG_ACCEPT}, timeout=TIMEOUT)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert (body["ErrorCode"], body["error"]["field"]) == ("ValidationError", "mask_image")
    assert "64x72" in body["Message"]


# -- browser forms ----------------------------------------------------------------------------------


def test_multipart_with_empty_optional_fields_is_accepted(server: ServerProcess) -> None:
    """A browser form sends every field, empty ones as ``""``, and an empty file input with no file name."""
    files = {"image": ("in.png", PHOTO, "image/png"), "mask": ("", b"", "application/octet-stream")}
    fields = {
        "prompt": "a lantern",
        "negative_prompt": "",
        "seed": "",
        "strength": "",
        "width": "",
        "height": "",
        "num_inference_steps": "2",
        "output_format": "",
    }
    resp = multipart(server, files, fields)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    img, data = only_image(body)
    assert (img["width"], img["height"]) == (64, 64)  # the input's size
    assert isinstance(img["seed"], int)  # a random seed, as with no seed field
    key = key_of(img["url"])
    sidecar = json.loads((server.data_dir / "images" / sidecar_key(key)).read_text())
    assert (sidecar["mode"], sidecar["strength"]) == ("img2img", 0.8)  # no mask: the empty file is none
    assert sidecar["negative_prompt"] in (None, "")
    assert pixels(data).shape == (64, 64, 3)
