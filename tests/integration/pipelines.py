"""A seam around the real tiny pipeline, for engine tests that must fail or hold a pipeline call.

Every call still runs the real pipeline; the wrapper only records calls, raises for one prompt, or
blocks a call until the test releases it (so that requests queue up behind it deterministically).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from sdgate.config import Settings
from sdgate.engine.loader import LoadedModel
from sdgate.engine.runner import Engine
from sdgate.generation import resolve_request
from sdgate.schemas import GenerationParams, GenerationRequest, ModelDefaults


class ScriptedPipeline:
    def __init__(
        self,
        inner: Any,
        *,
        fail_prompt: str | None = None,
        fail_message: str = "scripted failure",
        hold_prompt: str | None = None,
    ):
        self._inner = inner
        # The engine swaps schedulers by assigning this attribute; keep our own slot so that
        # engines sharing the session's pipeline never see each other's scheduler.
        self.scheduler = inner.scheduler
        self.fail_prompt = fail_prompt
        self.fail_message = fail_message
        self.hold_prompt = hold_prompt
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[list[str]] = []
        self.schedulers: list[Any] = []
        # Prompts, not their embeddings, so that calls can be told apart: no reuse of text embeddings here.
        self.encode_prompt = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        # The class of the real pipeline: diffusers' AutoPipeline*.from_pipe picks its image-to-image
        # and inpainting classes by it (those run the real pipeline's modules, without this seam).
        return type(self._inner)

    def __call__(self, **kwargs: Any) -> Any:
        prompts = list(kwargs["prompt"])
        self.calls.append(prompts)
        self.schedulers.append(self.scheduler)
        if self.hold_prompt is not None and self.hold_prompt in prompts:
            self.entered.set()
            if not self.release.wait(60):
                raise RuntimeError("the test never released the held call")
        if self.fail_prompt is not None and self.fail_prompt in prompts:
            raise RuntimeError(self.fail_message)
        saved = self._inner.scheduler
        self._inner.scheduler = self.scheduler
        try:
            return self._inner(**kwargs)
        finally:
            self._inner.scheduler = saved


def loader_for(model: LoadedModel, pipeline: Any) -> Callable[[], LoadedModel]:
    """An engine loader that hands out ``pipeline`` with the rest of ``model`` (name, device, defaults)."""
    return lambda: dataclasses.replace(model, pipeline=pipeline)


def started_engine(settings: Settings, loader: Callable[[], Any] | None = None) -> Engine:
    engine = Engine(settings, loader=loader)
    engine.start()
    if not engine.wait_ready(120):
        engine.close()
        raise RuntimeError(f"engine did not become ready: {engine.state} {engine.load_error}")
    return engine


def params(
    settings: Settings,
    defaults: ModelDefaults | None = None,
    *,
    prompt: str = "a red fox in the snow",
    width: int = 64,
    height: int = 64,
    steps: int = 2,
    seed: int = 1,
    **fields: Any,
) -> GenerationParams:
    """Resolved parameters, through the same validation as every API surface."""
    request = GenerationRequest(
        prompt=prompt, width=width, height=height, num_inference_steps=steps, seed=seed, **fields
    )
    return resolve_request(request, settings, defaults or ModelDefaults(), model_name=request.model)
