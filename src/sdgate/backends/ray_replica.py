"""The replica side of backend ``ray``: sdgate's own engine as a Ray Serve deployment, and what it streams back.

Each replica runs one :class:`~sdgate.engine.runner.Engine`, with its batching, its per-image generators and
its model pool: an image made on a replica is the image the in-process engine makes for the same seed and
the same batch. A generation is one streaming call: the replica yields the engine's progress and previews as
they come, then the result or the error, all as plain data (:data:`ReplicaEvent`); the API node
(:mod:`sdgate.backends.ray`) reads the stream.

The API node imports this module for the event types and the deployment's class, never for the engine:
nothing here imports torch until a replica starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ray import serve

from sdgate.backends import BackendState
from sdgate.config import Settings
from sdgate.errors import SdgateError, new_error_id
from sdgate.schemas import GenerationParams, GenerationResult, LoraInfo, ModelDefaults, Previews

if TYPE_CHECKING:
    from concurrent.futures import Future

    from sdgate.engine.runner import Engine
    from sdgate.imaging import ImageInputs

log = logging.getLogger("sdgate.backends")

STEP_INTERVAL_S = 0.1
"""At most this often a generation's progress crosses the cluster (each event is a message to the API node); the
start (step 0), the loading phase and the last step always do. Most steps of a large model take longer."""

ENGINE_FIELDS = frozenset(
    {
        "data_dir",
        "model",
        "models",
        "max_loaded_models",
        "lora_dir",
        "max_loaded_loras",
        "preview_every",
        "device",
        "dtype",
        "max_batch_size",
        "max_batch_wait_ms",
        "single_file_config",
        "warmup",
        "torch_threads",
        "channels_last",
        "compile",
        "log_level",
    }
)
"""The settings a replica's engine reads. Only these travel to the cluster: the rest (keys, webhook secret,
database URL) stays on the API node, and the replica never reads its own node's ``SDGATE_*`` variables."""


def engine_settings(settings: Settings) -> dict[str, Any]:
    """What a replica is made with: the engine's settings of ``settings``."""
    return settings.model_dump(include=set(ENGINE_FIELDS))


def fingerprint(fields: dict[str, Any]) -> str:
    """A short digest of a replica's settings: how an API node that joins a running deployment tells whether
    it was made with other settings than its own. Not the data dir nor the log level: each node has its own."""
    compared = {k: v for k, v in fields.items() if k not in ("data_dir", "log_level")}
    text = json.dumps(compared, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- what travels between the API node and a replica ------------------------------------------------


@dataclass(frozen=True)
class ReplicaRequest:
    """One generation for a replica: resolved parameters, decoded inputs, and whether previews are wanted."""

    params: GenerationParams
    inputs: ImageInputs | None = None
    previews: bool = False


@dataclass(frozen=True)
class ReplicaInfo:
    """Which replica answered, and what its engine had done by then (the API node's stats read it)."""

    id: str
    actor: str
    """The replica's actor name (``SERVE_REPLICA::app#deployment#id``): what ``ray.get_actor`` finds."""
    pid: int
    node: str
    loaded: tuple[str, ...]
    """The models in its memory."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Its engine's counters (requests, pipeline calls, images, batch sizes, model loads...)."""


@dataclass(frozen=True)
class Step:
    """The engine's progress: ``LOADING_STEP`` while it loads the model, 0 when the work starts, then each step."""

    step: int
    total: int


@dataclass(frozen=True)
class Preview:
    """A live preview of the first image, as the small JPEG the job's events carry."""

    step: int
    jpeg: bytes


@dataclass(frozen=True)
class Done:
    """The last event of a generation that succeeded: its images, as the engine made them."""

    result: GenerationResult
    replica: ReplicaInfo


@dataclass(frozen=True)
class Failed:
    """The last event of a generation the engine refused or failed: the :class:`SdgateError` as data.

    Not raised through Ray: an exception crossing it arrives wrapped in Ray's own error types; this arrives
    as the error the local engine would raise.
    """

    type: str
    message: str
    field: str | None
    headers: dict[str, str]
    replica: ReplicaInfo


ReplicaEvent = Step | Preview | Done | Failed


@dataclass(frozen=True)
class EngineCard:
    """What an API node needs to know about the engine without loading it: its models and their defaults."""

    models: dict[str, ModelDefaults]
    """The offered models, the default first, with what a request that leaves fields out gets."""
    device: str
    fingerprint: str
    replica: ReplicaInfo


# -- the deployment ---------------------------------------------------------------------------------


class EngineReplica:
    """One replica of the ``sdgate-engine`` deployment: an engine, loaded before the replica takes requests."""

    # Ray Serve awaits a coroutine constructor; Serve routes nothing to a replica until it has returned.
    async def __init__(self, fields: dict[str, Any]) -> None:  # type: ignore[misc]
        from sdgate.engine.runner import Engine

        # 1. settings: the API node's engine settings, as they were validated there (no environment read here)
        self.settings = Settings.model_construct(**fields)
        self.fingerprint = fingerprint(fields)
        _log_to_stderr(self.settings.log_level)
        # 2. the engine: loaded and warmed up before Serve sends this replica anything
        self.engine: Engine = Engine(self.settings)
        self.engine.start()
        if not await asyncio.to_thread(self.engine.wait_ready):
            raise RuntimeError(f"the model could not be loaded: {self.engine.load_error}")
        context = serve.get_replica_context()
        self.id = context.replica_id.unique_id
        self.actor = context.replica_id.to_full_id_str()
        self.node = os.uname().nodename
        self._in_flight = 0
        log.info("engine replica %s ready: model %s on %s", self.id, self.engine.model_name, self.engine.device)

        # 3. model multiplexing: Serve routes a request that names a model to a replica that has admitted it.
        # The engine loads and unloads the models itself (least recently used first, as many as it keeps);
        # this only tells Serve's router, so it keeps as many as the engine does. The default model is in
        # memory already: admitted now, so that requests for it spread over every replica from the start.
        async def admit(model_id: str) -> str:
            return model_id

        keeps = self.engine.models.max_loaded or 1
        self._admit = serve.multiplexed(max_num_models_per_replica=keeps)(admit)
        await self._admit(self.engine.model_name)

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[ReplicaEvent]:
        """Run one generation on the engine; yield its progress and previews, then :class:`Done` or :class:`Failed`.

        Progress: each step, but at most every :data:`STEP_INTERVAL_S` (fast steps skip some, never the last).

        Canceling the call (the job's cancel on the API node) raises ``CancelledError`` here, at the wait for the
        next event: the engine's cancel is set, and it drops the task at its next step.
        """
        model = serve.get_multiplexed_model_id()
        if model:
            await self._admit(model)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[ReplicaEvent | None] = asyncio.Queue()
        cancel = threading.Event()

        def put(event: ReplicaEvent | None) -> None:  # from the engine thread, in the order it happens
            loop.call_soon_threadsafe(events.put_nowait, event)

        previews = None
        if request.previews:
            from sdgate.imaging import preview_jpeg

            # Whether anyone watches is known on the API node only: a preview is made at each preview step
            # (a fraction of a step), encoded here, and dropped there when nobody wants it.
            previews = Previews(wanted=lambda: True, send=lambda step, image: put(Preview(step, preview_jpeg(image))))
        future = self.engine.submit(
            request.params, lambda step, total: put(Step(step, total)), cancel, inputs=request.inputs, previews=previews
        )
        future.add_done_callback(lambda _: put(None))
        self._in_flight += 1
        last_step = 0.0
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, Step) and 0 < event.step < event.total:
                    now = time.monotonic()
                    if now - last_step < STEP_INTERVAL_S:
                        continue  # a later step follows within a step's time, and the last one always comes
                    last_step = now
                yield event
            yield self._outcome(future)
        finally:
            self._in_flight -= 1
            if not future.done():  # canceled, or the caller went away: stop spending the device on it
                cancel.set()

    def _outcome(self, future: Future[GenerationResult]) -> Done | Failed:
        try:
            result = future.result()
        except SdgateError as e:
            return Failed(e.type, e.message, e.field, dict(e.headers), self.info())
        except Exception as e:  # the engine fails its tasks with SdgateErrors: anything else is a bug here
            error_id = new_error_id()
            log.error("engine replica %s failed a generation (error id %s)", self.id, error_id, exc_info=e)
            message = f"the engine replica failed (error id {error_id} in its log)"
            return Failed("generation_failed", message, None, {}, self.info())
        for image in result.images:
            image.extra["replica"] = self.id
        return Done(result, self.info())

    async def describe(self) -> EngineCard:
        """The models and their defaults (a model not loaded is read from its configs: off the event loop)."""
        pool = self.engine.models
        models = {name: await asyncio.to_thread(pool.defaults, name) for name in pool.names()}
        return EngineCard(models, self.engine.device, self.fingerprint, self.info())

    async def loras(self) -> list[LoraInfo]:
        return await asyncio.to_thread(self.engine.lora_info)

    async def lora_problem(self, model: str, name: str) -> str | None:
        return await asyncio.to_thread(self.engine.lora_problem, model, name)

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine stopped is replaced."""
        if self.engine.state is not BackendState.ready:
            raise RuntimeError(f"engine {self.engine.state.value}: {self.engine.load_error or 'stopped'}")

    def info(self) -> ReplicaInfo:
        pool = self.engine.models
        stats = {
            "in_flight": self._in_flight,
            "queue_depth": self.engine.queue_depth(),
            "model_loads": pool.loads,
            "model_unloads": pool.unloads,
            **self.engine.stats.snapshot(),
        }
        loaded = tuple(name for name in pool.names() if pool.is_loaded(name))
        return ReplicaInfo(self.id, self.actor, os.getpid(), self.node, loaded, stats)

    def __del__(self) -> None:
        # Serve calls this when it stops the replica (scale-down, redeploy, shutdown): queued tasks fail cleanly.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(timeout=10)


def _log_to_stderr(level: str) -> None:
    """sdgate's log lines, as text, into the replica's stderr (Ray keeps it in the session's worker logs)."""
    from sdgate.logs import TextFormatter

    logger = logging.getLogger("sdgate")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(TextFormatter())
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())
