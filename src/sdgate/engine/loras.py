"""LoRA adapters from ``SDGATE_LORA_DIR``: which there are, which models each fits, and running a batch with them.

- **Offered.** Each ``*.safetensors`` file of the directory is a LoRA named by its file stem. The
  directory is listed on every look, so a file copied in is offered without a restart; each file is
  read once per version (its size and modification time).
- **Fit.** diffusers reads the file (its own format, PEFT's or kohya's, converted as it reads), and a
  LoRA fits a model when every module it changes exists in that model with the input and output sizes
  it expects. A loaded model is checked against its own modules; one not loaded, against an empty copy
  built from its configs on torch's meta device (no weights are read, no memory is taken).
- **Running.** An adapter is loaded into a model once and kept, under a name of its own (a file stem
  may hold characters that torch's module names cannot). A batch turns on its set with their weights;
  the engine turns every adapter off after the call. Off, PEFT's layers run only their base layer,
  so a request without LoRAs gets the bytes it would have got before any LoRA was loaded.

Reading a file and building a skeleton take torch: callers off the engine thread do it in a worker
thread, never on the event loop.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdgate.schemas import LoraWeight

log = logging.getLogger("sdgate.engine")

Shapes = dict[str, tuple[int, int]]
"""Module path (``unet.down_blocks.0....to_q``) → (input size, output size)."""

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
"""The pipeline modules a LoRA may change."""

_A, _B = ".lora_A.weight", ".lora_B.weight"


class LoraError(Exception):
    """A LoRA cannot run where it was asked to; the message names it and says why."""


@dataclass(frozen=True)
class LoraFile:
    """One LoRA file as listed now."""

    name: str
    path: Path
    stamp: tuple[int, int]  # size and modification time: a changed file is read again

    @property
    def adapter(self) -> str:
        """The name it is loaded under in a pipeline: safe for torch, new when the file changes."""
        digest = hashlib.sha1(f"{self.name}\0{self.stamp}".encode()).hexdigest()[:16]
        return f"sdgate_{digest}"


class LoraLibrary:
    """The LoRAs of one directory, and what each one changes (read once per file version)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._lock = threading.Lock()
        self._read: dict[Path, tuple[tuple[int, int], Shapes | str]] = {}

    def files(self) -> dict[str, LoraFile]:
        """The LoRAs there now, by name (none if the directory does not exist)."""
        try:
            paths = sorted(self.directory.glob("*.safetensors"))
        except OSError:
            return {}
        found: dict[str, LoraFile] = {}
        for path in paths:
            try:
                st = path.stat()
            except OSError:  # removed while listing
                continue
            if path.is_file():
                found[path.stem] = LoraFile(path.stem, path, (st.st_size, st.st_mtime_ns))
        return found

    def targets(self, lora: LoraFile) -> Shapes:
        """The modules ``lora`` changes, with the sizes it expects. Raises :class:`LoraError` if unreadable."""
        with self._lock:
            known = self._read.get(lora.path)
        if known is None or known[0] != lora.stamp:
            try:
                value: Shapes | str = read_targets(lora.path)
            except Exception as e:  # diffusers raises ValueError, KeyError, OSError, ... for bad files
                # Without the server's paths: the message goes to clients.
                text = str(e).replace(str(lora.path), lora.path.name).replace(str(self.directory), "")
                value = f"{type(e).__name__}: {' '.join(text.split()).rstrip(' .')}"
                log.warning("LoRA %s cannot be read: %s", lora.name, value)
            known = (lora.stamp, value)
            with self._lock:
                self._read[lora.path] = known
        if isinstance(known[1], str):
            raise LoraError(f"LoRA {lora.name!r} cannot be read as a LoRA ({known[1]})")
        return known[1]


def read_targets(path: Path) -> Shapes:
    """What a LoRA file changes: module path → (input, output) size, whatever format it is saved in."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    state, _alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in COMPONENTS or not rest:
            raise ValueError(f"it changes {key!r}, which is not part of a Stable Diffusion pipeline")
        groups.setdefault(prefix, {})[rest] = tensor
    shapes: Shapes = {}
    for prefix, group in groups.items():
        # The same conversions diffusers applies when it loads: older diffusers names become PEFT's.
        peft = (
            convert_unet_state_dict_to_peft(group)
            if prefix == "unet"
            else convert_state_dict_to_peft(convert_state_dict_to_diffusers(group))
        )
        for key, tensor in peft.items():
            if key.endswith(_A):
                module = f"{prefix}.{key.removesuffix(_A)}"
                shapes[module] = (int(tensor.shape[1]), shapes.get(module, (0, 0))[1])
            elif key.endswith(_B):
                module = f"{prefix}.{key.removesuffix(_B)}"
                shapes[module] = (shapes.get(module, (0, 0))[0], int(tensor.shape[0]))
    if not shapes:
        raise ValueError("it holds no LoRA weights (lora_A/lora_B or lora_down/lora_up pairs)")
    return shapes


def module_shapes(modules: dict[str, Any]) -> Shapes:
    """The input and output sizes of every linear and convolution layer of a pipeline's components."""
    from torch import nn

    shapes: Shapes = {}
    for prefix, module in modules.items():
        module = getattr(module, "_orig_mod", module)  # a compiled UNet: the module it wraps
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear):
                shapes[f"{prefix}.{name}"] = (sub.in_features, sub.out_features)
            elif isinstance(sub, nn.modules.conv._ConvNd):
                shapes[f"{prefix}.{name}"] = (sub.in_channels, sub.out_channels)
    return shapes


def pipeline_shapes(pipe: Any) -> Shapes:
    """:func:`module_shapes` of a loaded pipeline (before any adapter wraps its layers)."""
    return module_shapes({c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None})


def skeleton_shapes(directory: Path) -> Shapes:
    """:func:`module_shapes` of a diffusers directory, from its configs alone (modules on the meta device)."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    modules: dict[str, Any] = {}
    with init_empty_weights():
        modules["unet"] = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(directory / "unet"))
        for name in COMPONENTS[1:]:
            if (directory / name / "config.json").is_file():
                config = transformers.AutoConfig.from_pretrained(directory / name)
                cls = getattr(transformers, (config.architectures or ["CLIPTextModel"])[0])
                modules[name] = cls(config)
    return module_shapes(modules)


def misfit(name: str, targets: Shapes, shapes: Shapes) -> str | None:
    """Why LoRA ``name`` does not fit a model with ``shapes``; None when it does."""
    for module, want in targets.items():
        have = shapes.get(module)
        if have is None and module.startswith("text_encoder"):
            # CLIP's layers sit under ``text_model.`` in some transformers releases and not in others.
            component, _, rest = module.partition(".")
            other = rest.removeprefix("text_model.") if rest.startswith("text_model.") else f"text_model.{rest}"
            have = shapes.get(f"{component}.{other}")
        if have is None:
            return f"LoRA {name!r} changes {module}, which this model does not have"
        if have != want:
            return (
                f"LoRA {name!r} expects {module} to map {want[0]} to {want[1]} values; "
                f"this model's maps {have[0]} to {have[1]}"
            )
    return None


@dataclass
class Adapters:
    """The adapters loaded into one resident pipeline, at most ``max_loaded`` (engine thread only).

    Why a bound: every adapter loaded into a pipeline slows every call on it, with LoRAs or without
    (diffusers and PEFT walk each layer's adapters on each call): measured on the tiny pipeline,
    ``set_adapters`` took 2.5 ms with 1 adapter and 44 ms with 40. The least recently used one is
    deleted when a new one would pass the bound, and is loaded again if it is asked for again.
    """

    pipe: Any
    max_loaded: int = 8
    on: bool = False
    _lru: collections.OrderedDict[str, None] = field(default_factory=collections.OrderedDict)

    @property
    def loaded(self) -> set[str]:
        """The adapter names in the pipeline now."""
        return set(self._lru)

    def activate(self, loras: Iterable[tuple[LoraFile, float]]) -> None:
        """Load what is not loaded yet, then turn exactly these adapters on with their weights."""
        names, weights = [], []
        loras = list(loras)
        keep = {lora.adapter for lora, _ in loras}
        for lora, weight in loras:
            if lora.adapter in self._lru:
                self._lru.move_to_end(lora.adapter)
            else:
                self._make_room(keep)
                try:
                    with warnings.catch_warnings():  # PEFT warns of a model with several adapters: that is the aim
                        warnings.simplefilter("ignore", UserWarning)
                        self.pipe.load_lora_weights(str(lora.path), adapter_name=lora.adapter)
                except Exception as e:
                    self._forget(lora.adapter)
                    raise LoraError(f"LoRA {lora.name!r} could not be loaded: {type(e).__name__}: {e}") from e
                self._lru[lora.adapter] = None
                log.info("loaded LoRA %s", lora.name)
            names.append(lora.adapter)
            weights.append(weight)
        self.pipe.enable_lora()
        self.on = True
        self.pipe.set_adapters(names, adapter_weights=weights)

    def deactivate(self) -> None:
        """Turn every adapter off: the pipeline computes as if it had none."""
        if self.on:
            self.pipe.disable_lora()
            self.on = False

    def _make_room(self, keep: set[str]) -> None:
        """Delete least recently used adapters (never one of ``keep``) until one more fits."""
        while len(self._lru) >= self.max_loaded:
            victim = next((a for a in self._lru if a not in keep), None)
            if victim is None:  # a request with more LoRAs than the bound: it still runs
                return
            del self._lru[victim]
            self._forget(victim)
            log.info("unloaded LoRA adapter %s (SDGATE_MAX_LOADED_LORAS)", victim)

    def _forget(self, adapter: str) -> None:
        """Remove an adapter from the pipeline (one evicted, or what a failed load may have left)."""
        try:
            self.pipe.delete_adapters(adapter)
        except Exception:  # nothing was injected: nothing to remove
            log.debug("no adapter %s to remove", adapter, exc_info=True)


def resolve(library: LoraLibrary, loras: Iterable[LoraWeight]) -> list[tuple[LoraFile, float]]:
    """The files of a batch's LoRAs, as they are now. Raises :class:`LoraError` for one that is gone."""
    files = library.files()
    out = []
    for lora in loras:
        file = files.get(lora.name)
        if file is None:
            raise LoraError(f"LoRA {lora.name!r} is no longer in the LoRA directory")
        out.append((file, lora.weight))
    return out
