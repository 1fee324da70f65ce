"""Slow resources prepared in the background, beside the tests that run before the ones that need them.

The suite runs one test at a time and, most of the time, on one of the machine's two cores: a
server start is mostly a single-threaded import of torch and diffusers, a venv build is pip. So:

- the resources every run needs anyway (the shared server, the gateway's torch-free venv) start when
  collection ends;
- a test module that needs servers of its own declares them with :func:`needs`; they start while
  the modules before it run (the conftest asks for the next :data:`AHEAD` declaring modules' resources).

Their fixtures wait for them (:func:`get`, or :func:`take` for one the module stops itself); an
error is raised where the fixture asks. A resource is made fresh for the module that declared it,
exactly as its fixture would make it: only *when* it starts changes.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Its threads mostly wait (on a server's /readyz, on pip): enough of them that a resource asked for is
# never queued behind two slow ones.
_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sdgate-test-prepare")
_started: dict[str, Future[Any]] = {}
_taken: set[str] = set()
_dirs: list[Path] = []
_needs: dict[Path, dict[str, Callable[[], Any]]] = {}
AHEAD = 3
"""How many of the next declaring modules have their resources made ahead. Three, not two: a whole run left the
machine's two cores 17% idle with two, mostly in modules that wait on a server (test_demo_model, test_ray), and
took 501 s with three against 580-615 s with two (one run each way, -v, the same machine and tree)."""


def workdir(name: str) -> Path:
    """A fresh directory for a background resource, removed by :func:`cleanup`."""
    path = Path(tempfile.mkdtemp(prefix=f"sdgate-{name}-"))
    _dirs.append(path)
    return path


def prepare(name: str, make: Callable[[], Any]) -> None:
    """Start making ``name`` in the background (once)."""
    if name not in _started and name not in _taken:
        _started[name] = _pool.submit(make)


def get(name: str, make: Callable[[], Any]) -> Any:
    """``name``, made in the background or now; waits for it. :func:`cleanup` stops it.

    Not started yet, or still queued: it is made now, in the caller's thread.
    """
    future = _started.get(name)
    if future is None or future.cancel():
        done: Future[Any] = Future()
        done.set_running_or_notify_cancel()  # running: another thread's get() waits for it, never cancels it
        _started[name] = done
        try:
            done.set_result(make())
        except BaseException as e:
            done.set_exception(e)
    return _started[name].result()


def take(name: str, make: Callable[[], Any]) -> Any:
    """Like :func:`get`, but the caller owns ``name`` from here: it stops it, and it is not made again."""
    made = get(name, make)
    _taken.add(name)
    del _started[name]
    return made


def needs(module: str, **resources: Callable[[], Any]) -> None:
    """Declare, when test module ``module`` (its ``__file__``) is imported, what it needs made ahead."""
    _needs.setdefault(Path(module).resolve(), {}).update(resources)


def prepare_ahead(modules: list[Path], current: Path) -> None:
    """Start the resources of the next :data:`AHEAD` modules after ``current`` that declared any."""
    if current.resolve() not in modules:
        return
    after = modules[modules.index(current.resolve()) + 1 :]
    for module in [m for m in after if m in _needs][:AHEAD]:
        for name, make in _needs[module].items():
            prepare(name, make)


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
