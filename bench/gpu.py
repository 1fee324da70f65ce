"""GPU benchmark: a full-size Stable Diffusion 2.1-base pipeline, fp16, 512x512, 50 steps.

The pipeline is built from SD 2.1-base's public configs (OpenCLIP-H-sized text encoder, the 865M
UNet, the standard VAE) with random weights: the same FLOPs as the real model, no download. Measured
in one run, on one GPU:

1. the bare diffusers pipeline called in process, batch 1 and batch 8 (the ceiling for a server);
2. the same with channels-last memory format;
3. ``sdgate serve`` (a real server process on loopback, HTTP, JPEG encoding, storage) with 1 and 8
   concurrent clients, batching on and off, and with ``SDGATE_COMPILE=1``, then restarted on the same
   data directory (its compile caches kept there);
4. a turbo-class load: the bare pipeline and sdgate at ``TURBO_STEPS`` (4) steps;
5. ``torch.compile`` of the UNet (compile time reported separately), batch 1 and batch 8.

Servers start through :mod:`bench.servers` and take load through :mod:`bench.wire`, as in the CPU
suite. Phases run in that order and each is skipped when it would not finish before ``--budget-s``,
so a run always leaves its results. Writes ``gpu.json`` and ``gpu.md`` to ``--out``.

    PYTHONPATH=src python3 -m bench.gpu --out /tmp/gpu-results
    PYTHONPATH=src python3 -m bench.gpu --out /tmp/gpu-smoke --smoke --phases server,turbo   # on a CPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import servers
from bench.wire import AsyncConnection

# Overridden only by --smoke (a CPU dry run of the harness at a tiny size).
STEPS = 50
TURBO_STEPS = 4
SIZE = 512
DEVICE = "cuda"
GUIDANCE = 7.5
PROMPT = "a photograph of an astronaut riding a horse"

# stabilityai/stable-diffusion-2-1-base, as published (unet/, text_encoder/, vae/ config.json).
UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
}
TEXT = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "act_fn": "silu",
}


class Clock:
    """The run's time budget: a phase starts only if its estimate fits."""

    def __init__(self, budget_s: float):
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def fits(self, estimate_s: float) -> bool:
        return self.left() > estimate_s


def log(msg: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_pipeline(target: Path) -> Any:
    """SD 2.1-base with random weights, fp16 on the GPU, saved to ``target`` for the server to load."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdgate.engine.builtin import ensure_builtin, sd_pipeline

    torch.manual_seed(0)
    with torch.device(DEVICE):
        unet = UNet2DConditionModel(**UNET)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT))
        vae = AutoencoderKL(**VAE)
    # Any CLIP tokenizer will do for timing (token ids only index the embedding): the built-in tiny one.
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(ensure_builtin("tiny", target.parent / "models") / "tokenizer"))
    pipe = sd_pipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet).to(
        torch.float16 if DEVICE == "cuda" else torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(target), safe_serialization=True)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    log(f"built SD 2.1-base architecture (UNet {params:.0f}M parameters) and saved it to {target}")
    return pipe


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_bare(pipe: Any, batch: int, steps: int | None = None) -> float:
    """One pipeline call of ``batch`` images (``steps``, default ``STEPS``); seconds, synchronised."""
    import torch

    gens = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        pipe(
            [PROMPT] * batch,
            negative_prompt=[""] * batch,
            num_inference_steps=steps or STEPS,
            guidance_scale=GUIDANCE,
            width=SIZE,
            height=SIZE,
            generator=gens,
            output_type="pil",
        )
    sync()
    return time.perf_counter() - t0


def bare_rows(
    pipe: Any, label: str, clock: Clock, reps: dict[int, int], rows: list[dict[str, Any]], steps: int | None = None
) -> None:
    for batch, n in reps.items():
        first = run_bare(pipe, batch, steps)  # warm-up (and, compiled, the compile for this shape)
        times = []
        for _ in range(n):
            if not clock.fits(first * 1.2 + 30):
                break
            times.append(run_bare(pipe, batch, steps))
        if not times:
            log(f"{label} batch {batch}: out of time after the warm-up call ({first:.1f} s)")
            continue
        p50 = statistics.median(times)
        row = {
            "what": label,
            "clients_or_batch": f"batch {batch}",
            "images_per_s": batch / p50,
            "p50_s": p50,
            "first_call_s": first,
            "calls": len(times),
        }
        rows.append(row)
        log(f"{label} batch {batch}: {row['images_per_s']:.2f} images/s, {p50:.2f} s per call (first {first:.1f} s)")


def start_sdgate(model_dir: Path, work: Path, label: str, extra: dict[str, str]) -> tuple[servers.Server, float]:
    """``sdgate serve`` on the SD 2.1-base directory, through the suite's one launcher; and its seconds until ready."""
    env = {
        "SDGATE_MODEL": str(model_dir),
        "SDGATE_DEVICE": DEVICE,
        "SDGATE_DTYPE": "float16" if DEVICE == "cuda" else "float32",
        "SDGATE_QUEUE_SIZE": "256",
        "SDGATE_LOG_FORMAT": "text",
        **extra,
    }
    t0 = time.perf_counter()
    server = servers.sdgate(model_dir.parent, work, name=re.sub(r"[^A-Za-z0-9]+", "-", label), extra=env)
    server.wait_ready(timeout=900)
    return server, time.perf_counter() - t0


async def load(
    url: str, clients: int, per_client: int, steps: int
) -> tuple[float, list[float], list[dict[str, float]]]:
    """``clients`` closed-loop clients, ``per_client`` requests each: (images/s, latencies, job timings)."""
    body = {
        "prompt": PROMPT,
        "width": SIZE,
        "height": SIZE,
        "num_inference_steps": steps,
        "guidance_scale": GUIDANCE,
        "output_format": "jpeg",
    }
    latencies: list[float] = []
    timings: list[dict[str, float]] = []

    async def client(i: int) -> None:
        connection = AsyncConnection(url)  # the load client of the CPU suite, a kept-alive connection each
        try:
            for j in range(per_client):
                t0 = time.perf_counter()
                resp = await connection.post({**body, "seed": i * 1000 + j})
                resp.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                timings.append(resp.json().get("timings") or {})
        finally:
            await connection.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    return clients * per_client / wall, latencies, timings


def server_rows(
    model_dir: Path,
    work: Path,
    label: str,
    extra: dict[str, str],
    plan: list[tuple[int, int]],
    clock: Clock,
    per_image_s: float,
    rows: list[dict[str, Any]],
    warmup_clients: int = 0,
    steps: int | None = None,
) -> float:
    """Rows of ``label``'s server under ``plan`` (clients, requests each); returns its seconds until ready."""
    steps = steps or STEPS
    server, ready_s = start_sdgate(model_dir, work, label, extra)
    log(f"{label}: server ready in {ready_s:.1f} s")
    try:
        for clients, per_client in plan:
            if not clock.fits(clients * per_client * per_image_s * 1.5 + 20):
                log(f"{label} {clients} clients: skipped (time)")
                continue
            url = server.generate_url
            asyncio.run(load(url, warmup_clients or clients, 1, steps))  # warm-up: one round, not counted
            before = batch_totals(server.url)
            rate, lat, timings = asyncio.run(load(url, clients, per_client, steps))
            after = batch_totals(server.url)
            row = {
                "what": label,
                "clients_or_batch": f"{clients} clients",
                "images_per_s": rate,
                "p50_s": statistics.median(lat),
                "p95_s": sorted(lat)[max(0, round(0.95 * len(lat)) - 1)],
                "requests": len(lat),
                "job_ms": {
                    k: round(statistics.median(t.get(k, 0.0) for t in timings), 1)
                    for k in ("queue", "inference", "encode", "store", "total")
                },
            }
            row["mean_batch_images"] = (after[0] - before[0]) / max(after[1] - before[1], 1.0)
            rows.append(row)
            log(
                f"{label} {clients} clients: {rate:.2f} images/s, p50 {row['p50_s']:.2f} s, "
                f"{row['mean_batch_images']:.2f} images per call, job ms {row['job_ms']}"
            )
    finally:
        server.stop()
    return ready_s


def batch_totals(url: str) -> tuple[float, float]:
    """(sum, count) of the images per pipeline call of every job so far, from /metrics."""
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in metrics.splitlines():
        for name in ("sdgate_job_batch_images_sum", "sdgate_job_batch_images_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values.get("sdgate_job_batch_images_sum", 0.0), values.get("sdgate_job_batch_images_count", 0.0)


def versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except FileNotFoundError:
        smi = ""
    return {
        "gpu": smi or (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_cores": str(os.cpu_count()),
    }


def markdown(result: dict[str, Any]) -> str:
    v = result["versions"]
    lines = [
        f"Measured {result['date']} on **{v['gpu']}** ({v['cpu_cores']} CPU cores), torch {v['torch']} "
        f"(CUDA {v['cuda']}), diffusers {v['diffusers']}, transformers {v['transformers']}, Python {v['python']}.",
        "",
        f"Model: Stable Diffusion 2.1-base architecture from its public configs, random weights, "
        f"{'fp16' if DEVICE == 'cuda' else 'float32'}, "
        f"{SIZE}x{SIZE}, {STEPS} Euler steps, guidance {GUIDANCE}. Command: `{result['command']}`.",
        "",
        "| what | load | images/s | p50 s | p95 s | notes |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        notes = []
        if "first_call_s" in r:
            notes.append(f"first call {r['first_call_s']:.1f} s")
        if "requests" in r:
            notes.append(f"{r['requests']} requests, {r['mean_batch_images']:.1f} images per pipeline call")
        p95 = f"{r['p95_s']:.2f}" if "p95_s" in r else "—"
        lines.append(
            f"| {r['what']} | {r['clients_or_batch']} | {r['images_per_s']:.2f} | {r['p50_s']:.2f} | {p95} "
            f"| {', '.join(notes)} |"
        )
    if result.get("starts"):  # until /readyz: model loaded and warmed up (compiled, with SDGATE_COMPILE=1)
        lines += ["", *(f"- {start['what']}: ready in {start['ready_s']:.1f} s" for start in result["starts"])]
    if result.get("skipped"):
        lines += ["", "Skipped for lack of time: " + "; ".join(result["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument(
        "--phases",
        default="channels_last,server,nobatch,server_compile,restart,turbo,compile",
        help="which phases to run after the bare pipeline (comma-separated)",
    )
    ap.add_argument("--smoke", action="store_true", help="dry-run the harness on the CPU: 64x64, 2 steps")
    args = ap.parse_args()
    if args.smoke:
        global STEPS, SIZE, DEVICE
        STEPS, SIZE, DEVICE = 2, 64, "cpu"
    clock = Clock(args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "command": f"PYTHONPATH=src python3 -m bench.gpu --out OUT --budget-s {args.budget_s:g} --phases {args.phases}",
        "versions": versions(),
        "rows": rows,
        "skipped": [],
        "starts": [],
    }

    def save() -> None:
        (args.out / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "gpu.md").write_text(markdown(result))

    import torch

    work = Path(tempfile.mkdtemp(prefix="sdgate-gpu-"))
    model_dir = work / "sd21-base-random"

    # 1. build, then the bare pipeline
    pipe = build_pipeline(model_dir)
    bare_rows(pipe, "bare diffusers", clock, {1: 3, 8: 2}, rows)
    save()
    per_image = min((r["p50_s"] / int(r["clients_or_batch"].split()[1]) for r in rows), default=3.0)

    phases = set(args.phases.split(","))

    # 2. channels-last
    if "channels_last" in phases and clock.fits(60):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        bare_rows(pipe, "bare + channels_last", clock, {1: 3, 8: 2}, rows)
        pipe.unet.to(memory_format=torch.contiguous_format)
        pipe.vae.to(memory_format=torch.contiguous_format)
    elif "channels_last" in phases:
        result["skipped"].append("channels_last")
    save()

    # 3. sdgate, batching on (its default) and off, and with SDGATE_COMPILE=1
    if "server" in phases:
        server_rows(model_dir, work, "sdgate", {}, [(1, 3), (8, 2)], clock, per_image, rows)
        save()
    if "server_wait" in phases and clock.fits(60):
        wait = {"SDGATE_MAX_BATCH_WAIT_MS": "1000"}
        server_rows(model_dir, work, "sdgate batch wait 1 s", wait, [(8, 2)], clock, per_image, rows)
        save()
    if "nobatch" in phases and clock.fits(90):
        off = {"SDGATE_MAX_BATCH_SIZE": "1"}
        server_rows(model_dir, work, "sdgate batching off", off, [(8, 1)], clock, per_image * 2, rows, warmup_clients=1)
    elif "nobatch" in phases:
        result["skipped"].append("sdgate batching off")
    save()
    # One data directory for both starts: the second finds the compile caches the first left there.
    compiled = {"SDGATE_COMPILE": "1", "SDGATE_DATA_DIR": str(work / "data-compile")}
    if "server_compile" in phases and clock.fits(240):
        first = server_rows(
            model_dir, work, "sdgate + SDGATE_COMPILE=1", compiled, [(1, 3), (8, 2)], clock, per_image, rows
        )
        result["starts"].append({"what": "sdgate + SDGATE_COMPILE=1, first start", "ready_s": round(first, 1)})
        if "restart" in phases and clock.fits(120):
            again = server_rows(
                model_dir, work, "sdgate + SDGATE_COMPILE=1, restarted", compiled, [], clock, per_image, rows
            )
            result["starts"].append({"what": "the same, restarted on its data dir", "ready_s": round(again, 1)})
    elif "server_compile" in phases:
        result["skipped"].append("sdgate with SDGATE_COMPILE=1")
    save()

    # 4. a turbo-class load: the same architecture at TURBO_STEPS, where sdgate's fixed costs show most
    if "turbo" in phases and clock.fits(90):
        turbo_rows = {1: 10, 8: 4}
        bare_rows(pipe, f"bare diffusers, {TURBO_STEPS} steps", clock, turbo_rows, rows, steps=TURBO_STEPS)
        plan = [(1, 10), (8, 4)]
        per_turbo = per_image * TURBO_STEPS / STEPS
        server_rows(
            model_dir, work, f"sdgate, {TURBO_STEPS} steps", {}, plan, clock, per_turbo, rows, steps=TURBO_STEPS
        )
    elif "turbo" in phases:
        result["skipped"].append(f"{TURBO_STEPS} steps")
    save()

    # 5. torch.compile in process (last: its compile time is the least predictable)
    if "compile" in phases and clock.fits(150):
        pipe.unet = torch.compile(pipe.unet)
        bare_rows(pipe, "bare + torch.compile", clock, {1: 3, 8: 2}, rows)
    elif "compile" in phases:
        result["skipped"].append("torch.compile")
    save()
    log(f"done, {clock.left():.0f} s of the budget left")


if __name__ == "__main__":
    main()
