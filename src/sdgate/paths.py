"""Every file and folder under the data dir (``SDGATE_DATA_DIR``), defined once.

One variable relocates all state, which keeps tests hermetic and lets the CLI, the server and a
container agree on where things are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataPaths:
    """The layout of one data directory."""

    root: Path

    @property
    def jobs_db(self) -> Path:
        """Job records (the SQLite job store)."""
        return self.root / "jobs.sqlite3"

    @property
    def keys_db(self) -> Path:
        """API keys and their daily usage."""
        return self.root / "keys.sqlite3"

    @property
    def images(self) -> Path:
        """Stored images of the local storage, served at ``/images/``."""
        return self.root / "images"

    @property
    def models(self) -> Path:
        """Built-in and downloaded models."""
        return self.root / "models"

    @property
    def loras(self) -> Path:
        """LoRA adapters (unless SDGATE_LORA_DIR names another directory)."""
        return self.root / "loras"

    @property
    def compile_cache(self) -> Path:
        """What ``torch.compile`` made (``SDGATE_COMPILE=1``), kept so that a restart does not compile again."""
        return self.root / "cache" / "torch"
