"""Several models: SDGATE_MODELS, and the pool of resident pipelines (least recently used goes first)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sdgate.config import ModelEntry, Settings, parse_models
from sdgate.engine.models import ModelPool, Resident, default_max_loaded
from sdgate.schemas import ModelDefaults

# -- SDGATE_MODELS ------------------------------------------------------------------------------------


def test_entries_are_name_spec_or_bare_specs_the_first_the_default(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, models=" fast = tiny , demo ,big=/models/sdxl.safetensors")
    assert s.model_entries == [
        ModelEntry("fast", "tiny"),
        ModelEntry("demo", "demo"),
        ModelEntry("big", "/models/sdxl.safetensors"),
    ]


def test_without_sdgate_models_the_one_model_is_sdgate_model(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path, model="tiny").model_entries == [ModelEntry("tiny", "tiny")]


@pytest.mark.parametrize(
    ("value", "words"),
    [("a=tiny,a=demo", "names a more than once"), ("tiny,,demo", "empty entry"), ("=tiny", "must be name=spec")],
)
def test_a_bad_list_is_refused_at_start(tmp_path: Path, value: str, words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        Settings(data_dir=tmp_path, models=value)
    with pytest.raises(ValueError, match=words):
        parse_models(value)


def test_the_default_residency_is_one_pipeline_on_a_gpu_and_two_on_a_cpu() -> None:
    assert [default_max_loaded(d) for d in ("cuda", "mps", "cpu")] == [1, 1, 2]


# -- the pool ---------------------------------------------------------------------------------------


class Loads:
    """A loader that records what it loaded and can fail for one name."""

    def __init__(self, fail: str | None = None):
        self.fail = fail
        self.calls: list[str] = []

    def __call__(self, entry: ModelEntry) -> Resident:
        self.calls.append(entry.name)
        if entry.name == self.fail:
            raise RuntimeError(f"no such file for {entry.name}")
        loaded: Any = type("Loaded", (), {"defaults": ModelDefaults(width=8 * len(entry.name)), "device": "cpu"})()
        return Resident(entry, loaded, pipes=None, schedulers=None)


ENTRIES = [ModelEntry("a", "tiny"), ModelEntry("bb", "x"), ModelEntry("ccc", "y")]


def peek(entry: ModelEntry) -> ModelDefaults:
    return ModelDefaults(width=1000 + len(entry.name))


def test_the_least_recently_used_model_is_unloaded_first() -> None:
    loads = Loads()
    pool = ModelPool(ENTRIES, loads, peek, max_loaded=2)
    pool.get("a")
    pool.get("bb")
    pool.get("a")  # a is now the most recent
    pool.get("ccc")  # evicts bb
    assert [n for n in ("a", "bb", "ccc") if pool.is_loaded(n)] == ["a", "ccc"]
    assert loads.calls == ["a", "bb", "ccc"]
    assert (pool.loads, pool.unloads) == (3, 1)
    pool.get("bb")  # evicts a, loads bb again
    assert loads.calls[-1] == "bb" and not pool.is_loaded("a")


def test_defaults_are_peeked_until_a_model_is_loaded() -> None:
    pool = ModelPool(ENTRIES, Loads(), peek, max_loaded=1)
    assert pool.defaults("bb").width == 1002  # from its configs, not loaded
    pool.get("bb")
    assert pool.defaults("bb").width == 16  # its own, once loaded


def test_a_model_the_server_does_not_offer_is_refused_without_unloading_anything() -> None:
    loads = Loads()
    pool = ModelPool(ENTRIES, loads, peek, max_loaded=1)
    pool.get("a")
    with pytest.raises(LookupError, match="does not offer model 'gone'; it offers a, bb, ccc"):
        pool.get("gone")
    assert pool.is_loaded("a") and loads.calls == ["a"]


def test_a_failed_load_leaves_nothing_behind_and_is_tried_again() -> None:
    loads = Loads(fail="bb")
    pool = ModelPool(ENTRIES, loads, peek, max_loaded=2)
    pool.get("a")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="no such file"):
            pool.get("bb")
    assert loads.calls == ["a", "bb", "bb"]
    assert pool.is_loaded("a") and not pool.is_loaded("bb")
