"""Request and response models shared by every API surface.

Field names follow diffusers' ``__call__`` (``prompt``, ``negative_prompt``, ``num_inference_steps``, ...).
Static ranges live on the fields; limits that depend on settings (``max_pixels``, prompt length) are
checked by :func:`sdgate.generation.request.resolve_request`, before any model work.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sdgate.formats import ImageFormat

SCHEDULER_NAMES = ("euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "pndm", "lms", "unipc")
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_SEED = 2**32 - 1
MAX_LORAS = 8
"""Most LoRAs in one request."""
LORA_WEIGHT_RANGE = (-4.0, 4.0)
"""A LoRA's weight: 1 applies it as trained, 0 turns it off, negative pushes away from it."""


def check_side(name: str, value: int) -> int:
    """Width/height: a multiple of 8 within 64..2048, with a hint when it is not."""
    if value < MIN_SIDE or value > MAX_SIDE:
        raise ValueError(f"{name} must be between {MIN_SIDE} and {MAX_SIDE}, got {value}")
    if value % 8:
        lower = value - value % 8
        raise ValueError(f"{name} must be a multiple of 8, got {value} — try {max(lower, MIN_SIDE)} or {lower + 8}")
    return value


def check_prompt(value: str, name: str = "prompt") -> str:
    """A prompt must say something: every surface refuses a blank one with the same words."""
    if not value.strip():
        raise ValueError(f"{name} must not be empty")
    return value


class LoraRequest(BaseModel):
    """One LoRA of a request: its name from ``GET /v1/loras`` and how strongly it applies."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=200, description="A LoRA's name from GET /v1/loras.")
    weight: float = Field(
        1.0,
        ge=LORA_WEIGHT_RANGE[0],
        le=LORA_WEIGHT_RANGE[1],
        description=f"{LORA_WEIGHT_RANGE[0]:g}..{LORA_WEIGHT_RANGE[1]:g}: 1 as trained, 0 off, negative away from it.",
    )


def parse_loras(value: Any) -> Any:
    """A form field or CLI value: a JSON array, or ``name:weight`` entries separated by commas."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError:
            raise ValueError("loras is not a valid JSON array") from None
    out: list[dict[str, Any]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, weight = part.rpartition(":")
        if not sep:
            out.append({"name": part})
            continue
        try:
            out.append({"name": name.strip(), "weight": float(weight)})
        except ValueError:
            raise ValueError(f"loras entry {part!r}: the weight after ':' must be a number") from None
    return out


class GenerationRequest(BaseModel):
    """Body of ``POST /v1/generations``."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    prompt: str = Field(..., description="What to draw.", examples=["a red fox in the snow"])
    negative_prompt: str | None = Field(None, description="What to avoid.")
    width: int | None = Field(None, description="Multiple of 8, 64..2048 (default: the model's native size).")
    height: int | None = Field(None, description="Multiple of 8, 64..2048 (default: the model's native size).")
    num_inference_steps: int | None = Field(None, ge=1, le=150, description="Denoising steps.")
    guidance_scale: float | None = Field(None, ge=0, le=30, description="Classifier-free guidance scale.")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Seed of the first image; image i uses seed + i. Random if absent.",
    )
    num_images: int = Field(1, ge=1, le=64, description="How many images (each with its own seed).")
    scheduler: str | None = Field(None, description=f"One of {', '.join(SCHEDULER_NAMES)}.")
    output_format: ImageFormat | None = Field(None, description="jpeg | png | webp.")
    quality: int | None = Field(None, ge=1, le=100, description="JPEG/WebP quality.")
    webhook_url: str | None = Field(
        None, max_length=2048, description="POSTed the finished job, signed (see the README's webhook section)."
    )
    model: str | None = Field(None, description="A model's name from GET /v1/models (default: the first).")
    image: str | None = Field(
        None,
        description="Input image for image-to-image or inpainting: base64 or a data: URL of a PNG, JPEG or WebP. "
        "Width and height default to its size, rounded down to a multiple of 8.",
    )
    mask: str | None = Field(
        None,
        description="Inpainting mask, the image's size: white repaints, black keeps; in a PNG with transparency, "
        "transparent repaints. Needs image.",
    )
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        description="How far the result may move from image: 0 < strength <= 1 (default 0.8; 1.0 with a mask).",
    )
    loras: list[LoraRequest] | None = Field(
        None,
        max_length=MAX_LORAS,
        description=f"LoRA adapters from GET /v1/loras with their weights, at most {MAX_LORAS}, each name once. "
        'In a form: a JSON array, or "name:weight,name:weight".',
    )

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_text(cls, v: Any) -> Any:
        return parse_loras(v)

    @field_validator("loras")
    @classmethod
    def _loras_once(cls, v: list[LoraRequest] | None) -> list[LoraRequest] | None:
        if v:
            names = [lora.name for lora in v]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"each LoRA may appear once; given more than once: {', '.join(twice)}")
        return v or None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        return check_prompt(v)

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v: int | None, info: Any) -> int | None:
        return None if v is None else check_side(info.field_name, v)

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str | None) -> str | None:
        if v is None:
            return None
        name = v.strip().lower()
        if name not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {v!r}; valid: {', '.join(SCHEDULER_NAMES)}")
        return name


@dataclass(frozen=True)
class ModelDefaults:
    """What a model uses when a request leaves a field out."""

    width: int = 512
    height: int = 512
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    scheduler: str | None = None
    # CPU threads that suit the model (None: torch's own count). SDGATE_TORCH_THREADS wins.
    torch_threads: int | None = None


class Mode(StrEnum):
    """What a generation starts from: text alone, an input image, or an image and a mask."""

    txt2img = "txt2img"
    img2img = "img2img"
    inpaint = "inpaint"


DEFAULT_STRENGTH = {Mode.img2img: 0.8, Mode.inpaint: 1.0}


@dataclass(frozen=True)
class LoraWeight:
    """A LoRA applied to a generation, with its weight."""

    name: str
    weight: float


@dataclass(frozen=True)
class GenerationParams:
    """A fully resolved, validated request: every field set, one seed per image.

    An image-to-image or inpainting request refers to its inputs by their storage keys (private, never
    served): the record stays small and a job can run again, in this process or in another.
    """

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    scheduler: str | None
    output_format: ImageFormat
    quality: int
    mode: Mode = Mode.txt2img
    strength: float | None = None
    """How far from the input image (img2img and inpaint); None for txt2img."""
    image_key: str | None = None
    mask_key: str | None = None
    model: str | None = None
    """The model's name (None on records made before servers offered several: the default)."""
    loras: tuple[LoraWeight, ...] = ()
    """The LoRAs as the request named them, in its order (weight 0 included: it is recorded, not run)."""

    @property
    def active_loras(self) -> tuple[LoraWeight, ...]:
        """The LoRAs that change the image: weight 0 is the same as leaving a LoRA out, so it does not run."""
        return tuple(sorted((lo for lo in self.loras if lo.weight != 0), key=lambda lo: lo.name))

    @property
    def num_images(self) -> int:
        return len(self.seeds)

    @property
    def steps_to_run(self) -> int:
        """Denoising steps the pipeline runs: from an image, only the last ``strength`` of the schedule."""
        if self.mode is Mode.txt2img or self.strength is None:
            return self.num_inference_steps
        return min(int(self.num_inference_steps * self.strength), self.num_inference_steps)

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one pipeline call (each row keeps its own inputs and seed)."""
        return (
            self.model,
            self.active_loras,
            self.mode,
            self.width,
            self.height,
            self.num_inference_steps,
            self.guidance_scale,
            self.scheduler,
            self.strength,
        )

    def public(self) -> dict[str, Any]:
        """Parameters as embedded in the image file and its sidecar (the inputs' keys only in the sidecar)."""
        fields: dict[str, Any] = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler,
        }
        if self.mode is not Mode.txt2img:
            fields.update(mode=self.mode.value, strength=self.strength)
        if self.loras:
            fields["loras"] = [{"name": lo.name, "weight": lo.weight} for lo in self.loras]
        return fields


# -- responses ------------------------------------------------------------------------------------


class Surface(StrEnum):
    """Which API a generation came through; kept on its job."""

    native = "native"
    text2image = "text2image"
    sagemaker = "sagemaker"
    cli = "cli"
    openai = "openai"
    a1111 = "a1111"


class JobStatus(StrEnum):
    """Lifecycle of a generation; sync requests are jobs too."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    def is_terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


class ImageResult(BaseModel):
    url: str
    seed: int
    width: int
    height: int
    content_type: str
    bytes: int


class StoredImage(ImageResult):
    """An image as its job records it: the public fields and its storage key (never shown)."""

    key: str

    def public(self) -> ImageResult:
        return ImageResult(**self.model_dump(exclude={"key"}))


class Timings(BaseModel):
    """Milliseconds spent in each stage."""

    queue: float = 0.0
    inference: float = 0.0
    encode: float = 0.0
    store: float = 0.0
    total: float = 0.0


class ErrorInfo(BaseModel):
    """Why a job failed: a stable ``type`` and a message that says what to do."""

    type: str
    message: str
    retry_after: str | None = Field(None, exclude=True)
    """The ``Retry-After`` the error came with (a busy endpoint): for the answer, not for the record."""


class Progress(BaseModel):
    step: int = 0
    total_steps: int = 0
    eta_ms: float | None = None
    loading: bool = Field(False, description="The job's model is being loaded (it is not in memory yet).")


class WebhookAttempt(BaseModel):
    """One delivery attempt: when, and the receiver's status or the error that stopped it."""

    at: float
    status: int | None = None
    error: str | None = None


class WebhookStatus(BaseModel):
    url: str
    delivered: bool = False
    attempts: list[WebhookAttempt] = Field(default_factory=list)


class WebhookState(BaseModel):
    """A job's webhook as its record keeps it. ``delivered`` stays None until a delivery ends,
    delivered or out of attempts: its absence tells a restart that a delivery is still owed."""

    url: str
    attempts: list[WebhookAttempt] = Field(default_factory=list)
    delivered: bool | None = None

    def public(self) -> WebhookStatus:
        return WebhookStatus(url=self.url, delivered=bool(self.delivered), attempts=self.attempts)


class JobParams(BaseModel):
    """The parameters a job ran with, every default filled in: send them back (``seed`` is the first
    image's) to make the same images again. Its input images are not shown, only that it had them."""

    prompt: str
    negative_prompt: str | None = None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str | None = None
    seed: int
    num_images: int
    output_format: ImageFormat
    quality: int
    mode: Mode = Mode.txt2img
    strength: float | None = None

    @classmethod
    def of(cls, params: GenerationParams) -> JobParams:
        return cls(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            width=params.width,
            height=params.height,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            scheduler=params.scheduler,
            seed=params.seeds[0],
            num_images=params.num_images,
            output_format=params.output_format,
            quality=params.quality,
            mode=params.mode,
            strength=params.strength,
        )


class GenerationResponse(BaseModel):
    """A generation job as the native API shows it."""

    id: str
    status: JobStatus
    model: str
    loras: list[LoraWeight] = Field(default_factory=list, description="The LoRAs applied, with their weights.")
    surface: Surface | None = Field(None, description="The API the generation came through.")
    user: str | None = Field(None, description="The end user the caller named (OpenAI's user).")
    params: JobParams | None = Field(None, description="What it ran with, defaults filled in (to run it again).")
    created: int
    images: list[ImageResult] = Field(default_factory=list)
    timings: Timings = Field(default_factory=Timings)
    progress: Progress = Field(default_factory=Progress)
    queue_position: int | None = Field(None, description="Jobs ahead of this one while queued (0: next).")
    started: float | None = None
    finished: float | None = None
    error: ErrorInfo | None = None
    webhook: WebhookStatus | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[GenerationResponse]
    next_before: float | None = Field(None, description="Pass as ?before= for the next page.")


class ModelCard(BaseModel):
    """A model as ``GET /v1/models`` lists it: OpenAI's shape (id, object, created, owned_by) and more."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(0, description="When this server started offering it (Unix seconds).")
    owned_by: str = "sdgate"
    backend: str
    ready: bool
    loaded: bool = Field(description="In memory now (a request for a model that is not loads it).")
    default: bool = Field(description="What a request that names no model gets.")
    default_width: int
    default_height: int
    default_steps: int
    default_guidance_scale: float
    schedulers: list[str]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@dataclass(frozen=True)
class LoraInfo:
    """A LoRA a backend offers, as its engine reads it (``GET /v1/loras``)."""

    name: str
    bytes: int
    fits: list[str]
    """The offered models it fits: every module it changes is there, with the shapes it expects."""
    unknown: list[str]
    """The offered models it could not be checked against yet (they are checked when they load)."""
    error: str | None = None
    """Why the file cannot be read as a LoRA (it then fits no model)."""


class LoraCard(BaseModel):
    name: str
    object: Literal["lora"] = "lora"
    bytes: int = Field(description="Size of the file.")
    models: list[str] = Field(description="The models it fits (a request for it on another is refused).")
    unchecked: list[str] = Field(
        default_factory=list, description="Models not checked yet: a request on one is checked when it loads."
    )
    error: str | None = Field(None, description="Why the file cannot be used as a LoRA.")


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraCard]


class ErrorDetail(BaseModel):
    """``error`` of every error body: a stable ``type``, a ``message`` that says what to fix, maybe more."""

    model_config = ConfigDict(extra="allow")

    type: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


@dataclass
class GeneratedImage:
    """One image out of a backend: pixels, and the encoded bytes when the backend already has them."""

    image: Any  # PIL.Image.Image; typed loosely so that this module does not import PIL
    seed: int
    encoded: bytes | None = None
    encoded_format: ImageFormat | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationResult:
    """What a backend (and the engine under the local one) hands back for one request."""

    images: list[GeneratedImage]
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    batch_images: int = 1  # images in the pipeline call that made these (batching shows as > 1)


ProgressFn = Callable[[int, int], None]
"""Called with (step, total steps): step 0 when the work leaves the queue, then after each step; first
(:data:`LOADING_STEP`, total) when the job's model has to be loaded before it can start."""

LOADING_STEP = -1
"""The step a backend reports while it loads the job's model."""


@dataclass(frozen=True)
class Previews:
    """Where a job's live previews go, and whether anyone wants them now (asked at each preview step)."""

    wanted: Callable[[], bool]
    send: Callable[[int, Any], None]
    """Called on the engine thread with the step and a small PIL image of what is being drawn."""
