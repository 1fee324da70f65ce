"""Where a generation runs: in process (``local``), on a SageMaker endpoint, or on another server (``http``).

Every backend implements the small :class:`Backend` protocol; the rest of sdgate never knows which.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sdgate.config import Settings
from sdgate.schemas import GeneratedImage, GenerationParams, ModelDefaults

ProgressFn = Callable[[int, int], None]


@dataclass
class BackendResult:
    images: list[GeneratedImage]
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    batch_images: int = 1  # images in the pipeline call that made these (batching shows as > 1)


class Backend(Protocol):
    """A place that turns :class:`GenerationParams` into images."""

    name: str
    model_name: str

    async def start(self) -> None:
        """Begin loading/connecting; must return quickly (readiness is reported by :meth:`ready`)."""
        ...

    async def close(self) -> None: ...

    def ready(self) -> bool: ...

    def status_detail(self) -> str:
        """One line for /readyz: why it is (not) ready."""
        ...

    def defaults(self) -> ModelDefaults: ...

    async def generate(
        self,
        params: GenerationParams,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> BackendResult:
        """Generate ``params.num_images`` images, one per seed; raise an :class:`SdgateError` on failure."""
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
    from sdgate.backends.local import LocalBackend

    return LocalBackend(settings)
