"""Server-sent events of a job: ``queued``/``started``/``progress`` and the terminal one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

TERMINAL_EVENTS = frozenset({"succeeded", "failed", "canceled"})


@dataclass
class Event:
    """One server-sent event: its name and the job as JSON. An empty name is a keep-alive."""

    name: str
    data: dict[str, Any]

    def encode(self) -> bytes:
        if not self.name:
            return b": keep-alive\n\n"
        return f"event: {self.name}\ndata: {json.dumps(self.data, separators=(',', ':'))}\n\n".encode()
