"""The default backend: the diffusers engine in this process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Any, TypeVar

from sdgate.backends import BackendState
from sdgate.config import Settings
from sdgate.engine.runner import Engine
from sdgate.handoff import Handoff
from sdgate.schemas import GenerationParams, GenerationResult, LoraInfo, ModelDefaults, Previews, ProgressFn

if TYPE_CHECKING:
    from sdgate.imaging import ImageInputs

T = TypeVar("T")


class LocalBackend:
    name = "local"
    # The engine says when a task leaves its queue (progress step 0), so jobs show `queued` until then.
    reports_start = True

    def __init__(self, settings: Settings, engine: Engine | None = None):
        self.engine = engine or Engine(settings)
        self.model_name = self.engine.model_name
        self._handoff: Handoff | None = None
        """Brings a batch's results to the event loop with one wake-up (made on the loop, at first use)."""

    async def start(self) -> None:
        self.engine.start()

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.close)

    def state(self) -> BackendState:
        return self.engine.state

    def status_detail(self) -> str:
        if self.engine.state is BackendState.failed:
            return f"model failed to load: {self.engine.load_error}"
        return f"model {self.model_name} {self.engine.state.value} on {self.engine.device}"

    def model_names(self) -> list[str]:
        return self.engine.models.names()

    def is_loaded(self, model: str) -> bool:
        return self.engine.models.is_loaded(model)

    def defaults(self, model: str | None = None) -> ModelDefaults:
        return self.engine.models.defaults(model or self.model_name)

    def loras(self) -> list[LoraInfo]:
        return self.engine.lora_info()

    def lora_problem(self, model: str, name: str) -> str | None:
        return self.engine.lora_problem(model, name)

    async def generate(
        self,
        params: GenerationParams,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        *,
        inputs: ImageInputs | None = None,
        previews: Previews | None = None,
    ) -> GenerationResult:
        cancel = cancel or threading.Event()
        return await self._outcome(
            self.engine.submit(params, progress, cancel, inputs=inputs, previews=previews), cancel
        )

    async def generate_then(
        self,
        params: GenerationParams,
        finish: Callable[[GenerationResult], T],
        executor: Executor,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        *,
        inputs: ImageInputs | None = None,
        previews: Previews | None = None,
    ) -> tuple[GenerationResult, T]:
        """:meth:`generate`, then ``finish(result)`` on ``executor``: both before the event loop hears of it.

        The engine's thread hands each result to ``executor`` itself, so a job's images go from the
        pipeline to being encoded and stored without a turn of the event loop in between: one wake-up
        of the loop per job instead of two, and one thread hop less on the way to the answer.
        ``finish`` raising fails the generation with its exception.
        """
        cancel = cancel or threading.Event()
        both: Future[tuple[GenerationResult, T]] = Future()

        def run(result: GenerationResult) -> None:  # on the executor
            try:
                both.set_result((result, finish(result)))
            except BaseException as e:
                both.set_exception(e)

        def chain(generated: Future[GenerationResult]) -> None:  # on the engine thread, as it resolves
            if generated.cancelled():
                both.cancel()
            elif (error := generated.exception()) is not None:
                both.set_exception(error)
            else:
                try:
                    executor.submit(run, generated.result())
                except RuntimeError as e:  # the executor is shut down: the server is stopping
                    both.set_exception(e)

        self.engine.submit(params, progress, cancel, inputs=inputs, previews=previews).add_done_callback(chain)
        return await self._outcome(both, cancel)

    async def _outcome(self, future: Future[T], cancel: threading.Event) -> T:
        """``future``'s outcome on the running loop, brought there by the hand-off (one wake-up for many)."""
        loop = asyncio.get_running_loop()
        if self._handoff is None or self._handoff.loop is not loop:
            self._handoff = Handoff(loop)
        try:
            return await self._handoff.wrap(future)
        except asyncio.CancelledError:
            # The job's task was canceled (shutdown): stop spending the device on it.
            cancel.set()
            raise

    def stats(self) -> dict[str, Any]:
        models = self.engine.models
        return {
            "queue_depth": self.engine.queue_depth(),
            "model_loads": models.loads,
            "model_unloads": models.unloads,
            **self.engine.stats.snapshot(),
        }
