"""sdgate: Stable Diffusion behind an open HTTP API."""

__version__ = "0.1.0"
