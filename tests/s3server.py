"""A real S3 API on loopback for tests: moto's server mode in a thread of the test process.

Clients talk HTTP to it exactly as to AWS (signatures, listings, ETags), so s3fs is tested
for real, and other processes (spawned replicas) can reach it too. Import the fixture into a
test module: ``from tests.s3server import s3_endpoint  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

#: Credentials moto accepts (any are fine); never real ones.
KEY = SECRET = "testing"
REGION = "us-east-1"


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """Run moto's S3 server on a free loopback port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The endpoint URL of a moto S3 server shared by the session (use a bucket per test)."""
    with pytest.MonkeyPatch.context() as env, moto_s3() as url:
        # Loopback must never go through a proxy; botocore honours NO_PROXY.
        env.setenv("NO_PROXY", ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"])))
        yield url


def storage_options(endpoint: str) -> dict[str, Any]:
    """fsspec/s3fs options that point at the test server."""
    return {
        "key": KEY,
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION},
    }


def new_bucket(endpoint: str) -> str:
    """Create a bucket with a fresh name (tests share the server) and return its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
    )
    client.create_bucket(Bucket=name)
    return name
