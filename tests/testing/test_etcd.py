"""The etcd launcher against the real etcd binary: health, restart, crash, TLS, auth."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.certs import TestCerts
from weft.fabric.errors import ConfigError
from weft.testing import etcd as etcd_kit
from weft.testing.etcd import EtcdServer, EtcdStartError

integration = pytest.mark.integration


def _health(server: EtcdServer, context: ssl.SSLContext | None = None) -> dict[str, str]:
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", server.client_port, timeout=2.0)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", server.client_port, timeout=2.0, context=context)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert response.status == 200
        answer: dict[str, str] = json.loads(response.read())
        return answer
    finally:
        conn.close()


def _etcdctl(server: EtcdServer, *args: str) -> subprocess.CompletedProcess[str]:
    """etcdctl with nothing but the endpoint and `args`: no credentials added."""
    cmd = [etcd_kit.find_etcdctl_binary(), f"--endpoints={server.endpoint}", "--dial-timeout=1s"]
    return subprocess.run(
        [*cmd, "--command-timeout=2s", *args], capture_output=True, text=True, timeout=10, check=False
    )


@integration
def test_start_answers_health(etcd: EtcdServer) -> None:
    assert etcd.running
    assert etcd.pid is not None
    assert etcd.endpoint == f"http://127.0.0.1:{etcd.client_port}"
    assert etcd.client_port != etcd.peer_port
    assert _health(etcd)["health"] == "true"
    assert etcd.data_dir.is_dir()


@integration
def test_restart_keeps_ports_and_data(etcd: EtcdServer) -> None:
    ports, pid = (etcd.client_port, etcd.peer_port), etcd.pid
    etcd.etcdctl("put", "/t/restart", "kept")
    etcd.restart()
    assert (etcd.client_port, etcd.peer_port) == ports
    assert etcd.pid != pid
    assert etcd.etcdctl("get", "--print-value-only", "/t/restart").strip() == "kept"


@integration
def test_kill_then_start_recovers(etcd: EtcdServer) -> None:
    etcd.etcdctl("put", "/t/crash", "survives")
    etcd.kill()
    assert not etcd.running
    assert etcd.pid is None
    etcd.kill()  # nothing left to kill
    etcd.start()
    assert etcd.running
    assert etcd.etcdctl("get", "--print-value-only", "/t/crash").strip() == "survives"


@integration
def test_stop_is_idempotent(etcd: EtcdServer) -> None:
    etcd.stop()
    etcd.stop()
    assert not etcd.running
    with pytest.raises(OSError):
        _health(etcd)


@integration
def test_temporary_data_dir_is_removed_on_close(etcd_binary: str) -> None:
    with EtcdServer(binary=etcd_binary) as server:
        data_dir = server.data_dir
        assert data_dir.is_dir()
    assert not server.running
    assert not data_dir.exists()


@integration
def test_session_server_is_shared(etcd_session: EtcdServer) -> None:
    etcd_session.etcdctl("put", "/t/session/key", "v")
    assert etcd_session.etcdctl("get", "--print-value-only", "/t/session/key").strip() == "v"


@integration
def test_failed_start_raises_with_log_tail(etcd_binary: str, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("etcd cannot use a file as its data directory")
    server = EtcdServer(not_a_dir, binary=etcd_binary, log_file=tmp_path / "etcd.log")
    with pytest.raises(EtcdStartError) as caught:
        server.start(timeout=5.0)
    assert caught.value.log_tail
    assert caught.value.log_tail in str(caught.value)
    assert not server.running
    server.close()


@integration
def test_tls_refuses_client_without_certificate(etcd_tls: tuple[EtcdServer, TestCerts]) -> None:
    server, certs = etcd_tls
    assert server.endpoint.startswith("https://127.0.0.1:")
    no_cert = ssl.create_default_context(cafile=str(certs.ca))
    with pytest.raises((OSError, http.client.HTTPException)):
        _health(server, no_cert)
    refused = _etcdctl(server, f"--cacert={certs.ca}", "put", "/t/tls", "v")
    assert refused.returncode != 0


@integration
def test_tls_accepts_client_certificate(etcd_tls: tuple[EtcdServer, TestCerts]) -> None:
    server, certs = etcd_tls
    with_cert = ssl.create_default_context(cafile=str(certs.ca))
    with_cert.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    assert _health(server, with_cert)["health"] == "true"
    flags = [f"--cacert={certs.ca}", f"--cert={certs.client_cert}", f"--key={certs.client_key}"]
    assert _etcdctl(server, *flags, "put", "/t/tls", "v").returncode == 0
    got = _etcdctl(server, *flags, "get", "--print-value-only", "/t/tls")
    assert (got.returncode, got.stdout.strip()) == (0, "v")


@integration
def test_auth_requires_user(etcd_auth: tuple[EtcdServer, str, str]) -> None:
    server, user, password = etcd_auth
    with pytest.raises(etcd_kit.EtcdctlError, match="user name is empty"):
        server.etcdctl("put", "/t/auth", "v")
    with pytest.raises(etcd_kit.EtcdctlError, match="authentication failed"):
        server.etcdctl("put", "/t/auth", "v", user=user, password="wrong")
    server.etcdctl("put", "/t/auth", "v", user=user, password=password)
    assert (
        server.etcdctl("get", "--print-value-only", "/t/auth", user="root", password=password).strip() == "v"
    )
    assert _health(server)["health"] == "true"  # /health needs no credentials


def test_missing_binary_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="etcd-server"):
        EtcdServer(binary=str(tmp_path / "no-etcd"))


def test_missing_binary_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEFT_ETCD_BIN", str(tmp_path / "no-etcd"))
    with pytest.raises(ConfigError, match="apt-get install etcd-server"):
        etcd_kit.find_etcd_binary()


@integration
def test_first_start_retries_when_a_port_was_taken(
    etcd_binary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = etcd_kit.free_loopback_ports
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = int(squatter.getsockname()[1])
        picks = iter([[taken, *real(1)]])

        def first_pick_taken(count: int) -> list[int]:
            return next(picks, None) or real(count)

        monkeypatch.setattr(etcd_kit, "free_loopback_ports", first_pick_taken)
        with EtcdServer(tmp_path / "etcd", binary=etcd_binary) as server:
            assert server.client_port != taken
            assert _health(server)["health"] == "true"
