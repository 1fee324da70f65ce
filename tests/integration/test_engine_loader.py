"""Loading a pipeline directory by path (``model=<dir>``) through the engine's own loader."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdgate.config import Settings
from sdgate.engine.loader import COMPILE_CACHE_ENV, LoadedModel, ModelLoadError, keep_compiled, load_model
from tests.integration.pipelines import ScriptedPipeline, loader_for, params, started_engine
from tests.server import tiny_data, with_tiny_models


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


def test_stable_diffusion_loads_and_derives_its_pipelines_without_importing_every_pipeline(tmp_path: Path) -> None:
    # In a process of its own: this one has imported diffusers' auto pipelines already (other tests).
    code = """
import sys
from pathlib import Path
from sdgate.engine.loader import load_model
from sdgate.engine.pipelines import Pipelines
from sdgate.schemas import Mode
model = load_model("tiny", device="cpu", dtype="auto", models_dir=Path(sys.argv[1]))
pipes = Pipelines(model.pipeline)
print(type(model.pipeline).__name__, type(pipes.get(Mode.img2img)).__name__, type(pipes.get(Mode.inpaint)).__name__)
print("diffusers.pipelines.auto_pipeline" in sys.modules, "diffusers.models.controlnets" in sys.modules)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tiny_data() / "models")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    classes, imported = proc.stdout.splitlines()[-2:]
    assert classes == "StableDiffusionPipeline StableDiffusionImg2ImgPipeline StableDiffusionInpaintPipeline"
    assert imported == "False False"


def test_a_pipeline_class_that_sdgate_does_not_name_goes_through_diffusers_auto_pipeline(tmp_path: Path) -> None:
    from diffusers import AutoPipelineForText2Image, StableDiffusionXLPipeline

    from sdgate.engine.loader import text2image_class

    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyV22Pipeline"}')
    assert text2image_class(tmp_path) is AutoPipelineForText2Image
    assert text2image_class(tmp_path / "missing") is AutoPipelineForText2Image
    assert text2image_class(None, "StableDiffusionXLPipeline") is StableDiffusionXLPipeline


def test_a_compiled_unet_keeps_its_compile_caches_in_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unset for this test (and restored after it): torch's default is /tmp, gone with the container.
    for variable in COMPILE_CACHE_ENV:
        monkeypatch.setenv(variable, "set, so that deleting it is undone after the test")
        monkeypatch.delenv(variable)
    data_dir = with_tiny_models(tmp_path / "data")
    settings = Settings(data_dir=data_dir, model="tiny", device="cpu", warmup=False, compile=True)
    engine = started_engine(settings)  # no warm-up: nothing compiles yet, the UNet is only wrapped
    try:
        assert type(engine.models.get("tiny").loaded.pipeline.unet).__name__ == "OptimizedModule"
    finally:
        engine.close()
    cache = data_dir / "cache" / "torch"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(cache / "triton")
    assert (cache / "inductor").is_dir()


def test_a_compile_cache_the_operator_chose_is_left_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("TRITON_CACHE_DIR", "set, so that deleting it is undone after the test")
    monkeypatch.delenv("TRITON_CACHE_DIR")
    chosen = keep_compiled(tmp_path / "data" / "cache" / "torch")
    assert chosen == {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "mine"),
        "TRITON_CACHE_DIR": str(tmp_path / "data" / "cache" / "torch" / "triton"),
    }
    assert not (tmp_path / "data" / "cache" / "torch" / "inductor").exists()
