"""Shared fixtures: no test ever reaches AWS, and DynamoDB is moto or dynalite on loopback."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

ROOT = Path(__file__).parents[1]
DYNALITE = ROOT / "infra" / "dynalite" / "node_modules" / "dynalite" / "cli.js"

# Set before any client exists: fake credentials and a region, and no way out to real endpoints.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_SESSION_TOKEN="testing",
    AWS_DEFAULT_REGION="us-east-1",
    POWERTOOLS_METRICS_NAMESPACE="ParleyTest",
)


@pytest.fixture(scope="session")
def dynalite_endpoint() -> Iterator[str]:
    """An independent DynamoDB implementation (npm `dynalite`, installed by the Makefile)."""
    if not DYNALITE.exists():
        pytest.fail(f"{DYNALITE} is missing: run `make install` (npm install in infra/dynalite)")
    process = subprocess.Popen(
        ["node", str(DYNALITE), "--host", "127.0.0.1", "--port", "0", "--createTableMs", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # "Dynalite listening at: http://127.0.0.1:PORT"
    if "listening at" not in line:
        process.kill()
        pytest.fail(f"dynalite did not start: {line!r}")
    yield line.rsplit(" ", 1)[-1].strip().replace("localhost", "127.0.0.1")
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(params=["moto", "dynalite"])
def dynamodb(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A DynamoDB client; the same store tests run against moto and against dynalite."""
    if request.param == "moto":
        from moto import mock_aws

        with mock_aws():
            yield boto3.client("dynamodb", region_name="us-east-1")
    else:
        endpoint = request.getfixturevalue("dynalite_endpoint")
        yield boto3.client("dynamodb", region_name="us-east-1", endpoint_url=endpoint)


@pytest.fixture
def table_name() -> str:
    return f"calls-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """The JSON log lines, whatever stdout was when the logger was made."""
    from core.logs import logger

    handler = logger.registered_handler
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    previous = handler.setStream(buffer)
    yield buffer
    handler.setStream(previous)
