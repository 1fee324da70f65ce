"""Built-in models that work offline.

``demo`` (the default) is a small Stable Diffusion pipeline trained on generated scenes of simple
shapes (:mod:`sdgate.demo`): it draws what its prompt says — "a red circle on a blue background" —
at 64x64. Its weights ship inside the package (``sdgate/models/demo``, a few MB of safetensors) and
load with ``from_pretrained`` from there; nothing is built or copied. Its model card sits beside them.

``tiny`` is a complete Stable Diffusion pipeline — CLIP text encoder and tokenizer, UNet, VAE with
the standard 8x downscale, Euler scheduler — built from configs with seeded random weights. It
exercises every code path of a real model in about a second per 512x512 image on two CPU cores;
its images are noise-like, which is expected. It is saved once under the data directory and loaded
with the same ``from_pretrained`` path as any real model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

BUILTIN_MODELS = ("demo", "tiny")
DEMO_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"
_TINY_VERSION = "tiny-v1"
_MARKER = "sdgate-builtin.json"


def _byte_alphabet() -> list[str]:
    """Printable stand-ins for the 256 byte values, as byte-level BPE tokenizers use them."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _write_char_tokenizer_files(directory: Path) -> dict[str, int]:
    """A character-level CLIP BPE vocabulary (no merges): every prompt tokenizes, nothing is unknown."""
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return vocab


def build_tiny(target: Path, seed: int = 0) -> None:
    """Build the ``tiny`` pipeline from configs with weights from ``seed`` and save it to ``target``."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng():
        torch.manual_seed(seed)
        vocab = _write_char_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
        text_encoder = clip_text_encoder(vocab, hidden=32, layers=2, heads=2, max_tokens=77)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = sd_vae((8, 16, 32, 32), norm_num_groups=8, sample_size=512)
        pipe = sd_pipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)
        pipe.save_pretrained(str(target), safe_serialization=True)
    (target / _MARKER).write_text(json.dumps({"name": "tiny", "version": _TINY_VERSION, "seed": seed}))


def clip_text_encoder(vocab: dict[str, int], *, hidden: int, layers: int, heads: int, max_tokens: int) -> Any:
    """A CLIP text encoder, fresh weights, for a tokenizer with ``vocab`` (its own start/end tokens)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=max_tokens,
            projection_dim=hidden,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )


def sd_vae(block_out_channels: tuple[int, int, int, int], **options: Any) -> Any:
    """A VAE of Stable Diffusion's shape, fresh weights: four blocks (three 2x downsamples, the standard 8x)
    and four latent channels; ``options`` are the rest of ``AutoencoderKL``'s arguments."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        **options,
    )


def sd_pipeline(*, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any = None) -> Any:
    """A ``StableDiffusionPipeline`` of these parts, with Stable Diffusion's own Euler schedule by default.

    No safety checker: the built-in models cannot draw anything that would need one.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    if scheduler is None:
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def built_dir(name: str, models_dir: Path) -> Path | None:
    """Directory of built-in model ``name`` if it is there already (``tiny`` before its first use: None)."""
    if name == "demo":
        return DEMO_DIR
    target = models_dir / _TINY_VERSION
    return target if (target / _MARKER).is_file() else None


def ensure_builtin(name: str, models_dir: Path) -> Path:
    """Directory of built-in model ``name``: ``demo``'s in the package, ``tiny``'s built on first use.

    Safe if two processes race.
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in: {', '.join(BUILTIN_MODELS)}")
    built = built_dir(name, models_dir)
    if built is not None:
        return built
    target = models_dir / _TINY_VERSION
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=models_dir, prefix=".build-"))
    try:
        build_tiny(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first; its copy is identical (same seed, same configs).
            if not (target / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
