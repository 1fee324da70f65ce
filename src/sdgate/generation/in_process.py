"""The generation service over an engine in this process, without a server: the CLI's ``generate``, scripts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sdgate.config import Settings
from sdgate.generation.service import GenerationService


@asynccontextmanager
async def in_process(settings: Settings) -> AsyncIterator[GenerationService]:
    """A started service over a local engine, its jobs recorded and stored under the data dir; closed on exit.

    The model starts loading at once (``service.jobs.wait_ready`` waits for it). Unfinished jobs of the
    data dir are not recovered: a server sharing it may be running them right now.
    """
    from sdgate.backends.local import LocalBackend
    from sdgate.jobs import JobRunner
    from sdgate.jobstore import create_job_store
    from sdgate.storage import create_storage

    backend = LocalBackend(settings)
    store = create_job_store(settings)
    runner = JobRunner(settings, backend, create_storage(settings), store)
    await backend.start()
    await runner.start(recover_jobs=False)
    try:
        yield GenerationService(settings, backend, runner)
    finally:
        await runner.close()
        await backend.close()
        store.close()
