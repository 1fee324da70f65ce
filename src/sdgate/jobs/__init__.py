"""Jobs: every generation is a durable job with one lifecycle.

- :mod:`~sdgate.jobs.lifecycle`: :class:`Job`, the only code that changes a status;
- :mod:`~sdgate.jobs.runner`: :class:`JobRunner`, accepting, running, reading and canceling jobs;
- :mod:`~sdgate.jobs.dispatch`: where a job runs (this process, or an AWS Lambda worker);
- :mod:`~sdgate.jobs.outputs`: encode once, store once;
- :mod:`~sdgate.jobs.events`, :mod:`~sdgate.jobs.webhooks`, :mod:`~sdgate.jobs.recovery`,
  :mod:`~sdgate.jobs.retention`.
"""

from __future__ import annotations

from sdgate.jobs.dispatch import Dispatcher, InProcess, LambdaDispatcher
from sdgate.jobs.events import Event
from sdgate.jobs.lifecycle import Job, Output
from sdgate.jobs.runner import JobRunner, request_hash

__all__ = ["Dispatcher", "Event", "InProcess", "Job", "JobRunner", "LambdaDispatcher", "Output", "request_hash"]
