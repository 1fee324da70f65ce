"""The local backend's ``generate_then``: the engine's thread hands each result to storing itself.

What it is for: a job's images go from the pipeline to being stored without a turn of the event loop
in between. The test that shows it blocks the loop until the finishing step has run; a finishing step
that needed the loop would never run.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sdgate.backends.local import LocalBackend
from sdgate.config import Settings
from sdgate.engine.loader import LoadedModel
from sdgate.errors import GenerationFailed
from sdgate.schemas import GenerationResult
from tests.fakes import params
from tests.integration.pipelines import ScriptedPipeline, loader_for, started_engine


@pytest.fixture
def backend(tiny_model: LoadedModel, tmp_path: Path) -> Iterator[LocalBackend]:
    settings = Settings(data_dir=tmp_path, model="tiny", device="cpu", warmup=False)
    pipe = ScriptedPipeline(tiny_model.pipeline, fail_prompt="explode")
    engine = started_engine(settings, loader_for(tiny_model, pipe))
    try:
        yield LocalBackend(settings, engine=engine)
    finally:
        engine.close()


@pytest.fixture
def storer() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2, thread_name_prefix="test-store") as pool:
        yield pool


def test_the_result_is_finished_on_the_executor_while_the_event_loop_is_busy(
    backend: LocalBackend, storer: ThreadPoolExecutor
) -> None:
    finished = threading.Event()
    seen: list[tuple[str, int]] = []

    def finish(result: GenerationResult) -> str:
        seen.append((threading.current_thread().name, len(result.images)))
        finished.set()
        return "stored"

    async def main() -> tuple[GenerationResult, str]:
        task = asyncio.ensure_future(backend.generate_then(params(seed=3, num_inference_steps=1), finish, storer))
        await asyncio.sleep(0)  # the task has submitted its generation and awaits it
        # The loop is blocked from here until the result is finished: finishing must not need it.
        assert finished.wait(120), "the result was not finished while the event loop was busy"
        return await task

    result, value = asyncio.run(main())
    assert value == "stored"
    assert [(name.startswith("test-store"), n) for name, n in seen] == [(True, 1)]
    assert [img.seed for img in result.images] == [3]


def test_a_finishing_step_that_raises_fails_the_generation(backend: LocalBackend, storer: ThreadPoolExecutor) -> None:
    def finish(result: GenerationResult) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        asyncio.run(backend.generate_then(params(num_inference_steps=1), finish, storer))


def test_a_failed_generation_is_never_finished(backend: LocalBackend, storer: ThreadPoolExecutor) -> None:
    finished: list[GenerationResult] = []

    with pytest.raises(GenerationFailed):
        asyncio.run(backend.generate_then(params(prompt="explode", num_inference_steps=1), finished.append, storer))
    assert finished == []
