"""The README's quick start, against a real server process over HTTP."""

from __future__ import annotations

import io

import httpx
from PIL import Image

from tests.server import ServerProcess


def test_generation_returns_url_of_a_jpeg_of_the_requested_size(server: ServerProcess) -> None:
    resp = httpx.post(
        f"{server.url}/v1/generations", json={"prompt": "a red fox", "width": 256, "height": 192}, timeout=120
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "succeeded"
    [image] = body["images"]
    assert image["url"].startswith(server.url + "/images/")
    got = httpx.get(image["url"], timeout=30)
    assert got.status_code == 200
    assert got.headers["content-type"] == "image/jpeg"
    assert "immutable" in got.headers["cache-control"]
    with Image.open(io.BytesIO(got.content)) as im:
        assert im.format == "JPEG"
        assert im.size == (256, 192)
    assert len(got.content) == image["bytes"]
