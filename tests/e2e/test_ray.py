"""Backend ray end to end: a Ray cluster on this machine, two CPU replicas of the engine, and real
``sdgate serve --backend ray`` processes in front of it, over HTTP on loopback.

One cluster (this process is its head: tests/ray_cluster.py) and one API server, which deploys the engine
with two models (``tiny``, the default, and ``demo``), serve every test here, in this order: images and which
replica made them; progress, previews and cancel; a model that one replica loads on demand; a second API node;
a replica killed mid-run; then the API server that deployed the engine stops, and the deployment stays for the
next node. The reference images come from sdgate's engine in this process, with the same settings.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.ray_cluster import RAY_ENV, LocalCluster, local_cluster  # before ray: the cluster's token
from tests.server import ServerProcess, start_server, tiny_data, with_tiny_models

ray = pytest.importorskip("ray", reason="backend ray needs Ray Serve: pip install 'sdgate[ray]'")
serve = pytest.importorskip("ray.serve")

REPLICAS = 2
SMALL = {"width": 64, "height": 64, "num_inference_steps": 4, "output_format": "png"}
ASYNC = {"Prefer": "respond-async"}
TIMEOUT = 120.0
TERMINAL = ("succeeded", "failed", "canceled")

Job = dict[str, Any]


# -- the cluster, the API server, the reference engine -------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster(num_cpus=REPLICAS) as made:  # one CPU per replica: each runs one torch thread
        yield made
    assert not made.pids(), "processes of the test's Ray cluster outlived it"
    assert not made.temp_dir.exists()


def ray_env(cluster: LocalCluster) -> dict[str, str]:
    return {
        **RAY_ENV,
        "SDGATE_RAY_ADDRESS": cluster.address,
        "SDGATE_MODELS": "tiny,demo",
        "SDGATE_RAY_REPLICAS": str(REPLICAS),
        "SDGATE_DEVICE": "cpu",
        "SDGATE_WARMUP": "false",
        # The line that says which replica ran a generation is a debug line (JSON: with its seeds).
        "SDGATE_LOG_LEVEL": "debug",
        "SDGATE_LOG_FORMAT": "json",
    }


def start_api(cluster: LocalCluster, data_dir: Path) -> ServerProcess:
    try:
        return start_server(with_tiny_models(data_dir), "--backend", "ray", env=ray_env(cluster), timeout=240)
    except RuntimeError as e:
        raise RuntimeError(f"{e}\n--- the cluster's logs:\n{cluster.logs('worker-*.err')}") from None


@pytest.fixture(scope="module")
def api(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_api(cluster, tmp_path_factory.mktemp("ray-api") / "data")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference() -> Iterator[Callable[[Job], Any]]:
    """The in-process engine's image for a job's parameters, run alone (a batch of one), as a PIL image.

    Asked for before the API server: the engine loads on its own thread while the server deploys its replicas.
    """
    import torch

    from sdgate.config import Settings
    from sdgate.engine.runner import Engine
    from sdgate.schemas import GenerationParams

    threads = torch.get_num_threads()
    settings = Settings(
        data_dir=tiny_data(), model="tiny", device="cpu", torch_threads=1, warmup=False, max_batch_wait_ms=0
    )
    engine = Engine(settings)
    engine.start()

    def image(job: Job) -> Any:
        assert engine.wait_ready(TIMEOUT), engine.load_error
        p = job["params"]
        params = GenerationParams(
            prompt=p["prompt"],
            negative_prompt=p["negative_prompt"],
            width=p["width"],
            height=p["height"],
            num_inference_steps=p["num_inference_steps"],
            guidance_scale=p["guidance_scale"],
            seeds=(p["seed"],),
            scheduler=p["scheduler"],
            output_format=p["output_format"],
            quality=p["quality"],
            model=job["model"],
        )
        return engine.submit(params).result(TIMEOUT).images[0].image

    yield image
    engine.close()
    torch.set_num_threads(threads)  # the process's own again, for the modules after this one


# -- helpers --------------------------------------------------------------------------------------


def generate(server: ServerProcess, **fields: Any) -> Job:
    resp = httpx.post(f"{server.url}/v1/generations", json={**SMALL, **fields}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    body: Job = resp.json()
    assert body["status"] == "succeeded", body
    return body


def download(job: Job) -> bytes:
    resp = httpx.get(job["images"][0]["url"], timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.content


def pixels(data: bytes) -> np.ndarray:
    from sdgate.imaging import decode

    return np.asarray(decode(data), dtype=np.int16)


def as_png(image: Any, like: bytes) -> bytes:
    """``image`` encoded as the server encodes it, with the metadata ``like`` carries."""
    from sdgate.imaging import encode, read_metadata

    return encode(image, "png", 90, read_metadata(like)).data


def log_lines(server: ServerProcess) -> list[dict[str, Any]]:
    lines = []
    for line in server.log().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # Ray's raylet prints a plain line when a worker dies
            continue
    return lines


def replica_of_seed(server: ServerProcess) -> dict[int, str]:
    """Which replica made each seed's image, from the server's debug lines."""
    return {seed: line["replica"] for line in log_lines(server) if "replica" in line for seed in line["seeds"]}


def replica_pids(cluster: LocalCluster) -> set[int]:
    """The engine replicas' processes (Ray names a replica's process after its deployment)."""
    pids = set()
    for pid in cluster.pids():
        try:
            if "ServeReplica:sdgate:sdgate-engine" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                pids.add(pid)
        except OSError:
            continue
    return pids


def replica_reports(pids: set[int]) -> dict[int, Any]:
    """Each replica's own report (its engine's counters), by pid: asked through the deployment, which routes
    each call to one replica or the other, until every one of ``pids`` has answered."""
    handle = serve.get_deployment_handle("sdgate-engine", app_name="sdgate")
    found: dict[int, Any] = {}
    deadline = time.monotonic() + 30
    while set(found) != pids:
        assert time.monotonic() < deadline, f"replicas {pids - set(found)} never answered"
        for card in [r.result(timeout_s=30) for r in [handle.describe.remote() for _ in range(4)]]:
            if card.replica.pid in pids:
                found[card.replica.pid] = card.replica
    return found


def submit(server: ServerProcess, **fields: Any) -> Job:
    resp = httpx.post(f"{server.url}/v1/generations", json={**SMALL, **fields}, headers=ASYNC, timeout=30)
    assert resp.status_code == 202, resp.text
    job: Job = resp.json()
    return job


def get_job(server: ServerProcess, job_id: str) -> Job:
    resp = httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=30)
    assert resp.status_code == 200, resp.text
    job: Job = resp.json()
    return job


def events(lines: Iterator[str]) -> Iterator[tuple[str, Job]]:
    """Server-sent events as (name, data); keep-alive comments skipped."""
    block: list[str] = []
    for line in lines:
        if line:
            block.append(line)
            continue
        if block and not block[0].startswith(":"):
            yield block[0].removeprefix("event: "), json.loads(block[1].removeprefix("data: "))
        block = []


def maps_torch(pid: int) -> bool:
    """Whether process ``pid`` has torch's library mapped (it imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


# -- what a replica is made with -------------------------------------------------------------------


def test_every_setting_the_engine_reads_travels_to_the_replicas() -> None:
    """A new engine setting must join ENGINE_FIELDS: replicas would otherwise run on its default."""
    import re

    import sdgate.engine
    from sdgate.backends.ray_replica import ENGINE_FIELDS

    derived = {"paths": {"data_dir"}, "loras_dir": {"lora_dir", "data_dir"}, "model_entries": {"model", "models"}}
    sources = Path(sdgate.engine.__file__).parent.glob("*.py")
    read = {name for f in sources for name in re.findall(r"settings\.([a-z_]+)", f.read_text())}
    needed = set().union(*(derived.get(name, {name}) for name in read))
    assert read and needed <= ENGINE_FIELDS, needed - ENGINE_FIELDS


# -- the deployment's options ---------------------------------------------------------------------


def test_the_deployment_follows_the_settings(cluster: LocalCluster) -> None:
    from sdgate.backends.ray import RayBackend
    from sdgate.config import Settings

    def options(**fields: Any) -> dict[str, Any]:
        return RayBackend(Settings(backend="ray", **fields))._deployment_options()

    fixed = options(ray_replicas=3, torch_threads=2, ray_num_gpus=0.5)
    assert (fixed["name"], fixed["num_replicas"]) == ("sdgate-engine", 3) and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_gpus": 0.5, "num_cpus": 2.0}
    assert fixed["max_ongoing_requests"] == 2 * 8  # one batch running, the next one gathering
    scaled = options(ray_min_replicas=0, ray_max_replicas=4, max_batch_size=4)
    # Serve adds replicas once each holds more than a full batch.
    assert scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 4}
    assert "num_replicas" not in scaled
    # This cluster has no GPU: replicas ask for none unless told to.
    assert options()["ray_actor_options"]["num_gpus"] == 0
    assert options()["num_replicas"] == 1
    with pytest.raises(ValueError, match="not both"):
        options(ray_replicas=2, ray_max_replicas=3)


# -- images, and the replicas that made them ------------------------------------------------------


def test_concurrent_requests_spread_over_both_replicas_and_make_the_engines_images(
    reference: Callable[[Job], Any], api: ServerProcess
) -> None:
    # 1. twenty-four at once, all alike: each replica batches what it gets, as the local engine would. A replica
    # takes two batches at a time (max_ongoing_requests), so both get some.
    seeds = list(range(5000, 5024))
    with ThreadPoolExecutor(len(seeds)) as pool:
        jobs = list(pool.map(lambda s: generate(api, prompt=f"shapes {s % 3}", seed=s), seeds))
    made_by = replica_of_seed(api)
    assert len({made_by[s] for s in seeds}) == REPLICAS, f"not spread over both replicas: {made_by}"
    for job in jobs:
        # The engine's own promise for a batched image: every pixel within 1 of the image made alone.
        diff = np.abs(pixels(download(job)) - np.asarray(reference(job), dtype=np.int16)).max()
        assert diff <= 1, f"seed {job['params']['seed']} differs by {diff} from the in-process engine's image"

    # 2. eight at once, each alone in its batch (each asks for its own step count): byte-identical files
    alone = [(6000 + i, 2 + i) for i in range(8)]
    with ThreadPoolExecutor(len(alone)) as pool:
        jobs = list(
            pool.map(lambda a: generate(api, prompt="a red circle", seed=a[0], num_inference_steps=a[1]), alone)
        )
    for job in jobs:
        data = download(job)
        assert data == as_png(reference(job), like=data), f"seed {job['params']['seed']}: not byte-identical"
    made_by = replica_of_seed(api)
    assert all(made_by.get(seed) for seed, _ in alone)

    # 3. what the API node says of the models came from a replica: their own defaults, which one is in memory
    tiny, demo = httpx.get(f"{api.url}/v1/models", timeout=10).json()["data"]
    assert (tiny["id"], tiny["backend"], tiny["loaded"], tiny["default"]) == ("tiny", "ray", True, True)
    assert (tiny["default_width"], tiny["default_steps"]) == (512, 4)
    assert (demo["id"], demo["loaded"], demo["default_width"], demo["default_steps"]) == ("demo", False, 64, 20)
    # and a LoRA is checked by a replica (this server offers none)
    resp = httpx.post(f"{api.url}/v1/generations", json={**SMALL, "prompt": "x", "loras": [{"name": "nope"}]})
    assert resp.status_code == 422 and "unknown LoRA 'nope'" in resp.json()["error"]["message"], resp.text


# -- progress, previews and cancel ----------------------------------------------------------------


def test_progress_previews_and_cancel_reach_the_replica_that_runs_the_job(
    cluster: LocalCluster, api: ServerProcess
) -> None:
    pids = replica_pids(cluster)
    canceled_before = sum(r.stats["canceled"] for r in replica_reports(pids).values())
    job = submit(api, prompt="a long one", seed=7, num_inference_steps=150)
    seen: list[tuple[str, int]] = []
    preview = None
    with (
        httpx.Client(base_url=api.url, timeout=TIMEOUT) as client,
        client.stream("GET", f"/v1/jobs/{job['id']}/events", params={"previews": "1"}) as resp,
    ):
        assert resp.status_code == 200
        for name, data in events(resp.iter_lines()):
            seen.append((name, data["progress"]["step"]))
            if preview is None and name == "progress" and data.get("preview"):
                preview = data["preview"]  # the first preview: cancel now, and read on to the terminal event
                answer = client.post(f"/v1/jobs/{job['id']}/cancel")
                assert answer.status_code == 200, answer.text
    names = [name for name, _ in seen]
    assert names[0] in ("queued", "started") and names[-1] == "canceled", names
    steps = [step for name, step in seen if name == "progress"]
    assert steps == sorted(steps) and 0 < steps[-1] < 150, steps
    assert preview is not None and preview.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(preview.split(",", 1)[1])[:2] == b"\xff\xd8"
    final = get_job(api, job["id"])
    assert final["status"] == "canceled" and final["progress"]["step"] < 150

    # On the replica, the engine dropped the task (it counts it canceled) and nothing is left running.
    deadline = time.monotonic() + 30
    while True:
        reports = replica_reports(pids)
        canceled = sum(r.stats["canceled"] for r in reports.values())
        idle = all(r.stats["in_flight"] == 0 and r.stats["queue_depth"] == 0 for r in reports.values())
        if canceled > canceled_before and idle:
            break
        assert time.monotonic() < deadline, {pid: r.stats for pid, r in reports.items()}
        time.sleep(0.2)


# -- models: where they are, and where their requests go --------------------------------------------


def test_a_model_is_loaded_on_demand_by_one_replica_which_then_gets_its_requests(
    cluster: LocalCluster, api: ServerProcess
) -> None:
    pids = replica_pids(cluster)
    assert all(r.loaded == ("tiny",) for r in replica_reports(pids).values())
    # 1. the first request for demo: a replica loads it, and the job's events say so
    job = submit(api, model="demo", prompt="a red circle on a blue background", seed=3100)
    with httpx.stream("GET", f"{api.url}/v1/jobs/{job['id']}/events", timeout=TIMEOUT) as resp:
        names = [name for name, _ in events(resp.iter_lines())]
    assert "loading" in names and names[-1] == "succeeded", names
    holder = replica_of_seed(api)[3100]
    # 2. the next ones go to the replica that holds it (Serve's model multiplexing); the other never loads it
    for seed in range(3101, 3105):
        generate(api, model="demo", prompt="a small white circle", seed=seed)
    made_by = replica_of_seed(api)
    assert [made_by[s] for s in range(3101, 3105)] == [holder] * 4, made_by
    reports = {r.id: r for r in replica_reports(pids).values()}
    assert set(reports[holder].loaded) == {"tiny", "demo"}
    assert [r.loaded for rid, r in reports.items() if rid != holder] == [("tiny",)]
    # 3. the default model is everywhere still: its requests go to both replicas (a replica takes at most two
    # batches at a time, so twenty-four at once cannot all go to one)
    with ThreadPoolExecutor(24) as pool:
        list(pool.map(lambda s: generate(api, prompt="shapes", seed=s), range(3200, 3224)))
    assert len({replica_of_seed(api)[s] for s in range(3200, 3224)}) == REPLICAS
    [demo] = [m for m in httpx.get(f"{api.url}/v1/models", timeout=10).json()["data"] if m["id"] == "demo"]
    assert demo["loaded"]


# -- a second API node ----------------------------------------------------------------------------


def test_a_second_api_node_joins_the_running_deployment(
    cluster: LocalCluster, api: ServerProcess, tmp_path: Path
) -> None:
    before = replica_pids(cluster)
    assert len(before) == REPLICAS
    second = start_api(cluster, tmp_path / "second")
    try:
        said = [line["msg"] for line in log_lines(second) if line.get("logger") == "sdgate.backends"]
        assert any("joining the deployment sdgate/sdgate-engine" in m for m in said), said
        assert not any("other engine settings" in m for m in said), said  # the same settings: no warning
        # One application, one deployment, the same replica processes: nothing was deployed again.
        status = serve.status()
        assert list(status.applications) == ["sdgate"]
        deployment = status.applications["sdgate"].deployments
        assert list(deployment) == ["sdgate-engine"]
        assert replica_pids(cluster) == before
        # The same request on either node: the same file, made by the same deployment's replicas.
        one = generate(api, prompt="a blue square", seed=77, num_inference_steps=3)
        two = generate(second, prompt="a blue square", seed=77, num_inference_steps=3)
        assert download(one) == download(two)
        assert replica_of_seed(second)[77] in set(replica_of_seed(api).values())
        models = httpx.get(f"{second.url}/v1/models", timeout=10).json()["data"]
        assert [(m["id"], m["default_steps"]) for m in models] == [("tiny", 4), ("demo", 20)]
        # Neither API process loaded torch: only the replicas did.
        assert not maps_torch(api.proc.pid) and not maps_torch(second.proc.pid)
        assert all(maps_torch(pid) for pid in before)
    finally:
        second.stop()
    # The node that left took nothing with it.
    assert replica_pids(cluster) == before
    generate(api, prompt="still here", seed=78)


# -- a replica killed mid-run ---------------------------------------------------------------------


def test_a_replica_killed_mid_run_loses_no_job(cluster: LocalCluster, api: ServerProcess) -> None:
    pids = replica_pids(cluster)
    # Alike: each replica runs its share as one batch, so that all of them are running at once.
    jobs = [submit(api, prompt=f"job {i}", seed=900 + i, num_inference_steps=60) for i in range(6)]

    # 1. once every job runs, kill (SIGKILL) a replica that is running some of them
    deadline = time.monotonic() + TIMEOUT
    while not all(get_job(api, j["id"])["progress"]["step"] > 0 for j in jobs):
        assert time.monotonic() < deadline, [get_job(api, j["id"]) for j in jobs]
        time.sleep(0.1)
    busy = {pid: r for pid, r in replica_reports(pids).items() if r.stats["in_flight"]}
    assert busy, "no replica is running any of the jobs"
    victim, report = next(iter(busy.items()))
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    # 2. every job ends: succeeded (sent once more, to the live replica) or failed with a clear error
    finished: list[Job] = []
    for job in jobs:
        while (state := get_job(api, job["id"]))["status"] not in TERMINAL:
            assert time.monotonic() - killed_at < TIMEOUT, state
            time.sleep(0.2)
        finished.append(state)
    for state in finished:
        if state["status"] == "failed":
            assert state["error"]["type"] == "backend_error" and "replica" in state["error"]["message"], state
        else:
            assert state["status"] == "succeeded", state
            assert len(state["images"]) == 1
    retried = [line for line in log_lines(api) if "sending the generation once more" in line["msg"]]
    assert retried, f"none of the {report.stats['in_flight']} generation(s) of the killed replica was sent again"


# -- the node that deployed leaves ----------------------------------------------------------------


def running_application() -> None:
    """Waits (up to TIMEOUT) until Serve says the application ``sdgate`` is RUNNING; fails if it is gone."""
    deadline = time.monotonic() + TIMEOUT
    while (status := serve.status().applications.get("sdgate")) is not None and status.status != "RUNNING":
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status is not None, "the application sdgate is gone"


def test_the_deployment_outlives_the_api_node_that_made_it(
    cluster: LocalCluster, api: ServerProcess, tmp_path: Path
) -> None:
    # 1. the fleet settled first: after a killed replica, Serve says UNHEALTHY until its replacement is up
    running_application()
    # 2. the node that deployed it stops; the application stays, running
    api.stop()
    running_application()
    later = start_api(cluster, tmp_path / "later")
    try:
        said = [line["msg"] for line in log_lines(later) if line.get("logger") == "sdgate.backends"]
        assert any("joining the deployment sdgate/sdgate-engine" in m for m in said), said
        generate(later, prompt="after the first node left", seed=79)
    finally:
        later.stop()
