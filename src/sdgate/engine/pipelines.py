"""One loaded model, three ways to call it: text-to-image, image-to-image and inpainting.

The image-to-image and inpainting pipelines are made from the loaded one with diffusers' ``from_pipe``:
they share its modules, so there is one copy of the weights whatever the mix of requests.

- Any text-to-image model inpaints: with a 4-channel UNet, diffusers' inpainting pipeline blends the
  kept area's latents (the input's, noised to the current step) into each step.
- A dedicated inpainting checkpoint (a 9-channel UNet: latents, mask and masked image) does
  everything as inpainting: text-to-image is inpainting of a blank image under a full mask, and
  image-to-image inpainting under a full mask.

Inpainting pastes the kept area of the input back over the result: the model works on latents 8x
smaller than the image and its decoder changes every pixel a little, so without it "black keeps"
would only be nearly true.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

from sdgate.engine.prompts import PromptEmbeddings
from sdgate.imaging import repaint_overlay
from sdgate.schemas import Mode

OWN_CLASSES: dict[str, dict[Mode, str]] = {
    "StableDiffusionPipeline": {
        Mode.img2img: "StableDiffusionImg2ImgPipeline",
        Mode.inpaint: "StableDiffusionInpaintPipeline",
    },
    "StableDiffusionXLPipeline": {
        Mode.img2img: "StableDiffusionXLImg2ImgPipeline",
        Mode.inpaint: "StableDiffusionXLInpaintPipeline",
    },
}
"""The image-to-image and inpainting classes of the common text-to-image ones, made with their own class:
diffusers' AutoPipelineFor* would make the same, but importing them imports every pipeline it has (seconds,
paid by the first request that needs one). Other models go through AutoPipelineFor*. The loader loads these
text-to-image classes by their own class too."""

StepFn = Callable[[int, Any], None]
"""Called with the number of steps done and the latents (a tensor, or None), after each step."""


def inpainting_unet(pipe: Any) -> bool:
    """Whether the model is a dedicated inpainting checkpoint (its UNet also takes mask and masked image)."""
    return int(getattr(pipe.unet.config, "in_channels", 4)) == 9


def _class_for(text2img: Any, mode: Mode) -> Any:
    import diffusers

    own = OWN_CLASSES.get(type(text2img).__name__, {}).get(mode)
    if own is not None:
        return getattr(diffusers, own)
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    return AutoPipelineForImage2Image if mode is Mode.img2img else AutoPipelineForInpainting


class Pipelines:
    """The loaded pipeline and the ones made from it, each made once, on first use, on the engine thread."""

    def __init__(self, text2img: Any):
        self.text2img = text2img
        self.inpainting_unet = inpainting_unet(text2img)
        self._made: dict[Mode, Any] = {}

    def get(self, mode: Mode) -> Any:
        """The pipeline that runs ``mode`` (a 9-channel model runs everything as inpainting)."""
        if self.inpainting_unet:
            mode = Mode.inpaint
        if mode is Mode.txt2img:
            return self.text2img
        if mode not in self._made:
            made = _class_for(self.text2img, mode).from_pipe(self.text2img)
            made.set_progress_bar_config(disable=True)
            self._made[mode] = made
        return self._made[mode]

    def run(
        self,
        mode: Mode,
        *,
        scheduler: Any,
        prompts: list[str],
        negatives: list[str],
        generators: list[Any],
        width: int,
        height: int,
        steps: int,
        guidance: float,
        strength: float | None,
        images: list[Image.Image] | None,
        masks: list[Image.Image] | None,
        on_step: StepFn | None,
        embeddings: PromptEmbeddings | None = None,
    ) -> list[Image.Image]:
        """One pipeline call for a batch of rows; ``images`` and ``masks`` have a row each (for their modes).

        With ``embeddings`` (usable for this model), the prompts' text embeddings come from there.
        """
        pipe = self.get(mode)
        pipe.scheduler = scheduler
        kwargs: dict[str, Any] = {}
        if on_step is not None:

            def callback(_pipe: Any, i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                on_step(i + 1, tensors.get("latents"))
                return tensors

            kwargs["callback_on_step_end"] = callback
        rows = len(prompts)
        sized = [fit(im, width, height) for im in images] if images else None
        sized_masks = [fit(m, width, height, mask=True) for m in masks] if masks else None
        if self.inpainting_unet and mode is not Mode.inpaint:
            # Everything is repainted: from a blank image (text-to-image) or from the input (image-to-image).
            sized = sized or [Image.new("RGB", (width, height))] * rows
            sized_masks = [Image.new("L", (width, height), 255)] * rows
            strength = 1.0 if mode is Mode.txt2img else strength
        if mode is Mode.img2img and not self.inpainting_unet:
            # The image-to-image pipeline takes its size from the image, resized above.
            kwargs.update(image=sized, strength=strength)
        else:
            kwargs.update(width=width, height=height)
            if sized_masks is not None:
                kwargs.update(image=sized, mask_image=sized_masks, strength=strength)
        if embeddings is not None and embeddings.usable:
            kwargs.update(prompt_embeds=embeddings.rows(prompts), negative_prompt_embeds=embeddings.rows(negatives))
        else:
            kwargs.update(prompt=prompts, negative_prompt=negatives)
        out = pipe(
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="pil",
            **kwargs,
        )
        result: list[Image.Image] = list(out.images)
        if mode is Mode.inpaint and sized and sized_masks:
            result = [repaint_overlay(g, im, m) for g, im, m in zip(result, sized, sized_masks, strict=True)]
        return result


def fit(image: Image.Image, width: int, height: int, *, mask: bool = False) -> Image.Image:
    """``image`` at the generation's size (a request may name another size than its image's)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.NEAREST if mask else Image.Resampling.LANCZOS)
