"""One generation path (issue 12): every surface is charged, recorded and drawn by the same code.

Real ``sdgate serve`` processes with the tiny model:

- ``secured`` (``SDGATE_AUTH=on``, SageMaker mode off, so ``/invocations`` needs a key too): a key's
  daily image quota (``--quota``) and request rate (``--rate``) hold across all generation surfaces
  together, every surface refuses in its own dialect once the others used the allowance up, and every
  generation is a job of its key in ``GET /v1/jobs`` with the ``surface`` it came through;
- ``open_server`` (the session's server, keys off, since ``sdgate generate --url`` sends no key): the
  same request and seed give the same image through the native API, ``/invocations`` (RGB lists and
  JPEG), the SageMaker runtime path called by boto3, and the CLI (in process vs. server: test_cli.py).

The surfaces: ``POST /v1/generations``, ``POST /text2image``, ``GET /text2image``, ``POST /invocations``,
``POST /endpoints/{name}/invocations`` (with httpx, and with an unmodified boto3 ``sagemaker-runtime``
client whose requests carry the key in ``X-API-Key``, added by a botocore ``before-sign`` hook: the
SigV4 signature takes ``Authorization``). Keys are made in the server's key store before it starts, a
fresh one per test wherever a test counts a key's traffic.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from PIL import Image

from sdgate.auth import KeyStore
from sdgate.paths import DataPaths
from tests import background
from tests.aws_fixtures import FAKE_CREDENTIALS, REGION, jpeg_size
from tests.server import ServerProcess, start_server, with_tiny_models

TIMEOUT = 60
JPEG_ACCEPT = "application/json;jpeg"
# Small and quick; text2image takes no sizes, so the servers' defaults are these too.
SMALL: dict[str, Any] = {"width": 64, "height": 64, "num_inference_steps": 1}
SMALL_ENV = {"SDGATE_DEFAULT_WIDTH": "64", "SDGATE_DEFAULT_HEIGHT": "64", "SDGATE_DEFAULT_STEPS": "1"}
# Nothing waits for a batch: one request is one pipeline call, alone.
SERVER_ENV = {"SDGATE_MAX_BATCH_WAIT_MS": "0", **SMALL_ENV}

QUOTA = 3  # images per day of the quota keys
RATE = 3  # requests per minute of the rate keys

# Every generation surface, in the order the cross-surface tests rotate through them.
SURFACES = ("native", "text2image_post", "text2image_get", "invocations", "endpoints", "endpoints_boto3")
# The job's "surface" each one must record.
JOB_SURFACE = {
    "native": "native",
    "text2image_post": "text2image",
    "text2image_get": "text2image",
    "invocations": "sagemaker",
    "endpoints": "sagemaker",
    "endpoints_boto3": "sagemaker",
}


def spenders(target: str) -> list[str]:
    """The three surfaces after ``target`` (cyclically): what uses a key's allowance before ``target``
    is tried. Across the six tests each surface spends three times and is refused once."""
    i = SURFACES.index(target)
    return [SURFACES[(i + k) % len(SURFACES)] for k in (1, 2, 3)]


# -- servers and keys -----------------------------------------------------------------------------


@dataclass
class Secured:
    server: ServerProcess
    quota: dict[str, str]  # target surface -> a fresh key with --quota QUOTA
    rate: dict[str, str]  # target surface -> a fresh key with --rate RATE
    images: str  # --quota QUOTA, for the test that counts images (not requests)
    jobs: str  # no limits: the job-list test (before/after, so its tests may share it)


def _secured() -> Secured:
    """``SDGATE_AUTH=on``, SageMaker mode off: every surface needs a key, and charges it."""
    secured_dir = with_tiny_models(background.workdir("one-path") / "secured")
    # (name, rate per minute, images per day); made in the server's key store before it starts (the
    # `sdgate keys` CLI that writes the same store is tested in test_security.py)
    wanted: list[tuple[str, int | None, int | None]] = [(f"quota-{s}", None, QUOTA) for s in SURFACES]
    wanted += [(f"rate-{s}", RATE, None) for s in SURFACES]
    wanted += [("images", None, QUOTA), ("jobs", None, None)]
    store = KeyStore(DataPaths(secured_dir).keys_db)
    made = {name: store.create(name, rate, quota)[0] for name, rate, quota in wanted}
    store.close()
    srv = start_server(secured_dir, env={"SDGATE_AUTH": "on", **SERVER_ENV})
    return Secured(
        server=srv,
        quota={s: made[f"quota-{s}"] for s in SURFACES},
        rate={s: made[f"rate-{s}"] for s in SURFACES},
        images=made["images"],
        jobs=made["jobs"],
    )


background.needs(__file__, one_path_secured=_secured)


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    """The module's server, made while the modules before this one ran (tests/background.py)."""
    made: Secured = background.take("one_path_secured", _secured)
    yield made
    made.server.stop()


@pytest.fixture(scope="module")
def open_server(server: ServerProcess) -> ServerProcess:
    """The session's server with keys off (``sdgate generate --url`` sends none); requests run one after
    the other, so each is a pipeline call of its own."""
    return server


# -- the surfaces ---------------------------------------------------------------------------------


def http(srv: ServerProcess, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return httpx.Client(base_url=srv.url, timeout=TIMEOUT, headers=headers)


def runtime(srv: ServerProcess, key: str | None = None) -> Any:
    """An unmodified boto3 ``sagemaker-runtime`` client pointed at ``srv``.

    The key rides in ``X-API-Key``, added before signing (SigV4 owns ``Authorization``). No retries:
    botocore retries ThrottlingException with backoff, which would only make the refusals slow.
    """
    client = boto3.client(
        "sagemaker-runtime",
        endpoint_url=srv.url,
        region_name=REGION,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=TIMEOUT),
    )
    if key is not None:

        def add_key(request: Any, **_: Any) -> None:
            request.headers["X-API-Key"] = key

        client.meta.events.register("before-sign.sagemaker-runtime.InvokeEndpoint", add_key)
    return client


def jumpstart(prompt: str | list[str], **fields: Any) -> dict[str, Any]:
    return {"prompt": prompt, **SMALL, **fields}


@dataclass
class Answer:
    """One surface's answer, whatever carried it."""

    status: int
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or the HTML text of the page
    boto_error: ClientError | None = None


def call(surface: str, srv: ServerProcess, key: str | None, prompt: str, **fields: Any) -> Answer:
    """One generation request through ``surface`` (``fields``: extra payload fields where it takes them)."""
    if surface == "endpoints_boto3":
        try:
            resp = runtime(srv, key).invoke_endpoint(
                EndpointName="sd-one-path",
                ContentType="application/json",
                Accept=JPEG_ACCEPT,
                Body=json.dumps(jumpstart(prompt, **fields)),
            )
        except ClientError as e:
            meta = e.response["ResponseMetadata"]
            return Answer(meta["HTTPStatusCode"], dict(meta.get("HTTPHeaders", {})), None, e)
        meta = resp["ResponseMetadata"]
        return Answer(meta["HTTPStatusCode"], dict(meta["HTTPHeaders"]), json.loads(resp["Body"].read()))
    with http(srv, key) as c:
        if surface == "native":
            r = c.post("/v1/generations", json={"prompt": prompt, **SMALL, **fields})
        elif surface == "text2image_post":
            r = c.post("/text2image", json={"text": prompt})
        elif surface == "text2image_get":
            r = c.get("/text2image", params={"prompt": prompt})
        elif surface == "invocations":
            r = c.post("/invocations", json=jumpstart(prompt, **fields), headers={"Accept": JPEG_ACCEPT})
        elif surface == "endpoints":
            r = c.post(
                "/endpoints/sd-one-path/invocations", json=jumpstart(prompt, **fields), headers={"Accept": JPEG_ACCEPT}
            )
        else:
            raise AssertionError(f"unknown surface {surface!r}")
    is_json = r.headers.get("content-type", "").startswith("application/json")
    return Answer(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.json() if is_json else r.text)


def generate(surface: str, srv: ServerProcess, key: str | None, prompt: str, images: int = 1) -> None:
    """A generation through ``surface`` that must succeed, with ``images`` images, in that surface's shape."""
    answer = call(surface, srv, key, prompt)
    where = f"{surface}: {answer.status} {str(answer.body)[:300]} {answer.boto_error or ''}"
    assert answer.status == 200 and answer.boto_error is None, where
    body = answer.body
    if surface == "native":
        assert len(body["images"]) == images and body["status"] == "succeeded", where
    elif surface == "text2image_post":
        assert body["statusCode"] == 200 and re.match(r"^http://127\.0\.0\.1:\d+/images/", body["body"]), where
    elif surface == "text2image_get":
        assert answer.headers["content-type"].startswith("text/html"), where
        assert len(re.findall(r'<img src="[^"]+/images/[^"]+"', body)) == 1, where
    else:
        assert len(body["generated_images"]) == images, where
        assert jpeg_size(base64.b64decode(body["generated_images"][0])) == (64, 64), where


def refused(surface: str, srv: ServerProcess, key: str, prompt: str, says: str, **fields: Any) -> int:
    """A request through ``surface`` that must be a 429 in that surface's dialect, its message saying
    ``says``; returns its Retry-After."""
    answer = call(surface, srv, key, prompt, **fields)
    where = f"{surface}: {answer.status} {str(answer.body)[:300]} {answer.boto_error or ''}"
    assert answer.status == 429, where
    if surface == "endpoints_boto3":
        # botocore raised ClientError: the code comes from x-amzn-ErrorType (or the body's ErrorCode)
        assert answer.boto_error is not None, where
        error = answer.boto_error.response["Error"]
        assert error["Code"] == "ThrottlingException", where
        assert says in error["Message"], where
    elif surface in ("invocations", "endpoints"):
        body = answer.body
        assert body["ErrorCode"] == "ThrottlingException", where
        assert answer.headers["x-amzn-errortype"] == "ThrottlingException", where
        assert says in body["Message"], where
    else:
        body = answer.body
        assert isinstance(body, dict), where  # the page route's errors are JSON too
        assert body["error"]["type"] == "rate_limited", where
        assert says in body["error"]["message"], where
        if surface.startswith("text2image"):
            # the original Lambda's shape around the error
            assert body["statusCode"] == 429 and body["body"] == body["error"]["message"], where
    assert "retry-after" in answer.headers, where
    retry_after = int(answer.headers["retry-after"])
    assert retry_after >= 1, where
    return retry_after


def jobs_of(srv: ServerProcess, key: str) -> dict[str, dict[str, Any]]:
    """The key's jobs by id (all of them: these keys make far fewer than a page)."""
    with http(srv, key) as c:
        resp = c.get("/v1/jobs", params={"limit": 100})
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert len(data) < 100, "more jobs than one page: the test's key is not fresh"
    return {j["id"]: j for j in data}


# -- a key's limits hold across every surface ----------------------------------------------------


@pytest.mark.parametrize("target", SURFACES)
def test_the_daily_quota_is_shared_by_every_surface(secured: Secured, target: str) -> None:
    """Quota 3: one image through each of three other surfaces, then the 4th image through ``target`` is
    a 429 in ``target``'s dialect, and adds no job."""
    srv, key = secured.server, secured.quota[target]
    for i, surface in enumerate(spenders(target)):
        generate(surface, srv, key, f"spend {i} via {surface}")
    before = jobs_of(srv, key)
    retry_after = refused(target, srv, key, f"one over the quota via {target}", says=f"daily quota of {QUOTA}")
    assert retry_after <= 86400  # until midnight UTC
    assert jobs_of(srv, key).keys() == before.keys(), "a refused request made a job"


def test_the_quota_counts_images_not_requests_on_every_surface(secured: Secured) -> None:
    """Quota 3: a SageMaker request for two prompts uses two; the native API then cannot have two more,
    but can have one; after that /invocations is refused too."""
    srv, key = secured.server, secured.images
    with http(srv, key) as c:
        resp = c.post("/endpoints/sd/invocations", json=jumpstart(["a fox", "a hen"]), headers={"Accept": JPEG_ACCEPT})
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["generated_images"]) == 2
    refused("native", srv, key, "two more", says="daily quota", num_images=2)
    generate("native", srv, key, "the last one")
    refused("invocations", srv, key, "none left", says="daily quota")


@pytest.mark.parametrize("target", SURFACES)
def test_the_request_rate_is_shared_by_every_surface(secured: Secured, target: str) -> None:
    """Rate 3/min: one request through each of three other surfaces, then request 4 through ``target`` is
    a 429 with Retry-After in ``target``'s dialect."""
    srv, key = secured.server, secured.rate[target]
    for i, surface in enumerate(spenders(target)):
        generate(surface, srv, key, f"request {i} via {surface}")
    retry_after = refused(target, srv, key, f"one request too many via {target}", says=f"{RATE} requests per minute")
    assert retry_after <= 60


# -- every generation is a job, with its surface --------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
def test_every_generation_is_a_job_of_its_key_with_its_surface(secured: Secured, surface: str) -> None:
    srv, key = secured.server, secured.jobs
    before = jobs_of(srv, key)
    generate(surface, srv, key, f"recorded via {surface}")
    after = jobs_of(srv, key)
    new = [job for job_id, job in after.items() if job_id not in before]
    assert before.keys() <= after.keys()
    assert len(new) == 1, f"{surface}: {len(new)} new jobs: {new}"
    [job] = new
    assert job.get("surface") == JOB_SURFACE[surface], f"{surface}: job {job['id']} has surface {job.get('surface')!r}"
    assert job["status"] == "succeeded" and len(job["images"]) == 1, job
    assert (job["images"][0]["width"], job["images"][0]["height"]) == (64, 64), job


# -- the same request and seed give the same image through every surface -------------------------

PROMPT = "a lighthouse at dusk"
SAME = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 7}


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def native_image(srv: ServerProcess, output_format: str) -> bytes:
    with http(srv, None) as c:
        resp = c.post("/v1/generations", json={"prompt": PROMPT, **SAME, "output_format": output_format})
        assert resp.status_code == 200, resp.text
        [img] = resp.json()["images"]
        assert img["seed"] == 7
        got = c.get(img["url"])
        assert got.status_code == 200
        return got.content


def invocation(srv: ServerProcess, accept: str) -> Any:
    with http(srv, None) as c:
        resp = c.post("/invocations", json={"prompt": PROMPT, **SAME}, headers={"Accept": accept})
    assert resp.status_code == 200, resp.text
    [image] = resp.json()["generated_images"]
    return image


@pytest.fixture(scope="module")
def native_png(open_server: ServerProcess) -> np.ndarray:
    """The native API's PNG of the request, as pixels: what every other surface is compared with."""
    return pixels(native_image(open_server, "png"))


def test_native_png_and_invocations_rgb_lists_are_the_same_pixels(
    open_server: ServerProcess, native_png: np.ndarray
) -> None:
    rgb = np.asarray(invocation(open_server, "application/json"), dtype=np.int16)
    assert rgb.shape == native_png.shape == (64, 64, 3)
    assert np.abs(rgb - native_png).max() <= 1


def jpeg_difference(a: bytes, b: bytes) -> str:
    """What differs between two JPEGs: for the failure message."""
    from sdgate.imaging import read_metadata

    same_pixels = np.array_equal(pixels(a), pixels(b))
    meta_a, meta_b = read_metadata(a), read_metadata(b)
    return f"{len(a)} vs {len(b)} bytes; pixels {'equal' if same_pixels else 'differ'}; metadata {meta_a} vs {meta_b}"


def test_native_jpeg_and_sagemaker_jpeg_are_the_same_bytes(open_server: ServerProcess) -> None:
    """Run one after the other, so nothing batches: the encoded files are byte for byte the same, through
    /invocations and through the runtime path called by boto3."""
    native = native_image(open_server, "jpeg")
    container = base64.b64decode(invocation(open_server, JPEG_ACCEPT))
    assert container == native, jpeg_difference(native, container)
    resp = runtime(open_server).invoke_endpoint(
        EndpointName="sd-one-path",
        ContentType="application/json",
        Accept=JPEG_ACCEPT,
        Body=json.dumps({"prompt": PROMPT, **SAME}),
    )
    [image] = json.loads(resp["Body"].read())["generated_images"]
    via_boto3 = base64.b64decode(image)
    assert via_boto3 == native, jpeg_difference(native, via_boto3)


def sdgate_generate(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDGATE_")}
    env.update({"SDGATE_MODEL": "tiny", "SDGATE_TORCH_THREADS": "1", "SDGATE_DATA_DIR": str(data_dir)})
    cli = ["generate", PROMPT, "--seed", "7", "--width", "64", "--height", "64", "--steps", "2", *args]
    return subprocess.run(
        [sys.executable, "-m", "sdgate.cli", *cli],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=data_dir.parent,
    )


def test_the_cli_against_the_server_gives_the_same_pixels(
    open_server: ServerProcess, native_png: np.ndarray, tmp_path: Path
) -> None:
    """The CLI in process gives the same pixels as against a server: tests/e2e/test_cli.py."""
    data_dir = with_tiny_models(tmp_path / "data")
    out = tmp_path / "x.png"
    proc = sdgate_generate(data_dir, "-o", str(out), "--url", open_server.url)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"x\.png\s+seed=7\b", proc.stdout), proc.stdout
    assert np.abs(pixels(out.read_bytes()) - native_png).max() <= 1
