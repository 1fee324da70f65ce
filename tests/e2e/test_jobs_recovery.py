"""Nothing accepted is lost across a crash: kill -9 the server with jobs running and queued, restart it.

(A job interrupted twice ends ``failed`` with type ``interrupted``; that path is covered without
three server starts in tests/unit/test_jobstore_recovery.py.)
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import start_server

DEADLINE_S = 60.0
ASYNC = {"Prefer": "respond-async"}
TERMINAL = ("succeeded", "failed", "canceled")


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    resp = client.post("/v1/generations", json=body, headers=ASYNC)
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    return job_id


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    resp = client.get(f"/v1/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    job: dict[str, Any] = resp.json()
    return job


def poll(client: httpx.Client, job_id: str, until: str, done: Any) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        job = get_job(client, job_id)
        if done(job):
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} not {until} after {DEADLINE_S:.0f} s; last seen: {job}")
        time.sleep(0.05)


def test_jobs_running_and_queued_at_kill_9_finish_after_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"

    # 1. One job running, five queued behind it.
    first = start_server(data_dir)
    try:
        with httpx.Client(base_url=first.url, timeout=DEADLINE_S) as client:
            running = submit(client, {"prompt": "cut short", "width": 128, "height": 128, "num_inference_steps": 50})
            poll(client, running, "running", lambda j: j["status"] == "running" and j["progress"]["step"] >= 1)
            queued = [
                submit(client, {"prompt": f"waiting {i}", "width": 64, "height": 64, "num_inference_steps": 2})
                for i in range(5)
            ]
            assert [get_job(client, j)["status"] for j in queued] == ["queued"] * 5
            assert get_job(client, running)["status"] == "running"
            killed_at = time.time()
            first.kill()
    finally:
        first.stop()
    assert first.proc.returncode == -signal.SIGKILL

    # 2. A new process on the same data directory finishes every one of them.
    second = start_server(data_dir)
    try:
        with httpx.Client(base_url=second.url, timeout=DEADLINE_S) as client:
            jobs = {j: poll(client, j, "finished", lambda j: j["status"] in TERMINAL) for j in [running, *queued]}
            listed = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
            assert {j["id"] for j in listed} == set(jobs)
            assert all(j["status"] in TERMINAL for j in listed), "a job stayed queued or running"

            for job in jobs.values():
                # Interrupted once (or never started): run again from the start, not given up on.
                assert job["status"] == "succeeded", job
                assert job["progress"]["step"] == job["progress"]["total_steps"]
                for img in job["images"]:
                    got = client.get(img["url"])
                    assert got.status_code == 200, f"job {job['id']} points at a missing image {img['url']}"
                    assert len(got.content) == img["bytes"]
            # The running job was run again by the new process, not just marked done.
            assert jobs[running]["started"] > killed_at
            assert len(jobs[running]["images"]) == 1
    finally:
        second.stop()
