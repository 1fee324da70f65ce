"""Reliability and operations of a real ``sdgate serve`` process: load, storage faults, metrics,
logs, graceful shutdown.

One server for the module, with a small queue so that load meets 429s; the last test stops it with
SIGTERM and starts another on the same data directory. (kill -9 and restart is in test_jobs.py:
``test_jobs_running_and_queued_at_kill_9_finish_after_restart``.)
"""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from sdgate.jobstore import SqliteJobStore
from sdgate.schemas import JobStatus
from tests import background
from tests.server import ServerProcess, start_server

TIMEOUT = 120  # per request: generous on a shared two-core machine; a hang fails, slowness does not
DEADLINE_S = 180
SMALL: dict[str, Any] = {"width": 64, "height": 64, "num_inference_steps": 1}
ASYNC = {"Prefer": "respond-async"}
TERMINAL = ("succeeded", "failed", "canceled")
QUEUE_SIZE = 6  # with batches of 8: 14 of the 16 clients in flight, the rest meet 429s
OPS_ENV = {
    "SDGATE_QUEUE_SIZE": str(QUEUE_SIZE),
    "SDGATE_MAX_BATCH_SIZE": "8",
    "SDGATE_MAX_BATCH_WAIT_MS": "5",
    "SDGATE_SHUTDOWN_GRACE_S": "300",  # the running job must finish, however busy the machine
    "OMP_NUM_THREADS": "1",
}


def _ops_server() -> ServerProcess:
    return start_server(background.workdir("ops"), env=OPS_ENV)


background.needs(__file__, ops_server=_ops_server)


@pytest.fixture(scope="module")
def ops() -> Iterator[list[ServerProcess]]:
    """The module's server; a list, since the shutdown test replaces it with a restarted one."""
    servers: list[ServerProcess] = [background.take("ops_server", _ops_server)]
    yield servers
    for srv in servers:
        srv.stop()


@pytest.fixture
def srv(ops: list[ServerProcess]) -> ServerProcess:
    return ops[-1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def metric_samples(srv: ServerProcess) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def metric(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there are none)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


Samples = list[tuple[str, dict[str, str], float]]
Counted = tuple[str, dict[str, str], float]  # metric name, labels it must have, expected increment
STAGES = ("queue", "inference", "encode", "store")


def deltas(before: Samples, after: Samples, counted: list[Counted]) -> list[tuple[str, dict[str, str], float]]:
    """How much each counted metric grew from ``before`` to ``after``."""
    return [
        (name, labels, metric(after, name, **labels) - metric(before, name, **labels)) for name, labels, _ in counted
    ]


def expected(counted: list[Counted]) -> list[tuple[str, dict[str, str], float]]:
    return [(name, labels, float(n)) for name, labels, n in counted]


def settled(srv: ServerProcess, before: Samples, counted: list[Counted], timeout: float = 5) -> Samples:
    """Metrics once every counted one has grown by at least what it should (the HTTP counter of a request
    is updated just after its response is sent), or after ``timeout``: then the caller's exact comparison
    fails and says which one is short."""
    deadline = time.monotonic() + timeout
    while True:
        after = metric_samples(srv)
        grown = deltas(before, after, counted)
        if all(d >= n for (_, _, d), (_, _, n) in zip(grown, counted, strict=True)) or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def wait_done(c: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        job: dict[str, Any] = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} still {job['status']} after {DEADLINE_S} s")
        time.sleep(0.05)


# -- load -----------------------------------------------------------------------------------------


def load(srv: ServerProcess, requests: int, clients: int) -> dict[str, int]:
    """``requests`` sync generations from ``clients`` threads; every answer checked. Counts by status."""
    counts: dict[str, int] = {"200": 0, "429": 0}
    lock = threading.Lock()
    next_index = iter(range(requests))

    def client_loop() -> None:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                resp = c.post("/v1/generations", json={"prompt": f"load {i}", "seed": i, **SMALL})
                if resp.status_code == 429:
                    assert resp.json()["error"]["type"] == "busy", resp.text
                    assert int(resp.headers["retry-after"]) >= 1
                    with lock:
                        counts["429"] += 1
                    time.sleep(0.1)  # a polite client; Retry-After itself would make this test slow
                    continue
                assert resp.status_code == 200, f"request {i}: {resp.status_code} {resp.text[:300]}"
                [img] = resp.json()["images"]
                data = c.get(img["url"]).content
                with Image.open(io.BytesIO(data)) as im:
                    im.load()  # decodes every pixel: a truncated file fails here
                    assert im.size == (64, 64) and im.format == "JPEG"
                with lock:
                    counts["200"] += 1

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client_loop) for _ in range(clients)]
        for f in futures:
            f.result(timeout=DEADLINE_S * 3)  # nothing hangs: every client comes back
    assert counts["200"] + counts["429"] == requests
    return counts


def test_load_gets_images_or_429_and_memory_stays_flat(srv: ServerProcess) -> None:
    load(srv, 48, 16)  # warm-up: allocator pools, batch shapes, connection handling
    before = rss_bytes(srv.proc.pid)
    counts = load(srv, 200, 16)
    after = rss_bytes(srv.proc.pid)
    print(f"load: {counts}, RSS {before >> 20} -> {after >> 20} MiB")

    assert counts["200"] >= 16, counts  # the queue admits work under load...
    assert counts["429"] >= 1, counts  # ...and refuses the rest at once instead of piling it up
    # a leak test, not a timing test: generous room for allocator noise
    assert after < before * 1.3 + 50 * 2**20, f"RSS grew from {before >> 20} MiB to {after >> 20} MiB"
    # nothing is left behind: the queue drains, every job ends
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        jobs = c.get("/v1/jobs", params={"limit": 100}).json()["data"]
        assert all(j["status"] == "succeeded" for j in jobs), [j["status"] for j in jobs]
    assert metric(metric_samples(srv), "sdgate_queue_depth") == 0


# -- storage faults -------------------------------------------------------------------------------


def test_unwritable_storage_fails_jobs_clearly_and_recovers(srv: ServerProcess) -> None:
    images = srv.data_dir / "images"
    aside = srv.data_dir / "images.aside"
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        first = c.post("/v1/generations", json={"prompt": "before the fault", **SMALL})
        assert first.status_code == 200, first.text
        old_url = first.json()["images"][0]["url"]
        before_fault = metric_samples(srv)

        # A file where the directory was: mkdir of the date directories fails with ENOTDIR, also
        # for root (chmod would not stop root).
        images.rename(aside)
        images.write_bytes(b"not a directory")
        try:
            resp = c.post("/v1/generations", json={"prompt": "during the fault", **SMALL})
            assert resp.status_code == 503, resp.text
            err = resp.json()["error"]
            assert err["type"] == "storage_error"
            assert "could not store image" in err["message"]
            failed = c.get(f"/v1/jobs/{resp.headers['x-job-id']}").json()
            assert failed["status"] == "failed" and failed["error"]["type"] == "storage_error"
            assert failed["images"] == []

            job = c.post("/v1/generations", json={"prompt": "async during the fault", **SMALL}, headers=ASYNC)
            done = wait_done(c, job.json()["id"])
            assert done["status"] == "failed" and done["error"]["type"] == "storage_error"
            assert "could not store image" in done["error"]["message"]

            assert c.get("/healthz").status_code == 200  # the server stays up
            # Counted: two failed jobs (sync and async), both storage errors, one 503, no image stored.
            counted: list[Counted] = [
                ("sdgate_jobs_total", {"status": "failed"}, 2),
                ("sdgate_jobs_total", {"status": "succeeded"}, 0),
                ("sdgate_errors_total", {"type": "storage_error"}, 2),
                ("sdgate_images_generated_total", {}, 0),
                ("sdgate_http_requests_total", {"route": "/v1/generations", "method": "POST", "status": "503"}, 1),
                ("sdgate_http_requests_total", {"route": "/v1/generations", "method": "POST", "status": "202"}, 1),
            ]
            during = settled(srv, before_fault, counted)
            assert deltas(before_fault, during, counted) == expected(counted)
        finally:
            images.unlink()
            aside.rename(images)

        after = c.post("/v1/generations", json={"prompt": "after the fault", **SMALL})
        assert after.status_code == 200, after.text
        assert c.get(after.json()["images"][0]["url"]).status_code == 200
        assert c.get(old_url).status_code == 200  # and what was stored before is still served
    assert srv.proc.poll() is None


# -- metrics and logs -----------------------------------------------------------------------------


def test_metrics_count_requests_by_route_and_status_stages_and_jobs(srv: ServerProcess) -> None:
    """The exact increments of one succeeded generation, one 422 and one 404 (the server is the module's:
    counts before and after, never totals that earlier tests could have made)."""
    route = "/v1/generations"
    counted: list[Counted] = [
        ("sdgate_http_requests_total", {"route": route, "method": "POST", "status": "200"}, 1),
        ("sdgate_http_requests_total", {"route": route, "method": "POST", "status": "422"}, 1),
        # the route template, not the raw path: ids do not explode the label set
        ("sdgate_http_requests_total", {"route": "/v1/jobs/{job_id}", "method": "GET", "status": "404"}, 1),
        *[("sdgate_stage_duration_seconds_count", {"stage": stage}, 1) for stage in STAGES],
        *[("sdgate_stage_duration_seconds_bucket", {"stage": stage, "le": "+Inf"}, 1) for stage in STAGES],
        ("sdgate_jobs_total", {"status": "succeeded"}, 1),
        ("sdgate_jobs_total", {"status": "failed"}, 0),
        ("sdgate_images_generated_total", {}, 1),
        # the engine side: one request, alone, in one pipeline call
        ("sdgate_requests_total", {}, 1),
        ("sdgate_pipeline_calls_total", {}, 1),
        ("sdgate_batches_total", {"size": "1"}, 1),
        ("sdgate_batches_total", {}, 1),
    ]
    before = metric_samples(srv)
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        ok = c.post("/v1/generations", json={"prompt": "counted", **SMALL})
        assert ok.status_code == 200
        assert c.post("/v1/generations", json={"prompt": "x", "width": 100}).status_code == 422
        assert c.get("/v1/jobs/nope").status_code == 404
    after = settled(srv, before, counted)
    assert deltas(before, after, counted) == expected(counted)
    assert not [lab for n, lab, _ in after if n == "sdgate_http_requests_total" and "nope" in lab["route"]]
    assert metric(after, "sdgate_ready") == 1
    assert metric(after, "sdgate_queue_depth") == 0


def test_log_lines_are_json_with_the_request_id_and_no_prompt(srv: ServerProcess) -> None:
    prompt = "a very private zebra prompt 7f3a"
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        resp = c.post(
            "/v1/generations",
            json={"prompt": prompt, "negative_prompt": "private negative 9c1d", **SMALL},
            headers={"X-Request-Id": "trace-me-123"},
        )
        assert resp.status_code == 200
        assert resp.headers["x-request-id"] == "trace-me-123"
        generated = c.get("/healthz").headers["x-request-id"]
        assert len(generated) == 32
    time.sleep(0.2)  # the access line is written after the response is sent
    text = srv.log()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    mine = [r for r in records if r.get("request_id") == "trace-me-123"]
    assert any(r["logger"] == "sdgate.access" and r["route"] == "/v1/generations" and r["status"] == 200 for r in mine)
    assert all(r["level"] in ("info", "warning", "error") for r in records)
    assert "private zebra" not in text and "private negative" not in text  # prompts are user data


# -- graceful shutdown (last: stops the module's server) ------------------------------------------


def test_sigterm_finishes_the_running_job_and_leaves_queued_ones_for_the_next_start(
    ops: list[ServerProcess],
) -> None:
    first = ops[-1]
    with httpx.Client(base_url=first.url, timeout=TIMEOUT) as c:
        running = c.post(
            "/v1/generations",
            json={"prompt": "finish me", "width": 128, "height": 128, "num_inference_steps": 40},
            headers=ASYNC,
        ).json()["id"]
        deadline = time.monotonic() + DEADLINE_S
        while (job := c.get(f"/v1/jobs/{running}").json())["progress"]["step"] < 1:
            assert job["status"] in ("queued", "running"), job
            assert time.monotonic() < deadline, f"job never started: {job}"
            time.sleep(0.02)
        # Another size, so none of them joins the running batch.
        queued = []
        for i in range(QUEUE_SIZE):
            resp = c.post("/v1/generations", json={"prompt": f"wait {i}", **SMALL}, headers=ASYNC)
            assert resp.status_code == 202, resp.text
            queued.append(resp.json()["id"])
        assert c.get(f"/v1/jobs/{running}").json()["status"] == "running"
        assert [c.get(f"/v1/jobs/{j}").json()["status"] for j in queued] == ["queued"] * QUEUE_SIZE

    sigterm_at = time.time()
    first.proc.send_signal(signal.SIGTERM)
    first.proc.wait(DEADLINE_S * 2)  # exits by itself, once the running job is done
    stopped_at = time.time()
    assert "Traceback" not in first.log()

    # What the first process left in the store, read before anything else can touch it.
    store = SqliteJobStore(first.data_dir / "jobs.sqlite3")
    try:
        record = store.get(running)
        assert record is not None and record.status == JobStatus.succeeded, record
        assert record.finished is not None and record.finished > sigterm_at, "finished before SIGTERM: tested nothing"
        assert [store.get(j).status for j in queued] == [JobStatus.queued] * QUEUE_SIZE  # type: ignore[union-attr]
        assert [(first.data_dir / "images" / img.key).is_file() for img in record.images] == [True]
    finally:
        store.close()

    second = start_server(first.data_dir, env=OPS_ENV)
    ops.append(second)
    with httpx.Client(base_url=second.url, timeout=TIMEOUT) as c:
        for job_id in queued:
            job = wait_done(c, job_id)
            assert job["status"] == "succeeded", job
            assert job["started"] > stopped_at  # run by the second process, not rushed by the first
            assert c.get(job["images"][0]["url"]).status_code == 200
        assert c.get(f"/v1/jobs/{running}").json()["status"] == "succeeded"
