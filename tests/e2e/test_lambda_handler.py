"""``sdgate.aws.lambda_handler.handler`` driven with API Gateway proxy events, as Lambda drives it.

Everything it talks to is real and on loopback: the SageMaker endpoint is an ``sdgate serve
--sagemaker`` process (through ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``), S3 and DynamoDB are moto's
server (through ``AWS_ENDPOINT_URL_S3`` / ``_DYNAMODB``), and the Lambda service is a small loopback
implementation of its Invoke API (through ``AWS_ENDPOINT_URL_LAMBDA``) that answers an asynchronous
invocation with 202 and hands the worker event to another process, a "container" that shares
nothing with the API invocation but the table and the bucket. API events are handled in this
process, as Lambda calls a handler: REST API (v1) and HTTP API (v2) event shapes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlencode

import pytest

from sdgate.jobs.webhooks import SIGNATURE_HEADER, verify
from sdgate.storage import is_valid_key
from tests import background
from tests.aws_fixtures import FAKE_CREDENTIALS, FAST, REGION, jpeg_size, make_endpoint, objects, sidecar_object
from tests.server import ServerProcess, free_port

background.needs(__file__, endpoint=make_endpoint)

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_s3 import S3Client

CDN = "https://d111111abcdef8.cloudfront.net"
WORKER = "sdgate-worker"
SECRET = "lambda-webhook-secret"
URL = re.compile(rf"^{re.escape(CDN)}/images/(\d{{4}}/\d{{2}}/\d{{2}}/[0-9a-f]{{32}}\.jpeg)$")


# -- a loopback Lambda service ----------------------------------------------------------------------


@dataclass
class Invocation:
    function: str
    kind: str
    payload: dict[str, Any]
    result: dict[str, Any] | None = None
    returncode: int | None = None


@dataclass
class LambdaService:
    """``POST /2015-03-31/functions/{name}/invocations``: Event invocations run the handler in another process.

    ``hold`` keeps events queued (as Lambda's queue does under load) until :meth:`release`.
    """

    env: dict[str, str]
    log: TextIO
    url: str = ""
    hold: bool = False
    invocations: list[Invocation] = field(default_factory=list)
    _held: list[Invocation] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _container: subprocess.Popen[str] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                m = re.fullmatch(r"/2015-03-31/functions/([^/]+)/invocations", self.path.split("?")[0])
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                kind = self.headers.get("X-Amz-Invocation-Type", "RequestResponse")
                if m is None or kind != "Event":  # the gateway only ever invokes asynchronously
                    self.send_response(400)
                    self.end_headers()
                    return
                service.accept(Invocation(m.group(1), kind, json.loads(body)))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"

    def accept(self, invocation: Invocation) -> None:
        self.invocations.append(invocation)
        if self.hold:
            self._held.append(invocation)
        else:
            self._run_soon(invocation)

    def release(self) -> None:
        held, self._held = self._held, []
        for invocation in held:
            self._run_soon(invocation)
        self.join()

    def join(self) -> None:
        for t in self._threads:
            t.join(120)
        self._threads.clear()

    def _run_soon(self, invocation: Invocation) -> None:
        t = threading.Thread(target=self._run, args=(invocation,), daemon=True)
        self._threads.append(t)
        t.start()

    def _run(self, invocation: Invocation) -> None:
        # One warm container, reused event after event as Lambda reuses them (a cold start per event
        # would only make the tests slower); events that arrive together take turns.
        with self._lock:
            if self._container is None or self._container.poll() is not None:
                env = {k: v for k, v in os.environ.items() if not k.startswith("SDGATE_")}
                env.update(self.env)
                self._container = subprocess.Popen(
                    [sys.executable, "-c", _CONTAINER],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=self.log,
                    text=True,
                    env=env,
                )
            assert self._container.stdin is not None and self._container.stdout is not None
            self._container.stdin.write(json.dumps(invocation.payload) + "\n")
            self._container.stdin.flush()
            line = self._container.stdout.readline()
        if line:
            invocation.result, invocation.returncode = json.loads(line), 0
        else:
            invocation.returncode = self._container.wait(10)

    def stop(self) -> None:
        self.join()
        if self._container is not None and self._container.stdin is not None:
            self._container.stdin.close()
            self._container.wait(30)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# A Lambda container in miniature: the runtime calls the handler once per event, in one process.
_CONTAINER = """
import json, sys
from sdgate.aws.lambda_handler import handler

for line in sys.stdin:
    print(json.dumps(handler(json.loads(line), None)), flush=True)
"""


# -- a webhook receiver -----------------------------------------------------------------------------


class Receiver:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        calls = self.calls

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                calls.append({"body": body, "verified": verify(body, self.headers.get(SIGNATURE_HEADER, ""), SECRET)})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- API Gateway events -----------------------------------------------------------------------------


@dataclass
class Context:
    """The parts of the Lambda context the handler reads.

    By default more time than API Gateway allows, so that a slow, shared test machine cannot turn
    a synchronous answer into a 202; the long-request test gives an invocation a few seconds.
    """

    remaining_ms: int = 120_000
    function_name: str = "sdgate-api"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def rest_event(
    method: str,
    path: str,
    *,
    body: Any = None,
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    api_key_id: str | None = None,
    stage: str = "prod",
) -> dict[str, Any]:
    """A REST API (v1) proxy event, as API Gateway sends it through ``{proxy+}`` and the explicit routes."""
    hdrs = {"Host": "abc123.execute-api.us-east-1.amazonaws.com", "User-Agent": "curl/8.5.0", **(headers or {})}
    if body is not None:
        hdrs["Content-Type"] = "application/json"
    resource = "/v1/{proxy+}" if path.startswith("/v1/") else path
    identity = {"sourceIp": "203.0.113.7", "userAgent": "curl/8.5.0", "apiKeyId": api_key_id, "apiKey": None}
    return {
        "resource": resource,
        "path": path,
        "httpMethod": method,
        "headers": hdrs,
        "multiValueHeaders": {k: [v] for k, v in hdrs.items()},
        "queryStringParameters": query,
        "multiValueQueryStringParameters": {k: [v] for k, v in query.items()} if query else None,
        "pathParameters": {"proxy": path.removeprefix("/v1/")} if resource != path else None,
        "stageVariables": None,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abc123",
            "resourcePath": resource,
            "httpMethod": method,
            "path": f"/{stage}{path}",
            "stage": stage,
            "requestId": str(uuid.uuid4()),
            "protocol": "HTTP/1.1",
            "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
            "identity": identity,
        },
        "body": None if body is None else json.dumps(body),
        "isBase64Encoded": False,
    }


def http_api_event(
    method: str,
    path: str,
    *,
    body: Any = None,
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An HTTP API (v2) event on the ``$default`` stage; bodies come base64-encoded, as HTTP APIs may send them."""
    hdrs = {"host": "xyz789.execute-api.us-east-1.amazonaws.com", "user-agent": "curl/8.5.0"}
    hdrs.update({k.lower(): v for k, v in (headers or {}).items()})
    if body is not None:
        hdrs["content-type"] = "application/json"
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": urlencode(query or {}),
        "headers": hdrs,
        "queryStringParameters": query,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "xyz789",
            "domainName": "xyz789.execute-api.us-east-1.amazonaws.com",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "203.0.113.7",
                "userAgent": "curl/8.5.0",
            },
            "requestId": str(uuid.uuid4()),
            "routeKey": "$default",
            "stage": "$default",
            "time": "25/Nov/2026:12:00:00 +0000",
            "timeEpoch": int(time.time() * 1000),
        },
        "body": None if body is None else base64.b64encode(json.dumps(body).encode()).decode(),
        "isBase64Encoded": body is not None,
    }


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


# -- the deployment -----------------------------------------------------------------------------------


@dataclass
class Deployment:
    s3: S3Client
    dynamodb: DynamoDBClient
    bucket: str
    table: str
    lambda_service: LambdaService
    receiver: Receiver

    def call(self, event: dict[str, Any], context: Context | None = None) -> Answer:
        from sdgate.aws.lambda_handler import handler

        out = handler(event, context or Context())
        assert set(out) >= {"statusCode", "headers", "body"}, out
        body = out["body"]
        if out.get("isBase64Encoded"):
            body = base64.b64decode(body).decode()
        headers = {k.lower(): v for k, v in (out.get("headers") or {}).items()}
        return Answer(out["statusCode"], headers, body)

    def worker_log(self) -> str:
        self.lambda_service.log.flush()
        return Path(self.lambda_service.log.name).read_text()

    def call_worker(self, job_id: str) -> dict[str, Any]:
        """A worker event handled in this process, as a second delivery of it would be."""
        from sdgate.aws.lambda_handler import handler

        result: dict[str, Any] = handler({"sdgate_job": job_id}, Context())
        return result

    def image(self, url: str) -> tuple[str, dict[str, Any]]:
        """The object behind a CloudFront URL: its key and head; fails unless it is in the bucket."""
        m = URL.match(url)
        assert m, f"not a CloudFront URL of a stored image: {url}"
        assert is_valid_key(m.group(1))
        key = "images/" + m.group(1)
        stored = objects(self.s3, self.bucket)
        assert key in stored, f"{key} is not in the bucket: {sorted(stored)}"
        data = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        assert jpeg_size(data) == (64, 64)
        return key, stored[key]

    def job_item(self, job_id: str) -> dict[str, Any]:
        item = self.dynamodb.get_item(TableName=self.table, Key={"id": {"S": job_id}}, ConsistentRead=True)["Item"]
        body: dict[str, Any] = json.loads(item["body"]["S"])
        return body


@pytest.fixture(scope="module")
def aws(
    tmp_path_factory: pytest.TempPathFactory,
    endpoint: ServerProcess,
    s3_server: str,
    s3: S3Client,
    dynamodb: DynamoDBClient,
) -> Iterator[Deployment]:
    """The Lambda's environment as the CDK stack sets it, with every AWS service on loopback."""
    from sdgate.aws import lambda_handler
    from sdgate.jobstore.dynamodb import create_table

    bucket, table = f"lambda-{uuid.uuid4().hex[:12]}", f"lambda-jobs-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    create_table(dynamodb, table)
    receiver = Receiver()
    env = {
        **FAKE_CREDENTIALS,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL_S3": s3_server,
        "AWS_ENDPOINT_URL_DYNAMODB": s3_server,
        "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": endpoint.url,
        "SDGATE_BACKEND": "sagemaker",
        "SDGATE_SAGEMAKER_ENDPOINT": "jumpstart-sd",
        "SDGATE_STORAGE": "s3",
        "SDGATE_S3_BUCKET": bucket,
        "SDGATE_S3_PREFIX": "images",
        "SDGATE_PUBLIC_BASE_URL": CDN,
        "SDGATE_JOB_STORE": "dynamodb",
        "SDGATE_DYNAMODB_TABLE": table,
        "SDGATE_RETENTION": "30d",
        "SDGATE_WORKER_FUNCTION": WORKER,
        "SDGATE_DATA_DIR": str(tmp_path_factory.mktemp("lambda-tmp")),
        "SDGATE_AUTH": "off",  # API Gateway checks the keys
        "SDGATE_WEBHOOK_SECRET": SECRET,
        "SDGATE_WEBHOOK_ALLOW": "127.0.0.1",
        **FAST,
    }
    log_dir = tmp_path_factory.mktemp("lambda-worker")
    service = LambdaService(env, open(log_dir / "worker.log", "w"))  # noqa: SIM115 (closed below)
    service.start()
    env["AWS_ENDPOINT_URL_LAMBDA"] = service.url
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("SDGATE_")]:
            mp.delenv(name)
        for name, value in env.items():
            mp.setenv(name, value)
        lambda_handler._gateway = None  # a fresh container
        try:
            yield Deployment(s3, dynamodb, bucket, table, service, receiver)
        finally:
            if lambda_handler._gateway is not None:
                lambda_handler._gateway.close()
            lambda_handler._gateway = None
            service.stop()
            service.log.close()
            receiver.close()


def worker_runs(aws: Deployment, job_id: str) -> list[Invocation]:
    return [i for i in aws.lambda_service.invocations if i.payload == {"sdgate_job": job_id}]


def assert_ran_in_a_worker(aws: Deployment, job_id: str) -> None:
    aws.lambda_service.join()
    [run] = worker_runs(aws, job_id)
    assert run.function == WORKER and run.kind == "Event"
    assert run.returncode == 0, aws.worker_log()
    assert run.result == {"job": job_id, "status": "succeeded"}


# -- tests --------------------------------------------------------------------------------------------


def test_importing_the_handler_imports_no_model_library() -> None:
    """A cold start loads the gateway only; the import time is printed (``-s`` shows it), not asserted."""
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "import sdgate.aws.lambda_handler\n"
        "print(round((time.perf_counter() - t) * 1000))\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'accelerate', 'safetensors')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
        "print('mangum' in sys.modules and 'fastapi' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ms, heavy, sanity = proc.stdout.strip().splitlines()[-3:]
    assert sanity == "True", "the check does not see what was imported"
    assert heavy == "[]"
    print(f"import sdgate.aws.lambda_handler: {ms} ms")


def test_rest_post_text2image_answers_the_cloudfront_url_of_an_image_in_the_bucket(aws: Deployment) -> None:
    invoked = len(aws.lambda_service.invocations)
    answer = aws.call(rest_event("POST", "/text2image", body={"text": "astronaut on a horse"}))

    assert answer.status == 200, answer.body
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["statusCode"] == 200
    key, head = aws.image(body["body"])
    assert head["ContentType"] == "image/jpeg"
    assert head["CacheControl"] == "public, max-age=31536000, immutable"
    assert sidecar_object(key) in objects(aws.s3, aws.bucket)  # its sidecar, under the private prefix
    # The job ran in a worker invocation, and its record is in DynamoDB.
    [run] = aws.lambda_service.invocations[invoked:]
    job = aws.job_item(run.payload["sdgate_job"])
    assert job["status"] == "succeeded"
    assert job["images"][0]["url"] == body["body"]
    assert_ran_in_a_worker(aws, job["id"])


def test_http_api_get_text2image_answers_a_page_with_the_image(aws: Deployment) -> None:
    prompt = "a <b>bold</b> fox"
    answer = aws.call(http_api_event("GET", "/text2image", query={"prompt": prompt}))

    assert answer.status == 200, answer.body
    assert answer.headers["content-type"].startswith("text/html")
    assert "<h1>a &lt;b&gt;bold&lt;/b&gt; fox</h1>" in answer.body
    [url] = re.findall(r'<img src="([^"]+)"', answer.body)
    aws.image(url)


def test_rest_v1_generation_is_synchronous_and_private_to_its_api_key(aws: Deployment) -> None:
    request = {"prompt": "two foxes", "num_images": 2, "seed": 11}
    answer = aws.call(rest_event("POST", "/v1/generations", body=request, api_key_id="key-a"))

    assert answer.status == 200, answer.body
    job = answer.json()
    assert job["status"] == "succeeded"
    assert [img["seed"] for img in job["images"]] == [11, 12]
    assert len({aws.image(img["url"])[0] for img in job["images"]}) == 2
    assert_ran_in_a_worker(aws, job["id"])

    mine = aws.call(rest_event("GET", f"/v1/jobs/{job['id']}", api_key_id="key-a"))
    assert mine.status == 200 and mine.json()["images"] == job["images"]
    # Another API Gateway key sees neither the job nor it in the list.
    theirs = aws.call(rest_event("GET", f"/v1/jobs/{job['id']}", api_key_id="key-b"))
    assert theirs.status == 404 and theirs.json()["error"]["type"] == "not_found"
    listed = aws.call(rest_event("GET", "/v1/jobs", api_key_id="key-b"))
    assert listed.status == 200 and job["id"] not in [j["id"] for j in listed.json()["data"]]
    assert job["id"] in [j["id"] for j in aws.call(rest_event("GET", "/v1/jobs", api_key_id="key-a")).json()["data"]]


def test_http_api_async_generation_is_idempotent_and_polled_to_its_end(aws: Deployment) -> None:
    headers = {"Prefer": "respond-async", "Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    event = http_api_event("POST", "/v1/generations", body={"prompt": "a lighthouse"}, headers=headers)
    first = aws.call(event)

    assert first.status == 202, first.body
    job_id = first.json()["id"]
    assert first.headers["location"] == f"/v1/jobs/{job_id}"  # the $default stage: no prefix
    again = aws.call(http_api_event("POST", "/v1/generations", body={"prompt": "a lighthouse"}, headers=headers))
    assert again.status == 202 and again.json()["id"] == job_id

    deadline = time.monotonic() + 60
    while (job := aws.call(http_api_event("GET", f"/v1/jobs/{job_id}")).json())["status"] != "succeeded":
        assert job["status"] in ("queued", "running"), job
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    aws.image(job["images"][0]["url"])
    assert_ran_in_a_worker(aws, job_id)  # once: the repeat was the same job, not a second one


def test_a_long_request_answers_202_and_finishes_in_its_worker_with_a_webhook(aws: Deployment) -> None:
    """Requests outlast this invocation (their workers wait in Lambda's queue): 202, then polled and delivered."""
    aws.lambda_service.hold = True
    try:
        # Four seconds left in the invocation: it answers before API Gateway (and Lambda) would give up.
        request = {"prompt": "a slow sunrise", "webhook_url": aws.receiver.url}
        answer = aws.call(rest_event("POST", "/v1/generations", body=request), Context(remaining_ms=4000))
        page = aws.call(rest_event("POST", "/text2image", body={"text": "a slow sunset"}), Context(remaining_ms=4000))
    finally:
        aws.lambda_service.hold = False

    assert answer.status == 202, answer.body
    job = answer.json()
    assert job["status"] == "queued"
    assert answer.headers["location"] == f"/prod/v1/jobs/{job['id']}"  # under the REST API's stage
    assert page.status == 202 and page.json() == {"statusCode": 202, "body": page.headers["location"][5:]}
    page_job = page.headers["location"].rsplit("/", 1)[1]
    assert aws.call(rest_event("GET", f"/v1/jobs/{job['id']}")).json()["status"] == "queued"
    assert aws.receiver.calls == []

    aws.lambda_service.release()

    for job_id in (job["id"], page_job):
        assert_ran_in_a_worker(aws, job_id)
        done = aws.call(rest_event("GET", f"/v1/jobs/{job_id}")).json()
        assert done["status"] == "succeeded", done
        aws.image(done["images"][0]["url"])
    [call] = aws.receiver.calls
    assert call["verified"]
    delivered = json.loads(call["body"])
    assert (delivered["id"], delivered["status"]) == (job["id"], "succeeded")
    # Lambda delivers an event at least once: a second delivery finds the job taken and does nothing.
    before = objects(aws.s3, aws.bucket)
    assert aws.call_worker(job["id"]) == {"job": job["id"], "status": "skipped"}
    assert objects(aws.s3, aws.bucket).keys() == before.keys()


def test_a_job_canceled_before_its_worker_runs_is_skipped(aws: Deployment) -> None:
    aws.lambda_service.hold = True
    try:
        event = rest_event("POST", "/v1/generations", body={"prompt": "never"}, headers={"Prefer": "respond-async"})
        job_id = aws.call(event).json()["id"]
        canceled = aws.call(rest_event("POST", f"/v1/jobs/{job_id}/cancel"))
    finally:
        aws.lambda_service.hold = False
    assert canceled.status == 200 and canceled.json()["status"] == "canceled"
    before = objects(aws.s3, aws.bucket)

    aws.lambda_service.release()

    [run] = worker_runs(aws, job_id)
    assert run.returncode == 0, aws.worker_log()
    assert run.result == {"job": job_id, "status": "skipped"}
    assert aws.job_item(job_id)["status"] == "canceled"
    assert objects(aws.s3, aws.bucket).keys() == before.keys()
    again = aws.call(rest_event("POST", f"/v1/jobs/{job_id}/cancel"))
    assert again.status == 409


def test_a_bad_request_is_refused_before_any_worker_is_invoked(aws: Deployment) -> None:
    invoked = len(aws.lambda_service.invocations)
    answer = aws.call(http_api_event("POST", "/v1/generations", body={"prompt": "x", "width": 500}))
    assert answer.status == 422, answer.body
    error = answer.json()["error"]
    assert error["type"] == "invalid_request" and "try 496 or 504" in error["message"]
    assert len(aws.lambda_service.invocations) == invoked
    missing = aws.call(rest_event("GET", "/v1/jobs/0123456789abcdef0123456789abcdef"))
    assert missing.status == 404
