"""A real S3-API server for tests: moto's server mode on a free loopback port.

Without moto's server the tests that need it skip, except on CI (`CI=true`), where that is a
broken set-up and fails them. Each test gets its own bucket on a shared server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str = "weft-test-key"
    secret_key: str = "weft-test-secret"
    region: str = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _moto_server() -> str | None:
    here = Path(sys.executable).parent / "moto_server"
    return str(here) if here.exists() else shutil.which("moto_server")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server, started once per session, stopped at the end."""
    binary = _moto_server()
    if binary is None:
        message = "moto_server is not installed (pip install 'moto[server]'; make setup does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    port = _free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(port)], stdout=sink, stderr=sink, stdin=subprocess.DEVNULL
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(endpoint, timeout=1):
                    break
            except urllib.error.HTTPError:
                break  # it answers (an S3 error document is an answer)
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer at {endpoint} within 30 s")
                time.sleep(0.1)
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def s3_client(server: S3Server) -> Any:
    """boto3 on the test server: the tests' own view of the bucket (create, corrupt, list)."""
    import boto3  # comes with moto[server] in the dev extra

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
    )


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the shared server (weft never creates buckets: users do)."""
    name = f"weft-{uuid.uuid4().hex[:12]}"
    s3_client(s3_server).create_bucket(Bucket=name)
    return name
