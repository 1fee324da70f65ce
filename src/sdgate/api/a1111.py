"""AUTOMATIC1111's ``/sdapi/v1``: an adapter over the generation service, so that webui clients (``webuiapi``,
the Krita and Photoshop plugins, SillyTavern, Open WebUI, bots) work against sdgate unchanged.

- ``txt2img`` and ``img2img`` map to a :class:`~sdgate.schemas.GenerationRequest` and take the one
  path (limits, keys, quotas, jobs, storage); the answer is the webui's ``{images, parameters, info}``.
- Sampler names map to sdgate's schedulers (:data:`SAMPLERS`); ``scheduler`` is ``automatic`` or
  ``karras`` (with DPM++ 2M). ``seed`` -1 is random; image i of a request has seed + i, as in the webui.
- ``<lora:name:weight>`` in the prompt is a LoRA of the request (and is taken out of the prompt).
- The model: ``override_settings.sd_model_checkpoint``, else what the caller set with ``POST options``,
  else the server's default.
- Fields that mean nothing here (``styles``, ``save_images``, ``alwayson_scripts``, ...) are accepted and
  ignored; one that would change the picture in a way sdgate cannot honour (``enable_hr``,
  ``restore_faces``, ``tiling``, variation seeds, scripts) is a 400 that says so.
- ``progress``, ``interrupt`` and ``skip`` act on the caller's own jobs (everyone's when keys are off).
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdgate import __version__
from sdgate.api.access import caller_of
from sdgate.api.context import AppContext, Ctx, JsonBody
from sdgate.api.errors import DialectRoute
from sdgate.api.middleware import takes_images
from sdgate.errors import GenerationTimeout, InvalidRequest
from sdgate.generation import Caller
from sdgate.jobs import Job
from sdgate.schemas import MAX_SEED, GenerationRequest, JobStatus, Surface

SAMPLERS: dict[str, str] = {
    "Euler a": "euler_a",
    "Euler": "euler",
    "DPM++ 2M": "dpmpp_2m",
    "DDIM": "ddim",
    "PLMS": "pndm",
    "LMS": "lms",
    "UniPC": "unipc",
}
"""The webui's sampler names → sdgate's schedulers."""
_ALIASES = {
    "k_euler_a": "Euler a",
    "k_euler_ancestral": "Euler a",
    "k_euler": "Euler",
    "k_dpmpp_2m": "DPM++ 2M",
    "k_lms": "LMS",
    "DPM++ 2M Karras": "DPM++ 2M",  # the webui's name before it split sampler and schedule type
}
SCHEDULES = ("automatic", "karras")
_LORA = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>", re.IGNORECASE)
_TASKS_KEPT = 1000


class A1111Route(DialectRoute):
    """Errors as the webui's API answers them: ``{"error", "detail", "body", "errors"}``; bad values are 400s."""

    @staticmethod
    def shape(status: int, body: dict[str, Any], headers: dict[str, str]) -> Response:
        error = body.get("error", {})
        if status == 422:
            status = 400
        message = error.get("message", "")
        out = {"error": error.get("type", "error"), "detail": message, "body": "", "errors": message}
        return JSONResponse(out, status_code=status, headers=headers)


class A1111Error(BaseModel):
    """Every error of these routes, as the webui's API shapes them."""

    error: str = Field(description="sdgate's error type (invalid_request, quota_exceeded, ...).")
    detail: str
    body: str = ""
    errors: str


router = APIRouter(
    prefix="/sdapi/v1",
    tags=["automatic1111"],
    route_class=A1111Route,
    responses={code: {"model": A1111Error} for code in (400, 401, 403, 404, 413, 415, 429, 500, 502, 503, 504)},
)


class Txt2ImgRequest(BaseModel):
    """Body of ``POST /sdapi/v1/txt2img``: the webui's fields (unknown ones are ignored, as the webui does)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str | None = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=64)
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    override_settings: dict[str, Any] | None = None
    force_task_id: str | None = Field(None, max_length=200)
    # Accepted; they would change the picture, so anything but the webui's default is refused.
    enable_hr: bool = False
    restore_faces: bool | None = False
    tiling: bool | None = False
    subseed_strength: float = 0.0
    script_name: str | None = None
    refiner_checkpoint: str | None = None
    # Accepted and ignored: styles, save_images, send_images, alwayson_scripts, eta, s_*, hr_*, ...


class Img2ImgRequest(Txt2ImgRequest):
    """Body of ``POST /sdapi/v1/img2img``."""

    init_images: list[str] = Field(default_factory=list)
    mask: str | None = None
    denoising_strength: float = 0.75
    inpainting_mask_invert: int = 0
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_fill: int = 1
    inpaint_full_res: bool | int = True
    resize_mode: int = 0


class Txt2ImgResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNGs.")
    parameters: dict[str, Any]
    info: str = Field(description="A JSON string: seed, all_seeds, all_prompts, sd_model_name, infotexts, ...")


def _refuse(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, field=field)


def _scheduler(body: Txt2ImgRequest) -> str | None:
    name = body.sampler_name or body.sampler_index
    schedule = (body.scheduler or "automatic").lower()
    if not name:
        return None
    name = _ALIASES.get(name, name)
    if name not in SAMPLERS:
        raise _refuse("sampler_name", f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    if (body.sampler_name or "").endswith("Karras"):
        schedule = "karras"
    if schedule not in SCHEDULES:
        raise _refuse("scheduler", f"unknown scheduler {body.scheduler!r}; valid: {', '.join(SCHEDULES)}")
    if schedule == "karras":
        if name != "DPM++ 2M":
            raise _refuse("scheduler", f"the karras schedule is offered with DPM++ 2M only, not with {name}")
        return "dpmpp_2m_karras"
    return SAMPLERS[name]


def _check_unsupported(body: Txt2ImgRequest) -> None:
    refused = {
        "enable_hr": body.enable_hr and "hires fix is not offered: generate at the size you want",
        "restore_faces": body.restore_faces and "face restoration is not offered",
        "tiling": body.tiling and "tiling is not offered",
        "subseed_strength": body.subseed_strength and "variation seeds (subseed_strength) are not offered",
        "script_name": body.script_name and f"scripts are not offered (script_name {body.script_name!r})",
        "refiner_checkpoint": body.refiner_checkpoint and "refiners are not offered",
    }
    for name, message in refused.items():
        if message:
            raise _refuse(name, f"{name}: {message}")


def prompt_loras(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """The prompt without its ``<lora:name:weight>`` tags, and those LoRAs (weight 1 when left out)."""
    loras: list[dict[str, Any]] = []
    for match in _LORA.finditer(prompt):
        weight = 1.0
        if match[2]:
            try:
                weight = float(match[2])
            except ValueError:
                raise _refuse("prompt", f"the weight of <lora:{match[1]}:...> must be a number") from None
        loras.append({"name": match[1].strip(), "weight": weight})
    return re.sub(r"\s{2,}", " ", _LORA.sub("", prompt)).strip(" ,"), loras


def _model(request: Request, ctx: AppContext, body: Txt2ImgRequest) -> str | None:
    wanted = (body.override_settings or {}).get("sd_model_checkpoint")
    if wanted is None:
        return _options(request).get(_owner_key(caller_of(request)), {}).get("sd_model_checkpoint")
    return _checkpoint(ctx, str(wanted), "override_settings.sd_model_checkpoint")


def _checkpoint(ctx: AppContext, title: str, field: str) -> str:
    """A model by the webui's title (``name``, or ``name [hash]`` as some clients send it)."""
    names = ctx.backend.model_names()
    name = title.split(" [", 1)[0].strip()
    if name not in names:
        raise _refuse(field, f"unknown model {title!r}; valid: {', '.join(names)}")
    return name


def to_request(request: Request, ctx: AppContext, body: Txt2ImgRequest, **inputs: Any) -> GenerationRequest:
    """The native request a webui one asks for. Raises a 400 naming the webui's field."""
    _check_unsupported(body)
    prompt, loras = prompt_loras(body.prompt)
    fields: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": body.negative_prompt or None,
        "width": body.width,
        "height": body.height,
        "num_inference_steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "seed": None if body.seed < 0 else body.seed % (MAX_SEED + 1),
        "num_images": body.batch_size * body.n_iter,
        "scheduler": _scheduler(body),
        "output_format": "png",
        "model": _model(request, ctx, body),
        "loras": loras or None,
        **inputs,
    }
    try:
        return GenerationRequest(**fields)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None


async def _generate(request: Request, ctx: AppContext, body: Txt2ImgRequest, native: GenerationRequest) -> Response:
    caller = caller_of(request)
    generation = await ctx.service.generate(
        [native],
        surface=Surface.a1111,
        caller=caller,
        wait_s=ctx.settings.backend_timeout_s,
        previews=True,  # webui clients poll progress for current_image
    )
    job = generation.job
    if body.force_task_id:
        tasks = _tasks(request)
        tasks[(_owner_key(caller), body.force_task_id)] = job.id
        while len(tasks) > _TASKS_KEPT:
            tasks.popitem(last=False)
    if not generation.finished:
        raise GenerationTimeout(f"the images are still being made; they go on as job {job.id} (GET /v1/jobs/{job.id})")
    if job.status is JobStatus.canceled:  # interrupt or skip: the webui answers with what it has (nothing here)
        images: list[str] = []
    else:
        generation.raise_for_failure()
        images = [base64.b64encode(d).decode("ascii") for d in ctx.jobs.image_bytes(job)]
    parameters = body.model_dump(mode="json")
    return JSONResponse({"images": images, "parameters": parameters, "info": json.dumps(_info(ctx, job))})


def _info(ctx: AppContext, job: Job) -> dict[str, Any]:
    p = job.params
    sampler = next((k for k, v in SAMPLERS.items() if v == (p.scheduler or "").removesuffix("_karras")), "Default")
    schedule = "Karras" if (p.scheduler or "").endswith("_karras") else "Automatic"
    loras = "".join(f" <lora:{lo.name}:{lo.weight:g}>" for lo in p.loras)
    text = [
        f"{p.prompt}{loras}\n"
        + (f"Negative prompt: {p.negative_prompt}\n" if p.negative_prompt else "")
        + f"Steps: {p.num_inference_steps}, Sampler: {sampler}, Schedule type: {schedule}, "
        f"CFG scale: {p.guidance_scale:g}, Seed: {seed}, Size: {p.width}x{p.height}, "
        f"Model: {job.record.model}, Version: sdgate {__version__}"
        for seed in p.seeds
    ]
    return {
        "prompt": p.prompt,
        "all_prompts": [p.prompt] * p.num_images,
        "negative_prompt": p.negative_prompt or "",
        "all_negative_prompts": [p.negative_prompt or ""] * p.num_images,
        "seed": p.seeds[0],
        "all_seeds": list(p.seeds),
        "subseed": -1,
        "all_subseeds": [-1] * p.num_images,
        "subseed_strength": 0,
        "width": p.width,
        "height": p.height,
        "sampler_name": sampler,
        "scheduler": schedule,
        "cfg_scale": p.guidance_scale,
        "steps": p.num_inference_steps,
        "batch_size": p.num_images,
        "restore_faces": False,
        "sd_model_name": job.record.model,
        "sd_model_hash": None,
        "denoising_strength": p.strength,
        "index_of_first_image": 0,
        "infotexts": text,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(job.record.created)),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": p.mask_key is not None,
        "version": f"sdgate {__version__}",
        "sdgate_job_id": job.id,
    }


# -- per-app state: what callers set with POST options, and their force_task_id names ------------------


def _owner_key(caller: Caller) -> str:
    return caller.owner or ""


@dataclass
class WebuiState:
    """What webui callers set, kept per app (by owner): their options, and the jobs of their task ids."""

    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: OrderedDict[tuple[str, str], str] = field(default_factory=OrderedDict)


def _state(request: Request) -> WebuiState:
    state = request.app.state
    if not hasattr(state, "webui"):
        state.webui = WebuiState()
    webui: WebuiState = state.webui
    return webui


def _options(request: Request) -> dict[str, dict[str, Any]]:
    return _state(request).options


def _tasks(request: Request) -> OrderedDict[tuple[str, str], str]:
    return _state(request).tasks


# -- routes --------------------------------------------------------------------------------------------


@router.post("/txt2img", response_model=Txt2ImgResponse, dependencies=[JsonBody])
async def txt2img(body: Txt2ImgRequest, request: Request, ctx: Ctx) -> Response:
    """The webui's text to image: base64 PNGs, the parameters, and ``info`` (a JSON string)."""
    return await _generate(request, ctx, body, to_request(request, ctx, body))


@router.post("/img2img", response_model=Txt2ImgResponse, dependencies=[JsonBody])
@takes_images
async def img2img(body: Img2ImgRequest, request: Request, ctx: Ctx) -> Response:
    """The webui's image to image and inpainting: ``init_images`` (one), ``mask`` (white repaints)."""
    if len(body.init_images) != 1:
        raise _refuse("init_images", f"init_images must hold exactly one image, got {len(body.init_images)}")
    if body.resize_mode != 0:
        raise _refuse("resize_mode", "only resize_mode 0 (just resize) is offered")
    if body.inpainting_fill not in (0, 1):
        raise _refuse("inpainting_fill", "inpainting starts from the original picture: inpainting_fill 0 or 1")
    inputs: dict[str, Any] = {"image": body.init_images[0], "strength": body.denoising_strength}
    if body.mask:
        invert = bool(body.inpainting_mask_invert)
        inputs["mask"] = _webui_mask(body.mask, ctx.settings.max_pixels, invert=invert, blur=body.mask_blur)
    return await _generate(request, ctx, body, to_request(request, ctx, body, **inputs))


def _webui_mask(data: str, max_pixels: int, *, invert: bool, blur: int) -> str:
    """The webui's mask (white repaints; inverted on request; edges blurred by ``mask_blur``) as sdgate's."""
    import io

    from PIL import ImageFilter, ImageOps

    from sdgate.imaging import InputError, from_base64, read_input

    try:
        mask = read_input(from_base64(data, "mask"), "mask", max_pixels, mask=True).image.convert("L")
    except InputError as e:
        raise _refuse("mask", str(e)) from None
    if invert:
        mask = ImageOps.invert(mask)
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")


@router.get("/progress")
async def progress(
    request: Request,
    ctx: Ctx,
    force_task_id: str | None = Query(None, max_length=200),
    id_task: str | None = Query(None, max_length=200),
    skip_current_image: bool = False,
) -> dict[str, Any]:
    """The caller's job (the one named by ``force_task_id`` in txt2img, else its latest): progress 0..1."""
    caller = caller_of(request)
    job = _job_of(request, ctx, caller, force_task_id or id_task)
    empty = {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0", "job_no": 0}
    if job is None or job.status.is_terminal():
        return {
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": {**empty, "sampling_step": 0, "sampling_steps": 0},
            "current_image": None,
            "textinfo": None,
            "current_task": None,
        }
    view = ctx.jobs.view(job)
    total = max(1, view.progress.total_steps)
    step = max(0, view.progress.step)
    state = {
        **empty,
        "job": f"task({job.id})",
        "job_count": len(_live(ctx, caller)),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(job.record.created)),
        "sampling_step": step,
        "sampling_steps": total,
    }
    return {
        "progress": round(step / total, 4),
        "eta_relative": round((view.progress.eta_ms or 0.0) / 1000, 3),
        "state": state,
        "current_image": None if skip_current_image or job.preview is None else base64.b64encode(job.preview).decode(),
        "textinfo": "loading the model" if view.progress.loading else None,
        "current_task": job.id,
    }


def _live(ctx: AppContext, caller: Caller) -> list[Job]:
    return ctx.jobs.live_jobs(owner=caller.owner if ctx.settings.auth_required else None)


def _job_of(request: Request, ctx: AppContext, caller: Caller, task: str | None) -> Job | None:
    if task is not None:
        job_id = _tasks(request).get((_owner_key(caller), task))
        if job_id is None:
            return None
        return ctx.jobs.find(job_id, caller.owner)
    live = [j for j in _live(ctx, caller) if j.record.surface is Surface.a1111] or _live(ctx, caller)
    return live[-1] if live else None


@router.post("/interrupt")
async def interrupt(request: Request, ctx: Ctx) -> dict[str, Any]:
    """Stop the caller's running and queued jobs (their txt2img answers with no images)."""
    for job in _live(ctx, caller_of(request)):
        ctx.jobs.cancel(job.id, job.record.owner)
    return {}


@router.post("/skip")
async def skip(request: Request, ctx: Ctx) -> dict[str, Any]:
    """Stop the caller's running job (the webui's skip: go on to the next one)."""
    running = [j for j in _live(ctx, caller_of(request)) if j.status is JobStatus.running]
    for job in running[:1]:
        ctx.jobs.cancel(job.id, job.record.owner)
    return {}


@router.get("/sd-models")
async def sd_models(ctx: Ctx) -> list[dict[str, Any]]:
    """The models this server offers, as the webui lists checkpoints."""
    return [
        {"title": n, "model_name": n, "hash": None, "sha256": None, "filename": n, "config": None}
        for n in ctx.backend.model_names()
    ]


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return [
        {"name": name, "aliases": [a for a, n in _ALIASES.items() if n == name], "options": {}} for name in SAMPLERS
    ]


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    return [
        {"name": n, "label": n.capitalize(), "aliases": None, "default_rho": -1.0, "need_inner_model": False}
        for n in SCHEDULES
    ]


@router.get("/loras")
async def loras(ctx: Ctx) -> list[dict[str, Any]]:
    """The LoRAs of SDGATE_LORA_DIR (use them as ``<lora:name:weight>`` in the prompt)."""
    import asyncio

    infos = await asyncio.to_thread(ctx.backend.loras)
    return [{"name": i.name, "alias": i.name, "path": f"{i.name}.safetensors", "metadata": {}} for i in infos]


@router.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/options")
async def get_options(request: Request, ctx: Ctx) -> dict[str, Any]:
    """What the caller set (``sd_model_checkpoint``: its default model; the rest is kept and echoed)."""
    mine = _options(request).get(_owner_key(caller_of(request)), {})
    return {"sd_model_checkpoint": ctx.backend.model_names()[0], "sd_checkpoint_hash": None, **mine}


@router.post("/options", dependencies=[JsonBody])
async def set_options(options: dict[str, Any], request: Request, ctx: Ctx) -> None:
    """Set the caller's options: ``sd_model_checkpoint`` picks its default model; others are echoed back."""
    if "sd_model_checkpoint" in options:
        options = {
            **options,
            "sd_model_checkpoint": _checkpoint(ctx, str(options["sd_model_checkpoint"]), "sd_model_checkpoint"),
        }
    _options(request).setdefault(_owner_key(caller_of(request)), {}).update(options)
