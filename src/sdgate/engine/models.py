"""The models a server offers, and which of them are in memory: at most ``SDGATE_MAX_LOADED_MODELS``.

A model is loaded when a batch needs it and kept; when the pool is full, the least recently used one
is unloaded first, and its memory is given back (the pipeline's last references dropped, the garbage
collector run, CUDA's cache emptied). Everything here runs on the engine thread, the only one that
touches pipelines; other threads read names, defaults and whether a model is loaded.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdgate.config import ModelEntry
from sdgate.schemas import ModelDefaults

log = logging.getLogger("sdgate.engine")


@dataclass
class Resident:
    """A model in memory: its loaded pipeline, the pipelines made from it, its schedulers, its LoRAs."""

    entry: ModelEntry
    loaded: Any  # sdgate.engine.loader.LoadedModel
    pipes: Any  # sdgate.engine.pipelines.Pipelines
    schedulers: Any  # sdgate.engine.schedulers.SchedulerCache
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Its layers' sizes, read before any adapter wrapped them (what LoRAs are checked against)."""
    adapters: Any = None  # sdgate.engine.loras.Adapters: the LoRAs loaded into it
    previewer: Any = None  # sdgate.engine.previews.LatentPreviewer, fitted when a preview is first wanted
    prompts: Any = None  # sdgate.engine.prompts.PromptEmbeddings: its recent prompts' text embeddings

    @property
    def defaults(self) -> ModelDefaults:
        defaults: ModelDefaults = self.loaded.defaults
        return defaults


def default_max_loaded(device: str) -> int:
    """One pipeline on a GPU (a second SDXL does not fit most cards), two on a CPU (RAM is larger)."""
    return 2 if device == "cpu" else 1


class ModelPool:
    """The offered models by name, the resident ones in least-recently-used order."""

    def __init__(
        self,
        entries: list[ModelEntry],
        load: Callable[[ModelEntry], Any],
        peek: Callable[[ModelEntry], ModelDefaults],
        max_loaded: int | None = None,
    ):
        self.entries = {e.name: e for e in entries}
        self.default = entries[0].name
        self._load = load
        self._peek = peek
        self.max_loaded = max_loaded
        self._resident: collections.OrderedDict[str, Resident] = collections.OrderedDict()
        self._peeked: dict[str, ModelDefaults] = {}
        self._lock = threading.Lock()  # guards the dicts for readers on other threads
        self.loads = 0
        self.unloads = 0

    def names(self) -> list[str]:
        return list(self.entries)

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._resident

    def get_resident(self, name: str) -> Resident:
        """A resident model as it is (no load, no reordering); KeyError if it is not in memory."""
        with self._lock:
            return self._resident[name]

    def defaults(self, name: str) -> ModelDefaults:
        """The model's defaults: its own once loaded, else read from its configs (without its weights)."""
        with self._lock:
            resident = self._resident.get(name)
            if resident is not None:
                return resident.defaults
            known = self._peeked.get(name)
        if known is None:
            known = self._peek(self.entries[name])
            with self._lock:
                self._peeked[name] = known
        return known

    def get(self, name: str) -> Resident:
        """The model in memory, loaded now if it is not (the least recently used one unloaded first).

        A load that fails raises, and leaves nothing behind: the next request for the model tries again.
        A name this server does not offer (a job recovered from a run with other SDGATE_MODELS) raises
        ``LookupError`` saying so, and unloads nothing.
        """
        if name not in self.entries:
            raise LookupError(f"this server does not offer model {name!r}; it offers {', '.join(self.entries)}")
        with self._lock:
            present = self._resident.get(name)
            if present is not None:
                self._resident.move_to_end(name)
                return present
        limit = self.max_loaded or 1
        while len(self._resident) >= limit:
            self.unload(next(iter(self._resident)))
        resident: Resident = self._load(self.entries[name])
        with self._lock:
            self._resident[name] = resident
            self.loads += 1
        return resident

    def unload(self, name: str) -> None:
        """Drop a resident model and give its memory back."""
        with self._lock:
            resident = self._resident.pop(name, None)
        if resident is None:
            return
        device = str(getattr(resident.loaded, "device", "cpu"))
        del resident
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        _trim_heap()
        self.unloads += 1
        log.info("unloaded model %s", name)


def _trim_heap() -> None:
    """Hand freed heap pages back to the system (glibc keeps them otherwise: the RSS would stay high)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): no such call
        ctypes.CDLL("libc.so.6").malloc_trim(0)
