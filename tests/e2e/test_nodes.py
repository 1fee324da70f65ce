"""Two API nodes on one real PostgreSQL server (``SDGATE_JOB_STORE=postgres``), each a real
``sdgate serve`` process on a loopback port, with keys on.

They share the database (jobs, keys, rate and quota counters) and a data directory (the local image
storage: two nodes need storage both can read, S3 in production). A short lease (3 s) keeps the
takeover test short. The kill -9 test runs last: it kills node A.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests import background, postgres
from tests.apikeys import create_key
from tests.server import ServerProcess, start_server, with_tiny_models

LEASE_S = 3
DEADLINE_S = 120.0
ASYNC = {"Prefer": "respond-async"}
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "output_format": "png"}
LONG = {"width": 256, "height": 256, "num_inference_steps": 150}  # many seconds: running while a test acts
TERMINAL = ("succeeded", "failed", "canceled")


@dataclass
class Nodes:
    a: ServerProcess
    b: ServerProcess
    env: dict[str, str]
    key: str  # no quota: for the tests that are not about one

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}


def _nodes() -> Nodes:
    data_dir = with_tiny_models(background.workdir("nodes"))
    env = {
        "SDGATE_JOB_STORE": "postgres",
        "SDGATE_POSTGRES_URL": postgres.fresh_database(),
        "SDGATE_NODE_LEASE_S": str(LEASE_S),
        "SDGATE_AUTH": "on",
        "SDGATE_SYNC_TIMEOUT": "60",
        "OMP_NUM_THREADS": "1",
    }
    key = create_key(data_dir, "everyone", env=env)  # made before either node: both read it from the database
    return Nodes(start_server(data_dir, env=env), start_server(data_dir, env=env), env, key)


background.needs(__file__, pg_nodes=_nodes)


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    made: Nodes = background.take("pg_nodes", _nodes)
    yield made
    made.a.stop()
    made.b.stop()


def _job(node: ServerProcess, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    res = httpx.get(f"{node.url}/v1/jobs/{job_id}", headers=headers, timeout=30)
    assert res.status_code == 200, res.text
    job: dict[str, Any] = res.json()
    return job


def _until_done(node: ServerProcess, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        job = _job(node, job_id, headers)
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not end in {DEADLINE_S:.0f} s on {node.url}")


def test_a_job_made_on_one_node_is_read_from_the_other_with_its_images(nodes: Nodes) -> None:
    made = httpx.post(
        f"{nodes.a.url}/v1/generations", json={**SMALL, "prompt": "a fox", "seed": 5}, headers=nodes.headers()
    )
    assert made.status_code == 200, made.text
    job = made.json()
    seen = _job(nodes.b, job["id"], nodes.headers())
    assert seen["status"] == "succeeded"
    assert [i["seed"] for i in seen["images"]] == [5]
    assert seen["params"]["prompt"] == "a fox"
    image = httpx.get(seen["images"][0]["url"].replace(nodes.a.url, nodes.b.url), timeout=30)
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.headers["access-control-allow-origin"] == "*"  # readable from any page (the playground's too)
    listed = httpx.get(f"{nodes.b.url}/v1/jobs", headers=nodes.headers(), timeout=30).json()["data"]
    assert job["id"] in [j["id"] for j in listed]


def test_a_job_running_on_one_node_is_streamed_and_canceled_from_the_other(nodes: Nodes) -> None:
    made = httpx.post(
        f"{nodes.a.url}/v1/generations", json={**LONG, "prompt": "a long one"}, headers={**nodes.headers(), **ASYNC}
    )
    assert made.status_code == 202, made.text
    job_id = made.json()["id"]
    events: list[tuple[str, dict[str, Any]]] = []
    canceled_at: int | None = None
    with httpx.stream(
        "GET", f"{nodes.b.url}/v1/jobs/{job_id}/events", headers=nodes.headers(), timeout=DEADLINE_S
    ) as stream:
        assert stream.status_code == 200
        name = ""
        for line in stream.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                events.append((name, data))
                step = data["progress"]["step"]
                if name == "progress" and step > 0 and canceled_at is None:
                    # Node A reports its steps at each heartbeat; B's stream shows them. Cancel through B.
                    res = httpx.post(f"{nodes.b.url}/v1/jobs/{job_id}/cancel", headers=nodes.headers(), timeout=30)
                    assert res.status_code == 200, res.text
                    canceled_at = step
                if name in TERMINAL:
                    break
    names = [n for n, _ in events]
    assert canceled_at is not None, f"no progress reached node B's stream: {names}"
    assert names[-1] == "canceled", names
    # Node A stopped it: it ends canceled there too, short of its steps, and A's engine is free again.
    on_a = _until_done(nodes.a, job_id, nodes.headers())
    assert on_a["status"] == "canceled"
    assert on_a["progress"]["step"] < on_a["progress"]["total_steps"]
    after = httpx.post(f"{nodes.a.url}/v1/generations", json={**SMALL, "prompt": "next"}, headers=nodes.headers())
    assert after.status_code == 200 and after.json()["status"] == "succeeded"


def test_a_keys_daily_quota_and_rate_hold_across_both_nodes(nodes: Nodes) -> None:
    quota_key = create_key(nodes.a.data_dir, "quota", "--quota", "2", env=nodes.env)
    body = {**SMALL, "prompt": "counted"}
    on_a = httpx.post(f"{nodes.a.url}/v1/generations", json=body, headers=nodes.headers(quota_key), timeout=60)
    on_b = httpx.post(f"{nodes.b.url}/v1/generations", json=body, headers=nodes.headers(quota_key), timeout=60)
    assert (on_a.status_code, on_b.status_code) == (200, 200), (on_a.text, on_b.text)
    for node in (nodes.a, nodes.b):
        refused = httpx.post(f"{node.url}/v1/generations", json=body, headers=nodes.headers(quota_key), timeout=60)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["message"] == "daily quota of 2 images reached"

    rate_key = create_key(nodes.a.data_dir, "rate", "--rate", "3", env=nodes.env)
    codes = [
        httpx.post(f"{node.url}/v1/generations", json=body, headers=nodes.headers(rate_key), timeout=60).status_code
        for node in (nodes.a, nodes.b, nodes.a, nodes.b)
    ]
    assert codes == [200, 200, 200, 429]


def test_a_key_made_while_they_run_works_on_both(nodes: Nodes) -> None:
    key = create_key(nodes.b.data_dir, "late", env=nodes.env)
    for node in (nodes.a, nodes.b):
        assert httpx.get(f"{node.url}/v1/models", headers=nodes.headers(key), timeout=30).status_code == 200
    assert httpx.get(f"{nodes.a.url}/v1/models", headers=nodes.headers("sdg_0000_nope"), timeout=30).status_code == 401


def test_kill_9_one_node_and_the_other_finishes_its_jobs(nodes: Nodes) -> None:
    """Node A dies with a job running and two queued; its lease runs out and node B runs all three."""
    headers = {**nodes.headers(), **ASYNC}
    running = httpx.post(
        f"{nodes.a.url}/v1/generations",
        json={"width": 256, "height": 256, "num_inference_steps": 40, "prompt": "interrupted", "seed": 1},
        headers=headers,
    ).json()["id"]
    queued = [
        httpx.post(
            f"{nodes.a.url}/v1/generations", json={**SMALL, "prompt": f"queued {i}", "seed": 10 + i}, headers=headers
        ).json()["id"]
        for i in range(2)
    ]
    deadline = time.monotonic() + DEADLINE_S
    while _job(nodes.b, running, nodes.headers())["status"] != "running":
        assert time.monotonic() < deadline, "the job never started on node A"
        time.sleep(0.1)
    nodes.a.kill()

    for job_id in (running, *queued):
        job = _until_done(nodes.b, job_id, nodes.headers())
        assert job["status"] == "succeeded", job
        image = httpx.get(job["images"][0]["url"], timeout=30)
        assert image.status_code == 200
    assert [i["seed"] for i in _job(nodes.b, queued[1], nodes.headers())["images"]] == [11]
    log = nodes.b.log()
    for job_id in (running, *queued):  # B ran them because it took them over, not because A had finished
        assert f"job {job_id} recovered and re-queued" in log
