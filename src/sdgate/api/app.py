"""``create_app(settings)``: the whole HTTP service, its collaborators injected."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from sdgate import __version__
from sdgate.api import a1111, health, images, native, openai, playground, sagemaker, text2image
from sdgate.api import metrics as metrics_route
from sdgate.api.access import authenticate
from sdgate.api.context import AppContext
from sdgate.api.errors import install_error_handlers
from sdgate.api.middleware import BodyLimit, RequestContext
from sdgate.auth import Guard, create_guard
from sdgate.backends import Backend, BackendState, create_backend
from sdgate.config import Settings, is_loopback
from sdgate.generation import GenerationService
from sdgate.imaging import limit_decoding
from sdgate.jobs import Dispatcher, JobRunner
from sdgate.jobstore import JobStore, create_job_store
from sdgate.metrics import Metrics
from sdgate.storage import Storage, create_storage

log = logging.getLogger("sdgate.api")


def create_app(
    settings: Settings,
    backend: Backend | None = None,
    storage: Storage | None = None,
    store: JobStore | None = None,
    dispatcher: Dispatcher | None = None,
) -> FastAPI:
    """Build the app. ``backend``, ``storage`` and the job ``store`` default to what the settings name.

    ``dispatcher`` says where jobs run: in this process by default; the AWS Lambda handler passes one
    that hands each job to a worker invocation.
    """
    # 1. collaborators
    backend = backend or create_backend(settings)
    storage = storage or create_storage(settings)
    store = store or create_job_store(settings)
    metrics = Metrics()
    metrics.watch_backend(backend.stats, lambda: backend.state() is BackendState.ready)
    jobs = JobRunner(settings, backend, storage, store, metrics, dispatcher)
    guard = create_guard(settings)
    service = GenerationService(settings, backend, jobs, guard)
    ctx = AppContext(settings=settings, backend=backend, storage=storage, jobs=jobs, guard=guard, service=service)

    # 2. lifecycle: the model loads in the background so that /healthz answers at once
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        _warn_about_access(settings, guard)
        storage.check()
        await backend.start()
        log.info(
            "sdgate %s: backend %s, model %s, storage %s",
            __version__,
            backend.name,
            backend.model_name,
            storage.name,
        )
        await jobs.start()  # recovers jobs a previous process left unfinished
        try:
            yield
        finally:
            await jobs.close(settings.shutdown_grace_s)
            await backend.close()
            store.close()
            guard.keys.close()

    # 3. app, errors, routes
    app = FastAPI(
        title="sdgate",
        version=__version__,
        description="Stable Diffusion behind an open HTTP API; answers with URLs of stored images.",
        lifespan=lifespan,
        dependencies=[Depends(authenticate)],
    )
    app.state.ctx = ctx
    app.state.guard = guard
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, upload_bytes=settings.max_upload_bytes)
    limit_decoding(settings.max_pixels)  # Pillow's own decompression-bomb limit, for any image it opens
    app.add_middleware(RequestContext, metrics=metrics)  # outermost: sees every response, 413s included
    for router in (native, openai, a1111, health, images, metrics_route, sagemaker, text2image, playground):
        app.include_router(router.router)
    _document_request_bodies(app)
    return app


def _document_request_bodies(app: FastAPI) -> None:
    """Add the schemas of the bodies routes read themselves (JSON or multipart) to the OpenAPI document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            build()["components"]["schemas"].update(native.request_schemas())
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _warn_about_access(settings: Settings, guard: Guard) -> None:
    if settings.auth == "off" and not is_loopback(settings.host):
        log.warning(
            "!!! API keys are OFF and sdgate listens on %s: anyone who can reach it can use your GPU "
            "and read every job. Set SDGATE_AUTH=auto (the default) unless something in front checks keys. !!!",
            settings.host,
        )
    elif settings.auth_required and guard.keys.count() == 0:
        log.warning("API keys are required but none exist: create one with `sdgate keys create --name NAME`")
