"""Retention: terminal jobs older than ``SDGATE_RETENTION`` go, with their images, sidecars and inputs."""

from __future__ import annotations

import asyncio
import logging
import time

from sdgate.jobs.inputs import delete_inputs
from sdgate.jobs.outputs import delete_images
from sdgate.jobstore import JobStore
from sdgate.storage import Storage

log = logging.getLogger("sdgate.jobs")


def sweep(store: JobStore, storage: Storage, max_age_s: float) -> int:
    """Delete terminal jobs older than ``max_age_s``, their images and inputs; returns how many jobs went."""
    removed = 0
    cutoff = time.time() - max_age_s
    while True:
        old = store.older_than(cutoff)
        if not old:
            return removed
        for record in old:
            delete_images(storage, record.images)
            delete_inputs(storage, record.params)
        store.delete([r.id for r in old])
        removed += len(old)


async def retention_loop(store: JobStore, storage: Storage, max_age_s: float) -> None:
    """Sweep every tenth of the retention window (between a second and an hour), until canceled."""
    interval = min(max(max_age_s / 10, 1.0), 3600.0)
    while True:
        try:
            n = await asyncio.to_thread(sweep, store, storage, max_age_s)
            if n:
                log.info("retention: removed %d old jobs and their images", n)
        except Exception:
            log.exception("retention sweep failed")
        await asyncio.sleep(interval)
