"""The scale-down gate (`handlers._drain_step`) against a real etcd: only what verifies with
the group's join token lets a leaving member go.

Someone with write access to etcd but without the token can write acks and plans signed
with another key, or write back records it has seen; none of them may open the gate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from tests.conftest import SECRET
from weft.api import records, vocab
from weft.api.settings import EtcdSettings, GroupRef
from weft.api.transfergroup import TransferGroupSpec
from weft.membership import GroupClient
from weft.operator import handlers
from weft.operator.groupclients import GroupClients
from weft.testing.etcd import EtcdServer

pytestmark = pytest.mark.integration

OTHER = b"not-the-join-token-0123456789abc"
NS, NAME = "ns", "gate"
NAMES = [f"{NAME}-{i}" for i in range(3)]


def _member(name: str, generation: int) -> records.MemberRecord:
    return records.MemberRecord(
        name=name,
        generation=generation,
        instance=f"i{generation}",
        incarnation=0,
        node="n",
        state=vocab.MemberState.ACTIVE,
        capabilities=records.Capabilities(),
        fabric="",
        lease_ttl=60.0,
        joined_at=1.0,
    )


def _plan(epoch: int, members: list[str]) -> records.PlanRecord:
    roles = {n: vocab.Role.DECODE for n in members}
    return records.PlanRecord(
        epoch=epoch, members=members, roles=roles, leader=members[0], leader_generation=1
    )


def test_only_verified_acks_and_a_verified_plan_open_the_gate(
    etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_secret(name: str, namespace: str) -> Mapping[str, bytes]:
        return {"token": SECRET}

    clients = GroupClients(read_secret, list)
    monkeypatch.setattr(handlers, "group_clients", lambda: clients)
    spec = TransferGroupSpec.model_validate(
        {"replicas": 2, "etcd": {"endpoints": [etcd.endpoint], "joinTokenSecretRef": {"name": "join"}}}
    )
    settings = EtcdSettings(endpoints=[etcd.endpoint])

    async def scenario() -> None:
        async with GroupClient(settings, GroupRef(namespace=NS, group=NAME), SECRET) as writer:
            space, etcd_ = writer.keyspace, writer._etcd

            async def put(key: str, record: records.Record, secret: bytes = SECRET, lease: int = 0) -> None:
                await etcd_.put(key.encode(), records.seal(record, key, secret), lease=lease)

            async def gate() -> tuple[list[str], str]:
                return await handlers._drain_step(spec, NS, NAME, 3)

            lease, _ = await etcd_.grant(60)
            for generation, name in enumerate(NAMES, start=1):
                await put(space.member(name), _member(name, generation), lease=lease)
            await put(space.plan, _plan(1, NAMES))
            for name in NAMES[:2]:
                await put(
                    space.ack(name), records.AckRecord(name=name, generation=NAMES.index(name) + 1, epoch=1)
                )
            held, why = await gate()
            assert held == [NAMES[2]] and "still gives work" in why  # the drain is asked for
            assert await writer.drain_requests() == {NAMES[2]}

            await put(space.plan, _plan(2, NAMES[:2]), OTHER)  # a plan that lets it go, forged
            held, why = await gate()
            assert held == [NAMES[2]] and "not verified" in why

            await put(space.plan, _plan(2, NAMES[:2]))  # the leader's real plan
            await put(space.ack(NAMES[0]), records.AckRecord(name=NAMES[0], generation=1, epoch=2))
            await put(space.ack(NAMES[1]), records.AckRecord(name=NAMES[1], generation=2, epoch=2), OTHER)
            held, why = await gate()
            assert held == [NAMES[2]] and f"waiting for {NAMES[1]}" in why and "1 unverified" in why
            doc = await writer.read_status()
            assert doc.plan is not None and doc.plan.acked == (NAMES[0],) and doc.unverified_acks == 1

            stale = records.AckRecord(name=NAMES[1], generation=1, epoch=2)  # an earlier incarnation's
            await put(space.ack(NAMES[1]), stale)
            held, why = await gate()
            assert held == [NAMES[2]] and f"waiting for {NAMES[1]}" in why

            await put(space.ack(NAMES[1]), records.AckRecord(name=NAMES[1], generation=2, epoch=2))
            assert await gate() == ([], "")  # every stayer applied a verified plan: go

            await put(space.plan, _plan(1, NAMES))  # the old plan written back: not the group's
            held, why = await gate()
            assert held == [NAMES[2]] and "not verified" in why
        await clients.close()

    asyncio.run(scenario())
