"""The original AWS design's ``/text2image`` in process: the Lambda's answer, the page, and its error shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdgate.config import Settings
from sdgate.errors import BackendError
from tests.fakes import FakeBackend
from tests.unit.api.gate import Answer, OpenGate, bearer, create_key


def assert_lambda_error(resp: Answer, status: int, kind: str) -> dict[str, Any]:
    """The Lambda's shape: ``statusCode`` is the HTTP status, ``body`` the message; the sdgate error beside."""
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    assert set(body) == {"statusCode", "body", "error"}
    assert body["statusCode"] == status
    assert body["error"]["type"] == kind
    assert body["body"] == body["error"]["message"] and body["body"]
    return body


# -- success ----------------------------------------------------------------------------------------


def test_a_prompt_answers_the_lambdas_shape_with_the_image_url(open_gate: OpenGate) -> None:
    gate = open_gate()
    resp = gate.client.post("/text2image", json={"text": "a fox"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"statusCode", "body"}
    assert body["statusCode"] == 200
    assert body["body"].startswith("http://testserver/images/") and body["body"].endswith(".jpeg")
    assert gate.image_bytes(body["body"])[:3] == b"\xff\xd8\xff"
    [job] = gate.store.records.values()
    assert (job.surface, job.params.prompt, job.status) == ("text2image", "a fox", "succeeded")


def test_the_page_shows_the_prompt_and_the_image(open_gate: OpenGate) -> None:
    gate = open_gate()
    resp = gate.client.get("/text2image", params={"prompt": 'a <b>fox</b> "here"'})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    page = resp.text
    assert "<h1>a &lt;b&gt;fox&lt;/b&gt; &quot;here&quot;</h1>" in page
    assert '<img src="http://testserver/images/' in page and 'width="64" height="64"' in page
    assert "<b>" not in page


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text": ""}, "text must not be empty"),
        ({"text": "   "}, "text must not be empty"),
        ({}, "text is required"),
        ({"text": "a fox", "seed": 1}, "unknown field 'seed'"),
    ],
)
def test_a_bad_request_is_422_in_the_lambdas_shape(open_gate: OpenGate, body: dict[str, Any], message: str) -> None:
    gate = open_gate()
    answer = assert_lambda_error(gate.client.post("/text2image", json=body), 422, "invalid_request")
    assert answer["body"] == message
    assert gate.store.records == {}


def test_a_prompt_over_the_limit_is_422_naming_it(open_gate: OpenGate) -> None:
    gate = open_gate(max_prompt_chars=10)
    answer = assert_lambda_error(gate.client.post("/text2image", json={"text": "x" * 11}), 422, "invalid_request")
    assert answer["body"] == "prompt is 11 characters; the limit is 10"


def test_a_body_that_is_not_json_is_400_and_another_media_type_415(open_gate: OpenGate) -> None:
    gate = open_gate()
    resp = gate.client.post("/text2image", content=b"{nope", headers={"Content-Type": "application/json"})
    assert_lambda_error(resp, 400, "malformed_request")
    resp = gate.client.post("/text2image", content=b"a fox", headers={"Content-Type": "text/plain"})
    assert_lambda_error(resp, 415, "unsupported_media_type")


def test_the_page_without_a_prompt_is_422_in_the_lambdas_shape(open_gate: OpenGate) -> None:
    gate = open_gate()
    assert assert_lambda_error(gate.client.get("/text2image"), 422, "invalid_request")["body"] == "prompt is required"
    blank = assert_lambda_error(gate.client.get("/text2image", params={"prompt": " "}), 422, "invalid_request")
    assert blank["body"] == "prompt must not be empty"


def test_an_oversized_body_is_413_in_the_lambdas_shape(open_gate: OpenGate) -> None:
    gate = open_gate(max_body_bytes=1024)
    answer = assert_lambda_error(gate.client.post("/text2image", json={"text": "x" * 2000}), 413, "payload_too_large")
    assert answer["body"] == "request body exceeds 1024 bytes"


def test_a_failed_generation_is_the_jobs_error_in_the_lambdas_shape(open_gate: OpenGate) -> None:
    gate = open_gate(backend=FakeBackend(error=BackendError("the endpoint is down")))
    resp = gate.client.post("/text2image", json={"text": "a fox"})
    assert assert_lambda_error(resp, 502, "backend_error")["body"] == "the endpoint is down"
    assert resp.headers["X-Job-Id"] in gate.store.records


def test_with_keys_on_it_is_401_without_one_and_403_for_a_revoked_one(open_gate: OpenGate, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, auth="on")
    revoked, key = create_key(settings, "old", revoked=True), create_key(settings, "alice")
    gate = open_gate(settings)
    assert_lambda_error(gate.client.post("/text2image", json={"text": "a fox"}), 401, "unauthorized")
    assert_lambda_error(gate.client.get("/text2image", params={"prompt": "a fox"}), 401, "unauthorized")
    resp = gate.client.post("/text2image", json={"text": "a fox"}, headers=bearer(revoked))
    assert_lambda_error(resp, 403, "forbidden")
    assert gate.client.post("/text2image", json={"text": "a fox"}, headers=bearer(key)).status_code == 200
