"""Train the ``demo`` model: a small but complete Stable Diffusion pipeline, on generated scenes, on a CPU.

Steps (``sdgate train-demo``):

1. tokenizer — a CLIP BPE vocabulary whose merges spell every caption word as one token;
2. VAE — a small ``AutoencoderKL`` with the standard 8x downscale, trained to reconstruct scenes
   (mean squared error plus a small KL term), then frozen;
3. text encoder + UNet — a small ``CLIPTextModel`` and ``UNet2DConditionModel`` trained together
   to predict the velocity of noised scene latents (DDPM, v-prediction as in SD 2.x, min-SNR
   weighting), with 10% of captions dropped so classifier-free guidance works;
4. save — a ``StableDiffusionPipeline`` with ``save_pretrained`` (safetensors), loadable with
   ``from_pretrained`` like any other model, plus a grid of samples to look at.

Everything is seeded: the same command on the same torch version gives the same weights (up to the
float nondeterminism of multi-threaded CPU kernels).
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdgate.demo.scenes import COLOURS, Scene, caption_words, random_scene

NATIVE_SIZE = 64
MAX_TOKENS = 32  # the longest caption (three shapes) is 29 tokens; longer prompts are truncated
CAPTION_DROPOUT = 0.1  # share of captions replaced by "" so the model also learns the unconditional case
# The UNet predicts the velocity v (as SD 2.x), not the noise: at high noise v is mostly the clean image,
# so the model must get the colours from the prompt there. Predicting the noise (epsilon) makes the noise
# an easy answer at high noise and leaves the colours to be settled later from the starting noise: a first
# run trained that way drew backgrounds by seed, not by prompt.
PREDICTION_TYPE = "v_prediction"
ATTRIBUTE_OMIT = 0.25  # chance that a caption leaves out a size, a position or the background

LogFn = Callable[[str], None]


@dataclass
class TrainConfig:
    """Everything that decides the weights. The defaults are the shipped model's."""

    seed: int = 0
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_crop: int = 32  # the VAE is convolutional: training on crops costs a quarter and teaches the same
    vae_lr: float = 1e-3
    # Then the decoder alone, on whole images: sharper edges, and the latent space (the encoder) stays as
    # the UNet learned it, as Stability AI's fine-tuned SD VAE decoders did.
    decoder_steps: int = 1500
    decoder_batch: int = 16
    decoder_lr: float = 5e-4
    unet_steps: int = 2750
    unet_batch: int = 64
    unet_lr: float = 1e-3
    ema_decay: float = 0.995
    latent_pool: int = 16384  # scenes encoded once by the frozen VAE; captions are re-drawn every time
    # Every this many UNet steps (0: never), save a grid of samples and the stage as it would end after
    # that many steps (out/stage-unet-NNNNN); neither changes the weights.
    preview_every: int = 0
    # One thread: on a shared two-core machine two OpenMP threads wait on each other and ran 4-10x slower.
    threads: int = 1
    # Denoising steps of the sample grids saved beside the weights (they do not change the weights).
    sample_steps: int = 20


@dataclass
class TrainReport:
    """What happened: losses along the way and the wall time of each stage."""

    config: dict[str, Any]
    vae_seconds: float = 0.0
    vae_cpu_seconds: float = 0.0
    encode_seconds: float = 0.0
    unet_seconds: float = 0.0
    unet_cpu_seconds: float = 0.0
    vae_loss: float = 0.0
    decoder_seconds: float = 0.0
    decoder_cpu_seconds: float = 0.0
    decoder_loss: float = 0.0
    unet_loss: float = 0.0
    scaling_factor: float = 1.0
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


# -- 1. tokenizer ---------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """Printable stand-ins for the 256 byte values, as CLIP's byte-level BPE uses them."""
    from sdgate.engine.builtin import _byte_alphabet as alphabet

    return alphabet()


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges, learned on ``words`` until each is one token (most frequent pair first, as BPE does).

    Applying merges in rank order to a word seen in training reproduces its training segmentation,
    so every caption word becomes exactly one ``word</w>`` token; other words fall back to pieces.
    """
    segs = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in segs):
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for s in segs:
            counts.update(itertools.pairwise(s))
        # Ties broken by the pair itself, so the merges do not depend on hash order.
        best = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for i, s in enumerate(segs):
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(s[j] + s[j + 1])
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            segs[i] = out
    return merges


def write_tokenizer_files(directory: Path) -> dict[str, int]:
    """``vocab.json`` and ``merges.txt`` of a CLIP tokenizer with one token per caption word."""
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(ch + "</w>" for ch in alphabet)]:
        vocab[token] = len(vocab)
    merges = learn_merges(caption_words())
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vocab


# -- models ---------------------------------------------------------------------------------------


def build_components(seed: int) -> dict[str, Any]:
    """Tokenizer, text encoder, UNet, VAE and scheduler, with fresh weights from ``seed``."""
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from sdgate.engine.builtin import clip_text_encoder, sd_vae

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=MAX_TOKENS
        )
    text_encoder = clip_text_encoder(vocab, hidden=128, layers=3, heads=4, max_tokens=MAX_TOKENS)
    unet = UNet2DConditionModel(
        sample_size=NATIVE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=4,  # diffusers' name for the number of heads
        norm_num_groups=8,
        # The prompt, attention-pooled, also joins the timestep embedding that scales every block: a
        # global path for global things (the background). Without it a first run still drew the same
        # image for every prompt after 250 steps; cross-attention alone is slow to start from scratch.
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )
    vae = sd_vae(
        (16, 32, 32, 64),
        # Four channels per group, as in SD's VAE: a group norm over fewer channels erases flat colours.
        norm_num_groups=4,
        # No attention: the VAE is then purely convolutional, so training on crops is exact.
        mid_block_add_attention=False,
        sample_size=NATIVE_SIZE,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        prediction_type=PREDICTION_TYPE,
    )
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae, "scheduler": scheduler}


def _images(scenes: list[Scene]) -> Any:
    """Scenes as a float tensor in [-1, 1], NCHW."""
    import torch

    arr = np.stack([np.asarray(s.render(NATIVE_SIZE), dtype=np.float32) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def _crops(x: Any, size: int, rng: random.Random) -> Any:
    """A random ``size`` x ``size`` crop of each image."""
    import torch

    if size >= x.shape[-1]:
        return x
    out = []
    for img in x:
        top, left = rng.randrange(x.shape[-2] - size + 1), rng.randrange(x.shape[-1] - size + 1)
        out.append(img[:, top : top + size, left : left + size])
    return torch.stack(out)


def _lr(step: int, total: int | None, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak (or constant when ``total`` is None)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total is None:
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimise(opt: Any, loss: Any, params: Any) -> None:
    """One optimiser step on ``loss``, with the gradients of ``params`` clipped to norm 1."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


@dataclass
class _Meter:
    """A stage's loss as a running average, kept in the report's history and logged every 50 steps."""

    stage: str
    steps: int
    history: list[tuple[int, float]]
    log: LogFn
    metric: str = "mse"
    digits: int = 5
    running: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    cpu_start: float = field(default_factory=time.process_time)

    def update(self, step: int, value: float) -> None:
        self.running = value if step == 0 else 0.98 * self.running + 0.02 * value
        if step % 50 == 0 or step == self.steps - 1:
            self.history.append((step, self.running))
            shown = f"{self.running:.{self.digits}f}"
            self.log(f"{self.stage} step {step}/{self.steps} {self.metric} {shown} ({self.seconds:.0f}s)")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def cpu_seconds(self) -> float:
        return time.process_time() - self.cpu_start

    def report_to(self, report: TrainReport) -> None:
        """The stage's loss and times into the report's ``<stage>_loss``, ``_seconds`` and ``_cpu_seconds``."""
        setattr(report, f"{self.stage}_loss", self.running)
        setattr(report, f"{self.stage}_seconds", self.seconds)
        setattr(report, f"{self.stage}_cpu_seconds", self.cpu_seconds)


# -- 2. VAE ---------------------------------------------------------------------------------------


def train_vae(vae: Any, cfg: TrainConfig, report: TrainReport, log: LogFn) -> None:
    """Reconstruction (MSE) plus a small KL term, on fresh scenes every step."""
    import torch

    rng = random.Random(cfg.seed * 1_000_003 + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    meter = _Meter("vae", cfg.vae_steps, report.history.setdefault("vae", []), log)
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr)
        x = _crops(_images([random_scene(rng) for _ in range(cfg.vae_batch)]), cfg.vae_crop, rng)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = mse + 1e-4 * kl
        _optimise(opt, loss, vae.parameters())
        meter.update(step, mse.item())
    meter.report_to(report)
    vae.eval().requires_grad_(False)


def finetune_decoder(vae: Any, cfg: TrainConfig, report: TrainReport, log: LogFn) -> None:
    """Train only the decoder (and its input conv) on whole scenes; the encoder, hence the latents, stay fixed."""
    import torch

    rng = random.Random(cfg.seed * 1_000_003 + 4)
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    vae.decoder.train()
    meter = _Meter("decoder", cfg.decoder_steps, report.history.setdefault("decoder", []), log)
    for step in range(cfg.decoder_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.decoder_steps, cfg.decoder_lr)
        x = _images([random_scene(rng) for _ in range(cfg.decoder_batch)])
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample(generator=gen)
        mse = torch.nn.functional.mse_loss(vae.decode(latents).sample, x)
        _optimise(opt, mse, params)
        meter.update(step, mse.item())
    meter.report_to(report)
    vae.eval().requires_grad_(False)


# -- 3. text encoder + UNet -----------------------------------------------------------------------


def encode_pool(
    vae: Any, cfg: TrainConfig, report: TrainReport, log: LogFn, cache: Path | None = None
) -> tuple[list[Scene], Any]:
    """Encode ``latent_pool`` scenes once with the frozen VAE: the UNet stage reuses them with fresh captions.

    With ``cache``, the encoded pool is kept there and reused by a run with the same VAE settings.
    """
    import torch

    rng = random.Random(cfg.seed * 1_000_003 + 2)
    scenes = [random_scene(rng) for _ in range(cfg.latent_pool)]
    key = {k: v for k, v in asdict(cfg).items() if k in ("seed", "latent_pool") or k.startswith("vae_")}
    if cache is not None and cache.is_file():
        saved = torch.load(str(cache), weights_only=True)
        if json.loads(saved["key"]) == key:
            report.scaling_factor, report.encode_seconds = float(saved["scaling_factor"]), float(saved["seconds"])
            log(f"reusing the encoded scenes of {cache}")
            return scenes, saved["pool"]
    start = time.perf_counter()
    means, stds = [], []
    with torch.inference_mode():
        for i in range(0, len(scenes), 256):
            dist = vae.encode(_images(scenes[i : i + 256])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    # SD's convention: latents times scaling_factor have unit variance, which the noise schedule assumes.
    report.scaling_factor = float(1.0 / mean.std())
    report.encode_seconds = time.perf_counter() - start
    log(f"encoded {len(scenes)} scenes in {report.encode_seconds:.0f}s, scaling_factor {report.scaling_factor:.4f}")
    pool = torch.stack([mean, std])
    if cache is not None:
        record = {"key": json.dumps(key), "pool": pool, "scaling_factor": report.scaling_factor}
        torch.save({**record, "seconds": report.encode_seconds}, str(cache))
    return scenes, pool


def train_denoiser(
    parts: dict[str, Any],
    scenes: list[Scene],
    pool: Any,
    cfg: TrainConfig,
    report: TrainReport,
    log: LogFn,
    preview: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """DDPM loss (v-prediction, min-SNR weighting); returns the EMA weights of both models.

    Every ``preview_every`` steps ``preview(step, ema)`` gets to look (the models in eval mode).
    """
    import torch
    from diffusers import DDPMScheduler

    tokenizer, text_encoder, unet = parts["tokenizer"], parts["text_encoder"], parts["unet"]
    noise_sched = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=PREDICTION_TYPE,
    )
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    # min-SNR-5: low-noise steps, which are easy, stop dominating the loss; training converges faster.
    weights = torch.clamp(snr, max=5.0) / (snr + 1)  # min-SNR-5 in its v-prediction form

    rng = random.Random(cfg.seed * 1_000_003 + 3)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    params = [*text_encoder.parameters(), *unet.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    ema = {
        name: {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, model in (("text_encoder", text_encoder), ("unet", unet))
    }
    text_encoder.train()
    unet.train()
    meter = _Meter("unet", cfg.unet_steps, report.history.setdefault("unet", []), log, metric="loss", digits=4)
    for step in range(cfg.unet_steps):
        for group in opt.param_groups:
            # Constant after warm-up, with an EMA of the weights: nothing depends on the number of
            # steps, so the first N steps of a longer run are exactly a run of N steps.
            group["lr"] = _lr(step, None, cfg.unet_lr, warmup=200)
        idx = [rng.randrange(len(scenes)) for _ in range(cfg.unet_batch)]
        captions = ["" if rng.random() < CAPTION_DROPOUT else scenes[i].caption(rng, omit=ATTRIBUTE_OMIT) for i in idx]
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        mean, std = pool[0][idx], pool[1][idx]
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * report.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        cond = text_encoder(ids.input_ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        target = noise_sched.get_velocity(latents, noise, t)
        per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss = (per_sample * weights[t]).mean()
        _optimise(opt, loss, params)
        # EMA with a warm-up, so early weights fade quickly while the model is still poor.
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, model in (("text_encoder", text_encoder), ("unet", unet)):
                for k, v in model.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[name][k].lerp_(v, 1 - decay)
                    else:
                        ema[name][k].copy_(v)
        meter.update(step, per_sample.mean().item())
        if preview is not None and cfg.preview_every and (step + 1) % cfg.preview_every == 0:
            text_encoder.eval()
            unet.eval()
            meter.report_to(report)
            preview(step + 1, ema)
            text_encoder.train()
            unet.train()
    meter.report_to(report)
    text_encoder.eval()
    unet.eval()
    return ema


# -- 4. save --------------------------------------------------------------------------------------


def assemble(parts: dict[str, Any], scaling_factor: float) -> Any:
    """The parts as a ``StableDiffusionPipeline`` (no safety checker: the model only draws shapes)."""
    from sdgate.engine.builtin import sd_pipeline

    vae = parts["vae"]
    vae.register_to_config(scaling_factor=scaling_factor)
    return sd_pipeline(
        vae=vae,
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=parts["scheduler"],
    )


SAMPLE_PROMPTS = (
    "a red circle on a blue background",
    "a small white circle on a black background",
    "a large yellow square on a purple background",
    "a large green triangle in the centre on a white background",
    "a small orange circle on the left on a green background",
    "a large blue square on the right on a yellow background",
    "a red triangle at the top and a white circle at the bottom on a blue background",
    "a large purple circle on an orange background",
)


def sample_grid(pipe: Any, path: Path, prompts: tuple[str, ...] = SAMPLE_PROMPTS, seeds: int = 6, **kw: Any) -> None:
    """One row per prompt, one column per seed, upscaled 4x (nearest) so that it is easy to look at."""
    import torch
    from PIL import Image

    rows = []
    with torch.inference_mode():
        for prompt in prompts:
            gens = [torch.Generator().manual_seed(s) for s in range(seeds)]
            out = pipe(
                [prompt] * seeds,
                generator=gens,
                num_inference_steps=kw.get("steps", 20),
                guidance_scale=kw.get("guidance_scale", 5.0),
                width=NATIVE_SIZE,
                height=NATIVE_SIZE,
            )
            rows.append(out.images)
    grid = Image.new("RGB", (NATIVE_SIZE * seeds, NATIVE_SIZE * len(rows)))
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            grid.paste(img, (c * NATIVE_SIZE, r * NATIVE_SIZE))
    grid.resize((grid.width * 4, grid.height * 4), Image.Resampling.NEAREST).save(path)


def reconstruction_grid(vae: Any, path: Path, count: int = 8) -> None:
    """Scenes (top row) and their VAE reconstructions (bottom row), upscaled 4x."""
    import torch
    from PIL import Image

    scenes = [Scene.from_seed(10_000 + i) for i in range(count)]
    with torch.inference_mode():
        x = _images(scenes)
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
    rows = torch.cat([x, recon]).clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()
    grid = Image.new("RGB", (NATIVE_SIZE * count, NATIVE_SIZE * 2))
    for i, arr in enumerate(rows):
        grid.paste(Image.fromarray(arr), ((i % count) * NATIVE_SIZE, (i // count) * NATIVE_SIZE))
    grid.resize((grid.width * 4, grid.height * 4), Image.Resampling.NEAREST).save(path)


def _stage(
    name: str,
    prefixes: tuple[str, ...],
    train: Callable[[Any, TrainConfig, TrainReport, LogFn], None],
    parts: dict[str, Any],
    cfg: TrainConfig,
    report: TrainReport,
    out: Path,
    log: LogFn,
) -> float:
    """Run a VAE stage, or reuse what a previous run with the same settings left in ``out/stage-NAME``.

    A VAE stage depends only on the seed and its own settings, so an interrupted or retuned run
    picks up after it with the very weights it would have trained again. Returns the seconds the
    reused stage took when it ran (0 when it ran now).
    """
    from diffusers import AutoencoderKL

    stage = out / f"stage-{name}"
    key = {k: v for k, v in asdict(cfg).items() if k == "seed" or k.startswith(prefixes)}
    record = stage / "stage.json"
    fields = (f"{name}_seconds", f"{name}_cpu_seconds", f"{name}_loss")
    if record.is_file() and json.loads(record.read_text())["key"] == key:
        saved = json.loads(record.read_text())
        parts["vae"] = AutoencoderKL.from_pretrained(str(stage)).eval().requires_grad_(False)
        for f in fields:
            setattr(report, f, saved[f])
        report.history[name] = saved["history"]
        log(f"reusing the {name} stage of {stage} ({saved[fields[0]] / 60:.1f} min)")
        return float(saved[fields[0]])
    train(parts["vae"], cfg, report, log)
    parts["vae"].save_pretrained(str(stage), safe_serialization=True)
    saved = {"key": key, "history": report.history[name], **{f: getattr(report, f) for f in fields}}
    record.write_text(json.dumps(saved) + "\n", encoding="utf-8")
    return 0.0


def _unet_key(cfg: TrainConfig, steps: int | None = None) -> dict[str, Any]:
    keep = ("vae_", "unet_", "latent_pool", "ema_decay")
    key = {k: v for k, v in asdict(cfg).items() if k == "seed" or k.startswith(keep)}
    if steps is not None:
        key["unet_steps"] = steps
    key["prediction_type"] = PREDICTION_TYPE
    return key


def _save_unet_stage(stage: Path, key: dict[str, Any], parts: dict[str, Any], report: TrainReport) -> None:
    parts["text_encoder"].save_pretrained(str(stage / "text_encoder"), safe_serialization=True)
    parts["unet"].save_pretrained(str(stage / "unet"), safe_serialization=True)
    saved = {"key": key, "history": report.history["unet"], **{f: getattr(report, f) for f in _UNET_FIELDS}}
    (stage / "stage.json").write_text(json.dumps(saved) + "\n", encoding="utf-8")


_UNET_FIELDS = ("scaling_factor", "encode_seconds", "unet_seconds", "unet_cpu_seconds", "unet_loss")


def _unet_stage(parts: dict[str, Any], cfg: TrainConfig, report: TrainReport, out: Path, log: LogFn) -> float:
    """Encode the latent pool and train text encoder + UNet, or reuse ``out/stage-unet`` (as :func:`_stage`).

    With ``preview_every``, ``out/stage-unet-NNNNN`` holds the stage as a run of NNNNN steps would
    leave it; renamed to ``stage-unet`` it is reused by a run with ``unet_steps=NNNNN``.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    stage = out / "stage-unet"
    key = _unet_key(cfg)
    record = stage / "stage.json"
    if record.is_file() and json.loads(record.read_text())["key"] == key:
        saved = json.loads(record.read_text())
        parts["text_encoder"] = CLIPTextModel.from_pretrained(str(stage / "text_encoder")).eval()
        parts["unet"] = UNet2DConditionModel.from_pretrained(str(stage / "unet")).eval()
        for f in _UNET_FIELDS:
            setattr(report, f, saved[f])
        report.history["unet"] = saved["history"]
        log(f"reusing the unet stage of {stage} ({saved['unet_seconds'] / 60:.1f} min)")
        return float(saved["encode_seconds"] + saved["unet_seconds"])
    scenes, pool = encode_pool(parts["vae"], cfg, report, log, cache=out / "stage-vae" / "pool.pt")
    pipe = assemble(parts, report.scaling_factor)
    pipe.set_progress_bar_config(disable=True)
    ema_parts = build_components(cfg.seed)  # weights replaced by the EMA's below

    def preview(step: int, ema: dict[str, Any]) -> None:
        sample_grid(pipe, out / f"preview-{step:05d}.png", SAMPLE_PROMPTS[:4], seeds=4)
        ema_parts["text_encoder"].load_state_dict(ema["text_encoder"])
        ema_parts["unet"].load_state_dict(ema["unet"])
        _save_unet_stage(out / f"stage-unet-{step:05d}", _unet_key(cfg, step), ema_parts, report)

    ema = train_denoiser(parts, scenes, pool, cfg, report, log, preview)
    # The EMA weights are the ones kept: smoother than the last step's.
    parts["text_encoder"].load_state_dict(ema["text_encoder"])
    parts["unet"].load_state_dict(ema["unet"])
    _save_unet_stage(stage, key, parts, report)
    return 0.0


def train_demo(out: Path, cfg: TrainConfig | None = None, log: LogFn = print) -> TrainReport:
    """Train the demo model and save the pipeline to ``out`` (with ``training.json`` and ``samples.png``).

    Each stage leaves its weights in ``out/stage-*``; a run with the same settings reuses them.
    """
    import torch

    cfg = cfg or TrainConfig()
    torch.set_num_threads(cfg.threads)
    report = TrainReport(config=asdict(cfg))
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # 1. parts with fresh weights
    parts = build_components(cfg.seed)
    # 2. VAE, then frozen
    reused = _stage("vae", ("vae_",), train_vae, parts, cfg, report, out, log)
    reconstruction_grid(parts["vae"], out / "reconstructions-vae.png")
    # 3. text encoder + UNet on the frozen VAE's latents
    reused += _unet_stage(parts, cfg, report, out, log)
    # 4. the decoder alone, on whole scenes (the latents the UNet learned stay as they were)
    reused += _stage("decoder", ("vae_", "decoder_"), finetune_decoder, parts, cfg, report, out, log)
    reconstruction_grid(parts["vae"], out / "reconstructions.png")
    # 5. save: float16 weights (half the size; they load as float32 on a CPU), and the tokenizer also as
    # vocab.json + merges.txt, which transformers 4 reads (5 reads tokenizer.json)
    pipe = assemble(parts, report.scaling_factor)
    pipe.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    write_tokenizer_files(out / "tokenizer")
    total = reused + (time.perf_counter() - started)
    summary = {**asdict(report), "total_seconds": total, "colours": list(COLOURS)}
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    # Samples from the saved files, loaded as any model is: what ships is what gets looked at.
    from diffusers import StableDiffusionPipeline

    shipped = StableDiffusionPipeline.from_pretrained(str(out), torch_dtype=torch.float32)
    shipped.set_progress_bar_config(disable=True)
    sample_grid(shipped, out / "samples.png", steps=cfg.sample_steps)
    log(f"done in {total / 60:.1f} min: vae mse {report.vae_loss:.5f}, unet loss {report.unet_loss:.4f}")
    return report
