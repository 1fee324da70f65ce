"""Async jobs against a real server process on loopback: bounded queue, cancel, SSE, webhooks,
idempotency, and recovery after kill -9.

One server with a queue of three, a 0.2 s sync timeout and webhooks allowed to 127.0.0.1 serves every
test here; each test leaves the engine idle. A "blocker" is a long job held running until a test
cancels it, so that what queues behind it is deterministic without any timing assumption. The crash
test runs last: it kills that server and restarts it on the same data directory. The test of a
webhook owed at a crash starts servers of its own.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from sdgate.jobs.webhooks import SIGNATURE_HEADER, verify
from tests import background
from tests.server import ServerProcess, start_server

QUEUE_SIZE = 3
SECRET = "e2e-webhook-secret"
DEADLINE_S = 120.0  # generous: only a hung job or a badly overloaded machine gets near it
ASYNC = {"Prefer": "respond-async"}
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}
# Many seconds of work: stays running while a test acts on it, then the test cancels it.
BLOCKER = {"width": 256, "height": 256, "num_inference_steps": 150}
TERMINAL = ("succeeded", "failed", "canceled")

Job = dict[str, Any]


JOBS_ENV = {
    "SDGATE_QUEUE_SIZE": str(QUEUE_SIZE),
    "SDGATE_SYNC_TIMEOUT": "0.2",
    "SDGATE_WEBHOOK_SECRET": SECRET,
    "SDGATE_WEBHOOK_ALLOW": "127.0.0.1",
    "SDGATE_WEBHOOK_BACKOFF_S": "0.05",
    # One OpenMP thread: on a shared two-core machine a two-thread team slows ~10x whenever another
    # process computes, and these tests wait on real steps.
    "OMP_NUM_THREADS": "1",
}


def _jobs_server() -> ServerProcess:
    return start_server(background.workdir("jobs-server"), env=JOBS_ENV)


WEBHOOK_OWED_ENV = {**JOBS_ENV, "SDGATE_WEBHOOK_BACKOFF_S": "600"}
"""The kill -9 webhook test's servers: a retry delay of ten minutes keeps a failed delivery pending."""


def _webhook_owed_server() -> ServerProcess:
    """The first of that test's servers, on a data directory of its own (the receiver is named per job)."""
    return start_server(background.workdir("jobs-webhook-owed") / "data", env=WEBHOOK_OWED_ENV)


background.needs(__file__, jobs_server=_jobs_server, jobs_webhook_owed=_webhook_owed_server)


@pytest.fixture(scope="module")
def servers() -> Iterator[list[ServerProcess]]:
    """The module's server processes, the current one last: the crash test replaces it with a restart."""
    started: list[ServerProcess] = [background.take("jobs_server", _jobs_server)]
    yield started
    for srv in started:
        srv.stop()


@pytest.fixture
def jobs_server(servers: list[ServerProcess]) -> ServerProcess:
    return servers[-1]


@pytest.fixture
def client(jobs_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=jobs_server.url, timeout=DEADLINE_S) as c:
        yield c


# -- helpers ---------------------------------------------------------------------------------------


def submit(client: httpx.Client, body: dict[str, Any], **headers: str) -> Job:
    """POST an async generation that must be accepted; returns the job from the 202."""
    resp = client.post("/v1/generations", json=body, headers={**ASYNC, **headers})
    assert resp.status_code == 202, resp.text
    job: Job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    return job


def get_job(client: httpx.Client, job_id: str) -> Job:
    resp = client.get(f"/v1/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    job: Job = resp.json()
    return job


def wait_for(
    client: httpx.Client, job_id: str, done: Callable[[Job], bool], what: str, *, may_end_first: bool = False
) -> Job:
    """Poll the job until ``done``; fail clearly if it ends otherwise or takes longer than DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        job = get_job(client, job_id)
        if done(job):
            return job
        if job["status"] in TERMINAL and not may_end_first:
            pytest.fail(f"job {job_id} ended {job['status']} before it was {what}: {job}")
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} not {what} after {DEADLINE_S:.0f} s; last seen: {job}")
        time.sleep(0.05)


def wait_terminal(client: httpx.Client, job_id: str) -> Job:
    return wait_for(client, job_id, lambda j: j["status"] in TERMINAL, "finished")


def start_blocker(client: httpx.Client, min_step: int = 0) -> str:
    """A long job, running (past ``min_step``) when this returns. Cancel it to free the engine."""
    job_id: str = submit(client, {"prompt": "blocker", **BLOCKER})["id"]
    wait_for(client, job_id, lambda j: j["status"] == "running" and j["progress"]["step"] >= min_step, "running")
    return job_id


def cancel(client: httpx.Client, job_id: str) -> Job:
    resp = client.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 200, resp.text
    job: Job = resp.json()
    return job


def assert_error(resp: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert err["type"] == error_type
    assert isinstance(err["message"], str) and err["message"]
    return err


def all_jobs(client: httpx.Client, limit: int = 100) -> list[Job]:
    """Every job, newest first, following ``next_before`` page by page."""
    jobs: list[Job] = []
    params: dict[str, Any] = {"limit": limit}
    for _ in range(1000):
        resp = client.get("/v1/jobs", params=params)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        assert page["object"] == "list"
        assert len(page["data"]) <= limit
        jobs += page["data"]
        if page["next_before"] is None:
            return jobs
        params["before"] = page["next_before"]
    pytest.fail("GET /v1/jobs paging did not end")


def assert_images_downloadable(job: Job) -> None:
    """Every image of a succeeded job is there, with the size and type its record says."""
    assert job["status"] == "succeeded", job
    assert job["images"], job
    for img in job["images"]:
        got = httpx.get(img["url"], timeout=DEADLINE_S)
        assert got.status_code == 200, f"{img['url']} of job {job['id']}: {got.status_code}"
        assert got.headers["content-type"] == img["content_type"]
        assert len(got.content) == img["bytes"]


Event = tuple[str, Job]


def parse_events(lines: Iterator[str]) -> Iterator[Event]:
    """Server-sent events, strictly ``event: NAME`` then ``data: JSON`` then a blank line."""
    block: list[str] = []
    deadline = time.monotonic() + DEADLINE_S
    for line in lines:
        assert time.monotonic() < deadline, f"event stream still open after {DEADLINE_S:.0f} s"
        if line:
            block.append(line)
            continue
        if block and not block[0].startswith(":"):  # ":" lines are keep-alive comments
            assert len(block) == 2, block
            assert block[0].startswith("event: ") and block[1].startswith("data: "), block
            yield block[0].removeprefix("event: "), json.loads(block[1].removeprefix("data: "))
        block = []
    assert not block, f"stream ended inside an event: {block}"


@contextmanager
def event_stream(client: httpx.Client, job_id: str) -> Iterator[Iterator[Event]]:
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        yield parse_events(resp.iter_lines())


# -- queue ----------------------------------------------------------------------------------------


def test_twenty_jobs_against_a_queue_of_three_are_accepted_or_refused_and_none_is_lost(
    client: httpx.Client,
) -> None:
    before = {j["id"] for j in all_jobs(client)}
    blocker = start_blocker(client)  # holds the engine: what is accepted now waits in the queue

    def post(i: int) -> httpx.Response:
        body = {"prompt": f"flood {i}", **SMALL, "seed": i}
        return client.post("/v1/generations", json=body, headers=ASYNC)

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(post, range(20)))

    accepted: list[Job] = []
    for resp in answers:
        if resp.status_code == 202:
            job = resp.json()
            assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
            assert job["status"] == "queued"
            assert job["images"] == []
            accepted.append(job)
        else:
            assert_error(resp, 429, "busy")
            assert int(resp.headers["retry-after"]) >= 1
    assert len(accepted) == QUEUE_SIZE, [r.status_code for r in answers]
    assert sorted(j["queue_position"] for j in accepted) == list(range(QUEUE_SIZE))
    assert len({j["id"] for j in accepted}) == QUEUE_SIZE

    cancel(client, blocker)
    finished = [wait_terminal(client, j["id"]) for j in accepted]

    for job in finished:
        assert job["status"] == "succeeded", job
        assert job["queue_position"] is None
        assert job["progress"]["step"] == job["progress"]["total_steps"] == SMALL["num_inference_steps"]
        assert_images_downloadable(job)
    listed = {j["id"]: j for j in all_jobs(client)}
    assert set(listed) - before == {blocker} | {j["id"] for j in accepted}, "a refused request left a job"
    assert all(listed[j["id"]]["status"] == "succeeded" for j in accepted)
    # The queue has drained: the server takes work again.
    assert wait_terminal(client, submit(client, {"prompt": "after the flood", **SMALL})["id"])["status"] == "succeeded"


# -- cancel ---------------------------------------------------------------------------------------


def test_cancel_a_queued_job_and_a_running_one(client: httpx.Client) -> None:
    blocker = start_blocker(client, min_step=1)

    # Queued behind the blocker: canceled at once, and never run.
    queued = submit(client, {"prompt": "never runs", **SMALL})
    assert queued["status"] == "queued"
    answer = cancel(client, queued["id"])
    assert answer["status"] == "canceled"
    assert answer["error"]["type"] == "canceled"
    assert get_job(client, queued["id"])["status"] == "canceled"

    # Running: stops at its next step. Its events show the step it ended on.
    with event_stream(client, blocker) as events:
        name, _ = next(events)
        assert name == "started"
        answer = cancel(client, blocker)
        assert answer["status"] == "running"  # it stops at the next step, not in the middle of one
        at_cancel = answer["progress"]["step"]
        rest = list(events)
    names = [n for n, _ in rest]
    assert names[-1] == "canceled" and names.count("canceled") == 1, names
    assert set(names[:-1]) <= {"progress"}, names
    end = rest[-1][1]
    assert end["status"] == "canceled"
    assert end["progress"]["total_steps"] == BLOCKER["num_inference_steps"]
    assert at_cancel <= end["progress"]["step"] < end["progress"]["total_steps"]
    # The step in flight when the cancel arrived may finish (and one more may be on its way to us); no more.
    assert end["progress"]["step"] <= at_cancel + 2, (at_cancel, end["progress"])

    done = get_job(client, blocker)
    assert done["status"] == "canceled"
    assert done["error"]["type"] == "canceled"
    assert done["images"] == []

    # The engine has moved past the canceled queued job: a later job runs, the canceled one did not.
    after = wait_terminal(client, submit(client, {"prompt": "runs", **SMALL})["id"])
    assert after["status"] == "succeeded"
    never = get_job(client, queued["id"])
    assert never["status"] == "canceled"
    assert never["started"] is None
    assert never["images"] == []

    # Finished jobs cannot be canceled; unknown ones are not found.
    assert_error(client.post(f"/v1/jobs/{blocker}/cancel"), 409, "conflict")
    assert_error(client.post(f"/v1/jobs/{after['id']}/cancel"), 409, "conflict")
    assert get_job(client, after["id"])["status"] == "succeeded"
    missing = uuid.uuid4().hex
    assert_error(client.post(f"/v1/jobs/{missing}/cancel"), 404, "not_found")
    assert_error(client.get(f"/v1/jobs/{missing}"), 404, "not_found")
    assert_error(client.get(f"/v1/jobs/{missing}/events"), 404, "not_found")


# -- server-sent events ---------------------------------------------------------------------------


def test_events_arrive_in_order_and_the_stream_closes_after_the_terminal_one(client: httpx.Client) -> None:
    steps = 6
    blocker = start_blocker(client)
    job = submit(client, {"prompt": "watched", "width": 64, "height": 64, "num_inference_steps": steps})

    with event_stream(client, job["id"]) as events:
        name, first = next(events)
        assert name == "queued"
        assert first["status"] == "queued" and first["queue_position"] == 0
        cancel(client, blocker)
        rest = list(events)  # ends only when the server closes the stream

    names = [n for n, _ in rest]
    assert names == ["started"] + ["progress"] * steps + ["succeeded"], names
    assert [d["progress"]["step"] for n, d in rest if n == "progress"] == list(range(1, steps + 1))
    assert all(d["progress"]["total_steps"] == steps for n, d in rest if n == "progress")
    assert rest[0][1]["status"] == "running"
    final = rest[-1][1]
    assert final["id"] == job["id"]
    assert_images_downloadable(final)  # URLs in events are absolute, like everywhere else

    # A finished job: just its terminal event, then the stream closes.
    with event_stream(client, job["id"]) as events:
        again = list(events)
    assert [n for n, _ in again] == ["succeeded"]
    assert again[0][1]["images"] == final["images"]
    with event_stream(client, blocker) as events:
        assert [n for n, _ in events] == ["canceled"]


# -- webhooks -------------------------------------------------------------------------------------


class Receiver:
    """A webhook receiver on loopback that answers ``failures`` 500s, then 200; it checks every signature."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = 500 if len(receiver.calls) < receiver.failures else 200
                signature = self.headers.get(SIGNATURE_HEADER, "")
                receiver.calls.append(
                    {"status": status, "body": body, "verified": verify(body, signature, SECRET), "sig": signature}
                )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rx = Receiver(failures=2)
    yield rx
    rx.close()


def test_webhook_is_signed_retried_and_delivered_exactly_once(client: httpx.Client, receiver: Receiver) -> None:
    job = submit(client, {"prompt": "hooked", **SMALL, "webhook_url": receiver.url})
    assert job["webhook"] == {"url": receiver.url, "delivered": False, "attempts": []}

    # Delivery follows the job's end; the record shows the attempts once it is over.
    done = wait_for(
        client, job["id"], lambda j: bool(j["webhook"]["attempts"]), "through webhook delivery", may_end_first=True
    )

    assert done["status"] == "succeeded"
    assert done["webhook"]["delivered"] is True
    attempts = done["webhook"]["attempts"]
    assert [a.get("status") for a in attempts] == [500, 500, 200], attempts
    assert [a["at"] for a in attempts] == sorted(a["at"] for a in attempts)

    calls = receiver.calls
    assert [c["status"] for c in calls] == [500, 500, 200]
    assert all(c["verified"] for c in calls), "a delivery was not signed with SDGATE_WEBHOOK_SECRET"
    assert not verify(calls[-1]["body"], calls[-1]["sig"], "another-secret")
    assert len({c["body"] for c in calls}) == 1, "retries must send the same payload"
    delivered = json.loads(calls[-1]["body"])
    assert delivered["id"] == job["id"]
    assert delivered["status"] == "succeeded"
    assert len(delivered["images"]) == 1
    # The receiver is not the client: the image URL must work from anywhere, not be a relative path.
    assert delivered["images"][0]["url"].startswith("http://127.0.0.1:")
    assert httpx.get(delivered["images"][0]["url"], timeout=30).status_code == 200


def test_webhook_to_loopback_is_refused_by_default(server: ServerProcess) -> None:
    """The shared default server has no SDGATE_WEBHOOK_ALLOW: private and loopback targets are 422."""
    for url in ("http://127.0.0.1:9/hook", "http://localhost:9/hook", "http://169.254.169.254/latest/meta-data/"):
        resp = httpx.post(
            f"{server.url}/v1/generations",
            json={"prompt": "x", **SMALL, "webhook_url": url},
            headers=ASYNC,
            timeout=DEADLINE_S,
        )
        err = assert_error(resp, 422, "invalid_request")
        assert err["field"] == "webhook_url", err
        assert "SDGATE_WEBHOOK_ALLOW" in err["message"]


def test_webhook_allow_list_opens_only_what_it_names(client: httpx.Client) -> None:
    before = len(all_jobs(client))
    for url in ("http://127.0.0.2:9/hook", "http://169.254.169.254/latest/meta-data/", "ftp://127.0.0.1/hook"):
        resp = client.post("/v1/generations", json={"prompt": "x", **SMALL, "webhook_url": url}, headers=ASYNC)
        assert assert_error(resp, 422, "invalid_request")["field"] == "webhook_url"
    assert len(all_jobs(client)) == before, "a refused request was recorded as a job"


# -- idempotency, sync timeout, listing -----------------------------------------------------------


def test_idempotency_key_returns_the_same_job(client: httpx.Client) -> None:
    before = {j["id"] for j in all_jobs(client)}
    key = {"Idempotency-Key": f"order-{uuid.uuid4().hex}"}
    body = {"prompt": "exactly once", **SMALL, "seed": 11}

    first = submit(client, body, **key)
    again = submit(client, body, **key)
    assert again["id"] == first["id"]

    changed = client.post("/v1/generations", json={**body, "seed": 12}, headers={**ASYNC, **key})
    assert assert_error(changed, 422, "invalid_request")["field"] == "Idempotency-Key"

    done = wait_terminal(client, first["id"])
    assert done["status"] == "succeeded"
    # After it finished: still the same job, sync or async, with the same images.
    assert submit(client, body, **key)["id"] == first["id"]
    sync = client.post("/v1/generations", json=body, headers=key)
    assert sync.status_code == 200, sync.text
    assert sync.json()["id"] == first["id"]
    assert sync.json()["images"] == done["images"]

    other = submit(client, body, **{"Idempotency-Key": f"order-{uuid.uuid4().hex}"})
    assert other["id"] != first["id"]
    wait_terminal(client, other["id"])
    assert {j["id"] for j in all_jobs(client)} - before == {first["id"], other["id"]}


def test_sync_request_that_outlasts_the_sync_timeout_answers_202_and_finishes(client: httpx.Client) -> None:
    blocker = start_blocker(client)  # the request waits behind it, well past SDGATE_SYNC_TIMEOUT=0.2
    resp = client.post("/v1/generations", json={"prompt": "patient", **SMALL})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["images"] == []
    cancel(client, blocker)
    done = wait_terminal(client, job["id"])
    assert done["status"] == "succeeded"
    assert_images_downloadable(done)


def test_job_list_pages_with_next_before_without_duplicates(client: httpx.Client) -> None:
    new = [submit(client, {"prompt": f"page {i}", **SMALL})["id"] for i in range(QUEUE_SIZE)]
    for job_id in new:
        wait_terminal(client, job_id)

    one_page = all_jobs(client, limit=100)
    paged = all_jobs(client, limit=2)
    ids = [j["id"] for j in paged]
    assert len(ids) == len(set(ids)), "a job appeared on two pages"
    assert ids == [j["id"] for j in one_page]
    assert set(new) <= set(ids)
    assert ids[:QUEUE_SIZE] == new[::-1], "newest first"
    created = [j["created"] for j in paged]
    assert created == sorted(created, reverse=True)

    for bad in (0, 101):
        assert assert_error(client.get("/v1/jobs", params={"limit": bad}), 422, "invalid_request")["field"] == "limit"


# -- crash and restart (last: it replaces the module's server) ------------------------------------


def test_jobs_running_and_queued_at_kill_9_finish_after_restart(servers: list[ServerProcess]) -> None:
    """Nothing accepted is lost: kill -9 with one job running and a full queue, restart on the same data dir.

    (A job interrupted twice ends ``failed`` with type ``interrupted``; that path is covered without
    three server starts in tests/unit/test_jobstore_recovery.py.)
    """
    first = servers[-1]
    with httpx.Client(base_url=first.url, timeout=DEADLINE_S) as client:
        # Long enough to be still running at the kill on a fast, busy machine: at 30 steps it once
        # finished in the 1.4 s the queue took to fill, and was never run again.
        running = submit(client, {"prompt": "cut short", "width": 128, "height": 128, "num_inference_steps": 80})
        wait_for(client, running["id"], lambda j: j["status"] == "running" and j["progress"]["step"] >= 1, "running")
        queued = [submit(client, {"prompt": f"waiting {i}", **SMALL})["id"] for i in range(QUEUE_SIZE)]
        assert [get_job(client, j)["status"] for j in queued] == ["queued"] * QUEUE_SIZE
        assert get_job(client, running["id"])["status"] == "running"
        killed_at = time.time()
        first.kill()
    assert first.proc.returncode == -signal.SIGKILL

    second = start_server(first.data_dir, env=JOBS_ENV)
    servers.append(second)
    with httpx.Client(base_url=second.url, timeout=DEADLINE_S) as client:
        for job_id in [running["id"], *queued]:
            job = wait_terminal(client, job_id)
            # Interrupted once, or never started: run again from the start rather than given up on.
            assert job["status"] == "succeeded", job
            assert job["progress"]["step"] == job["progress"]["total_steps"]
        # The running job was run again by the new process, not just marked done.
        rerun = get_job(client, running["id"])
        assert rerun["started"] > killed_at
        assert len(rerun["images"]) == 1

        # Every job this data directory ever accepted is finished, and none points at a missing image.
        everything = all_jobs(client)
        assert {running["id"], *queued} <= {j["id"] for j in everything}
        for job in everything:
            assert job["status"] in TERMINAL, f"job {job['id']} stayed {job['status']} after the restart"
            if job["status"] == "succeeded":
                assert_images_downloadable(job)


def test_webhook_owed_at_kill_9_is_delivered_once_after_restart() -> None:
    """The job ended, its webhook was still being retried when the server died: the next start delivers it.

    Its own servers and data directory: the first delivery attempt gets a 500, and a retry delay of
    ten minutes keeps the delivery pending until the kill. A delivered webhook is not sent again.
    """
    receiver = Receiver(failures=1)
    env = WEBHOOK_OWED_ENV
    servers = [background.take("jobs_webhook_owed", _webhook_owed_server)]
    try:
        first = servers[0]
        with httpx.Client(base_url=first.url, timeout=DEADLINE_S) as client:
            job_id = submit(client, {"prompt": "owed a webhook", **SMALL, "webhook_url": receiver.url})["id"]
            done = wait_for(client, job_id, lambda j: j["status"] == "succeeded", "succeeded")
            deadline = time.monotonic() + DEADLINE_S
            while not receiver.calls:
                assert time.monotonic() < deadline, "no webhook attempt before the kill"
                time.sleep(0.05)
            pending = get_job(client, job_id)
            assert pending["webhook"] == {"url": receiver.url, "delivered": False, "attempts": []}, pending
            first.kill()
        assert [c["status"] for c in receiver.calls] == [500]

        second = start_server(first.data_dir, env=env)
        servers.append(second)
        with httpx.Client(base_url=second.url, timeout=DEADLINE_S) as client:
            after = wait_for(
                client, job_id, lambda j: j["webhook"]["delivered"], "delivered after the restart", may_end_first=True
            )
        assert [a.get("status") for a in after["webhook"]["attempts"]] == [200]
        assert f"job {job_id}: webhook delivery interrupted by a restart" in second.log()
        assert [c["status"] for c in receiver.calls] == [500, 200]
        call = receiver.calls[-1]
        assert call["verified"], "the delivery after the restart was not signed"
        payload = json.loads(call["body"])
        assert (payload["id"], payload["status"]) == (job_id, "succeeded")
        assert payload["images"] and len(payload["images"]) == len(done["images"])
        for img in payload["images"]:
            # Absolute, with the base URL of the original request; the image is there after the restart.
            url = urlsplit(img["url"])
            assert url.scheme == "http" and url.hostname == "127.0.0.1", img["url"]
            assert httpx.get(second.url + url.path, timeout=DEADLINE_S).status_code == 200

        second.stop()
        third = start_server(first.data_dir, env=env)
        servers.append(third)
        # Recovery runs before the server is ready: by now it has decided, and it owes nothing.
        assert "webhook delivery interrupted" not in third.log()
        time.sleep(0.5)
        assert len(receiver.calls) == 2, "a delivered webhook was sent again after a restart"
        with httpx.Client(base_url=third.url, timeout=DEADLINE_S) as client:
            assert get_job(client, job_id)["webhook"] == after["webhook"]
    finally:
        for srv in servers:
            srv.stop()
        receiver.close()
