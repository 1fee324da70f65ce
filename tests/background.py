"""Slow session resources prepared in the background, beside the first tests.

The suite runs one test at a time and, most of the time, on one of the machine's two cores: a
server start is mostly a single-threaded import of torch and diffusers, a venv build is pip. So the
resources every run needs anyway (the shared server, the gateway's torch-free venv) start when
collection ends, and their fixtures wait for them; an error is raised where the fixture asks.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sdgate-test-prepare")
_started: dict[str, Future[Any]] = {}
_dirs: list[Path] = []


def workdir(name: str) -> Path:
    """A fresh directory for a background resource, removed by :func:`cleanup`."""
    path = Path(tempfile.mkdtemp(prefix=f"sdgate-{name}-"))
    _dirs.append(path)
    return path


def prepare(name: str, make: Callable[[], Any]) -> None:
    """Start making ``name`` in the background (once)."""
    if name not in _started:
        _started[name] = _pool.submit(make)


def get(name: str, make: Callable[[], Any]) -> Any:
    """``name``, made in the background or now; waits for it."""
    prepare(name, make)
    return _started[name].result()


def cleanup(stop: Callable[[Any], None]) -> None:
    """At the end of the session: ``stop`` every resource that was made, then remove the directories."""
    for future in _started.values():
        if future.done() and future.exception() is None:
            stop(future.result())
        elif not future.done():
            future.cancel()
    _pool.shutdown(wait=True)
    for path in _dirs:
        shutil.rmtree(path, ignore_errors=True)
