"""Where a recorded job runs: in this process (:class:`InProcess`), or in another Lambda invocation.

The runner records a job, then asks its dispatcher to have it run; everything else (the lifecycle,
encoding, storage, webhooks) is the same code wherever it runs.

On AWS Lambda (:class:`LambdaDispatcher`): the API invocation records a job, a second, asynchronous
invocation runs it.

Why not run jobs in the process, as ``sdgate serve`` does: Lambda freezes the process as soon as an
invocation has answered, so a job left running in the background of a 202 would stop until some
later request happens to thaw that container, or forever. And API Gateway stops waiting after 29 s.

So every job, sync or async, goes the same way:

1. the API invocation records the job (DynamoDB) and invokes the worker function with
   ``InvocationType=Event`` and ``{"sdgate_job": "<id>"}`` (``{"sdgate_webhook": "<id>"}`` to deliver
   the webhook of a job that ended in the API invocation, canceled say): Lambda queues the event and answers at once;
2. the worker invocation claims the job (queued → running, a conditional write: a twice-delivered
   event runs it once), calls the SageMaker endpoint, stores the images in S3, records the result
   and delivers the webhook, with up to 15 minutes to do it;
3. meanwhile the API invocation polls the record until the job ends (200 with the images) or until
   its own deadline, taken from the Lambda context a little before API Gateway gives up (202 with
   the job; the client polls ``GET /v1/jobs/{id}`` or gets the webhook).

A request is never cut off at 29 s nor run twice, and no answer waits on a guess of how long a
generation takes. Why a second Lambda invocation rather than SageMaker asynchronous inference: an
async endpoint takes only ``invoke_endpoint_async`` (input and output through S3), so sync requests
would need a second, real-time endpoint (a second GPU instance) or would poll S3 too; the worker
keeps one real-time endpoint, and the gateway code (per-image seeds, JPEG as it came, keys, URLs,
webhooks) is the same as on a server. Its limit: one image must come within SageMaker's 60 s
per invocation, which Stable Diffusion on a GPU does many times over.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mypy_boto3_lambda import LambdaClient

log = logging.getLogger("sdgate.jobs")

WORKER_EVENT_KEY = "sdgate_job"
"""A worker event that runs a job is ``{"sdgate_job": "<job id>"}``."""
WEBHOOK_EVENT_KEY = "sdgate_webhook"
"""A worker event that delivers a finished job's webhook is ``{"sdgate_webhook": "<job id>"}``."""

Here = Callable[[], None]


class Dispatcher(Protocol):
    """Has recorded jobs run, and their webhooks delivered."""

    in_process: bool
    """True when jobs run in this process: it then recovers them after a restart and sweeps old ones."""

    def run(self, job_id: str, here: Here) -> None:
        """Have the job run; ``here()`` runs it in this process. Raise when nobody could take it."""
        ...

    def deliver(self, job_id: str, here: Here) -> None:
        """Have the ended job's webhook delivered; ``here()`` delivers it from this process."""
        ...


class InProcess:
    """Jobs run as tasks of this process (``sdgate serve``, the CLI)."""

    in_process = True

    def run(self, job_id: str, here: Here) -> None:
        here()

    def deliver(self, job_id: str, here: Here) -> None:
        here()


class LambdaDispatcher:
    """Hands each job to the worker function: one asynchronous invocation (``InvocationType=Event``).

    The Lambda service's URL comes from ``AWS_ENDPOINT_URL_LAMBDA`` when set, as boto3 does.
    """

    in_process = False

    def __init__(self, function: str, client: LambdaClient | None = None):
        self.function = function
        self._client = client

    def run(self, job_id: str, here: Here) -> None:
        self._invoke({WORKER_EVENT_KEY: job_id})
        log.info("job %s handed to a worker", job_id)

    def deliver(self, job_id: str, here: Here) -> None:
        # This invocation is frozen once it has answered: a delivery with retries belongs to a worker.
        try:
            self._invoke({WEBHOOK_EVENT_KEY: job_id})
        except Exception as e:
            log.error("could not hand the webhook of job %s to a worker", job_id, exc_info=e)

    def _invoke(self, event: dict[str, str]) -> None:
        if self._client is None:
            import boto3
            from botocore.config import Config

            # Retried: a duplicate event is harmless, the worker claims the job once.
            config = Config(connect_timeout=5, read_timeout=10, retries={"total_max_attempts": 3, "mode": "standard"})
            self._client = boto3.client("lambda", config=config)
        self._client.invoke(FunctionName=self.function, InvocationType="Event", Payload=json.dumps(event).encode())
