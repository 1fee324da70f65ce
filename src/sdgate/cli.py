"""The ``sdgate`` command line.

Every setting is a flag here and an ``SDGATE_*`` environment variable; flags win.
"""

from __future__ import annotations

import base64
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args

import click
from pydantic import ValidationError

from sdgate.config import Settings
from sdgate.errors import SdgateError
from sdgate.schemas import parse_loras

F = TypeVar("F", bound=Callable[..., Any])
_FORMATS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}
_INPUT = click.Path(exists=True, dir_okay=False, path_type=Path)


def settings_options(func: F) -> F:
    """Add one ``--flag`` per :class:`Settings` field (``SDGATE_X`` ↔ ``--x``)."""
    for name, field in reversed(list(Settings.model_fields.items())):
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description or ''} [env: SDGATE_{name.upper()}]"
        if field.annotation is bool:
            func = click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=None, help=help_text)(func)
        else:
            choices = get_args(field.annotation)
            if choices and all(isinstance(c, str) for c in choices):
                func = click.option(flag, name, type=click.Choice(choices), default=None, help=help_text)(func)
            else:
                func = click.option(flag, name, default=None, help=help_text)(func)
    return func


def build_settings(options: dict[str, Any]) -> Settings:
    """Settings from flags (when given) over environment variables; a bad value is a clean error."""
    given = {k: v for k, v in options.items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**given)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise click.UsageError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
    if settings.sagemaker:
        settings = settings.with_sagemaker_defaults(set(given) | _env_names())
    return settings


def _env_names() -> set[str]:
    import os

    return {k[len("SDGATE_") :].lower() for k in os.environ if k.startswith("SDGATE_")}


def _setup_logging(level: str, fmt: str = "text") -> None:
    from sdgate import logs

    logs.setup(level, fmt)


@click.group()
@click.version_option(package_name="sdgate")
def main() -> None:
    """sdgate: Stable Diffusion behind an open HTTP API."""


@main.command()
@settings_options
def serve(**options: Any) -> None:
    """Start the HTTP server (default http://127.0.0.1:8000, the built-in model)."""
    import uvicorn

    from sdgate.api import create_app

    # 1. settings and logging
    settings = build_settings(options)
    _setup_logging(settings.log_level, settings.log_format)
    # 2. app (a database it cannot reach is a one-line error, not a traceback)
    try:
        app = create_app(settings)
    except ConnectionError as e:
        raise click.ClickException(str(e)) from None
    # Through logging, not a bare echo: when the log is JSON lines, every line of it is JSON.
    logging.getLogger("sdgate").info("sdgate serving %s on http://%s:%d", settings.model, settings.host, settings.port)
    # 3. serve until SIGINT/SIGTERM
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # logging is set up above (JSON lines with request ids)
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )


@main.command()
@click.argument("prompt")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("out.jpg"),
    show_default=True,
    help="Where to write the image (.jpg, .png or .webp).",
)
@click.option("--url", help="Generate on a running sdgate server instead of in process.")
@click.option("--negative-prompt", help="What to avoid.")
@click.option("--width", type=int, help="Image width (multiple of 8).")
@click.option("--height", type=int, help="Image height (multiple of 8).")
@click.option("--steps", "num_inference_steps", type=int, help="Denoising steps.")
@click.option("--guidance-scale", type=float, help="Classifier-free guidance scale.")
@click.option("--seed", type=int, help="Seed (image i uses seed + i).")
@click.option("-n", "--num-images", type=int, default=1, show_default=True, help="How many images.")
@click.option("--scheduler", help="euler, euler_a, ddim, dpmpp_2m, pndm, lms or unipc.")
@click.option(
    "--image",
    "image_path",
    type=_INPUT,
    help="Start from this image (image-to-image): PNG, JPEG or WebP. The size defaults to its own.",
)
@click.option(
    "--mask", "mask_path", type=_INPUT, help="With --image: repaint where this mask is white (or transparent)."
)
@click.option(
    "--strength", type=float, help="With --image: how far from it, 0 < s <= 1 (default 0.8; 1.0 with --mask)."
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="NAME[:WEIGHT]",
    help="Apply a LoRA from the LoRA directory (weight 1 if left out); repeat for several.",
)
@click.option("--async", "use_async", is_flag=True, help="With --url: submit a job and follow its progress events.")
@settings_options
def generate(
    prompt: str,
    output: Path,
    url: str | None,
    use_async: bool,
    image_path: Path | None,
    mask_path: Path | None,
    loras: tuple[str, ...],
    **options: Any,
) -> None:
    """Generate an image from PROMPT (and --image, to start from a picture) and write it to --output."""
    fmt = _FORMATS.get(output.suffix.lower())
    if fmt is None:
        raise click.UsageError(f"--output must end in .jpg, .png or .webp, got {output.name!r}")
    if mask_path is not None and image_path is None:
        raise click.UsageError("--mask needs --image: the mask says which part of the image to repaint")
    request_fields = (
        "negative_prompt",
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
        "seed",
        "num_images",
        "scheduler",
        "strength",
    )
    body = {k: options.pop(k) for k in request_fields if options.get(k) is not None}
    for k in request_fields:
        options.pop(k, None)
    body.update(prompt=prompt, output_format=fmt)
    if loras:
        try:
            body["loras"] = parse_loras(",".join(loras))
        except ValueError as e:
            raise click.UsageError(f"--lora: {e}") from None
    # Images go as in a JSON request, in base64: the server (or the service in process) checks them.
    for name, path in (("image", image_path), ("mask", mask_path)):
        if path is not None:
            body[name] = base64.b64encode(path.read_bytes()).decode("ascii")
    try:
        if url:
            outputs = _generate_remote(url, body, output, use_async)
        else:
            settings = build_settings(options)
            _setup_logging("warning" if settings.log_level == "info" else settings.log_level)
            outputs = _generate_local(settings, body, output)
    except SdgateError as e:
        raise click.ClickException(e.message) from None
    for path, seed in outputs:
        click.echo(f"{path}  seed={seed}")


def _generate_remote(url: str, body: dict[str, Any], output: Path, use_async: bool) -> list[tuple[Path, int]]:
    from tqdm import tqdm

    from sdgate.client import generate_remote

    with tqdm(desc="generating", unit="step", file=sys.stderr) as bar:

        def progress(step: int, total: int) -> None:
            if total and bar.total != total:
                bar.total = total
                bar.refresh()
            bar.update(step - bar.n)

        return generate_remote(url, body, output, use_async=use_async, on_progress=progress)


def _output_paths(output: Path, n: int) -> list[Path]:
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(n)]


def _generate_local(settings: Settings, body: dict[str, Any], output: Path) -> list[tuple[Path, int]]:
    """In process, through the same generation service as the server: the job is recorded and its
    images stored under the data dir like any other; the files are written from the stored bytes."""
    import asyncio

    from sdgate.errors import InvalidRequest
    from sdgate.generation import read_inputs
    from sdgate.schemas import GenerationRequest

    # 1. check inputs before loading anything, the input images included
    try:
        request = GenerationRequest(**body)
    except ValidationError as e:
        first = e.errors()[0]
        raise InvalidRequest(
            f"{'.'.join(str(p) for p in first['loc'])}: {first['msg'].removeprefix('Value error, ')}"
        ) from None
    read_inputs(request, settings)
    # 2. load, generate, store
    job = asyncio.run(_run_in_process(settings.model_copy(update={"warmup": False}), request))
    # 3. write the stored bytes
    paths = _output_paths(output, len(job.outputs))
    for path, out in zip(paths, job.outputs, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(out.data)
    return [(p, out.image.seed) for p, out in zip(paths, job.outputs, strict=True)]


async def _run_in_process(settings: Settings, request: Any) -> Any:
    from tqdm import tqdm

    from sdgate.generation import Caller
    from sdgate.generation.in_process import in_process
    from sdgate.schemas import Surface

    async with in_process(settings) as service:
        runner = service.jobs
        with tqdm(desc=f"loading {settings.model}", bar_format="{desc} {elapsed}", file=sys.stderr):
            await runner.wait_ready(timeout=settings.backend_timeout_s)
        generation = await service.generate([request], surface=Surface.cli, caller=Caller(), wait_s=None)
        job = generation.job
        with tqdm(total=job.params.steps_to_run, desc="generating", unit="step", file=sys.stderr) as bar:
            async for event in runner.events(job.id):
                step = int(event.data.get("progress", {}).get("step", bar.n)) if event.name else bar.n
                bar.update(step - bar.n)
        generation.raise_for_failure()
        return job


@main.group()
def keys() -> None:
    """Create, list and revoke API keys (stored hashed: under SDGATE_DATA_DIR, or in PostgreSQL with
    SDGATE_JOB_STORE=postgres and SDGATE_POSTGRES_URL, where every API node sees them)."""


def _key_store(data_dir: str | None) -> Any:
    from sdgate.auth import open_keys

    return open_keys(build_settings({"data_dir": data_dir}))


_data_dir_option = click.option("--data-dir", help="State directory [env: SDGATE_DATA_DIR].")


@keys.command("create")
@click.option("--name", required=True, help="Who or what the key is for.")
@click.option("--rate", type=click.IntRange(min=1), help="Generation requests per minute (default: server setting).")
@click.option("--quota", type=click.IntRange(min=1), help="Images per day (default: server setting).")
@_data_dir_option
def keys_create(name: str, rate: int | None, quota: int | None, data_dir: str | None) -> None:
    """Create a key and print it once; only its hash is stored."""
    plain, key = _key_store(data_dir).create(name, rate, quota)
    click.echo(plain)
    click.echo(f"key id {key.id} for {name!r}: store it now, it cannot be shown again", err=True)


@keys.command("list")
@_data_dir_option
def keys_list(data_dir: str | None) -> None:
    """All keys (ids and names, never the keys themselves)."""
    import datetime as dt

    for key in _key_store(data_dir).list():
        created = dt.datetime.fromtimestamp(key.created, dt.UTC).strftime("%Y-%m-%d %H:%M")
        state = "revoked" if key.revoked else "active"
        limits = f"rate={key.rate_per_min or '-'}/min quota={key.images_per_day or '-'}/day"
        click.echo(f"{key.id}  {state:<7}  {created}  {limits}  {key.name}")


@keys.command("revoke")
@click.argument("id_or_name")
@_data_dir_option
def keys_revoke(id_or_name: str, data_dir: str | None) -> None:
    """Revoke a key by id or name; it stops working at once."""
    n = _key_store(data_dir).revoke(id_or_name)
    if n == 0:
        raise click.ClickException(f"no key with id or name {id_or_name!r}")
    click.echo(f"revoked {n} key(s)")


@main.group()
def jobs() -> None:
    """List, show and cancel jobs on a running server."""


_url_option = click.option(
    "--url",
    envvar="SDGATE_URL",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="Server URL [env: SDGATE_URL].",
)


def _print_job(job: dict[str, Any]) -> None:
    p = job.get("progress") or {}
    line = f"{job['id']}  {job['status']:<9}  step {p.get('step', 0)}/{p.get('total_steps', 0)}"
    if job.get("queue_position") is not None:
        line += f"  queue position {job['queue_position']}"
    if job.get("error"):
        line += f"  {job['error']['type']}: {job['error']['message']}"
    click.echo(line)
    for img in job.get("images", []):
        click.echo(f"  {img['url']}  seed={img['seed']}")


def _jobs_call(func: Callable[[Any], Any], url: str) -> Any:
    from sdgate.client import Client

    try:
        with Client(url) as client:
            return func(client)
    except SdgateError as e:
        raise click.ClickException(e.message) from None


@jobs.command("list")
@_url_option
@click.option("--limit", type=int, default=20, show_default=True, help="How many recent jobs.")
def jobs_list(url: str, limit: int) -> None:
    """Recent jobs, newest first."""
    for job in _jobs_call(lambda c: c.jobs(limit), url):
        _print_job(job)


@jobs.command("show")
@_url_option
@click.argument("job_id")
def jobs_show(url: str, job_id: str) -> None:
    """One job with its progress and images."""
    _print_job(_jobs_call(lambda c: c.job(job_id), url))


@jobs.command("cancel")
@_url_option
@click.argument("job_id")
def jobs_cancel(url: str, job_id: str) -> None:
    """Cancel a queued or running job."""
    _print_job(_jobs_call(lambda c: c.cancel(job_id), url))


@main.command("train-demo")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory for the pipeline."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of weights, data and noise.")
@click.option("--vae-steps", type=int, help="VAE training steps [default: the shipped model's].")
@click.option("--unet-steps", type=int, help="Text encoder + UNet training steps [default: the shipped model's].")
@click.option("--threads", type=int, help="torch threads [default: 1, fastest on a shared two-core machine].")
@click.option("--preview-every", type=int, default=0, help="Save a grid of samples every N UNet steps.")
def train_demo(
    out: Path, seed: int, vae_steps: int | None, unet_steps: int | None, threads: int | None, preview_every: int
) -> None:
    """Train the built-in `demo` model on generated scenes (CPU) and save it to --out.

    The defaults reproduce the shipped weights; see sdgate/models/demo/MODEL_CARD.md.
    """
    from dataclasses import replace

    from sdgate.demo.train import TrainConfig
    from sdgate.demo.train import train_demo as run

    given = {"vae_steps": vae_steps, "unet_steps": unet_steps, "threads": threads}
    cfg = replace(TrainConfig(seed=seed, preview_every=preview_every), **{k: v for k, v in given.items() if v})
    _setup_logging("warning")
    run(out, cfg, log=lambda line: click.echo(line, err=True))
    click.echo(str(out))


if __name__ == "__main__":  # pragma: no cover
    main()
