"""Schedulers by name, built once per pipeline from its own scheduler config."""

from __future__ import annotations

from typing import Any

from sdgate.schemas import SCHEDULER_NAMES

_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
assert set(_CLASSES) == set(SCHEDULER_NAMES)


class SchedulerCache:
    """One scheduler instance per name for the engine's pipeline; never re-created per request."""

    def __init__(self, pipeline: Any):
        self._base_config = pipeline.scheduler.config
        self._default = pipeline.scheduler
        self._cache: dict[str, Any] = {}

    def get(self, name: str | None) -> Any:
        if name is None:
            return self._default
        if name not in self._cache:
            import diffusers

            class_name, overrides = _CLASSES[name]
            cls = getattr(diffusers, class_name)
            self._cache[name] = cls.from_config(self._base_config, **overrides)
        return self._cache[name]
