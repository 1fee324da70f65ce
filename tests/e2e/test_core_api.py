"""The native API of a real ``sdgate serve`` process, over HTTP on a loopback port.

Covers the core's contract: reproducible seeds, batching under concurrency, validation before any
model work, stored images with cache headers and no path traversal, health and discovery routes.
"""

from __future__ import annotations

import io
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from sdgate.imaging import read_metadata
from sdgate.schemas import SCHEDULER_NAMES
from sdgate.storage import sidecar_key
from tests.server import ServerProcess

SMALL: dict[str, Any] = {"width": 64, "height": 64, "num_inference_steps": 2}
TIMEOUT = 120


def generate(server: ServerProcess, **fields: Any) -> dict[str, Any]:
    resp = httpx.post(f"{server.url}/v1/generations", json={**SMALL, **fields}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert body["status"] == "succeeded"
    return body


def download(url: str) -> bytes:
    resp = httpx.get(url, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.content


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def metrics(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(sdgate_\w+) ([0-9.e+]+)$", text, re.M)}


def key_of(url: str) -> str:
    return url.split("/images/", 1)[1]


# -- reproducibility ------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_images_and_another_seed_does_not(server: ServerProcess) -> None:
    a = generate(server, prompt="a lighthouse at dusk", seed=2024)
    b = generate(server, prompt="a lighthouse at dusk", seed=2024)
    c = generate(server, prompt="a lighthouse at dusk", seed=2025)
    urls = [r["images"][0]["url"] for r in (a, b, c)]
    assert len(set(urls)) == 3, "every generation is stored under its own key"
    first, again, other = (download(u) for u in urls)
    assert first == again
    assert first != other
    assert [r["images"][0]["seed"] for r in (a, b, c)] == [2024, 2024, 2025]


def test_image_i_has_seed_plus_i_and_matches_the_single_image_request(server: ServerProcess) -> None:
    seed = 9000
    many = generate(server, prompt="a bowl of ramen", seed=seed, num_images=3, output_format="png")
    assert [img["seed"] for img in many["images"]] == [seed, seed + 1, seed + 2]
    for i, img in enumerate(many["images"]):
        single = generate(server, prompt="a bowl of ramen", seed=seed + i, output_format="png")
        assert single["images"][0]["seed"] == seed + i
        # PNG is lossless, so this compares the generated pixels: alone or in a batch, within 1.
        diff = np.abs(pixels(download(img["url"])) - pixels(download(single["images"][0]["url"]))).max()
        assert diff <= 1, f"image {i} differs by {diff} from the single-image request with seed {seed + i}"


def test_a_request_without_seed_gets_a_random_one_it_can_reproduce(server: ServerProcess) -> None:
    random_seeded = generate(server, prompt="an old map")
    seed = random_seeded["images"][0]["seed"]
    again = generate(server, prompt="an old map", seed=seed)
    assert download(random_seeded["images"][0]["url"]) == download(again["images"][0]["url"])


# -- batching -------------------------------------------------------------------------------------


def test_eight_concurrent_requests_share_pipeline_calls(server: ServerProcess) -> None:
    n = 8
    before = metrics(server)
    barrier = threading.Barrier(n)

    def one(i: int) -> httpx.Response:
        with httpx.Client(timeout=TIMEOUT) as client:
            barrier.wait()
            return client.post(
                f"{server.url}/v1/generations",
                json={"prompt": f"concurrent request {i}", "seed": 100 + i, **SMALL, "width": 128},
            )

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(one, range(n)))
    after = metrics(server)

    assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses if r.status_code != 200]
    assert sorted(r.json()["images"][0]["seed"] for r in responses) == [100 + i for i in range(n)]
    requests = after["sdgate_requests_total"] - before["sdgate_requests_total"]
    calls = after["sdgate_pipeline_calls_total"] - before["sdgate_pipeline_calls_total"]
    assert requests == n
    assert 1 <= calls < n, f"{n} concurrent requests took {calls} pipeline calls: no batching"
    assert after["sdgate_images_total"] - before["sdgate_images_total"] == n
    # The per-job histogram of batch sizes says the same: these jobs shared calls of more than one image.
    jobs = after["sdgate_job_batch_images_count"] - before.get("sdgate_job_batch_images_count", 0.0)
    batch_images = after["sdgate_job_batch_images_sum"] - before.get("sdgate_job_batch_images_sum", 0.0)
    assert jobs == n
    assert batch_images > n, f"mean batch {batch_images / n}: every job ran alone"


# -- validation: every bad input is a 4xx naming the field, before any model work -----------------

BAD_FIELDS = [
    ("missing prompt", {"width": 64}, "prompt"),
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("blank prompt", {"prompt": "   \n"}, "prompt"),
    ("prompt not a string", {"prompt": ["a", "b"]}, "prompt"),
    ("prompt over 2000 chars", {"prompt": "a" * 2001}, "prompt"),
    ("negative prompt over 2000 chars", {"prompt": "x", "negative_prompt": "a" * 2001}, "negative_prompt"),
    ("width not a multiple of 8", {"prompt": "x", "width": 65}, "width"),
    ("width under 64", {"prompt": "x", "width": 56}, "width"),
    ("width over 2048", {"prompt": "x", "width": 2056}, "width"),
    ("height not a multiple of 8", {"prompt": "x", "height": 100}, "height"),
    ("width not a number", {"prompt": "x", "width": "wide"}, "width"),
    ("more pixels than max_pixels", {"prompt": "x", "width": 2048, "height": 2048}, "width"),
    ("steps 0", {"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ("steps 151", {"prompt": "x", "num_inference_steps": 151}, "num_inference_steps"),
    ("guidance -1", {"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ("guidance 31", {"prompt": "x", "guidance_scale": 31}, "guidance_scale"),
    ("num_images 0", {"prompt": "x", "num_images": 0}, "num_images"),
    ("num_images 9", {"prompt": "x", "num_images": 9}, "num_images"),
    ("unknown field", {"prompt": "x", "colour": "red"}, "colour"),
    ("unknown scheduler", {"prompt": "x", "scheduler": "karras"}, "scheduler"),
    ("bad output_format", {"prompt": "x", "output_format": "gif"}, "output_format"),
    ("quality 0", {"prompt": "x", "quality": 0}, "quality"),
    ("negative seed", {"prompt": "x", "seed": -1}, "seed"),
    ("seed over 32 bits", {"prompt": "x", "seed": 2**32}, "seed"),
]


@pytest.fixture
def engine_untouched(server: ServerProcess) -> Any:
    """Asserts that the test's requests never reached the engine."""
    before = metrics(server)
    yield
    after = metrics(server)
    for name in ("sdgate_requests_total", "sdgate_pipeline_calls_total", "sdgate_images_total"):
        assert after[name] == before[name], f"{name} changed: a bad request reached the engine"


@pytest.mark.parametrize(("case", "body", "field"), BAD_FIELDS, ids=[c[0] for c in BAD_FIELDS])
def test_bad_field_is_a_422_naming_the_field(
    server: ServerProcess, engine_untouched: None, case: str, body: dict[str, Any], field: str
) -> None:
    resp = httpx.post(f"{server.url}/v1/generations", json=body, timeout=30)
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request"
    assert err["field"] == field
    assert field in err["message"], err["message"]


def test_unknown_scheduler_message_lists_the_valid_names(server: ServerProcess, engine_untouched: None) -> None:
    resp = httpx.post(f"{server.url}/v1/generations", json={"prompt": "x", "scheduler": "karras"}, timeout=30)
    message = resp.json()["error"]["message"]
    assert "karras" in message
    for name in SCHEDULER_NAMES:
        assert name in message


def test_width_hint_says_what_would_work(server: ServerProcess, engine_untouched: None) -> None:
    resp = httpx.post(f"{server.url}/v1/generations", json={"prompt": "x", "width": 500}, timeout=30)
    assert "496" in resp.json()["error"]["message"]
    assert "504" in resp.json()["error"]["message"]


def post_raw(server: ServerProcess, content: Any, content_type: str | None) -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return httpx.post(f"{server.url}/v1/generations", content=content, headers=headers, timeout=30)


@pytest.mark.parametrize(
    ("content", "content_type", "status", "kind", "words"),
    [
        pytest.param(b'{"prompt": "x",', "application/json", 400, "malformed_request", "JSON", id="truncated-json"),
        pytest.param(b"prompt=a+fox", "application/json", 400, "malformed_request", "JSON", id="not-json"),
        pytest.param(b'{"prompt": "x"}', "text/plain", 415, "unsupported_media_type", "application/json", id="text"),
        pytest.param(
            b"prompt=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type", "json", id="form"
        ),
        pytest.param(b'["a fox"]', "application/json", 422, "invalid_request", "", id="json-array"),
        # /v1/generations takes images: its cap is SDGATE_MAX_UPLOAD_BYTES (8 MiB by default).
        pytest.param(
            json.dumps({"prompt": "a" * (9 << 20)}).encode(),
            "application/json",
            413,
            "payload_too_large",
            "bytes",
            id="over-cap",
        ),
        pytest.param(
            iter([b'{"prompt": "', *[b"a" * (1 << 20)] * 9, b'"}']),
            "application/json",
            413,
            "payload_too_large",
            "bytes",
            id="over-cap-chunked",
        ),
    ],
)
def test_bad_bodies_are_refused_with_the_right_status(
    server: ServerProcess,
    engine_untouched: None,
    content: Any,
    content_type: str,
    status: int,
    kind: str,
    words: str,
) -> None:
    resp = post_raw(server, content, content_type)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["type"] == kind
    assert words in err["message"]


# -- stored images --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored(server: ServerProcess) -> dict[str, Any]:
    """One generated PNG: the response and its downloaded bytes."""
    body = generate(server, prompt="a red fox, 여우", seed=31337, output_format="png", guidance_scale=5.0)
    [img] = body["images"]
    return {"body": body, "image": img, "data": download(img["url"]), "key": key_of(img["url"])}


def test_image_url_serves_the_image_with_immutable_cache_headers(server: ServerProcess, stored: dict[str, Any]) -> None:
    key = stored["key"]
    assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.png", key), key
    resp = httpx.get(stored["image"]["url"], timeout=30)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "image/png"
    cache = resp.headers["cache-control"]
    assert "immutable" in cache
    assert "public" in cache
    assert int(re.search(r"max-age=(\d+)", cache).group(1)) >= 365 * 24 * 3600  # type: ignore[union-attr]
    assert resp.headers["etag"] == f'"{key.rsplit("/", 1)[1].split(".")[0]}"'
    assert resp.content == stored["data"]
    assert len(resp.content) == stored["image"]["bytes"]
    with Image.open(io.BytesIO(resp.content)) as im:
        assert im.format == "PNG"
        assert im.size == (stored["image"]["width"], stored["image"]["height"]) == (64, 64)


def test_if_none_match_answers_304_without_a_body(server: ServerProcess, stored: dict[str, Any]) -> None:
    etag = httpx.get(stored["image"]["url"], timeout=30).headers["etag"]
    resp = httpx.get(stored["image"]["url"], headers={"If-None-Match": etag}, timeout=30)
    assert resp.status_code == 304
    assert resp.content == b""
    assert resp.headers["etag"] == etag
    other = httpx.get(stored["image"]["url"], headers={"If-None-Match": '"0000"'}, timeout=30)
    assert other.status_code == 200
    assert other.content == stored["data"]


def test_image_file_holds_the_prompt_and_seed(stored: dict[str, Any]) -> None:
    meta = read_metadata(stored["data"])
    assert meta is not None
    assert meta["prompt"] == "a red fox, 여우"
    assert meta["seed"] == 31337
    assert meta["guidance_scale"] == 5.0
    assert meta["num_inference_steps"] == 2
    assert (meta["width"], meta["height"]) == (64, 64)
    # reproducible files: nothing per-job inside
    assert stored["body"]["id"] not in json.dumps(meta)


def test_the_private_sidecar_holds_the_params_and_is_not_served(server: ServerProcess, stored: dict[str, Any]) -> None:
    image_path = server.data_dir / "images" / stored["key"]
    sidecar_path = server.data_dir / "images" / sidecar_key(stored["key"])
    assert image_path.read_bytes() == stored["data"]
    sidecar = json.loads(sidecar_path.read_text())
    assert sidecar["prompt"] == "a red fox, 여우"
    assert sidecar["seed"] == 31337
    assert (sidecar["width"], sidecar["height"]) == (64, 64)
    assert sidecar["num_inference_steps"] == 2
    assert sidecar["guidance_scale"] == 5.0
    assert sidecar["model"] == "tiny"
    assert sidecar["key"] == stored["key"]
    assert sidecar["content_type"] == "image/png"
    assert sidecar["bytes"] == len(stored["data"])
    assert sidecar["job_id"] == stored["body"]["id"]
    served = httpx.get(stored["image"]["url"].replace(stored["key"], sidecar_key(stored["key"])), timeout=30)
    assert served.status_code == 404  # the job behind a shared image stays private
    # no temporary files are left beside them
    assert [p.name for p in image_path.parent.iterdir() if p.name.startswith(".") or p.suffix == ".part"] == []


@pytest.mark.parametrize(("fmt", "content_type"), [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_each_format_is_served_with_its_content_type(server: ServerProcess, fmt: str, content_type: str) -> None:
    [img] = generate(server, prompt="a cat", seed=3, output_format=fmt)["images"]
    assert img["url"].endswith(f".{fmt}")
    assert img["content_type"] == content_type
    resp = httpx.get(img["url"], timeout=30)
    assert resp.headers["content-type"] == content_type
    meta = read_metadata(resp.content)
    assert meta is not None
    assert (meta["prompt"], meta["seed"]) == ("a cat", 3)


def get_raw(server: ServerProcess, target: bytes) -> httpx.Response:
    """GET with the request target sent byte for byte (httpx would normalise ``..`` away)."""
    with httpx.Client(timeout=30) as client:
        request = client.build_request("GET", f"{server.url}/", extensions={"target": target})
        return client.send(request)


def traversal_targets(server: ServerProcess, key: str) -> list[bytes]:
    log = f"server-{server.port}.log"  # exists in the data directory, one level above images/
    return [
        b"/images/../../etc/passwd",
        b"/images/../../../../../../../../etc/passwd",
        b"/images/%2e%2e/%2e%2e/etc/passwd",
        b"/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        b"/images/..%2f..%2f..%2fetc%2fpasswd",
        b"/images//etc/passwd",
        b"/images/%2fetc%2fpasswd",
        b"/images/..\\..\\etc\\passwd",
        f"/images/../{log}".encode(),
        f"/images/%2e%2e/{log}".encode(),
        f"/images/{key}/../../../../../{log}".encode(),
        f"/images/{key}%00.png".encode(),
        f"/images/{key.upper()}".encode(),
    ]


def test_path_traversal_is_404(server: ServerProcess, stored: dict[str, Any]) -> None:
    log_start = server.log()[:40]
    for target in traversal_targets(server, stored["key"]):
        resp = get_raw(server, target)
        assert resp.status_code == 404, f"{target!r}: {resp.status_code} {resp.text[:200]}"
        assert resp.json()["error"]["type"] == "not_found", target
        assert "root:" not in resp.text
        assert log_start not in resp.text
    # the well-formed key itself is served through the same raw path
    assert get_raw(server, f"/images/{stored['key']}".encode()).content == stored["data"]


def test_a_well_formed_key_that_does_not_exist_is_404(server: ServerProcess) -> None:
    resp = httpx.get(f"{server.url}/images/2020/01/01/{'ab' * 16}.jpeg", timeout=30)
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "not_found"


# -- health and discovery -------------------------------------------------------------------------


def test_healthz(server: ServerProcess) -> None:
    resp = httpx.get(f"{server.url}/healthz", timeout=10)
    assert resp.status_code == 200
    assert resp.json()["status"] == "ok"


def test_readyz_names_the_model(server: ServerProcess) -> None:
    resp = httpx.get(f"{server.url}/readyz", timeout=10)
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ready"
    assert body["model"] == "tiny"
    assert body["backend"] == "local"
    assert "tiny" in body["detail"]


def test_models_lists_tiny_with_its_defaults(server: ServerProcess) -> None:
    resp = httpx.get(f"{server.url}/v1/models", timeout=10)
    assert resp.status_code == 200
    [card] = resp.json()["data"]
    assert card["id"] == "tiny"
    assert card["ready"] is True
    assert card["backend"] == "local"
    assert (card["default_width"], card["default_height"]) == (512, 512)
    assert card["default_steps"] == 4
    assert card["default_guidance_scale"] == 7.5
    assert card["schedulers"] == list(SCHEDULER_NAMES)


def test_metrics_is_prometheus_text(server: ServerProcess) -> None:
    resp = httpx.get(f"{server.url}/metrics", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    assert "# TYPE sdgate_pipeline_calls_total counter" in resp.text
    assert metrics(server)["sdgate_ready"] == 1


def test_openapi_and_docs_are_served(server: ServerProcess) -> None:
    spec = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert spec["info"]["title"] == "sdgate"
    assert "/v1/generations" in spec["paths"]
    assert "/v1/models" in spec["paths"]
    request_schema = spec["components"]["schemas"]["GenerationRequest"]
    assert request_schema["required"] == ["prompt"]
    docs = httpx.get(f"{server.url}/docs", timeout=10)
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]
    assert "/openapi.json" in docs.text


def test_unknown_route_is_404_in_the_error_shape(server: ServerProcess) -> None:
    resp = httpx.get(f"{server.url}/v1/no-such-thing", timeout=10)
    assert resp.status_code == 404
    err = resp.json()["error"]
    assert err["type"] == "not_found"
    assert err["message"]


def test_wrong_method_is_405_in_the_error_shape(server: ServerProcess) -> None:
    resp = httpx.get(f"{server.url}/v1/generations", timeout=10)
    assert resp.status_code == 405
    assert resp.json()["error"]["type"] == "method_not_allowed"
