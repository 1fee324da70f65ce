"""One settings object for the whole service.

Every field is an ``SDGATE_*`` environment variable and a ``sdgate serve`` flag. The object is
built once at the entry point and passed in; nothing reads the environment behind its back.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sdgate.formats import ImageFormat
from sdgate.paths import DataPaths

Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
BackendName = Literal["local", "sagemaker", "http", "ray"]
StorageName = Literal["local", "s3"]
JobStoreName = Literal["sqlite", "dynamodb", "postgres"]


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'3600', '90s', '15m', '12h', '7d', '2w' → seconds."""
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:]) if t else None
    number = t[:-1] if unit else t
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (try 3600, 15m, 12h or 7d)") from None
    if value <= 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class ModelEntry:
    """One model a server offers: the name requests use, and the spec it loads from."""

    name: str
    spec: str


def parse_models(text: str) -> list[ModelEntry]:
    """``SDGATE_MODELS``: ``name=spec`` or bare specs (named by themselves), comma-separated; names unique."""
    entries = []
    for part in text.split(","):
        item = part.strip()
        if not item:
            raise ValueError(f"SDGATE_MODELS has an empty entry: {text!r}")
        name, eq, spec = item.partition("=")
        name, spec = (name.strip(), spec.strip()) if eq else (item, item)
        if not name or not spec:
            raise ValueError(f"SDGATE_MODELS entry {item!r} must be name=spec or a spec")
        entries.append(ModelEntry(name, spec))
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"SDGATE_MODELS names {', '.join(duplicates)} more than once")
    return entries


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _default_data_dir() -> Path:
    return Path.home() / ".sdgate"


class Settings(BaseSettings):
    """sdgate's configuration; checked when constructed."""

    model_config = SettingsConfigDict(env_prefix="SDGATE_", extra="forbid", validate_default=True)

    # -- server ---------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 picks a free one).")
    data_dir: Path = Field(default_factory=_default_data_dir, description="All state lives here.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="Log lines as JSON or text; auto: JSON unless stderr is a terminal."
    )

    # -- model / engine -------------------------------------------------------------------------
    model: str = Field(
        "demo",
        description="Built-in model name (demo: trained on simple shapes; tiny: random weights, fastest), "
        "Hugging Face model id, local pipeline directory, or a single-file .safetensors/.ckpt checkpoint.",
    )
    models: str | None = Field(
        None,
        description="Several models: comma-separated `name=spec` or bare specs (a spec is what SDGATE_MODEL takes); "
        "the first is the default, requests choose with `model`. Unset: SDGATE_MODEL alone.",
    )
    max_loaded_models: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Most pipelines held in memory (least recently used is unloaded). Default: 1 on a GPU "
        "(a second SDXL does not fit most cards), 2 on a CPU (RAM is larger and the switch costs seconds).",
    )
    lora_dir: Path | None = Field(
        None,
        description="LoRA adapters: each *.safetensors file here is offered by its file stem (diffusers, PEFT "
        "or kohya format). Default: <data dir>/loras.",
    )
    max_loaded_loras: int = Field(
        8,
        ge=1,
        le=1024,
        description="Most LoRA adapters kept loaded in each model (least recently used is unloaded): every one "
        "loaded slows each call on its model a little, with LoRAs or without.",
    )
    preview_every: int = Field(
        5,
        ge=0,
        le=1000,
        description="A live preview of a running job every this many steps, for whoever asks for one "
        "(SSE ?previews=1, OpenAI partial_images, the webui's current_image); 0 turns previews off.",
    )
    openai_strict_models: bool = Field(
        False,
        description="OpenAI Images API: refuse model names this server does not offer (default: they get the "
        "default model, so apps that send dall-e-3 or gpt-image-1 work unchanged).",
    )
    device: Device = Field("auto", description="auto | cpu | cuda | mps.")
    dtype: DType = Field("auto", description="auto (fp16 on CUDA, fp32 elsewhere) | float32 | float16 | bfloat16.")
    max_batch_size: int = Field(8, ge=1, le=64, description="Most images in one pipeline call.")
    max_batch_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="How long the engine waits for more requests to batch."
    )
    single_file_config: str | None = Field(
        None,
        description="Diffusers config (hub id or directory) for a single-file checkpoint; needed offline.",
    )
    warmup: bool = Field(True, description="Run one short generation at start so the first request is fast.")
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads for the model (torch intra-op). Default: the model's own (demo: 1), "
        "else torch's (one per core).",
    )
    channels_last: bool = Field(
        False, description="Channels-last memory format for the UNet and VAE (measured in docs/benchmarks.md)."
    )
    compile: bool = Field(
        False,
        description="torch.compile the UNet: a slow first start (the warm-up compiles it), then faster steps on "
        "CUDA; the compile caches are kept under <data dir>/cache/torch, so a restart reuses them. See "
        "docs/benchmarks.md.",
    )
    default_steps: int | None = Field(
        None, ge=1, le=150, description="Steps when a request names none (default: the model's own)."
    )
    default_guidance_scale: float | None = Field(
        None, ge=0, le=30, description="Guidance when a request names none (default: the model's own)."
    )
    default_width: int | None = Field(
        None, ge=64, le=2048, multiple_of=8, description="Width when a request names none (default: the model's own)."
    )
    default_height: int | None = Field(
        None, ge=64, le=2048, multiple_of=8, description="Height when a request names none (default: the model's own)."
    )

    # -- backend --------------------------------------------------------------------------------
    backend: BackendName = Field("local", description="Where generations run: local | sagemaker | http | ray.")
    sagemaker_endpoint: str | None = Field(None, description="SageMaker endpoint name (backend sagemaker).")
    sagemaker_region: str | None = Field(None, description="AWS region of the endpoint (default: AWS chain).")
    backend_url: str | None = Field(None, description="Base URL of another sdgate / JumpStart server (backend http).")
    backend_timeout_s: float = Field(300.0, gt=0, description="Timeout for one remote generation.")
    ray_address: str = Field(
        "auto",
        description="Ray cluster (backend ray): auto (the one this machine is in, else a local one), or HOST:6379.",
    )
    ray_replicas: int | None = Field(None, ge=1, description="Fixed engine replica count (backend ray).")
    ray_min_replicas: int | None = Field(None, ge=0, description="Autoscaling: fewest engine replicas (backend ray).")
    ray_max_replicas: int | None = Field(None, ge=1, description="Autoscaling: most engine replicas (backend ray).")
    ray_num_gpus: float | None = Field(
        None, ge=0, description="GPUs per engine replica (backend ray; default 1 with CUDA, 0 on a CPU)."
    )

    shutdown_grace_s: float = Field(
        30.0, ge=0, le=3600, description="On SIGTERM, how long running jobs may finish before the process exits."
    )

    # -- limits ---------------------------------------------------------------------------------
    max_pixels: int = Field(1024 * 1024, ge=64 * 64, description="Largest width*height a request may ask for.")
    max_images: int = Field(8, ge=1, le=64, description="Most images one request may ask for.")
    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt accepted.")
    max_body_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest request body accepted where a route takes no images."
    )
    max_upload_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        description="Largest request body where a route takes images (multipart as sent, JSON with base64 images).",
    )

    # -- access -----------------------------------------------------------------------------------
    auth: Literal["auto", "on", "off"] = Field(
        "auto", description="API keys: auto (required unless bound to loopback), on, or off (loud warning)."
    )
    rate_limit_per_min: int | None = Field(
        60, ge=1, description="Default generation requests per minute per key (a key's own limit wins)."
    )
    images_per_day: int | None = Field(
        None, ge=1, description="Default daily image quota per key (a key's own quota wins); none when unset."
    )

    # -- jobs -----------------------------------------------------------------------------------
    queue_size: int = Field(64, ge=1, le=100_000, description="Most jobs waiting to run; beyond that 429.")
    sync_timeout: float = Field(
        60.0, gt=0, description="Seconds a sync request waits before it answers 202 with its job instead."
    )
    max_concurrency: int = Field(
        8, ge=1, le=1024, description="Most generations in flight to a remote backend at once."
    )
    retention: str | None = Field(
        None, description="Delete jobs and images older than this (e.g. 7d, 12h, 3600); off when unset."
    )
    job_store: JobStoreName = Field(
        "sqlite",
        description="Where job records live: sqlite (under the data dir) | dynamodb (AWS Lambda) | postgres "
        "(shared by several API nodes).",
    )
    postgres_url: str | None = Field(
        None,
        description="PostgreSQL (job store postgres): a libpq URL, e.g. postgresql://sdgate@db/sdgate. Jobs, keys, "
        "rate and quota counters live there, shared by every API node.",
    )
    node_lease_s: float = Field(
        15.0,
        ge=1,
        le=3600,
        description="Job store postgres: how long a node's lease on its jobs lasts (renewed every second, or every "
        "third of it when shorter); the other nodes take over the jobs of a node whose lease ran out.",
    )
    dynamodb_table: str | None = Field(
        None, description="DynamoDB table of job records (job store dynamodb); TTL on expires_at."
    )
    worker_function: str | None = Field(
        None,
        description="On AWS Lambda: the function (name or ARN) that runs jobs, invoked asynchronously "
        "(default: the function itself).",
    )
    worker_timeout_s: float = Field(
        4500.0,
        gt=0,
        description="On AWS Lambda: a job not finished this long after it was accepted has lost its worker "
        "and is failed as interrupted.",
    )
    webhook_secret: str | None = Field(None, description="HMAC-SHA256 key that signs webhook deliveries.")
    webhook_allow: str = Field(
        "",
        description="Comma-separated hosts/CIDRs webhooks may reach besides public addresses ('*' for any).",
    )
    webhook_max_attempts: int = Field(5, ge=1, le=20, description="Delivery attempts per webhook.")
    webhook_backoff_s: float = Field(1.0, ge=0, le=600, description="First retry delay; doubles each attempt.")

    # -- images and storage ---------------------------------------------------------------------
    storage: StorageName = Field("local", description="Where images go: local | s3.")
    output_format: ImageFormat = Field("jpeg", description="Default image format.")
    jpeg_quality: int = Field(90, ge=1, le=100, description="Default JPEG/WebP quality.")
    public_base_url: str | None = Field(
        None, description="Base of image URLs (a CDN domain); default: this server's /images/."
    )
    s3_bucket: str | None = Field(None, description="S3 bucket (storage s3).")
    s3_prefix: str = Field("", description="Key prefix inside the bucket.")
    s3_presign_expiry_s: int = Field(
        3600, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned URLs when no public base URL is set."
    )
    s3_cache_control: str = Field("public, max-age=31536000, immutable", description="Cache-Control of objects.")

    # -- SageMaker container mode ---------------------------------------------------------------
    sagemaker: bool = Field(False, description="SageMaker container defaults: 0.0.0.0:8080, model from /opt/ml/model.")

    @field_validator("public_base_url", "backend_url")
    @classmethod
    def _strip_slash(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {v!r}")
        return v.rstrip("/")

    @field_validator("retention")
    @classmethod
    def _retention(cls, v: str | None) -> str | None:
        if v is None or v.strip() in ("", "0", "off"):
            return None
        parse_duration(v)
        return v.strip()

    @field_validator("models")
    @classmethod
    def _models(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        parse_models(v)
        return v.strip()

    @property
    def model_entries(self) -> list[ModelEntry]:
        """The models this server offers, the default first: SDGATE_MODELS, else SDGATE_MODEL alone."""
        if self.models is None:
            return [ModelEntry(self.model, self.model)]
        return parse_models(self.models)

    @property
    def retention_s(self) -> float | None:
        return None if self.retention is None else parse_duration(self.retention)

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.backend == "sagemaker" and not self.sagemaker_endpoint:
            raise ValueError("backend 'sagemaker' needs SDGATE_SAGEMAKER_ENDPOINT (the endpoint name)")
        if self.backend == "http" and not self.backend_url:
            raise ValueError("backend 'http' needs SDGATE_BACKEND_URL (e.g. http://127.0.0.1:8080)")
        if self.job_store == "dynamodb" and not self.dynamodb_table:
            raise ValueError("job store 'dynamodb' needs SDGATE_DYNAMODB_TABLE (the table name)")
        if self.job_store == "postgres" and not self.postgres_url:
            raise ValueError("job store 'postgres' needs SDGATE_POSTGRES_URL (e.g. postgresql://user@host/db)")
        if self.ray_replicas is not None and (self.ray_min_replicas is not None or self.ray_max_replicas is not None):
            raise ValueError("set SDGATE_RAY_REPLICAS or SDGATE_RAY_MIN_REPLICAS/SDGATE_RAY_MAX_REPLICAS, not both")
        if (
            self.ray_min_replicas is not None
            and self.ray_max_replicas is not None
            and self.ray_min_replicas > self.ray_max_replicas
        ):
            raise ValueError("SDGATE_RAY_MIN_REPLICAS must not be above SDGATE_RAY_MAX_REPLICAS")
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("storage 's3' needs SDGATE_S3_BUCKET")
        if self.s3_prefix.startswith("/") or ".." in self.s3_prefix.split("/"):
            raise ValueError(f"s3_prefix must be a relative key prefix, got {self.s3_prefix!r}")
        return self

    def with_sagemaker_defaults(self, explicitly_set: set[str]) -> Settings:
        """SageMaker's container contract: listen on 0.0.0.0:8080, model from /opt/ml/model if present."""
        update: dict[str, object] = {}
        if "host" not in explicitly_set:
            update["host"] = "0.0.0.0"
        if "port" not in explicitly_set:
            update["port"] = 8080
        if "model" not in explicitly_set and Path("/opt/ml/model").is_dir():
            update["model"] = "/opt/ml/model"
        return self.model_copy(update=update)

    @property
    def auth_required(self) -> bool:
        """Keys are needed unless explicitly off, or 'auto' on a loopback-only bind."""
        if self.auth == "on":
            return True
        if self.auth == "off":
            return False
        return not is_loopback(self.host)

    @property
    def loras_dir(self) -> Path:
        """Where LoRA files are read from: SDGATE_LORA_DIR, else ``loras`` under the data dir."""
        return self.lora_dir or self.paths.loras

    @property
    def paths(self) -> DataPaths:
        """Every file and folder under ``data_dir``."""
        return DataPaths(self.data_dir)
