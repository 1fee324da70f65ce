"""The OpenAI Images API through the real ``openai`` SDK, against real ``sdgate serve`` processes.

Two servers, both offering ``demo`` (the default) and, on the first, ``tiny``:

- ``open``: keys off (loopback), ``SDGATE_DEFAULT_STEPS`` small so that ``quality`` maps to few steps;
- ``secured``: keys required (``SDGATE_AUTH=on``) and ``SDGATE_OPENAI_STRICT_MODELS`` on, with keys made
  by the real ``sdgate keys`` CLI (two plain ones, one with a daily quota of one image).

OpenAI requests carry no seed: a test finds the job it made through the native API (by the ``user``
it sent, or by the jobs that are new since it started) and checks the image files' embedded
parameters (:func:`sdgate.imaging.read_metadata`).
"""

from __future__ import annotations

import base64
import io
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from sdgate.api.openai import QUALITY_STEPS
from sdgate.engine.previews import PREVIEW_SIDE
from sdgate.imaging import read_metadata
from tests import background
from tests.apikeys import create_key
from tests.server import ServerProcess, start_server

DEFAULT_STEPS = 4
"""``SDGATE_DEFAULT_STEPS`` of both servers: what ``quality`` takes its share of."""
PROMPT = "a red circle on a blue background"
TIMEOUT = 180
START_TIMEOUT = 300
"""Seconds a server may take to become ready: it may start beside others (tests/background.py) on two cores."""
OPEN_ENV = {
    "SDGATE_MODELS": "demo,tiny",
    "SDGATE_DEFAULT_STEPS": str(DEFAULT_STEPS),
    "SDGATE_MAX_BATCH_WAIT_MS": "0",
    "SDGATE_PREVIEW_EVERY": "1",  # a live preview after every step, for partial_images to pick from
}
SECURED_ENV = {
    "SDGATE_AUTH": "on",
    "SDGATE_OPENAI_STRICT_MODELS": "1",
    "SDGATE_DEFAULT_STEPS": str(DEFAULT_STEPS),
    "SDGATE_MAX_BATCH_WAIT_MS": "0",
}
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class Secured:
    server: ServerProcess
    alice: str
    bob: str
    quota: str  # --quota 1: one image a day


def _open_server() -> ServerProcess:
    data_dir = background.workdir("openai-open")  # the server builds tiny itself, on first use
    return start_server(data_dir, env=OPEN_ENV, timeout=START_TIMEOUT)


def _secured_server() -> Secured:
    data_dir = background.workdir("openai-secured")
    alice = create_key(data_dir, "alice")
    bob = create_key(data_dir, "bob")
    quota = create_key(data_dir, "quota", "--quota", "1")
    return Secured(start_server(data_dir, env=SECURED_ENV, model="demo", timeout=START_TIMEOUT), alice, bob, quota)


background.needs(__file__, openai_open=_open_server, openai_secured=_secured_server)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv: ServerProcess = background.take("openai_open", _open_server)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    sec: Secured = background.take("openai_secured", _secured_server)
    yield sec
    sec.server.stop()


# -- helpers --------------------------------------------------------------------------------------


def client_for(srv: ServerProcess, key: str = "not-checked") -> openai.OpenAI:
    """The SDK pointed at ``srv``; no retries, so that a 429 is raised at once."""
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


def native(srv: ServerProcess, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return httpx.Client(base_url=srv.url, timeout=TIMEOUT, headers=headers)


def jobs(srv: ServerProcess, key: str | None = None) -> list[dict[str, Any]]:
    with native(srv, key) as c:
        resp = c.get("/v1/jobs", params={"limit": 100})
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()["data"]
    return data


def job_of_user(srv: ServerProcess, user: str, key: str | None = None) -> dict[str, Any]:
    [job] = [j for j in jobs(srv, key) if j["user"] == user]
    return job


def new_jobs(srv: ServerProcess, before: list[dict[str, Any]], key: str | None = None) -> list[dict[str, Any]]:
    seen = {j["id"] for j in before}
    return [j for j in jobs(srv, key) if j["id"] not in seen]


def download(url: str) -> bytes:
    resp = httpx.get(url, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    return resp.content


def decoded(images: list[openai.types.Image] | None) -> list[bytes]:
    assert images
    out = []
    for image in images:
        assert image.b64_json is not None and image.url is None
        out.append(base64.b64decode(image.b64_json))
    return out


def meta(data: bytes) -> dict[str, Any]:
    found: dict[str, Any] | None = read_metadata(data)
    assert found is not None, "no sdgate parameters in the image"
    return found


def rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


REFUSED_LINE = "POST /v1/images/generations 429"


def logged(srv: ServerProcess, line: str, at_least: int, wait_s: float = 10) -> int:
    """How many times ``line`` is in the server's log, once it is there ``at_least`` times (or ``wait_s`` passed).

    The access log writes a request's line just after its answer went out: a client can be faster.
    """
    deadline = time.monotonic() + wait_s
    while (count := srv.log().count(line)) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def tag() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


# -- generations ----------------------------------------------------------------------------------


def test_dall_e_3_gets_the_default_model_and_a_url_to_a_64x64_png(server: ServerProcess) -> None:
    resp = client_for(server).images.generate(model="dall-e-3", prompt=PROMPT, size="64x64")
    assert resp.data is not None and len(resp.data) == 1
    [image] = resp.data
    assert image.b64_json is None and image.url is not None
    assert image.url.startswith(f"{server.url}/images/")
    assert image.revised_prompt == PROMPT
    assert (resp.size, resp.output_format, resp.background) == ("64x64", "png", "opaque")
    got = httpx.get(image.url, timeout=TIMEOUT)
    assert got.status_code == 200
    assert got.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(got.content)) as im:
        assert (im.format, im.size) == ("PNG", (64, 64))
    info = meta(got.content)
    assert (info["prompt"], info["model"], info["width"], info["height"]) == (PROMPT, "demo", 64, 64)


def test_b64_json_images_are_the_jobs_stored_images_and_the_native_api_remakes_them(server: ServerProcess) -> None:
    user = tag()
    resp = client_for(server).images.generate(prompt=PROMPT, n=2, size="64x64", response_format="b64_json", user=user)
    images = decoded(resp.data)
    assert len(images) == 2 and images[0] != images[1]
    assert all(d.revised_prompt == PROMPT for d in resp.data or [])

    job = job_of_user(server, user)
    assert (job["status"], job["surface"], job["model"]) == ("succeeded", "openai", "demo")
    assert [download(img["url"]) for img in job["images"]] == images
    seeds = [img["seed"] for img in job["images"]]
    assert seeds[1] == seeds[0] + 1
    for data, seed in zip(images, seeds, strict=True):
        info = meta(data)
        assert (info["prompt"], info["model"], info["seed"]) == (PROMPT, "demo", seed)
        assert info["num_inference_steps"] == DEFAULT_STEPS

    # The same request through the native API, with the seeds the OpenAI one drew: the same files.
    with native(server) as c:
        again = c.post(
            "/v1/generations",
            json={
                "prompt": PROMPT,
                "seed": seeds[0],
                "num_images": 2,
                "width": 64,
                "height": 64,
                "output_format": "png",
            },
        )
    assert again.status_code == 200, again.text
    assert [download(img["url"]) for img in again.json()["images"]] == images


@pytest.mark.parametrize("model", ["tiny", "demo"])
def test_a_served_models_name_picks_it(server: ServerProcess, model: str) -> None:
    user = tag()
    resp = client_for(server).images.generate(
        model=model, prompt=PROMPT, size="64x64", response_format="b64_json", user=user
    )
    [data] = decoded(resp.data)
    assert meta(data)["model"] == model
    assert job_of_user(server, user)["model"] == model


@pytest.mark.parametrize(
    ("quality", "echoed"),
    [("low", "low"), ("high", "high"), ("hd", "high"), ("standard", "medium"), (None, "auto")],
)
def test_quality_runs_its_share_of_the_default_steps(server: ServerProcess, quality: str | None, echoed: str) -> None:
    cards = {m.id: m for m in client_for(server).models.list()}
    assert cards["demo"].model_extra is not None
    assert cards["demo"].model_extra["default_steps"] == DEFAULT_STEPS  # SDGATE_DEFAULT_STEPS, not the model's 20
    share = 1.0 if quality is None else QUALITY_STEPS[quality]
    expected = max(1, round(DEFAULT_STEPS * share))
    extra: dict[str, Any] = {} if quality is None else {"quality": quality}
    resp = client_for(server).images.generate(prompt=PROMPT, size="64x64", response_format="b64_json", **extra)
    [data] = decoded(resp.data)
    assert meta(data)["num_inference_steps"] == expected
    assert resp.quality == echoed


def test_low_and_high_quality_differ_in_steps(server: ServerProcess) -> None:
    c = client_for(server)
    steps = {}
    for quality in ("low", "high"):
        resp = c.images.generate(prompt=PROMPT, size="64x64", response_format="b64_json", quality=quality)
        [data] = decoded(resp.data)
        steps[quality] = meta(data)["num_inference_steps"]
    assert steps["low"] < DEFAULT_STEPS < steps["high"], steps


def test_an_edit_repaints_the_transparent_square_only_at_the_images_size(server: ServerProcess) -> None:
    width, height = 96, 64  # not the demo model's 64x64: the result's size comes from the image
    source = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
    alpha = np.full((height, width), 255, dtype=np.uint8)
    square = (slice(16, 48), slice(40, 72))  # rows, columns
    alpha[square] = 0
    mask = np.dstack([np.zeros((height, width, 3), dtype=np.uint8), alpha])
    resp = client_for(server).images.edit(
        image=("photo.png", png(Image.fromarray(source)), "image/png"),
        mask=("mask.png", png(Image.fromarray(mask, "RGBA")), "image/png"),
        prompt=PROMPT,
        response_format="b64_json",
    )
    [data] = decoded(resp.data)
    assert resp.size == f"{width}x{height}"
    out = rgb(data)
    assert out.shape == (height, width, 3)
    keep = np.ones((height, width), dtype=bool)
    keep[square] = False
    assert np.array_equal(out[keep], source.astype(np.int16)[keep])  # pasted back exactly
    assert not np.array_equal(out[square], source.astype(np.int16)[square])  # repainted
    info = meta(data)
    assert (info["mode"], info["prompt"], info["width"], info["height"]) == ("inpaint", PROMPT, width, height)


def test_a_mask_without_alpha_is_a_bad_request_naming_mask(server: ServerProcess) -> None:
    image = png(Image.new("RGB", (64, 64), (10, 20, 30)))
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).images.edit(
            image=("photo.png", image, "image/png"), mask=("mask.png", image, "image/png"), prompt=PROMPT
        )
    assert caught.value.param == "mask"
    assert isinstance(caught.value.body, dict) and "alpha" in caught.value.body["message"]


def test_streaming_ends_with_a_completed_event_holding_the_image(server: ServerProcess) -> None:
    stream = client_for(server).images.generate(prompt=PROMPT, size="64x64", stream=True, partial_images=2)
    events = list(stream)
    assert events, "no events"
    assert {e.type for e in events} <= {"image_generation.partial_image", "image_generation.completed"}
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert len(completed) == 1 and events[-1] is completed[0]
    [done] = completed
    assert (done.size, done.output_format, done.background) == ("64x64", "png", "opaque")
    data = base64.b64decode(done.b64_json)
    with Image.open(io.BytesIO(data)) as im:
        assert (im.format, im.size) == ("PNG", (64, 64))
    assert meta(data)["prompt"] == PROMPT
    partials = [e for e in events if e.type == "image_generation.partial_image"]
    assert len(partials) <= 2  # a short job may end before the stream subscribed to its previews


def test_streaming_sends_the_partial_images_asked_for_then_the_image(server: ServerProcess) -> None:
    # tiny at 512x512 takes a good part of a second a step: the stream is listening long before the
    # previews it picks (the third step's and the sixth's of the 8 that quality max runs).
    stream = client_for(server).images.generate(
        model="tiny", prompt=PROMPT, size="512x512", quality="max", stream=True, partial_images=2
    )
    events = list(stream)
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    first, second, done = events
    assert first.type == second.type == "image_generation.partial_image"
    assert [first.partial_image_index, second.partial_image_index] == [0, 1]
    previews = []
    for partial in (first, second):
        assert (partial.output_format, partial.size) == ("jpeg", "512x512")
        with Image.open(io.BytesIO(base64.b64decode(partial.b64_json))) as im:
            assert im.format == "JPEG" and im.size == (PREVIEW_SIDE, PREVIEW_SIDE)  # a small picture
            previews.append(np.asarray(im.convert("RGB")))
    assert not np.array_equal(previews[0], previews[1])  # two moments of the run, not one picture twice
    assert done.type == "image_generation.completed"
    data = base64.b64decode(done.b64_json)
    with Image.open(io.BytesIO(data)) as im:
        assert (im.format, im.size) == ("PNG", (512, 512))
    assert (meta(data)["model"], meta(data)["num_inference_steps"]) == (
        "tiny",
        round(DEFAULT_STEPS * QUALITY_STEPS["max"]),
    )


def test_user_is_kept_on_the_job_and_the_surface_is_openai(server: ServerProcess) -> None:
    before = jobs(server)
    resp = client_for(server).images.generate(prompt=PROMPT, size="64x64", user="u-1")
    assert resp.data is not None
    [image] = resp.data
    [job] = new_jobs(server, before)
    assert image.url is not None
    assert [urlsplit(i["url"]).path for i in job["images"]] == [urlsplit(image.url).path]
    with native(server) as c:
        shown = c.get(f"/v1/jobs/{job['id']}").json()
    assert (shown["user"], shown["surface"], shown["status"]) == ("u-1", "openai", "succeeded")


def test_safety_identifier_is_kept_as_the_user(server: ServerProcess) -> None:
    before = jobs(server)
    client_for(server).images.generate(prompt=PROMPT, size="64x64", safety_identifier="s-2")
    [job] = new_jobs(server, before)
    assert job["user"] == "s-2"


def test_models_list_names_the_served_models_default_first(server: ServerProcess) -> None:
    models = list(client_for(server).models.list())
    assert [m.id for m in models] == ["demo", "tiny"]
    assert all(m.object == "model" and m.owned_by == "sdgate" for m in models)


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        pytest.param({"size": "500x500"}, "size", id="size-not-multiple-of-8"),
        pytest.param({"size": "big"}, "size", id="size-not-WxH"),
        pytest.param({"size": "64x64", "background": "transparent"}, "background", id="transparent"),
        pytest.param({"size": "64x64", "n": 9}, "n", id="n-over-the-servers-limit"),
        pytest.param({"size": "64x64", "n": 11}, "n", id="n-over-openais-limit"),
        pytest.param({"size": "64x64", "output_compression": 101}, "output_compression", id="compression-101"),
        pytest.param({"size": "64x64", "quality": "ultra"}, "quality", id="unknown-quality"),
    ],
)
def test_a_refused_value_is_a_bad_request_naming_its_param(
    server: ServerProcess, fields: dict[str, Any], param: str
) -> None:
    before = jobs(server)
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).images.generate(prompt=PROMPT, **fields)
    err = caught.value
    assert err.status_code == 400
    assert isinstance(err.body, dict) and set(err.body) == ERROR_KEYS, err.body
    assert (err.body["type"], err.body["param"], err.body["code"]) == (
        "invalid_request_error",
        param,
        "invalid_request",
    )
    assert err.body["message"]
    assert (err.param, err.code) == (param, "invalid_request")
    assert new_jobs(server, before) == []  # refused before any job was made


def test_strict_models_refuses_a_name_the_server_does_not_offer(secured: Secured) -> None:
    c = client_for(secured.server, secured.alice)
    with pytest.raises(openai.BadRequestError) as caught:
        c.images.generate(model="dall-e-3", prompt=PROMPT, size="64x64")
    err = caught.value
    assert isinstance(err.body, dict) and set(err.body) == ERROR_KEYS
    assert (err.body["param"], err.body["type"]) == ("model", "invalid_request_error")
    assert "dall-e-3" in err.body["message"] and "demo" in err.body["message"]
    # An offered name still works there.
    resp = c.images.generate(model="demo", prompt=PROMPT, size="64x64", response_format="b64_json")
    [data] = decoded(resp.data)
    assert meta(data)["model"] == "demo"


def test_a_wrong_key_is_an_authentication_error(secured: Secured) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(secured.server, "sdg_not_a_key_at_all").images.generate(prompt=PROMPT, size="64x64")
    err = caught.value
    assert err.status_code == 401
    assert isinstance(err.body, dict) and set(err.body) == ERROR_KEYS, err.body
    assert (err.body["type"], err.body["param"], err.body["code"]) == ("authentication_error", None, "unauthorized")
    assert err.body["message"]


def test_a_used_up_quota_is_a_rate_limit_error_with_retry_after(secured: Secured) -> None:
    c = client_for(secured.server, secured.quota)
    first = c.images.generate(prompt=PROMPT, size="64x64")  # the quota's one image
    assert first.data is not None and len(first.data) == 1
    with pytest.raises(openai.RateLimitError) as caught:
        c.images.generate(prompt=PROMPT, size="64x64")
    err = caught.value
    assert err.status_code == 429
    assert isinstance(err.body, dict) and set(err.body) == ERROR_KEYS, err.body
    assert (err.body["type"], err.body["code"]) == ("rate_limit_error", "rate_limited")
    assert "quota" in err.body["message"]
    retry_after = int(err.response.headers["retry-after"])
    assert 0 < retry_after <= 86400  # until the day (UTC) ends
    # Retrying cannot help before then: sdgate tells the SDK so, and a client with retries asks once.
    assert err.response.headers.get("x-should-retry") == "false"
    refusals = logged(secured.server, REFUSED_LINE, at_least=1)  # this one, at least
    retrying = openai.OpenAI(base_url=f"{secured.server.url}/v1", api_key=secured.quota, max_retries=2)
    with pytest.raises(openai.RateLimitError):
        retrying.images.generate(prompt=PROMPT, size="64x64")
    # Every attempt was answered before the SDK raised; the access log writes each line just after.
    assert logged(secured.server, REFUSED_LINE, at_least=refusals + 1) == refusals + 1


def test_with_keys_the_sdk_key_works_and_the_job_is_its_own(secured: Secured) -> None:
    srv = secured.server
    user = tag()
    resp = client_for(srv, secured.alice).images.generate(prompt=PROMPT, size="64x64", user=user)
    assert resp.data is not None and resp.data[0].url is not None
    job = job_of_user(srv, user, secured.alice)
    assert job["status"] == "succeeded" and job["surface"] == "openai"
    assert [urlsplit(i["url"]).path for i in job["images"]] == [urlsplit(resp.data[0].url).path]
    assert all(j["id"] != job["id"] for j in jobs(srv, secured.bob))
    with native(srv, secured.bob) as c:
        assert c.get(f"/v1/jobs/{job['id']}").status_code == 404
    with native(srv, secured.alice) as c:
        assert c.get(f"/v1/jobs/{job['id']}").status_code == 200
    with native(srv) as c:  # no key at all
        assert c.get("/v1/jobs").status_code == 401
