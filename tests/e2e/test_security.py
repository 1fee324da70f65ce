"""Access control of a real ``sdgate serve`` process with keys required (``SDGATE_AUTH=on``).

Keys are made by the real ``sdgate keys`` CLI before the server starts (and one is revoked while it
runs). The server runs in SageMaker mode, so that ``/invocations`` is open as in a SageMaker
container while everything else keeps needing a key. Covers: 401/403 and their shape, both header
forms, jobs private to their key, what stays open, per-key rate limits and daily quotas (persisted
across a restart), junk in the auth, request-id and idempotency headers, and traversal on /images.
(Traversal with keys off is covered in depth by test_core_api.py.)
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests import background
from tests.apikeys import create_key, keys_cli
from tests.server import ServerProcess, start_server

SMALL: dict[str, Any] = {"width": 64, "height": 64, "num_inference_steps": 1}
ASYNC = {"Prefer": "respond-async"}
TIMEOUT = 60
TERMINAL = ("succeeded", "failed", "canceled")


@dataclass
class Keys:
    a: str
    b: str
    limited: str  # --rate 3
    quota: str  # --quota 2
    doomed: str  # revoked by a test while the server runs


@dataclass
class Secured:
    server: ServerProcess
    keys: Keys


def _secured() -> Secured:
    data_dir = background.workdir("secured")
    keys = Keys(
        a=create_key(data_dir, "alice"),
        b=create_key(data_dir, "bob"),
        limited=create_key(data_dir, "limited", "--rate", "3"),
        quota=create_key(data_dir, "quota", "--quota", "2"),
        doomed=create_key(data_dir, "doomed"),
    )
    return Secured(start_server(data_dir, env=SECURED_ENV), keys)


background.needs(__file__, security_secured=_secured)


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    """The module's server, made while the modules before this one ran (tests/background.py)."""
    secured: Secured = background.take("security_secured", _secured)
    yield secured
    secured.server.stop()  # the one running now: a test restarts it


# SDGATE_HOST/PORT are set by start_server, so SageMaker mode keeps the loopback port.
SECURED_ENV = {"SDGATE_AUTH": "on", "SDGATE_SAGEMAKER": "1", "SDGATE_MAX_BATCH_WAIT_MS": "0"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def client(srv: ServerProcess, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=TIMEOUT, headers=bearer(key) if key else None)


def assert_error(resp: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert resp.status_code == status, f"{resp.status_code} {resp.text[:300]}"
    body: dict[str, Any] = resp.json()
    assert body["error"]["type"] == type_, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body


def submit(c: httpx.Client, prompt: str = "a fox", **fields: Any) -> dict[str, Any]:
    resp = c.post("/v1/generations", json={"prompt": prompt, **SMALL, **fields}, headers=ASYNC)
    assert resp.status_code == 202, resp.text
    job: dict[str, Any] = resp.json()
    return job


def wait_done(c: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        job: dict[str, Any] = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} still {job['status']} after {TIMEOUT} s")
        time.sleep(0.05)


def raw_request(srv: ServerProcess, head: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    """Send request bytes exactly as given (httpx refuses what we want to try); status, headers, body."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head_part, _, rest = data.partition(b"\r\n\r\n")
        lines = head_part.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        length = int(headers.get("content-length", ["0"])[0])
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest


# -- 401 and 403 ----------------------------------------------------------------------------------


def test_no_key_is_401_in_the_error_shape_with_www_authenticate(secured: Secured) -> None:
    with client(secured.server) as c:
        for resp in (
            c.post("/v1/generations", json={"prompt": "a fox", **SMALL}),
            c.get("/v1/jobs"),
            c.get("/v1/models"),
            c.post("/text2image", json={"text": "a fox"}),
        ):
            body = assert_error(resp, 401, "unauthorized")
            assert resp.headers["www-authenticate"] == "Bearer"
            assert "X-API-Key" in body["error"]["message"]  # says how to send one


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer sdg_deadbeef_notarealsecretatall"},  # unknown id
        {"X-API-Key": "sdg_deadbeef_notarealsecretatall"},
        {"Authorization": "Bearer not-even-the-format"},
        {"Authorization": "Bearer sdg_a_b_c"},  # four parts
        {"Authorization": "Bearer sdg__"},
        {"Authorization": "Bearer"},  # a bearer without a key, no X-API-Key: no key at all
        {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
        {"X-API-Key": ""},
        {"X-API-Key": "x" * 4000},
        {"X-API-Key": "sdg_" + "0" * 2000 + "_secret"},
        {"X-API-Key": "sdg_%00_\tx"},
    ],
    ids=lambda h: repr(h)[:40],
)
def test_wrong_malformed_or_junk_keys_are_401_never_500(secured: Secured, headers: dict[str, str]) -> None:
    resp = httpx.get(f"{secured.server.url}/v1/jobs", headers=headers, timeout=TIMEOUT)
    assert_error(resp, 401, "unauthorized")
    assert resp.headers["www-authenticate"] == "Bearer"


def test_a_real_key_id_with_another_keys_secret_is_401(secured: Secured) -> None:
    _, a_id, _ = secured.keys.a.split("_")
    _, _, b_secret = secured.keys.b.split("_")
    for forged in (f"sdg_{a_id}_{b_secret}", secured.keys.a[:-1], secured.keys.a + "x", secured.keys.a.upper()):
        resp = httpx.get(f"{secured.server.url}/v1/jobs", headers=bearer(forged), timeout=TIMEOUT)
        assert_error(resp, 401, "unauthorized")


def test_non_ascii_and_control_bytes_in_key_headers_are_401_never_500(secured: Secured) -> None:
    for value in (b"sdg_\xff\xfe_\xe9t\xe9", b"\x01\x02\x03", "Bearer caf\u00e9".encode("latin-1")):
        for name in (b"X-API-Key", b"Authorization"):
            status, _, body = raw_request(
                secured.server,
                b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n" + name + b": " + value + b"\r\nConnection: close\r\n\r\n",
            )
            # The HTTP parser may refuse control bytes (400) before sdgate sees them; never a 500.
            assert status in (400, 401), (name, value, status, body[:200])


def test_both_header_forms_work(secured: Secured) -> None:
    url = f"{secured.server.url}/v1/jobs"
    key = secured.keys.a
    for headers in ({"Authorization": f"Bearer {key}"}, {"authorization": f"bearer {key}"}, {"X-API-Key": key}):
        resp = httpx.get(url, headers=headers, timeout=TIMEOUT)
        assert resp.status_code == 200, (headers.keys(), resp.text)


def test_a_key_revoked_by_the_cli_while_the_server_runs_is_403(secured: Secured) -> None:
    with client(secured.server, secured.keys.doomed) as c:
        assert c.get("/v1/jobs").status_code == 200
        out = keys_cli(secured.server.data_dir, "revoke", "doomed").stdout
        assert "revoked 1" in out
        body = assert_error(c.get("/v1/jobs"), 403, "forbidden")
        assert "revoked" in body["error"]["message"]
        assert_error(c.post("/v1/generations", json={"prompt": "a fox", **SMALL}), 403, "forbidden")
    # and through the other header form too
    resp = httpx.get(f"{secured.server.url}/v1/jobs", headers={"X-API-Key": secured.keys.doomed}, timeout=TIMEOUT)
    assert_error(resp, 403, "forbidden")


def test_keys_list_shows_ids_and_names_never_keys(secured: Secured) -> None:
    out = keys_cli(secured.server.data_dir, "list").stdout
    k = secured.keys
    for key, name in ((k.a, "alice"), (k.b, "bob"), (k.limited, "limited"), (k.quota, "quota")):
        _, key_id, secret = key.split("_")
        assert re.search(rf"^{key_id}\s+active\b.*\b{name}$", out, re.M), out
        assert secret not in out and key not in out
    assert "rate=3/min" in out and "quota=2/day" in out
    # revoked (by the test above, or here when run alone)
    keys_cli(secured.server.data_dir, "revoke", "doomed")
    _, doomed_id, doomed_secret = k.doomed.split("_")
    assert re.search(rf"^{doomed_id}\s+revoked\b", keys_cli(secured.server.data_dir, "list").stdout, re.M)
    assert doomed_secret not in out


# -- jobs belong to their key ---------------------------------------------------------------------


def test_a_key_cannot_see_or_touch_another_keys_jobs(secured: Secured) -> None:
    srv = secured.server
    with client(srv, secured.keys.a) as alice, client(srv, secured.keys.b) as bob:
        job = submit(alice, "alice's private fox")
        job_id = job["id"]
        # To bob the job does not exist: exactly the answer for a made-up id.
        for resp in (
            bob.get(f"/v1/jobs/{job_id}"),
            bob.post(f"/v1/jobs/{job_id}/cancel"),
            bob.get(f"/v1/jobs/{job_id}/events"),
        ):
            body = assert_error(resp, 404, "not_found")
            assert "alice" not in resp.text
        assert bob.get(f"/v1/jobs/{'0' * 32}").json()["error"]["type"] == "not_found"
        assert job_id not in {j["id"] for j in bob.get("/v1/jobs", params={"limit": 100}).json()["data"]}
        # Idempotency keys are per key too: bob's same key makes bob's own job.
        same = {"Idempotency-Key": "shared-key-1", **ASYNC}
        a_job = alice.post("/v1/generations", json={"prompt": "x", **SMALL}, headers=same).json()
        b_job = bob.post("/v1/generations", json={"prompt": "x", **SMALL}, headers=same).json()
        assert a_job["id"] != b_job["id"]

        done = wait_done(alice, job_id)
        assert done["status"] == "succeeded"
        mine = {j["id"] for j in alice.get("/v1/jobs", params={"limit": 100}).json()["data"]}
        assert {job_id, a_job["id"]} <= mine and b_job["id"] not in mine
        for other in (a_job["id"], b_job["id"]):
            wait_done(alice if other == a_job["id"] else bob, other)
        body = bob.get(f"/v1/jobs/{job_id}").json()
        assert body["error"]["type"] == "not_found"  # finished jobs stay private too


def test_health_docs_metrics_and_images_stay_open(secured: Secured) -> None:
    srv = secured.server
    with client(srv, secured.keys.a) as alice:
        job = wait_done(alice, submit(alice)["id"])
    image_url = job["images"][0]["url"]
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as anon:
        for path in ("/healthz", "/readyz", "/ping", "/metrics", "/docs", "/openapi.json"):
            assert anon.get(path).status_code == 200, path
        img = anon.get(image_url)
        assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
        assert img.content[:2] == b"\xff\xd8"
        # open does not mean everything: the job behind the image is still private
        assert_error(anon.get(f"/v1/jobs/{job['id']}"), 401, "unauthorized")


# -- traversal and header junk --------------------------------------------------------------------


def test_traversal_from_the_open_images_prefix_reaches_nothing_guarded(secured: Secured) -> None:
    """/images/ is open; a path that climbs out of it must not reach a guarded route or a file."""
    targets = [
        b"/images/../v1/jobs",
        b"/images/..%2fv1%2fjobs",
        b"/images/%2e%2e/v1/jobs",
        b"/images/%2e%2e%2f%2e%2e%2fkeys.sqlite3",
        b"/images/../keys.sqlite3",
        b"/images/..%5ckeys.sqlite3",
        b"/images/..\\..\\keys.sqlite3",
        b"/images/%2Fetc%2Fpasswd",
        b"/images//etc/passwd",
        b"/images/C:%5cWindows%5cwin.ini",
        b"/images/keys.sqlite3%00.jpeg",
        b"/images/%00",
    ]
    for target in targets:
        status, _, body = raw_request(
            secured.server, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert status in (400, 404), (target, status, body[:200])
        assert b"SQLite format" not in body and b"root:" not in body and b'"data"' not in body, target


def test_request_ids_that_could_inject_or_flood_are_replaced(secured: Secured) -> None:
    srv = secured.server
    generated = re.compile(r"^[0-9a-f]{32}$")
    kept = "client-id_1.2"
    assert httpx.get(f"{srv.url}/healthz", headers={"X-Request-Id": kept}).headers["x-request-id"] == kept
    for value in ("x" * 65, "a b", "<script>", "abc%0d%0aSet-Cookie:%20x=1", "id;rm -rf", "ünïcode".encode()):
        resp = httpx.get(
            f"{srv.url}/healthz", headers=[(b"X-Request-Id", value if isinstance(value, bytes) else value.encode())]
        )
        assert generated.match(resp.headers["x-request-id"]), (value, resp.headers["x-request-id"])
    # Bytes httpx will not send: a bare CR, a NUL, a folded line, an attempt to split the header.
    for value in (b"abc\rSet-Cookie: x=1", b"abc\x00def", b"abc\r\n Set-Cookie: x=1", b"abc\r\nSet-Cookie: x=1"):
        status, headers, _ = raw_request(
            srv, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: " + value + b"\r\nConnection: close\r\n\r\n"
        )
        if status == 400:  # refused by the HTTP parser: nothing reached sdgate
            continue
        assert status == 200, (value, status)
        assert "set-cookie" not in headers, value
        [rid] = headers["x-request-id"]
        assert generated.match(rid) or rid == "abc", (value, rid)


@pytest.mark.parametrize(
    "idempotency_key",
    ["", "a key with spaces", "../../etc/passwd", "'; DROP TABLE jobs; --", "k" * 255, "%00%0d%0a", "ключ".encode()],
    ids=["empty", "spaces", "traversal", "sql", "255-chars", "escapes", "utf8"],
)
def test_odd_idempotency_keys_are_just_keys(secured: Secured, idempotency_key: str | bytes) -> None:
    with client(secured.server, secured.keys.b) as c:
        headers = {"Idempotency-Key": idempotency_key, **ASYNC}
        first = c.post("/v1/generations", json={"prompt": "same", **SMALL}, headers=headers)  # type: ignore[arg-type]
        assert first.status_code == 202, first.text
        again = c.post("/v1/generations", json={"prompt": "same", **SMALL}, headers=headers)  # type: ignore[arg-type]
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
        other = c.post("/v1/generations", json={"prompt": "other", **SMALL}, headers=headers)  # type: ignore[arg-type]
        assert_error(other, 422, "invalid_request")


def test_an_idempotency_key_over_255_characters_is_422(secured: Secured) -> None:
    with client(secured.server, secured.keys.b) as c:
        resp = c.post("/v1/generations", json={"prompt": "x", **SMALL}, headers={"Idempotency-Key": "k" * 256})
        assert_error(resp, 422, "invalid_request")


# -- limits ---------------------------------------------------------------------------------------


def test_the_keys_own_rate_limit_answers_429_with_retry_after(secured: Secured) -> None:
    with client(secured.server, secured.keys.limited) as c:
        jobs = [submit(c, f"allowed {i}")["id"] for i in range(3)]
        resp = c.post("/v1/generations", json={"prompt": "one too many", **SMALL}, headers=ASYNC)
        body = assert_error(resp, 429, "rate_limited")
        assert "3 requests per minute" in body["error"]["message"]
        assert 1 <= int(resp.headers["retry-after"]) <= 60
        # reading is not limited, and the accepted jobs all finish
        assert all(wait_done(c, j)["status"] == "succeeded" for j in jobs)
    # another key is not affected
    with client(secured.server, secured.keys.a) as alice:
        assert wait_done(alice, submit(alice)["id"])["status"] == "succeeded"


def test_the_daily_quota_answers_429_once_used_up(secured: Secured) -> None:
    with client(secured.server, secured.keys.quota) as c:
        assert_error(c.post("/v1/generations", json={"prompt": "x", **SMALL, "num_images": 3}), 429, "rate_limited")
        ok = c.post("/v1/generations", json={"prompt": "two at once", **SMALL, "num_images": 2})
        assert ok.status_code == 200, ok.text
        resp = c.post("/v1/generations", json={"prompt": "one more", **SMALL})
        body = assert_error(resp, 429, "rate_limited")
        assert "daily quota of 2 images" in body["error"]["message"]
        assert int(resp.headers["retry-after"]) > 0


# -- SageMaker mode -------------------------------------------------------------------------------


def test_sagemaker_mode_opens_ping_and_invocations_and_nothing_else(secured: Secured) -> None:
    with httpx.Client(base_url=secured.server.url, timeout=TIMEOUT) as anon:
        assert anon.get("/ping").json()["status"] == "Healthy"
        resp = anon.post(
            "/invocations",
            json={"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 1},
            headers={"Accept": "application/json;jpeg"},
        )
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["generated_images"]) == 1
        # The runtime path and the native API are not the container's route: they still need a key.
        runtime = anon.post("/endpoints/sdgate/invocations", json={"prompt": "x", "width": 64, "height": 64})
        assert runtime.status_code == 401, runtime.text
        assert_error(anon.post("/v1/generations", json={"prompt": "x", **SMALL}), 401, "unauthorized")


# -- persistence (last: restarts the server) ------------------------------------------------------


def test_the_daily_quota_survives_a_restart(secured: Secured) -> None:
    with client(secured.server, secured.keys.quota) as c:  # use it up (already, after the test above)
        statuses = [c.post("/v1/generations", json={"prompt": "use it up", **SMALL}).status_code for _ in range(3)]
        assert statuses[-1] == 429, statuses
    secured.server.stop()
    # Quotas are checked before the model is needed (async requests do not wait for it): no need
    # to wait for the model to load again.
    secured.server = start_server(secured.server.data_dir, env=SECURED_ENV, ready=False)
    try:
        with client(secured.server, secured.keys.quota) as c:
            resp = c.post("/v1/generations", json={"prompt": "after the restart", **SMALL}, headers=ASYNC)
            body = assert_error(resp, 429, "rate_limited")
            assert "daily quota" in body["error"]["message"]
        with client(secured.server, secured.keys.a) as alice:  # the other keys still work after the restart
            resp = alice.post("/v1/generations", json={"prompt": "x", **SMALL}, headers=ASYNC)
            assert resp.status_code == 202, resp.text
    finally:
        secured.server.kill()  # at once, rather than wait for the model it is loading


def test_keys_are_stored_hashed(secured: Secured) -> None:
    data = b"".join(p.read_bytes() for p in secured.server.data_dir.glob("keys.sqlite3*"))
    for key in (secured.keys.a, secured.keys.b):
        _, key_id, secret = key.split("_")
        assert key_id.encode() in data
        assert secret.encode() not in data and key.encode() not in data
