"""Resolving a request: settings-dependent limits, then the input images, then defaults, then one seed per image.

The precedence of defaults lives here and only here: the request, then ``SDGATE_DEFAULT_*``, then the
model's own. ``GET /v1/models`` reports :func:`effective_defaults`, so it always shows what a request gets.
"""

from __future__ import annotations

import secrets

from sdgate.config import Settings
from sdgate.errors import InvalidRequest
from sdgate.imaging import ImageInputs, InputError, from_base64, read_input
from sdgate.schemas import (
    DEFAULT_STRENGTH,
    MAX_SEED,
    MAX_SIDE,
    MIN_SIDE,
    GenerationParams,
    GenerationRequest,
    LoraWeight,
    Mode,
    ModelDefaults,
)


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


def read_inputs(req: GenerationRequest, settings: Settings) -> ImageInputs | None:
    """Decode and check the request's ``image`` and ``mask``; None for text-to-image.

    Each is checked from its header (format, size against ``SDGATE_MAX_PIXELS``) before it is
    decoded. Raises :class:`InvalidRequest` naming the field.
    """
    if req.image is None:
        for name in ("mask", "strength"):
            if getattr(req, name) is not None:
                raise InvalidRequest(f"{name} needs an image: send image too (base64 or a data: URL)", field=name)
        return None
    try:
        image = read_input(from_base64(req.image, "image"), "image", settings.max_pixels)
        mask = None
        if req.mask is not None:
            mask = read_input(from_base64(req.mask, "mask"), "mask", settings.max_pixels, mask=True)
    except InputError as e:
        raise InvalidRequest(str(e), field=e.field) from None
    if mask is not None and mask.size != image.size:
        (mw, mh), (iw, ih) = mask.size, image.size
        raise InvalidRequest(f"mask is {mw}x{mh} but image is {iw}x{ih}; send a mask of the image's size", field="mask")
    return ImageInputs(image, mask)


def _input_side(name: str, value: int, inputs: ImageInputs) -> int:
    """The image's width or height rounded down to a multiple of 8: the default size of the result."""
    side = value - value % 8
    if not MIN_SIDE <= side <= MAX_SIDE:
        w, h = inputs.image.size
        raise InvalidRequest(
            f"image is {w}x{h}; its {name}, rounded down to a multiple of 8, must be between {MIN_SIDE} and "
            f"{MAX_SIDE}. Send another image, or {name} to resize it to",
            field="image",
        )
    return side


def resolve_request(
    req: GenerationRequest,
    settings: Settings,
    model: ModelDefaults,
    inputs: ImageInputs | None = None,
    model_name: str | None = None,
    loras: tuple[LoraWeight, ...] = (),
) -> GenerationParams:
    """Apply settings-dependent limits and defaults. Raises :class:`InvalidRequest` naming the field.

    ``model`` is the defaults of the model the request runs on (``model_name``, checked by the caller,
    like ``loras``).
    ``inputs`` are the request's images as :func:`read_inputs` checked them; their keys are filled
    in when they are stored (:meth:`sdgate.jobs.JobRunner.keep_inputs`).
    """
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
    mode, strength = Mode.txt2img, None
    if inputs is not None:
        # From an image: its size unless the request names one (the image is then resized to it).
        width = req.width or _input_side("width", inputs.image.size[0], inputs)
        height = req.height or _input_side("height", inputs.image.size[1], inputs)
        mode = Mode.inpaint if inputs.mask is not None else Mode.img2img
        strength = DEFAULT_STRENGTH[mode] if req.strength is None else req.strength
    if width * height > settings.max_pixels:
        side = int(settings.max_pixels**0.5) // 8 * 8
        raise InvalidRequest(
            f"width*height is {width * height} pixels; the limit is {settings.max_pixels} (e.g. {side}x{side})",
            field="width" if req.width else "height",
        )
    guidance = defaults.guidance_scale if req.guidance_scale is None else req.guidance_scale
    steps = req.num_inference_steps or defaults.num_inference_steps
    if strength is not None and int(steps * strength) < 1:
        raise InvalidRequest(
            f"strength {strength:g} of {steps} steps is less than one step; raise strength or num_inference_steps",
            field="strength",
        )
    # 3. one seed per image, so that any image can be reproduced alone
    first = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED - 64)
    seeds = tuple((first + i) % (MAX_SEED + 1) for i in range(req.num_images))
    return GenerationParams(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=float(guidance),
        seeds=seeds,
        scheduler=req.scheduler or defaults.scheduler,
        output_format=req.output_format or settings.output_format,
        quality=req.quality or settings.jpeg_quality,
        mode=mode,
        strength=strength,
        model=model_name,
        loras=loras,
    )
