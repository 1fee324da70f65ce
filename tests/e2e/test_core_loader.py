"""Real ``sdgate serve`` processes with a model given by path: one that loads, one that does not.

Both processes start together (most of a start is importing the model libraries on one core), then
each test waits for the state it needs.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests import background
from tests.server import ServerProcess, start_server, tiny_model_dir


def poll_readyz(server: ServerProcess, until: Callable[[httpx.Response], bool], timeout: float = 120) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        assert server.proc.poll() is None, f"the server exited:\n{server.log()}"
        resp = httpx.get(f"{server.url}/readyz", timeout=10)
        if until(resp) or time.monotonic() > deadline:
            return resp
        time.sleep(0.1)


def _servers() -> dict[str, ServerProcess]:
    root = background.workdir("loader")
    model_dir = root / "models" / "my-sd-pipeline"
    shutil.copytree(tiny_model_dir(), model_dir)
    (model_dir / "sdgate-builtin.json").unlink()  # a plain diffusers directory, as a user would have
    started: dict[str, ServerProcess] = {}
    try:
        started["dir"] = start_server(root / "dir-data", env={"SDGATE_MODEL": str(model_dir)}, ready=False)
        started["missing"] = start_server(
            root / "missing-data", env={"SDGATE_MODEL": str(root / "does-not-exist")}, ready=False
        )
    except BaseException:
        for server in started.values():
            server.stop()
        raise
    return started


background.needs(__file__, loader_servers=_servers)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, ServerProcess]]:
    """A server loading a diffusers directory by path, and one given a path that does not exist."""
    started: dict[str, ServerProcess] = background.take("loader_servers", _servers)
    try:
        yield started
    finally:
        for server in started.values():
            server.stop()


def test_server_loads_a_pipeline_directory_by_path(servers: dict[str, ServerProcess]) -> None:
    server = servers["dir"]
    model_dir = server.data_dir.parent / "models" / "my-sd-pipeline"
    ready = poll_readyz(server, lambda r: r.status_code == 200)
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"
    assert ready.json()["model"] == str(model_dir)
    [card] = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    assert card["id"] == str(model_dir)
    assert card["default_steps"] == 30  # a model's defaults, not the built-in's
    resp = httpx.post(
        f"{server.url}/v1/generations",
        json={"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 5},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == str(model_dir)
    assert httpx.get(body["images"][0]["url"], timeout=30).status_code == 200
    # the built-in model was never built: the server used the directory it was given
    assert not (server.data_dir / "models").exists()


def test_server_with_a_missing_model_path_is_alive_but_not_ready_and_says_why(
    servers: dict[str, ServerProcess],
) -> None:
    server = servers["missing"]
    missing = server.data_dir.parent / "does-not-exist"
    # /readyz is 503 while the model loads, and stays 503 once the load has failed, with the reason.
    ready = poll_readyz(server, lambda r: r.status_code != 503 or "failed" in r.json()["detail"])
    assert ready.status_code == 503
    detail = ready.json()["detail"]
    assert str(missing) in detail
    assert "does not exist" in detail
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200

    # a generation is refused at once with the reason, not held until a timeout
    resp = httpx.post(f"{server.url}/v1/generations", json={"prompt": "a fox"}, timeout=30)
    assert resp.status_code == 503
    err = resp.json()["error"]
    assert err["type"] == "not_ready"
    assert "does not exist" in err["message"]
    assert server.proc.poll() is None, "the server must keep running to report why it is not ready"
