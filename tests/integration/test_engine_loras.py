"""LoRAs in the real engine, on the built-in ``demo`` model, with LoRA files made here (tests/loras.py).

What must hold: a LoRA changes the image by its weight (0: not at all); a kohya file and a PEFT file of
the same weights give the same image; several apply at once; once a call ends every adapter is off, so a
request without LoRAs gets the bytes it got before any LoRA was loaded; batches never mix LoRA sets,
and each image is the one its request gets alone; a LoRA that does not fit (``tiny``), cannot be read
or was deleted fails its own job with a message naming it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from sdgate.config import Settings
from sdgate.engine.builtin import DEMO_DIR
from sdgate.engine.loras import LoraError, misfit, read_targets
from sdgate.engine.runner import Engine
from sdgate.errors import SdgateError
from sdgate.generation import read_inputs, resolve_request
from sdgate.imaging import ImageInputs
from sdgate.schemas import GenerationParams, GenerationRequest, GenerationResult, LoraWeight, ModelDefaults
from tests.integration.pipelines import params, started_engine
from tests.loras import make_lora

TIMEOUT = 120
STEPS = 4
SEED = 7

Pixels = npt.NDArray[np.int16]


def pixels(result: GenerationResult) -> Pixels:
    [image] = result.images
    return np.asarray(image.image.convert("RGB"), dtype=np.int16)


def max_diff(a: Pixels, b: Pixels) -> int:
    return int(np.abs(a - b).max())


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LoRAs for ``demo``: two seeds, a text-encoder one, kohya twins, one with twice the weights, and two
    files that are not LoRAs."""
    from safetensors.torch import save_file
    from torch import zeros

    d = tmp_path_factory.mktemp("loras")
    make_lora(DEMO_DIR, d / "style.safetensors", seed=1)
    make_lora(DEMO_DIR, d / "style_kohya.safetensors", seed=1, kohya=True)
    make_lora(DEMO_DIR, d / "double.safetensors", seed=1, scale=0.4)  # style's lora_B times two
    make_lora(DEMO_DIR, d / "second.safetensors", seed=2)
    make_lora(DEMO_DIR, d / "text.safetensors", seed=3, text_encoder=True)
    make_lora(DEMO_DIR, d / "text_kohya.safetensors", seed=3, text_encoder=True, kohya=True)
    (d / "junk.safetensors").write_bytes(b"not a safetensors file")
    save_file({"foo.bar": zeros(2)}, str(d / "notlora.safetensors"))
    return d


NAMES = ["double", "junk", "notlora", "second", "style", "style_kohya", "text", "text_kohya"]


def noise_png(seed: int) -> str:
    import base64
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8), "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class World:
    engine: Engine
    settings: Settings
    before: Pixels
    """The image of ``request()`` made before any LoRA was loaded."""
    before_img2img: Pixels
    """The image of ``img2img()`` made before any LoRA was loaded."""

    def request(self, *loras: tuple[str, float], seed: int = SEED, **fields: Any) -> GenerationParams:
        p = params(self.settings, model=fields.pop("model", "demo"), steps=STEPS, seed=seed, **fields)
        return dataclasses.replace(p, loras=tuple(LoraWeight(n, w) for n, w in loras))

    def run(self, *loras: tuple[str, float], seed: int = SEED, **fields: Any) -> Pixels:
        return pixels(self.engine.submit(self.request(*loras, seed=seed, **fields)).result(TIMEOUT))

    def img2img(self, *loras: tuple[str, float]) -> Pixels:
        request = GenerationRequest(prompt="a red circle", num_inference_steps=STEPS, seed=SEED, image=noise_png(1))
        inputs: ImageInputs | None = read_inputs(request, self.settings)
        p = resolve_request(
            request, self.settings, ModelDefaults(), inputs, "demo", tuple(LoraWeight(n, w) for n, w in loras)
        )
        return pixels(self.engine.submit(p, inputs=inputs).result(TIMEOUT))


@pytest.fixture(scope="module")
def world(tiny_data_dir: Path, lora_dir: Path) -> Iterator[World]:
    """One engine offering ``demo`` (the default) and ``tiny`` (built), with the LoRAs of ``lora_dir``."""
    settings = Settings(
        data_dir=tiny_data_dir,
        models="demo,tiny",
        lora_dir=lora_dir,
        device="cpu",
        warmup=False,
        max_batch_wait_ms=0,
    )
    engine = started_engine(settings)
    w = World(engine, settings, np.zeros(0, np.int16), np.zeros(0, np.int16))
    w.before, w.before_img2img = w.run(), w.img2img()  # before any LoRA is loaded
    yield w
    engine.close()


@contextmanager
def engine_held(engine: Engine, settings: Settings) -> Iterator[None]:
    """Hold the engine thread inside a batch of its own while the body queues requests behind it."""
    entered, release = threading.Event(), threading.Event()

    def hold(step: int, total: int) -> None:
        entered.set()
        release.wait(TIMEOUT)

    blocker = engine.submit(params(settings, model="demo", seed=999), hold)
    assert entered.wait(TIMEOUT), "the blocking request never started"
    try:
        yield
    finally:
        release.set()
        blocker.result(TIMEOUT)


# -- what a LoRA does to the image --------------------------------------------------------------------


def test_weight_zero_is_the_image_without_the_lora_and_weight_one_changes_it(world: World) -> None:
    assert np.array_equal(world.run(("style", 0.0)), world.before)
    # Not run at all: a LoRA that cannot even be read does nothing at weight 0.
    assert np.array_equal(world.run(("notlora", 0.0), ("style", 0.0)), world.before)
    with_style = world.run(("style", 1.0))
    assert max_diff(with_style, world.before) > 16
    assert np.array_equal(world.run(("style", 1.0)), with_style)  # the same request, the same bytes


def test_a_weight_multiplies_the_lora(world: World) -> None:
    """``double`` holds style's weights times two: style at 2 is double at 1, double at 0.5 is style at 1."""
    style = world.run(("style", 1.0))
    assert np.array_equal(world.run(("style", 2.0)), world.run(("double", 1.0)))
    assert np.array_equal(world.run(("double", 0.5)), style)
    assert max_diff(world.run(("style", 0.5)), style) > 16
    assert max_diff(world.run(("style", -1.0)), world.before) > 16


def test_without_loras_after_loras_is_byte_identical_to_before_any_was_loaded(world: World) -> None:
    world.run(("style", 1.0))
    world.run(("text", 1.0), ("second", -0.5))
    world.img2img(("style", 1.0))
    assert np.array_equal(world.run(), world.before)
    assert np.array_equal(world.run(("second", 0.0)), world.before)
    assert np.array_equal(world.img2img(), world.before_img2img)


def test_a_kohya_file_gives_the_same_image_as_the_peft_file_of_its_weights(world: World) -> None:
    assert np.array_equal(world.run(("style_kohya", 1.0)), world.run(("style", 1.0)))
    assert np.array_equal(world.run(("text_kohya", 0.7)), world.run(("text", 0.7)))


def test_two_loras_at_once_apply_both_in_any_order_and_leave_neither_on(world: World) -> None:
    style, second = world.run(("style", 1.0)), world.run(("second", 1.0))
    both = world.run(("style", 1.0), ("second", 1.0))
    assert min(max_diff(both, style), max_diff(both, second), max_diff(both, world.before)) > 16
    assert np.array_equal(world.run(("second", 1.0), ("style", 1.0)), both)
    # The adapters of the call before are off: each alone is what it was.
    assert np.array_equal(world.run(("style", 1.0)), style)
    assert np.array_equal(world.run(("second", 1.0)), second)


def test_a_text_encoder_lora_changes_the_image_and_combines_with_a_unet_one(world: World) -> None:
    text = world.run(("text", 1.0))
    assert max_diff(text, world.before) > 16
    style = world.run(("style", 1.0))
    mixed = world.run(("text", 1.0), ("style", 1.0))
    assert min(max_diff(mixed, text), max_diff(mixed, style)) > 16
    assert np.array_equal(world.run(("style", 1.0)), style)  # the text encoder's adapter is off again


def test_a_lora_applies_to_image_to_image_too(world: World) -> None:
    assert max_diff(world.img2img(("style", 1.0)), world.before_img2img) > 16


# -- reading files and checking fit -------------------------------------------------------------------


def test_a_kohya_and_a_peft_file_of_the_same_weights_change_the_same_layers(world: World, lora_dir: Path) -> None:
    peft, kohya = read_targets(lora_dir / "style.safetensors"), read_targets(lora_dir / "style_kohya.safetensors")
    assert peft == kohya
    # make_lora's targets: every attention's to_q, to_k, to_v and to_out.0, with the model's own sizes.
    shapes = world.engine.models.get_resident("demo").shapes
    attention = {m: s for m, s in shapes.items() if re.search(r"^unet\..*\.attn[12]\.(to_[qkv]|to_out\.0)$", m)}
    assert attention and peft == attention
    # kohya names CLIP's layers under text_model., diffusers does not: the same layers all the same.
    te_peft = read_targets(lora_dir / "text.safetensors")
    te_kohya = read_targets(lora_dir / "text_kohya.safetensors")
    assert {m.replace(".text_model.", "."): s for m, s in te_kohya.items()} == te_peft
    assert {m for m in te_peft if m.startswith("text_encoder.")}  # it does change the text encoder


def test_the_shapes_of_the_loaded_demo_and_of_its_configs_are_the_same_and_every_lora_fits(
    world: World, lora_dir: Path
) -> None:
    from sdgate.engine.loras import skeleton_shapes

    loaded = world.engine.models.get_resident("demo").shapes
    assert skeleton_shapes(DEMO_DIR) == loaded
    for name in ("style", "style_kohya", "double", "second", "text", "text_kohya"):
        assert misfit(name, read_targets(lora_dir / f"{name}.safetensors"), loaded) is None, name


def test_a_file_that_is_not_a_lora_is_a_lora_error_naming_it(world: World) -> None:
    library = world.engine.loras
    files = library.files()
    with pytest.raises(LoraError) as not_lora:
        library.targets(files["notlora"])
    assert str(not_lora.value) == (
        "LoRA 'notlora' cannot be read as a LoRA (ValueError: it changes 'foo.bar', "
        "which is not part of a Stable Diffusion pipeline)"
    )
    with pytest.raises(LoraError, match=r"^LoRA 'junk' cannot be read as a LoRA \(OSError: "):
        library.targets(files["junk"])
    assert world.engine.lora_problem("demo", "notlora") == str(not_lora.value)


def test_lora_info_lists_every_file_with_the_models_it_fits(world: World, lora_dir: Path) -> None:
    infos = {i.name: i for i in world.engine.lora_info()}
    assert sorted(infos) == NAMES
    for name, info in infos.items():
        assert info.bytes == (lora_dir / f"{name}.safetensors").stat().st_size
        assert info.unknown == []  # both models' layers are known: demo's loaded, tiny's from its configs
        if name in ("junk", "notlora"):
            assert info.fits == [] and info.error is not None
            assert info.error.startswith(f"LoRA {name!r} cannot be read as a LoRA (")
        else:
            assert (info.fits, info.error) == (["demo"], None), name


def test_a_demo_lora_does_not_fit_tiny_and_its_job_there_fails_naming_it(world: World) -> None:
    engine = world.engine
    assert engine.lora_problem("demo", "style") is None
    unet = engine.lora_problem("tiny", "style")
    # tiny's first down block has no attention; its text encoder is 32 wide, demo's 128.
    assert unet is not None and re.fullmatch(
        r"LoRA 'style' changes unet\.down_blocks\.0\.attentions\.0\.\S+, which this model does not have", unet
    ), unet
    text = engine.lora_problem("tiny", "text")
    assert text is not None and re.fullmatch(
        r"LoRA 'text' expects text_encoder\.\S+ to map 128 to 128 values; this model's maps 32 to 32", text
    ), text
    assert engine.lora_problem("demo", "nope") == f"unknown LoRA 'nope'; offered: {', '.join(NAMES)}"

    failures = engine.stats.failures
    job = engine.submit(world.request(("style", 1.0), model="tiny"))
    with pytest.raises(SdgateError) as caught:
        job.result(TIMEOUT)
    assert str(caught.value) == f"{unet} (model tiny)"
    assert engine.stats.failures == failures + 1
    # tiny is loaded now; without the LoRA it runs, and the check goes on refusing it.
    assert engine.submit(world.request(model="tiny")).result(TIMEOUT).images
    assert engine.lora_problem("tiny", "style") == unet
    assert {i.name: i.fits for i in engine.lora_info()}["style"] == ["demo"]


def test_an_unreadable_lora_fails_its_job_naming_it(world: World) -> None:
    with pytest.raises(SdgateError, match=r"^LoRA 'notlora' cannot be read as a LoRA \(ValueError: "):
        world.engine.submit(world.request(("notlora", 1.0))).result(TIMEOUT)
    assert np.array_equal(world.run(), world.before)


# -- batches ------------------------------------------------------------------------------------------


def test_a_burst_of_mixed_requests_batches_by_lora_set_and_each_gets_its_image_alone(world: World) -> None:
    engine = world.engine
    burst: list[tuple[tuple[str, float], ...]] = [
        (),
        (("style", 1.0),),
        (),
        (("style", 0.5),),
        (("style", 1.0),),
        (("style", 0.0),),  # off: runs with the requests without LoRAs
        (("style", 1.0), ("second", 1.0)),
        (("second", 1.0), ("style", 1.0)),  # the same set
    ]
    group = [0, 1, 0, 2, 1, 0, 3, 3]
    sizes = Counter(group)
    calls, batch_sizes = engine.stats.pipeline_calls, Counter(engine.stats.batch_sizes)
    futures: list[Future[GenerationResult]] = []
    with engine_held(engine, world.settings):
        for i, loras in enumerate(burst):
            futures.append(engine.submit(world.request(*loras, seed=100 + i)))
    results = [f.result(TIMEOUT) for f in futures]

    # One call per LoRA set (and the blocker's); each result says how many images its call made.
    assert engine.stats.pipeline_calls - calls == 1 + len(sizes)
    assert Counter(engine.stats.batch_sizes) - batch_sizes == Counter([1, *sizes.values()])
    assert [r.batch_images for r in results] == [sizes[g] for g in group]
    # Each image is the one its request gets alone (batched rows may differ by one level, as without LoRAs).
    for i, (loras, result) in enumerate(zip(burst, results, strict=True)):
        alone = world.run(*loras, seed=100 + i)
        assert max_diff(pixels(result), alone) <= 1, f"request {i} {loras}"
    # ... which a mixed batch would not be: the LoRA changes these images by far more.
    assert max_diff(pixels(results[1]), world.run(seed=101)) > 16


def test_a_lora_deleted_between_check_and_run_fails_only_its_job(world: World, lora_dir: Path) -> None:
    engine = world.engine
    doomed = lora_dir / "doomed.safetensors"
    shutil.copyfile(lora_dir / "style.safetensors", doomed)
    try:
        assert engine.lora_problem("demo", "doomed") is None  # the service's check passes
        failures = engine.stats.failures
        with engine_held(engine, world.settings):
            gone = engine.submit(world.request(("doomed", 1.0), seed=31))
            plain = engine.submit(world.request(seed=32))
            styled = engine.submit(world.request(("style", 1.0), seed=33))
            doomed.unlink()
        with pytest.raises(SdgateError, match=r"^LoRA 'doomed' is no longer in the LoRA directory$"):
            gone.result(TIMEOUT)
        assert np.array_equal(pixels(plain.result(TIMEOUT)), world.run(seed=32))
        assert np.array_equal(pixels(styled.result(TIMEOUT)), world.run(("style", 1.0), seed=33))
        assert engine.stats.failures == failures + 1
        assert engine.lora_problem("demo", "doomed") == f"unknown LoRA 'doomed'; offered: {', '.join(NAMES)}"
    finally:
        doomed.unlink(missing_ok=True)


def test_a_file_replaced_under_the_same_name_is_loaded_again(world: World, lora_dir: Path) -> None:
    swap = lora_dir / "swap.safetensors"
    shutil.copyfile(lora_dir / "style.safetensors", swap)
    try:
        assert np.array_equal(world.run(("swap", 1.0)), world.run(("style", 1.0)))
        stamp = swap.stat().st_mtime_ns
        shutil.copyfile(lora_dir / "second.safetensors", swap)  # the same size: only the time tells
        os.utime(swap, ns=(stamp + 1_000_000_000, stamp + 1_000_000_000))  # a later time, whatever the clock
        assert np.array_equal(world.run(("swap", 1.0)), world.run(("second", 1.0)))
    finally:
        swap.unlink(missing_ok=True)
