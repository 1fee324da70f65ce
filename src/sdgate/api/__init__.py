"""The HTTP surfaces: ``create_app(settings)`` and one router per API."""

from sdgate.api.app import create_app

__all__ = ["create_app"]
