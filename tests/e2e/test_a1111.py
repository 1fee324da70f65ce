"""AUTOMATIC1111's ``/sdapi/v1`` through the real ``webuiapi`` client, against real ``sdgate serve`` processes.

Two servers:

- ``open``: keys off (loopback), ``demo`` (the default) and ``tiny``, and a LoRA directory holding
  ``style`` (made here on the demo model, seeded weights);
- ``secured``: keys required (``SDGATE_AUTH=on``), ``demo`` only, one key made by the real CLI,
  presented as webui clients do: HTTP Basic, the key as the password.

``webuiapi`` raises ``RuntimeError(status, body text)`` for any answer but a 200.

The model a caller set with ``POST options`` is the caller's (everyone's with keys off): the test
that sets it puts the default back when it ends.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from sdgate.engine.builtin import DEMO_DIR
from sdgate.imaging import read_metadata
from tests import background
from tests.apikeys import create_key
from tests.loras import build_lora
from tests.server import ServerProcess, start_server

PROMPT = "a red circle on a blue background"
SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 4}
TIMEOUT = 180
START_TIMEOUT = 300
"""Seconds a server may take to become ready: it may start beside others (tests/background.py) on two cores."""
LONG_STEPS = 150
"""Steps of a txt2img that runs for seconds on demo (64x64), for progress and interrupt to see."""
ENV = {"SDGATE_MODELS": "demo,tiny", "SDGATE_MAX_LOADED_MODELS": "2", "SDGATE_MAX_BATCH_WAIT_MS": "0"}


@dataclass
class Secured:
    server: ServerProcess
    key: str


def _open_server() -> ServerProcess:
    data_dir = background.workdir("a1111-open")  # the server builds tiny itself, on first use
    # The default SDGATE_LORA_DIR is <data dir>/loras. Scale 0.3: a clear change on the trained demo model.
    build_lora(DEMO_DIR, data_dir / "loras" / "style.safetensors", seed=0, scale=0.3)
    return start_server(data_dir, env=ENV, timeout=START_TIMEOUT)


def _secured_server() -> Secured:
    data_dir = background.workdir("a1111-secured")
    key = create_key(data_dir, "webui")
    env = {"SDGATE_AUTH": "on", "SDGATE_MAX_BATCH_WAIT_MS": "0"}
    return Secured(start_server(data_dir, env=env, model="demo", timeout=START_TIMEOUT), key)


background.needs(__file__, a1111_open=_open_server, a1111_secured=_secured_server)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv: ServerProcess = background.take("a1111_open", _open_server)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    sec: Secured = background.take("a1111_secured", _secured_server)
    yield sec
    sec.server.stop()


# -- helpers --------------------------------------------------------------------------------------


def webui(srv: ServerProcess, **auth: str) -> Any:
    return webuiapi.WebUIApi(host="127.0.0.1", port=srv.port, **auth)


def rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def info_of(result: Any) -> dict[str, Any]:
    info = result.info
    assert isinstance(info, dict), f"info is not JSON: {info!r}"
    return info


def file_bytes(result: Any) -> list[bytes]:
    """The PNG files of a webui answer, as the server sent them."""
    return [base64.b64decode(b) for b in result.json["images"]]


def native_image(srv: ServerProcess, **fields: Any) -> bytes:
    body = {"prompt": PROMPT, "width": 64, "height": 64, "output_format": "png", **fields}
    resp = httpx.post(f"{srv.url}/v1/generations", json=body, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    [image] = resp.json()["images"]
    return httpx.get(image["url"], timeout=TIMEOUT).content


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return rgb(im)


def refused(call: Any, status: int = 400) -> dict[str, Any]:
    """The webui-shaped error body of a call that must fail with ``status``."""
    with pytest.raises(RuntimeError) as caught:
        call()
    got_status, text = caught.value.args
    assert got_status == status, text
    body: dict[str, Any] = json.loads(text)
    assert set(body) >= {"error", "detail", "errors"}, body
    return body


def job_ids(srv: ServerProcess) -> list[str]:
    resp = httpx.get(f"{srv.url}/v1/jobs", params={"limit": 100}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    return [j["id"] for j in resp.json()["data"]]


def noise(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


class Running:
    """A webui call on a thread of its own (with its own client: requests' sessions are not shared)."""

    def __init__(self, call: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call: Any) -> None:
        try:
            self.result = call()
        except BaseException as e:
            self.error = e

    def join(self) -> Any:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the call did not return"
        if self.error is not None:
            raise self.error
        return self.result


def wait_running(api: Any, deadline_s: float = 60) -> dict[str, Any]:
    """The first progress report of a running job that has taken a step."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        report: dict[str, Any] = api.get_progress()
        if report["progress"] > 0:
            return report
        time.sleep(0.02)
    pytest.fail(f"no job took a step in {deadline_s} s")


# -- txt2img --------------------------------------------------------------------------------------


def test_txt2img_makes_a_batch_with_consecutive_seeds_and_infotexts(server: ServerProcess) -> None:
    result = webui(server).txt2img(prompt=PROMPT, seed=5, batch_size=2, **SMALL)
    assert len(result.images) == 2
    assert all(im.size == (64, 64) for im in result.images)
    assert not np.array_equal(rgb(result.images[0]), rgb(result.images[1]))
    info = info_of(result)
    assert info["all_seeds"] == [5, 6] and info["seed"] == 5
    assert info["all_prompts"] == [PROMPT, PROMPT]
    assert (info["width"], info["height"], info["steps"], info["batch_size"]) == (64, 64, 4, 2)
    assert info["sd_model_name"] == "demo"
    assert len(info["infotexts"]) == 2
    for text, seed in zip(info["infotexts"], [5, 6], strict=True):
        assert text.startswith(PROMPT)
        assert "Steps: 4," in text and f"Seed: {seed}," in text and "Size: 64x64" in text
    for data, seed in zip(file_bytes(result), [5, 6], strict=True):
        meta = read_metadata(data)
        assert meta is not None and (meta["seed"], meta["model"]) == (seed, "demo")
    assert result.parameters["seed"] == 5 and result.parameters["batch_size"] == 2


def test_n_iter_batches_are_counted_in_with_the_batch_size(server: ServerProcess) -> None:
    result = webui(server).txt2img(prompt=PROMPT, seed=20, batch_size=2, n_iter=2, **SMALL)
    assert len(result.images) == 4
    assert info_of(result)["all_seeds"] == [20, 21, 22, 23]


def test_the_same_request_twice_gives_the_same_images(server: ServerProcess) -> None:
    api = webui(server)
    first = api.txt2img(prompt=PROMPT, seed=7, **SMALL)
    second = api.txt2img(prompt=PROMPT, seed=7, **SMALL)
    other = api.txt2img(prompt=PROMPT, seed=8, **SMALL)
    assert file_bytes(first) == file_bytes(second)
    assert not np.array_equal(rgb(first.image), rgb(other.image))  # the seed does matter


def test_an_image_is_the_same_whichever_dialect(server: ServerProcess) -> None:
    result = webui(server).txt2img(prompt=PROMPT, seed=11, sampler_name="Euler a", cfg_scale=7, **SMALL)
    info = info_of(result)
    assert (info["sampler_name"], info["cfg_scale"]) == ("Euler a", 7)
    [webui_file] = file_bytes(result)
    same = native_image(server, seed=11, num_inference_steps=4, scheduler="euler_a", guidance_scale=7)
    assert np.array_equal(decode(webui_file), decode(same))
    assert webui_file == same  # the embedded parameters too: nothing in the file tells the surfaces apart
    # What the mapping could get wrong shows: another scheduler or guidance is another image.
    for changed in ({"scheduler": "euler", "guidance_scale": 7}, {"scheduler": "euler_a", "guidance_scale": 5}):
        other = native_image(server, seed=11, num_inference_steps=4, **changed)
        assert not np.array_equal(decode(webui_file), decode(other)), changed


def test_dpm_2m_with_the_karras_schedule_is_the_native_dpmpp_2m_karras(server: ServerProcess) -> None:
    result = webui(server).txt2img(prompt=PROMPT, seed=12, sampler_name="DPM++ 2M", scheduler="karras", **SMALL)
    info = info_of(result)
    assert (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "Karras")
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in info["infotexts"][0]
    [data] = file_bytes(result)
    karras = native_image(server, seed=12, num_inference_steps=4, scheduler="dpmpp_2m_karras", guidance_scale=7)
    plain = native_image(server, seed=12, num_inference_steps=4, scheduler="dpmpp_2m", guidance_scale=7)
    assert np.array_equal(decode(data), decode(karras))
    assert not np.array_equal(decode(data), decode(plain))


def test_every_listed_sampler_runs_and_is_reported(server: ServerProcess) -> None:
    api = webui(server)
    names = api.util_get_sampler_names()
    assert {"Euler a", "Euler", "DPM++ 2M"} <= set(names)
    for name in names:
        info = info_of(api.txt2img(prompt=PROMPT, seed=1, sampler_name=name, width=64, height=64, steps=2))
        assert info["sampler_name"] == name
        assert f"Sampler: {name}," in info["infotexts"][0]


def test_an_unknown_sampler_is_a_400_listing_the_valid_ones(server: ServerProcess) -> None:
    api = webui(server)
    body = refused(lambda: api.txt2img(prompt=PROMPT, sampler_name="Heun++ 9", **SMALL))
    assert "Heun++ 9" in body["detail"]
    for sampler in api.get_samplers():
        assert sampler["name"] in body["detail"], sampler


def test_the_karras_schedule_with_another_sampler_is_a_400(server: ServerProcess) -> None:
    api = webui(server)
    body = refused(lambda: api.txt2img(prompt=PROMPT, sampler_name="Euler", scheduler="karras", **SMALL))
    assert "karras" in body["detail"] and "DPM++ 2M" in body["detail"]


@pytest.mark.parametrize(
    "fields",
    [
        {"enable_hr": True},
        {"restore_faces": True},
        {"tiling": True},
        {"subseed_strength": 0.5},
        {"script_name": "x/y/z plot"},
    ],
    ids=lambda f: next(iter(f)),
)
def test_what_would_change_the_picture_unhonoured_is_a_400(server: ServerProcess, fields: dict[str, Any]) -> None:
    before = job_ids(server)
    body = refused(lambda: webui(server).txt2img(prompt=PROMPT, **SMALL, **fields))
    assert next(iter(fields)) in body["detail"]
    assert body["error"] == "invalid_request"
    assert job_ids(server) == before  # refused before any job was made


# -- models ---------------------------------------------------------------------------------------


def test_set_model_picks_the_callers_model_and_override_settings_wins(server: ServerProcess) -> None:
    api = webui(server)
    assert api.util_get_model_names() == ["demo", "tiny"]
    assert [m["model_name"] for m in api.get_sd_models()] == ["demo", "tiny"]  # the default first
    assert api.util_get_current_model() == "demo"
    try:
        api.util_set_model("tiny")
        assert api.util_get_current_model() == "tiny"
        on_tiny = api.txt2img(prompt=PROMPT, seed=2, **SMALL)
        assert info_of(on_tiny)["sd_model_name"] == "tiny"
        [data] = file_bytes(on_tiny)
        meta = read_metadata(data)
        assert meta is not None and meta["model"] == "tiny"
        overridden = api.txt2img(prompt=PROMPT, seed=2, override_settings={"sd_model_checkpoint": "demo"}, **SMALL)
        assert info_of(overridden)["sd_model_name"] == "demo"
        assert not np.array_equal(rgb(on_tiny.image), rgb(overridden.image))
        # A title as some clients send it (name [hash]) is the model too.
        titled = api.txt2img(prompt=PROMPT, seed=2, override_settings={"sd_model_checkpoint": "demo [abc123]"}, **SMALL)
        assert file_bytes(titled) == file_bytes(overridden)
    finally:
        api.set_options({"sd_model_checkpoint": "demo"})
    assert info_of(api.txt2img(prompt=PROMPT, seed=2, **SMALL))["sd_model_name"] == "demo"


def test_an_unknown_model_is_a_400_listing_the_offered_ones(server: ServerProcess) -> None:
    api = webui(server)
    body = refused(
        lambda: api.txt2img(prompt=PROMPT, override_settings={"sd_model_checkpoint": "sd_xl_base_1.0"}, **SMALL)
    )
    assert "sd_xl_base_1.0" in body["detail"] and "demo" in body["detail"] and "tiny" in body["detail"]


# -- LoRAs ----------------------------------------------------------------------------------------


def test_a_lora_in_the_prompt_is_applied_and_reported(server: ServerProcess) -> None:
    api = webui(server)
    assert "style" in [lo["name"] for lo in api.get_loras()]
    plain = api.txt2img(prompt=PROMPT, seed=3, **SMALL)
    styled = api.txt2img(prompt=f"{PROMPT} <lora:style:1>", seed=3, **SMALL)
    off = api.txt2img(prompt=f"<lora:style:0> {PROMPT}", seed=3, **SMALL)
    assert not np.array_equal(rgb(styled.image), rgb(plain.image))
    assert np.array_equal(rgb(off.image), rgb(plain.image))  # weight 0: recorded, not run
    info = info_of(styled)
    assert info["prompt"] == PROMPT  # the tag is taken out of the prompt ...
    assert info["infotexts"][0].startswith(f"{PROMPT} <lora:style:1>\n")  # ... and shown in the infotext
    [data] = file_bytes(styled)
    meta = read_metadata(data)
    assert meta is not None and meta["loras"] == [{"name": "style", "weight": 1.0}]
    # The same LoRA named in the native API: the same pixels.
    native = native_image(
        server, seed=3, num_inference_steps=4, scheduler="euler_a", guidance_scale=7, loras=[{"name": "style"}]
    )
    assert np.array_equal(decode(native), rgb(styled.image))


def test_an_unknown_lora_is_a_400(server: ServerProcess) -> None:
    body = refused(lambda: webui(server).txt2img(prompt=f"{PROMPT} <lora:nope:1>", **SMALL))
    assert "nope" in body["detail"]


# -- img2img --------------------------------------------------------------------------------------


@pytest.mark.parametrize("invert", [0, 1])
def test_img2img_with_a_mask_repaints_only_the_masked_area(server: ServerProcess, invert: int) -> None:
    source = noise(64, 64, seed=4)
    square = (slice(16, 48), slice(8, 40))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[square] = 255  # white repaints (black, with inpainting_mask_invert)
    result = webui(server).img2img(
        images=[Image.fromarray(source)],
        mask_image=Image.fromarray(mask, "L"),
        inpainting_mask_invert=invert,
        mask_blur=0,
        prompt=PROMPT,
        seed=4,
        **SMALL,
    )
    [image] = result.images
    assert image.size == (64, 64)
    out, src = rgb(image), source.astype(np.int16)
    inside = np.zeros((64, 64), dtype=bool)
    inside[square] = True
    kept, repainted = (~inside, inside) if not invert else (inside, ~inside)
    assert np.array_equal(out[kept], src[kept])
    assert not np.array_equal(out[repainted], src[repainted])
    info = info_of(result)
    assert info["is_using_inpainting_conditioning"] is True


def test_img2img_mask_blur_keeps_what_lies_beyond_the_blur_exactly(server: ServerProcess) -> None:
    source = noise(64, 64, seed=5)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[24:40, 24:40] = 255
    result = webui(server).img2img(
        images=[Image.fromarray(source)],
        mask_image=Image.fromarray(mask, "L"),
        mask_blur=4,  # the webui's default: soft edges, repainted where the blurred mask is at least half white
        prompt=PROMPT,
        seed=5,
        **SMALL,
    )
    out, src = rgb(result.image), source.astype(np.int16)
    far = np.ones((64, 64), dtype=bool)
    far[20:44, 20:44] = False  # the square and 4 pixels around it
    assert np.array_equal(out[far], src[far])
    assert not np.array_equal(out[24:40, 24:40], src[24:40, 24:40])


def test_img2img_without_a_mask_redraws_the_image_at_its_size(server: ServerProcess) -> None:
    source = noise(64, 64, seed=6)
    result = webui(server).img2img(
        images=[Image.fromarray(source)], denoising_strength=0.5, prompt=PROMPT, seed=6, **SMALL
    )
    info = info_of(result)
    assert info["denoising_strength"] == 0.5
    assert info["is_using_inpainting_conditioning"] is False
    assert result.image.size == (64, 64)
    assert not np.array_equal(rgb(result.image), source.astype(np.int16))


# -- progress, interrupt ----------------------------------------------------------------------------


def test_progress_rises_while_a_txt2img_runs(server: ServerProcess) -> None:
    poller = webui(server)
    assert poller.get_progress()["progress"] == 0.0  # nothing running
    running = Running(lambda: webui(server).txt2img(prompt=PROMPT, seed=9, width=64, height=64, steps=LONG_STEPS))
    reports = [wait_running(poller)]
    try:
        while running.thread.is_alive():
            report = poller.get_progress()
            if report["progress"] == 0:  # it ended
                break
            reports.append(report)
            if len({r["progress"] for r in reports}) >= 4 and any(r["current_image"] for r in reports):
                break
            time.sleep(0.05)
    finally:
        poller.interrupt()  # done looking: let the rest of the steps go
    running.join()
    values = [r["progress"] for r in reports]
    assert len(set(values)) >= 2, values
    assert values == sorted(values) and all(0 < v <= 1 for v in values), values
    # The live preview (a webui client shows it while it waits): a picture of the image's size.
    [*_, preview] = [r["current_image"] for r in reports if r["current_image"]]
    with Image.open(io.BytesIO(base64.b64decode(preview))) as im:
        assert im.format == "JPEG" and im.size == (64, 64)
    for r in reports:
        assert r["state"]["sampling_steps"] == LONG_STEPS
        assert 0 < r["state"]["sampling_step"] <= LONG_STEPS
        assert r["progress"] == pytest.approx(r["state"]["sampling_step"] / LONG_STEPS, abs=1e-4)
        assert r["state"]["job"] == f"task({r['current_task']})"
    assert poller.get_progress()["progress"] == 0.0  # the job ended


def test_interrupt_makes_the_running_txt2img_return_without_images(server: ServerProcess) -> None:
    api = webui(server)
    running = Running(lambda: webui(server).txt2img(prompt=PROMPT, seed=10, width=64, height=64, steps=LONG_STEPS))
    report = wait_running(api)
    assert api.interrupt() == {}
    result = running.join()
    assert result.images == []
    info = info_of(result)
    assert info["sdgate_job_id"] == report["current_task"]
    job = httpx.get(f"{server.url}/v1/jobs/{info['sdgate_job_id']}", timeout=TIMEOUT).json()
    assert job["status"] == "canceled"
    assert job["progress"]["step"] < LONG_STEPS
    # The server goes on: the next request is answered with its image.
    assert len(api.txt2img(prompt=PROMPT, seed=10, **SMALL).images) == 1


# -- lists ----------------------------------------------------------------------------------------


def test_the_lists_have_the_webuis_shapes(server: ServerProcess) -> None:
    api = webui(server)
    samplers = api.get_samplers()
    assert samplers and all(set(s) == {"name", "aliases", "options"} for s in samplers)
    assert all(isinstance(s["aliases"], list) and s["options"] == {} for s in samplers)
    schedulers = api.get_schedulers()
    assert [s["name"] for s in schedulers] == ["automatic", "karras"]
    for s in schedulers:
        assert {"name", "label", "aliases", "default_rho", "need_inner_model"} <= set(s)
        assert isinstance(s["label"], str) and s["label"]
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    options = api.get_options()
    assert options["sd_model_checkpoint"] in api.util_get_model_names()
    loras = api.get_loras()
    assert all({"name", "alias", "path"} <= set(lo) for lo in loras)
    models = api.get_sd_models()
    assert all({"title", "model_name", "filename"} <= set(m) for m in models)


def test_options_other_than_the_model_are_kept_and_echoed(server: ServerProcess) -> None:
    api = webui(server)
    name = f"sdgate_test_{time.monotonic_ns()}"
    assert name not in api.get_options()
    api.set_options({name: 42})
    assert api.get_options()[name] == 42
    before = api.get_options()["sd_model_checkpoint"]
    # webuiapi's set_options returns the answer's body whatever its status: here the webui's error.
    answer = api.set_options({"sd_model_checkpoint": "nope"})
    assert answer["error"] == "invalid_request" and "nope" in answer["detail"], answer
    assert api.get_options()["sd_model_checkpoint"] == before


# -- keys -----------------------------------------------------------------------------------------


def test_with_keys_the_key_as_the_basic_password_works(secured: Secured) -> None:
    api = webui(secured.server, username="anyone", password=secured.key)
    result = api.txt2img(prompt=PROMPT, seed=1, **SMALL)
    assert len(result.images) == 1
    job_id = info_of(result)["sdgate_job_id"]
    mine = httpx.get(
        f"{secured.server.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {secured.key}"}, timeout=TIMEOUT
    )
    assert mine.status_code == 200 and mine.json()["surface"] == "a1111"
    assert api.get_progress()["progress"] == 0.0


@pytest.mark.parametrize("auth", [{"username": "anyone", "password": "sdg_wrong"}, {}], ids=["wrong-password", "none"])
def test_with_keys_a_wrong_or_missing_password_is_a_401(secured: Secured, auth: dict[str, str]) -> None:
    api = webui(secured.server, **auth)
    body = refused(lambda: api.txt2img(prompt=PROMPT, seed=1, **SMALL), status=401)
    assert body["error"] == "unauthorized"
    with pytest.raises(RuntimeError) as caught:
        api.img2img(images=[Image.new("RGB", (64, 64))], prompt=PROMPT, **SMALL)
    assert caught.value.args[0] == 401
