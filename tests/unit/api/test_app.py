"""One app, one path: every surface is charged by the same guard and runs as a job of the same runner."""

from __future__ import annotations

import json
from pathlib import Path

from sdgate.config import Settings
from tests.unit.api.gate import OpenGate, bearer, create_key

JPEG = {"Accept": "application/json;jpeg", "Content-Type": "application/json"}


def test_a_keys_daily_quota_holds_across_surfaces(open_gate: OpenGate, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, auth="on")
    key = create_key(settings, "alice", images_per_day=2)
    gate = open_gate(settings)
    auth = bearer(key)
    prompt = json.dumps({"prompt": "a fox"}).encode()

    assert gate.client.post("/v1/generations", json={"prompt": "a fox"}, headers=auth).status_code == 200
    assert gate.client.post("/invocations", content=prompt, headers={**auth, **JPEG}).status_code == 200

    runtime = gate.client.post("/endpoints/x/invocations", content=prompt, headers={**auth, **JPEG})
    assert runtime.status_code == 429
    assert runtime.headers["x-amzn-ErrorType"] == "ThrottlingException"
    assert runtime.json()["Message"] == "daily quota of 2 images reached"
    assert "Retry-After" in runtime.headers

    lambda_ = gate.client.post("/text2image", json={"text": "a fox"}, headers=auth)
    assert lambda_.status_code == 429
    assert lambda_.json()["statusCode"] == 429
    assert lambda_.json()["body"] == "daily quota of 2 images reached"

    native = gate.client.post("/v1/generations", json={"prompt": "a fox"}, headers=auth)
    assert native.status_code == 429
    assert native.json()["error"]["type"] == "rate_limited"

    jobs = gate.client.get("/v1/jobs", headers=auth).json()["data"]
    assert sorted(j["surface"] for j in jobs) == ["native", "sagemaker"]  # the refused ones never became jobs
    assert len(gate.store.records) == 2


def test_every_generation_is_a_job_of_its_surface(open_gate: OpenGate) -> None:
    gate = open_gate()
    native = gate.client.post("/v1/generations", json={"prompt": "a fox"}).json()["id"]
    gate.client.post("/invocations", content=json.dumps({"prompt": "a cat"}).encode(), headers=JPEG)
    gate.client.post("/endpoints/x/invocations", content=json.dumps({"prompt": "a cow"}).encode(), headers=JPEG)
    gate.client.post("/text2image", json={"text": "a dog"})
    gate.client.get("/text2image", params={"prompt": "a bee"})

    jobs = gate.client.get("/v1/jobs").json()["data"]
    assert sorted((j["surface"], j["status"]) for j in jobs) == [
        ("native", "succeeded"),
        ("sagemaker", "succeeded"),
        ("sagemaker", "succeeded"),
        ("text2image", "succeeded"),
        ("text2image", "succeeded"),
    ]
    assert {r.params.prompt for r in gate.store.records.values()} == {"a fox", "a cat", "a cow", "a dog", "a bee"}
    assert gate.client.get(f"/v1/jobs/{native}").json()["surface"] == "native"


def test_every_surfaces_jobs_are_counted_in_the_metrics(open_gate: OpenGate) -> None:
    gate = open_gate()
    gate.client.post("/v1/generations", json={"prompt": "a fox"})
    gate.client.post("/invocations", content=json.dumps({"prompt": "a cat"}).encode(), headers=JPEG)
    gate.client.post("/text2image", json={"text": "a dog"})
    text = gate.client.get("/metrics").text
    assert 'sdgate_jobs_total{status="succeeded"} 3.0' in text
    assert "sdgate_images_generated_total 3.0" in text


def test_an_invocation_of_several_prompts_is_one_request_of_all_their_images(
    open_gate: OpenGate, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, auth="on")
    key = create_key(settings, "alice", rate_per_min=1, images_per_day=4)
    gate = open_gate(settings)
    headers = {**bearer(key), **JPEG}
    three = json.dumps({"prompt": ["a fox", "a cat", "a cow"]}).encode()
    resp = gate.client.post("/invocations", content=three, headers=headers)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["generated_images"]) == 3
    assert len(gate.store.records) == 3  # a job per prompt, charged once
    again = gate.client.post("/invocations", content=json.dumps({"prompt": "a dog"}).encode(), headers=headers)
    assert again.status_code == 429
    assert again.json()["Message"] == "rate limit of 1 requests per minute reached"
