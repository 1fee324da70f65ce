"""The SageMaker JumpStart Stable Diffusion contract, from both sides.

Server side (sdgate as the endpoint): :func:`parse_invocation` reads a request body the way a
JumpStart endpoint does, :func:`generation_requests` turns it into sdgate requests, and
:func:`render_response` answers in JumpStart's shape.

Client side (sdgate as the gateway in front of an endpoint): :func:`request_payload` builds the
body for one image and :func:`parse_images` reads the endpoint's answer.

The contract:

- body fields ``prompt`` (string or list), ``width``, ``height`` (multiples of 8),
  ``num_images_per_prompt``, ``num_inference_steps``, ``guidance_scale``, ``negative_prompt``,
  ``seed``; the inpainting model's ``image`` and ``mask_image`` (base64; ``image`` alone is
  image-to-image); sdgate also takes ``scheduler`` and ``strength``;
- ``Content-Type: application/json`` → ``{"generated_images": [...], "prompt": ...}``;
  ``application/x-text`` → the body is the prompt, answer ``{"generated_image": ..., "prompt": ...}``;
  an x-text body that parses as a JSON object with a ``prompt`` field is read as the JSON payload
  (clients in the wild send that), and so is the ``{"predictions": [{...}]}`` wrapper;
- ``Accept: application/json`` → images as ``[[[r, g, b], ...], ...]`` rows of pixels (large);
  ``application/json;jpeg`` → base64 JPEG strings (small).

Seeds: sdgate's rule holds here too. Image ``k`` of the answer (prompts in order, then images of
each prompt) uses ``seed + k``, so any one image can be made again alone with ``num_images_per_prompt=1``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdgate.errors import InvalidRequest, MalformedRequest, UnsupportedMediaType
from sdgate.imaging import ImageInputs, from_rgb_lists, to_rgb_lists
from sdgate.schemas import (
    DEFAULT_STRENGTH,
    MAX_SEED,
    SCHEDULER_NAMES,
    GeneratedImage,
    GenerationParams,
    GenerationRequest,
    check_prompt,
    check_side,
)

JSON = "application/json"
TEXT = "application/x-text"
JPEG_ACCEPT = "application/json;jpeg"
_TEXT_TYPES = (TEXT, "text/plain")

ImageEncoding = Literal["rgb", "jpeg"]


class JumpStartPayload(BaseModel):
    """A JumpStart Stable Diffusion request body."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[str] = Field(..., description="What to draw; a list draws each prompt.")
    width: int | None = Field(None, description="Multiple of 8.")
    height: int | None = Field(None, description="Multiple of 8.")
    num_images_per_prompt: int = Field(1, ge=1, le=64, description="Images per prompt.")
    num_inference_steps: int | None = Field(None, ge=1, le=150)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    negative_prompt: str | list[str] | None = Field(None, description="One for all prompts, or one per prompt.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of the first image; image k uses seed + k.")
    scheduler: str | None = Field(None, description=f"sdgate extension: one of {', '.join(SCHEDULER_NAMES)}.")
    image: str | None = Field(None, description="Input image in base64 (PNG, JPEG or WebP): image-to-image.")
    mask_image: str | None = Field(
        None, description="With image: the inpainting mask in base64, white repaints and black keeps."
    )
    strength: float | None = Field(None, gt=0, le=1, description="How far from image (default 0.8; 1.0 with a mask).")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("prompt must not be an empty list")
        for prompt in prompts:
            check_prompt(prompt)
        return v

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v: int | None, info: Any) -> int | None:
        return None if v is None else check_side(info.field_name, v)

    @model_validator(mode="after")
    def _negative_matches(self) -> JumpStartPayload:
        if isinstance(self.negative_prompt, list) and len(self.negative_prompt) != len(self.prompts):
            raise ValueError(
                f"negative_prompt has {len(self.negative_prompt)} entries but prompt has {len(self.prompts)}; "
                "send one per prompt, or a single string"
            )
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def negative_for(self, index: int) -> str | None:
        if isinstance(self.negative_prompt, list):
            return self.negative_prompt[index]
        return self.negative_prompt


@dataclass(frozen=True)
class Invocation:
    """A parsed ``/invocations`` request: what to generate and how to answer."""

    payload: JumpStartPayload
    text_request: bool
    """Sent as ``application/x-text``: the answer names a single ``generated_image``."""
    encoding: ImageEncoding


def media_type(header: str | None) -> str:
    """``application/json; charset=utf-8`` → ``application/json``."""
    return (header or "").split(";", 1)[0].strip().lower()


def parse_accept(accept: str | None) -> ImageEncoding:
    """``application/json;jpeg`` → jpeg; ``application/json``, ``*/*`` or none → RGB lists."""
    if not accept:
        return "rgb"
    for entry in accept.split(","):
        value = entry.replace(" ", "").lower()
        if value.startswith(JPEG_ACCEPT):
            return "jpeg"
        if value.split(";", 1)[0] in (JSON, "*/*", "application/*"):
            return "rgb"
    raise UnsupportedMediaType(
        f"cannot answer Accept {accept!r}; use {JPEG_ACCEPT!r} (base64 JPEG) or {JSON!r} (RGB pixel lists)"
    )


def parse_invocation(body: bytes, content_type: str | None, accept: str | None) -> Invocation:
    """Read a JumpStart request. Raises a 4xx :class:`SdgateError` that says what to fix."""
    # 1. how to answer, before any work
    encoding = parse_accept(accept)
    kind = media_type(content_type) or JSON
    if kind not in (JSON, *_TEXT_TYPES):
        raise UnsupportedMediaType(f"send the body as {JSON} or {TEXT}, not {kind!r}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequest("the body is not UTF-8 text") from None
    if not text.strip():
        raise MalformedRequest("the body is empty; send a JSON payload with a prompt, or the prompt text")
    # 2. the payload
    if kind == JSON:
        try:
            data = json.loads(text)
        except ValueError:
            raise MalformedRequest("the body is not valid JSON") from None
        return Invocation(_validate(_unwrap(data)), text_request=False, encoding=encoding)
    data = _json_object_or_none(text)
    if isinstance(data, dict) and ("prompt" in data or "predictions" in data):
        return Invocation(_validate(_unwrap(data)), text_request=True, encoding=encoding)
    return Invocation(_validate({"prompt": text}), text_request=True, encoding=encoding)


def _json_object_or_none(text: str) -> Any:
    if not text.lstrip().startswith("{"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _unwrap(data: Any) -> Any:
    """Accept the ``{"predictions": [{...}]}`` wrapper some clients send (one request inside)."""
    if isinstance(data, dict) and set(data) == {"predictions"}:
        inner = data["predictions"]
        if not isinstance(inner, list) or len(inner) != 1:
            raise InvalidRequest("predictions must be a list with exactly one request", field="predictions")
        return inner[0]
    return data


def _validate(data: Any) -> JumpStartPayload:
    if not isinstance(data, dict):
        raise InvalidRequest("the JSON body must be an object with a prompt field", field="body")
    try:
        return JumpStartPayload.model_validate(data)
    except ValidationError as e:
        raise _invalid(e) from None


def _invalid(e: ValidationError) -> InvalidRequest:
    first = e.errors()[0]
    loc = [str(p) for p in first["loc"]]
    field = loc[0] if loc else "body"
    kind = first["type"]
    if kind == "extra_forbidden":
        message = f"unknown field {field!r}; valid: {', '.join(JumpStartPayload.model_fields)}"
    elif kind == "missing":
        message = f"{field} is required"
    elif field in ("prompt", "negative_prompt") and kind in ("string_type", "list_type"):
        message = f"{field} must be a string or a list of strings"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if loc and not message.startswith(field + " "):
            message = f"{field}: {message}"
    return InvalidRequest(message, field=field)


def generation_requests(payload: JumpStartPayload) -> list[GenerationRequest]:
    """One sdgate request per prompt; prompt ``j`` starts at seed ``seed + j * num_images_per_prompt``."""
    n = payload.num_images_per_prompt
    try:
        return [
            GenerationRequest(
                prompt=prompt,
                negative_prompt=payload.negative_for(j),
                width=payload.width,
                height=payload.height,
                num_inference_steps=payload.num_inference_steps,
                guidance_scale=payload.guidance_scale,
                seed=None if payload.seed is None else (payload.seed + j * n) % (MAX_SEED + 1),
                num_images=n,
                scheduler=payload.scheduler,
                output_format="jpeg",
                image=payload.image,
                mask=payload.mask_image,
                strength=payload.strength,
            )
            for j, prompt in enumerate(payload.prompts)
        ]
    except ValidationError as e:  # what only sdgate's request checks (the scheduler name)
        raise _invalid(e) from None


# sdgate's request fields that JumpStart's payload names otherwise.
_PAYLOAD_NAMES = {"mask": "mask_image"}


def in_payload_terms(error: InvalidRequest) -> InvalidRequest:
    """``error`` about an sdgate request field, naming the payload's field instead (``mask`` → ``mask_image``)."""
    name = _PAYLOAD_NAMES.get(error.field or "")
    if name is None or error.field is None:
        return error
    message = error.message
    if message.startswith(error.field + " "):
        message = name + message[len(error.field) :]
    return InvalidRequest(message, field=name, headers=error.headers)


def render_image(data: bytes, pixels: Any, encoding: ImageEncoding) -> Any:
    """One stored image as JumpStart sends it: RGB rows of its pixels, or its JPEG bytes in base64."""
    if encoding == "rgb":
        return to_rgb_lists(pixels)
    return base64.b64encode(data).decode("ascii")


def render_response(invocation: Invocation, images: list[Any]) -> bytes:
    """The answer body; ``images`` are already rendered by :func:`render_image`."""
    body: dict[str, Any]
    if invocation.text_request:
        body = {"generated_image": images[0]}
        if len(images) > 1:  # a JSON payload under x-text asked for several: give them all
            body["generated_images"] = images
    else:
        body = {"generated_images": images}
    body["prompt"] = invocation.payload.prompt
    return json.dumps(body, separators=(",", ":")).encode()


# -- client side ----------------------------------------------------------------------------------


def request_payload(params: GenerationParams, seed: int, inputs: ImageInputs | None = None) -> dict[str, Any]:
    """The body asking an endpoint for one image with ``seed``, every value explicit.

    Input images go as JumpStart's inpainting model takes them: ``image`` and ``mask_image`` in base64.
    ``strength`` is sent only when it is not the mode's default, which an endpoint applies anyway.
    """
    payload: dict[str, Any] = {
        "prompt": params.prompt,
        "width": params.width,
        "height": params.height,
        "num_images_per_prompt": 1,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "seed": seed,
    }
    if params.negative_prompt:
        payload["negative_prompt"] = params.negative_prompt
    if params.scheduler:
        payload["scheduler"] = params.scheduler
    if inputs is not None:
        payload["image"] = base64.b64encode(inputs.image.data).decode("ascii")
        if inputs.mask is not None:
            payload["mask_image"] = base64.b64encode(inputs.mask.data).decode("ascii")
        if params.mode in DEFAULT_STRENGTH and params.strength != DEFAULT_STRENGTH[params.mode]:
            payload["strength"] = params.strength
    return payload


class ResponseError(ValueError):
    """An endpoint's answer is not a JumpStart response; the message says what was wrong."""


def parse_images(body: bytes, seed: int) -> list[GeneratedImage]:
    """Images of a JumpStart answer, base64 JPEG/PNG strings or RGB lists, each tagged with its seed.

    JPEG bytes are kept (``encoded``) so that they are stored as they came, without re-encoding.
    """
    try:
        data = json.loads(body)
    except ValueError:
        raise ResponseError(f"the answer is not JSON: {body[:80]!r}") from None
    if not isinstance(data, dict):
        raise ResponseError("the answer is not a JSON object")
    if "generated_images" in data:
        items = data["generated_images"]
    elif "generated_image" in data:
        items = [data["generated_image"]]
    else:
        raise ResponseError(f"the answer has no generated_images; fields: {', '.join(sorted(data)) or 'none'}")
    if not isinstance(items, list) or not items:
        raise ResponseError("generated_images is empty")
    return [_parse_one(item, seed + i) for i, item in enumerate(items)]


def _parse_one(item: Any, seed: int) -> GeneratedImage:
    if isinstance(item, str):
        try:
            raw = base64.b64decode(item, validate=True)
            with Image.open(io.BytesIO(raw)) as im:
                fmt = im.format
                image = im.convert("RGB")
        except (binascii.Error, UnidentifiedImageError, OSError) as e:
            raise ResponseError(f"an image is not a base64-encoded image: {e}") from None
        if fmt == "JPEG":
            return GeneratedImage(image=image, seed=seed, encoded=raw, encoded_format="jpeg")
        return GeneratedImage(image=image, seed=seed)
    try:
        return GeneratedImage(image=from_rgb_lists(item), seed=seed)
    except (ValueError, TypeError) as e:
        raise ResponseError(f"an image is neither base64 nor RGB pixel lists: {e}") from None
