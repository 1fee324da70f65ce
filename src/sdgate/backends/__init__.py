"""Where a generation runs: in process (``local``), on a SageMaker endpoint, on another server (``http``), or on
the replicas of a Ray Serve deployment (``ray``).

Every backend implements the small :class:`Backend` protocol; the rest of sdgate never knows which.
"""

from __future__ import annotations

import threading
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from sdgate.config import Settings
from sdgate.schemas import GenerationParams, GenerationResult, LoraInfo, ModelDefaults, Previews, ProgressFn

if TYPE_CHECKING:
    from sdgate.imaging import ImageInputs


class BackendState(StrEnum):
    """Where a backend is: loading (or connecting), ready, failed for good, or closed."""

    loading = "loading"
    ready = "ready"
    failed = "failed"
    closed = "closed"


class Backend(Protocol):
    """A place that turns :class:`GenerationParams` into images."""

    name: str
    model_name: str

    async def start(self) -> None:
        """Begin loading/connecting; must return quickly (readiness is reported by :meth:`ready`)."""
        ...

    async def close(self) -> None: ...

    def state(self) -> BackendState: ...

    def status_detail(self) -> str:
        """One line for /readyz: why it is (not) ready."""
        ...

    def model_names(self) -> list[str]:
        """The models this backend offers, the default first."""
        ...

    def is_loaded(self, model: str) -> bool:
        """Whether ``model`` is in memory now (a request for one that is not waits for its load)."""
        ...

    def defaults(self, model: str | None = None) -> ModelDefaults:
        """What ``model`` (None: the default) uses for fields a request leaves out."""
        ...

    def loras(self) -> list[LoraInfo]:
        """The LoRAs this backend offers, with the models each fits. May read files: not on the event loop."""
        ...

    def lora_problem(self, model: str, name: str) -> str | None:
        """Why LoRA ``name`` cannot run on ``model``; None when it can. May read files: not on the event loop."""
        ...

    async def generate(
        self,
        params: GenerationParams,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        *,
        inputs: ImageInputs | None = None,
        previews: Previews | None = None,
    ) -> GenerationResult:
        """Generate ``params.num_images`` images, one per seed; raise an :class:`SdgateError` on failure.

        ``inputs`` are the decoded images ``params`` refer to (image-to-image and inpainting);
        ``previews``, where live previews go (backends that cannot make them ignore it).
        """
        ...

    def stats(self) -> dict[str, Any]: ...


def create_backend(settings: Settings) -> Backend:
    """The backend the settings ask for, importing only what it needs."""
    if settings.backend == "sagemaker":
        from sdgate.backends.sagemaker import SageMakerBackend

        return SageMakerBackend(settings)
    if settings.backend == "http":
        from sdgate.backends.http import HttpBackend

        return HttpBackend(settings)
    if settings.backend == "ray":
        from sdgate.backends.ray import RayBackend

        return RayBackend(settings)
    from sdgate.backends.local import LocalBackend

    return LocalBackend(settings)
