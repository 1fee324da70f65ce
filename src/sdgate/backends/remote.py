"""What the ``sagemaker`` and ``http`` backends share: a JumpStart-compatible endpoint elsewhere.

A subclass only says how to send one request body (:meth:`RemoteBackend._call`); this class
builds the bodies, reads the answers and turns failures into the errors clients see.

Seeds: a JumpStart endpoint seeds one generator for all images of a call, so ``seed`` with
``num_images_per_prompt=n`` would not give sdgate's per-image seeds. sdgate therefore makes one
call per image, each with its own seed (``seed + i``), all at once: every image can be made again
alone, by any backend, and an sdgate endpoint batches the calls into one pipeline call anyway.

Images: sdgate asks for ``application/json;jpeg`` and keeps the JPEG bytes as they came (stored
without re-encoding when JPEG is wanted). An endpoint that ignores that Accept type and sends RGB
lists is read as well; one that refuses it is asked again with ``application/json``, and from then on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from sdgate.config import Settings
from sdgate.errors import BackendError, Busy, Canceled, NotReady, SdgateError
from sdgate.jumpstart import JPEG_ACCEPT, JSON, ResponseError, parse_images, request_payload
from sdgate.schemas import (
    GeneratedImage,
    GenerationParams,
    GenerationResult,
    LoraInfo,
    ModelDefaults,
    Previews,
    ProgressFn,
)

if TYPE_CHECKING:
    from sdgate.imaging import ImageInputs

log = logging.getLogger("sdgate.backends")

# The defaults JumpStart documents for its Stable Diffusion models; SDGATE_DEFAULT_* override them.
JUMPSTART_DEFAULTS = ModelDefaults(width=512, height=512, num_inference_steps=50, guidance_scale=7.5)
# Statuses with which an endpoint may refuse an Accept type it does not speak.
_ACCEPT_REFUSALS = (400, 406, 415)


class EndpointRefused(Exception):
    """The endpoint answered with an error status; ``message`` is its own words.

    ``by_model`` is False when a service in front of the model answered instead (SageMaker's own
    validation, say): such a refusal is never about the Accept type.
    """

    def __init__(self, status: int, message: str, *, by_model: bool = True):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.by_model = by_model


class RemoteBackend:
    """A backend whose model runs behind a JumpStart-compatible endpoint."""

    name = "remote"
    model_name = "remote"

    def __init__(self, settings: Settings):
        self.settings = settings
        self._accept = JPEG_ACCEPT
        self._defaults = JUMPSTART_DEFAULTS
        self._lock = threading.Lock()
        self._counts = {"requests": 0, "images": 0, "failures": 0}

    # -- what a subclass provides ---------------------------------------------------------------

    @property
    def where(self) -> str:
        """The endpoint, for messages."""
        raise NotImplementedError

    async def _call(self, body: bytes, accept: str) -> bytes:
        """Send one JSON body; return the answer's body, raise :class:`EndpointRefused` or a :class:`SdgateError`."""
        raise NotImplementedError

    # -- the Backend protocol -------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return [self.model_name]  # one endpoint, one model

    def is_loaded(self, model: str) -> bool:
        return True  # whatever the endpoint holds: sdgate does not load it

    def defaults(self, model: str | None = None) -> ModelDefaults:
        return self._defaults

    def loras(self) -> list[LoraInfo]:
        return []  # the endpoint's contract has no LoRAs

    def lora_problem(self, model: str, name: str) -> str | None:
        return f"LoRA {name!r}: this server's {self.name} backend offers no LoRAs"

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._counts)

    async def generate(
        self,
        params: GenerationParams,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        *,
        inputs: ImageInputs | None = None,
        previews: Previews | None = None,
    ) -> GenerationResult:
        """One call per image, all at once; the first failure cancels the rest. Input images go along
        in the JumpStart inpainting payload's fields (``image``, ``mask_image``)."""
        cancel = cancel or threading.Event()
        self._count("requests")
        t0 = time.perf_counter()
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._one(params, seed, cancel, inputs)) for seed in params.seeds]
        except* SdgateError as failed:
            self._count("failures")
            raise failed.exceptions[0] from None
        if cancel.is_set():
            raise Canceled("the job was canceled")
        images = [t.result() for t in tasks]
        self._count("images", len(images))
        if progress is not None:  # a remote endpoint reports no steps: only the end
            progress(params.steps_to_run, params.steps_to_run)
        return GenerationResult(images=images, inference_ms=(time.perf_counter() - t0) * 1000)

    # -- one image ------------------------------------------------------------------------------

    async def _one(
        self, params: GenerationParams, seed: int, cancel: threading.Event, inputs: ImageInputs | None
    ) -> GeneratedImage:
        if cancel.is_set():
            raise Canceled("the job was canceled")
        body = json.dumps(request_payload(params, seed, inputs)).encode()
        accept = self._accept
        try:
            answer = await self._call(body, accept)
        except EndpointRefused as refused:
            if accept != JPEG_ACCEPT or not refused.by_model or refused.status not in _ACCEPT_REFUSALS:
                raise self._error(refused) from None
            try:
                answer = await self._call(body, JSON)
            except EndpointRefused:
                raise self._error(refused) from None  # the first refusal says more than the retry's
            log.warning("%s does not answer %s; asking for %s from now on", self.where, JPEG_ACCEPT, JSON)
            self._accept = JSON
        try:
            images = await asyncio.to_thread(parse_images, answer, seed)
        except ResponseError as e:
            raise BackendError(f"{self.where} answered with something that is not a JumpStart response: {e}") from None
        # An endpoint that ignored num_images_per_prompt=1 sent more; the first one carries our seed.
        return images[0]

    def _error(self, refused: EndpointRefused) -> SdgateError:
        if refused.status == 429:
            return Busy(f"{self.where} is busy: {refused.message}", headers={"Retry-After": "5"})
        if refused.status == 503:
            return NotReady(f"{self.where} is not available: {refused.message}", headers={"Retry-After": "5"})
        if refused.status == 424 or refused.status >= 500:
            return BackendError(f"the model at {self.where} failed: {refused.message}")
        return BackendError(f"{self.where} refused the request ({refused.status}): {refused.message}")

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n
