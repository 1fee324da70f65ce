"""Several models in one server, chosen per request: a real ``sdgate serve`` with two tiny pipelines.

``tiny`` (the built-in) and ``other`` (the same architecture built here with other weights), and room
for one pipeline at a time, so that every switch loads a model and unloads the other: requests get
the model they name, a burst that mixes both gets every image from the right one, and a job whose
model is not in memory shows its loading phase.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from sdgate.imaging import read_metadata
from tests import background
from tests.server import ServerProcess, build_tiny_model, start_server, with_tiny_models

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "output_format": "png"}
TIMEOUT = 120


def _models_server() -> ServerProcess:
    root = background.workdir("models")
    # The tiny architecture with other weights: other images for a seed.
    other = build_tiny_model(root / "other-tiny", seed=1)
    data_dir = with_tiny_models(root / "data")
    env = {
        "SDGATE_MODELS": f"tiny,other={other}",
        "SDGATE_MAX_LOADED_MODELS": "1",
        "SDGATE_MAX_BATCH_WAIT_MS": "50",
    }
    return start_server(data_dir, env=env)


background.needs(__file__, models_server=_models_server)


@pytest.fixture(scope="module")
def server() -> Any:
    srv: ServerProcess = background.take("models_server", _models_server)
    yield srv
    srv.stop()


def generate(server: ServerProcess, **fields: Any) -> dict[str, Any]:
    resp = httpx.post(f"{server.url}/v1/generations", json={"prompt": "a kite", **SMALL, **fields}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def image_bytes(job: dict[str, Any]) -> bytes:
    [image] = job["images"]
    return httpx.get(image["url"], timeout=TIMEOUT).content


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def cards(server: ServerProcess) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]}


def test_models_lists_both_the_first_as_the_default(server: ServerProcess) -> None:
    listed = cards(server)
    assert list(listed) == ["tiny", "other"]
    assert (listed["tiny"]["default"], listed["other"]["default"]) == (True, False)
    assert listed["other"]["default_width"] == 512  # read from its configs before it was ever loaded


def test_each_request_is_answered_by_the_model_it_names(server: ServerProcess) -> None:
    by_default = generate(server, seed=3)
    tiny = generate(server, seed=3, model="tiny")
    other = generate(server, seed=3, model="other")
    assert (by_default["model"], tiny["model"], other["model"]) == ("tiny", "tiny", "other")
    assert image_bytes(by_default) == image_bytes(tiny)
    assert image_bytes(other) != image_bytes(tiny)
    meta = read_metadata(image_bytes(other))
    assert meta is not None and meta["model"] == "other"
    # One pipeline at a time: the last request's model is the one in memory.
    listed = cards(server)
    assert (listed["other"]["loaded"], listed["tiny"]["loaded"]) == (True, False)


def test_a_burst_mixing_both_models_gets_every_image_from_the_right_one(server: ServerProcess) -> None:
    seeds = range(100, 108)
    wanted = [("tiny" if seed % 2 else "other", seed) for seed in seeds]
    # Each seed alone on each model, grouped by model (two loads, not sixteen).
    alone = {(m, s): pixels(image_bytes(generate(server, model=m, seed=s))) for m in ("other", "tiny") for s in seeds}
    with ThreadPoolExecutor(len(wanted)) as pool:
        together = list(pool.map(lambda ms: generate(server, model=ms[0], seed=ms[1]), wanted))
    for (model, seed), job in zip(wanted, together, strict=True):
        assert job["model"] == model
        made = pixels(image_bytes(job))
        # Batched with the others of its model: within one of the same image alone, as batching
        # promises; the other model's image for that seed is nowhere near.
        assert np.abs(made - alone[(model, seed)]).max() <= 1, (model, seed)
        other = "tiny" if model == "other" else "other"
        assert np.abs(made - alone[(other, seed)]).mean() > 5, (model, seed)


def test_a_job_whose_model_is_not_loaded_shows_its_loading_phase(server: ServerProcess) -> None:
    generate(server, model="tiny", seed=1)  # tiny in memory, other not
    # A longer tiny job first, so that the other's job is still queued when its events are followed.
    blocker = httpx.post(
        f"{server.url}/v1/generations",
        json={"prompt": "a long one", "model": "tiny", "width": 256, "height": 256, "num_inference_steps": 20},
        headers={"Prefer": "respond-async"},
        timeout=TIMEOUT,
    )
    job = httpx.post(
        f"{server.url}/v1/generations",
        json={"prompt": "a kite", "model": "other", "seed": 2, **SMALL},
        headers={"Prefer": "respond-async"},
        timeout=TIMEOUT,
    ).json()
    names, loading_seen = [], False
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job['id']}/events", timeout=TIMEOUT) as resp:
        name = ""
        for line in resp.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
                names.append(name)
            elif line.startswith("data:") and name == "loading":
                loading_seen = json.loads(line[5:])["progress"]["loading"]
            if name in ("succeeded", "failed", "canceled"):
                break
    assert blocker.status_code == 202
    assert "loading" in names, names
    assert loading_seen  # the job's progress says so while it loads
    assert names.index("loading") < names.index("succeeded")
    done = httpx.get(f"{server.url}/v1/jobs/{job['id']}", timeout=10).json()
    assert done["status"] == "succeeded" and done["progress"]["loading"] is False


def test_an_unknown_model_is_a_422_naming_model_and_the_valid_names(server: ServerProcess) -> None:
    resp = httpx.post(f"{server.url}/v1/generations", json={"prompt": "a kite", "model": "sdxl"}, timeout=10)
    assert resp.status_code == 422
    assert resp.json()["error"] == {
        "type": "invalid_request",
        "message": "unknown model 'sdxl'; valid: tiny, other",
        "field": "model",
    }


def test_a_model_switch_really_unloads_the_other(server: ServerProcess) -> None:
    before = metric(server, "sdgate_model_unloads_total")
    generate(server, model="other", seed=5)
    generate(server, model="tiny", seed=5)
    assert metric(server, "sdgate_model_unloads_total") >= before + 1


def metric(server: ServerProcess, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")
