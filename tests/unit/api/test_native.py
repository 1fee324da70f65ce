"""The native v1 API in process: generations (sync and async), jobs, models, and its error shape."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from sdgate.config import Settings
from sdgate.errors import BackendError
from tests.fakes import FakeBackend, seed_colour
from tests.unit.api.gate import Gate, OpenGate, bearer, create_key, pixels


def generate(gate: Gate, body: dict[str, Any], **kw: Any) -> Any:
    return gate.client.post("/v1/generations", json=body, **kw)


def assert_native_error(body: dict[str, Any], kind: str) -> dict[str, Any]:
    """The native error shape: ``{"error": {"type", "message", ...}}`` and nothing beside it."""
    assert list(body) == ["error"]
    error: dict[str, Any] = body["error"]
    assert error["type"] == kind
    assert isinstance(error["message"], str) and error["message"]
    return error


# -- success ----------------------------------------------------------------------------------------


def test_a_generation_answers_with_its_stored_images(open_gate: OpenGate) -> None:
    gate = open_gate()
    resp = generate(gate, {"prompt": "a red fox", "seed": 1, "num_images": 2, "output_format": "png"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert {"id", "status", "model", "created", "images", "timings"} <= set(body)
    assert (body["status"], body["model"], body["surface"]) == ("succeeded", "fake-model", "native")
    assert body["timings"]["total"] > 0
    assert [i["seed"] for i in body["images"]] == [1, 2]
    for image in body["images"]:
        assert set(image) == {"url", "seed", "width", "height", "content_type", "bytes"}  # never the key
        assert image["url"].startswith("http://testserver/images/")
        assert (image["width"], image["height"], image["content_type"]) == (64, 64, "image/png")
        data = gate.image_bytes(image["url"])
        assert image["bytes"] == len(data)
        assert pixels(data)[0][0] == list(seed_colour(image["seed"]))


def test_the_default_format_is_jpeg(open_gate: OpenGate) -> None:
    gate = open_gate()
    image = generate(gate, {"prompt": "a red fox"}).json()["images"][0]
    assert image["content_type"] == "image/jpeg" and image["url"].endswith(".jpeg")
    assert gate.image_bytes(image["url"])[:3] == b"\xff\xd8\xff"


def test_respond_async_is_202_with_the_job_to_poll(open_gate: OpenGate) -> None:
    gate = open_gate()
    resp = generate(gate, {"prompt": "a red fox", "seed": 1}, headers={"Prefer": "respond-async"})
    assert resp.status_code == 202
    job = resp.json()
    assert resp.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert resp.headers["Preference-Applied"] == "respond-async"
    assert job["status"] in ("queued", "running", "succeeded")
    end = time.monotonic() + 5
    while (polled := gate.client.get(resp.headers["Location"]).json())["status"] != "succeeded":
        assert time.monotonic() < end
        time.sleep(0.01)
    assert polled["images"][0]["seed"] == 1


def test_jobs_list_newest_first_and_a_finished_one_cannot_be_canceled(open_gate: OpenGate) -> None:
    gate = open_gate()
    first = generate(gate, {"prompt": "one"}).json()["id"]
    second = generate(gate, {"prompt": "two"}).json()["id"]
    listed = gate.client.get("/v1/jobs").json()
    assert listed["object"] == "list"
    assert [j["id"] for j in listed["data"]] == [second, first]
    resp = gate.client.post(f"/v1/jobs/{first}/cancel")
    assert resp.status_code == 409
    error = assert_native_error(resp.json(), "conflict")
    assert error["message"] == f"job {first} already succeeded; nothing to cancel"


def test_models_show_the_defaults_a_request_gets(open_gate: OpenGate) -> None:
    gate = open_gate(default_steps=5)
    [card] = gate.client.get("/v1/models").json()["data"]
    assert (card["id"], card["backend"], card["ready"]) == ("fake-model", "fake", True)
    assert (card["default_width"], card["default_height"], card["default_steps"]) == (64, 64, 5)
    assert card["default_guidance_scale"] == 5.0


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"prompt": ""}, "prompt", "prompt must not be empty"),
        ({}, "prompt", "prompt is required"),
        ({"prompt": "a", "colour": "red"}, "colour", "unknown field 'colour'"),
        ({"prompt": "a", "width": 500}, "width", "width must be a multiple of 8, got 500 — try 496 or 504"),
        ({"prompt": "a", "num_images": 9}, "num_images", "num_images must be at most 8, got 9"),
        ({"prompt": "a", "scheduler": "nope"}, "scheduler", None),
    ],
)
def test_a_bad_request_is_422_in_the_native_shape_naming_the_field(
    open_gate: OpenGate, body: dict[str, Any], field: str, message: str | None
) -> None:
    gate = open_gate()
    resp = generate(gate, body)
    assert resp.status_code == 422
    error = assert_native_error(resp.json(), "invalid_request")
    assert error["field"] == field
    if message is not None:
        assert error["message"] == message
    assert gate.store.records == {}


def test_a_body_that_is_not_json_is_400_and_another_media_type_415(open_gate: OpenGate) -> None:
    gate = open_gate()
    resp = gate.client.post("/v1/generations", content=b"{nope", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert_native_error(resp.json(), "malformed_request")
    resp = gate.client.post("/v1/generations", content=b"a fox", headers={"Content-Type": "text/plain"})
    assert resp.status_code == 415
    assert_native_error(resp.json(), "unsupported_media_type")


def test_an_oversized_body_is_413_in_the_native_shape(open_gate: OpenGate) -> None:
    # /v1/generations takes images: its limit is the upload limit, not the one of bodies without images.
    gate = open_gate(max_body_bytes=1024, max_upload_bytes=4096)
    assert generate(gate, {"prompt": "x" * 2500}).status_code == 422  # over 1024, within 4096: the prompt's limit
    resp = generate(gate, {"prompt": "x" * 5000})
    assert resp.status_code == 413
    assert assert_native_error(resp.json(), "payload_too_large")["message"] == "request body exceeds 4096 bytes"
    assert gate.store.records == {}


def test_a_failed_generation_answers_the_jobs_error_and_the_job_records_it(open_gate: OpenGate) -> None:
    gate = open_gate(backend=FakeBackend(error=BackendError("the endpoint is down")))
    resp = generate(gate, {"prompt": "a red fox"})
    assert resp.status_code == 502
    assert assert_native_error(resp.json(), "backend_error")["message"] == "the endpoint is down"
    job = gate.client.get(f"/v1/jobs/{resp.headers['X-Job-Id']}").json()
    assert job["status"] == "failed"
    assert job["error"] == {"type": "backend_error", "message": "the endpoint is down"}


def test_an_unknown_job_and_an_unknown_path_are_404_in_the_native_shape(open_gate: OpenGate) -> None:
    gate = open_gate()
    assert_native_error(gate.client.get("/v1/jobs/nope").json(), "not_found")
    resp = gate.client.get("/v2/anything")
    assert resp.status_code == 404
    assert_native_error(resp.json(), "not_found")


# -- keys -------------------------------------------------------------------------------------------


def test_with_keys_on_a_request_without_one_is_401_and_a_revoked_one_403(open_gate: OpenGate, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, auth="on")
    revoked = create_key(settings, "old", revoked=True)
    gate = open_gate(settings)
    resp = generate(gate, {"prompt": "a red fox"})
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert_native_error(resp.json(), "unauthorized")
    resp = generate(gate, {"prompt": "a red fox"}, headers=bearer("sdg_00000000_wrong"))
    assert resp.status_code == 401
    resp = generate(gate, {"prompt": "a red fox"}, headers=bearer(revoked))
    assert resp.status_code == 403
    assert_native_error(resp.json(), "forbidden")
    assert gate.store.records == {}


def test_a_keys_jobs_are_its_own(open_gate: OpenGate, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, auth="on")
    alice, bob = create_key(settings, "alice"), create_key(settings, "bob")
    gate = open_gate(settings)
    job_id = generate(gate, {"prompt": "a red fox"}, headers={"X-API-Key": alice}).json()["id"]
    assert gate.client.get(f"/v1/jobs/{job_id}", headers=bearer(alice)).status_code == 200
    assert gate.client.get(f"/v1/jobs/{job_id}", headers=bearer(bob)).status_code == 404
    assert gate.client.get("/v1/jobs", headers=bearer(bob)).json()["data"] == []
    assert gate.client.get("/healthz").status_code == 200  # open without a key


def test_an_idempotent_retry_is_the_same_job_and_another_body_under_its_key_is_422(open_gate: OpenGate) -> None:
    gate = open_gate()
    key = {"Idempotency-Key": "order-1"}
    first = generate(gate, {"prompt": "a red fox", "seed": 1}, headers=key).json()
    again = generate(gate, {"prompt": "a red fox", "seed": 1}, headers=key).json()
    assert again["id"] == first["id"] and again["images"] == first["images"]
    assert len(gate.store.records) == 1 and len(gate.backend.ran) == 1
    resp = generate(gate, {"prompt": "a red fox", "seed": 2}, headers=key)
    assert resp.status_code == 422
    assert assert_native_error(resp.json(), "invalid_request")["field"] == "Idempotency-Key"
