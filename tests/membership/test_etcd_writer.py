"""Someone with write access to etcd but without the join token, against a real etcd.

The records are sealed with an HMAC of the token, so such a writer cannot forge one; what it
can do is write back records it has seen, delete keys, and write garbage. None of that may
rewind the plan's epoch, freeze the election, block a name, or count as an ack.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from tests.conftest import SECRET
from weft.api import records
from weft.api.settings import EtcdSettings, GroupRef
from weft.engine.coordinator import Coordinator, PlanningConfig
from weft.membership import GroupClient
from weft.membership._etcd import Etcd
from weft.membership.events import EventKind
from weft.membership.member import MemberConfig, Membership, MembershipEvent, Phase
from weft.planner import RatioPolicy
from weft.testing.etcd import EtcdServer

pytestmark = pytest.mark.integration

TTL = 2.0
OTHER = b"not-the-join-token-0123456789abc"


class Group:
    """Members of one group (with a planning coordinator, optionally); closed at the end."""

    def __init__(self, server: EtcdServer, group: str, planning: bool) -> None:
        self.settings = EtcdSettings(endpoints=[server.endpoint])
        self.ref = GroupRef(group=group)
        self.planning = planning
        self.members: dict[str, tuple[Membership, Coordinator | None]] = {}
        self.plan_epochs_seen: dict[str, list[int]] = {}

    async def join(self, name: str, *, campaign: bool = True, join_timeout: float = 30.0) -> Membership:
        cfg = MemberConfig(
            name,
            self.ref,
            SECRET,
            lease_ttl=TTL,
            connect_peers=False,
            campaign=campaign,
            join_timeout=join_timeout,
        )
        m = Membership(self.settings, cfg, None)
        c = Coordinator(m, PlanningConfig(RatioPolicy.parse("1:1"), debounce=0.05)) if self.planning else None
        seen = self.plan_epochs_seen.setdefault(name, [])

        def track(_ev: MembershipEvent, m: Membership = m) -> None:
            if m.plan is not None and (not seen or seen[-1] != m.plan.epoch):
                seen.append(m.plan.epoch)

        m.subscribe(track)
        self.members[name] = (m, c)
        await m.start()
        await m.activate()
        if c is not None:
            await c.start()
        return m

    async def crash(self, name: str) -> None:
        m, c = self.members.pop(name)
        if c is not None:
            await c.stop()
        await m.close()

    async def close(self) -> None:
        for m, c in self.members.values():
            if c is not None:
                await c.stop()
            if m.phase is not Phase.LEFT:
                await m.close()

    def all(self) -> list[Membership]:
        return [m for m, _ in self.members.values()]

    def leader(self) -> Membership:
        return next(m for m in self.all() if m.is_leader)

    async def settled(self, above: int = 0, timeout: float = 15.0) -> int:
        """Every member holds one plan above epoch `above`, of all members, acked by all."""
        ms = self.all()
        names = set(self.members)

        def done() -> bool:
            epochs = {m.plan.epoch if m.plan else 0 for m in ms}
            plan = ms[0].plan
            return (
                len(epochs) == 1
                and plan is not None
                and plan.epoch > above
                and set(plan.members) == names
                and not any(m.plan_invalid for m in ms)
                and all(ms[0].acks.get(n) == plan.epoch for n in names)
            )

        await ms[0].wait_for(done, timeout)
        plan = ms[0].plan
        assert plan is not None
        return plan.epoch


@asynccontextmanager
async def group(server: EtcdServer, name: str, *, planning: bool = False) -> AsyncIterator[Group]:
    g = Group(server, name, planning)
    try:
        yield g
    finally:
        await g.close()


def saw(m: Membership, kind: EventKind, words: str) -> Callable[[], bool]:
    return lambda: any(ev.kind is kind and words in ev.reason for ev in m.events)


def sees_all(m: Membership, names: set[str]) -> Callable[[], bool]:
    return lambda: set(m.peers()) == names - {m.config.name}


async def key_epoch(etcd: Etcd, key: str) -> int:
    kv = await etcd.get(key.encode())
    assert kv is not None
    return records.unseal(records.PlanRecord, kv.value, key, SECRET).epoch


async def test_a_plan_written_back_is_reported_never_adopted_and_overwritten(
    etcd_session: EtcdServer,
) -> None:
    async with group(etcd_session, "w-rewind", planning=True) as g:
        for name in ("a", "b"):
            await g.join(name)
        first = await g.settled()
        key = g.all()[0].keyspace.plan
        async with Etcd(g.settings) as etcd:
            old = await etcd.get(key.encode())
            assert old is not None
            await g.join("c")
            newest = await g.settled(first)
            await etcd.put(key.encode(), old.value)  # a validly signed plan of an older epoch
            for m in g.all():
                await m.wait_for(saw(m, EventKind.PLAN, f"below epoch {newest}"), 5)
            after = await g.settled(newest)  # the leader wrote a newer epoch over it (CAS)
            assert await key_epoch(etcd, key) == after > newest
        for name, epochs in g.plan_epochs_seen.items():  # nobody ever went back
            assert epochs == sorted(epochs) and first not in epochs[epochs.index(newest) :], name


async def test_a_restarted_member_and_weft_status_see_a_written_back_plan_as_invalid(
    etcd_session: EtcdServer,
) -> None:
    async with group(etcd_session, "w-restart") as g:
        a = await g.join("a")
        await a.wait_for(lambda: a.is_leader, 5)
        key = a.keyspace.plan
        async with Etcd(g.settings) as etcd, GroupClient(g.settings, g.ref, SECRET) as client:
            for epoch in (1, 2, 3):
                plan = records.PlanRecord(
                    epoch=epoch, members=["a"], roles={}, leader="a", leader_generation=1
                )
                assert await a.write_plan(plan)
                if epoch == 1:
                    old = await etcd.get(key.encode())
            await a.put_ack(3)
            assert old is not None
            await etcd.put(key.encode(), old.value)
            await a.wait_for(lambda: a.plan_invalid, 5)
            assert a.plan is not None and a.plan.epoch == 3  # kept, the old one not adopted
            kv = await etcd.get(key.encode())
            assert kv is not None and a.plan_revision == kv.mod_revision  # the real revision
            b = await g.join("b")  # a member that starts now: the acks tell it epoch 3
            assert b.plan is None and b.plan_invalid and b.view.epoch == 3
            doc = await client.read_status()
            assert doc.plan is not None and doc.plan.epoch == 1 and not doc.plan.verified
            assert [bad.key for bad in doc.invalid] == [key]
            await g.crash("a")  # b leads next, holding no plan: its first is made from scratch
            await b.wait_for(lambda: b.is_leader, TTL + 10)
            nxt = records.PlanRecord(epoch=1, members=["b"], roles={}, leader="b", leader_generation=1)
            assert await b.write_plan(nxt)  # renumbered above epoch 3; the CAS is on the real key
            assert await key_epoch(etcd, key) == 4
            assert b.plan is not None and b.plan.epoch == 4 and not b.plan_invalid
            await b.put_ack(4)
            doc = await client.read_status()
            assert doc.plan is not None and doc.plan.verified and doc.invalid == ()
            assert doc.plan.acked == ("b",)


async def test_a_deleted_plan_key_is_written_again_above_the_highest_epoch(etcd_session: EtcdServer) -> None:
    async with group(etcd_session, "w-delete", planning=True) as g:
        for name in ("a", "b", "c"):
            await g.join(name)
        first = await g.settled()
        key = g.all()[0].keyspace.plan
        async with Etcd(g.settings) as etcd:
            await etcd.delete(key.encode())
            second = await g.settled(first)
            assert await key_epoch(etcd, key) == second
            # the leader dies and the key goes with it: the next leader learns the epoch too
            await g.crash(g.leader().config.name)
            await etcd.delete(key.encode())
            third = await g.settled(second, timeout=TTL + 15)
            assert await key_epoch(etcd, key) == third > second
        for name, epochs in g.plan_epochs_seen.items():
            assert epochs == sorted(set(epochs)), name  # no epoch used twice, none went back


async def test_a_leader_record_rewritten_without_a_lease_is_cleared(etcd_session: EtcdServer) -> None:
    async with group(etcd_session, "w-leader") as g:
        a = await g.join("a")
        await a.wait_for(lambda: a.is_leader, 5)
        b = await g.join("b")
        await b.wait_for(lambda: b.leader == "a", 5)
        key = a.keyspace.leader
        live = {a.lease: a, b.lease: b}
        async with Etcd(g.settings) as etcd:
            kv = await etcd.get(key.encode())
            assert kv is not None
            await etcd.put(key.encode(), kv.value)  # a's own record, now under no lease

            async def held_by_a_live_member() -> Membership:
                async def held() -> bool:
                    kv = await etcd.get(key.encode())
                    return kv is not None and kv.lease in live and live[kv.lease].is_leader

                for _ in range(200):  # bounded: 200 x 0.05 s plus the reads
                    if await held():
                        return next(m for m in live.values() if m.is_leader)
                    await asyncio.sleep(0.05)
                raise AssertionError("nobody leads under a lease")

            leader = await held_by_a_live_member()
            assert a.counters["leaders_cleared"] + b.counters["leaders_cleared"] >= 1
            kv = await etcd.get(key.encode())
            assert kv is not None
            survivor = b if leader is a else a
            await g.crash(leader.config.name)  # the leader dies; its record is written back
            del live[leader.lease]
            await etcd.put(key.encode(), kv.value)  # without a lease: it would never expire
            await survivor.wait_for(lambda: survivor.is_leader, TTL + 10)
            assert await held_by_a_live_member() is survivor


async def test_garbage_over_a_member_key_is_repaired_and_never_blocks_the_name(
    etcd_session: EtcdServer,
) -> None:
    async with group(etcd_session, "w-garbage") as g:
        a = await g.join("a")
        b = await g.join("b")
        await a.wait_for(lambda: a.peers() == ["b"], 5)
        async with Etcd(g.settings) as etcd:
            await etcd.put(b.key.encode(), b"\x00garbage")
            await b.wait_for(lambda: b.counters["repairs"] >= 1, 5)
            kv = await etcd.get(b.key.encode())
            assert kv is not None and kv.lease == b.lease
            assert records.unseal(records.MemberRecord, kv.value, b.key, SECRET).generation == b.generation
            await a.wait_for(lambda: a.peers() == ["b"], 5)
            # a name whose key holds garbage under no lease (its member is gone) can be joined
            c_key = a.keyspace.member("c")
            await etcd.put(c_key.encode(), b"\x00garbage")
            await a.wait_for(lambda: a.counters["ignored_records"] >= 1, 5)
            c = await g.join("c", join_timeout=5.0)
            fresh = await g.join("d")
            for m in (a, b, c, fresh):  # old and new members agree
                await m.wait_for(sees_all(m, {"a", "b", "c", "d"}), 5)


async def test_forged_and_stale_acks_do_not_count_in_weft_status(etcd_session: EtcdServer) -> None:
    async with group(etcd_session, "w-acks") as g:
        a = await g.join("a")
        await a.wait_for(lambda: a.is_leader, 5)
        b = await g.join("b", campaign=False)
        plan = records.PlanRecord(epoch=1, members=["a", "b"], roles={}, leader="a", leader_generation=1)
        assert await a.write_plan(plan)
        await a.put_ack(1)
        async with Etcd(g.settings) as etcd, GroupClient(g.settings, g.ref, SECRET) as client:
            key = a.keyspace.ack("b")
            forged = records.AckRecord(name="b", generation=b.generation, epoch=1)
            await etcd.put(key.encode(), records.seal(forged, key, OTHER))  # not the token
            doc = await client.read_status()
            assert doc.plan is not None and doc.plan.acked == ("a",)
            assert doc.unverified_acks == 1 and [bad.key for bad in doc.invalid] == [key]
            stale = records.AckRecord(name="b", generation=b.generation - 1, epoch=1)  # an earlier b
            await etcd.put(key.encode(), records.seal(stale, key, SECRET))
            doc = await client.read_status()
            assert doc.plan is not None and doc.plan.acked == ("a",) and doc.unverified_acks == 0
            await b.put_ack(1)
            doc = await client.read_status()
            assert doc.plan is not None and doc.plan.acked == ("a", "b")
