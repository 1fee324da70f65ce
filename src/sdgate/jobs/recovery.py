"""After a restart: what the previous process left unfinished is run again or ended, and owed webhooks go out.

A job that was running when the process died is run once more; a second interruption fails it.
With a store that several nodes share, the same happens to what a node that is gone left behind,
taken over by a live node (:meth:`~sdgate.jobs.runner.JobRunner.start`'s node loop).
A finished job whose webhook delivery never ended (its ``delivered`` is unset) gets it now.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from sdgate.schemas import JobStatus

if TYPE_CHECKING:
    from sdgate.jobs.runner import JobRunner
    from sdgate.jobstore import JobRecord

log = logging.getLogger("sdgate.jobs")

MAX_ATTEMPTS = 2
# How far back a restart looks for finished jobs whose webhook was never delivered (or the
# retention window, when that is shorter).
WEBHOOK_RECOVERY_S = 24 * 3600.0


def recover(runner: JobRunner) -> None:
    """Re-queue or end every unfinished job, then deliver the webhooks the previous process owed."""
    resume(runner, runner.store.unfinished(), runner.store.finished_since(time.time() - webhook_window(runner)))


def webhook_window(runner: JobRunner) -> float:
    """How far back owed webhooks are looked for: a day, or the retention window when that is shorter."""
    retention = runner.settings.retention_s
    return min(WEBHOOK_RECOVERY_S, retention or WEBHOOK_RECOVERY_S)


def resume(runner: JobRunner, unfinished: list[JobRecord], finished: list[JobRecord]) -> None:
    """Run again (or end) the ``unfinished`` jobs a stopped process left, and deliver the webhooks of the
    ``finished`` ones that it still owed. At a start, or when this node takes over a node that is gone."""
    for record in unfinished:
        job = runner.adopt(record)
        if record.status == JobStatus.running and record.attempts >= MAX_ATTEMPTS:
            job.interrupt("the server stopped twice while running this job; not retried again")
            log.warning("job %s interrupted twice; failed", record.id)
            continue
        job.requeue()
        runner.schedule(job)
        log.info("job %s recovered and re-queued (attempts so far: %d)", record.id, record.attempts)
    for record in finished:
        if record.webhook is None or record.webhook.delivered is not None:
            continue
        runner.send_webhook(runner.adopt(record))
        log.info("job %s: webhook delivery interrupted by a restart; delivering it now", record.id)
