"""Backend ``ray``: the engine runs as a Ray Serve deployment; this process keeps the API, jobs and storage.

The deployment is ``sdgate-engine`` in the Serve application ``sdgate``; each replica is sdgate's own engine
(:mod:`sdgate.backends.ray_replica`). This backend connects to the cluster, deploys the application, or joins
it when another API node deployed it already (a second API node never makes a second deployment), and sends
each generation there through a deployment handle.

- Cluster: ``SDGATE_RAY_ADDRESS``; ``auto`` joins the cluster this machine belongs to (``ray start``), else
  starts a local one that lives as long as this process.
- Replicas: ``SDGATE_RAY_REPLICAS`` of them, or between ``SDGATE_RAY_MIN_REPLICAS`` and
  ``SDGATE_RAY_MAX_REPLICAS``, scaled by Serve on the requests in flight (a replica's target: one full
  batch); ``SDGATE_RAY_NUM_GPUS`` each (default: one where the cluster has GPUs, none on CPUs).
- Models: with several, a request goes to a replica that holds its model (Serve's model multiplexing); a
  replica loads one it does not hold, as the local engine does.
- Progress, previews and cancel: a generation is a streaming call. The replica yields the engine's steps
  (the loading phase too) and previews, then the result; the job's cancel cancels the call, which Ray
  turns into a cancel on the replica, where the engine stops at its next step.
- A replica that dies mid-run: its generations are sent once more, and Serve routes them to a live replica;
  a second loss fails them with a 502 ``backend_error``. The job either way ends succeeded or failed.
- This process needs no torch: model names, defaults and LoRAs come from a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, cast

from sdgate.backends import BackendState
from sdgate.config import Settings
from sdgate.errors import BackendError, Canceled, NotReady, error_of_type
from sdgate.schemas import (
    LOADING_STEP,
    GenerationParams,
    GenerationResult,
    LoraInfo,
    ModelDefaults,
    Previews,
    ProgressFn,
)

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

    from sdgate.backends.ray_replica import EngineCard, ReplicaEvent, ReplicaInfo, ReplicaRequest
    from sdgate.imaging import ImageInputs

log = logging.getLogger("sdgate.backends")

APP_NAME = "sdgate"
DEPLOYMENT_NAME = "sdgate-engine"
_CANCEL_POLL_S = 0.1
"""How often a generation in flight looks at its job's cancel (a threading.Event: no callback to wait on)."""
_MONITOR_S = 5.0
_FORGET_S = 60.0
"""A replica not heard from for this long no longer counts for which models are in memory (each check reaches one
replica, every :data:`_MONITOR_S`)."""
_CALL_TIMEOUT_S = 60.0
"""How long a listing (LoRAs) waits for the connection, and for a replica's answer."""
_LIVE = ("RUNNING", "DEPLOYING", "UNHEALTHY")
"""States of a running application that another API node joins (one that failed or is being deleted is made anew)."""


class _ReplicaLost(Exception):
    """The replica running a generation went away before it answered (its process or node died)."""


class RayBackend:
    """Generations on the replicas of a Ray Serve deployment of sdgate's engine."""

    name = "ray"
    # The replica's engine says when a task leaves its queue (progress step 0): a job shows `queued` until then.
    reports_start = True

    def __init__(self, settings: Settings):
        self.settings = settings
        self.model_name = settings.model_entries[0].name
        self._state = BackendState.loading
        self._detail = f"connecting to the Ray cluster ({settings.ray_address})"
        self._handle: DeploymentHandle[Any] | None = None
        self._connected = threading.Event()
        self._card: EngineCard | None = None
        self._joined = False
        self._where = settings.ray_address
        self._owns_ray = False
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._replicas: dict[str, ReplicaInfo] = {}
        """The last word of each replica that answered (dead ones too: their counters stay counted)."""
        self._jobs: Counter[str] = Counter()
        """Generations each replica ran to a result."""
        self._lost: set[str] = set()
        self._heard_at: dict[str, float] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._connect()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._owns_ray:
            # A cluster of our own goes with us; in a shared one the deployment stays, for the other API nodes.
            await asyncio.to_thread(_disconnect)
        self._state = BackendState.closed

    def state(self) -> BackendState:
        return self._state

    def status_detail(self) -> str:
        return self._detail

    async def _connect(self) -> None:
        """Connect, deploy or join, then read the engine's card from a replica (the first one to be ready)."""
        try:
            self._handle = await asyncio.to_thread(self._deploy)
            self._detail = f"waiting for a replica of {DEPLOYMENT_NAME} to load its model"
            card: EngineCard = await self._handle.describe.remote()
        except ImportError as e:
            self._fail(f"backend ray needs Ray Serve (pip install 'sdgate[ray]'): {e}")
            return
        except Exception as e:  # ConnectionError, a deployment that failed (its replicas' errors in the message)
            self._fail(f"could not start the Ray deployment {APP_NAME}/{DEPLOYMENT_NAME}: {type(e).__name__}: {e}")
            return
        self._take_card(card)
        how = "joined" if self._joined else "deployed"
        self._detail = f"{APP_NAME}/{DEPLOYMENT_NAME} {how} on {self._where}; model {self.model_name} on {card.device}"
        log.info("backend ray: %s", self._detail)
        if self._joined and card.fingerprint != self._fingerprint():
            log.warning(
                "the running deployment %s was made with other engine settings than this node's; its replicas keep "
                "theirs (redeploy with `serve delete %s` first to change them)",
                DEPLOYMENT_NAME,
                APP_NAME,
            )
        self._connected.set()
        self._state = BackendState.ready
        await self._monitor()

    def _fail(self, detail: str) -> None:
        log.error("backend ray: %s", detail)
        self._detail = detail
        self._state = BackendState.failed
        self._connected.set()

    def _deploy(self) -> DeploymentHandle[Any]:
        """(On a thread: Ray's calls block.) Connect to the cluster; join the running deployment or make it."""
        # Ray's crash handler would print a stack dump at every SIGTERM (a normal stop of the server); it is
        # read when Ray connects. An explicit setting of it wins.
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        import ray
        from ray import serve

        _log_through_root()
        # 1. the cluster. On this thread, not the main one: Ray then leaves SIGTERM to the server, whose graceful
        # stop finishes the running jobs (Ray logs a warning that it set no handler).
        if ray.is_initialized():  # the process connected already (an embedding application, a test)
            where = "the cluster this process is connected to"
        elif self.settings.ray_address == "auto":
            try:
                ray.init(address="auto", namespace=APP_NAME, log_to_driver=False)
                where = "the running cluster"
            except ConnectionError:
                log.info("backend ray: no running Ray cluster; starting a local one for this process")
                # No dashboard: the cluster serves this process only (`ray start --head` makes one to share).
                ray.init(namespace=APP_NAME, log_to_driver=False, include_dashboard=False)
                where = "a local cluster of this process"
            self._owns_ray = True
        else:
            ray.init(address=self.settings.ray_address, namespace=APP_NAME, log_to_driver=False)
            where = self.settings.ray_address
            self._owns_ray = True
        self._where = where
        # 2. the deployment: joined when it runs already, else deployed (serve.run waits for its replicas)
        app = serve.status().applications.get(APP_NAME)
        if app is not None and DEPLOYMENT_NAME in app.deployments and app.status in _LIVE:
            self._joined = True
            self._detail = f"joining the deployment {APP_NAME}/{DEPLOYMENT_NAME} ({_word(app.status)}) on {where}"
            log.info("backend ray: %s", self._detail)
            return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
        options = self._deployment_options()
        self._detail = f"deploying {APP_NAME}/{DEPLOYMENT_NAME} on {where}: {_describe_scale(options)}"
        log.info("backend ray: %s", self._detail)
        from sdgate.backends.ray_replica import EngineReplica, engine_settings

        # No HTTP proxy: the API is this process; replicas are reached through deployment handles only.
        serve.start(proxy_location="Disabled")
        app_ = serve.deployment(**options)(EngineReplica).bind(engine_settings(self.settings))
        handle: DeploymentHandle[Any] = serve.run(app_, name=APP_NAME, route_prefix=None)
        return handle

    def _fingerprint(self) -> str:
        from sdgate.backends.ray_replica import engine_settings, fingerprint

        return fingerprint(engine_settings(self.settings))

    def _deployment_options(self) -> dict[str, Any]:
        """The deployment's options from the settings (on a thread: the GPU default asks the cluster)."""
        import ray

        s = self.settings
        if s.ray_replicas is not None and (s.ray_min_replicas is not None or s.ray_max_replicas is not None):
            raise ValueError("set SDGATE_RAY_REPLICAS (a fixed count) or SDGATE_RAY_MIN/MAX_REPLICAS, not both")
        gpus = s.ray_num_gpus
        if gpus is None:  # one GPU per replica where the cluster has GPUs and the engine may use them
            resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
            has_gpus = resources.get("GPU", 0) >= 1
            gpus = 1.0 if has_gpus and s.device in ("auto", "cuda") else 0.0
        options: dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            # A CPU replica's threads: what it reserves is what its engine runs with (Ray sets OMP_NUM_THREADS).
            "ray_actor_options": {"num_gpus": gpus, "num_cpus": float(s.torch_threads or 1)},
            # Two batches: one running, the next one gathering in the engine's queue, where it is batched. With
            # less, requests wait in Serve's router, which tries a full replica again only after a back-off: the
            # engine would start its batches half full.
            "max_ongoing_requests": 2 * s.max_batch_size,
        }
        if s.ray_min_replicas is None and s.ray_max_replicas is None:
            options["num_replicas"] = s.ray_replicas or 1
        else:
            low = s.ray_min_replicas if s.ray_min_replicas is not None else 1
            high = s.ray_max_replicas if s.ray_max_replicas is not None else max(low, 1)
            options["autoscaling_config"] = {
                "min_replicas": low,
                "max_replicas": max(high, low, 1),
                # Scale out once a replica holds more than a full batch: more would wait for its next call.
                "target_ongoing_requests": s.max_batch_size,
            }
        return options

    async def _monitor(self) -> None:
        """Keep /readyz's detail (replicas running) and the engine's card (defaults, loaded models) current."""
        from ray import serve

        assert self._handle is not None
        while True:
            await asyncio.sleep(_MONITOR_S)
            try:
                status = await asyncio.to_thread(serve.status)
                app = status.applications.get(APP_NAME)
                deployment = None if app is None else app.deployments.get(DEPLOYMENT_NAME)
                if deployment is None:
                    self._detail = f"the deployment {APP_NAME}/{DEPLOYMENT_NAME} is gone from the cluster"
                    continue
                counts = deployment.replica_states
                states = ", ".join(f"{n} {_word(state)}" for state, n in sorted(counts.items()))
                how = "joined" if self._joined else "deployed"
                self._detail = (
                    f"{APP_NAME}/{DEPLOYMENT_NAME} {_word(deployment.status)}: replicas {states or 'none'} "
                    f"({how} on {self._where})"
                )
                # Only while a replica runs: a call to a deployment scaled to zero would scale it up again.
                if any(state == "RUNNING" and n for state, n in counts.items()):
                    self._take_card(await asyncio.wait_for(self._handle.describe.remote(), _MONITOR_S))
            except Exception as e:  # a cluster that went away, a deployment being replaced: said, and tried again
                self._detail = f"cannot read the deployment's state: {type(e).__name__}: {e}"

    # -- what the API asks without a generation -------------------------------------------------

    def _take_card(self, card: EngineCard) -> None:
        self._card = card
        self._heard(card.replica)

    def model_names(self) -> list[str]:
        if self._card is not None:  # the replicas' own list: what they will load
            return list(self._card.models)
        return [e.name for e in self.settings.model_entries]

    def is_loaded(self, model: str) -> bool:
        """Whether a replica holds ``model``, as the replicas heard from lately said (a replica removed by a
        scale-down or a crash stops counting after :data:`_FORGET_S`)."""
        recent = time.monotonic() - _FORGET_S
        with self._lock:
            return any(
                model in r.loaded
                for rid, r in self._replicas.items()
                if rid not in self._lost and self._heard_at.get(rid, 0.0) > recent
            )

    def defaults(self, model: str | None = None) -> ModelDefaults:
        name = model or self.model_name
        if self._card is not None and name in self._card.models:
            return self._card.models[name]
        # Before a replica answered: read from the model's configs here, as the engine does (no torch needed).
        from sdgate.engine.loader import peek_defaults

        entry = next((e for e in self.settings.model_entries if e.name == name), None)
        return ModelDefaults() if entry is None else peek_defaults(entry.spec, self.settings.paths.models)

    def loras(self) -> list[LoraInfo]:
        handle = self._wait_for_handle(_CALL_TIMEOUT_S)
        if handle is None:
            return []
        infos: list[LoraInfo] = handle.loras.remote().result(timeout_s=_CALL_TIMEOUT_S)
        return infos

    def lora_problem(self, model: str, name: str) -> str | None:
        # A request with LoRAs waits for the connection, as a request waits for the local engine's model.
        handle = self._wait_for_handle(self.settings.backend_timeout_s)
        if handle is None:
            return f"LoRA {name!r} cannot be checked: {self._detail}"
        problem: str | None = handle.lora_problem.remote(model, name).result(timeout_s=_CALL_TIMEOUT_S)
        return problem

    def _wait_for_handle(self, timeout: float) -> DeploymentHandle[Any] | None:
        """(Off the event loop.) The handle once connected; None when the connection failed or took too long."""
        self._connected.wait(timeout)
        return self._handle if self._state is BackendState.ready else None

    def stats(self) -> dict[str, Any]:
        """This node's counts of generations, plus the replicas' engine counters as they last reported them.

        Every value the metrics read is a number, summed over the replicas (dead ones included, so that counters
        never go back); ``replicas`` is each replica's count of generations (for a reader in process: the
        metrics skip it, and the debug log says which replica ran each generation).
        """
        with self._lock:
            summed: Counter[str] = Counter()
            batches: Counter[int] = Counter()
            for info in self._replicas.values():
                for key in ("pipeline_calls", "model_loads", "model_unloads"):
                    summed[key] += int(info.stats.get(key, 0))
                batches.update({int(k): int(v) for k, v in info.stats.get("batch_sizes", {}).items()})
            return {
                **{k: self._counts[k] for k in ("requests", "images", "failures", "canceled", "retries")},
                **summed,
                "batch_sizes": dict(sorted(batches.items())),
                "replicas": dict(self._jobs),
                "replicas_lost": len(self._lost),
            }

    # -- generating -----------------------------------------------------------------------------

    async def generate(
        self,
        params: GenerationParams,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        *,
        inputs: ImageInputs | None = None,
        previews: Previews | None = None,
    ) -> GenerationResult:
        """Run the generation on a replica; once more on another if that one dies before it answers."""
        from sdgate.backends.ray_replica import ReplicaRequest

        if self._handle is None or self._state is not BackendState.ready:
            raise NotReady(f"not ready: {self._detail}", headers={"Retry-After": "5"})
        cancel = cancel or threading.Event()
        request = ReplicaRequest(params, inputs, previews is not None)
        self._count("requests")
        try:
            try:
                return await self._run(request, progress, cancel, previews)
            except _ReplicaLost as lost:
                if cancel.is_set():
                    raise Canceled("the job was canceled") from None
                self._count("retries")
                log.warning("backend ray: %s; sending the generation once more", lost)
            try:
                return await self._run(request, progress, cancel, previews)
            except _ReplicaLost as lost:
                raise BackendError(f"the engine replicas failed twice while running the generation: {lost}") from None
        except Canceled:
            self._count("canceled")
            raise
        except Exception:
            self._count("failures")
            raise

    async def _run(
        self, request: ReplicaRequest, progress: ProgressFn | None, cancel: threading.Event, previews: Previews | None
    ) -> GenerationResult:
        """One streaming call: its events to the job, until :class:`Done` (returned) or :class:`Failed` (raised).

        A call that says nothing for ``SDGATE_BACKEND_TIMEOUT_S`` fails (a deployment with no replica that can
        start would hold it forever), except while its replica loads the model: that takes what it takes.
        """
        from ray.exceptions import NodeDiedError, RayActorError, TaskCancelledError, WorkerCrashedError
        from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

        from sdgate.backends.ray_replica import Done, Failed, Preview, Step

        assert self._handle is not None
        handle = self._handle.options(stream=True)
        if len(self.model_names()) > 1:
            # Routed to a replica that holds the model. With one model every replica holds it: not named, so
            # Serve spreads requests over all of them rather than filling the one that answered first.
            handle = handle.options(multiplexed_model_id=request.params.model or self.model_name)
        stream = cast("DeploymentResponseGenerator[ReplicaEvent]", handle.generate.remote(request))
        watcher = asyncio.create_task(_cancel_when_set(cancel, stream))
        timeout: float | None = self.settings.backend_timeout_s
        try:
            while True:
                try:
                    event = await asyncio.wait_for(stream.__anext__(), timeout)
                except StopAsyncIteration:
                    raise BackendError("an engine replica ended a generation without its result") from None
                except TimeoutError:
                    await asyncio.to_thread(stream.cancel)
                    raise BackendError(
                        f"no word from the engine replicas in {timeout:g} s (SDGATE_BACKEND_TIMEOUT_S): {self._detail}"
                    ) from None
                if isinstance(event, Step):
                    timeout = None if event.step == LOADING_STEP else self.settings.backend_timeout_s
                    if progress is not None:
                        progress(event.step, event.total)
                elif isinstance(event, Preview):
                    if previews is not None and previews.wanted():
                        previews.send(event.step, _picture(event.jpeg))
                elif isinstance(event, Done):
                    self._finished(event.replica, images=len(event.result.images))
                    log.debug(
                        "generation ran on replica %s",
                        event.replica.id,
                        extra={"replica": event.replica.id, "seeds": list(request.params.seeds)},
                    )
                    return event.result
                elif isinstance(event, Failed):
                    self._heard(event.replica)
                    raise error_of_type(event.type, event.message, headers=event.headers)
        except TaskCancelledError as e:  # Serve's RequestCancelledError, when it was our own cancel of the call
            if cancel.is_set():
                raise Canceled("the job was canceled") from None
            raise _ReplicaLost(f"the engine replica dropped the generation ({type(e).__name__})") from None
        except (RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError) as e:
            self._lost_replica(e)
            raise _ReplicaLost(f"an engine replica died ({type(e).__name__})") from None
        except DeploymentUnavailableError as e:
            raise BackendError(f"the Ray deployment {APP_NAME}/{DEPLOYMENT_NAME} is unavailable: {e.message}") from None
        except asyncio.CancelledError:
            stream.cancel()  # type: ignore[no-untyped-call]  # this job's task was canceled (shutdown): so is its call
            raise
        finally:
            watcher.cancel()

    def _heard(self, info: ReplicaInfo) -> None:
        with self._lock:
            self._replicas[info.id] = info
            self._heard_at[info.id] = time.monotonic()

    def _finished(self, info: ReplicaInfo, images: int) -> None:
        with self._lock:
            self._replicas[info.id] = info
            self._heard_at[info.id] = time.monotonic()
            self._jobs[info.id] += 1
            self._counts["images"] += images

    def _lost_replica(self, error: Exception) -> None:
        # Ray's error names the actor (``name: SERVE_REPLICA::app#deployment#id``): its models are gone with it.
        with self._lock:
            for rid, info in self._replicas.items():
                if info.actor in str(error):
                    self._lost.add(rid)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1


async def _cancel_when_set(cancel: threading.Event, stream: DeploymentResponseGenerator[Any]) -> None:
    """Cancel the call when the job's cancel is set (a threading.Event, set on any thread)."""
    while not cancel.is_set():
        await asyncio.sleep(_CANCEL_POLL_S)
    # Off the loop: cancel() waits for the call's assignment to a replica when it is being made.
    await asyncio.to_thread(stream.cancel)  # (untyped in Ray)


def _picture(jpeg: bytes) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(jpeg))
    image.load()
    return image


def _describe_scale(options: dict[str, Any]) -> str:
    gpus = options["ray_actor_options"]["num_gpus"]
    if "num_replicas" in options:
        return f"{options['num_replicas']} replica(s), {gpus:g} GPU each"
    scale = options["autoscaling_config"]
    return f"{scale['min_replicas']}..{scale['max_replicas']} replicas (autoscaled), {gpus:g} GPU each"


def _word(status: object) -> str:
    """A Serve status (an enum here, a plain string there, depending on the field) as a lower-case word."""
    return str(getattr(status, "value", status)).lower()


def _log_through_root() -> None:
    """Ray's own loggers in this process write through the root logger, so sdgate's format (JSON lines) holds."""
    for name in ("ray", "ray.serve"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def _disconnect() -> None:
    import ray

    with contextlib.suppress(Exception):
        ray.shutdown()
