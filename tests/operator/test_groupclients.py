"""`GroupClients`: one etcd client per TransferGroup, its Secrets re-read at most every few
seconds and the client rebuilt only when what it was made from changed."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from weft.api.transfergroup import TransferGroupSpec
from weft.operator.groupclients import GroupClients, TokenMissingError
from weft.operator.kube import KubeError


class Secrets:
    """Secrets by name; counts the reads."""

    def __init__(self, **data: dict[str, bytes]) -> None:
        self.data = data
        self.reads = 0

    def __call__(self, name: str, namespace: str) -> Mapping[str, bytes]:
        self.reads += 1
        if name not in self.data:
            raise KubeError(f"Secret {namespace}/{name} does not exist", status=404, transient=True)
        return self.data[name]


def spec(**etcd: Any) -> TransferGroupSpec:
    section = {"endpoints": ["http://127.0.0.1:2379"], "joinTokenSecretRef": {"name": "join"}} | etcd
    return TransferGroupSpec.model_validate({"etcd": section})


def test_a_group_keeps_its_client_until_its_material_changes() -> None:
    now = [0.0]
    secrets = Secrets(join={"token": b"0123456789abcdef0123\n"})
    clients = GroupClients(secrets, list, refresh_seconds=10.0, clock=lambda: now[0])

    async def scenario() -> None:
        first = await clients.get("ns", "g", spec())
        assert first.secret == b"0123456789abcdef0123" and secrets.reads == 1
        assert await clients.get("ns", "g", spec()) is first and secrets.reads == 1  # trusted
        now[0] = 11.0
        assert await clients.get("ns", "g", spec()) is first and secrets.reads == 2  # same token
        secrets.data["join"] = {"token": b"another-token-0123456789"}
        now[0] = 22.0
        second = await clients.get("ns", "g", spec())
        assert second is not first and second.secret == b"another-token-0123456789"
        moved = await clients.get("ns", "g", spec(endpoints=["http://127.0.0.1:2380"]))
        assert moved is not second  # a spec change is not left to the refresh interval
        assert await clients.get("ns", "other", spec()) is not moved
        await clients.drop("ns", "g")
        assert await clients.get("ns", "g", spec()) is not moved
        await clients.close()

    asyncio.run(scenario())


def test_a_missing_token_stops_the_drain_and_mirror_not_the_finalizer() -> None:
    clients = GroupClients(Secrets(), list)

    async def scenario() -> None:
        with pytest.raises(TokenMissingError, match="does not exist"):
            await clients.get("ns", "g", spec())
        client = await clients.get("ns", "g", spec(), need_token=False)
        assert client.secret is None
        await clients.close()

    asyncio.run(scenario())


def test_tls_material_from_the_secret_lives_as_long_as_the_client() -> None:
    pem = {"ca.crt": b"ca", "tls.crt": b"cert", "tls.key": b"key"}
    secrets = Secrets(join={"token": b"0123456789abcdef0123"}, tls=pem)
    clients = GroupClients(secrets, list)

    async def scenario() -> None:
        client = await clients.get(
            "ns", "g", spec(endpoints=["https://127.0.0.1:2379"], tlsSecretRef={"name": "tls"})
        )
        settings = client._etcd.settings
        assert settings.ca_file is not None and settings.key_file is not None
        assert settings.ca_file.read_bytes() == b"ca" and oct(settings.key_file.stat().st_mode)[-3:] == "600"
        await clients.close()
        assert not settings.ca_file.exists()

    asyncio.run(scenario())
