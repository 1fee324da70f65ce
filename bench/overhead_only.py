"""``python -m bench.overhead_only``: sdgate's own work per request, with a pipeline that returns at once.

Not a scenario of ``python -m bench``: a tool for changing the hot path. It runs ``sdgate serve`` with
:mod:`bench.instant_engine` (the real server, a pipeline that costs nothing) under closed-loop clients,
and reports requests/s and the CPU each request costs: on the event loop (the main thread), on the
server's other threads (the engine's, storage's), and in the client (this process, :mod:`bench.wire`). With
``--baseline SRC`` a second server runs the ``sdgate`` package of another checkout's ``src`` folder
(``git worktree add /tmp/base HEAD~1``, then ``--baseline /tmp/base/src``), and the two take turns in
interleaved rounds, the order reversed every other round: the ratio is this tree's against that one.

Beside a real model on two shared cores one run's ratios drift by ±15%; here by about ±5% on a quiet
machine, which lets a change of a tenth of a millisecond per request be seen. On a busy one it is
worse: on 2026-12-04 this tree against itself (``--baseline`` the same ``src``) read 0.75 and 0.91 at 8
clients within the hour. Run that A/A check first and trust a ratio only well outside it.

At 8 clients on the tiny model's 64x64 the time between two batches is about 8 x (server CPU per
request) plus the last client's turn.

``--model tiny`` runs the real tiny model instead (noisier), and ``--bare`` adds the bare pipeline called
in process (batch ``--clients``) as a third contender: the ratio that ``python -m bench``'s goal is about.

python -m bench.overhead_only                          # this tree alone: 8 clients, 6 rounds of 3 s
python -m bench.overhead_only --baseline /tmp/base/src --rounds 10
python -m bench.overhead_only --model tiny --bare      # the real model, against the bare pipeline
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench import servers
from bench.context import bare_batch_arm
from bench.load import closed_loop
from bench.pipeline import BarePipeline, Shape


@dataclass
class Turns:
    """One server's turns: requests/s and CPU milliseconds per request (loop, other threads, client)."""

    rate: list[float] = field(default_factory=list)
    cpu: list[tuple[float, float, float]] = field(default_factory=list)

    def median_cpu(self, i: int) -> float:
        return statistics.median(c[i] for c in self.cpu)


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds so far of process ``pid``'s main thread (the event loop) and of its other threads."""
    main = rest = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            seconds = servers.cpu_seconds_of(servers.proc_stat(Path(f"/proc/{pid}/task/{tid}/stat")))
        except OSError:
            continue  # a thread that ended meanwhile
        if tid == str(pid):
            main += seconds
        else:
            rest += seconds
    return main, rest


def start_server(models_dir: Path, log_dir: Path, name: str, src: str | None, *, instant: bool) -> servers.Server:
    """``sdgate serve``, on the instant engine when ``instant``; ``src``: another checkout's ``sdgate`` package."""
    extra = {"PYTHONPATH": src} if src else {}
    module = "bench.instant_engine" if instant else "sdgate.cli"
    return servers.sdgate(models_dir, log_dir, name=name, extra=extra, module=module)


def bare_turn(bare: BarePipeline, shape: Shape, clients: int, window_s: float, into: Turns) -> None:
    """Batches of ``clients`` images back to back in this process: images/s, no server CPU to report."""
    bare.for_duration(shape, 0.5, clients)
    before = os.times()
    result = bare_batch_arm(bare, shape, clients, window_s)(0)  # the peers scenario's ceiling, measured alike
    after = os.times()
    n = len(result.latencies.values) * clients
    into.rate.append(result.images_per_s)
    into.cpu.append((0.0, 0.0, ((after.user - before.user) + (after.system - before.system)) * 1000 / n))


def turn(server: servers.Server, shape: Shape, clients: int, window_s: float, into: Turns) -> None:
    server.resume()
    closed_loop(server.generate_url, shape.body, clients=clients, warmup_s=0, window_s=0.5)
    before, client_before = thread_cpu(server.proc.pid), os.times()
    result = closed_loop(server.generate_url, shape.body, clients=clients, warmup_s=0, window_s=window_s)
    after, client_after = thread_cpu(server.proc.pid), os.times()
    server.pause()
    n = len(result.latencies.values)
    client = (client_after.user - client_before.user) + (client_after.system - client_before.system)
    into.rate.append(result.images_per_s)
    into.cpu.append(((after[0] - before[0]) * 1000 / n, (after[1] - before[1]) * 1000 / n, client * 1000 / n))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead_only", description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="The src folder of another checkout to compare against.")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="Image width and height (default 64).")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--window", type=float, default=3.0, help="Seconds of each turn (default 3).")
    parser.add_argument("--model", choices=["instant", "tiny"], default="instant", help="instant (default) or tiny.")
    parser.add_argument("--bare", action="store_true", help="Add the bare pipeline in process (needs --model tiny).")
    args = parser.parse_args(argv)
    if args.bare and args.model != "tiny":
        parser.error("--bare needs --model tiny: the instant engine has no pipeline to call bare")

    shape = Shape(args.size, args.size)
    with tempfile.TemporaryDirectory(prefix="sdgate-overhead-") as work, servers.Fleet() as fleet:
        # 1. the servers (the instant engine reads the model's configs only, no weights), the bare pipeline
        models = servers.tiny_model_dir(Path(work) / "models").parent
        names = ["this tree"] + (["baseline"] if args.baseline else [])
        instant = args.model == "instant"
        started = {
            name: fleet.add(start_server(models, Path(work), name.replace(" ", "-"), src, instant=instant))
            for name, src in zip(names, [None, args.baseline], strict=False)
        }
        fleet.wait_ready()
        bare = BarePipeline(models) if args.bare else None
        for one in started.values():  # a first turn each, not measured: imports, caches, the date folder
            turn(one, shape, args.clients, 1.0, Turns())
        # 2. interleaved turns (every server paused while the bare pipeline runs)
        names += ["bare pipeline"] if bare else []
        turns = {name: Turns() for name in names}
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else reversed(names):
                if name in started:
                    turn(started[name], shape, args.clients, args.window, turns[name])
                else:
                    assert bare is not None
                    fleet.focus(None)
                    bare_turn(bare, shape, args.clients, args.window, turns[name])
                print(f"  round {r + 1} · {name}: {turns[name].rate[-1]:.0f} requests/s", file=sys.stderr)
    # 3. report
    print(f"{args.clients} clients, {shape.label}, {args.rounds} rounds of {args.window:g} s")
    print("| server | requests/s | loop ms/request | other threads ms/request | client ms/request |")
    print("|---|---|---|---|---|")
    for name, t in turns.items():
        rate = statistics.median(t.rate)
        loop, threads, client = (t.median_cpu(i) for i in range(3))
        print(f"| {name} | {rate:.0f} | {loop:.2f} | {threads:.2f} | {client:.2f} |")
    for other in ("baseline", "bare pipeline"):
        if other in turns:
            ratio = statistics.median(turns["this tree"].rate) / statistics.median(turns[other].rate)
            print(f"this tree / {other}: {ratio:.3f} (medians of requests/s)")


if __name__ == "__main__":
    main()
