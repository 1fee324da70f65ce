"""A job and its lifecycle: the only code that changes a job's status.

``queued → running → succeeded | failed | canceled``; a job the server lost twice while it ran ends
``failed`` with the error type ``interrupted``. Each transition stamps its time, saves the record,
observes the metrics, tells the job's event subscribers and, once the job has ended, hands it to
whoever schedules its webhook: in the server, in recovery after a restart and on AWS Lambda alike.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdgate.imaging import ImageInputs
from sdgate.jobs.events import Event
from sdgate.jobstore import JobRecord, JobStore
from sdgate.metrics import Metrics
from sdgate.schemas import (
    LOADING_STEP,
    ErrorInfo,
    GenerationParams,
    GenerationResponse,
    JobStatus,
    StoredImage,
    Timings,
)

CANCELED = ErrorInfo(type="canceled", message="canceled by request")


@dataclass
class Output:
    """One stored image of a job, with its bytes and pixels while the job is in memory.

    Surfaces that answer with the image itself (the SageMaker contract, the CLI) take it from here,
    so an image is encoded once, stored once, and the answer holds exactly the stored bytes.
    """

    image: StoredImage
    data: bytes
    pixels: Any  # PIL.Image.Image


@dataclass
class Lifecycle:
    """What a job's transitions need from the runner that owns it."""

    store: JobStore
    metrics: Metrics
    describe: Callable[[Job], GenerationResponse]
    """The job's public form, sent to event subscribers."""
    ended: Callable[[Job], None]
    """Called once, after the job reached its terminal status (schedules the webhook)."""


@dataclass(eq=False)
class Job:
    """A job: its durable record, plus what lives only in memory (progress, cancel flag, subscribers).

    ``local`` jobs run (or are recovered) in this process. Other ones were read from the store (a job
    a worker elsewhere runs, or one that ended long ago): their transitions are saved all the same.
    """

    record: JobRecord
    lifecycle: Lifecycle
    local: bool = True
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    step: int = 0
    total_steps: int = 0
    outputs: list[Output] = field(default_factory=list)
    subscribers: set[asyncio.Queue[Event]] = field(default_factory=set)
    loading: bool = False
    """Its model is being loaded (the backend said so; until its first step)."""
    inputs: ImageInputs | None = None
    """The decoded input images while the job that received them is in memory (else read from storage)."""
    preview: bytes | None = None
    """The latest live preview (a small JPEG) while it runs."""
    wants_previews: bool = False
    """Previews are made for it whoever listens (its surface shows them: the webui's current_image)."""
    preview_listeners: int = 0
    """Subscribers that asked for previews (``?previews=1``, OpenAI's partial_images)."""
    detached: bool = False
    """Another node took it over (this one's lease had run out): it is stopped here and nothing more of it
    is written from this process."""

    def __post_init__(self) -> None:
        self.step = self.record.step
        self.total_steps = self.record.params.steps_to_run
        if self.record.status.is_terminal():
            self.done.set()

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def status(self) -> JobStatus:
        return self.record.status

    @property
    def params(self) -> GenerationParams:
        return self.record.params

    # -- transitions ----------------------------------------------------------------------------

    def start(self) -> None:
        """queued → running (a no-op in any other status): one more attempt, from now."""
        if self.record.status != JobStatus.queued:
            return
        self.record.status = JobStatus.running
        self.record.started = time.time()
        self.record.attempts += 1
        self._save()
        self.publish("started")

    def requeue(self) -> None:
        """running → queued, for a job a stopped process left running; it runs again from the start."""
        if self.record.status != JobStatus.running:
            return
        self.record.status = JobStatus.queued
        self.step = 0
        self._save()

    def advance(self, step: int, total: int) -> None:
        """Progress of a running job: in memory and to subscribers, not to the store (too often).

        ``LOADING_STEP``: its model is being loaded first (a ``loading`` event).
        """
        if self.record.status.is_terminal():
            return
        self.start()
        if step == LOADING_STEP:
            self.loading = True
            self.publish("loading")
            return
        self.note_step(step, total)
        if step > 0:
            self.publish("progress")

    def note_step(self, step: int, total: int) -> None:
        """The step it is at, in memory only; any thread (the engine's, for a job nobody subscribed to).

        Never backwards within an attempt: a step handed to the loop may arrive after a later one was
        noted directly.
        """
        self.loading = False
        self.step, self.total_steps = max(self.step, step), total

    def set_preview(self, data: bytes) -> None:
        """A new live preview: kept for whoever polls, and a ``preview`` event to subscribers (its step is
        the job's: the engine reports progress before the preview of the same step)."""
        if self.record.status.is_terminal():
            return
        self.preview = data
        self.publish("preview")

    def previews_wanted(self) -> bool:
        return self.wants_previews or self.preview_listeners > 0

    def succeed(self, outputs: list[Output], timings: Timings) -> None:
        """Its images are stored: the job has succeeded."""
        if self.record.status.is_terminal():
            return
        self.outputs = outputs
        self.record.images = [o.image for o in outputs]
        self.record.timings = timings
        self.step = self.total_steps = self.params.steps_to_run
        self._end(JobStatus.succeeded, None)

    def fail(self, error: ErrorInfo) -> None:
        self._end(JobStatus.failed, error)

    def cancel(self, error: ErrorInfo = CANCELED) -> None:
        self.cancel_requested.set()
        self._end(JobStatus.canceled, error)

    def interrupt(self, message: str) -> None:
        """The process that ran it stopped (too often, or for good): a clear failure, not running forever."""
        self._end(JobStatus.failed, ErrorInfo(type="interrupted", message=message))

    def adopt(self, record: JobRecord) -> None:
        """Take a newer copy of the record from the store (written by another process)."""
        self.record = record
        if not self.local:
            self.step = record.step  # the progress its node last reported
        if record.status.is_terminal():
            self.done.set()

    def detach(self) -> None:
        """Stop it here and write nothing more: another node runs it now."""
        self.detached = True
        self.cancel_requested.set()
        self.done.set()

    # -- the common part ------------------------------------------------------------------------

    def _end(self, status: JobStatus, error: ErrorInfo | None) -> None:
        if self.record.status.is_terminal() or self.detached:
            return
        record = self.record
        record.status, record.error, record.step = status, error, self.step
        record.finished = time.time()
        total_ms = round((record.finished - record.created) * 1000, 2)
        record.timings = (record.timings or Timings()).model_copy(update={"total": total_ms})
        self.inputs = None  # the input images are in storage; their pixels are not needed any more
        self.preview = None
        self._save()
        self.lifecycle.metrics.job_finished(
            status.value, record.timings, len(record.images), error.type if error else None
        )
        self.publish(status.value)
        self.done.set()
        self.lifecycle.ended(self)

    def _save(self) -> None:
        if not self.detached:
            self.lifecycle.store.save(self.record)

    def publish(self, name: str) -> None:
        if not self.subscribers:
            return
        event = Event(name, self.lifecycle.describe(self).model_dump(mode="json"))
        for queue in self.subscribers:
            queue.put_nowait(event)
