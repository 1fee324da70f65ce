"""Request validation and resolution: every rule is checked before any model work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sdgate.config import Settings
from sdgate.errors import InvalidRequest
from sdgate.generation import resolve_request
from sdgate.schemas import (
    MAX_SEED,
    SCHEDULER_NAMES,
    GenerationRequest,
    JobStatus,
    ModelDefaults,
    check_side,
)

MODEL = ModelDefaults(width=512, height=512, num_inference_steps=4, guidance_scale=7.5)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


def resolve(settings: Settings, defaults: ModelDefaults = MODEL, **fields: Any) -> Any:
    return resolve_request(GenerationRequest(**{"prompt": "a fox", **fields}), settings, defaults)


def test_image_i_gets_seed_plus_i(settings: Settings) -> None:
    assert resolve(settings, seed=41, num_images=4).seeds == (41, 42, 43, 44)
    assert resolve(settings, seed=0).seeds == (0,)


def test_seeds_wrap_at_32_bits(settings: Settings) -> None:
    assert resolve(settings, seed=MAX_SEED, num_images=2).seeds == (MAX_SEED, 0)


def test_a_missing_seed_is_random_and_consecutive(settings: Settings) -> None:
    firsts = set()
    for _ in range(5):
        seeds = resolve(settings, num_images=3).seeds
        assert seeds[1] == seeds[0] + 1
        assert seeds[2] == seeds[0] + 2
        assert all(0 <= s <= MAX_SEED for s in seeds)
        firsts.add(seeds[0])
    assert len(firsts) > 1


def test_defaults_come_from_the_model_then_the_settings(tmp_path: Path) -> None:
    p = resolve(Settings(data_dir=tmp_path))
    assert (p.width, p.height, p.num_inference_steps, p.guidance_scale) == (512, 512, 4, 7.5)
    assert p.output_format == "jpeg"
    assert p.quality == 90
    tuned = Settings(data_dir=tmp_path, default_steps=12, default_guidance_scale=0.0, output_format="webp")
    p = resolve(tuned)
    assert (p.num_inference_steps, p.guidance_scale, p.output_format) == (12, 0.0, "webp")
    # a request's own values win over both
    p = resolve(tuned, num_inference_steps=3, guidance_scale=2.0, output_format="png", quality=50)
    assert (p.num_inference_steps, p.guidance_scale, p.output_format, p.quality) == (3, 2.0, "png", 50)


def test_guidance_zero_is_kept_not_replaced_by_the_default(settings: Settings) -> None:
    assert resolve(settings, guidance_scale=0).guidance_scale == 0.0


def test_model_scheduler_default_and_normalised_names(settings: Settings) -> None:
    assert resolve(settings).scheduler is None
    own = ModelDefaults(scheduler="ddim")
    assert resolve(settings, own).scheduler == "ddim"
    assert resolve(settings, own, scheduler=" Euler_A ").scheduler == "euler_a"


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_name_is_accepted(name: str) -> None:
    assert GenerationRequest(prompt="x", scheduler=name.upper()).scheduler == name


def test_requests_that_may_share_a_pipeline_call_have_equal_batch_keys(settings: Settings) -> None:
    a = resolve(settings, prompt="a fox", seed=1, width=64, height=64)
    b = resolve(settings, prompt="a cat", seed=9, num_images=2, negative_prompt="blur", width=64, height=64)
    assert a.batch_key() == b.batch_key()
    for change in ({"width": 128}, {"height": 128}, {"num_inference_steps": 5}, {"guidance_scale": 1.0},
                   {"scheduler": "ddim"}):  # fmt: skip
        fields: dict[str, Any] = {"prompt": "a fox", "seed": 1, "width": 64, "height": 64, **change}
        other = resolve(settings, **fields)
        assert other.batch_key() != a.batch_key(), change


def test_public_params_hold_what_reproduces_the_image(settings: Settings) -> None:
    p = resolve(settings, negative_prompt="blur", seed=3, scheduler="ddim")
    assert p.public() == {
        "prompt": "a fox",
        "negative_prompt": "blur",
        "width": 512,
        "height": 512,
        "num_inference_steps": 4,
        "guidance_scale": 7.5,
        "scheduler": "ddim",
    }


@pytest.mark.parametrize(
    ("limit", "fields", "field"),
    [
        ({"max_prompt_chars": 10}, {"prompt": "x" * 11}, "prompt"),
        ({"max_prompt_chars": 10}, {"negative_prompt": "x" * 11}, "negative_prompt"),
        ({"max_images": 2}, {"num_images": 3}, "num_images"),
        ({"max_pixels": 256 * 256}, {"width": 256, "height": 264}, "width"),
        ({"max_pixels": 256 * 256}, {"height": 512}, "height"),
    ],
)
def test_settings_limits_raise_invalid_request_naming_the_field(
    tmp_path: Path, limit: dict[str, int], fields: dict[str, Any], field: str
) -> None:
    settings = Settings(data_dir=tmp_path).model_copy(update=limit)
    small = ModelDefaults(width=256, height=256)
    with pytest.raises(InvalidRequest) as info:
        resolve(settings, small, **fields)
    assert info.value.field == field
    assert info.value.status == 422
    assert field.split("_")[0] in info.value.message


def test_limits_are_inclusive(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_prompt_chars=10, max_images=2, max_pixels=256 * 256)
    p = resolve(settings, ModelDefaults(width=256, height=256), prompt="x" * 10, num_images=2)
    assert (p.width, p.height, p.num_images) == (256, 256, 2)


def test_the_default_size_counts_against_max_pixels(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="limit"):
        resolve(Settings(data_dir=tmp_path, max_pixels=128 * 128), MODEL)


@pytest.mark.parametrize(
    ("value", "hint"),
    [(65, "try 64 or 72"), (100, "try 96 or 104"), (2047, "try 2040 or 2048")],
)
def test_side_hints_the_nearest_multiples_of_8(value: int, hint: str) -> None:
    with pytest.raises(ValueError, match=hint):
        check_side("width", value)


@pytest.mark.parametrize("value", [64, 72, 512, 2048])
def test_valid_sides(value: int) -> None:
    assert check_side("height", value) == value


@pytest.mark.parametrize("value", [0, 8, 56, 2056, -64])
def test_sides_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="between 64 and 2048"):
        check_side("width", value)


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": ""},
        {"prompt": " \t"},
        {"prompt": "x", "extra": 1},
        {"prompt": "x", "num_inference_steps": 0},
        {"prompt": "x", "guidance_scale": 30.5},
        {"prompt": "x", "seed": MAX_SEED + 1},
        {"prompt": "x", "scheduler": "heun"},
        {"prompt": "x", "output_format": "bmp"},
        {"prompt": "x", "quality": 101},
        {"prompt": "x", "num_images": 0},
    ],
)
def test_static_rules_fail_at_parse_time(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        GenerationRequest(**fields)


def test_job_status_terminal_states() -> None:
    assert {s for s in JobStatus if s.is_terminal()} == {JobStatus.succeeded, JobStatus.failed, JobStatus.canceled}
