"""The bare pipeline, called in this process: the baseline for overhead and the ceiling for throughput.

Loaded exactly as the server loads it (:func:`sdgate.engine.loader.load_model`, same directory,
same weights, float32 on the CPU) and called as the engine calls it: a list of prompts, one CPU
generator per image, ``torch.inference_mode``, PIL images out. No HTTP, no job, no encoding, no
storage: what is left is the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import Latencies
from bench.servers import MODEL


@dataclass(frozen=True)
class Shape:
    """The parameters every system gets in one measurement."""

    width: int
    height: int
    steps: int = 4
    guidance_scale: float = 7.5
    prompt: str = "a lighthouse on a cliff at dusk"

    def body(self, i: int) -> dict[str, Any]:
        """JSON body of request ``i``: the same for every server, with its own seed."""
        return {
            "prompt": self.prompt,
            "width": self.width,
            "height": self.height,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "seed": 1000 + i,
        }

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"


class BarePipeline:
    """The tiny pipeline in process."""

    def __init__(self, models_dir: Path):
        import torch

        from sdgate.engine.loader import load_model

        self._torch = torch
        self.pipe = load_model(MODEL, device="cpu", dtype="float32", models_dir=models_dir).pipeline
        self.threads = torch.get_num_threads()

    def generate(self, shape: Shape, seeds: list[int]) -> list[Any]:
        """One pipeline call with one image per seed."""
        torch = self._torch
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        with torch.inference_mode():
            out = self.pipe(
                prompt=[shape.prompt] * len(seeds),
                negative_prompt=[""] * len(seeds),
                width=shape.width,
                height=shape.height,
                num_inference_steps=shape.steps,
                guidance_scale=shape.guidance_scale,
                generator=generators,
                output_type="pil",
            )
        images: list[Any] = list(out.images)
        return images

    def latencies(self, shape: Shape, n: int, batch: int = 1, start: int = 0) -> Latencies:
        """Seconds per call of ``n`` calls of ``batch`` images each."""
        out = Latencies()
        for i in range(n):
            seeds = [1000 + start + i * batch + j for j in range(batch)]
            t0 = time.perf_counter()
            self.generate(shape, seeds)
            out.values.append(time.perf_counter() - t0)
        return out

    def for_duration(self, shape: Shape, seconds: float, batch: int) -> Latencies:
        """Back-to-back calls of ``batch`` images for at least ``seconds`` (at least one call)."""
        out = Latencies()
        stop = time.perf_counter() + seconds
        i = 0
        while not out.values or time.perf_counter() < stop:
            out.extend(self.latencies(shape, 1, batch, start=i * batch))
            i += 1
        return out
