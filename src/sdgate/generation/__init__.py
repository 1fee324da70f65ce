"""The one generation path every surface calls: resolve → charge → submit → wait | stream | 202."""

from __future__ import annotations

from sdgate.generation.request import effective_defaults, read_inputs, resolve_request
from sdgate.generation.service import Caller, Generation, GenerationService

__all__ = ["Caller", "Generation", "GenerationService", "effective_defaults", "read_inputs", "resolve_request"]
