"""Fast fakes for the unit tier: a backend, an image storage, a job store and a dispatcher, all in memory.

Each implements the real protocol (``Backend``, ``Storage``, ``JobStore``, ``Dispatcher``), so the code under test
cannot tell; the real ones are tested beside them (tests/integration, tests/e2e).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from sdgate.backends import BackendState
from sdgate.errors import Canceled, SdgateError, StorageError
from sdgate.imaging import ImageInputs
from sdgate.jobstore import DuplicateJob, JobRecord
from sdgate.schemas import (
    GeneratedImage,
    GenerationParams,
    GenerationResult,
    JobStatus,
    LoraInfo,
    ModelDefaults,
    Previews,
    ProgressFn,
)
from sdgate.storage import StoredObject, is_valid_key

FAKE_DEFAULTS = ModelDefaults(width=64, height=64, num_inference_steps=2, guidance_scale=5.0)


def seed_colour(seed: int) -> tuple[int, int, int]:
    """The flat colour the fake backend paints for ``seed``: different seeds, different images."""
    return (seed * 37) % 256, (seed * 91) % 256, (seed * 173) % 256


class FakeBackend:
    """Answers with flat images whose colour comes from the seed; records what it was asked to run.

    ``error`` makes every generation raise it; ``hold`` (an ``asyncio.Event``) keeps generations
    running until it is set, reporting step 0 and then each step, and honouring cancel.
    """

    name = "fake"
    model_name = "fake-model"
    reports_start = False

    def __init__(
        self,
        *,
        state: BackendState = BackendState.ready,
        error: SdgateError | None = None,
        defaults: ModelDefaults = FAKE_DEFAULTS,
        hold: asyncio.Event | None = None,
        models: dict[str, ModelDefaults] | None = None,
        loras: dict[str, list[str]] | None = None,
    ) -> None:
        """``models``: the models it offers by name with their defaults (default: one, ``fake-model``).
        ``loras``: the LoRAs it offers by name, with the models each fits (default: none)."""
        self._state = state
        self._models = models or {self.model_name: defaults}
        self.model_name = next(iter(self._models))
        self.error = error
        self._defaults = defaults
        self.hold = hold
        self._loras = loras or {}
        self.ran: list[GenerationParams] = []
        self.loaded: set[str] = set()
        """Models other than the default that a generation has used (as if loaded for it)."""
        self.inputs: list[ImageInputs | None] = []
        """The input images each generation came with (None for text-to-image), in the order of ``ran``."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def state(self) -> BackendState:
        return self._state

    def set_state(self, state: BackendState) -> None:
        self._state = state

    def status_detail(self) -> str:
        return f"fake backend {self._state.value}"

    def model_names(self) -> list[str]:
        return list(self._models)

    def is_loaded(self, model: str) -> bool:
        return self._state is BackendState.ready and (model == self.model_name or model in self.loaded)

    def defaults(self, model: str | None = None) -> ModelDefaults:
        return self._models[model or self.model_name]

    def loras(self) -> list[LoraInfo]:
        return [LoraInfo(name, 1000, list(fits), []) for name, fits in self._loras.items()]

    def lora_problem(self, model: str, name: str) -> str | None:
        if name not in self._loras:
            return f"unknown LoRA {name!r}; offered: {', '.join(self._loras) or 'none'}"
        return None if model in self._loras[name] else f"LoRA {name!r} does not fit model {model!r}"

    async def generate(
        self,
        params: GenerationParams,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        *,
        inputs: ImageInputs | None = None,
        previews: Previews | None = None,
    ) -> GenerationResult:
        self.ran.append(params)
        self.inputs.append(inputs)
        if params.model is not None:
            self.loaded.add(params.model)
        if self.error is not None:
            raise self.error
        if self.hold is not None:
            while not self.hold.is_set():
                if cancel is not None and cancel.is_set():
                    raise Canceled("the job was canceled")
                await asyncio.sleep(0.005)
        for step in range(1, params.steps_to_run + 1):
            if progress is not None:
                progress(step, params.steps_to_run)
        images = [
            GeneratedImage(Image.new("RGB", (params.width, params.height), seed_colour(s)), s) for s in params.seeds
        ]
        return GenerationResult(images=images, inference_ms=1.0, batch_images=len(images))

    def stats(self) -> dict[str, Any]:
        return {"requests": len(self.ran)}


class MemoryStorage:
    """Objects in a dict; URLs are ``/images/<key>`` as the local storage gives."""

    name = "memory"

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str]] = {}

    def put(self, data: bytes, key: str, content_type: str, *, durable: bool = True) -> StoredObject:
        if not is_valid_key(key):
            raise ValueError(f"invalid storage key {key!r}")
        self.objects[key] = (data, content_type)
        return StoredObject(key=key, url=f"/images/{key}")

    def get(self, key: str) -> bytes:
        if key not in self.objects:
            raise StorageError(f"no object {key}")
        return self.objects[key][0]

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def check(self) -> None: ...


class MemoryJobStore:
    """Job records in a dict, copied in and out as a real store serialises them."""

    def __init__(self) -> None:
        self.records: dict[str, JobRecord] = {}
        self.saves = 0
        self._lock = threading.Lock()

    def insert(self, record: JobRecord) -> JobRecord:
        with self._lock:
            if record.idempotency_key is not None:
                existing = self._by_key(record.owner, record.idempotency_key)
                if existing is not None:
                    return existing.model_copy(deep=True)
            if record.id in self.records:
                raise DuplicateJob(f"job {record.id} exists already")
            self.records[record.id] = record.model_copy(deep=True)
        return record

    def save(self, record: JobRecord) -> None:
        with self._lock:
            if record.id in self.records:
                self.records[record.id] = record.model_copy(deep=True)
                self.saves += 1

    def claim(self, job_id: str, now: float) -> JobRecord | None:
        with self._lock:
            record = self.records.get(job_id)
            if record is None or record.status != JobStatus.queued:
                return None
            record.status, record.started, record.attempts = JobStatus.running, now, record.attempts + 1
            return record.model_copy(deep=True)

    def _by_key(self, owner: str | None, key: str) -> JobRecord | None:
        return next((r for r in self.records.values() if r.owner == owner and r.idempotency_key == key), None)

    def by_idempotency_key(self, owner: str | None, key: str) -> JobRecord | None:
        with self._lock:
            found = self._by_key(owner, key)
            return None if found is None else found.model_copy(deep=True)

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            record = self.records.get(job_id)
            return None if record is None else record.model_copy(deep=True)

    def _select(self, keep: Any, newest_first: bool = False) -> list[JobRecord]:
        with self._lock:
            chosen = [r.model_copy(deep=True) for r in self.records.values() if keep(r)]
        return sorted(chosen, key=lambda r: r.created, reverse=newest_first)

    def list_jobs(self, *, owner: str | None, limit: int, before: float | None) -> list[JobRecord]:
        def keep(r: JobRecord) -> bool:
            return (owner is None or r.owner == owner) and (before is None or r.created < before)

        return self._select(keep, newest_first=True)[:limit]

    def unfinished(self) -> list[JobRecord]:
        return self._select(lambda r: not r.status.is_terminal())

    def older_than(self, cutoff: float, limit: int = 500) -> list[JobRecord]:
        return self._select(lambda r: r.created < cutoff and r.status.is_terminal())[:limit]

    def finished_since(self, cutoff: float) -> list[JobRecord]:
        return self._select(lambda r: r.created >= cutoff and r.status.is_terminal())

    def delete(self, job_ids: list[str]) -> None:
        with self._lock:
            for job_id in job_ids:
                self.records.pop(job_id, None)

    def close(self) -> None: ...


def params(seed: int = 1, **overrides: Any) -> GenerationParams:
    """A resolved request for the fake backend: 64x64, 2 steps, PNG."""
    fields: dict[str, Any] = {
        "prompt": f"job {seed}",
        "negative_prompt": None,
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
        "seeds": (seed,),
        "scheduler": None,
        "output_format": "png",
        "quality": 90,
    }
    fields.update(overrides)
    return GenerationParams(**fields)


def record(status: JobStatus, created: float | None = None, attempts: int = 0, seed: int = 1) -> JobRecord:
    """A job record as a store would hold it."""
    import uuid

    created = time.time() if created is None else created
    return JobRecord(
        id=uuid.uuid4().hex,
        status=status,
        created=created,
        params=params(seed),
        model="fake-model",
        attempts=attempts,
        started=created + 1 if status != JobStatus.queued else None,
    )


class RecordingDispatcher:
    """Hands jobs to workers elsewhere, as on AWS Lambda: records what it was handed and runs nothing.

    ``error`` makes every hand-over raise it, as a worker function that cannot be invoked does.
    """

    in_process = False

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.sent: list[str] = []
        self.webhooks: list[str] = []

    def run(self, job_id: str, here: Callable[[], None]) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append(job_id)

    def deliver(self, job_id: str, here: Callable[[], None]) -> None:
        self.webhooks.append(job_id)
