"""The split deployment on one machine: an sdgate endpoint, an sdgate gateway in front of it, S3.

Real processes on loopback ports: ``sdgate serve --sagemaker`` (the model), ``sdgate serve`` with
backend ``sagemaker`` (boto3, through ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``) or ``http``, and storage
``s3`` on a real S3-protocol server (through ``AWS_ENDPOINT_URL_S3``).
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import boto3
import httpx
import numpy as np
import pytest
from botocore.exceptions import ClientError
from PIL import Image

from sdgate.imaging import read_metadata
from sdgate.storage import is_valid_key
from tests import background
from tests.aws_fixtures import (
    FAKE_CREDENTIALS,
    REGION,
    jpeg_size,
    make_endpoint,
    objects,
    sidecar_object,
    start_gateway,
)
from tests.server import ServerProcess, free_port

background.needs(__file__, endpoint=make_endpoint)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


@pytest.fixture(scope="module")
def gateway_bucket(s3: S3Client) -> str:
    name = f"gateway-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, endpoint: ServerProcess, aws_env: dict[str, str], gateway_bucket: str
) -> Iterator[ServerProcess]:
    """Backend sagemaker, storage s3 with presigned URLs (no public base URL)."""
    srv = start_gateway(
        tmp_path_factory.mktemp("gateway"),
        endpoint,
        aws_env,
        SDGATE_STORAGE="s3",
        SDGATE_S3_BUCKET=gateway_bucket,
        SDGATE_S3_PREFIX="generated",
        SDGATE_S3_PRESIGN_EXPIRY_S="600",
    )
    yield srv
    srv.stop()


def text2image(gateway: ServerProcess, text: str) -> str:
    resp = httpx.post(f"{gateway.url}/text2image", json={"text": text}, timeout=120)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["statusCode"] == 200
    url: str = body["body"]
    return url


def test_text2image_answers_a_presigned_url_that_serves_the_jpeg_from_s3(
    gateway: ServerProcess, s3_server: str, s3: S3Client, gateway_bucket: str
) -> None:
    url = text2image(gateway, "a red fox in the snow")

    parts = urlsplit(url)
    assert url.startswith(f"{s3_server}/{gateway_bucket}/generated/")
    assert "X-Amz-Signature=" in parts.query and "X-Amz-Expires=600" in parts.query
    key = parts.path.removeprefix(f"/{gateway_bucket}/")
    assert is_valid_key(key.removeprefix("generated/"))
    got = httpx.get(url, timeout=30)
    assert got.status_code == 200
    assert got.headers["content-type"] == "image/jpeg"
    assert "immutable" in got.headers["cache-control"]
    assert jpeg_size(got.content) == (64, 64)
    assert s3.get_object(Bucket=gateway_bucket, Key=key)["Body"].read() == got.content


def test_text2image_url_uses_the_cdn_base_url_when_set(
    tmp_path: Path, endpoint: ServerProcess, aws_env: dict[str, str], s3: S3Client, bucket: str
) -> None:
    cdn = "https://d111111abcdef8.cloudfront.net"
    gw = start_gateway(
        tmp_path,
        endpoint,
        aws_env,
        SDGATE_STORAGE="s3",
        SDGATE_S3_BUCKET=bucket,
        SDGATE_S3_PREFIX="img/",
        SDGATE_PUBLIC_BASE_URL=cdn + "/",
    )
    try:
        url = text2image(gw, "a lighthouse at dusk")
    finally:
        gw.stop()
    # CloudFront with the bucket as origin: the URL path is the object key, no signature.
    assert url.startswith(cdn + "/img/")
    assert "?" not in url
    key = urlsplit(url).path.lstrip("/")
    assert is_valid_key(key.removeprefix("img/"))
    stored = s3.get_object(Bucket=bucket, Key=key)  # what the CDN would fetch from its origin
    assert stored["ContentType"] == "image/jpeg"
    assert stored["CacheControl"] == "public, max-age=31536000, immutable"
    assert jpeg_size(stored["Body"].read()) == (64, 64)


def test_parallel_requests_never_overwrite_each_others_images(
    gateway: ServerProcess, s3: S3Client, gateway_bucket: str
) -> None:
    prompts = [f"fox number {i}" for i in range(24)]
    before = set(objects(s3, gateway_bucket))
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        urls = list(pool.map(lambda p: text2image(gateway, p), prompts))

    assert len(set(urls)) == len(prompts)
    with ThreadPoolExecutor(max_workers=8) as pool:
        downloads = list(pool.map(lambda u: httpx.get(u, timeout=30), urls))
    for prompt, got in zip(prompts, downloads, strict=True):
        assert got.status_code == 200
        assert jpeg_size(got.content) == (64, 64)
        meta = read_metadata(got.content)
        assert meta is not None and meta["prompt"] == prompt  # each URL holds its own request's image
    new = {k: v for k, v in objects(s3, gateway_bucket).items() if k not in before}
    images = [k for k in new if k.endswith(".jpeg")]
    assert len(images) == len(prompts)
    assert all(new[sidecar_object(k)]["ContentType"] == "application/json" for k in images)


def test_backend_http_keeps_per_image_seeds(
    tmp_path: Path, endpoint: ServerProcess, aws_env: dict[str, str], bucket: str
) -> None:
    gw = start_gateway(
        tmp_path,
        endpoint,
        aws_env,
        SDGATE_BACKEND="http",
        SDGATE_BACKEND_URL=endpoint.url,
        SDGATE_STORAGE="s3",
        SDGATE_S3_BUCKET=bucket,
    )
    try:
        resp = httpx.post(
            f"{gw.url}/v1/generations", json={"prompt": "a boat", "num_images": 2, "seed": 41}, timeout=120
        )
        models = httpx.get(f"{gw.url}/v1/models", timeout=10).json()
        # Image inputs go through to the endpoint as well: the kept half of an inpainting is the input's.
        inputs = inpainting_inputs()
        inpainted = httpx.post(
            f"{gw.url}/v1/generations",
            json={"prompt": "a boat", "seed": 3, "num_inference_steps": 2, "output_format": "png", **inputs},
            timeout=120,
        )
    finally:
        gw.stop()
    assert inpainted.status_code == 200, inpainted.text
    [painted] = inpainted.json()["images"]
    with Image.open(io.BytesIO(httpx.get(painted["url"], timeout=30).content)) as im:
        out = np.asarray(im.convert("RGB"), dtype=np.int16)
    with Image.open(io.BytesIO(base64.b64decode(inputs["image"]))) as im:
        source = np.asarray(im.convert("RGB"), dtype=np.int16)
    # The endpoint answers JPEG, which the gateway decodes and stores as PNG: kept means within JPEG's error.
    assert np.abs(out[:, 40:] - source[:, 40:]).mean() < np.abs(out[:, :24] - source[:, :24]).mean() / 2
    assert resp.status_code == 200, resp.text
    assert models["data"][0]["backend"] == "http"
    assert models["data"][0]["id"] == "tiny"  # read from the endpoint's model card
    images = resp.json()["images"]
    assert [img["seed"] for img in images] == [41, 42]
    for img in images:
        data = httpx.get(img["url"], timeout=30).content
        meta = read_metadata(data)  # written by the endpoint, stored by the gateway without re-encoding
        assert meta is not None and meta["seed"] == img["seed"] and meta["model"] == "tiny"
        assert len(data) == img["bytes"]


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def inpainting_inputs() -> dict[str, str]:
    """A 64x64 picture (flat 16x16 blocks, which JPEG keeps well) and a mask that repaints its left half."""
    rng = np.random.default_rng(5)
    blocks = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB")
    picture = blocks.resize((64, 64), Image.Resampling.NEAREST)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    return {"image": png_b64(picture), "mask": png_b64(mask)}


def test_image_inputs_pass_through_the_gateway_to_the_endpoint(
    gateway: ServerProcess, endpoint: ServerProcess, s3: S3Client, gateway_bucket: str
) -> None:
    """Native inpainting at the gateway (backend sagemaker) is the endpoint's JumpStart inpainting, to the byte;
    the gateway keeps the inputs in its bucket, under the private prefix."""
    inputs = inpainting_inputs()
    before = set(objects(s3, gateway_bucket))
    resp = httpx.post(
        f"{gateway.url}/v1/generations",
        json={"prompt": "a boat", "seed": 8, "num_inference_steps": 2, "strength": 0.9, **inputs},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    [image] = resp.json()["images"]
    via_gateway = httpx.get(image["url"], timeout=30).content
    direct = httpx.post(
        f"{endpoint.url}/invocations",
        json={
            "prompt": "a boat",
            "seed": 8,
            "num_inference_steps": 2,
            "strength": 0.9,
            "image": inputs["image"],
            "mask_image": inputs["mask"],
        },
        headers={"Accept": "application/json;jpeg"},
        timeout=120,
    )
    assert direct.status_code == 200, direct.text
    assert via_gateway == base64.b64decode(direct.json()["generated_images"][0])
    meta = read_metadata(via_gateway)
    assert meta is not None and (meta["mode"], meta["strength"]) == ("inpaint", 0.9)
    added = set(objects(s3, gateway_bucket)) - before
    private = sorted(k for k in added if k.startswith("generated/private/") and k.endswith(".png"))
    assert len(private) == 2, added  # the picture and the mask, never under a public key
    stored = {s3.get_object(Bucket=gateway_bucket, Key=k)["Body"].read() for k in private}
    assert base64.b64decode(inputs["image"]) in stored


def test_the_gateway_is_an_endpoint_too(gateway: ServerProcess) -> None:
    """A Lambda pointed at the gateway works as well: /endpoints/{name}/invocations goes through to the model."""
    runtime = boto3.client(
        "sagemaker-runtime",
        endpoint_url=gateway.url,
        region_name=REGION,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    response = runtime.invoke_endpoint(
        EndpointName="any", ContentType="application/x-text", Accept="application/json;jpeg", Body="a kite"
    )
    body = json.loads(response["Body"].read())
    assert body["prompt"] == "a kite"
    assert jpeg_size(base64.b64decode(body["generated_image"])) == (64, 64)


def test_s3_failure_fails_the_request_clearly(
    tmp_path: Path, endpoint: ServerProcess, aws_env: dict[str, str], s3: S3Client, bucket: str
) -> None:
    gw = start_gateway(tmp_path, endpoint, aws_env, SDGATE_STORAGE="s3", SDGATE_S3_BUCKET=bucket)
    try:
        s3.delete_bucket(Bucket=bucket)  # gone after the startup check
        resp = httpx.post(f"{gw.url}/text2image", json={"text": "a cat"}, timeout=120)
    finally:
        gw.stop()
    assert resp.status_code == 503
    body = resp.json()
    assert body["statusCode"] == 503
    assert body["error"]["type"] == "storage_error"
    assert bucket in body["error"]["message"] and "NoSuchBucket" in body["error"]["message"]


def test_a_missing_bucket_stops_the_gateway_at_start(
    tmp_path: Path, endpoint: ServerProcess, aws_env: dict[str, str]
) -> None:
    with pytest.raises(RuntimeError, match="bucket 'no-such-bucket' is not usable: it does not exist"):
        start_gateway(tmp_path, endpoint, aws_env, SDGATE_STORAGE="s3", SDGATE_S3_BUCKET="no-such-bucket")


def test_an_unreachable_endpoint_is_a_clear_502(
    tmp_path: Path, endpoint: ServerProcess, aws_env: dict[str, str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = start_gateway(tmp_path, endpoint, aws_env, AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=dead)
    try:
        native = httpx.post(f"{gw.url}/v1/generations", json={"prompt": "a cat"}, timeout=60)
        invocation = httpx.post(f"{gw.url}/invocations", json={"prompt": "a cat"}, timeout=60)
    finally:
        gw.stop()
    assert native.status_code == 502, native.text
    assert native.json()["error"]["type"] == "backend_error"
    assert "could not reach SageMaker endpoint 'jumpstart-sd'" in native.json()["error"]["message"]
    # Through the gateway's own SageMaker surface, the same failure is SageMaker's ModelError.
    assert invocation.status_code == 424
    assert invocation.json()["ErrorCode"] == "ModelError"
    assert invocation.headers["x-amzn-errortype"] == "ModelError"


def test_client_error_code_reaches_boto3(gateway: ServerProcess) -> None:
    runtime = boto3.client(
        "sagemaker-runtime",
        endpoint_url=gateway.url,
        region_name=REGION,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    with pytest.raises(ClientError) as caught:
        runtime.invoke_endpoint(EndpointName="x", ContentType="application/json", Body='{"prompt": "x", "width": 12}')
    assert caught.value.response["Error"]["Code"] == "ValidationError"
