"""Fixtures for the original AWS design, with real components on loopback.

- ``s3_server``: moto's S3-protocol server in a thread on a free port, talked to over HTTP by real
  boto3 clients (no ``mock_aws`` patching); it speaks DynamoDB's protocol on the same port, hence
  ``dynamodb`` and ``jobs_table``;
- ``endpoint``: an ``sdgate serve --sagemaker`` process, the model endpoint;
- ``aws_env``: the standard AWS variables a gateway process needs to use both.

tests/conftest.py loads this module as a plugin: every test module sees these fixtures.
"""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image

from sdgate.storage import sidecar_key
from tests import background
from tests.server import ServerProcess, free_port, start_server, with_tiny_models

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_s3 import S3Client

REGION = "us-east-1"
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
# Small, fast generations for every test that goes through a gateway.
FAST = {"SDGATE_DEFAULT_WIDTH": "64", "SDGATE_DEFAULT_HEIGHT": "64", "SDGATE_DEFAULT_STEPS": "2"}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """URL of a real S3-protocol server (moto) on a loopback port."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3(s3_server: str) -> S3Client:
    """A boto3 S3 client of the test itself, talking HTTP to ``s3_server``."""
    client: S3Client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name=REGION,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    return client


@pytest.fixture
def bucket(s3: S3Client) -> str:
    """A fresh, empty bucket for one test."""
    name = f"sdgate-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def dynamodb(s3_server: str) -> DynamoDBClient:
    """A boto3 DynamoDB client of the test itself, talking HTTP to the same moto server."""
    client: DynamoDBClient = boto3.client(
        "dynamodb",
        endpoint_url=s3_server,
        region_name=REGION,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    return client


@pytest.fixture
def jobs_table(dynamodb: DynamoDBClient) -> str:
    """A fresh job table for one test, made from the same definition as the CDK stack's."""
    from sdgate.jobstore.dynamodb import create_table

    name = f"sdgate-jobs-{uuid.uuid4().hex[:12]}"
    create_table(dynamodb, name)
    return name


@pytest.fixture(scope="session")
def aws_env(s3_server: str) -> dict[str, str]:
    """Standard AWS variables for a gateway process: fake credentials, a region, S3 at ``s3_server``."""
    return {
        **FAKE_CREDENTIALS,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL_S3": s3_server,
        # Nothing from the machine's own AWS setup may leak in.
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def make_endpoint() -> ServerProcess:
    """``sdgate serve --sagemaker``: the model endpoint (the tiny model, built once per session)."""
    data_dir = with_tiny_models(background.workdir("endpoint"))
    return start_server(data_dir, "--sagemaker", env={"SDGATE_MAX_BATCH_WAIT_MS": "50", **FAST})


@pytest.fixture(scope="session")
def endpoint() -> ServerProcess:
    """The model endpoint, shared by the session: made while the modules before its first user ran
    (they declare it with ``background.needs``); stopped when the session ends."""
    srv: ServerProcess = background.get("endpoint", make_endpoint)
    return srv


def start_gateway(data_dir: Path, endpoint: ServerProcess, aws_env: dict[str, str], **env: str) -> ServerProcess:
    """An ``sdgate serve`` gateway in front of ``endpoint``, by default through boto3 (backend sagemaker).

    ``env`` adds or overrides ``SDGATE_*`` settings (storage, backend, public base URL, ...).
    """
    full = {
        **aws_env,
        "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": endpoint.url,
        "SDGATE_BACKEND": "sagemaker",
        "SDGATE_SAGEMAKER_ENDPOINT": "jumpstart-sd",
        **FAST,
        **env,
    }
    return start_server(data_dir, env=full, timeout=60)


def jpeg_size(data: bytes) -> tuple[int, int]:
    """Size of a JPEG; fails the test if ``data`` is anything else."""
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG", im.format
        im.load()
        return im.size


def sidecar_object(image_object: str) -> str:
    """The bucket key of an image object's sidecar: the same ``SDGATE_S3_PREFIX``, then the image key's sidecar key."""
    at = re.search(r"\d{4}/\d{2}/\d{2}/", image_object)
    assert at is not None, f"not an image object: {image_object!r}"
    return image_object[: at.start()] + sidecar_key(image_object[at.start() :])


def objects(s3: S3Client, bucket: str) -> dict[str, dict[str, Any]]:
    """Every object of ``bucket`` with its head (content type, cache control, size)."""
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: dict(s3.head_object(Bucket=bucket, Key=k)) for k in keys}
