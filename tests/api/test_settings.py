"""Settings: etcd endpoints, TLS and credential pairs, group references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
import pytest

from weft.api import settings


def test_etcd_defaults() -> None:
    etcd = settings.EtcdSettings()
    assert etcd.endpoints == ["http://127.0.0.1:2379"]
    assert etcd.targets() == ["127.0.0.1:2379"]
    assert not etcd.secure
    assert (etcd.ca_file, etcd.cert_file, etcd.key_file, etcd.username, etcd.password) == (None,) * 5
    assert etcd.request_timeout == 2.0


@pytest.mark.parametrize(
    ("endpoints", "targets", "secure"),
    [
        (["http://127.0.0.1:2379"], ["127.0.0.1:2379"], False),
        (["http://etcd:2379/"], ["etcd:2379"], False),
        (["https://etcd-0.etcd.svc:2379"], ["etcd-0.etcd.svc:2379"], True),
        (["http://[::1]:2379"], ["[::1]:2379"], False),
        (["https://[fe80::1]:443/"], ["[fe80::1]:443"], True),
        (["http://h:1", "http://h:65535"], ["h:1", "h:65535"], False),
        (
            ["https://a:2379", "https://b:2379/", "https://c:2379"],
            ["a:2379", "b:2379", "c:2379"],
            True,
        ),
    ],
)
def test_etcd_endpoints_and_targets(endpoints: list[str], targets: list[str], secure: bool) -> None:
    etcd = settings.EtcdSettings(endpoints=endpoints)
    assert etcd.endpoints == endpoints
    assert etcd.targets() == targets
    assert etcd.secure is secure


def test_etcd_sixteen_endpoints_is_the_limit() -> None:
    many = [f"http://h{i}:2379" for i in range(16)]
    assert len(settings.EtcdSettings(endpoints=many).targets()) == 16
    with pytest.raises(pydantic.ValidationError):
        settings.EtcdSettings(endpoints=[*many, "http://h16:2379"])


def test_etcd_needs_an_endpoint() -> None:
    with pytest.raises(pydantic.ValidationError):
        settings.EtcdSettings(endpoints=[])


@pytest.mark.parametrize(
    "endpoints",
    [
        ["http://a:2379", "https://b:2379"],
        ["https://a:2379", "http://b:2379"],
        ["https://a:2379", "https://b:2379", "http://c:2379"],
    ],
)
def test_etcd_rejects_mixed_schemes(endpoints: list[str]) -> None:
    with pytest.raises(pydantic.ValidationError, match="mix http and https"):
        settings.EtcdSettings(endpoints=endpoints)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "127.0.0.1:2379",
        "etcd",
        "http://etcd",
        "http://etcd:",
        "http://:2379",
        "http://etcd:port",
        "http://etcd:-1",
        "http://etcd:2379/v3",
        "http://etcd:2379//",
        "http://etcd/:2379",
        "grpc://etcd:2379",
        "unix://etcd.sock",
        "HTTP://etcd:2379",
        "http:/etcd:2379",
        "http://[::1:2379",
        "http://::1:2379",
        "http://[::1]x:2379",
        "http://[::g]:2379",
    ],
)
def test_etcd_rejects_bad_urls(url: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="is not http"):
        settings.EtcdSettings(endpoints=[url])


@pytest.mark.parametrize("port", ["0", "00000", "65536", "99999", "123456"])
def test_etcd_rejects_ports_out_of_range(port: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="is not http"):
        settings.EtcdSettings(endpoints=[f"http://etcd:{port}"])


def test_etcd_bad_url_among_good_ones() -> None:
    with pytest.raises(pydantic.ValidationError, match="'http://c'"):
        settings.EtcdSettings(endpoints=["http://a:2379", "http://b:2379", "http://c"])


def test_etcd_credentials_go_together() -> None:
    etcd = settings.EtcdSettings(username="root", password=pydantic.SecretStr("hunter2"))
    assert etcd.username == "root"
    assert isinstance(etcd.password, pydantic.SecretStr)
    assert etcd.password.get_secret_value() == "hunter2"
    with pytest.raises(pydantic.ValidationError, match="username and password go together"):
        settings.EtcdSettings(username="root")
    with pytest.raises(pydantic.ValidationError, match="username and password go together"):
        settings.EtcdSettings(password=pydantic.SecretStr("hunter2"))


def test_etcd_password_is_not_shown() -> None:
    etcd = settings.EtcdSettings(username="root", password=pydantic.SecretStr("hunter2"))
    for shown in (repr(etcd), str(etcd), etcd.model_dump_json(), repr(etcd.model_dump())):
        assert "hunter2" not in shown
    assert "**********" in repr(etcd)


def test_etcd_client_certificate() -> None:
    etcd = settings.EtcdSettings(
        endpoints=["https://etcd:2379"],
        ca_file=Path("ca.pem"),
        cert_file=Path("client.pem"),
        key_file=Path("client-key.pem"),
    )
    assert etcd.secure
    assert (etcd.ca_file, etcd.cert_file, etcd.key_file) == (
        Path("ca.pem"),
        Path("client.pem"),
        Path("client-key.pem"),
    )


@pytest.mark.parametrize(
    "files",
    [{"cert_file": Path("client.pem")}, {"key_file": Path("client-key.pem")}],
    ids=["cert-without-key", "key-without-cert"],
)
def test_etcd_cert_and_key_go_together(files: dict[str, Path]) -> None:
    with pytest.raises(pydantic.ValidationError, match="cert_file and key_file go together"):
        settings.EtcdSettings(endpoints=["https://etcd:2379"], **files)  # type: ignore[arg-type]


def test_etcd_client_certificate_needs_https() -> None:
    with pytest.raises(pydantic.ValidationError, match="need https"):
        settings.EtcdSettings(
            endpoints=["http://etcd:2379"], cert_file=Path("client.pem"), key_file=Path("client-key.pem")
        )


@pytest.mark.parametrize("timeout", [0, -1, 60.5, "soon"])
def test_etcd_request_timeout_bounds(timeout: Any) -> None:
    with pytest.raises(pydantic.ValidationError, match="request_timeout"):
        settings.EtcdSettings(request_timeout=timeout)


@pytest.mark.parametrize("timeout", [0.001, 2, 60])
def test_etcd_request_timeout_accepted(timeout: float) -> None:
    assert settings.EtcdSettings(request_timeout=timeout).request_timeout == timeout


def test_etcd_settings_are_frozen_and_closed() -> None:
    etcd = settings.EtcdSettings()
    with pytest.raises(pydantic.ValidationError):
        etcd.request_timeout = 5.0
    with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
        settings.EtcdSettings(endpoint="http://etcd:2379")  # type: ignore[call-arg]


def test_etcd_settings_from_a_config_mapping() -> None:
    raw = {
        "endpoints": ["https://a:2379", "https://b:2379"],
        "ca_file": "certs/ca.pem",
        "username": "weft",
        "password": "s3cret",
        "request_timeout": 5,
    }
    etcd = settings.EtcdSettings.model_validate(raw)
    assert etcd.targets() == ["a:2379", "b:2379"]
    assert etcd.ca_file == Path("certs/ca.pem")
    assert etcd.password is not None
    assert etcd.password.get_secret_value() == "s3cret"


# ---------------------------------------------------------------- GroupRef


@pytest.mark.parametrize(
    ("namespace", "group", "prefix"),
    [
        ("default", "g", "/weft/v1/default/g/"),
        ("team-a", "llama-70b", "/weft/v1/team-a/llama-70b/"),
        ("0", "1", "/weft/v1/0/1/"),
        ("n" * 63, "g" * 63, f"/weft/v1/{'n' * 63}/{'g' * 63}/"),
    ],
)
def test_group_prefix(namespace: str, group: str, prefix: str) -> None:
    ref = settings.GroupRef(namespace=namespace, group=group)
    assert ref.prefix == prefix


def test_group_namespace_defaults_to_default() -> None:
    assert settings.GroupRef(group="g").prefix == "/weft/v1/default/g/"


def test_group_is_required() -> None:
    with pytest.raises(pydantic.ValidationError, match="group"):
        settings.GroupRef()  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "label",
    [
        "",
        "Group",
        "GROUP",
        "g" * 64,
        "-g",
        "g-",
        "-",
        "g.h",
        "g_h",
        "g/h",
        "g h",
        "g\n",
        "ü",
    ],
)
@pytest.mark.parametrize("field", ["namespace", "group"])
def test_group_rejects_bad_labels(field: str, label: str) -> None:
    fields = {"namespace": "default", "group": "g", field: label}
    with pytest.raises(pydantic.ValidationError, match=field):
        settings.GroupRef(**fields)


def test_group_ref_is_frozen() -> None:
    ref = settings.GroupRef(group="g")
    with pytest.raises(pydantic.ValidationError):
        ref.group = "h"
