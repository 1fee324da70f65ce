"""The playground's files as the app serves them (the page itself is driven in a real browser by
tests/e2e/test_playground.py), and the job view's ``params`` it reloads a job's form from."""

from __future__ import annotations

import re
from pathlib import Path

from sdgate.api.playground import ASSETS
from sdgate.config import Settings
from tests.unit.api.gate import OpenGate, bearer, create_key


def test_the_page_is_served_at_the_root_with_a_strict_policy(open_gate: OpenGate) -> None:
    gate = open_gate()
    page = gate.client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>sdgate playground</title>" in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy  # no inline script or style anywhere in the page
    assert "<script>" not in page.text and "style=" not in page.text


def test_every_file_the_page_names_is_served(open_gate: OpenGate) -> None:
    gate = open_gate()
    page = gate.client.get("/").text
    named = set(re.findall(r'(?:href|src)="(/playground/[^"]+)"', page))
    assert named == {"/playground/" + name for name in ASSETS if name != "index.html"}
    for path in named:
        res = gate.client.get(path)
        assert res.status_code == 200, path
        assert res.headers["content-type"] == ASSETS[path.rsplit("/", 1)[1]]
        assert res.content


def test_unknown_files_are_404_in_the_error_shape(open_gate: OpenGate) -> None:
    gate = open_gate()
    for path in ("/playground/index.html", "/playground/../config.py", "/playground/nope.js"):
        res = gate.client.get(path)
        assert res.status_code == 404, path
        assert res.json()["error"]["type"] == "not_found"


def test_an_unchanged_file_answers_304(open_gate: OpenGate) -> None:
    gate = open_gate()
    first = gate.client.get("/playground/playground.js")
    again = gate.client.get("/playground/playground.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    assert again.content == b""
    stale = gate.client.get("/playground/playground.js", headers={"If-None-Match": '"other"'})
    assert stale.status_code == 200 and stale.content == first.content


def test_with_keys_required_the_page_is_open_and_the_api_is_not(open_gate: OpenGate, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, auth="on")
    key = create_key(settings, "alice")
    gate = open_gate(settings)
    assert gate.client.get("/").status_code == 200
    assert gate.client.get("/playground/playground.css").status_code == 200
    assert gate.client.get("/v1/models").status_code == 401  # what the page answers with its key dialog
    assert gate.client.get("/v1/models", headers=bearer(key)).status_code == 200


def test_the_text2image_page_links_to_the_playground(open_gate: OpenGate) -> None:
    gate = open_gate()
    page = gate.client.get("/text2image", params={"prompt": "a fox"})
    assert page.status_code == 200
    assert '<a href="/">Open the playground</a>' in page.text


def test_a_jobs_params_hold_every_default_to_run_it_again(open_gate: OpenGate) -> None:
    """The gallery reloads a job's form from ``params``: defaults filled in, the first image's seed."""
    gate = open_gate()
    job = gate.client.post(
        "/v1/generations", json={"prompt": "a fox", "seed": 7, "num_images": 2, "output_format": "png"}
    ).json()
    params = job["params"]
    defaults = gate.client.get("/v1/models").json()["data"][0]
    assert params["prompt"] == "a fox"
    assert params["seed"] == 7 and [i["seed"] for i in job["images"]] == [7, 8]
    assert params["num_images"] == 2 and params["output_format"] == "png"
    assert params["width"] == defaults["default_width"]
    assert params["num_inference_steps"] == defaults["default_steps"]
    assert params["mode"] == "txt2img" and params["strength"] is None
    listed = gate.client.get("/v1/jobs").json()["data"]
    assert [j["params"] for j in listed if j["id"] == job["id"]] == [params]
    again = gate.client.post("/v1/generations", json={k: v for k, v in params.items() if k != "mode"}).json()
    assert [i["seed"] for i in again["images"]] == [7, 8]
    assert again["params"] == params


def test_images_served_elsewhere_may_be_read_by_the_page(open_gate: OpenGate) -> None:
    """Use as input fetches an image: its origin is in the page's connect-src when it is not this server."""
    gate = open_gate(public_base_url="https://cdn.example.com/sdgate")
    policy = gate.client.get("/").headers["content-security-policy"]
    assert "connect-src 'self' https://cdn.example.com;" in policy
    assert "connect-src 'self';" in open_gate().client.get("/").headers["content-security-policy"]
