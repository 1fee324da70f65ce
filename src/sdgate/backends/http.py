"""Backend ``http``: generations run on another sdgate, or any JumpStart-compatible server, over HTTP.

``SDGATE_BACKEND_URL`` is the server's base URL; sdgate POSTs to its ``/invocations`` (the SageMaker
container route). The backend is ready once the server's ``/ping`` answers 200, so a gateway started
before its endpoint holds requests until the model there is loaded. When the server is an sdgate,
its ``/v1/models`` supplies the model name and its defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx

from sdgate.backends import BackendState
from sdgate.backends.remote import EndpointRefused, RemoteBackend
from sdgate.config import Settings
from sdgate.errors import BackendError
from sdgate.jumpstart import JSON
from sdgate.schemas import ModelDefaults

log = logging.getLogger("sdgate.backends")

_PROBE_INTERVAL_S = 0.5


class HttpBackend(RemoteBackend):
    """A JumpStart-compatible server at ``SDGATE_BACKEND_URL``."""

    name = "http"

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(settings)
        assert settings.backend_url, "Settings checks that backend http names a URL"
        self.base_url = settings.backend_url
        self.model_name = self.base_url
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.backend_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=max(10, settings.max_concurrency * settings.max_images)),
            transport=transport,
        )
        self._ready = False
        self._detail = f"waiting for {self.base_url}/ping"
        self._probe: asyncio.Task[None] | None = None

    @property
    def where(self) -> str:
        return self.base_url

    async def start(self) -> None:
        self._probe = asyncio.create_task(self._wait_for_endpoint())

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self._client.aclose()

    def state(self) -> BackendState:
        return BackendState.ready if self._ready else BackendState.loading

    def status_detail(self) -> str:
        return self._detail

    async def _wait_for_endpoint(self) -> None:
        """Poll ``/ping`` until the endpoint's model is loaded, then read its model card if it has one."""
        while True:
            try:
                resp = await self._client.get(f"{self.base_url}/ping", timeout=5.0)
                if resp.status_code == 200:
                    break
                self._detail = f"{self.base_url}/ping answers {resp.status_code}; waiting"
            except httpx.HTTPError as e:
                self._detail = f"waiting for {self.base_url}/ping: {type(e).__name__}: {e}"
            await asyncio.sleep(_PROBE_INTERVAL_S)
        await self._read_model_card()
        self._ready = True
        self._detail = f"calling {self.base_url}/invocations (model {self.model_name})"
        log.info("backend http: %s", self._detail)

    async def _read_model_card(self) -> None:
        try:
            resp = await self._client.get(f"{self.base_url}/v1/models", timeout=5.0)
            card: dict[str, Any] = resp.json()["data"][0]
            self._defaults = ModelDefaults(
                width=int(card["default_width"]),
                height=int(card["default_height"]),
                num_inference_steps=int(card["default_steps"]),
                guidance_scale=float(card["default_guidance_scale"]),
            )
            self.model_name = str(card["id"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            # Not an sdgate (or an older one): JumpStart's defaults, and the URL as the model's name.
            log.info("%s has no sdgate model card; using JumpStart defaults", self.base_url)

    async def _call(self, body: bytes, accept: str) -> bytes:
        try:
            resp = await self._client.post(
                f"{self.base_url}/invocations", content=body, headers={"Content-Type": JSON, "Accept": accept}
            )
        except httpx.TimeoutException:
            raise BackendError(
                f"{self.base_url} did not answer within {self.settings.backend_timeout_s:g}s (SDGATE_BACKEND_TIMEOUT_S)"
            ) from None
        except httpx.HTTPError as e:
            raise BackendError(f"could not reach {self.base_url}: {type(e).__name__}: {e}") from None
        if resp.status_code != 200:
            raise EndpointRefused(resp.status_code, _error_message(resp))
        return resp.content


def _error_message(resp: httpx.Response) -> str:
    """The message of an sdgate/SageMaker-shaped error body, or the start of whatever came."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200] or resp.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("Message", "message"):
            if body.get(key):
                return str(body[key])
    return str(body)[:200]
