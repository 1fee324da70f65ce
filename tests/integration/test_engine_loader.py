"""Loading a pipeline directory by path (``model=<dir>``) through the engine's own loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdgate.config import Settings
from sdgate.engine.loader import LoadedModel, ModelLoadError, load_model
from tests.integration.pipelines import ScriptedPipeline, loader_for, params, started_engine


def test_a_pipeline_directory_saved_by_the_test_loads_and_generates_the_same_images(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    # 1. a plain diffusers directory, saved here: no sdgate marker, nothing sdgate-specific
    model_dir = tmp_path / "my-pipeline"
    tiny_model.pipeline.save_pretrained(str(model_dir), safe_serialization=True)
    assert (model_dir / "model_index.json").is_file()
    assert not (model_dir / "sdgate-builtin.json").exists()

    # 2. load it by path with the engine's own loader
    settings = Settings(data_dir=tmp_path / "data", model=str(model_dir), device="cpu", warmup=False)
    engine = started_engine(settings)
    reference = started_engine(settings, loader_for(tiny_model, ScriptedPipeline(tiny_model.pipeline)))
    try:
        assert engine.model_name == str(model_dir)
        # Not the built-in: a model's own defaults, its native size from the saved configs.
        assert (engine.defaults.width, engine.defaults.height) == (512, 512)
        assert engine.defaults.num_inference_steps == 30
        p = params(settings, engine.defaults, seed=77)
        mine = engine.submit(p).result(120).images[0].image
        theirs = reference.submit(p).result(120).images[0].image
    finally:
        engine.close()
        reference.close()
    # 3. the same weights were loaded: the same seed gives the same image
    assert mine.size == (64, 64)
    assert np.array_equal(np.asarray(mine), np.asarray(theirs))
    # Loading never builds the built-in model as a side effect.
    assert not (tmp_path / "data" / "models").exists()


def test_a_directory_that_is_no_pipeline_is_a_load_error_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-pipeline"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="could not load model") as info:
        load_model(str(empty), device="cpu", dtype="float32", models_dir=tmp_path / "models")
    assert str(empty) in str(info.value)
