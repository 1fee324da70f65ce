"""Several models in the engine, with real pipelines: a model not in memory is loaded for its batch (its
jobs told so), the least recently used one makes room, and a model that fails to load fails its jobs
clearly and is tried again by the next request."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdgate.config import Settings
from sdgate.engine.runner import Engine
from sdgate.errors import GenerationFailed
from sdgate.schemas import LOADING_STEP
from tests.integration.pipelines import params, started_engine

TIMEOUT = 120


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdgate.engine.builtin import build_tiny

    target = tmp_path_factory.mktemp("other") / "other-tiny"
    build_tiny(target, seed=1)
    return target


@pytest.fixture
def engine(tiny_data_dir: Path, other_model: Path) -> Iterator[Engine]:
    settings = Settings(
        data_dir=tiny_data_dir,
        models=f"tiny,other={other_model},broken={other_model.parent / 'missing'}",
        max_loaded_models=1,
        device="cpu",
        warmup=False,
        max_batch_wait_ms=0,
    )
    eng = started_engine(settings)
    yield eng
    eng.close()


def test_a_model_not_in_memory_is_loaded_for_its_batch_and_its_jobs_are_told(engine: Engine) -> None:
    assert engine.models.is_loaded("tiny") and not engine.models.is_loaded("other")
    seen: list[tuple[int, int]] = []
    p = params(engine.settings, model="other")
    result = engine.submit(p, lambda s, t: seen.append((s, t))).result(TIMEOUT)
    assert len(result.images) == 1
    assert seen[0] == (LOADING_STEP, 2) and seen[1:] == [(0, 2), (1, 2), (2, 2)]
    # One pipeline at a time: the other model took the place of the default.
    assert engine.models.is_loaded("other") and not engine.models.is_loaded("tiny")
    assert (engine.models.loads, engine.models.unloads) == (2, 1)
    seen.clear()
    engine.submit(params(engine.settings, model="other"), lambda s, t: seen.append((s, t))).result(TIMEOUT)
    assert LOADING_STEP not in [s for s, _ in seen]  # in memory now: no loading phase


def test_an_unloaded_model_is_gone_from_memory(engine: Engine) -> None:
    """Nothing keeps an unloaded pipeline alive (the engine thread once held the default model in a local)."""
    pipeline = weakref.ref(engine.models.get_resident("tiny").loaded.pipeline)
    engine.submit(params(engine.settings, model="other")).result(TIMEOUT)
    assert not engine.models.is_loaded("tiny")
    gc.collect()
    assert pipeline() is None


def test_a_model_that_fails_to_load_fails_its_jobs_and_is_tried_again(engine: Engine) -> None:
    for _ in range(2):
        with pytest.raises(GenerationFailed, match=r"model broken could not be loaded: .*the next request for it"):
            engine.submit(params(engine.settings, model="broken")).result(TIMEOUT)
    assert engine.stats.failures == 2
    assert not engine.models.is_loaded("broken")
    # Room is made before a load (memory first): the default went, and comes back for its next request.
    assert len(engine.submit(params(engine.settings, model="tiny")).result(TIMEOUT).images) == 1
    assert engine.models.is_loaded("tiny")
