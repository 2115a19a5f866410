"""pytest fixtures that start real etcd servers (Debian's etcd-server 3.4).

Without an etcd binary the tests that need one skip, except on CI (`CI=true`), where a missing
etcd is a broken set-up and fails them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certs import TestCerts, make_certs
from weft.fabric.errors import ConfigError
from weft.testing.etcd import EtcdServer, EtcdTLS, find_etcd_binary

AUTH_USER = "weft"
AUTH_PASSWORD = "weft-test-password"


@pytest.fixture(scope="session")
def etcd_binary() -> str:
    """The etcd server binary; skips (fails on CI) when there is none."""
    try:
        return find_etcd_binary()
    except ConfigError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture
def etcd(etcd_binary: str, tmp_path: Path) -> Iterator[EtcdServer]:
    """A started plain-http etcd of this test's own, closed afterwards."""
    server = EtcdServer(tmp_path / "etcd", binary=etcd_binary)
    with server:
        yield server


@pytest.fixture(scope="session")
def etcd_session(etcd_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd shared by the whole session: each test must keep to its own key prefix."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd-session") / "etcd", binary=etcd_binary)
    with server:
        yield server


@pytest.fixture
def etcd_tls(etcd_binary: str, tmp_path: Path) -> Iterator[tuple[EtcdServer, TestCerts]]:
    """A TLS etcd requiring client certificates signed by the test CA, and the test PKI."""
    certs = make_certs(tmp_path / "certs")
    tls = EtcdTLS(ca_file=certs.ca, cert_file=certs.server_cert, key_file=certs.server_key)
    server = EtcdServer(tmp_path / "etcd", tls=tls, binary=etcd_binary)
    with server:
        yield server, certs


@pytest.fixture
def etcd_auth(etcd_binary: str, tmp_path: Path) -> Iterator[tuple[EtcdServer, str, str]]:
    """A plain-http etcd with auth on: (server, user, password); root has the same password."""
    server = EtcdServer(tmp_path / "etcd", binary=etcd_binary)
    with server:
        server.enable_auth(AUTH_USER, AUTH_PASSWORD)
        yield server, AUTH_USER, AUTH_PASSWORD
