"""LoRA adapters end to end: a real ``sdgate serve`` offering ``demo`` and ``tiny``, and a LoRA directory.

The LoRA files are made here (:mod:`tests.loras`), with seeded weights:

- ``style``: on ``demo``, PEFT format, seed 0; ``style_kohya``: the same weights in kohya's format;
- ``tinystyle``: on the built tiny model (other layer sizes: it fits ``tiny`` only);
- ``broken``: a file that is no LoRA at all;
- ``late``: on ``demo`` (UNet and text encoder), seed 2, kept outside the directory until a test copies it in.

The server's very first requests (made by its factory, before any LoRA was asked for) are kept: a
request without LoRAs made after LoRAs ran must give exactly those bytes.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from sdgate.engine.builtin import DEMO_DIR
from sdgate.imaging import read_metadata
from tests import background
from tests.server import ServerProcess, start_server, tiny_model_dir, with_tiny_models

SMALL = {"width": 64, "height": 64, "num_inference_steps": 3, "output_format": "png"}
PROMPT = "a red circle on a blue background"
TIMEOUT = 180
ROOT = Path(__file__).resolve().parents[2]

STYLE_SCALE = 0.3
"""``style``'s lora_B scale: a clear change at weight 1 (0.2, the default, barely moves the trained demo;
0.5 changes nearly every pixel), so that weights and mix-ups show."""
PRISTINE = {"demo": 21, "tiny": 22}
"""The seed of each model's LoRA-free request made before any LoRA request reached the server."""


@dataclass
class LoraServer(ServerProcess):
    """The server, where its LoRA files are, and the images of its first (LoRA-free) requests."""

    lora_dir: Path
    staged: Path  # ``late.safetensors``, not in the LoRA directory until a test copies it there
    pristine: dict[str, bytes]  # model → image bytes of the request with seed PRISTINE[model], no LoRA


def make_loras(jobs: list[tuple[Path, Path, dict[str, Any]]]) -> None:
    """:func:`tests.loras.make_lora` for each (model dir, target, options), in one process of its own.

    As :func:`tests.loras.build_lora`, but torch is imported once for all of them.
    """
    code = (
        "import sys, json; from pathlib import Path; from tests.loras import make_lora\n"
        "for model, target, options in json.loads(sys.argv[1]):\n"
        "    make_lora(Path(model), Path(target), **options)\n"
    )
    spec = json.dumps([[str(m), str(t), o] for m, t, o in jobs])
    proc = subprocess.run(
        [sys.executable, "-c", code, spec], capture_output=True, text=True, timeout=600, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr


def _lora_server() -> LoraServer:
    root = background.workdir("loras")
    data_dir = with_tiny_models(root / "data")
    loras = data_dir / "loras"  # the default SDGATE_LORA_DIR: <data dir>/loras
    staged = root / "staged" / "late.safetensors"
    make_loras(
        [
            (DEMO_DIR, loras / "style.safetensors", {"seed": 0, "scale": STYLE_SCALE}),
            (DEMO_DIR, loras / "style_kohya.safetensors", {"seed": 0, "scale": STYLE_SCALE, "kohya": True}),
            (tiny_model_dir(), loras / "tinystyle.safetensors", {"seed": 0}),
            (DEMO_DIR, staged, {"seed": 2, "text_encoder": True}),
        ]
    )
    (loras / "broken.safetensors").write_bytes(b"this is not a safetensors file")
    env = {"SDGATE_MODELS": "demo,tiny", "SDGATE_MAX_LOADED_MODELS": "2", "SDGATE_MAX_BATCH_WAIT_MS": "50"}
    srv = start_server(data_dir, env=env)
    try:
        pristine = {}
        for model, seed in PRISTINE.items():  # the server's first generations: no LoRA was ever loaded
            resp = httpx.post(
                f"{srv.url}/v1/generations",
                json={"prompt": PROMPT, "model": model, "seed": seed, **SMALL},
                timeout=TIMEOUT,
            )
            resp.raise_for_status()
            pristine[model] = httpx.get(resp.json()["images"][0]["url"], timeout=TIMEOUT).content
    except BaseException:
        srv.stop()
        raise
    return LoraServer(srv.url, srv.port, srv.proc, srv.data_dir, srv.log_path, loras, staged, pristine)


background.needs(__file__, lora_server=_lora_server)


@pytest.fixture(scope="module")
def server() -> Any:
    srv: LoraServer = background.take("lora_server", _lora_server)
    yield srv
    srv.stop()


# -- helpers --------------------------------------------------------------------------------------


def post(server: ServerProcess, **fields: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/generations", json={"prompt": PROMPT, **SMALL, **fields}, timeout=TIMEOUT)


def generate(server: ServerProcess, **fields: Any) -> dict[str, Any]:
    resp = post(server, **fields)
    assert resp.status_code == 200, resp.text
    job: dict[str, Any] = resp.json()
    assert job["status"] == "succeeded", job
    return job


def image_bytes(job: dict[str, Any]) -> bytes:
    [image] = job["images"]
    resp = httpx.get(image["url"], timeout=TIMEOUT)
    assert resp.status_code == 200
    return resp.content


def image_of(server: ServerProcess, **fields: Any) -> bytes:
    return image_bytes(generate(server, **fields))


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def listed(server: ServerProcess) -> dict[str, dict[str, Any]]:
    resp = httpx.get(f"{server.url}/v1/loras", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list"
    return {card["name"]: card for card in body["data"]}


def refusal(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 422, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["type"] == "invalid_request"
    return error


# -- tests ----------------------------------------------------------------------------------------


def test_without_loras_after_loras_ran_the_bytes_are_those_of_before_any_lora(server: LoraServer) -> None:
    # Each model runs its LoRA (loaded into the pipeline now, if no earlier test did) ...
    for model, lora in (("demo", "style"), ("tiny", "tinystyle")):
        seed = PRISTINE[model]
        with_lora = image_of(server, model=model, seed=seed, loras=[{"name": lora, "weight": 1}])
        assert not np.array_equal(pixels(with_lora), pixels(server.pristine[model])), model
    # ... and then the request the server answered first, before any LoRA was loaded, once more.
    for model, seed in PRISTINE.items():
        assert image_of(server, model=model, seed=seed) == server.pristine[model], model


def test_loras_lists_each_file_with_the_models_it_fits(server: LoraServer) -> None:
    cards = listed(server)
    for name, models in (("style", ["demo"]), ("style_kohya", ["demo"]), ("tinystyle", ["tiny"])):
        card = cards[name]
        assert card["object"] == "lora"
        assert card["models"] == models, card
        assert card["error"] is None
        assert card["unchecked"] == []
        assert card["bytes"] == (server.lora_dir / f"{name}.safetensors").stat().st_size
    broken = cards["broken"]
    assert broken["models"] == []
    assert broken["error"] is not None and "broken" in broken["error"]


def test_weight_0_is_no_lora_and_weight_1_changes_the_image(server: LoraServer) -> None:
    plain = image_of(server, seed=5)
    off = image_of(server, seed=5, loras=[{"name": "style", "weight": 0}])
    on = image_of(server, seed=5, loras=[{"name": "style", "weight": 1}])
    # Weight 0 is recorded in the file's metadata (so its bytes differ there), but its pixels are the plain ones.
    assert np.array_equal(pixels(off), pixels(plain))
    assert not np.array_equal(pixels(on), pixels(plain))
    off_meta, plain_meta = read_metadata(off), read_metadata(plain)
    assert off_meta is not None and plain_meta is not None
    assert off_meta["loras"] == [{"name": "style", "weight": 0.0}]
    assert "loras" not in plain_meta


def test_the_weight_scales_the_change(server: LoraServer) -> None:
    plain, half, full, negative = (
        pixels(image_of(server, seed=6, loras=[{"name": "style", "weight": w}])) for w in (0, 0.5, 1, -1)
    )

    def dist(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).mean())

    assert 0 < dist(half, plain) < dist(full, plain)
    assert not np.array_equal(negative, full) and not np.array_equal(negative, plain)


def test_a_kohya_file_gives_the_same_image_as_the_peft_file_of_the_same_weights(server: LoraServer) -> None:
    peft = image_of(server, seed=7, loras=[{"name": "style"}])
    kohya = image_of(server, seed=7, loras=[{"name": "style_kohya"}])
    plain = image_of(server, seed=7)
    assert np.array_equal(pixels(kohya), pixels(peft))
    assert not np.array_equal(pixels(kohya), pixels(plain))  # it did change the image


@pytest.mark.parametrize("form_value", ["style:1", '[{"name": "style", "weight": 1}]'])
def test_a_multipart_form_takes_loras_as_text(server: LoraServer, form_value: str) -> None:
    as_json = image_of(server, seed=8, loras=[{"name": "style", "weight": 1}])
    fields = {"prompt": PROMPT, "seed": "8", "loras": form_value, **{k: str(v) for k, v in SMALL.items()}}
    # An empty file input, as a browser sends one: it makes the body multipart/form-data.
    resp = httpx.post(
        f"{server.url}/v1/generations",
        data=fields,
        files={"image": ("", b"", "application/octet-stream")},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 200, resp.text
    assert resp.request.headers["content-type"].startswith("multipart/form-data")
    job = resp.json()
    assert job["loras"] == [{"name": "style", "weight": 1.0}]
    assert image_bytes(job) == as_json


def test_the_job_and_the_image_metadata_carry_the_model_and_loras(server: LoraServer) -> None:
    # Two LoRAs, not in name order: recorded as the request named them.
    asked = [{"name": "style_kohya", "weight": 0.25}, {"name": "style", "weight": 0.5}]
    job = generate(server, model="demo", seed=9, loras=asked)
    assert (job["model"], job["loras"]) == ("demo", asked)
    again = httpx.get(f"{server.url}/v1/jobs/{job['id']}", timeout=TIMEOUT).json()
    assert (again["model"], again["loras"]) == ("demo", asked)
    meta = read_metadata(image_bytes(job))
    assert meta is not None
    assert (meta["model"], meta["loras"], meta["seed"]) == ("demo", asked, 9)

    tiny = generate(server, model="tiny", seed=9, loras=[{"name": "tinystyle", "weight": 0.75}])
    assert (tiny["model"], tiny["loras"]) == ("tiny", [{"name": "tinystyle", "weight": 0.75}])
    tiny_meta = read_metadata(image_bytes(tiny))
    assert tiny_meta is not None
    assert (tiny_meta["model"], tiny_meta["loras"]) == ("tiny", [{"name": "tinystyle", "weight": 0.75}])

    plain = generate(server, model="tiny", seed=9)
    assert plain["loras"] == []


@pytest.mark.parametrize(
    ("model", "loras", "field", "words"),
    [
        pytest.param("demo", [{"name": "nope"}], "loras", ["'nope'", "style", "tinystyle"], id="unknown"),
        pytest.param("tiny", [{"name": "style"}], "loras", ["'style'"], id="demo-lora-on-tiny"),
        pytest.param("demo", [{"name": "tinystyle"}], "loras", ["'tinystyle'"], id="tiny-lora-on-demo"),
        pytest.param("demo", [{"name": "broken"}], "loras", ["'broken'"], id="unreadable"),
        pytest.param("demo", [{"name": "style", "weight": 5}], "loras.0.weight", ["4"], id="weight-5"),
        pytest.param("demo", [{"name": "style"}, {"name": "style", "weight": 0.5}], "loras", ["style"], id="twice"),
        pytest.param("demo", [{"name": f"l{i}"} for i in range(9)], "loras", ["8"], id="nine"),
        pytest.param("demo", [{"name": "style", "strength": 1}], "loras.0.strength", ["strength"], id="extra-key"),
    ],
)
def test_a_lora_that_cannot_run_is_a_422_naming_loras(
    server: LoraServer, model: str, loras: list[dict[str, Any]], field: str, words: list[str]
) -> None:
    jobs_before = httpx.get(f"{server.url}/v1/jobs", params={"limit": 100}, timeout=TIMEOUT).json()["data"]
    error = refusal(post(server, model=model, seed=1, loras=loras))
    assert error["field"] == field, error
    for word in words:
        assert word in error["message"], error
    jobs_after = httpx.get(f"{server.url}/v1/jobs", params={"limit": 100}, timeout=TIMEOUT).json()["data"]
    assert [j["id"] for j in jobs_after] == [j["id"] for j in jobs_before]  # refused before any job was made


def test_a_lora_copied_in_while_the_server_runs_is_offered_and_used(server: LoraServer) -> None:
    assert "late" not in listed(server)
    error = refusal(post(server, seed=10, loras=[{"name": "late"}]))
    assert "'late'" in error["message"] and error["field"] == "loras"

    shutil.copy(server.staged, server.lora_dir / "late.safetensors")

    card = listed(server)["late"]
    assert (card["models"], card["error"]) == (["demo"], None)
    late = image_of(server, seed=10, loras=[{"name": "late"}])
    plain = image_of(server, seed=10)
    style = image_of(server, seed=10, loras=[{"name": "style"}])
    assert not np.array_equal(pixels(late), pixels(plain))
    assert not np.array_equal(pixels(late), pixels(style))
    refusal_on_tiny = refusal(post(server, model="tiny", seed=10, loras=[{"name": "late"}]))
    assert "'late'" in refusal_on_tiny["message"]


BURST: list[tuple[str, tuple[tuple[str, float], ...], int]] = [
    ("demo", (), 31),
    ("demo", (("style", 1.0),), 31),
    ("demo", (("style", 1.0),), 32),
    ("demo", (("style", 0.5),), 31),
    ("tiny", (), 31),
    ("tiny", (("tinystyle", 1.0),), 31),
]
"""(model, LoRAs, seed) of a burst: with and without LoRAs, weights, two models, shared seeds."""


def test_a_mixed_burst_gets_every_image_as_its_request_alone(server: LoraServer) -> None:
    def run(case: tuple[str, tuple[tuple[str, float], ...], int]) -> dict[str, Any]:
        model, loras, seed = case
        return generate(server, model=model, seed=seed, loras=[{"name": n, "weight": w} for n, w in loras])

    alone = {case: pixels(image_bytes(run(case))) for case in BURST}
    # The burst could only pass with a swapped LoRA, weight or model if these were alike.
    for i, a in enumerate(BURST):
        for b in BURST[i + 1 :]:
            assert np.abs(alone[a] - alone[b]).max() > 1, (a, b)

    with ThreadPoolExecutor(len(BURST)) as pool:
        together = list(pool.map(run, BURST))
    for case, job in zip(BURST, together, strict=True):
        model, loras, _ = case
        assert job["model"] == model
        assert job["loras"] == [{"name": n, "weight": w} for n, w in loras]
        made = pixels(image_bytes(job))
        # Batched with others of the same model and LoRAs: within 1 of the image alone, as batching promises.
        assert np.abs(made - alone[case]).max() <= 1, case
    # The LoRAs were all turned off after the burst: the first requests' bytes once more.
    for model, seed in PRISTINE.items():
        assert image_of(server, model=model, seed=seed) == server.pristine[model], model
