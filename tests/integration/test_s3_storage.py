"""S3Storage against a real S3-protocol server (moto on a loopback port), over HTTP with real boto3."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.stub import Stubber

from sdgate.config import Settings
from sdgate.errors import StorageError
from sdgate.generation import resolve_request
from sdgate.jobs import JobRunner
from sdgate.jobstore import SqliteJobStore
from sdgate.schemas import GenerationRequest, Surface
from sdgate.storage import StoredObject, create_storage, input_key, is_public_key, is_valid_key, new_key, sidecar_key
from sdgate.storage.s3 import S3Storage
from tests.aws_fixtures import FAKE_CREDENTIALS, REGION
from tests.fakes import FakeBackend
from tests.server import free_port

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

JPEG = b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9"


def client_for(url: str, **config: Any) -> S3Client:
    client: S3Client = boto3.client(
        "s3",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        config=Config(signature_version="s3v4", **config),
    )
    return client


def storage_for(s3_server: str, bucket: str, **settings: object) -> S3Storage:
    s = Settings(storage="s3", s3_bucket=bucket, **settings)  # type: ignore[arg-type]
    return S3Storage(s, client=client_for(s3_server))


def test_put_stores_the_bytes_with_type_and_cache_headers(s3_server: str, s3: S3Client, bucket: str) -> None:
    storage = storage_for(s3_server, bucket, s3_prefix="images/")
    key = new_key("jpeg")
    stored = storage.put(JPEG, key, "image/jpeg")

    assert stored.key == key
    obj = s3.get_object(Bucket=bucket, Key=f"images/{key}")
    assert obj["Body"].read() == JPEG
    assert obj["ContentType"] == "image/jpeg"
    assert obj["CacheControl"] == "public, max-age=31536000, immutable"


def test_presigned_url_serves_the_object_and_expires_as_configured(s3_server: str, bucket: str) -> None:
    storage = storage_for(s3_server, bucket, s3_presign_expiry_s=120)
    key = new_key("jpeg")
    url = storage.put(JPEG, key, "image/jpeg").url

    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == ["120"]
    got = httpx.get(url, timeout=10)
    assert got.status_code == 200
    assert got.content == JPEG
    assert got.headers["content-type"] == "image/jpeg"


def test_public_base_url_makes_cdn_urls_of_the_object_key(s3_server: str, bucket: str) -> None:
    storage = storage_for(s3_server, bucket, s3_prefix="a/b", public_base_url="https://cdn.example.com/")
    key = new_key("jpeg")
    assert storage.put(JPEG, key, "image/jpeg").url == f"https://cdn.example.com/a/b/{key}"


def test_keys_are_sdgates_own(s3_server: str, bucket: str) -> None:
    storage = storage_for(s3_server, bucket)
    for bad in ("../etc/passwd", "2026/01/01/x.jpeg", "/abs.jpeg", ""):
        with pytest.raises(ValueError, match="invalid storage key"):
            storage.put(JPEG, bad, "image/jpeg")
    keys = {new_key("jpeg") for _ in range(1000)}
    assert len(keys) == 1000 and all(is_valid_key(k) for k in keys)


def test_delete_removes_and_ignores_missing(s3_server: str, s3: S3Client, bucket: str) -> None:
    storage = storage_for(s3_server, bucket)
    key = new_key("jpeg")
    storage.put(JPEG, key, "image/jpeg")
    storage.delete(key)
    storage.delete(key)
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_a_sidecar_goes_under_the_private_prefix_after_the_s3_prefix(s3_server: str, s3: S3Client, bucket: str) -> None:
    storage = storage_for(s3_server, bucket, s3_prefix="images/")
    key = new_key("webp")
    sidecar = sidecar_key(key)
    assert sidecar == "private/" + key.removesuffix(".webp") + ".json"
    assert is_public_key(key) and not is_public_key(sidecar)
    storage.put(JPEG, key, "image/webp")
    assert storage.put(b'{"prompt": "a secret"}', sidecar, "application/json").key == sidecar

    obj = s3.get_object(Bucket=bucket, Key=f"images/private/{key.removesuffix('.webp')}.json")
    assert obj["Body"].read() == b'{"prompt": "a secret"}'
    assert obj["ContentType"] == "application/json"
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert listed == {f"images/{key}", f"images/{sidecar}"}

    storage.delete(sidecar)
    storage.delete(sidecar)  # missing: not an error
    assert {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]} == {f"images/{key}"}
    with pytest.raises(ValueError, match="invalid storage key"):
        storage.put(JPEG, f"private/{key.removesuffix('.webp')}.gif", "image/gif")  # not a key sdgate makes


def test_an_input_image_is_private_uncached_and_read_back(s3_server: str, s3: S3Client, bucket: str) -> None:
    storage = storage_for(s3_server, bucket, s3_prefix="images/")
    key = input_key("png")
    assert key.startswith("private/") and not is_public_key(key)
    storage.put(b"the user's picture", key, "image/png")
    head = s3.head_object(Bucket=bucket, Key=f"images/{key}")
    assert head["CacheControl"] == "private, no-store"  # never cached as public, whatever the setting
    assert storage.get(key) == b"the user's picture"
    storage.delete(key)
    with pytest.raises(StorageError, match="could not read"):
        storage.get(key)


def test_a_missing_bucket_is_a_clear_storage_error_and_writes_nothing(s3_server: str, s3: S3Client) -> None:
    storage = storage_for(s3_server, "no-such-bucket-here")
    with pytest.raises(StorageError, match=r"'no-such-bucket-here'.*NoSuchBucket") as caught:
        storage.put(JPEG, new_key("jpeg"), "image/jpeg")
    assert caught.value.status == 503
    with pytest.raises(StorageError, match="does not exist"):
        storage.check()
    assert "no-such-bucket-here" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_an_unreachable_store_fails_fast_and_clearly(bucket: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    s = Settings(storage="s3", s3_bucket=bucket)
    storage = S3Storage(s, client=client_for(dead, retries={"total_max_attempts": 1}, connect_timeout=2))
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach S3"):
        storage.check()
    with pytest.raises(StorageError, match="could not store the image"):
        storage.put(JPEG, new_key("jpeg"), "image/jpeg")
    assert time.monotonic() - t0 < 10


def test_check_only_warns_when_head_bucket_is_denied(
    s3_server: str, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A least-privilege role may put objects without s3:ListBucket, which HeadBucket needs."""
    storage = storage_for(s3_server, bucket)
    with Stubber(storage.client) as stub:
        stub.add_client_error("head_bucket", service_error_code="403", http_status_code=403)
        with caplog.at_level(logging.WARNING, logger="sdgate.storage"):
            storage.check()
    assert "access denied" in caplog.text


def test_settings_pick_s3_and_the_standard_aws_endpoint_variable(
    s3_server: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {**FAKE_CREDENTIALS, "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL_S3": s3_server}.items():
        monkeypatch.setenv(name, value)
    storage = create_storage(Settings(storage="s3", s3_bucket=bucket))
    assert isinstance(storage, S3Storage)
    storage.check()
    url = storage.put(JPEG, new_key("jpeg"), "image/jpeg").url
    assert url.startswith(f"{s3_server}/{bucket}/")
    assert httpx.get(url, timeout=10).content == JPEG


class _ImagesFail(S3Storage):
    """S3 that refuses image writes (as a full or failing store would), and accepts the rest."""

    def put(self, data: bytes, key: str, content_type: str, *, durable: bool = True) -> StoredObject:
        if content_type.startswith("image/"):
            raise StorageError("could not store the image: simulated S3 outage")
        return super().put(data, key, content_type, durable=durable)


def test_a_failed_image_write_leaves_no_sidecar(s3_server: str, s3: S3Client, bucket: str, tmp_path: Path) -> None:
    settings = Settings(storage="s3", s3_bucket=bucket, data_dir=tmp_path)
    storage = _ImagesFail(settings, client=client_for(s3_server))
    backend = FakeBackend()

    async def run() -> Any:
        jobs = JobRunner(settings, backend, storage, SqliteJobStore(settings.paths.jobs_db))
        await jobs.start()
        params = resolve_request(GenerationRequest(prompt="a red square"), settings, backend.defaults())
        job, _ = jobs.submit(params, surface=Surface.native)
        await jobs.wait(job, 30)
        view = jobs.view(job)
        await jobs.close()
        return view

    view = asyncio.run(run())
    assert view.status == "failed"
    assert view.error is not None and view.error.type == "storage_error"
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0  # no sidecar describing a missing image
