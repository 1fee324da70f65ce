"""Resolving a request: settings-dependent limits, then defaults (request > SDGATE_DEFAULT_* > model), then seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdgate.config import Settings
from sdgate.errors import InvalidRequest
from sdgate.generation import effective_defaults, resolve_request
from sdgate.schemas import MAX_SEED, GenerationRequest, ModelDefaults

MODEL = ModelDefaults(width=96, height=128, num_inference_steps=3, guidance_scale=4.0, scheduler="ddim")


def settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path, **kw)


def refusal(req: GenerationRequest, s: Settings) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        resolve_request(req, s, MODEL)
    return caught.value


# -- limits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_text_over_the_limit_is_refused_naming_its_field(tmp_path: Path, field: str) -> None:
    s = settings(tmp_path, max_prompt_chars=10)
    fields = {"prompt": "short", field: "x" * 11}
    err = refusal(GenerationRequest(**fields), s)
    assert err.field == field
    assert err.status == 422
    assert err.message == f"{field} is 11 characters; the limit is 10"


def test_a_text_at_the_limit_passes(tmp_path: Path) -> None:
    s = settings(tmp_path, max_prompt_chars=10)
    assert resolve_request(GenerationRequest(prompt="x" * 10), s, MODEL).prompt == "x" * 10


def test_more_images_than_allowed_are_refused(tmp_path: Path) -> None:
    s = settings(tmp_path, max_images=2)
    err = refusal(GenerationRequest(prompt="a fox", num_images=3), s)
    assert err.field == "num_images"
    assert err.message == "num_images must be at most 2, got 3"
    assert resolve_request(GenerationRequest(prompt="a fox", num_images=2), s, MODEL).num_images == 2


@pytest.mark.parametrize(
    ("size", "field"),
    [({"width": 1024, "height": 1024}, "width"), ({"width": 1024}, "width"), ({"height": 1024}, "height")],
)
def test_too_many_pixels_are_refused_naming_the_field_and_a_size_that_fits(
    tmp_path: Path, size: dict[str, int], field: str
) -> None:
    # The side a request leaves out is the model's own (96 wide, 128 high): it counts too.
    s = settings(tmp_path, max_pixels=256 * 256)
    err = refusal(GenerationRequest(prompt="a fox", **size), s)
    assert err.field == field
    pixels = size.get("width", 96) * size.get("height", 128)
    assert err.message == f"width*height is {pixels} pixels; the limit is 65536 (e.g. 256x256)"


# -- defaults ---------------------------------------------------------------------------------------


def test_a_request_that_names_nothing_gets_the_models_defaults_and_the_settings_format(tmp_path: Path) -> None:
    s = settings(tmp_path, output_format="webp", jpeg_quality=70)
    p = resolve_request(GenerationRequest(prompt="a fox", seed=1), s, MODEL)
    assert (p.width, p.height, p.num_inference_steps, p.guidance_scale, p.scheduler) == (96, 128, 3, 4.0, "ddim")
    assert (p.output_format, p.quality) == ("webp", 70)
    assert p.negative_prompt is None


def test_sdgate_defaults_win_over_the_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDGATE_DEFAULT_WIDTH", "200")
    monkeypatch.setenv("SDGATE_DEFAULT_STEPS", "7")
    monkeypatch.setenv("SDGATE_DEFAULT_GUIDANCE_SCALE", "0")  # zero is a value, not "unset"
    p = resolve_request(GenerationRequest(prompt="a fox", seed=1), settings(tmp_path), MODEL)
    assert (p.width, p.height, p.num_inference_steps, p.guidance_scale) == (200, 128, 7, 0.0)


def test_the_request_wins_over_every_default(tmp_path: Path) -> None:
    s = settings(tmp_path, default_width=200, default_height=200, default_steps=7, default_guidance_scale=9.0)
    req = GenerationRequest(
        prompt="a fox",
        negative_prompt="blur",
        width=64,
        height=72,
        num_inference_steps=2,
        guidance_scale=0.0,
        scheduler="Euler",
        output_format="png",
        quality=55,
        seed=1,
    )
    p = resolve_request(req, s, MODEL)
    assert (p.width, p.height, p.num_inference_steps, p.guidance_scale) == (64, 72, 2, 0.0)
    assert (p.scheduler, p.output_format, p.quality, p.negative_prompt) == ("euler", "png", 55, "blur")


def test_effective_defaults_are_the_settings_over_the_model(tmp_path: Path) -> None:
    assert effective_defaults(settings(tmp_path), MODEL) == MODEL
    s = settings(tmp_path, default_height=256, default_guidance_scale=0.0)
    assert effective_defaults(s, MODEL) == ModelDefaults(
        width=96, height=256, num_inference_steps=3, guidance_scale=0.0, scheduler="ddim"
    )


def test_effective_defaults_are_what_an_empty_request_gets(tmp_path: Path) -> None:
    s = settings(tmp_path, default_width=200, default_steps=5)
    d = effective_defaults(s, MODEL)
    p = resolve_request(GenerationRequest(prompt="a fox"), s, MODEL)
    assert (p.width, p.height, p.num_inference_steps, p.guidance_scale, p.scheduler) == (
        d.width,
        d.height,
        d.num_inference_steps,
        d.guidance_scale,
        d.scheduler,
    )


# -- seeds ------------------------------------------------------------------------------------------


def test_image_i_gets_seed_plus_i(tmp_path: Path) -> None:
    p = resolve_request(GenerationRequest(prompt="a fox", seed=40, num_images=3), settings(tmp_path), MODEL)
    assert p.seeds == (40, 41, 42)


def test_seeds_wrap_around_at_the_largest(tmp_path: Path) -> None:
    p = resolve_request(GenerationRequest(prompt="a fox", seed=MAX_SEED, num_images=2), settings(tmp_path), MODEL)
    assert p.seeds == (MAX_SEED, 0)


def test_without_a_seed_the_images_still_get_consecutive_ones(tmp_path: Path) -> None:
    p = resolve_request(GenerationRequest(prompt="a fox", num_images=4), settings(tmp_path), MODEL)
    first = p.seeds[0]
    assert p.seeds == (first, first + 1, first + 2, first + 3)
    assert first >= 0 and p.seeds[-1] <= MAX_SEED
