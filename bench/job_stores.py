"""``python -m bench.job_stores``: what the PostgreSQL job store costs per request, against the SQLite default.

Not a scenario of ``python -m bench``: it needs PostgreSQL's server binaries (Debian's ``postgresql`` package),
which a user's machine may lack. Three ``sdgate serve`` with the tiny model run at once, the same but for
their job store:

- ``sqlite``: the default, files under the data directory (WAL, ``synchronous=NORMAL``: a commit survives a
  crash of the process, not of the machine);
- ``postgres``: a throwaway local cluster with PostgreSQL's default durability (every commit flushed to disk,
  so it survives the machine too), on loopback, as a database on the same host would be;
- ``postgres, synchronous_commit=off``: the same cluster, through a URL that sets it for sdgate's connections.

1. One client: the servers take turns a request each, so that every pair is a moment apart and the machine's
   drift hits them alike; the cost is the median of the paired differences with sqlite.
2. Eight clients: closed-loop turns, alternating, images/s.

CPU per request counts the server process and, for postgres, the cluster's processes too.

python -m bench.job_stores                       # 64x64, 4 steps: 200 pairs, then 4 turns of 8 clients
python -m bench.job_stores --pairs 40 --rounds 2 --window 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench import servers
from bench.load import LoadResult, closed_loop, sequential
from bench.ray_replicas import cpu_by_role
from bench.wire import Wire

STORES = ("sqlite", "postgres", "postgres, synchronous_commit=off")
"""The configurations: the last one is PostgreSQL with commits that do not wait for the disk (a crash of the
machine may lose the last moment's commits; the database stays consistent), to show what the flush costs."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.job_stores", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--size", type=int, default=64, help="Width and height (default 64).")
    parser.add_argument("--steps", type=int, default=4, help="Denoising steps (default 4, the tiny model's).")
    parser.add_argument("--pairs", type=int, default=200, help="One-client requests per store (default 200).")
    parser.add_argument("--clients", type=int, default=8, help="Closed-loop clients of the second part (default 8).")
    parser.add_argument("--rounds", type=int, default=4, help="Closed-loop turns per store (default 4).")
    parser.add_argument("--window", type=float, default=5.0, help="Seconds measured per turn (default 5).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    # The tests' throwaway cluster: make bench installs the test extra.
    from tests.postgres import Cluster, binaries, create_database

    args = parse_args(argv)
    bin_dir = binaries()
    if bin_dir is None:
        raise SystemExit("PostgreSQL's server binaries are not installed (apt-get install postgresql)")

    def body(i: int) -> dict[str, Any]:
        size = {"width": args.size, "height": args.size}
        return {"prompt": f"shapes {i % 7}", "seed": i, **size, "num_inference_steps": args.steps}

    cluster = Cluster(bin_dir, durable=True)
    try:
        with tempfile.TemporaryDirectory(prefix="sdgate-bench-stores-") as tmp, servers.Fleet() as fleet:
            # 1. the model, built once, and the three servers, loading at once
            work = Path(tmp)
            models = work / "models"
            servers.tiny_model_dir(models)
            # Databases of their own: each server's jobs, keys and counters apart from the other's.
            urls = {s: create_database(cluster.url, f"bench{i}") for i, s in enumerate(STORES[1:], 1)}
            urls[STORES[2]] += "?options=-c%20synchronous_commit%3Doff"
            env = {s: {"SDGATE_TORCH_THREADS": "1"} for s in STORES}
            for s, url in urls.items():
                env[s] |= {"SDGATE_JOB_STORE": "postgres", "SDGATE_POSTGRES_URL": url}
            by = {
                s: fleet.add(servers.sdgate(models, work, name=f"sdgate-{i}", extra=env[s]))
                for i, s in enumerate(STORES)
            }
            fleet.wait_ready()

            def cpu_of(s: str) -> float:
                """The server's CPU seconds so far, and the whole cluster's for a postgres one."""
                own = by[s].cpu_seconds()
                return own if s == "sqlite" else own + sum(cpu_by_role(cluster.postmaster_pid()).values())

            # 2. one client, a request each in turn (the first five each warm them up)
            latencies: dict[str, list[float]] = {s: [] for s in STORES}
            cpu: dict[str, float] = dict.fromkeys(STORES, 0.0)
            with Wire() as client:
                for s in STORES:
                    sequential(client, by[s].generate_url, body, 5)
                for i in range(args.pairs):
                    for s in STORES if i % 2 == 0 else reversed(STORES):  # the same seed for all: paired
                        c0 = cpu_of(s)
                        latencies[s] += sequential(client, by[s].generate_url, body, 1, start=i).values
                        cpu[s] += cpu_of(s) - c0

            # 3. closed-loop turns, alternating
            loads: dict[str, list[LoadResult]] = {s: [] for s in STORES}
            for r in range(args.rounds):
                for s in STORES if r % 2 == 0 else reversed(STORES):
                    result = closed_loop(
                        by[s].generate_url, body, clients=args.clients, warmup_s=1.0, window_s=args.window
                    )
                    loads[s].append(result)
                    print(
                        f"  {s} · {args.clients} clients · round {r + 1}: {result.images_per_s:.1f} images/s",
                        flush=True,
                    )
    finally:
        cluster.stop()
    report(args, latencies, cpu, loads)


def report(
    args: argparse.Namespace,
    latencies: dict[str, list[float]],
    cpu: dict[str, float],
    loads: dict[str, list[LoadResult]],
) -> None:
    print(
        f"\n{args.size}x{args.size}, {args.steps} steps, tiny model; {args.pairs} one-client pairs, "
        f"{args.rounds} turns of {args.clients} clients x {args.window:.0f} s each; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"| job store | p50 ms, 1 client | vs sqlite, paired median | CPU ms per request | images/s, {args.clients} "
        "clients (median) | each turn |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for s in STORES:
        rates = [r.images_per_s for r in loads[s]]
        p50 = statistics.median(latencies[s]) * 1000
        diffs = [(p - q) * 1000 for p, q in zip(latencies[s], latencies["sqlite"], strict=True)]
        vs = "-" if s == "sqlite" else f"{statistics.median(diffs):+.2f} ms"
        each = ", ".join(f"{x:.1f}" for x in rates)
        row = f"| {s} | {p50:.1f} | {vs} | {cpu[s] * 1000 / args.pairs:.1f} | {statistics.median(rates):.1f} | {each} |"
        print(row)


if __name__ == "__main__":
    main()
