"""Plans in motion against a real etcd: the leader plans, everyone applies and acks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.conftest import SECRET
from weft.api import records
from weft.api.settings import EtcdSettings, GroupRef
from weft.engine.coordinator import Coordinator, PlanningConfig, plan_from_record, record_from_plan
from weft.membership._etcd import Etcd
from weft.membership.member import MemberConfig, Membership
from weft.planner import ExpertSpec, LoadPolicy, RatioPolicy, next_plan
from weft.planner.roles import role_counts
from weft.testing.etcd import EtcdServer

pytestmark = pytest.mark.integration

TTL = 2.0


class Group:
    def __init__(self, settings: EtcdSettings, group: str, config: PlanningConfig) -> None:
        self.settings, self.ref, self.config = settings, GroupRef(group=group), config
        self.members: dict[str, tuple[Membership, Coordinator]] = {}

    async def join(self, name: str) -> Membership:
        cfg = MemberConfig(name, self.ref, SECRET, lease_ttl=TTL, connect_peers=False)
        m = Membership(self.settings, cfg, None)
        c = Coordinator(m, self.config)
        self.members[name] = (m, c)
        await m.start()
        await m.activate()
        await c.start()
        return m

    async def crash(self, name: str) -> None:
        m, c = self.members.pop(name)
        await c.stop()
        await m.close()

    async def close(self) -> None:
        for m, c in self.members.values():
            await c.stop()
            await m.close()

    def all(self) -> list[Membership]:
        return [m for m, _ in self.members.values()]

    async def settled(self, epoch_at_least: int = 1, timeout: float = 10.0) -> int:
        """Every member applied the same plan (of every live member) and acked it."""
        ms = self.all()
        names = set(self.members)

        def done() -> bool:
            plans = {m.plan.epoch if m.plan else 0 for m in ms}
            if len(plans) != 1:
                return False
            epoch = plans.pop()
            plan = ms[0].plan
            return (
                epoch >= epoch_at_least
                and plan is not None
                and set(plan.members) == names
                and all(ms[0].acks.get(n) == epoch for n in names)
            )

        await ms[0].wait_for(done, timeout)
        plan = ms[0].plan
        assert plan is not None
        return plan.epoch


@asynccontextmanager
async def group(server: EtcdServer, name: str, config: PlanningConfig) -> AsyncIterator[Group]:
    g = Group(EtcdSettings(endpoints=[server.endpoint]), name, config)
    try:
        yield g
    finally:
        await g.close()


async def test_eight_then_twelve_members_get_2_6_then_3_9_with_no_flips(etcd_session: EtcdServer) -> None:
    config = PlanningConfig(RatioPolicy.parse("1:3"), ExpertSpec(32, replication=2), debounce=0.05)
    async with group(etcd_session, "plan-roles", config) as g:
        for i in range(8):
            await g.join(f"a{i}")
        await g.settled()
        plan = g.all()[0].plan
        assert plan is not None and role_counts(plan.roles) == (2, 6)
        before = dict(plan.roles)
        for m in g.all():  # every member serves the role the plan gave it
            await m.wait_for(lambda m=m: m.members[m.config.name].record.role == before[m.config.name], 5)
        for i in range(4):
            await g.join(f"b{i}")
        epoch = await g.settled(plan.epoch + 1)
        after = g.all()[0].plan
        assert after is not None and role_counts(after.roles) == (3, 9) and after.epoch == epoch
        assert all(after.roles[n] == r for n, r in before.items())  # nobody flipped
        hosts = {h for hs in after.experts.values() for h in hs}
        assert all(len(set(hs)) == 2 for hs in after.experts.values()) and hosts <= set(after.members)


async def test_a_crash_gives_a_new_plan_that_every_survivor_acks(etcd_session: EtcdServer) -> None:
    config = PlanningConfig(RatioPolicy.parse("1:3"), ExpertSpec(32, replication=2), debounce=0.05)
    async with group(etcd_session, "plan-crash", config) as g:
        for i in range(6):
            await g.join(f"a{i}")
        first = await g.settled()
        leader = g.all()[0].leader
        assert leader is not None
        await g.crash(leader)  # the leader dies: its lease, then a new leader, then a new plan
        epoch = await g.settled(first + 1, timeout=TTL + 10)
        plan = g.all()[0].plan
        assert plan is not None and leader not in plan.members and plan.epoch == epoch
        assert plan.leader != leader and not plan.under_replicated
        assert all(len(hs) == 2 and leader not in hs for hs in plan.experts.values())


async def test_a_stale_leader_cannot_write_a_plan(etcd_session: EtcdServer) -> None:
    config = PlanningConfig(RatioPolicy.parse("1:1"), debounce=0.05)
    async with group(etcd_session, "plan-fence", config) as g:
        await g.join("a")
        await g.join("b")
        epoch = await g.settled()
        leader = next(m for m in g.all() if m.is_leader)
        stale_plan, stale_revision = leader.plan, leader.plan_revision
        nxt = next_plan(plan_from_record(stale_plan), [], config.policy).plan
        key = f"{leader.prefix}plan"
        async with Etcd(g.settings) as etcd:  # a newer leader writes epoch + 1 first
            ok, _ = await etcd.replace(
                key.encode(),
                records.seal(record_from_plan(nxt, "newer", 1), key, SECRET),
                mod_revision=stale_revision,
            )
            assert ok
            await leader.wait_for(lambda: leader.plan is not None and leader.plan.epoch == epoch + 1, 5)
            # this leader was paused before it saw that: it still holds the old plan
            leader.plan, leader.plan_revision = stale_plan, stale_revision
            assert not await leader.write_plan(record_from_plan(nxt, leader.config.name, leader.generation))
            kv = await etcd.get(key.encode())
        assert kv is not None
        assert (
            records.unseal(records.PlanRecord, kv.value, key, SECRET).leader == "newer"
        )  # one plan per epoch


async def plan_history(
    settings: EtcdSettings, prefix: str, secret: bytes | None = SECRET
) -> list[records.PlanRecord]:
    """Every version the `plan` key ever had (etcd keeps history until compaction).

    `secret` None: read the records unchecked (the agents' token is not the tests' here).
    """
    key = f"{prefix}plan".encode()
    out: list[records.PlanRecord] = []
    async with Etcd(settings) as etcd:
        last = await etcd.get(key)
        assert last is not None
        stream = etcd.watch_prefix(key, 1)
        try:
            async with asyncio.timeout(5):
                async for batch in stream:
                    for ev in batch:
                        if ev.kind == "put" and ev.kv.key == key:
                            out.append(records.unseal(records.PlanRecord, ev.kv.value, key.decode(), secret))
                    if out and batch and batch[-1].kv.mod_revision >= last.mod_revision:
                        break
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
    return out


def assert_one_plan_per_epoch(history: list[records.PlanRecord]) -> None:
    epochs = [p.epoch for p in history]
    assert epochs == list(range(1, len(epochs) + 1)), epochs  # each epoch once, in order, no gaps


async def test_the_leader_dies_while_re_planning_and_epochs_stay_single(etcd_session: EtcdServer) -> None:
    config = PlanningConfig(RatioPolicy.parse("1:3"), ExpertSpec(16, replication=2), debounce=0.2)
    async with group(etcd_session, "plan-leader-dies", config) as g:
        for i in range(5):
            await g.join(f"a{i}")
        first = await g.settled()
        leader = g.all()[0].leader
        assert leader is not None
        await g.join("late")  # a change: the leader waits out its debounce before it re-plans...
        await g.crash(leader)  # ...and dies inside it
        await g.settled(first + 1, timeout=TTL + 10)
        plan = g.all()[0].plan
        assert plan is not None and plan.leader != leader and leader not in plan.members
        assert "late" in plan.members
        assert_one_plan_per_epoch(await plan_history(g.settings, g.all()[0].prefix))


async def test_load_policy_moves_one_member_per_signal(etcd_session: EtcdServer) -> None:
    policy = LoadPolicy(min_prefill=1, min_decode=1, high_queue=8, low_queue=2, settle_s=0.5)
    config = PlanningConfig(policy, debounce=0.05, tick=0.1)
    async with group(etcd_session, "plan-load", config) as g:
        for i in range(6):
            await g.join(f"a{i}")
        await g.settled()
        plan = g.all()[0].plan
        assert plan is not None and role_counts(plan.roles) == (1, 5)
        first_epoch = plan.epoch
        for m in g.all():  # one signal: prefill saturated, decode idle
            busy = plan.roles[m.config.name] == "prefill"
            await m.put_load(queue_depth=30 if busy else 0)
        await g.settled(first_epoch + 1)
        stepped = g.all()[0].plan
        assert stepped is not None and role_counts(stepped.roles) == (2, 4) and stepped.action == "prefill+1"
        await asyncio.sleep(2.5)  # several settle times and ticks pass, with no new load reported
        later = g.all()[0].plan
        assert later is not None and role_counts(later.roles) == (2, 4)
        assert later.epoch == stepped.epoch  # not twice for one signal
