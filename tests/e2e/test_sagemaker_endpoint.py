"""sdgate as the SageMaker JumpStart endpoint, called exactly as the original design's Lambda calls it.

A real ``sdgate serve --sagemaker`` process, an unmodified boto3 ``sagemaker-runtime`` client pointed at
it (SigV4-signed, with fake credentials), and a real S3-protocol server for the Lambda's upload.
"""

from __future__ import annotations

import base64
import io
import json
from typing import TYPE_CHECKING, Any

import boto3
import httpx
import numpy as np
import pytest
from botocore.exceptions import ClientError

from sdgate.imaging import read_metadata
from tests import background
from tests.aws_fixtures import FAKE_CREDENTIALS, REGION, jpeg_size, make_endpoint
from tests.server import ServerProcess

background.needs(__file__, endpoint=make_endpoint)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sagemaker_runtime import SageMakerRuntimeClient


@pytest.fixture(scope="module")
def runtime(endpoint: ServerProcess) -> SageMakerRuntimeClient:
    """``boto3.client("sagemaker-runtime")`` as the Lambda makes it, only pointed at sdgate."""
    client: SageMakerRuntimeClient = boto3.client(
        "sagemaker-runtime",
        endpoint_url=endpoint.url,
        region_name=REGION,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    return client


def parse_response(query_response: bytes) -> tuple[Any, Any]:
    """The Lambda's own parser, verbatim."""
    response_dict = json.loads(query_response)
    return response_dict["generated_image"], response_dict["prompt"]


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda p: p, id="payload"),
        pytest.param(lambda p: {"predictions": [p]}, id="predictions-wrapper"),
    ],
)
def test_the_lambdas_call_sequence_stores_a_jpeg_of_the_requested_size(
    runtime: SageMakerRuntimeClient, s3: S3Client, bucket: str, wrap: Any
) -> None:
    payload = {
        "prompt": "astronaut on a horse",
        "width": 128,
        "height": 64,
        "num_images_per_prompt": 1,
        "num_inference_steps": 2,
        "guidance_scale": 7.5,
    }
    # The Lambda: invoke_endpoint with x-text and application/json;jpeg, base64-decode, upload_fileobj.
    response = runtime.invoke_endpoint(
        EndpointName="jumpstart-example-infer-model-txt2img-s-2023-01-01",
        ContentType="application/x-text",
        Accept="application/json;jpeg",
        Body=json.dumps(wrap(payload)),
    )
    response_payload = response["Body"].read()
    generated_image, prompt = parse_response(response_payload)
    img_str = base64.b64decode(generated_image)
    image = io.BytesIO(img_str)
    s3.upload_fileobj(image, bucket, "images/out.jpeg", ExtraArgs={"ContentType": "image/jpeg"})

    assert response["ContentType"] == "application/json"
    assert prompt == "astronaut on a horse"
    stored = s3.get_object(Bucket=bucket, Key="images/out.jpeg")
    assert stored["ContentType"] == "image/jpeg"
    data = stored["Body"].read()
    assert jpeg_size(data) == (128, 64)
    assert data == img_str


def test_x_text_body_is_the_prompt(runtime: SageMakerRuntimeClient) -> None:
    response = runtime.invoke_endpoint(
        EndpointName="sd", ContentType="application/x-text", Accept="application/json;jpeg", Body="a red fox"
    )
    body = json.loads(response["Body"].read())
    assert set(body) == {"generated_image", "prompt"}
    assert body["prompt"] == "a red fox"
    assert jpeg_size(base64.b64decode(body["generated_image"])) == (64, 64)  # the endpoint's default size


def test_json_payload_with_prompt_list_and_rgb_answer(runtime: SageMakerRuntimeClient) -> None:
    payload = {
        "prompt": ["a red fox", "a blue whale"],
        "negative_prompt": "blurry",
        "width": 96,
        "height": 64,
        "num_images_per_prompt": 2,
        "num_inference_steps": 2,
        "guidance_scale": 7.0,
        "seed": 11,
    }
    response = runtime.invoke_endpoint(
        EndpointName="sd", ContentType="application/json", Accept="application/json", Body=json.dumps(payload)
    )
    body = json.loads(response["Body"].read())
    assert set(body) == {"generated_images", "prompt"}
    assert body["prompt"] == ["a red fox", "a blue whale"]
    images = [np.asarray(rows) for rows in body["generated_images"]]
    assert [im.shape for im in images] == [(64, 96, 3)] * 4
    assert all(im.dtype.kind == "i" and im.min() >= 0 and im.max() <= 255 for im in images)

    # sdgate's seed rule: image k uses seed + k, so the third image (second prompt, first image) is seed 13.
    again = runtime.invoke_endpoint(
        EndpointName="sd",
        ContentType="application/json",
        Accept="application/json",
        Body=json.dumps({**payload, "prompt": "a blue whale", "num_images_per_prompt": 1, "seed": 13}),
    )
    [rows] = json.loads(again["Body"].read())["generated_images"]
    alone = np.asarray(rows)
    assert np.abs(alone - images[2]).max() <= 2  # batched or alone: the same image
    assert np.abs(alone - images[0]).mean() > 10  # another seed: another image


def test_container_path_answers_like_the_runtime_path(endpoint: ServerProcess) -> None:
    resp = httpx.post(
        f"{endpoint.url}/invocations",
        json={"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 5},
        headers={"Accept": "application/json;jpeg"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    [image] = resp.json()["generated_images"]
    jpeg = base64.b64decode(image)
    assert jpeg_size(jpeg) == (64, 64)
    meta = read_metadata(jpeg)  # the parameters travel inside the JPEG, as in every sdgate image
    assert meta is not None and meta["seed"] == 5 and meta["prompt"] == "a lighthouse"


def test_models_shows_the_defaults_settings_give(endpoint: ServerProcess) -> None:
    """SDGATE_DEFAULT_WIDTH/HEIGHT/STEPS (64, 64, 2 on this endpoint) are what /v1/models reports and what a
    request that leaves them out gets."""
    [card] = httpx.get(f"{endpoint.url}/v1/models", timeout=10).json()["data"]
    assert (card["default_width"], card["default_height"], card["default_steps"]) == (64, 64, 2)
    body = httpx.post(f"{endpoint.url}/v1/generations", json={"prompt": "defaults"}, timeout=120).json()
    assert (body["images"][0]["width"], body["images"][0]["height"]) == (64, 64)
    assert body["progress"]["total_steps"] == 2


def test_ping(endpoint: ServerProcess) -> None:
    resp = httpx.get(f"{endpoint.url}/ping", timeout=10)
    assert resp.status_code == 200
    assert resp.json()["status"] == "Healthy"


@pytest.mark.parametrize(
    ("content_type", "accept", "body", "says"),
    [
        ("application/json", "application/json;jpeg", {"prompt": "x", "width": 100}, "multiple of 8"),
        ("application/json", "application/json;jpeg", {"prompt": "x", "steps": 3}, "unknown field 'steps'"),
        ("application/json", "application/json;jpeg", {"width": 64}, "prompt is required"),
        ("application/json", "application/json;jpeg", {"prompt": "  "}, "prompt must not be empty"),
        ("application/json", "application/json;jpeg", {"prompt": 7}, "string or a list of strings"),
        ("application/json", "application/json;jpeg", {"prompt": "x", "seed": -1}, "seed"),
        ("application/json", "application/json;jpeg", {"prompt": "x", "num_images_per_prompt": 9}, "limit is 8"),
        ("application/json", "application/json;jpeg", {"prompt": ["a", "b"], "negative_prompt": ["c"]}, "one per"),
        (
            "application/json",
            "application/json;jpeg",
            {"prompt": ["a"] * 3, "num_images_per_prompt": 3},
            "3 prompts x 3",
        ),
        ("application/json", "application/json;jpeg", {"predictions": [{}, {}]}, "exactly one"),
        ("application/json", "application/json;jpeg", "not json", "not valid JSON"),
        ("application/json", "image/png", {"prompt": "x"}, "application/json;jpeg"),
        ("image/png", "application/json", {"prompt": "x"}, "application/x-text"),
        ("application/x-text", "application/json", "", "empty"),
    ],
)
def test_bad_requests_are_sagemaker_validation_errors(
    runtime: SageMakerRuntimeClient, content_type: str, accept: str, body: Any, says: str
) -> None:
    raw = body if isinstance(body, str) else json.dumps(body)
    with pytest.raises(ClientError) as caught:
        runtime.invoke_endpoint(EndpointName="sd", ContentType=content_type, Accept=accept, Body=raw)
    error = caught.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert error["Error"]["Code"] == "ValidationError"
    assert says in error["Error"]["Message"]
