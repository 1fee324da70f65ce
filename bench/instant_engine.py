"""``sdgate serve`` whose engine runs a pipeline that returns at once: what is left is sdgate's own work.

Everything but the model is the real server: HTTP, validation, the job record, the engine's thread,
queue and batching, encoding, storage, the answer. The pipeline returns flat images of the asked size
(after ``SDGATE_INSTANT_MS`` milliseconds of sleep, 0 by default), so under load the server's CPU per
request is its overhead alone, with far less noise than beside a real model. Used by
:mod:`bench.overhead_only`; it takes every ``SDGATE_*`` setting as ``sdgate serve`` does.

    python -m bench.instant_engine serve [sdgate serve's options]
"""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace
from typing import Any


class InstantPipelines:
    """Stands in for :class:`sdgate.engine.pipelines.Pipelines`: one flat image per prompt."""

    def __init__(self, sleep_s: float):
        self.sleep_s = sleep_s

    def run(self, mode: Any, *, prompts: list[str], width: int, height: int, **_: Any) -> list[Any]:
        from PIL import Image

        if self.sleep_s:
            time.sleep(self.sleep_s)
        return [Image.new("RGB", (width, height), (40 * i % 256, 120, 60)) for i in range(len(prompts))]


def main() -> None:
    from sdgate.cli import main as sdgate_main
    from sdgate.config import ModelEntry
    from sdgate.engine.models import Resident
    from sdgate.engine.runner import Engine

    sleep_s = float(os.environ.get("SDGATE_INSTANT_MS", "0")) / 1000

    def load_entry(engine: Engine, entry: ModelEntry) -> Resident:
        # The model's own defaults, read from its configs as for any offered model; no weights loaded.
        loaded = SimpleNamespace(defaults=engine._peek(entry), device="cpu", pipeline=None)
        schedulers = SimpleNamespace(get=lambda _name: None)
        return Resident(entry, loaded, InstantPipelines(sleep_s), schedulers, shapes={}, adapters=None)

    Engine._load_entry = load_entry  # type: ignore[method-assign,assignment]
    os.environ.setdefault("SDGATE_WARMUP", "false")  # nothing to warm up
    sys.argv = ["sdgate", *sys.argv[1:]]  # sdgate's own command line: serve and its options
    sdgate_main()


if __name__ == "__main__":
    main()
