"""Image-to-image and inpainting in the engine, with the real tiny pipeline (and a 9-channel one built here).

Batched equals alone holds for image inputs too: each row keeps its own input, mask and generator.
Inpainting keeps the unmasked area exactly: the input's pixels are pasted back over it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdgate.config import Settings
from sdgate.engine.loader import LoadedModel, load_model
from sdgate.engine.runner import Engine
from sdgate.errors import GenerationFailed
from sdgate.generation import read_inputs, resolve_request
from sdgate.imaging import ImageInputs
from sdgate.schemas import GenerationParams, GenerationRequest, Mode, ModelDefaults
from tests.integration.pipelines import ScriptedPipeline, loader_for, params, started_engine

TIMEOUT = 120


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def noise(seed: int, width: int = 64, height: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8), "RGB")


def left_half_mask(width: int = 64, height: int = 64) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    return mask


def resolved(settings: Settings, **fields: Any) -> tuple[GenerationParams, ImageInputs | None]:
    """A request resolved as the service resolves it: inputs checked, then defaults."""
    request = GenerationRequest(**{"prompt": "a red circle", "num_inference_steps": 4, "seed": 1, **fields})
    inputs = read_inputs(request, settings)
    return resolve_request(request, settings, ModelDefaults(), inputs), inputs


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture
def settings(tiny_data_dir: Path) -> Settings:
    return Settings(data_dir=tiny_data_dir, model="tiny", device="cpu", warmup=False, max_batch_wait_ms=0)


@pytest.fixture
def engine(settings: Settings, tiny_model: LoadedModel) -> Iterator[Engine]:
    eng = started_engine(settings, loader_for(tiny_model, tiny_model.pipeline))
    yield eng
    eng.close()


def test_image_to_image_runs_the_last_strength_of_the_schedule_at_the_images_size(
    engine: Engine, settings: Settings
) -> None:
    p, inputs = resolved(settings, image=png_b64(noise(1, 96, 64)), strength=0.5)
    assert (p.mode, p.width, p.height, p.steps_to_run) == (Mode.img2img, 96, 64, 2)
    steps: list[tuple[int, int]] = []
    result = engine.submit(p, lambda s, t: steps.append((s, t)), inputs=inputs).result(TIMEOUT)
    assert steps == [(0, 2), (1, 2), (2, 2)]
    assert result.images[0].image.size == (96, 64)


def test_same_seed_same_input_gives_the_same_image_and_another_input_does_not(
    engine: Engine, settings: Settings
) -> None:
    first, inputs = resolved(settings, image=png_b64(noise(1)))
    a = engine.submit(first, inputs=inputs).result(TIMEOUT).images[0].image
    b = engine.submit(first, inputs=inputs).result(TIMEOUT).images[0].image
    other, other_inputs = resolved(settings, image=png_b64(noise(2)))
    c = engine.submit(other, inputs=other_inputs).result(TIMEOUT).images[0].image
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_inpainting_keeps_the_unmasked_area_exactly_and_repaints_the_masked_one(
    engine: Engine, settings: Settings
) -> None:
    source = noise(3)
    p, inputs = resolved(settings, image=png_b64(source), mask=png_b64(left_half_mask()))
    assert (p.mode, p.strength) == (Mode.inpaint, 1.0)
    out = pixels(engine.submit(p, inputs=inputs).result(TIMEOUT).images[0].image)
    src = pixels(source)
    assert np.array_equal(out[:, 32:], src[:, 32:])  # black: kept, to the pixel
    assert np.abs(out[:, :32] - src[:, :32]).mean() > 20  # white: repainted


def test_a_request_of_another_size_resizes_its_input(engine: Engine, settings: Settings) -> None:
    p, inputs = resolved(settings, image=png_b64(noise(4, 128, 128)), mask=png_b64(left_half_mask(128, 128)), width=64)
    assert (p.width, p.height) == (64, 128)
    out = engine.submit(p, inputs=inputs).result(TIMEOUT).images[0].image
    assert out.size == (64, 128)


def test_batched_image_inputs_are_within_one_of_the_same_images_alone(tiny_model: LoadedModel, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, model="tiny", device="cpu", warmup=False, max_batch_wait_ms=2000)
    pipe = ScriptedPipeline(tiny_model.pipeline, hold_prompt="hold the engine")
    engine = started_engine(settings, loader_for(tiny_model, pipe))
    try:
        mask = png_b64(left_half_mask())
        batch = [
            resolved(settings, image=png_b64(noise(10)), seed=7),
            resolved(settings, image=png_b64(noise(11)), seed=8, prompt="a blue square"),
            resolved(settings, image=png_b64(noise(12)), seed=9, num_images=2),
            resolved(settings, image=png_b64(noise(13)), mask=mask, seed=7),
            resolved(settings, image=png_b64(noise(14)), mask=mask, seed=8),
        ]
        alone = [engine.submit(p, inputs=i).result(TIMEOUT) for p, i in batch]
        assert [r.batch_images for r in alone] == [1, 1, 2, 1, 1]
        # Hold the engine in a text-to-image call while all of them queue: they are then taken as two
        # batches, one per mode (image-to-image: 4 images; inpainting: 2).
        blocker = engine.submit(params(settings, prompt="hold the engine", steps=1))
        assert pipe.entered.wait(TIMEOUT)
        futures = [engine.submit(p, inputs=i) for p, i in batch]
        pipe.release.set()
        blocker.result(TIMEOUT)
        together = [f.result(TIMEOUT) for f in futures]
    finally:
        pipe.release.set()
        engine.close()
    assert [r.batch_images for r in together] == [4, 4, 4, 2, 2]
    for one, many in zip(alone, together, strict=True):
        for a, b in zip(one.images, many.images, strict=True):
            assert a.seed == b.seed
            assert np.abs(pixels(a.image) - pixels(b.image)).max() <= 1


def test_a_generation_from_an_image_without_its_inputs_fails_clearly(engine: Engine, settings: Settings) -> None:
    p, _inputs = resolved(settings, image=png_b64(noise(5)))
    with pytest.raises(GenerationFailed, match="without its inputs"):
        engine.submit(p).result(TIMEOUT)


# -- a dedicated inpainting checkpoint: a 9-channel UNet ------------------------------------------


@pytest.fixture(scope="module")
def inpainting_model(tiny_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny pipeline with a 9-channel UNet (latents + mask + masked image), saved and loaded by path."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    tiny = tiny_model.pipeline
    config = {**tiny.unet.config, "in_channels": 9}
    unet = UNet2DConditionModel.from_config(config)
    components = {**tiny.components, "unet": unet}
    target = tmp_path_factory.mktemp("inpainting") / "tiny-inpainting"
    StableDiffusionInpaintPipeline(**components).save_pretrained(str(target), safe_serialization=True)
    return load_model(str(target), device="cpu", dtype="float32", models_dir=target.parent)


def test_an_inpainting_checkpoint_does_text_to_image_image_to_image_and_inpainting(
    inpainting_model: LoadedModel, tmp_path: Path
) -> None:
    assert inpainting_model.pipeline.unet.config.in_channels == 9
    settings = Settings(data_dir=tmp_path, model="tiny", device="cpu", warmup=True, max_batch_wait_ms=0)
    engine = started_engine(settings, lambda: inpainting_model)
    try:
        source = noise(6)
        for fields in ({}, {"image": png_b64(source)}, {"image": png_b64(source), "mask": png_b64(left_half_mask())}):
            p, inputs = resolved(settings, width=64, height=64, **fields)
            out = engine.submit(p, inputs=inputs).result(TIMEOUT).images[0].image
            assert out.size == (64, 64), fields.keys()
            if "mask" in fields:
                assert np.array_equal(pixels(out)[:, 32:], pixels(source)[:, 32:])
        assert engine.stats.failures == 0
    finally:
        engine.close()
