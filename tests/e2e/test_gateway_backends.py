"""The remote backends against endpoints that behave unlike sdgate: RGB only, errors, garbage, throttling.

These endpoints are small fakes (an httpx transport, botocore's Stubber); the real endpoint is
covered by the split-deployment tests.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import boto3
import httpx
import pytest
from botocore.response import StreamingBody
from botocore.stub import ANY, Stubber
from PIL import Image

from sdgate.backends import BackendState
from sdgate.backends.http import HttpBackend
from sdgate.backends.sagemaker import SageMakerBackend
from sdgate.config import Settings
from sdgate.errors import BackendError, Busy, NotReady, SdgateError
from sdgate.imaging import to_rgb_lists
from sdgate.schemas import GenerationParams

PARAMS = GenerationParams(
    prompt="a fox",
    negative_prompt=None,
    width=64,
    height=64,
    num_inference_steps=2,
    guidance_scale=7.5,
    seeds=(10, 11),
    scheduler=None,
    output_format="jpeg",
    quality=90,
)


def rgb_only_endpoint(calls: list[dict[str, Any]]) -> httpx.MockTransport:
    """A JumpStart-style server that refuses ``application/json;jpeg`` and answers RGB lists."""

    def handle(request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        calls.append({"accept": request.headers["accept"], **payload})
        if request.headers["accept"] != "application/json":
            return httpx.Response(400, json={"message": "unsupported accept type"})
        shade = payload["seed"] % 256
        image = Image.new("RGB", (payload["width"], payload["height"]), (shade, 0, 0))
        return httpx.Response(200, json={"generated_images": [to_rgb_lists(image)], "prompt": payload["prompt"]})

    return httpx.MockTransport(handle)


def http_backend(transport: httpx.MockTransport) -> HttpBackend:
    return HttpBackend(Settings(backend="http", backend_url="http://endpoint.invalid"), transport=transport)


def test_http_backend_falls_back_to_rgb_lists_and_keeps_seeds() -> None:
    calls: list[dict[str, Any]] = []
    backend = http_backend(rgb_only_endpoint(calls))

    first = asyncio.run(backend.generate(PARAMS))
    second = asyncio.run(backend.generate(PARAMS))

    # One call per image, each with its own seed, every value explicit.
    assert sorted(c["seed"] for c in calls if c["accept"] == "application/json") == [10, 10, 11, 11]
    assert all(c["num_images_per_prompt"] == 1 and c["num_inference_steps"] == 2 for c in calls)
    # Refused once per image of the first request; from then on it asks for JSON straight away.
    assert [c["accept"] for c in calls[-2:]] == ["application/json", "application/json"]
    for result in (first, second):
        assert [img.seed for img in result.images] == [10, 11]
        assert [img.image.getpixel((0, 0)) for img in result.images] == [(10, 0, 0), (11, 0, 0)]
        assert all(img.encoded is None for img in result.images)  # jobs encode these


def test_jpeg_answers_are_kept_as_sent() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buf, "JPEG")
    jpeg = buf.getvalue()

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"generated_images": [base64.b64encode(jpeg).decode()], "prompt": "a fox"})

    result = asyncio.run(http_backend(httpx.MockTransport(handle)).generate(PARAMS))
    assert [img.encoded for img in result.images] == [jpeg, jpeg]
    assert all(img.encoded_format == "jpeg" and img.image.size == (64, 64) for img in result.images)


@pytest.mark.parametrize(
    ("response", "error", "says"),
    [
        (httpx.Response(429, json={"error": {"message": "queue full"}}), Busy, "busy: queue full"),
        (httpx.Response(503, json={"Message": "loading"}), NotReady, "not available: loading"),
        (httpx.Response(424, json={"ErrorCode": "ModelError", "Message": "CUDA OOM"}), BackendError, "failed: CUDA"),
        (httpx.Response(500, text="<html>oops</html>"), BackendError, "<html>oops</html>"),
        (httpx.Response(200, text="not json"), BackendError, "not a JumpStart response"),
        (httpx.Response(200, json={"images": []}), BackendError, "no generated_images"),
        (httpx.Response(200, json={"generated_images": ["bm90IGFuIGltYWdl"]}), BackendError, "not a base64"),
        (httpx.Response(200, json={"generated_images": [[[1, 2]]]}), BackendError, "RGB"),
    ],
)
def test_http_backend_errors_are_clear(response: httpx.Response, error: type[SdgateError], says: str) -> None:
    backend = http_backend(httpx.MockTransport(lambda request: response))
    with pytest.raises(error, match=None) as caught:
        asyncio.run(backend.generate(PARAMS))
    assert says in caught.value.message
    assert backend.stats()["failures"] == 1


def test_http_backend_says_when_the_endpoint_is_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(BackendError, match=r"could not reach http://endpoint\.invalid: ConnectError"):
        asyncio.run(http_backend(httpx.MockTransport(refuse)).generate(PARAMS))


def sagemaker_backend() -> tuple[SageMakerBackend, Stubber]:
    client = boto3.client(
        "sagemaker-runtime", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    backend = SageMakerBackend(Settings(backend="sagemaker", sagemaker_endpoint="sd-endpoint"), client=client)
    return backend, Stubber(client)


@pytest.mark.parametrize(
    ("code", "status", "extra", "error", "says"),
    [
        ("ThrottlingException", 400, {}, Busy, "busy: ThrottlingException"),
        ("ModelError", 424, {"OriginalStatusCode": 500, "OriginalMessage": "CUDA out of memory"}, BackendError,
         "the model at SageMaker endpoint 'sd-endpoint'"),
        ("ValidationError", 400, {}, BackendError, "refused the request (400): ValidationError"),
        ("ServiceUnavailable", 503, {}, NotReady, "not available"),
    ],
)  # fmt: skip
def test_sagemaker_errors_become_sdgate_errors(
    code: str, status: int, extra: dict[str, Any], error: type[SdgateError], says: str
) -> None:
    backend, stub = sagemaker_backend()
    for _ in PARAMS.seeds:
        stub.add_client_error(
            "invoke_endpoint",
            service_error_code=code,
            service_message=f"{code} happened",
            http_status_code=status,
            modeled_fields=extra,
        )
    with stub, pytest.raises(error) as caught:
        asyncio.run(backend.generate(PARAMS))
    assert says in caught.value.message
    if code == "ModelError":
        assert "CUDA out of memory" in caught.value.message


def test_sagemaker_backend_without_a_region_is_not_ready_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    backend = SageMakerBackend(Settings(backend="sagemaker", sagemaker_endpoint="sd"))
    asyncio.run(backend.start())
    assert backend.state() is BackendState.failed
    assert "failed" in backend.status_detail() and "AWS_REGION" in backend.status_detail()


def test_sagemaker_backend_asks_again_for_json_when_the_model_refuses_jpeg() -> None:
    backend, stub = sagemaker_backend()
    params = GenerationParams(**{**PARAMS.__dict__, "seeds": (7,)})
    image = Image.new("RGB", (64, 64), (7, 8, 9))
    stub.add_client_error(
        "invoke_endpoint",
        service_error_code="ModelError",
        service_message="Received client error (415) from primary",
        http_status_code=424,
        modeled_fields={"OriginalStatusCode": 415, "OriginalMessage": "unsupported accept"},
        expected_params={
            "EndpointName": "sd-endpoint",
            "ContentType": "application/json",
            "Accept": "application/json;jpeg",
            "Body": ANY,
        },
    )
    stub.add_response(
        "invoke_endpoint",
        {
            "Body": StreamingBody(
                io.BytesIO(body := json.dumps({"generated_images": [to_rgb_lists(image)]}).encode()), len(body)
            )
        },
        expected_params={
            "EndpointName": "sd-endpoint",
            "ContentType": "application/json",
            "Accept": "application/json",
            "Body": ANY,
        },
    )
    with stub:
        result = asyncio.run(backend.generate(params))
    stub.assert_no_pending_responses()
    assert result.images[0].image.getpixel((0, 0)) == (7, 8, 9)
    assert result.images[0].seed == 7
