"""Settings that come from files, flags and the environment: etcd access and the node agent.

One settings object per program, grouped in sections, every field documented. The `weft agent`
command line, its `--config` file (YAML or JSON) and the ``WEFT_*`` environment all land
here; precedence is flags > environment > file > defaults (see `weft.cli`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import pydantic

Name = Annotated[str, pydantic.StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,252}$")]
# a Kubernetes namespace / group name: a DNS label
Label = Annotated[str, pydantic.StringConstraints(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]

_URL = re.compile(r"(https?)://([A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\]):(\d{1,5})/?")


class _Settings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")


class EtcdSettings(_Settings):
    """How to reach etcd (v3 gRPC API)."""

    endpoints: Annotated[list[str], pydantic.Field(min_length=1, max_length=16)] = ["http://127.0.0.1:2379"]
    """``http://host:port`` or ``https://host:port``; tried in order, the next one on failure."""
    ca_file: Path | None = None
    """PEM CA bundle that signed the etcd server certificate (https endpoints)."""
    cert_file: Path | None = None
    """PEM client certificate, for etcd started with ``--client-cert-auth``."""
    key_file: Path | None = None
    """PEM private key of ``cert_file``."""
    username: str | None = None
    """etcd user (``etcdctl auth enable``); needs ``password``."""
    password: pydantic.SecretStr | None = None
    request_timeout: Annotated[float, pydantic.Field(gt=0, le=60)] = 2.0
    """Deadline of one etcd request, in seconds."""

    @pydantic.field_validator("endpoints")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        for url in value:
            m = _URL.fullmatch(url)
            if not m or not 0 < int(m.group(3)) < 65536:
                raise ValueError(f"etcd endpoint {url!r} is not http(s)://host:port")
        if len({u.split("://")[0] for u in value}) > 1:
            raise ValueError("etcd endpoints mix http and https")
        return value

    @pydantic.model_validator(mode="after")
    def _pairs(self) -> EtcdSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("etcd username and password go together")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("etcd cert_file and key_file go together")
        if (self.cert_file is not None or self.ca_file is not None) and not self.secure:
            raise ValueError("etcd TLS files (ca_file, cert_file) need https:// endpoints")
        return self

    @property
    def secure(self) -> bool:
        return self.endpoints[0].startswith("https://")

    def targets(self) -> list[str]:
        """The endpoints as gRPC targets (``host:port``)."""
        return [u.split("://", 1)[1].rstrip("/") for u in self.endpoints]


class GroupRef(_Settings):
    """Which group an agent belongs to: etcd prefix ``/weft/v1/<namespace>/<group>/``."""

    namespace: Label = "default"
    group: Label

    @property
    def prefix(self) -> str:
        return group_prefix(self.namespace, self.group)


def group_prefix(namespace: str, group: str) -> str:
    """``/weft/v1/<namespace>/<group>/``: the etcd prefix of a group (the only place it is
    spelled; `weft.membership.keyspace` builds the keys under it)."""
    return f"/weft/v1/{namespace}/{group}/"
