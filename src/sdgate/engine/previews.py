"""Live previews: what a running generation is drawing, from its latents, for a fraction of a step.

Decoding latents with the VAE costs about as much as a step; a preview does not need it. Each of
the 4 latent channels maps to colour almost linearly, so a 4x3 matrix and a bias, fitted per model
the first time a preview is asked for, turn the latents into a small RGB picture at the latents'
resolution (1/8 of the image's side), scaled up for display. Nothing is downloaded: the fit encodes
a few synthetic pictures (colour blocks and gradients) with the model's own VAE and solves a least
squares problem between the latents and the pictures shrunk to the latents' size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

PREVIEW_SIDE = 256
"""The longest side of a preview picture (smaller images keep their own size)."""
_FIT_IMAGES = 24
_FIT_SIDE = 64


def _fit_pictures(seed: int = 0) -> np.ndarray:
    """Synthetic pictures in [0, 1], (N, 3, side, side): colour blocks, and gradients between colours."""
    rng = np.random.default_rng(seed)
    side = _FIT_SIDE
    pictures = []
    for i in range(_FIT_IMAGES):
        if i % 2 == 0:  # 4x4 blocks of random colours
            blocks = rng.random((3, 4, 4))
            pictures.append(np.kron(blocks, np.ones((side // 4, side // 4))))
        else:  # a gradient from one colour to another, across or down
            a, b = rng.random((3, 1, 1)), rng.random((3, 1, 1))
            ramp = np.linspace(0, 1, side)[None, None, :] * np.ones((1, side, 1))
            if i % 4 == 1:
                ramp = ramp.transpose(0, 2, 1)
            pictures.append(a + (b - a) * ramp)
    return np.stack(pictures).astype(np.float32)


class LatentPreviewer:
    """Latents → preview pictures for one model (fitted once, on the engine thread)."""

    def __init__(self, pipe: Any):
        import torch

        vae = pipe.vae
        pictures = _fit_pictures()
        with torch.inference_mode():
            x = torch.from_numpy(pictures * 2 - 1).to(device=vae.device, dtype=vae.dtype)
            latents = vae.encode(x).latent_dist.mean * float(vae.config.scaling_factor)
            latents = latents.float().cpu().numpy()  # (N, C, h, w)
        n, channels, h, w = latents.shape
        factor = _FIT_SIDE // h
        shrunk = pictures.reshape(n, 3, h, factor, w, factor).mean(axis=(3, 5))  # (N, 3, h, w)
        x_rows = latents.transpose(0, 2, 3, 1).reshape(-1, channels)
        y_rows = shrunk.transpose(0, 2, 3, 1).reshape(-1, 3)
        design = np.hstack([x_rows, np.ones((len(x_rows), 1), np.float32)])
        solution, *_ = np.linalg.lstsq(design, y_rows, rcond=None)
        self.channels = channels
        self.weights = solution[:channels].astype(np.float32)  # (C, 3)
        self.bias = solution[channels].astype(np.float32)  # (3,)

    def picture(self, latents: Any, size: tuple[int, int]) -> Image.Image:
        """The preview of one row's latents ((C, h, w), a tensor), for an image of ``size`` (width, height)."""
        array = latents.detach().float().cpu().numpy()
        rgb = np.einsum("chw,cd->hwd", array, self.weights) + self.bias
        small = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")
        width, height = size
        scale = min(1.0, PREVIEW_SIDE / max(width, height))
        return small.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
