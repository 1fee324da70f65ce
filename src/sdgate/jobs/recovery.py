"""After a restart: what the previous process left unfinished is run again or ended, and owed webhooks go out.

A job that was running when the process died is run once more; a second interruption fails it.
A finished job whose webhook delivery never ended (its ``delivered`` is unset) gets it now.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from sdgate.schemas import JobStatus

if TYPE_CHECKING:
    from sdgate.jobs.runner import JobRunner

log = logging.getLogger("sdgate.jobs")

MAX_ATTEMPTS = 2
# How far back a restart looks for finished jobs whose webhook was never delivered (or the
# retention window, when that is shorter).
WEBHOOK_RECOVERY_S = 24 * 3600.0


def recover(runner: JobRunner) -> None:
    """Re-queue or end every unfinished job, then deliver the webhooks the previous process owed."""
    for record in runner.store.unfinished():
        job = runner.adopt(record)
        if record.status == JobStatus.running and record.attempts >= MAX_ATTEMPTS:
            job.interrupt("the server stopped twice while running this job; not retried again")
            log.warning("job %s interrupted twice; failed", record.id)
            continue
        job.requeue()
        runner.schedule(job)
        log.info("job %s recovered and re-queued (attempts so far: %d)", record.id, record.attempts)
    retention = runner.settings.retention_s
    window = min(WEBHOOK_RECOVERY_S, retention or WEBHOOK_RECOVERY_S)
    for record in runner.store.finished_since(time.time() - window):
        if record.webhook is None or record.webhook.delivered is not None:
            continue
        runner.send_webhook(runner.adopt(record))
        log.info("job %s: webhook delivery interrupted by a restart; delivering it now", record.id)
