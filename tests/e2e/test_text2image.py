"""The original design's routes on a real sdgate process (local engine, local storage)."""

from __future__ import annotations

import html
import re

import httpx
import pytest

from tests import background
from tests.aws_fixtures import jpeg_size, make_endpoint
from tests.server import ServerProcess

background.needs(__file__, endpoint=make_endpoint)


def test_post_answers_the_lambdas_shape_with_a_working_url(endpoint: ServerProcess) -> None:
    resp = httpx.post(f"{endpoint.url}/text2image", json={"text": "a red fox"}, timeout=120)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"statusCode", "body"}
    assert body["statusCode"] == 200
    assert body["body"].startswith(f"{endpoint.url}/images/")
    got = httpx.get(body["body"], timeout=30)
    assert got.status_code == 200
    assert jpeg_size(got.content) == (64, 64)


def test_get_answers_a_page_with_the_escaped_prompt_and_the_image(endpoint: ServerProcess) -> None:
    prompt = '<script>alert("x")</script> & a "quoted" fox'
    resp = httpx.get(f"{endpoint.url}/text2image", params={"prompt": prompt}, timeout=120)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in resp.headers["content-security-policy"]
    page = resp.text
    assert "<script>" not in page
    assert f"<h1>{html.escape(prompt)}</h1>" in page
    [src] = re.findall(r'<img src="([^"]+)"', page)
    got = httpx.get(html.unescape(src), timeout=30)
    assert got.status_code == 200
    assert jpeg_size(got.content) == (64, 64)


@pytest.mark.parametrize(
    ("method", "kwargs", "status", "says"),
    [
        ("POST", {"json": {"text": "  "}}, 422, "text must not be empty"),
        ("POST", {"json": {"prompt": "a fox"}}, 422, "text is required"),
        ("POST", {"json": {"text": "a fox", "width": 64}}, 422, "unknown field 'width'"),
        ("POST", {"content": "a fox", "headers": {"content-type": "text/plain"}}, 415, "application/json"),
        ("POST", {"content": "{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ("POST", {"json": {"text": "x" * 2001}}, 422, "the limit is 2000"),
        ("GET", {}, 422, "prompt is required"),
        ("GET", {"params": {"prompt": " "}}, 422, "prompt must not be empty"),
    ],
)
def test_bad_requests_get_a_clear_4xx_in_the_lambdas_shape(
    endpoint: ServerProcess, method: str, kwargs: dict[str, object], status: int, says: str
) -> None:
    resp = httpx.request(method, f"{endpoint.url}/text2image", timeout=30, **kwargs)  # type: ignore[arg-type]
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["statusCode"] == status
    assert says in body["body"]
    assert body["error"]["message"] == body["body"]
