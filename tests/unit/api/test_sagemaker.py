"""The SageMaker routes in process: the JumpStart contract, SageMaker's error shape, and the same image
as the native API for the same seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sdgate.backends import BackendState
from sdgate.config import Settings
from sdgate.errors import GenerationFailed
from tests.fakes import FakeBackend, seed_colour
from tests.unit.api.gate import Answer, Gate, OpenGate, b64, bearer, create_key, pixels

PATHS = ["/invocations", "/endpoints/my-endpoint/invocations"]
JPEG = {"Accept": "application/json;jpeg"}


def invoke(gate: Gate, body: Any, path: str = "/invocations", headers: dict[str, str] | None = None) -> Answer:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    return gate.client.post(path, content=content, headers=headers)


def assert_sagemaker_error(resp: Answer, status: int, code: str, kind: str) -> dict[str, Any]:
    """SageMaker's shape: ``ErrorCode`` and ``Message``, the code in ``x-amzn-ErrorType``, and the sdgate error."""
    assert resp.status_code == status, resp.text
    assert resp.headers["x-amzn-ErrorType"] == code
    body: dict[str, Any] = resp.json()
    assert set(body) == {"ErrorCode", "Message", "error"}
    assert body["ErrorCode"] == code
    assert body["error"]["type"] == kind
    assert body["Message"] == body["error"]["message"] and body["Message"]
    return body


# -- success ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_json_invocation_answers_base64_jpegs(open_gate: OpenGate, path: str) -> None:
    gate = open_gate()
    resp = invoke(gate, {"prompt": "a fox", "seed": 3, "num_images_per_prompt": 2}, path, JPEG)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["X-Amzn-Invoked-Production-Variant"] == "AllTraffic"
    body = resp.json()
    assert set(body) == {"generated_images", "prompt"}
    assert body["prompt"] == "a fox"
    images = [b64(s) for s in body["generated_images"]]
    assert len(images) == 2 and all(i[:3] == b"\xff\xd8\xff" for i in images)
    [job] = gate.store.records.values()
    assert job.surface == "sagemaker" and [i.seed for i in job.images] == [3, 4]


def test_an_x_text_invocation_is_the_prompt_and_answers_one_generated_image(open_gate: OpenGate) -> None:
    gate = open_gate()
    resp = gate.client.post("/invocations", content=b"a fox", headers={"Content-Type": "application/x-text", **JPEG})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"generated_image", "prompt"}
    assert body["prompt"] == "a fox"
    assert b64(body["generated_image"])[:3] == b"\xff\xd8\xff"


def test_image_k_of_several_prompts_uses_seed_plus_k(open_gate: OpenGate) -> None:
    gate = open_gate()
    payload = {"prompt": ["a fox", "a cat"], "num_images_per_prompt": 2, "seed": 10}
    resp = invoke(gate, payload, headers={"Accept": "application/json"})
    assert resp.status_code == 200, resp.text
    images = resp.json()["generated_images"]
    assert [rows[0][0] for rows in images] == [list(seed_colour(s)) for s in (10, 11, 12, 13)]
    assert sorted((r.params.prompt, r.params.seeds) for r in gate.store.records.values()) == [
        ("a cat", (12, 13)),
        ("a fox", (10, 11)),
    ]


def test_ping_is_healthy_once_the_model_is_ready(open_gate: OpenGate) -> None:
    assert open_gate().client.get("/ping").json() == {"status": "Healthy"}


def test_ping_is_503_while_the_model_loads(open_gate: OpenGate) -> None:
    resp = open_gate(backend=FakeBackend(state=BackendState.loading)).client.get("/ping")
    assert resp.status_code == 503
    assert resp.json()["status"] == "Unhealthy"


# -- the same image through every surface -----------------------------------------------------------


def test_the_same_seed_gives_the_same_jpeg_bytes_as_the_native_api(open_gate: OpenGate) -> None:
    gate = open_gate()
    native = gate.client.post("/v1/generations", json={"prompt": "a fox", "seed": 7, "output_format": "jpeg"})
    assert native.status_code == 200, native.text
    native_bytes = gate.image_bytes(native.json()["images"][0]["url"])
    for path in PATHS:
        resp = invoke(gate, {"prompt": "a fox", "seed": 7}, path, JPEG)
        assert b64(resp.json()["generated_images"][0]) == native_bytes


def test_rgb_lists_are_the_pixels_of_the_native_png(open_gate: OpenGate) -> None:
    gate = open_gate()
    native = gate.client.post("/v1/generations", json={"prompt": "a fox", "seed": 7, "output_format": "png"})
    native_pixels = pixels(gate.image_bytes(native.json()["images"][0]["url"]))
    resp = invoke(gate, {"prompt": "a fox", "seed": 7}, headers={"Accept": "application/json"})
    [rows] = resp.json()["generated_images"]
    assert rows == native_pixels
    assert (len(rows), len(rows[0]), rows[0][0]) == (64, 64, list(seed_colour(7)))


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("body", "headers", "kind"),
    [
        ({"prompt": "a fox", "width": 500}, {}, "invalid_request"),
        ({"prompt": "a fox", "colour": "red"}, {}, "invalid_request"),
        ({"width": 64}, {}, "invalid_request"),
        ({"prompt": "a fox", "num_images_per_prompt": 9}, {}, "invalid_request"),
        (b"{nope", {}, "malformed_request"),
        (b"", {}, "malformed_request"),
        ({"prompt": "a fox"}, {"Content-Type": "image/png"}, "unsupported_media_type"),
        ({"prompt": "a fox"}, {"Accept": "image/png"}, "unsupported_media_type"),
    ],
    ids=["width", "unknown-field", "no-prompt", "too-many", "not-json", "empty", "content-type", "accept"],
)
def test_a_bad_request_is_a_400_validation_error(
    open_gate: OpenGate, path: str, body: Any, headers: dict[str, str], kind: str
) -> None:
    gate = open_gate()
    assert_sagemaker_error(invoke(gate, body, path, headers), 400, "ValidationError", kind)
    assert gate.store.records == {}


def test_a_bad_request_says_what_to_fix(open_gate: OpenGate) -> None:
    body = assert_sagemaker_error(
        invoke(open_gate(), {"prompt": "a fox", "width": 500}), 400, "ValidationError", "invalid_request"
    )
    assert body["Message"] == "width must be a multiple of 8, got 500 — try 496 or 504"
    assert body["error"]["field"] == "width"


@pytest.mark.parametrize("path", PATHS)
def test_an_oversized_body_is_413_in_sagemakers_shape(open_gate: OpenGate, path: str) -> None:
    gate = open_gate(max_upload_bytes=1024)
    body = assert_sagemaker_error(
        invoke(gate, {"prompt": "x" * 2000}, path), 413, "ValidationError", "payload_too_large"
    )
    assert body["Message"] == "request body exceeds 1024 bytes"


def test_a_failed_model_is_a_424_model_error(open_gate: OpenGate) -> None:
    gate = open_gate(backend=FakeBackend(error=GenerationFailed("the model ran out of memory")))
    body = assert_sagemaker_error(invoke(gate, {"prompt": "a fox"}), 424, "ModelError", "generation_failed")
    assert body["Message"] == "the model ran out of memory"


# -- keys -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_without_a_key_it_is_401_unrecognized_client(open_gate: OpenGate, tmp_path: Path, path: str) -> None:
    gate = open_gate(Settings(data_dir=tmp_path, auth="on"))
    resp = invoke(gate, {"prompt": "a fox"}, path)
    assert_sagemaker_error(resp, 401, "UnrecognizedClientException", "unauthorized")
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    resp = invoke(gate, {"prompt": "a fox"}, path, bearer("sdg_00000000_wrong"))
    assert_sagemaker_error(resp, 401, "UnrecognizedClientException", "unauthorized")


@pytest.mark.parametrize("path", PATHS)
def test_a_revoked_key_is_403_access_denied(open_gate: OpenGate, tmp_path: Path, path: str) -> None:
    settings = Settings(data_dir=tmp_path, auth="on")
    revoked = create_key(settings, "old", revoked=True)
    gate = open_gate(settings)
    assert_sagemaker_error(
        invoke(gate, {"prompt": "a fox"}, path, bearer(revoked)), 403, "AccessDeniedException", "forbidden"
    )


def test_a_key_is_accepted(open_gate: OpenGate, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, auth="on")
    key = create_key(settings, "alice")
    gate = open_gate(settings)
    for path in PATHS:
        assert invoke(gate, {"prompt": "a fox"}, path, {**bearer(key), **JPEG}).status_code == 200


def test_in_sagemaker_mode_invocations_is_open_and_the_runtime_path_is_not(open_gate: OpenGate, tmp_path: Path) -> None:
    gate = open_gate(Settings(data_dir=tmp_path, auth="on", sagemaker=True))
    assert invoke(gate, {"prompt": "a fox"}, "/invocations", JPEG).status_code == 200
    resp = invoke(gate, {"prompt": "a fox"}, "/endpoints/x/invocations", JPEG)
    assert_sagemaker_error(resp, 401, "UnrecognizedClientException", "unauthorized")
