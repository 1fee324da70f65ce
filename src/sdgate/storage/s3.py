"""Images in an S3 bucket, or any S3-compatible store, served by a CDN or by presigned URLs.

Configuration is AWS's own: region and credentials from the standard chain, and the store's URL
from ``AWS_ENDPOINT_URL_S3`` for S3-compatible stores (MinIO, moto, R2, ...), which boto3 honours.

- Keys: ``SDGATE_S3_PREFIX`` + the same unguessable ``YYYY/MM/DD/<128 random bits>.<ext>`` keys as
  local storage (:func:`sdgate.storage.new_key`); two images never share one. Sidecars go under
  ``SDGATE_S3_PREFIX`` + ``private/`` (:func:`sdgate.storage.sidecar_key`), which the CDN must not serve
  (the AWS stack's bucket policy denies CloudFront that prefix).
- URLs: ``SDGATE_PUBLIC_BASE_URL`` + ``/`` + the object key when set (a CloudFront distribution
  whose origin is the bucket); otherwise a presigned GET URL valid for ``SDGATE_S3_PRESIGN_EXPIRY_S``.
- Writes: one ``PutObject`` per object, which S3 applies whole or not at all; jobs write the image
  before its sidecar, so a sidecar never describes a missing image.
- Startup check: ``HeadBucket``. A missing bucket or an unreachable store stops the server at
  start, loudly, rather than failing every request after the model spent time on it. Access
  denied to ``HeadBucket`` only warns: a least-privilege role may write objects without the
  ``s3:ListBucket`` permission that ``HeadBucket`` needs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sdgate.config import Settings
from sdgate.errors import StorageError
from sdgate.storage import StoredObject, is_public_key, is_valid_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger("sdgate.storage")


class S3Storage:
    """A bucket (``SDGATE_S3_BUCKET``) under a key prefix (``SDGATE_S3_PREFIX``)."""

    name = "s3"

    def __init__(self, settings: Settings, client: S3Client | None = None):
        assert settings.s3_bucket, "Settings checks that storage s3 names a bucket"
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix.strip("/") + "/" if settings.s3_prefix.strip("/") else ""
        self.public_base_url = settings.public_base_url
        self.presign_expiry_s = settings.s3_presign_expiry_s
        self.cache_control = settings.s3_cache_control
        self.client = client or _make_client(settings)

    def object_key(self, key: str) -> str:
        """The S3 key of a storage key: the prefix, then the key."""
        return self.prefix + key

    def url_for(self, key: str) -> str:
        """The CDN URL when a public base URL is set, else a presigned GET URL (made locally, no request)."""
        if self.public_base_url:
            return f"{self.public_base_url}/{self.object_key(key)}"
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.object_key(key)},
            ExpiresIn=self.presign_expiry_s,
        )
        return url

    def put(self, data: bytes, key: str, content_type: str, *, durable: bool = True) -> StoredObject:
        # S3 acknowledges a PUT once it is stored durably: there is no cheaper kind of write to ask for.
        from botocore.exceptions import BotoCoreError, ClientError

        if not is_valid_key(key):
            raise ValueError(f"invalid storage key {key!r}")
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self.object_key(key),
                Body=data,
                ContentType=content_type,
                # What is private (sidecars, input images) is never cached as public, whatever the setting.
                CacheControl=self.cache_control if is_public_key(key) else "private, no-store",
            )
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"could not store the image in S3 bucket {self.bucket!r}: {_describe(e)}") from e
        return StoredObject(key=key, url=self.url_for(key))

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        if not is_valid_key(key):
            raise ValueError(f"invalid storage key {key!r}")
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))["Body"].read()
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"could not read {key} from S3 bucket {self.bucket!r}: {_describe(e)}") from e
        return body

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        if not is_valid_key(key):
            raise ValueError(f"invalid storage key {key!r}")
        try:
            # DeleteObject of a missing key succeeds: nothing to special-case.
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"could not delete {key} from S3 bucket {self.bucket!r}: {_describe(e)}") from e

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 403:
                log.warning(
                    "cannot check S3 bucket %r (HeadBucket: access denied); going on, writes will tell",
                    self.bucket,
                )
                return
            # HEAD answers carry no body, hence no error code: the status says it.
            reason = "it does not exist (NoSuchBucket)" if status == 404 else _describe(e)
            raise StorageError(
                f"S3 bucket {self.bucket!r} is not usable: {reason} "
                "(check SDGATE_S3_BUCKET, AWS_ENDPOINT_URL_S3 and the AWS credentials)"
            ) from e
        except BotoCoreError as e:
            raise StorageError(
                f"cannot reach S3 for bucket {self.bucket!r}: {_describe(e)} "
                "(check AWS_ENDPOINT_URL_S3 and the network)"
            ) from e
        log.info("storage s3: bucket %r at %s, prefix %r", self.bucket, self.client.meta.endpoint_url, self.prefix)


def _make_client(settings: Settings) -> S3Client:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=5,
        read_timeout=30,
        # SigV4 presigned URLs: SigV2 (botocore's default for presigning) is refused by newer regions.
        signature_version="s3v4",
        retries={"total_max_attempts": 3, "mode": "standard"},
        # Parallel jobs store from worker threads; one pooled connection each.
        max_pool_connections=max(10, settings.max_concurrency * 2),
    )
    return boto3.client("s3", config=config)


def _describe(e: Exception) -> str:
    """A botocore error in one line: its code and message, without the traceback."""
    response: Any = getattr(e, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        code, message = error.get("Code", ""), error.get("Message", "")
        if code or message:
            return f"{code}: {message}".strip(": ")
    return f"{type(e).__name__}: {e}"
