"""Backend ``sagemaker``: generations run on a SageMaker endpoint, called with boto3's ``invoke_endpoint``.

This is the original design's Lambda logic. Configuration is AWS's own: region and credentials
from the standard chain (environment, profile, instance role; ``SDGATE_SAGEMAKER_REGION`` wins
over it), and the runtime URL from ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``, which boto3 honours
(point it at an sdgate endpoint to run the whole design on one machine).

Readiness: there is no cheap call that proves an endpoint is InService without the control-plane
API (other permissions, another URL), so the backend is ready once its client is configured; a
missing or failing endpoint shows up as a clear 502 on the first request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from sdgate.backends import BackendState
from sdgate.backends.remote import EndpointRefused, RemoteBackend
from sdgate.config import Settings
from sdgate.errors import BackendError
from sdgate.jumpstart import JSON

if TYPE_CHECKING:
    from mypy_boto3_sagemaker_runtime import SageMakerRuntimeClient

log = logging.getLogger("sdgate.backends")


class SageMakerBackend(RemoteBackend):
    """A SageMaker (JumpStart-compatible) endpoint."""

    name = "sagemaker"

    def __init__(self, settings: Settings, client: SageMakerRuntimeClient | None = None):
        super().__init__(settings)
        assert settings.sagemaker_endpoint, "Settings checks that backend sagemaker names an endpoint"
        self.endpoint = settings.sagemaker_endpoint
        self.model_name = f"sagemaker:{self.endpoint}"
        self._client = client
        self._failure: str | None = None

    @property
    def where(self) -> str:
        url = self._client.meta.endpoint_url if self._client is not None else "?"
        return f"SageMaker endpoint {self.endpoint!r} ({url})"

    async def start(self) -> None:
        if self._client is not None:
            return
        try:
            self._client = await asyncio.to_thread(self._make_client)
        except Exception as e:  # botocore raises NoRegionError, ProfileNotFound, ... for bad configuration
            self._failure = f"failed to configure the SageMaker client: {e}"
            if "region" in str(e).lower():
                self._failure += " (set AWS_REGION or SDGATE_SAGEMAKER_REGION)"
            log.error("%s", self._failure)
            return
        log.info("backend sagemaker: %s", self.where)

    def _make_client(self) -> SageMakerRuntimeClient:
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=10,
            read_timeout=self.settings.backend_timeout_s,
            # One attempt: a retried invocation is a second generation to pay for; a throttled one
            # becomes a 429 with Retry-After, and the client decides.
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max(10, self.settings.max_concurrency * self.settings.max_images),
        )
        return boto3.client("sagemaker-runtime", region_name=self.settings.sagemaker_region, config=config)

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def state(self) -> BackendState:
        if self._failure:
            return BackendState.failed
        return BackendState.loading if self._client is None else BackendState.ready

    def status_detail(self) -> str:
        if self._failure:
            return self._failure
        if self._client is None:
            return "configuring the SageMaker client"
        return f"calling {self.where}"

    async def _call(self, body: bytes, accept: str) -> bytes:
        # boto3 is synchronous: each call waits in a worker thread, the event loop goes on.
        return await asyncio.to_thread(self._invoke, body, accept)

    def _invoke(self, body: bytes, accept: str) -> bytes:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            ReadTimeoutError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        assert self._client is not None
        try:
            response = self._client.invoke_endpoint(
                EndpointName=self.endpoint, ContentType=JSON, Accept=accept, Body=body
            )
            data: bytes = response["Body"].read()
            return data
        except ClientError as e:
            raise _refused(e.response) from None
        except NoCredentialsError:
            raise BackendError(
                "no AWS credentials found for the SageMaker call; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or run with an instance role"
            ) from None
        except ReadTimeoutError:
            raise BackendError(
                f"{self.where} did not answer within {self.settings.backend_timeout_s:g}s (SDGATE_BACKEND_TIMEOUT_S)"
            ) from None
        except BotoConnectionError as e:
            raise BackendError(f"could not reach {self.where}: {e}") from None
        except BotoCoreError as e:
            raise BackendError(f"the call to {self.where} failed: {e}") from None


def _refused(response: Any) -> EndpointRefused:
    """A botocore error response as the endpoint's refusal, with the status the model gave when it says."""
    error = response.get("Error", {})
    code = str(error.get("Code", ""))
    message = str(error.get("Message", "")) or code
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500))
    if code == "ModelError":
        # The container's own status (e.g. 400 for a body it refused) says more than SageMaker's 424.
        original = response.get("OriginalStatusCode")
        status = int(original) if isinstance(original, int) and original >= 400 else 424
        message = str(response.get("OriginalMessage") or message)
    elif code in ("ThrottlingException", "TooManyRequestsException"):
        status = 429
    elif code in ("ServiceUnavailable", "ModelNotReadyException"):
        status = 503
    text = f"{code}: {message}" if code and not code.isdigit() else message
    # Only a ModelError carries the container's own answer; every other error is SageMaker's.
    return EndpointRefused(status, text, by_model=code == "ModelError")
