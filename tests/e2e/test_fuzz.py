"""Every route of the OpenAPI schema, fuzzed by schemathesis against a real ``sdgate serve`` process.

Valid and invalid inputs (bodies, query strings, path parameters, headers) alike must never get a
5xx, and every response must be one the schema documents, in the documented shape. Keys are on:
most cases send a valid key (in either header), the rest none or a junk one, so the 401s must be
documented too.

Bounded so that it stays about a minute on two cores: a few dozen examples per operation, images
of at most 64x64 and steps capped low, so that accepted generations are fast.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests import background
from tests.apikeys import create_key
from tests.server import ServerProcess, start_server

# FUZZ_EXAMPLES=500 for a deeper hunt. CI runs a fixed sequence (a failure there reproduces on the
# next run); elsewhere each run draws new cases.
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
DERANDOMIZE = os.environ.get("CI", "") not in ("", "0", "false")
REQUEST_TIMEOUT_S = 30  # a generation of at most 64x64 and 2 steps, on a busy machine

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]

# Every operation in the schema; test_every_route_is_fuzzed fails when a new one is not listed here.
ROUTES = [
    ("POST", "/v1/generations"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{job_id}"),
    ("POST", "/v1/jobs/{job_id}/cancel"),
    ("GET", "/v1/jobs/{job_id}/events"),
    ("GET", "/v1/models"),
    ("GET", "/v1/loras"),
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/images/edits"),
    ("POST", "/sdapi/v1/txt2img"),
    ("POST", "/sdapi/v1/img2img"),
    ("GET", "/sdapi/v1/progress"),
    ("POST", "/sdapi/v1/interrupt"),
    ("POST", "/sdapi/v1/skip"),
    ("GET", "/sdapi/v1/sd-models"),
    ("GET", "/sdapi/v1/samplers"),
    ("GET", "/sdapi/v1/schedulers"),
    ("GET", "/sdapi/v1/loras"),
    ("GET", "/sdapi/v1/scripts"),
    ("GET", "/sdapi/v1/options"),
    ("POST", "/sdapi/v1/options"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/images/{key}"),
    ("GET", "/metrics"),
    ("GET", "/ping"),
    ("POST", "/invocations"),
    ("POST", "/endpoints/{endpoint_name}/invocations"),
    ("POST", "/text2image"),
    ("GET", "/text2image"),
]


def _fuzz_server() -> tuple[ServerProcess, str]:
    data_dir = background.workdir("fuzz")
    key = create_key(data_dir, "fuzzer")
    srv = start_server(
        data_dir,
        env={
            "SDGATE_AUTH": "on",
            "SDGATE_RATE_LIMIT_PER_MIN": "100000",
            "SDGATE_MAX_PIXELS": str(64 * 64),
            "SDGATE_MAX_IMAGES": "2",
            "SDGATE_DEFAULT_STEPS": "1",
            "SDGATE_QUEUE_SIZE": "4",
            "SDGATE_SYNC_TIMEOUT": "10",
        },
    )
    return srv, key


background.needs(__file__, fuzz_server=_fuzz_server)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[tuple[ServerProcess, str]]:
    """The module's server, made while the modules before this one ran (tests/background.py)."""
    made: tuple[ServerProcess, str] = background.take("fuzz_server", _fuzz_server)
    yield made
    made[0].stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: tuple[ServerProcess, str]) -> Any:
    srv, _ = fuzz_server
    return schemathesis.openapi.from_url(f"{srv.url}/openapi.json")


def few_steps(body: Any) -> Any:
    """The fuzzer may ask for up to 150 steps: valid, but slow on a CPU. Out-of-range values are
    kept, so the validation of the field is still fuzzed."""
    if isinstance(body, dict):
        for name in ("num_inference_steps", "steps"):  # native, and the webui's
            steps = body.get(name)
            if isinstance(steps, int) and not isinstance(steps, bool) and 2 < steps <= 150:
                body = {**body, name: 2}
    return body


def test_every_route_is_fuzzed(api_schema: Any) -> None:
    in_schema = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert in_schema == set(ROUTES)


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_no_route_answers_5xx_or_outside_its_schema(
    method: str, path: str, api_schema: Any, fuzz_server: tuple[ServerProcess, str]
) -> None:
    _, key = fuzz_server
    operation = api_schema[path][method]
    if path == "/v1/generations":
        # JSON both ways; multipart only as the schema allows it: schemathesis cannot mutate a file
        # field into a negative case ("Unsupported type: 'Binary'"). Random bytes as an image still
        # make every image check answer.
        cases = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE, media_type="application/json"),
            operation.as_strategy(GenerationMode.NEGATIVE, media_type="application/json"),
            operation.as_strategy(GenerationMode.POSITIVE, media_type="multipart/form-data"),
        )
    else:
        cases = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )

    # Mostly a valid key, so that most cases reach the route; the rest must be a documented 401.
    auth = st.sampled_from(
        [{"X-API-Key": key}, {"Authorization": f"Bearer {key}"}, {"X-API-Key": key}, {}, {"X-API-Key": "junk"}]
    )

    @given(case=cases, headers=auth)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=DERANDOMIZE,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    def fuzz(case: Any, headers: dict[str, str]) -> None:
        case.body = few_steps(case.body)
        case.call_and_validate(headers=headers, checks=CHECKS, timeout=REQUEST_TIMEOUT_S)

    fuzz()


def test_the_fuzzed_server_is_still_healthy(fuzz_server: tuple[ServerProcess, str]) -> None:
    srv, _ = fuzz_server
    assert srv.proc.poll() is None
    assert httpx.get(f"{srv.url}/readyz", timeout=10).status_code == 200
    assert "Traceback" not in srv.log()
