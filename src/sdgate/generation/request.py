"""Resolving a request: settings-dependent limits, then defaults, then one seed per image.

The precedence of defaults lives here and only here: the request, then ``SDGATE_DEFAULT_*``, then the
model's own. ``GET /v1/models`` reports :func:`effective_defaults`, so it always shows what a request gets.
"""

from __future__ import annotations

import secrets

from sdgate.config import Settings
from sdgate.errors import InvalidRequest
from sdgate.schemas import MAX_SEED, GenerationParams, GenerationRequest, ModelDefaults


def effective_defaults(settings: Settings, model: ModelDefaults) -> ModelDefaults:
    """What a request that leaves every field out gets: ``SDGATE_DEFAULT_*`` over the model's own."""
    guidance = settings.default_guidance_scale
    return ModelDefaults(
        width=settings.default_width or model.width,
        height=settings.default_height or model.height,
        num_inference_steps=settings.default_steps or model.num_inference_steps,
        guidance_scale=model.guidance_scale if guidance is None else guidance,
        scheduler=model.scheduler,
        torch_threads=model.torch_threads,
    )


def resolve_request(req: GenerationRequest, settings: Settings, model: ModelDefaults) -> GenerationParams:
    """Apply settings-dependent limits and defaults. Raises :class:`InvalidRequest` naming the field."""
    # 1. limits that depend on settings
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if text is not None and len(text) > settings.max_prompt_chars:
            raise InvalidRequest(
                f"{name} is {len(text)} characters; the limit is {settings.max_prompt_chars}", field=name
            )
    if req.num_images > settings.max_images:
        raise InvalidRequest(
            f"num_images must be at most {settings.max_images}, got {req.num_images}", field="num_images"
        )
    # 2. defaults
    defaults = effective_defaults(settings, model)
    width = req.width or defaults.width
    height = req.height or defaults.height
    if width * height > settings.max_pixels:
        side = int(settings.max_pixels**0.5) // 8 * 8
        raise InvalidRequest(
            f"width*height is {width * height} pixels; the limit is {settings.max_pixels} (e.g. {side}x{side})",
            field="width" if req.width else "height",
        )
    guidance = defaults.guidance_scale if req.guidance_scale is None else req.guidance_scale
    # 3. one seed per image, so that any image can be reproduced alone
    first = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED - 64)
    seeds = tuple((first + i) % (MAX_SEED + 1) for i in range(req.num_images))
    return GenerationParams(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        width=width,
        height=height,
        num_inference_steps=req.num_inference_steps or defaults.num_inference_steps,
        guidance_scale=float(guidance),
        seeds=seeds,
        scheduler=req.scheduler or defaults.scheduler,
        output_format=req.output_format or settings.output_format,
        quality=req.quality or settings.jpeg_quality,
    )
