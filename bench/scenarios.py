"""The five scenarios of the suite. Each returns its tables and the goals of the issue it checks.

1. overhead: sdgate end to end against the same pipeline call in process, one request at a time.
2. concurrency: images/s and latency with 1, 4, 8, 16 clients, batching on and off.
3. payload: bytes and CPU of JumpStart's RGB lists, base64 JPEG, and sdgate's URL answer.
4. peers: sdgate, the plain FastAPI pattern, LitServe, and the bare batched pipeline, same load.
5. memory: sdgate's RSS after 100 and after 1000 requests.
"""

from __future__ import annotations

import base64
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench import servers
from bench.context import (
    Arm,
    Budget,
    Context,
    bare_batch_arm,
    bare_calls_arm,
    interleave,
    load_arm,
    sequential_arm,
)
from bench.load import Latencies, LoadResult, requests_total, sequential
from bench.outcome import Goal, Outcome, Table, mean, ms, ratio
from bench.pipeline import Shape

# -- 1. overhead ---------------------------------------------------------------------------------

_OVERHEAD_TARGETS = (1.03, 1.10)  # p50 ratio at the large size, at 64x64


def overhead(ctx: Context) -> Outcome:
    """Sync ``POST /v1/generations`` end to end against the same pipeline call in process, one at a time."""
    server = ctx.server("sdgate")
    table = Table(
        "Overhead: one request at a time, sdgate end to end vs the pipeline called in process",
        ["size", "sdgate p50 ms", "sdgate p95 ms", "in process p50 ms", "in process p95 ms", "ratio p50", "ratio p95"],
        note="4 steps, guidance 7.5, one image per request, one client. sdgate's time is the client's: HTTP, "
        "validation, the job record, the engine's queue, the pipeline, JPEG encoding, storing the image and its "
        "sidecar, the JSON answer. In process: the same pipeline call as sdgate's engine makes, nothing else.",
    )
    parts = Table(
        "Overhead: where sdgate's time went (medians of the timings it reports)",
        ["size", "client latency", "pipeline", "encode", "store", "queue", "HTTP, job record, answer"],
        note="Milliseconds. Store: the JPEG and its JSON sidecar, each written to a temporary file, fsynced and "
        "renamed. The last column is what is left of the client's latency.",
    )
    outcome = Outcome([table, parts])
    with httpx.Client(timeout=300) as client:
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
                    "http": ("sdgate", sequential_arm(client, server, shape, n, answers)),
                    "direct": (None, bare_calls_arm(ctx.bare, shape, n)),
                },
            )
            http, direct = got["http"].latencies, got["direct"].latencies
            r50 = http.p50 / direct.p50
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
                f"storing the JPEG and its sidecar {stage['store']:.1f} ms (two fsynced files), encoding "
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
                    f"Overhead at {shape.label} (p50, sdgate / in process)",
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


def _ask(client: httpx.Client, server: servers.Server, answer: _Answer, body: dict[str, Any], costs: _Costs) -> None:
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


def payload(ctx: Context) -> Outcome:
    """Size and CPU cost of the three ways to get an image back from sdgate."""
    server = ctx.server("sdgate")
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
        note="1 step (the size is the point, not the model). `POST /invocations` with `Accept: application/json` "
        "answers JumpStart's RGB lists, with `Accept: application/json;jpeg` a base64 JPEG (quality 90); the "
        "native `POST /v1/generations` answers the URL of the stored JPEG (its size in the row below it). "
        "Server CPU: the server process's user+system time per request, the same generation included in every "
        "row; client parse: `json.loads` (+ base64 decode) of the body.",
    )
    outcome = Outcome([table])
    answers = (_RGB, _JPEG, _URL)
    ctx.focus("sdgate")
    with httpx.Client(timeout=300) as client:
        for size in ctx.budget.payload_sizes:
            shape = Shape(size, size, steps=1)
            costs = {a: _Costs() for a in answers}
            _ask(client, server, _RGB, shape.body(0), _Costs())  # the first request at this size
            for r in range(ctx.budget.rounds):
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
                    f"JPEG takes {jpeg_bytes / size**2:.2f} here because the tiny model's random-weight images are "
                    "noise, JPEG's worst case. A real model's smooth images compress several times better, so with "
                    "them the ratio is several times higher."
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
        "ceiling, with no HTTP, encoding or storage at all. 4 steps, guidance 7.5, JPEG quality 90 "
        "everywhere.",
    )
    outcome = Outcome([table])
    measured: dict[tuple[int, int], dict[str, LoadResult]] = {}
    large = b.peer_large
    for size, clients in ((64, 8), (large, 8), (64, 1)):
        shape = Shape(size, size)
        warmup_s, window_s = b.warmup_s[size], b.window_s[size]
        ctx.focus(None)
        ctx.bare.latencies(shape, 1, clients)  # the first call at this size and batch
        arms: dict[str, Arm] = {
            name: (name, load_arm(ctx.server(name), shape, clients, warmup_s, window_s)) for name in PEERS
        }
        arms["bare"] = (None, bare_batch_arm(ctx.bare, shape, clients, window_s))
        results = interleave(ctx, f"peers {shape.label} {clients} clients", arms)
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


SCENARIOS: dict[str, Callable[[Context], Outcome]] = {
    "overhead": overhead,
    "concurrency": concurrency,
    "payload": payload,
    "peers": peers,
    "memory": memory,
}
"""Scenario name → function, in the order they run."""


def servers_for(names: list[str], budget: Budget) -> set[str]:
    """The servers the chosen scenarios need; the suite starts them all at once."""
    needed = {
        "overhead": {"sdgate"},
        "concurrency": {"sdgate", "sdgate-nobatch"},
        "payload": {"sdgate"},
        "peers": set(PEERS),
        "memory": {"sdgate-memory" if budget.fresh_memory_server else "sdgate"},
    }
    return set().union(*(needed[n] for n in names))
