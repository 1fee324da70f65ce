"""From worker threads to the event loop: many hand-offs, one wake-up.

The engine thread finishes a batch of eight at once and reports every step of each of its tasks;
handed over one by one (``call_soon_threadsafe`` each), that is eight wake-ups of the event loop per
step and eight more for the results, each one taking the GIL and a core from the pipeline's threads
while they compute. A :class:`Handoff` queues what arrives and wakes the loop once for all that
arrived before it ran.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger("sdgate.handoff")

T = TypeVar("T")


class Handoff:
    """Runs callables on ``loop``, posted from any thread, in the order they were posted."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._queued: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Have ``fn(*args)`` called on the loop soon. Thread-safe; never blocks on the loop."""
        with self._lock:
            self._queued.append((fn, args))
            if len(self._queued) > 1:
                return  # a wake-up is on its way already and will take this one too
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop is closed (shutdown): nobody is left to tell
            with self._lock:
                self._queued.clear()

    def _run(self) -> None:
        with self._lock:
            queued, self._queued = self._queued, []
        for fn, args in queued:
            try:
                fn(*args)
            except Exception:  # one failing callback must not starve the others
                log.exception("a callback handed to the event loop failed")

    def wrap(self, future: Future[T]) -> asyncio.Future[T]:
        """An asyncio future of the loop with ``future``'s outcome (``asyncio.wrap_future``, through here)."""
        waiter: asyncio.Future[T] = self.loop.create_future()

        def settle(done: Future[T]) -> None:
            if waiter.done():  # the awaiting task was canceled meanwhile
                return
            if done.cancelled():
                waiter.cancel()
            elif (error := done.exception()) is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(done.result())

        future.add_done_callback(lambda done: self.post(settle, done))
        return waiter
