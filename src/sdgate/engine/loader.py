"""Load any diffusers text-to-image pipeline: built-in name, hub id, local directory or single file."""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdgate.engine.builtin import BUILTIN_MODELS, ensure_builtin
from sdgate.engine.pipelines import OWN_CLASSES
from sdgate.schemas import ModelDefaults

log = logging.getLogger("sdgate.engine")

DEMO_STEPS = 20
DEMO_GUIDANCE = 5.0
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# A key that only SDXL checkpoints (in the original single-file layout) carry: the second text encoder.
_SDXL_KEY_PREFIX = "conditioner.embedders.1."


# Loading prints progress bars and advice users cannot act on; keep the server log readable.
for _var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
    os.environ.setdefault(_var, "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class ModelLoadError(Exception):
    """The model could not be loaded; the message says which and why."""


@dataclass
class LoadedModel:
    pipeline: Any
    name: str
    device: str
    dtype: Any
    defaults: ModelDefaults


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("device 'cuda' requested but no CUDA device is available")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise ModelLoadError("device 'mps' requested but MPS is not available")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(requested: str, device: str) -> Any:
    import torch

    if requested == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[requested]


def single_file_kind(path: Path) -> str:
    """'sdxl' or 'sd' for an original-layout checkpoint, decided by its keys."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    else:
        import torch

        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        keys = list(state.keys())
    return "sdxl" if any(k.startswith(_SDXL_KEY_PREFIX) for k in keys) else "sd"


def model_defaults(name: str, pipe: Any) -> ModelDefaults:
    """Native size from the UNet and VAE configs; turbo models run in few steps without guidance."""
    scale = int(getattr(pipe, "vae_scale_factor", 8))
    sample = getattr(pipe.unet.config, "sample_size", 64)
    return defaults_for(name, int(sample if isinstance(sample, int) else sample[0]) * scale)


def peek_defaults(spec: str, models_dir: Path) -> ModelDefaults:
    """A model's defaults from its configs, without loading its weights (for a model not loaded yet).

    A directory (or a built-in) says its native size in ``unet/config.json`` and ``vae/config.json``;
    a single file says SD or SDXL by its keys; a hub id, what its cached configs say, else 512.
    """
    path = Path(spec).expanduser()
    if spec == "demo" or spec == "tiny":
        from sdgate.engine.builtin import DEMO_DIR

        return defaults_for(spec, _native_side(DEMO_DIR) if spec == "demo" else 512)
    if path.is_dir():
        return defaults_for(spec, _native_side(path))
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        return defaults_for(spec, 1024 if single_file_kind(path) == "sdxl" else 512)
    return defaults_for(spec, _cached_hub_side(spec))


def model_directory(spec: str, models_dir: Path) -> Path | None:
    """The diffusers directory a spec loads from, if it is on disk now (nothing is built or downloaded).

    None for a single file, a built-in not built yet, or a hub id that is not cached.
    """
    path = Path(spec).expanduser()
    if spec in BUILTIN_MODELS:
        from sdgate.engine.builtin import DEMO_DIR, built_dir

        return DEMO_DIR if spec == "demo" else built_dir(spec, models_dir)
    if path.is_dir():
        return path
    if path.exists() or spec.startswith(("/", "./", "../", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(spec, "model_index.json")
    except Exception:  # no hub library, an id it refuses
        return None
    return Path(index).parent if isinstance(index, str) else None


def text2image_class(directory: Path | None, name: str | None = None) -> Any:
    """The pipeline class that loads ``directory`` (the one its model_index.json names), or the class ``name``.

    Stable Diffusion and SDXL come as their own classes; anything else, or a directory that does not say,
    as diffusers' ``AutoPipelineForText2Image`` (which maps an image-to-image pipeline's saved name to its
    text-to-image one, too).
    """
    import diffusers

    if name is None and directory is not None:
        try:
            name = json.loads((directory / "model_index.json").read_text()).get("_class_name")
        except (OSError, ValueError):
            name = None
    # The families whose image-to-image and inpainting classes the engine knows too. AutoPipelineForText2Image
    # would load them the same, but importing it imports every pipeline diffusers has (ControlNets, Kandinsky,
    # ...): 1.7 s of a 5.6 s start on this machine.
    if name in OWN_CLASSES:
        return getattr(diffusers, name)
    from diffusers import AutoPipelineForText2Image

    return AutoPipelineForText2Image


def _native_side(directory: Path) -> int:
    try:
        unet = json.loads((directory / "unet" / "config.json").read_text())
        vae = json.loads((directory / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return 512
    sample = unet.get("sample_size", 64)
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    side: int = int(sample if isinstance(sample, int) else sample[0]) * scale
    return side


def _cached_hub_side(repo_id: str) -> int:
    try:
        from huggingface_hub import try_to_load_from_cache

        unet = try_to_load_from_cache(repo_id, "unet/config.json")
        if isinstance(unet, str):
            return _native_side(Path(unet).parent.parent)
    except Exception:  # no hub library, an id it refuses: the common default
        pass
    return 512


def defaults_for(name: str, side: int) -> ModelDefaults:
    """The defaults of model ``name`` with native size ``side``."""
    if name == "demo":
        # Trained at 64x64; 20 Euler steps converge and guidance 5 keeps colours clean (see its model card).
        # One thread: its operations are too small to share; on two busy cores two threads took 20 s an image
        # (spinning OpenMP threads take the CPU from the work), one thread 0.7 s.
        return ModelDefaults(
            width=side, height=side, num_inference_steps=DEMO_STEPS, guidance_scale=DEMO_GUIDANCE, torch_threads=1
        )
    if name in BUILTIN_MODELS:
        return ModelDefaults(width=side, height=side, num_inference_steps=4, guidance_scale=7.5)
    if "turbo" in name.lower():
        return ModelDefaults(width=side, height=side, num_inference_steps=4, guidance_scale=0.0)
    return ModelDefaults(width=side, height=side, num_inference_steps=30, guidance_scale=7.5)


def check_spec(spec: str) -> Path:
    """The path ``spec`` names; a ``ModelLoadError`` at once for a missing path or a file of the wrong suffix.

    Needs no torch or diffusers, so a mistyped path is an error before seconds of imports. A built-in
    name is the built-in even where a file of that name lies in the working directory.
    """
    path = Path(spec).expanduser()
    if spec not in BUILTIN_MODELS:
        if (spec.startswith(("/", "./", "../", "~")) or spec.endswith(SINGLE_FILE_SUFFIXES)) and not path.exists():
            raise ModelLoadError(f"model path {spec} does not exist")
        if path.is_file() and path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"{spec}: a single-file checkpoint must end in .safetensors or .ckpt")
    return path


# torch's compile caches: Inductor's (FX graphs, AOTAutograd, kernels) and Triton's (GPU kernels).
COMPILE_CACHE_ENV = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def keep_compiled(cache: Path) -> dict[str, str]:
    """Point torch's compile caches into ``cache`` (under the data directory); returns where each went.

    By default they go to ``/tmp/torchinductor_<user>``: gone with a new container or a reboot, after
    which ``SDGATE_COMPILE=1`` compiles again for minutes. The data directory is what a deployment
    keeps. A cache directory the operator chose in the environment is left as it is. Process-wide, as
    torch reads these variables when it compiles; set before the first compilation.
    """
    chosen = {}
    for variable, name in COMPILE_CACHE_ENV.items():
        if os.environ.get(variable) in (None, _torch_default(variable)):
            (cache / name).mkdir(parents=True, exist_ok=True)
            os.environ[variable] = str(cache / name)
        chosen[variable] = os.environ[variable]
    return chosen


def _torch_default(variable: str) -> str | None:
    """The value torch puts in ``variable`` itself: importing it sets Inductor's to its /tmp default."""
    if variable != "TORCHINDUCTOR_CACHE_DIR":
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch: any value counts as the operator's
        return None
    default: str = os.path.abspath(default_cache_dir())
    return default


def load_model(
    spec: str,
    *,
    device: str,
    dtype: str,
    models_dir: Path,
    single_file_config: str | None = None,
    channels_last: bool = False,
    compile_unet: bool = False,
    compile_cache: Path | None = None,
) -> LoadedModel:
    """Steps: check the spec → choose device/dtype → load → move → configure.

    ``channels_last`` and ``compile_unet`` are the speed-ups measured in docs/benchmarks.md; both are
    off by default because neither helps everywhere (compiling takes a minute or more at start).
    ``compile_cache``: where the compiled UNet's caches go (see :func:`keep_compiled`).
    """
    # 1. what the spec names, checked before torch and diffusers are imported (seconds)
    path = check_spec(spec)

    import torch  # (fail early and clearly if the engine extra is missing)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()

    # 2. device and dtype
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype}

    # 3. load
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if spec in BUILTIN_MODELS:
                directory = ensure_builtin(spec, models_dir)
                pipe = text2image_class(directory).from_pretrained(str(directory), **kwargs)
            elif path.is_file():
                name = "StableDiffusionXLPipeline" if single_file_kind(path) == "sdxl" else "StableDiffusionPipeline"
                if single_file_config:
                    kwargs["config"] = single_file_config
                pipe = text2image_class(None, name).from_single_file(str(path), **kwargs)
            else:  # a directory, or a hub id (its cached directory, when there is one, names the class)
                source = str(path) if path.is_dir() else spec
                pipe = text2image_class(model_directory(spec, models_dir)).from_pretrained(source, **kwargs)
    except ModelLoadError:
        raise
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError, ... for bad models
        raise ModelLoadError(f"could not load model {spec!r}: {type(e).__name__}: {e}") from e

    # 4. move and configure
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile_unet:
        if compile_cache is not None:
            keep_compiled(compile_cache)
        # Compiled lazily: the engine's warm-up pays for the first shape; a new batch size or image
        # size recompiles once, after which shapes are treated as dynamic.
        pipe.unet = torch.compile(pipe.unet)
    log.info("loaded model %s (%s) on %s as %s", spec, type(pipe).__name__, dev, torch_dtype)
    return LoadedModel(pipeline=pipe, name=spec, device=dev, dtype=torch_dtype, defaults=model_defaults(spec, pipe))
