"""``python -m bench.ray_replicas``: images/s of backend ray with one and two CPU replicas, beside the local engine.

Not a scenario of ``python -m bench``: each Ray configuration starts a cluster of its own (tens of seconds on two
cores), which the suite's smoke run cannot afford. Every configuration is a ``sdgate serve`` with the tiny
model, measured alone (one at a time, started, loaded, measured, stopped) by the suite's closed-loop load:

- ``local``: the engine in the server's process, with one torch thread and with two;
- ``ray``: ``SDGATE_BACKEND=ray`` with ``SDGATE_RAY_ADDRESS=auto`` and no cluster running, so the server starts a
  local one for itself; one and two replicas, one torch thread each.

python -m bench.ray_replicas                              # 8 clients, 64x64, 10 steps, a 30 s window each
python -m bench.ray_replicas --size 128 --rounds 3 --only "ray, 1 replica;ray, 2 replicas"
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import servers
from bench.context import engine_counters
from bench.load import LoadResult, closed_loop

_RAY = {"SDGATE_BACKEND": "ray", "SDGATE_RAY_ADDRESS": "auto", "SDGATE_DEVICE": "cpu"}
CONFIGS: dict[str, dict[str, str]] = {
    "local, 1 thread": {"SDGATE_TORCH_THREADS": "1"},
    "local, 2 threads": {"SDGATE_TORCH_THREADS": "2"},
    "ray, 1 replica": {**_RAY, "SDGATE_RAY_REPLICAS": "1", "SDGATE_TORCH_THREADS": "1"},
    "ray, 2 replicas": {**_RAY, "SDGATE_RAY_REPLICAS": "2", "SDGATE_TORCH_THREADS": "1"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_replicas", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--clients", type=int, default=8, help="Closed-loop clients (default 8).")
    parser.add_argument("--size", type=int, default=64, help="Width and height (default 64).")
    parser.add_argument("--steps", type=int, default=10, help="Denoising steps (default 10).")
    parser.add_argument("--warmup", type=float, default=8.0, help="Seconds of load before the window (default 8).")
    parser.add_argument("--window", type=float, default=30.0, help="Seconds measured (default 30).")
    parser.add_argument("--rounds", type=int, default=1, help="Measure every configuration this many times, in turn.")
    parser.add_argument("--only", help=f"Configurations, separated by ';' (default all: {'; '.join(CONFIGS)}).")
    return parser.parse_args(argv)


@dataclass
class Measurement:
    """One configuration's run: the load's result, and the CPU its processes spent per image."""

    load: LoadResult
    cpu_ms: dict[str, float]
    """CPU milliseconds per image by role: ``api`` (the server process), ``replicas``, ``ray`` (the cluster's
    own processes: raylet, GCS, Serve's controller)."""


def measure(name: str, env: dict[str, str], models: Path, work: Path, args: argparse.Namespace) -> Measurement:
    """Start the configuration's server, load it, stop it; with Ray, check that its cluster went with it."""
    ray_tmp = None
    extra = dict(env)
    if env.get("SDGATE_BACKEND") == "ray":
        # The cluster's files under a dir of its own, its token in the environment (not in ~/.ray).
        ray_tmp = Path(tempfile.mkdtemp(prefix="sdray-", dir="/tmp"))
        extra |= {"RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    server = servers.sdgate(models, work, name=name.replace(", ", "-").replace(" ", "-"), extra=extra)
    try:
        t0 = time.perf_counter()
        server.wait_ready(timeout=600)
        print(f"{name}: ready in {time.perf_counter() - t0:.1f} s", flush=True)
        sent = 0

        def body(i: int) -> dict[str, Any]:
            nonlocal sent
            sent += 1
            return {
                "prompt": f"shapes {i % 7}",
                "seed": i,
                "width": args.size,
                "height": args.size,
                "num_inference_steps": args.steps,
            }

        before, counted = cpu_by_role(server.proc.pid), engine_counters(server)
        load = closed_loop(server.generate_url, body, clients=args.clients, warmup_s=args.warmup, window_s=args.window)
        after = cpu_by_role(server.proc.pid)
        # Images per pipeline call (ray: the replicas' calls as they last reported them, at most a batch behind).
        images, calls = engine_counters(server)
        load.engine_images, load.engine_calls = images - counted[0], calls - counted[1]
        cpu_ms = {role: (after.get(role, 0.0) - before.get(role, 0.0)) * 1000 / sent for role in after}
        return Measurement(load, cpu_ms)
    finally:
        server.stop(timeout=60)
        if ray_tmp is not None:
            left = _processes_under(ray_tmp)
            shutil.rmtree(ray_tmp, ignore_errors=True)
            if left:
                raise RuntimeError(f"{name}: processes of its Ray cluster outlived the server: {left}")


def cpu_by_role(root: int) -> dict[str, float]:
    """CPU seconds so far of process ``root`` and its descendants, by role (see :class:`Measurement`).

    Descendants, not a process group: Ray's raylet starts each worker (a replica, Serve's controller) in a
    session of its own.
    """
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    replicas: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = servers.proc_stat(entry / "stat")
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        cpu[pid] = servers.cpu_seconds_of(fields)
        if "ServeReplica" in cmdline:
            replicas.add(pid)
    tree = {root}
    while grown := {pid for pid, parent in parents.items() if parent in tree} - tree:
        tree |= grown
    out = {"api": 0.0, "replicas": 0.0, "ray": 0.0}
    for pid in tree & set(cpu):
        out["api" if pid == root else "replicas" if pid in replicas else "ray"] += cpu[pid]
    return out


def _processes_under(directory: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(directory) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    chosen = [c.strip() for c in args.only.split(";")] if args.only else list(CONFIGS)
    # Rounds in turn (A, B, C, A, B, C): a machine whose other load drifts shifts every configuration alike.
    runs: dict[str, list[Measurement]] = {name: [] for name in chosen}
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="sdgate-bench-ray-") as tmp:
        work = Path(tmp)
        models = work / "models"
        servers.tiny_model_dir(models)
        for _ in range(args.rounds):
            for name in chosen:
                m = measure(name, CONFIGS[name], models, work, args)
                runs[name].append(m)
                loads.append(os.getloadavg()[0])
                cpu = ", ".join(f"{role} {ms:.0f}" for role, ms in m.cpu_ms.items())
                print(
                    f"{name}: {m.load.images_per_s:.2f} images/s, p50 {m.load.latencies.p50 * 1000:.0f} ms, "
                    f"{m.load.mean_batch:.1f} images per pipeline call; CPU ms per image: {cpu}",
                    flush=True,
                )
    print(
        f"\n{args.clients} clients, {args.size}x{args.size}, {args.steps} steps, tiny model, {args.rounds} round(s); "
        f"load average {min(loads):.1f}..{max(loads):.1f} on {os.cpu_count()} CPUs"
    )
    print(
        "| configuration | images/s (median) | each round | images per call | CPU ms per image: API / replicas / Ray "
        "| vs ray, 1 replica |"
    )
    print("|---|---:|---|---:|---|---:|")
    base = statistics.median(m.load.images_per_s for m in runs["ray, 1 replica"]) if runs.get("ray, 1 replica") else 0
    for name in chosen:
        rate = statistics.median(m.load.images_per_s for m in runs[name])
        ratio = f"{rate / base:.2f}x" if base else "-"
        each = ", ".join(f"{m.load.images_per_s:.2f}" for m in runs[name])
        cpu = " / ".join(
            f"{statistics.median(m.cpu_ms[role] for m in runs[name]):.0f}" for role in ("api", "replicas", "ray")
        )
        batch = statistics.median(m.load.mean_batch for m in runs[name])
        print(f"| {name} | {rate:.2f} | {each} | {batch:.1f} | {cpu} | {ratio} |")


if __name__ == "__main__":
    main()
