"""What every scenario shares: the model, the servers, the budget, and the interleaved comparison.

Every comparison is made inside one run, interleaved: the systems being compared take turns in
short rounds (the order reversed every other round), so that a change in the machine's background
load hits all of them alike instead of whichever happened to run at that moment. During a turn only
the server being measured runs; the others are paused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import servers
from bench.load import Body, LoadResult, closed_loop, sequential
from bench.pipeline import BarePipeline, Shape
from bench.wire import Wire


@dataclass(frozen=True)
class Budget:
    """How much of everything to run: the full suite, or the smoke test's tiny counts."""

    rounds: int = 4
    """Turns of each system per comparison. Four short ones rather than two long ones: this machine's speed
    drifts by up to half within a minute (the same pipeline call took 87 and 134 ms in two turns a few
    seconds apart), and more turns spread that drift over every system alike."""
    overhead_sizes: tuple[int, int] = (512, 64)
    """The large and the small size of the overhead scenario (the goals: ≤ 1.03 and ≤ 1.05)."""
    overhead_calls: dict[int, int] = field(default_factory=lambda: {512: 12, 64: 40})
    """Requests per system at each size of the overhead scenario, one per round (paired a moment apart)."""
    single_client_calls: int = 40
    """Requests per system in the one-client row of the peers scenario, one per round."""
    peer_large: int = 256
    """The larger size of the peers scenario (the smaller is 64x64)."""
    clients: tuple[int, ...] = (1, 4, 8, 16)
    warmup_s: dict[int, float] = field(default_factory=lambda: {64: 0.7, 256: 2.0})
    window_s: dict[int, float] = field(default_factory=lambda: {64: 1.5, 256: 2.5})
    payload_sizes: tuple[int, ...] = (512, 768)
    payload_calls: int = 1
    memory_marks: tuple[int, ...] = (100, 1000)
    fresh_memory_server: bool = True
    switch_pairs: int = 4
    """Model switches per server per round of the switching scenario, each followed by a repeat."""
    lora_calls: int = 4
    """Cycles of LoRA requests (one of each kind) per round of the switching scenario."""


FULL = Budget()
SMOKE = Budget(
    rounds=1,
    overhead_sizes=(128, 64),
    overhead_calls={128: 1, 64: 2},
    single_client_calls=2,
    peer_large=128,
    clients=(1, 8),
    warmup_s={64: 0.2, 128: 0.2},
    window_s={64: 0.5, 128: 0.5},
    payload_sizes=(128,),
    payload_calls=1,
    memory_marks=(4, 12),
    fresh_memory_server=False,
    switch_pairs=1,
    lora_calls=1,
)


PAYLOAD_SERVER = "sdgate-demo"
"""The payload scenario's server: the built-in demo model, whose images are smooth like a real model's."""
SWITCH_SERVERS = {"sdgate-models-1": 1, "sdgate-models-2": 2}
"""The switching scenario's servers (both models, the LoRAs) by their SDGATE_MAX_LOADED_MODELS."""


@dataclass
class Context:
    """The shared state of one run."""

    models_dir: Path
    model_dir: Path
    log_dir: Path
    budget: Budget
    fleet: servers.Fleet
    torch_threads: int
    """torch's default thread count here; every system gets it (sdgate through SDGATE_TORCH_THREADS)."""
    verbose: bool = True
    _by_name: dict[str, servers.Server] = field(default_factory=dict)
    _bare: BarePipeline | None = None
    _switch_assets: servers.SwitchAssets | None = None

    @property
    def bare(self) -> BarePipeline:
        """The pipeline in this process, loaded on first use."""
        if self._bare is None:
            self._bare = BarePipeline(self.models_dir)
        return self._bare

    @property
    def switch_assets(self) -> servers.SwitchAssets:
        """The second model and the LoRA files of the switching scenario, built on first use."""
        if self._switch_assets is None:
            self._switch_assets = servers.switch_assets(self.model_dir, self.models_dir.parent)
        return self._switch_assets

    def launch(self, names: set[str], wait: bool = True) -> None:
        """Start the named servers at once (their models load in parallel); wait until all are ready.

        The switching servers start last: the files they offer are built while the others load.
        """
        for name in sorted(names - set(self._by_name), key=lambda n: (n in SWITCH_SERVERS, n)):
            if name == "plain":
                server = servers.plain(self.model_dir, self.log_dir)
            elif name == "litserve":
                server = servers.litserve(self.model_dir, self.log_dir)
            else:
                batch = 1 if name == "sdgate-nobatch" else 8
                extra = {"SDGATE_TORCH_THREADS": str(self.torch_threads)}  # the peers' and the baseline's
                if name == PAYLOAD_SERVER:
                    extra["SDGATE_MODEL"] = "demo"
                if name in SWITCH_SERVERS:
                    assets = self.switch_assets
                    extra |= {
                        "SDGATE_MODELS": assets.models_env,
                        "SDGATE_MAX_LOADED_MODELS": str(SWITCH_SERVERS[name]),
                        "SDGATE_LORA_DIR": str(assets.lora_dir),
                    }
                server = servers.sdgate(self.models_dir, self.log_dir, max_batch_size=batch, name=name, extra=extra)
            self._by_name[name] = self.fleet.add(server)
        if wait:
            self.fleet.wait_ready()

    def server(self, name: str) -> servers.Server:
        if name not in self._by_name:
            self.launch({name})
        return self._by_name[name]

    def say(self, line: str) -> None:
        """A progress line on the terminal (not in the report)."""
        if self.verbose:
            print(line, flush=True)

    def focus(self, name: str | None) -> None:
        """Let only the named server run (None: none, for the pipeline in process)."""
        self.fleet.focus(None if name is None else self.server(name))


# -- interleaved comparisons ---------------------------------------------------------------------

Measure = Callable[[int], LoadResult]
"""One turn of one system in a comparison; its argument is the round number."""

Arm = tuple[str | None, Measure]
"""A system in a comparison: the server it loads (None: the pipeline in process) and its measurement."""


def interleave(ctx: Context, label: str, arms: dict[str, Arm], rounds: int | None = None) -> dict[str, LoadResult]:
    """Give every arm one turn per round, odd rounds in reverse order; merge each arm's turns.

    ``rounds``: the budget's unless given. Many rounds of one request each pair the systems' requests
    a fraction of a second apart, where this machine's drift (seconds long) hits them alike.
    """
    merged: dict[str, LoadResult] = {}
    names = list(arms)
    rounds = ctx.budget.rounds if rounds is None else rounds
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            server_name, measure = arms[name]
            ctx.focus(server_name)
            result = measure(r)
            if rounds <= ctx.budget.rounds:
                ctx.say(
                    f"  {label} · {name} · round {r + 1}: {result.images_per_s:.1f} images/s, "
                    f"p50 {result.latencies.p50 * 1000:.0f} ms"
                )
            if name in merged:
                merged[name].merge(result)
            else:
                merged[name] = result
    ctx.focus(None)
    if rounds > ctx.budget.rounds:
        for name, result in merged.items():
            ctx.say(f"  {label} · {name} · {rounds} rounds: p50 {result.latencies.p50 * 1000:.0f} ms")
    return merged


def engine_counters(server: servers.Server) -> tuple[float, float]:
    """(images, pipeline calls) so far, from sdgate's /metrics."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    images = re.search(r"^sdgate_images_total (\S+)$", text, re.M)
    calls = re.search(r"^sdgate_pipeline_calls_total (\S+)$", text, re.M)
    return (float(images.group(1)) if images else 0.0, float(calls.group(1)) if calls else 0.0)


def load_arm(
    server: servers.Server,
    shape: Shape,
    clients: int,
    warmup_s: float,
    window_s: float,
    body: Body | None = None,
) -> Measure:
    """Closed-loop clients against a server; for sdgate also the images per pipeline call it reports.

    ``body``: request ``i``'s JSON body, ``shape.body`` unless given.
    """
    is_sdgate = server.generate_path == "/v1/generations"
    body = shape.body if body is None else body

    def measure(_r: int) -> LoadResult:
        before = engine_counters(server) if is_sdgate else (0.0, 0.0)
        result = closed_loop(server.generate_url, body, clients=clients, warmup_s=warmup_s, window_s=window_s)
        if is_sdgate:
            after = engine_counters(server)
            result.engine_images, result.engine_calls = after[0] - before[0], after[1] - before[1]
        return result

    return measure


def sequential_arm(
    client: Wire,
    server: servers.Server,
    shape: Shape,
    n: int,
    answers: list[dict[str, object]] | None = None,
) -> Measure:
    """``n`` requests one at a time; with ``answers``, their JSON answers go there."""

    def measure(r: int) -> LoadResult:
        return LoadResult(1, 1, sequential(client, server.generate_url, shape.body, n, r * n, answers))

    return measure


def bare_calls_arm(bare: BarePipeline, shape: Shape, n: int) -> Measure:
    """``n`` single-image calls of the pipeline in process."""

    def measure(r: int) -> LoadResult:
        return LoadResult(1, 1, bare.latencies(shape, n, start=r * n))

    return measure


def bare_batch_arm(bare: BarePipeline, shape: Shape, batch: int, window_s: float) -> Measure:
    """Back-to-back pipeline calls of ``batch`` images for ``window_s``: the throughput ceiling."""

    def measure(_r: int) -> LoadResult:
        return LoadResult(batch, 1, bare.for_duration(shape, window_s, batch), window_s)

    return measure
