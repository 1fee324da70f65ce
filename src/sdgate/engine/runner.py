"""The engine: one thread owns the pipeline; requests reach it through a queue and are batched.

Why one thread: running the pipeline from a web server's thread pool, as most tutorials do, lets
every thread bring its own OpenMP team; on two cores under eight clients that halves throughput.
Why batching: requests that share mode, size, steps, guidance, scheduler and strength can run as one
pipeline call, each row with its own input image and mask. Each image keeps its own generator, so an
image is the same batched or alone.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdgate.backends import BackendState
from sdgate.config import ModelEntry, Settings
from sdgate.engine.loras import LoraError, LoraLibrary, Shapes, misfit, resolve
from sdgate.engine.models import ModelPool, Resident, default_max_loaded
from sdgate.engine.prompts import PromptEmbeddings
from sdgate.errors import Canceled, GenerationFailed, InvalidRequest, NotReady, new_error_id
from sdgate.schemas import (
    LOADING_STEP,
    GeneratedImage,
    GenerationParams,
    GenerationResult,
    LoraInfo,
    Mode,
    ModelDefaults,
    Previews,
    ProgressFn,
)

if TYPE_CHECKING:
    from sdgate.imaging import ImageInputs

log = logging.getLogger("sdgate.engine")


@dataclass
class EngineTask:
    params: GenerationParams
    future: Future[GenerationResult]
    progress: ProgressFn | None
    cancel: threading.Event
    inputs: ImageInputs | None = None
    previews: Previews | None = None
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class EngineStats:
    """Counters the tests and /metrics read. ``pipeline_calls`` < ``requests`` means batching worked."""

    requests: int = 0
    pipeline_calls: int = 0
    images: int = 0
    failures: int = 0
    canceled: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "pipeline_calls": self.pipeline_calls,
            "images": self.images,
            "failures": self.failures,
            "canceled": self.canceled,
            "batch_sizes": dict(sorted(self.batch_sizes.items())),
        }


class _StopBatch(Exception):
    """Raised from the step callback when every task of a batch was canceled."""


class Engine:
    """Loads the model on its own thread, then serves batches of tasks until closed."""

    def __init__(self, settings: Settings, loader: Callable[[], Any] | None = None):
        """``loader`` replaces the loading of the default model (tests hand in a pipeline they hold)."""
        self.settings = settings
        self._loader = loader
        self._pending: collections.deque[EngineTask] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._stats_lock = threading.Lock()
        self._last_batch_images = 1
        self._last_batch_end = 0.0  # perf_counter when the last pipeline call returned
        self._last_batch_key: tuple[Any, ...] | None = None
        self._last_call_s = 0.0
        self.stats = EngineStats()
        self.state = BackendState.loading
        self.load_error: str | None = None
        entries = settings.model_entries
        self.model_name = entries[0].name
        self.device = "unknown"
        self.models = ModelPool(entries, self._load_entry, self._peek, settings.max_loaded_models)
        self.loras = LoraLibrary(settings.loras_dir)
        self._skeletons: dict[str, Shapes | None] = {}
        self._skeleton_lock = threading.Lock()
        self._threads: int | None = None
        self._resident: Resident | None = None
        """The model of the batch being run (engine thread only)."""
        self._ready = threading.Event()

    @property
    def defaults(self) -> ModelDefaults:
        """The default model's defaults."""
        return self.models.defaults(self.model_name)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="sdgate-engine", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.state is BackendState.ready

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_pending(NotReady("the server is shutting down"))
        self.state = BackendState.closed

    # -- submission -----------------------------------------------------------------------------

    def submit(
        self,
        params: GenerationParams,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        *,
        inputs: ImageInputs | None = None,
        previews: Previews | None = None,
    ) -> Future[GenerationResult]:
        """Queue a generation; the future resolves with the images or the error. Thread-safe.

        ``inputs`` are the decoded images of an image-to-image or inpainting request; ``previews``
        receives a preview of its first image every ``SDGATE_PREVIEW_EVERY`` steps, while wanted.
        """
        task = EngineTask(params, Future(), progress, cancel or threading.Event(), inputs, previews)
        if params.mode is not Mode.txt2img and (inputs is None or (params.mode is Mode.inpaint) != bool(inputs.mask)):
            task.future.set_exception(GenerationFailed(f"a {params.mode.value} generation came without its inputs"))
            return task.future
        with self._cond:
            if self._closing or self.state is BackendState.failed:
                task.future.set_exception(NotReady(f"the model is not available: {self.load_error or 'closing'}"))
                return task.future
            self._pending.append(task)
            self._cond.notify_all()
        return task.future

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._pending)

    # -- LoRAs (any thread; reading a file or a model's configs takes torch: not on the event loop) --

    def model_shapes(self, model: str) -> Shapes | None:
        """The layer sizes of ``model``: its own once it has loaded, else from its configs; None if unknown."""
        with self._skeleton_lock:
            if model in self._skeletons:
                return self._skeletons[model]
        from sdgate.engine.loader import model_directory
        from sdgate.engine.loras import skeleton_shapes

        directory = model_directory(self.models.entries[model].spec, self.settings.paths.models)
        if directory is None:  # not on disk yet (a hub id not downloaded, a built-in not built): ask again later
            return None
        shapes: Shapes | None = None
        try:
            shapes = skeleton_shapes(directory)
        except Exception:  # a layout this check does not know: it is made when the model loads
            log.info("the layers of model %s are checked when it loads", model, exc_info=True)
        with self._skeleton_lock:
            self._skeletons[model] = shapes
        return shapes

    def lora_problem(self, model: str, name: str) -> str | None:
        """Why LoRA ``name`` cannot run on ``model`` (unknown, unreadable, does not fit); None if it can.

        A model whose layers are not known until it loads passes here; its batch checks again.
        """
        lora = self.loras.files().get(name)
        if lora is None:
            offered = ", ".join(self.loras.files()) or "none"
            return f"unknown LoRA {name!r}; offered: {offered}"
        try:
            targets = self.loras.targets(lora)
        except LoraError as e:
            return str(e)
        shapes = self.model_shapes(model)
        return None if shapes is None else misfit(name, targets, shapes)

    def lora_info(self) -> list[LoraInfo]:
        """Every LoRA of the directory, with the offered models it fits."""
        out = []
        for lora in self.loras.files().values():
            fits, unknown = [], []
            error = None
            try:
                targets = self.loras.targets(lora)
            except LoraError as e:
                error = str(e)
            else:
                for model in self.models.names():
                    shapes = self.model_shapes(model)
                    if shapes is None:
                        unknown.append(model)
                    elif misfit(lora.name, targets, shapes) is None:
                        fits.append(model)
            out.append(LoraInfo(lora.name, lora.stamp[0], fits, unknown, error))
        return out

    # -- the engine thread ----------------------------------------------------------------------

    def _load_entry(self, entry: ModelEntry) -> Resident:
        """Load one offered model (on the engine thread), with the pipelines made from it."""
        from sdgate.engine.pipelines import Pipelines
        from sdgate.engine.schedulers import SchedulerCache

        if self._loader is not None and entry.name == self.model_name:
            loaded = self._loader()
        else:
            from sdgate.engine.loader import load_model

            loaded = load_model(
                entry.spec,
                device=self.settings.device,
                dtype=self.settings.dtype,
                models_dir=self.settings.paths.models,
                single_file_config=self.settings.single_file_config,
                channels_last=self.settings.channels_last,
                compile_unet=self.settings.compile,
                compile_cache=self.settings.paths.compile_cache,
            )
        from sdgate.engine.loras import Adapters, pipeline_shapes

        pipe = loaded.pipeline
        shapes = pipeline_shapes(pipe)
        with self._skeleton_lock:  # known from now on, loaded or not
            self._skeletons[entry.name] = shapes
        return Resident(
            entry,
            loaded,
            Pipelines(pipe),
            SchedulerCache(pipe),
            shapes=shapes,
            adapters=Adapters(pipe, self.settings.max_loaded_loras),
            prompts=PromptEmbeddings(pipe),
        )

    def _peek(self, entry: ModelEntry) -> ModelDefaults:
        from sdgate.engine.loader import peek_defaults

        return peek_defaults(entry.spec, self.settings.paths.models)

    def _use(self, name: str) -> Resident:
        """The model for a batch, loaded if need be, with the CPU threads that suit it.

        Threads: the setting, else the model's own default, else torch's. Set here, on the thread that
        runs the pipeline: OpenMP's thread count is per calling thread.
        """
        if self._resident is not None and self._resident.entry.name != name:
            self._resident = None  # so that an unload below really frees the previous model's memory
        resident = self.models.get(name)
        self._resident = resident
        threads = self.settings.torch_threads or resident.defaults.torch_threads
        if threads and threads != self._threads:
            import torch

            torch.set_num_threads(threads)
            self._threads = threads
        return resident

    def _main(self) -> None:
        # 1. load the default model (the others when a request asks for them)
        try:
            if self.settings.max_loaded_models is None:
                from sdgate.engine.loader import pick_device

                self.models.max_loaded = default_max_loaded(pick_device(self.settings.device))
            # No local keeps it: the engine thread's frame lives as long as the server, and would keep
            # the default model in memory after the pool unloaded it.
            self.device = self._use(self.model_name).loaded.device
        except Exception as e:
            log.error("model load failed: %s", e, exc_info=not isinstance(e, ImportError))
            self.load_error = str(e)
            self.state = BackendState.failed
            self._ready.set()
            self._fail_pending(NotReady(f"the model could not be loaded: {e}"))
            return
        # 2. warm up, so that the first real request does not pay for lazy initialisation. A compiled
        # UNet compiles per shape: warm up at the default size with one image and with a full batch,
        # so that both compilations (the second makes the batch dimension dynamic) happen now.
        if self.settings.warmup:
            t0 = time.perf_counter()
            if self.settings.compile:
                side = (self.defaults.width, self.defaults.height)
                shapes = [(1, side), (self.settings.max_batch_size, side)]
            else:
                shapes = [(1, (min(self.defaults.width, 256), min(self.defaults.height, 256)))]
            try:
                for n, (width, height) in shapes:
                    self._call_pipeline(
                        prompts=["warm-up"] * n,
                        negatives=[""] * n,
                        seeds=list(range(n)),
                        width=width,
                        height=height,
                        steps=1,  # one step compiles and initialises the same as many
                        guidance=self.defaults.guidance_scale,
                        scheduler=None,
                        on_step=None,
                    )
                log.info("warm-up took %.0f ms", (time.perf_counter() - t0) * 1000)
            except Exception:
                log.warning("warm-up generation failed", exc_info=True)
        self.state = BackendState.ready
        self._ready.set()
        # 3. serve batches until closed
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run_batch(batch)

    def _next_batch(self) -> list[EngineTask] | None:
        """Take the oldest task and every queued task that can share its pipeline call.

        The target is the last batch's images when it had the same key (its clients are expected
        back) plus the tasks of this key that queued while it ran (they are not among them). It waits
        for more only while that target is above one image, so a lone client never pays the wait;
        then up to ``max_batch_wait_ms`` or a quarter of the last pipeline call, whichever is longer.

        Why: clients whose images just came back send their next request after the encoding,
        storage and HTTP round trip of the last batch; starting without them runs a fragment of a
        batch that costs nearly as much as a full one (on an H200 at 512x512, 1 image takes 1.3 s
        and 8 take 2.5 s; on two CPU cores at 64x64, 4 take two thirds of the time of 8). Counting
        only the last batch, clients that once split into two groups stay split, each group running
        half batches in turn; and a tenth of the call was shorter than the round trip of eight
        requests on two CPU cores. Measured with ``python -m bench``'s servers, 8 clients at 64x64:
        batches of 4.5 images on average became 8.0, and images/s rose by about 30%. When fewer
        clients remain, the wait is paid once, then the target drops.
        """
        max_images = self.settings.max_batch_size
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            # Canceled tasks leave the queue here, before they can hold up a batch.
            for task in [t for t in self._pending if t.cancel.is_set()]:
                self._pending.remove(task)
                if not task.future.done():
                    task.future.set_exception(Canceled("the job was canceled"))
            if not self._pending:
                return []
            first = self._pending[0]
            key = first.params.batch_key()
            earlier = sum(
                t.params.num_images
                for t in self._pending
                if t.params.batch_key() == key and t.enqueued < self._last_batch_end
            )
            # The last batch's clients come back with requests like theirs: expected only for its key.
            returning = self._last_batch_images if self._last_batch_key == key else 0
            target = min(max_images, max(returning + earlier, first.params.num_images))
            wait_s = 0.0
            if target > 1 and self.settings.max_batch_wait_ms > 0:  # 0 turns the wait off
                wait_s = max(self.settings.max_batch_wait_ms / 1000, self._last_call_s / 4)
            deadline = time.perf_counter() + wait_s
            while True:
                chosen: list[EngineTask] = []
                images = 0
                for task in self._pending:
                    if task.params.batch_key() != key:
                        continue
                    if chosen and images + task.params.num_images > max_images:
                        continue
                    chosen.append(task)
                    images += task.params.num_images
                remaining = deadline - time.perf_counter()
                if images >= target or remaining <= 0 or self._closing:
                    break
                self._cond.wait(remaining)
            for task in chosen:
                self._pending.remove(task)
        self._last_batch_images = images
        self._last_batch_key = key
        return chosen

    def _run_batch(self, batch: list[EngineTask]) -> None:
        start = time.perf_counter()
        live = [t for t in batch if not t.cancel.is_set() and t.future.set_running_or_notify_cancel()]
        for t in batch:
            if t not in live and not t.future.done():
                t.future.set_exception(Canceled("the job was canceled"))
        with self._stats_lock:
            self.stats.requests += len(batch)
            self.stats.canceled += len(batch) - len(live)
        if not live:
            return
        p = live[0].params
        prompts, negatives, seeds = [], [], []
        images: list[Any] = []
        masks: list[Any] = []
        for t in live:
            for seed in t.params.seeds:
                prompts.append(t.params.prompt)
                negatives.append(t.params.negative_prompt or "")
                seeds.append(seed)
                if t.inputs is not None:  # a row per image: each image of a request starts from its input
                    images.append(t.inputs.image.image)
                    if t.inputs.mask is not None:
                        masks.append(t.inputs.mask.image)
        steps_to_run = p.steps_to_run

        def tell(step: int) -> None:
            for t in live:
                if t.progress is not None and not t.future.done():
                    try:
                        t.progress(step, steps_to_run)
                    except Exception:
                        log.warning("progress callback failed", exc_info=True)

        # The batch's model: loaded now if it is not (its jobs show the loading phase meanwhile).
        name = p.model or self.model_name
        if not self.models.is_loaded(name):
            tell(LOADING_STEP)
        try:
            resident = self._use(name)
        except Exception as e:
            log.error("model %s failed to load: %s", name, e, exc_info=not isinstance(e, ImportError))
            self._fail(
                live, GenerationFailed(f"model {name} could not be loaded: {e}; the next request for it tries again")
            )
            return
        # The batch's LoRAs: checked against the loaded model's own layers, loaded once, turned on.
        try:
            loras = resolve(self.loras, p.active_loras)
            for lora, _ in loras:
                problem = misfit(lora.name, self.loras.targets(lora), resident.shapes)
                if problem is not None:
                    raise LoraError(f"{problem} (model {name})")
            if loras:
                resident.adapters.activate(loras)
        except LoraError as e:
            if resident.adapters is not None:
                resident.adapters.deactivate()
            # The request's fault, found only now (a model whose layers were unknown until it loaded): a 4xx.
            self._fail(live, InvalidRequest(str(e), field="loras"))
            return
        tell(0)  # step 0: the task has started

        every = self.settings.preview_every
        first_rows = list(itertools.accumulate((t.params.num_images for t in live), initial=0))

        def on_step(step: int, latents: Any) -> None:
            # Cancel is per task: a canceled task is answered now, its rows finish unused,
            # the others in the batch go on. Only when all are canceled does the call stop.
            for t in live:
                if t.cancel.is_set() and not t.future.done():
                    t.future.set_exception(Canceled("the job was canceled"))
            tell(step)
            if all(t.future.done() for t in live):
                raise _StopBatch
            if every and latents is not None and step % every == 0 and step < steps_to_run:
                self._send_previews(resident, live, first_rows, step, latents)

        try:
            made = self._call(
                resident,
                prompts=prompts,
                negatives=negatives,
                seeds=seeds,
                width=p.width,
                height=p.height,
                steps=p.num_inference_steps,
                guidance=p.guidance_scale,
                scheduler=p.scheduler,
                on_step=on_step,
                mode=p.mode,
                strength=p.strength,
                images=images or None,
                masks=masks or None,
            )
        except _StopBatch:
            with self._stats_lock:
                self.stats.pipeline_calls += 1
                self.stats.canceled += len(live)
            return
        except Exception as e:
            error_id = new_error_id()
            log.error("generation failed (error id %s)", error_id, exc_info=e)
            hint = ""
            if "out of memory" in str(e).lower():
                hint = " — the device ran out of memory; try a smaller size or fewer images"
            with self._stats_lock:
                self.stats.pipeline_calls += 1
            self._fail(live, GenerationFailed(f"the model failed to generate (error id {error_id}){hint}"))
            return
        self._last_batch_end = time.perf_counter()
        inference_ms = (self._last_batch_end - start) * 1000
        self._last_call_s = inference_ms / 1000
        with self._stats_lock:
            self.stats.pipeline_calls += 1
            self.stats.images += len(made)
            self.stats.batch_sizes[len(made)] += 1
            for t in live:
                if t.cancel.is_set():
                    self.stats.canceled += 1
        offset = 0
        for t in live:
            n = t.params.num_images
            mine = [
                GeneratedImage(image=img, seed=s)
                for img, s in zip(made[offset : offset + n], t.params.seeds, strict=True)
            ]
            offset += n
            if t.future.done():
                continue
            if t.cancel.is_set():
                t.future.set_exception(Canceled("the job was canceled"))
                continue
            t.future.set_result(
                GenerationResult(
                    images=mine,
                    queue_ms=(start - t.enqueued) * 1000,
                    inference_ms=inference_ms,
                    batch_images=len(made),
                )
            )

    def _call(self, resident: Resident, **call: Any) -> list[Any]:
        """One pipeline call of a batch; its LoRAs are turned off after it, whatever happens."""
        try:
            return self._call_pipeline(**call)
        finally:
            if resident.adapters is not None:
                resident.adapters.deactivate()

    def _send_previews(
        self, resident: Resident, live: list[EngineTask], first_rows: list[int], step: int, latents: Any
    ) -> None:
        """A preview of each wanting task's first image, from the batch's latents (a fraction of a step)."""
        for t, row in zip(live, first_rows, strict=False):
            if t.previews is None or t.future.done():
                continue
            try:
                if not t.previews.wanted():
                    continue
                if resident.previewer is None:  # fitted on first use: a server nobody asks pays nothing
                    from sdgate.engine.previews import LatentPreviewer

                    resident.previewer = LatentPreviewer(resident.loaded.pipeline)
                if latents.shape[1] != resident.previewer.channels:
                    continue
                t.previews.send(step, resident.previewer.picture(latents[row], (t.params.width, t.params.height)))
            except Exception:  # a preview is a nicety: never the reason a generation fails
                log.warning("preview failed", exc_info=True)

    def _fail(self, live: list[EngineTask], err: Exception) -> None:
        with self._stats_lock:
            self.stats.failures += len(live)
        for t in live:
            if not t.future.done():
                t.future.set_exception(err)

    def _call_pipeline(
        self,
        *,
        prompts: list[str],
        negatives: list[str],
        seeds: list[int],
        width: int,
        height: int,
        steps: int,
        guidance: float,
        scheduler: str | None,
        on_step: Callable[[int, Any], None] | None,
        mode: Mode = Mode.txt2img,
        strength: float | None = None,
        images: list[Any] | None = None,
        masks: list[Any] | None = None,
    ) -> list[Any]:
        import torch

        # CPU generators: the same seed gives the same starting noise on every device.
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        resident = self._resident
        assert resident is not None, "a batch runs on the model _use() made resident"
        # A LoRA that is on may change the text encoder: its batches encode their prompts themselves.
        lora_on = resident.adapters is not None and resident.adapters.on
        with torch.inference_mode():
            made: list[Any] = resident.pipes.run(
                mode,
                scheduler=resident.schedulers.get(scheduler),
                prompts=prompts,
                negatives=negatives,
                generators=generators,
                width=width,
                height=height,
                steps=steps,
                guidance=guidance,
                strength=strength,
                images=images,
                masks=masks,
                on_step=on_step,
                embeddings=None if lora_on else resident.prompts,
            )
        return made

    def _fail_pending(self, err: Exception) -> None:
        with self._cond:
            pending = list(self._pending)
            self._pending.clear()
        for task in pending:
            if not task.future.done():
                task.future.set_exception(err)
