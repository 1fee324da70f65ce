"""The eight scenarios of the suite. Each returns its tables and the goals of the issue it checks.

1. overhead: sdgate end to end against the same pipeline call in process, one request at a time.
2. concurrency: images/s and latency with 1, 4, 8, 16 clients, batching on and off.
3. payload: bytes and CPU of JumpStart's RGB lists, base64 JPEG, and sdgate's URL answer.
4. peers: sdgate, the plain FastAPI pattern, LitServe, and the bare batched pipeline, same load.
5. memory: sdgate's RSS after 100 and after 1000 requests.
6. switching: what a request costs when its model, or its LoRA, is not the last request's.
7. previews: what a live preview costs, against a denoising step.
8. inputs: image-to-image and inpainting throughput, against text-to-image.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import servers
from bench.context import (
    PAYLOAD_SERVER,
    SWITCH_SERVERS,
    Arm,
    Budget,
    Context,
    bare_batch_arm,
    bare_calls_arm,
    interleave,
    load_arm,
    sequential_arm,
)
from bench.load import Latencies, LoadError, LoadResult, requests_total, sequential
from bench.outcome import Goal, Outcome, Table, mean, ms, ratio
from bench.pipeline import Shape
from bench.wire import Wire

# -- 1. overhead ---------------------------------------------------------------------------------

_OVERHEAD_TARGETS = (1.03, 1.05)  # p50 ratio at the large size, at 64x64 (about 6 ms there)


def overhead(ctx: Context) -> Outcome:
    """Sync ``POST /v1/generations`` end to end against the same pipeline call in process, one at a time."""
    server = ctx.server("sdgate")
    table = Table(
        "Overhead: one request at a time, sdgate end to end vs the pipeline called in process",
        [
            "size",
            "sdgate p50 ms",
            "sdgate p95 ms",
            "in process p50 ms",
            "in process p95 ms",
            "ratio (median of pairs)",
            "ratio p95",
        ],
        note="4 steps, guidance 7.5, one image per request, one client, the two taking turns a request each "
        "(sdgate paused while the pipeline runs in process); the ratio is the median over the rounds of "
        "sdgate's latency / the call in process just before or after it. sdgate's time is the client's: HTTP, "
        "validation, the job record, the engine's queue, the pipeline, JPEG encoding, storing the image and its "
        "sidecar, the JSON answer. In process: the same pipeline call as sdgate's engine makes, nothing else.",
    )
    parts = Table(
        "Overhead: where sdgate's time went (medians of the timings it reports)",
        ["size", "client latency", "pipeline", "encode", "store", "queue", "HTTP, job record, answer"],
        note="Milliseconds. Store: the JPEG (written in place under its new key, fsynced) and its JSON sidecar "
        "(the same without the fsync). The last column is what is left of the client's latency.",
    )
    outcome = Outcome([table, parts])
    with Wire() as client:
        for size, target in zip(ctx.budget.overhead_sizes, _OVERHEAD_TARGETS, strict=True):
            shape = Shape(size, size)
            n = ctx.budget.overhead_calls[size]
            ctx.focus("sdgate")
            sequential(client, server.generate_url, shape.body, 1)  # the first request at this size
            ctx.focus(None)
            ctx.bare.latencies(shape, 1)
            answers: list[dict[str, Any]] = []
            got = interleave(
                ctx,
                f"overhead {shape.label}",
                {
                    "http": ("sdgate", sequential_arm(client, server, shape, 1, answers)),
                    "direct": (None, bare_calls_arm(ctx.bare, shape, 1)),
                },
                rounds=n,
            )
            http, direct = got["http"].latencies, got["direct"].latencies
            # Each round's two requests ran a moment apart: the median of their ratios leaves out the
            # machine's drift, which the ratio of the two medians keeps when it hits one system's turns more.
            r50 = statistics.median(h / d for h, d in zip(http.values, direct.values, strict=True))
            table.rows.append(
                [
                    shape.label,
                    ms(http.p50),
                    ms(http.p95),
                    ms(direct.p50),
                    ms(direct.p95),
                    ratio(r50),
                    ratio(http.p95 / direct.p95),
                ]
            )
            stage = {k: statistics.median(a["timings"][k] for a in answers) for k in ("inference", "encode", "store")}
            stage["queue"] = statistics.median(a["timings"]["queue"] for a in answers)
            rest = http.p50 * 1000 - sum(stage.values())
            parts.rows.append(
                [shape.label, f"{http.p50 * 1000:.1f}"] + [f"{stage[k]:.1f}" for k in stage] + [f"{rest:.1f}"]
            )
            why = (
                f"sdgate took {(http.p50 - direct.p50) * 1000:.1f} ms more than the {direct.p50 * 1000:.1f} ms "
                f"pipeline call in process (p50). Its own timings: the same call {stage['inference']:.1f} ms "
                "inside sdgate, "
                f"storing the JPEG and its sidecar {stage['store']:.1f} ms (one fsync, the image's), encoding "
                f"{stage['encode']:.1f} ms, and {rest:.1f} ms for HTTP on loopback, validation, the SQLite job "
                "record and the answer, with the load generator on the same two cores."
            )
            slower_ms = stage["inference"] - direct.p50 * 1000
            if slower_ms > 0.5 * (http.p50 - direct.p50) * 1000:
                why += (
                    f" Most of the difference is the pipeline call itself, {slower_ms:.1f} ms longer inside sdgate: "
                    "there it runs on the engine thread, next to the event loop and in a process whose client "
                    "shares the same two cores, while in process nothing else runs."
                )
            outcome.goals.append(
                Goal(
                    f"Overhead at {shape.label} (median of paired requests, sdgate / in process)",
                    f"≤ {target:.2f}",
                    ratio(r50, target),
                    r50 <= target,
                    why,
                )
            )
    return outcome


# -- 2. concurrency ------------------------------------------------------------------------------


def concurrency(ctx: Context) -> Outcome:
    """Closed-loop clients against sdgate with batching on (8) and off (``SDGATE_MAX_BATCH_SIZE=1``)."""
    on, off = ctx.server("sdgate"), ctx.server("sdgate-nobatch")
    shape = Shape(64, 64)
    b = ctx.budget
    table = Table(
        f"Concurrency: sdgate at {shape.label}, batching on vs off",
        [
            "clients",
            "on: images/s",
            "on: p50 ms",
            "on: p95 ms",
            "on: mean batch",
            "off: images/s",
            "off: p50 ms",
            "off: p95 ms",
            "on / off",
        ],
        note=f"Batching on: sdgate's defaults (SDGATE_MAX_BATCH_SIZE={_default('max_batch_size')}, "
        f"SDGATE_MAX_BATCH_WAIT_MS={_default('max_batch_wait_ms'):g}). Off: "
        "SDGATE_MAX_BATCH_SIZE=1. 4 steps. Mean batch: images per pipeline call during the load, from /metrics.",
    )
    outcome = Outcome([table])
    for clients in b.clients:
        warmup_s, window_s = b.warmup_s[64], b.window_s[64]
        results = interleave(
            ctx,
            f"concurrency {clients} clients",
            {
                "on": ("sdgate", load_arm(on, shape, clients, warmup_s, window_s)),
                "off": ("sdgate-nobatch", load_arm(off, shape, clients, warmup_s, window_s)),
            },
        )
        r_on, r_off = results["on"], results["off"]
        gain = r_on.images_per_s / r_off.images_per_s
        table.rows.append(
            [
                str(clients),
                f"{r_on.images_per_s:.1f}",
                ms(r_on.latencies.p50),
                ms(r_on.latencies.p95),
                f"{r_on.mean_batch:.1f}",
                f"{r_off.images_per_s:.1f}",
                ms(r_off.latencies.p50),
                ms(r_off.latencies.p95),
                ratio(gain),
            ]
        )
        if clients == 8:
            why = _batching_note(r_on.mean_batch, clients)
            outcome.goals.append(
                Goal("Batching on / off, 8 clients at 64x64 (images/s)", "≥ 2.00", ratio(gain, 2.0), gain >= 2.0, why)
            )
    return outcome


def _default(setting: str) -> Any:
    """sdgate's default for one of its settings."""
    from sdgate.config import Settings

    return Settings.model_fields[setting].default


def _batching_note(
    mean_batch: float, clients: int, cycle_ms: float | None = None, batch_ms: float | None = None
) -> str:
    """What the batch sizes sdgate reported say about a throughput goal it missed.

    ``cycle_ms``: sdgate's mean latency under that load; ``batch_ms``: the bare pipeline's mean call.
    """
    gap = ""
    if cycle_ms is not None and batch_ms is not None:
        gap = f" (a round took {cycle_ms:.0f} ms on average against {batch_ms:.0f} ms for the bare batch call)"
    between = (
        f"the time between batches{gap}, while the clients of the last one get their answers (encoded, stored "
        "with fsync, sent) and send their next requests, which the pipeline called in process does not spend"
    )
    if mean_batch < clients - 0.05:
        return (
            f"With {clients} clients sdgate's batches averaged {mean_batch:.1f} images (from its /metrics), not "
            f"{clients}: some batches started before every client of the previous one was back with its next "
            f"request. It also loses {between}."
        )
    return f"sdgate's batches were full ({mean_batch:.1f} images on average); what it loses is {between}."


# -- 3. payload ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    """One way to ask sdgate for an image."""

    label: str
    path: str
    accept: str | None


_RGB = _Answer("application/json (RGB lists)", "/invocations", "application/json")
_JPEG = _Answer("application/json;jpeg (base64 JPEG)", "/invocations", "application/json;jpeg")
_URL = _Answer("native: JSON with the image URL", "/v1/generations", None)


@dataclass
class _Costs:
    body_bytes: list[int] = field(default_factory=list)
    server_cpu_s: list[float] = field(default_factory=list)
    client_cpu_s: list[float] = field(default_factory=list)
    latencies: Latencies = field(default_factory=Latencies)
    image_bytes: int = 0


def _ask(client: Wire, server: servers.Server, answer: _Answer, body: dict[str, Any], costs: _Costs) -> None:
    headers = {"Accept": answer.accept} if answer.accept else {}
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    resp = client.post(server.url + answer.path, json=body, headers=headers)
    costs.latencies.values.append(time.perf_counter() - t0)
    costs.server_cpu_s.append(server.cpu_seconds() - cpu0)
    resp.raise_for_status()
    c0 = time.process_time()
    parsed = json.loads(resp.content)
    if answer is _JPEG:
        base64.b64decode(parsed["generated_images"][0])
    costs.client_cpu_s.append(time.process_time() - c0)
    costs.body_bytes.append(len(resp.content))
    if answer is _URL:
        costs.image_bytes = parsed["images"][0]["bytes"]


_PAYLOAD_PROMPT = "a red circle on a blue background"


def payload(ctx: Context) -> Outcome:
    """Size and CPU cost of the three ways to get an image back from sdgate."""
    server = ctx.server(PAYLOAD_SERVER)
    table = Table(
        "Payload: what a client receives for one image",
        [
            "size",
            "response",
            "body bytes",
            "bytes/pixel",
            "vs base64 JPEG",
            "server CPU ms/request",
            "client parse CPU ms",
            "latency p50 ms",
        ],
        note="The built-in `demo` model (trained on scenes of simple shapes: smooth images, as a real model "
        "makes; the tiny model's random weights make noise, JPEG's worst case), 1 step (the size is the point: "
        "the demo model takes 16 s for 4 steps at 768x768 here), the prompt "
        f"{_PAYLOAD_PROMPT!r}. `POST /invocations` with `Accept: application/json` "
        "answers JumpStart's RGB lists, with `Accept: application/json;jpeg` a base64 JPEG (quality 90); the "
        "native `POST /v1/generations` answers the URL of the stored JPEG (its size in the row below it). "
        "Server CPU: the server process's user+system time per request, the same generation included in every "
        "row; client parse: `json.loads` (+ base64 decode) of the body.",
    )
    outcome = Outcome([table])
    answers = (_RGB, _JPEG, _URL)
    ctx.focus(PAYLOAD_SERVER)
    with Wire() as client:
        for size in ctx.budget.payload_sizes:
            shape = Shape(size, size, steps=1, prompt=_PAYLOAD_PROMPT)
            costs = {a: _Costs() for a in answers}
            _ask(client, server, _RGB, shape.body(0), _Costs())  # the first request at this size
            # Bytes do not drift with the machine: two rounds (one each way) are enough for the CPU columns.
            for r in range(min(ctx.budget.rounds, 2)):
                for answer in answers if r % 2 == 0 else reversed(answers):
                    for i in range(ctx.budget.payload_calls):
                        _ask(client, server, answer, shape.body(r * 100 + i), costs[answer])
            jpeg_bytes = mean(costs[_JPEG].body_bytes)
            for answer in answers:
                c = costs[answer]
                body_bytes = mean(c.body_bytes)
                table.rows.append(
                    [
                        shape.label,
                        answer.label,
                        f"{body_bytes:,.0f}",
                        f"{body_bytes / size**2:.2f}",
                        f"{body_bytes / jpeg_bytes:.2f}x",
                        f"{mean(c.server_cpu_s) * 1000:.0f}",
                        f"{mean(c.client_cpu_s) * 1000:.1f}",
                        ms(c.latencies.p50),
                    ]
                )
            image_bytes = costs[_URL].image_bytes
            table.rows.append(
                [shape.label, "(the JPEG behind that URL)", f"{image_bytes:,}", f"{image_bytes / size**2:.2f}"]
                + [""] * 4
            )
            if size == ctx.budget.payload_sizes[-1]:
                rgb_bytes = mean(costs[_RGB].body_bytes)
                smaller = rgb_bytes / jpeg_bytes
                why = (
                    f"The RGB lists take {rgb_bytes / size**2:.1f} bytes per pixel whatever the picture; the base64 "
                    f"JPEG takes {jpeg_bytes / size**2:.2f} on the demo model's images (base64 adds a third to the "
                    "JPEG's bytes)."
                )
                outcome.goals.append(
                    Goal(
                        f"`application/json` / `application/json;jpeg` bytes at {shape.label}",
                        "≥ 20",
                        f"{smaller:.1f}",
                        smaller >= 20,
                        why,
                    )
                )
    return outcome


# -- 4. peers ------------------------------------------------------------------------------------

PEERS = ("sdgate", "plain", "litserve")


def peers(ctx: Context) -> Outcome:
    """sdgate against the plain pattern, LitServe and the bare batched pipeline, under the same load."""
    b = ctx.budget
    ctx.launch(set(PEERS))
    table = Table(
        "Peers: the same model, machine and load",
        ["size", "clients", "system", "images/s", "p50 ms", "p95 ms", "vs bare pipeline"],
        note="plain: a FastAPI route calling the pipeline under a lock, answering image/jpeg "
        "(bench/peers/plain.py). LitServe: max_batch_size=8, batch_timeout=0.05 s (request timeout 600 s, like "
        "sdgate's sync timeout here), answering base64 JPEG in JSON (bench/peers/litserve_server.py). sdgate: "
        f"its defaults with {ctx.torch_threads} torch threads like everyone else, answering the URL of the "
        "stored JPEG; mean batch: images per pipeline call, from its /metrics. Bare "
        "pipeline: called in process back to back, batch 8 for 8 clients and batch 1 for one client; the "
        f"one-client row's systems take turns a request each ({ctx.budget.single_client_calls} rounds); the "
        "ceiling, with no HTTP, encoding or storage at all. 4 steps, guidance 7.5, JPEG quality 90 "
        "everywhere.",
    )
    outcome = Outcome([table])
    measured: dict[tuple[int, int], dict[str, LoadResult]] = {}
    large = b.peer_large
    http = Wire()
    for size, clients in ((64, 8), (large, 8), (64, 1)):
        shape = Shape(size, size)
        warmup_s, window_s = b.warmup_s[size], b.window_s[size]
        ctx.focus(None)
        ctx.bare.latencies(shape, 1, clients)  # the first call at this size and batch
        arms: dict[str, Arm]
        rounds = None
        if clients == 1:  # a request each per round: latency pairs a moment apart
            rounds = b.single_client_calls
            arms = {name: (name, sequential_arm(http, ctx.server(name), shape, 1)) for name in PEERS}
            arms["bare"] = (None, bare_calls_arm(ctx.bare, shape, 1))
            for name in PEERS:  # each server's first request at this size, outside the measurement
                ctx.focus(name)
                sequential(http, ctx.server(name).generate_url, shape.body, 1)
        else:
            arms = {name: (name, load_arm(ctx.server(name), shape, clients, warmup_s, window_s)) for name in PEERS}
            arms["bare"] = (None, bare_batch_arm(ctx.bare, shape, clients, window_s))
        results = interleave(ctx, f"peers {shape.label} {clients} clients", arms, rounds)
        measured[(size, clients)] = results
        ceiling = results["bare"].images_per_s
        for name, r in results.items():
            label = f"bare pipeline, batch {clients}" if name == "bare" else name
            if name == "sdgate" and clients > 1:
                label += f" (mean batch {r.mean_batch:.1f})"
            table.rows.append(
                [
                    shape.label,
                    str(clients),
                    label,
                    f"{r.images_per_s:.1f}",
                    ms(r.latencies.p50),
                    ms(r.latencies.p95),
                    f"{r.images_per_s / ceiling:.0%}",
                ]
            )
    http.close()
    outcome.goals += _peer_goals(measured, large)
    return outcome


def _peer_goals(measured: dict[tuple[int, int], dict[str, LoadResult]], large: int) -> list[Goal]:
    at64, at_large, one = measured[(64, 8)], measured[(large, 8)], measured[(64, 1)]

    def throughput(what: str, at: dict[str, LoadResult], peer: str, target: float) -> Goal:
        sd = at["sdgate"]
        value = sd.images_per_s / at[peer].images_per_s
        why = _batching_note(sd.mean_batch, sd.clients, sd.latencies.mean * 1000, at["bare"].latencies.mean * 1000)
        if peer == "litserve":
            why += f" LitServe's batches fill for up to 50 ms; its p50 latency was {ms(at[peer].latencies.p50)} ms."
        if peer == "bare":
            return Goal(what, f"≥ {target:.0%}", f"{value:.0%}", value >= target, why)
        return Goal(what, f"≥ {target:.2f}", ratio(value, target), value >= target, why)

    goals = [
        throughput("sdgate / plain pattern, 8 clients at 64x64 (images/s)", at64, "plain", 2.0),
        throughput("sdgate / LitServe (batch 8), 8 clients at 64x64 (images/s)", at64, "litserve", 1.2),
        throughput("sdgate / bare batched pipeline, 8 clients at 64x64", at64, "bare", 0.90),
        throughput(f"sdgate / bare batched pipeline, 8 clients at {large}x{large}", at_large, "bare", 0.95),
    ]
    for peer in ("plain", "litserve"):
        mine, theirs = one["sdgate"].latencies.p50, one[peer].latencies.p50
        why = (
            f"sdgate {ms(mine)} ms against {ms(theirs)} ms, the bare pipeline {ms(one['bare'].latencies.p50)} ms; "
            "sdgate also records the job and writes the image and its sidecar to disk before it answers."
        )
        goals.append(
            Goal(
                f"p50 latency at 1 client, 64x64: sdgate / {peer}",
                "≤ 1.00",
                ratio(mine / theirs, 1.0),
                mine <= theirs,
                why,
            )
        )
    return goals


# -- 5. memory -----------------------------------------------------------------------------------


def memory(ctx: Context) -> Outcome:
    """Resident memory of a fresh sdgate server after 100 and after 1000 requests (8 clients, 64x64)."""
    name = "sdgate-memory" if ctx.budget.fresh_memory_server else "sdgate"
    server = ctx.server(name)
    shape = Shape(64, 64)
    marks = ctx.budget.memory_marks
    table = Table(
        "Memory: sdgate's resident set size (RSS) under load",
        ["requests served", "RSS MiB"],
        note="A fresh server (its own data directory), 8 closed-loop clients at 64x64, 4 steps; RSS of the "
        "server process half a second after the last answer.",
    )
    ctx.focus(name)
    rss = {0: server.rss_bytes()}
    done = 0
    for mark in marks:
        done += requests_total(server.generate_url, shape.body, clients=8, total=mark - done, start=done)
        time.sleep(0.5)
        rss[mark] = server.rss_bytes()
    ctx.focus(None)
    for n, value in rss.items():
        table.rows.append([f"{n:,}" + (" (ready, warmed up)" if n == 0 else ""), f"{value / 2**20:.0f}"])
    first, last = marks[0], marks[-1]
    growth = (rss[last] - rss[first]) / rss[first]
    grown_mib = (rss[last] - rss[first]) / 2**20
    goal = Goal(
        f"RSS growth from {first:,} to {last:,} requests",
        "≤ 5%",
        f"{growth:+.1%} ({grown_mib:+.0f} MiB)",
        growth <= 0.05,
        f"RSS grew by {grown_mib:.0f} MiB over {last - first:,} requests: memory that grows with the requests "
        "served is a leak to find.",
    )
    return Outcome([table], [goal])


# -- 6. switching --------------------------------------------------------------------------------

_LORA_WEIGHT = 0.8
_SWITCH_TARGETS = (1.10, 1.10)
"""p50 ratios: the other resident model / the same model again; the other loaded LoRA / the same LoRA again."""


@dataclass
class _Series:
    """Requests of one kind: the client's latency, and the engine's time (sdgate's ``inference`` timing)."""

    latencies: Latencies = field(default_factory=Latencies)
    engine_ms: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return self.latencies.p50

    @property
    def engine_p50_ms(self) -> float:
        return statistics.median(self.engine_ms) if self.engine_ms else float("nan")

    def paired(self, steady: _Series) -> float:
        """The median over cycles of this request's latency / the steady request's of the same cycle.

        The i-th request of each series was made in the same cycle, a second or so apart: a burst of other
        work on the machine slows both, where it would move a ratio of the two medians.
        """
        mine, theirs = self.latencies.values, steady.latencies.values
        assert len(mine) == len(theirs), "one request of each kind per cycle"
        return statistics.median(m / t for m, t in zip(mine, theirs, strict=True))

    def cells(self, steady: _Series) -> list[str]:
        """Requests, p50 ms, engine p50 ms, the paired ratio to ``steady``."""
        return [str(len(self.engine_ms)), ms(self.p50), f"{self.engine_p50_ms:.1f}", ratio(self.paired(steady))]


class _Asker:
    """One client's sync requests to one sdgate server, each with its own seed; checks what each answer ran."""

    def __init__(self, client: Wire, server: servers.Server, shape: Shape):
        self.client, self.server, self.shape = client, server, shape
        self.sent = 0

    def __call__(self, model: str, lora: str | None = None, into: _Series | None = None) -> float:
        """Seconds for one request for ``model``, with ``lora`` (weight 0.8) or none."""
        body = self.shape.body(self.sent) | {"model": model}
        if lora is not None:
            body["loras"] = [{"name": lora, "weight": _LORA_WEIGHT}]
        self.sent += 1
        t0 = time.perf_counter()
        resp = self.client.post(self.server.generate_url, json=body)
        seconds = time.perf_counter() - t0
        if resp.status_code != 200:
            raise LoadError(f"POST {self.server.generate_url} answered {resp.status_code}: {resp.text[:500]}")
        answer = resp.json()
        ran = (answer["model"], [lo["name"] for lo in answer["loras"]])
        if ran != (model, [lora] if lora else []):
            raise LoadError(f"asked for model {model} with LoRA {lora}; the answer ran {ran}")
        if into is not None:
            into.latencies.values.append(seconds)
            into.engine_ms.append(answer["timings"]["inference"])
        return seconds


def _counter(server: servers.Server, name: str) -> float:
    """One of sdgate's counters from its /metrics (0 if absent)."""
    found = re.search(rf"^sdgate_{name}_total (\S+)$", httpx.get(server.url + "/metrics", timeout=10).text, re.M)
    return float(found.group(1)) if found else 0.0


@dataclass
class _Switches:
    """One server's model switches: requests for the same model as the last one, and for the other."""

    same: _Series = field(default_factory=_Series)
    other: _Series = field(default_factory=_Series)
    loads: float = 0.0
    """Models loaded (and unloaded) while measuring, from its /metrics."""
    unloads: float = 0.0


def switching(ctx: Context) -> Outcome:
    """A model switch (one model in memory, and both) and a LoRA switch, each against a steady request."""
    shape = Shape(64, 64)
    ctx.launch(set(SWITCH_SERVERS))
    with Wire() as client:
        ask = {name: _Asker(client, ctx.server(name), shape) for name in SWITCH_SERVERS}
        models = _model_switches(ctx, ask)
        loras = _lora_switches(ctx, ask[_LORA_SERVER])
    outcome = Outcome([_model_table(models, shape, ctx.switch_assets.other_model), _lora_table(loras, shape)])
    resident = models["sdgate-models-2"]
    value, target = resident.other.paired(resident.same), _SWITCH_TARGETS[0]
    outcome.goals.append(
        Goal(
            f"Switching between two resident models, {shape.label} (the other model / the same again)",
            f"≤ {target:.2f}",
            ratio(value, target),
            value <= target,
            f"With both models in memory ({resident.loads:.0f} loads while measuring) a request for the other model "
            f"took {ms(resident.other.p50)} ms against {ms(resident.same.p50)} ms for the same model again; in the "
            f"engine {resident.other.engine_p50_ms:.1f} ms against {resident.same.engine_p50_ms:.1f} ms.",
        )
    )
    same, alternate = loras.series["same"], loras.series["alternate"]
    value, target = alternate.paired(same), _SWITCH_TARGETS[1]
    outcome.goals.append(
        Goal(
            f"Switching between two loaded LoRAs, {shape.label} (the other LoRA / the same again)",
            f"≤ {target:.2f}",
            ratio(value, target),
            value <= target,
            f"A request with the other of two loaded LoRAs took {ms(alternate.p50)} ms against {ms(same.p50)} ms "
            f"with the same LoRA again; in the engine {alternate.engine_p50_ms:.1f} ms against "
            f"{same.engine_p50_ms:.1f} ms. Every LoRA request turns its set on (set_adapters) and every call turns "
            "the LoRAs off after itself, whether the next request keeps them or not.",
        )
    )
    return outcome


def _model_switches(ctx: Context, ask: dict[str, _Asker]) -> dict[str, _Switches]:
    """Per server, pairs of requests: one for the other model than the last request's, then one repeating it."""
    a, b = servers.SWITCH_MODELS
    got = {name: _Switches() for name in SWITCH_SERVERS}
    for name in SWITCH_SERVERS:
        ctx.focus(name)
        ask[name](b)  # the first request for b (a was loaded and warmed up at start)
        ask[name](a)
        got[name].loads = -_counter(ask[name].server, "model_loads")
        got[name].unloads = -_counter(ask[name].server, "model_unloads")
    last = dict.fromkeys(SWITCH_SERVERS, a)
    names = list(SWITCH_SERVERS)
    for r in range(ctx.budget.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            ctx.focus(name)
            for _ in range(ctx.budget.switch_pairs):
                model = b if last[name] == a else a
                ask[name](model, into=got[name].other)
                ask[name](model, into=got[name].same)
                last[name] = model
            ctx.say(
                f"  switching models · {name} · round {r + 1}: other model p50 {ms(got[name].other.p50)} ms, "
                f"same model p50 {ms(got[name].same.p50)} ms"
            )
    for name in SWITCH_SERVERS:
        ctx.focus(name)  # a paused server does not answer /metrics
        got[name].loads += _counter(ask[name].server, "model_loads")
        got[name].unloads += _counter(ask[name].server, "model_unloads")
    ctx.focus(None)
    return got


_LORA_SERVER = "sdgate-models-2"


_LORA_ROWS = {
    # kind: (phase, what the row says)
    "none": (1, "no LoRA (steady)"),
    "same": (1, "the same LoRA as the last request"),
    "alternate": (1, "the other of two loaded LoRAs (alternating)"),
    "none-first": (2, "no LoRA (steady)"),
    "first": (2, "a LoRA not loaded yet (its first request)"),
    "none-many": (3, "no LoRA (steady)"),
    "same-many": (3, "the same LoRA as the last request"),
}


@dataclass
class _LoraRuns:
    """The LoRA requests' series by kind, in three phases of cycles (see :func:`_lora_switches`)."""

    series: dict[str, _Series] = field(default_factory=lambda: {k: _Series() for k in _LORA_ROWS})
    firsts: list[float] = field(default_factory=list)
    """Seconds of the server's first two LoRA requests ever."""
    loaded: int = 0
    """LoRAs loaded into the model at the end."""


def _lora_switches(ctx: Context, ask: _Asker) -> _LoraRuns:
    """Cycles of requests for model ``a``, each cycle one request of each kind of its phase.

    A change in the machine's load hits every kind of a phase alike; each phase has its own steady
    (no LoRA) requests. 1: with the two LoRAs L and M loaded: no LoRA; L (unmeasured); L again (the
    same LoRA); M (the other loaded one); L and M swap every cycle. 2: no LoRA; a file no request has
    named yet (loaded now). 3: the same as 1 without M, with phase 2's LoRAs loaded too. Phase 2 comes
    after 1 because a loaded LoRA stays loaded, and the number loaded changes what a request costs.
    """
    assets = ctx.switch_assets
    a = servers.SWITCH_MODELS[0]
    x, y = servers.SWITCH_LORAS
    cycles = ctx.budget.rounds * ctx.budget.lora_calls
    # LoRAs no request has named yet: copies of x under names of their own (an adapter is loaded per name)
    fresh = [f"first-{k}" for k in range(cycles)]
    for name in fresh:
        shutil.copyfile(assets.lora_path(x), assets.lora_path(name))
    runs = _LoraRuns()
    got = runs.series
    ctx.focus(_LORA_SERVER)
    runs.firsts = [ask(a, x), ask(a, y)]
    for k in range(cycles):
        this, that = (x, y) if k % 2 == 0 else (y, x)
        ask(a, None, into=got["none"])
        ask(a, this)
        ask(a, this, into=got["same"])
        ask(a, that, into=got["alternate"])
    for k in range(cycles):
        ask(a, None, into=got["none-first"])
        ask(a, fresh[k], into=got["first"])
    for _ in range(cycles):
        ask(a, None, into=got["none-many"])
        ask(a, x)
        ask(a, x, into=got["same-many"])
    runs.loaded = len(servers.SWITCH_LORAS) + cycles
    for phase in (1, 2, 3):
        ctx.say(
            f"  switching LoRAs · phase {phase}: p50 "
            + ", ".join(f"{kind} {ms(got[kind].p50)} ms" for kind, (ph, _) in _LORA_ROWS.items() if ph == phase)
        )
    ctx.focus(None)
    return runs


def _model_table(got: dict[str, _Switches], shape: Shape, other_model: Path) -> Table:
    a, b = servers.SWITCH_MODELS
    mib = sum(f.stat().st_size for f in other_model.rglob("*") if f.is_file()) / 2**20
    one, two = got["sdgate-models-1"], got["sdgate-models-2"]
    table = Table(
        f"Switching models: one client at {shape.label}, a request for the other model vs the same one again",
        ["SDGATE_MAX_LOADED_MODELS", "request", "requests", "p50 ms", "engine p50 ms", "ratio to steady"],
        note=f"Two sdgate servers, two rows each, both offering two models (`SDGATE_MODELS={a}=tiny,{b}=<dir>`: "
        f"the tiny model, and the same architecture with other random weights, {mib:.0f} MiB of files), one "
        "client, 4 steps. The requests come in pairs: one for the other model than the last request's, then one "
        "for that model again (the steady one). A ratio is the median over the pairs of the first request's "
        "latency / the second's (a second or so apart, so that a burst of other work slows both). With "
        "SDGATE_MAX_LOADED_MODELS=1 the first of a pair unloads the model in memory (garbage collected, freed "
        "heap handed back) and loads the other from disk (warm page cache): while measuring, that server counted "
        f"{one.loads:.0f} model loads and {one.unloads:.0f} unloads (its /metrics). With 2 both stay in memory "
        f"({two.loads:.0f} loads while measuring). Engine: sdgate's own `inference` timing, from the batch's "
        "start to the end of the pipeline call, the load included. A real model's files (2 to 7 GB) take "
        "seconds to load, so the ratio with one model in memory is the tiny model's, not a real one's; with both "
        "in memory a switch reads nothing.",
    )
    for label, switches in (("1", one), ("2", two)):
        table.rows.append([label, "the same model as the last request (steady)", *switches.same.cells(switches.same)])
        what = "the other model: unload one, load it" if label == "1" else "the other model, both in memory"
        table.rows.append([label, what, *switches.other.cells(switches.same)])
    return table


def _lora_table(runs: _LoraRuns, shape: Shape) -> Table:
    x, y = servers.SWITCH_LORAS
    got = runs.series
    two, many = len(servers.SWITCH_LORAS), runs.loaded
    table = Table(
        f"Switching LoRAs: one client at {shape.label}, requests with and without a LoRA",
        ["LoRAs loaded in the model", "request", "requests", "p50 ms", "engine p50 ms", "ratio to no LoRA"],
        note=f"One sdgate server, model a (tiny), one client, 4 steps, each LoRA at weight {_LORA_WEIGHT} (rank 4 on "
        "the UNet's attention projections, made by tests/loras.py). Three phases, one after the other, each made "
        "of cycles of one request of each of its kinds, so that a change in the machine's load hits them alike; "
        "a ratio is the median over its phase's cycles of the request's latency / that cycle's no-LoRA request's. "
        "1: no LoRA; "
        f"`{x}` (not counted); `{x}` again (the same LoRA as the last request); `{y}` (the other loaded LoRA); "
        f"`{x}` and `{y}` swap roles every cycle. 2: no LoRA; a LoRA file no request had named (its first request: "
        "sdgate reads the file, checks that it fits the model and loads it into the model's PEFT layers before "
        f"the call; these files are copies of `{x}` under new names). 3: phase 1 without the other LoRA, now that "
        f"phase 2's LoRAs are loaded too (sdgate keeps every LoRA it has loaded). The server's first two LoRA "
        "requests ever, before the phases (the first also wraps the model's layers for PEFT), took "
        f"{' and '.join(f'{s * 1000:.0f}' for s in runs.firsts)} ms. Engine: sdgate's own `inference` timing, "
        "from the batch's start to the end of the pipeline call, the LoRA's load and set_adapters included. A "
        "LoRA that is on runs its layers beside the model's at every step (it is not merged into the weights): "
        "that, not the switch, is what separates the LoRA rows from the steady ones, and on the tiny model, "
        "whose layers are small, it weighs more than on a real one.",
    )
    steady = {1: got["none"], 2: got["none-first"], 3: got["none-many"]}
    loaded = {1: str(two), 2: f"{two} → {many}", 3: str(many)}
    for kind, (phase, label) in _LORA_ROWS.items():
        table.rows.append([loaded[phase], label, *got[kind].cells(steady[phase])])
    return table


# -- 7. previews ---------------------------------------------------------------------------------

_PREVIEW_TARGET = 0.05
"""A preview may cost at most this share of one denoising step."""


def previews(ctx: Context) -> Outcome:
    """What a live preview costs: the same generation in process with a preview after every step, and without.

    The engine of ``sdgate serve`` with the built-in ``demo`` model (the trained one, its own CPU
    threads), 64x64 and 20 steps, one image a call; the two kinds alternate so that the machine's
    noise falls on both. A preview is what the job receives: the latent-to-RGB picture and its JPEG.
    """
    import tempfile

    from sdgate.config import Settings
    from sdgate.engine.runner import Engine
    from sdgate.imaging import preview_jpeg
    from sdgate.schemas import GenerationParams, Previews

    steps, calls = 20, (2 if ctx.budget.rounds == 1 else 8)
    made: list[int] = []
    wanted = {"now": False}

    def send(step: int, image: Any) -> None:
        preview_jpeg(image)
        made.append(step)

    sink = Previews(wanted=lambda: wanted["now"], send=send)
    params = GenerationParams(
        prompt="a red circle on a blue background",
        negative_prompt=None,
        width=64,
        height=64,
        num_inference_steps=steps,
        guidance_scale=5.0,
        seeds=(1,),
        scheduler=None,
        output_format="png",
        quality=90,
    )
    ctx.focus(None)
    with tempfile.TemporaryDirectory(prefix="sdgate-bench-previews-") as tmp:
        engine = Engine(Settings(data_dir=Path(tmp), model="demo", device="cpu", preview_every=1, max_batch_wait_ms=0))
        engine.start()
        engine.wait_ready(300)
        try:
            engine.submit(params, previews=Previews(wanted=lambda: True, send=send)).result(300)  # fits the map
            made.clear()
            times: dict[bool, list[float]] = {False: [], True: []}
            for i in range(calls * 2):
                wanted["now"] = i % 2 == 1
                times[wanted["now"]].append(engine.submit(params, previews=sink).result(300).inference_ms / 1000)
            # One preview alone, timed directly: the difference of the two medians is within the noise.
            import torch

            previewer = engine.models.get_resident("demo").previewer
            latents = torch.randn(4, 8, 8)
            reps = 50 if ctx.budget.rounds == 1 else 500
            t0 = time.perf_counter()
            for _ in range(reps):
                preview_jpeg(previewer.picture(latents, (64, 64)))
            per_preview = (time.perf_counter() - t0) / reps
        finally:
            engine.close()
    off, with_previews = statistics.median(times[False]), statistics.median(times[True])
    per_step = off / steps
    share = per_preview / per_step
    table = Table(
        "Previews: what a live preview costs",
        ["generation (demo, 64x64, 20 steps, in process)", "calls", "p50 ms", "per step ms"],
        [
            ["no previews", str(len(times[False])), ms(off), ms(per_step)],
            ["a preview after every step", str(len(times[True])), ms(with_previews), ms(with_previews / steps)],
        ],
        note=f"{len(made)} previews made ({steps - 1} a call). One preview (latents to picture to JPEG, timed "
        f"alone over {reps}): {per_preview * 1000:.2f} ms, {share:.2%} of a step; with the default "
        f"SDGATE_PREVIEW_EVERY=5, {share / 5:.2%} of the generation. Previews are made only while someone "
        "asks for them.",
    )
    goal = Goal(
        "a live preview, against one denoising step",
        f"≤ {_PREVIEW_TARGET:.0%}",
        f"{share:.2%}",
        share <= _PREVIEW_TARGET,
        f"a preview took {per_preview * 1000:.2f} ms against a step of {per_step * 1000:.1f} ms",
    )
    return Outcome([table], [goal])


# -- 8. image inputs -----------------------------------------------------------------------------


def _input_pictures(size: int) -> tuple[str, str]:
    """An input image (a smooth gradient with a disc) and a mask over its left half, as base64 PNG."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size))
    image.putdata([(4 * x % 256, 4 * y % 256, 128) for y in range(size) for x in range(size)])
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 40, 40))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, size // 2 - 1, size - 1), fill=255)
    encoded = []
    for picture in (image, mask):
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        encoded.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return encoded[0], encoded[1]


def inputs(ctx: Context) -> Outcome:
    """Image-to-image and inpainting against text-to-image: 8 closed-loop clients at 64x64, one sdgate."""
    server = ctx.server("sdgate")
    shape = Shape(64, 64)
    b = ctx.budget
    image, mask = _input_pictures(shape.width)
    modes: dict[str, Callable[[int], dict[str, Any]]] = {
        "text to image": shape.body,
        "image to image, strength 0.75": lambda i: {**shape.body(i), "image": image, "strength": 0.75},
        "inpainting, half the image masked": lambda i: {**shape.body(i), "image": image, "mask": mask},
    }
    table = Table(
        f"Image inputs: 8 clients at {shape.label}, text-to-image against image-to-image and inpainting",
        ["request", "images/s", "p50 ms", "p95 ms", "mean batch", "vs text to image"],
        note=f"One sdgate server (its defaults), 8 closed-loop clients, {shape.steps} steps, each request with "
        f"its input in base64 PNG in the JSON body ({len(image):,} characters; the mask {len(mask):,}). "
        "Image-to-image at strength 0.75 runs 3 of the 4 steps; inpainting runs all 4 and pastes the kept "
        "half back. Every request's input is decoded, checked and stored (private) before its job is "
        "recorded, so a job that runs again after a restart has it.",
    )
    ctx.focus("sdgate")
    with Wire() as client:
        for body in modes.values():  # each mode's first requests (its pipeline is made on first use)
            sequential(client, server.generate_url, body, 2)
    arms: dict[str, Arm] = {
        name: ("sdgate", load_arm(server, shape, 8, b.warmup_s[64], b.window_s[64], body))
        for name, body in modes.items()
    }
    results = interleave(ctx, "inputs", arms)
    base = results["text to image"].images_per_s
    for name, r in results.items():
        table.rows.append(
            [
                name,
                f"{r.images_per_s:.1f}",
                ms(r.latencies.p50),
                ms(r.latencies.p95),
                f"{r.mean_batch:.1f}",
                f"{r.images_per_s / base:.2f}",
            ]
        )
    return Outcome([table])


SCENARIOS: dict[str, Callable[[Context], Outcome]] = {
    "overhead": overhead,
    "concurrency": concurrency,
    "payload": payload,
    "peers": peers,
    "memory": memory,
    "switching": switching,
    "previews": previews,
    "inputs": inputs,
}
"""Scenario name → function, in the order they run."""


def servers_for(names: list[str], budget: Budget) -> set[str]:
    """The servers the chosen scenarios need; the suite starts them all at once."""
    needed = {
        "overhead": {"sdgate"},
        "concurrency": {"sdgate", "sdgate-nobatch"},
        "payload": {PAYLOAD_SERVER},
        "peers": set(PEERS),
        "memory": {"sdgate-memory" if budget.fresh_memory_server else "sdgate"},
        "switching": set(SWITCH_SERVERS),
        "previews": set(),
        "inputs": {"sdgate"},
    }
    return set().union(*(needed[n] for n in names))
