"""Wide expert parallelism with every rank its own OS process (fabric agent + membership),
the plan in a real etcd: 8 ranks, 32 experts twice each."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from tests.conftest import SECRET
from tests.memberproc import MemberProcess, start_members
from weft.api import records
from weft.api.settings import EtcdSettings
from weft.membership._etcd import Etcd
from weft.planner.experts import ExpertSpec, place_experts
from weft.testing.etcd import EtcdServer

pytestmark = pytest.mark.integration
RANKS, EXPERTS, HIDDEN, TOKENS = 8, 32, 1024, 4096
# 8 ranks share 2 cores here: a live rank serving 7 peers' batches can take most of a second,
# so the steps that must not mask anyone get a 2 s deadline; the kill test uses 1 s
CALM = 2.0
GROUP = "ep"


async def _write_plan(endpoint: str, epoch: int, members: list[str]) -> dict[int, tuple[str, ...]]:
    placement = place_experts(ExpertSpec(EXPERTS, replication=2), members).experts
    record = records.PlanRecord(
        epoch=epoch, members=members, roles={m: "decode" for m in members},
        experts={str(e): list(h) for e, h in placement.items()}, leader=members[0], leader_generation=1,
    )  # fmt: skip
    key = f"/weft/v1/default/{GROUP}/plan"
    async with Etcd(EtcdSettings(endpoints=[endpoint])) as etcd:
        await etcd.put(key.encode(), records.seal(record, key, SECRET))
    return placement


@pytest.fixture
def ranks(etcd: EtcdServer) -> Iterator[list[MemberProcess]]:
    import asyncio

    names = [f"rank{i}" for i in range(RANKS)]
    members = start_members(names, etcd.endpoint, GROUP)
    try:
        deadline = time.monotonic() + 30
        while not all(len(m.view()["agent_peers"]) == RANKS - 1 for m in members):
            assert time.monotonic() < deadline, "ranks did not all see each other"
            time.sleep(0.2)
        asyncio.run(_write_plan(etcd.endpoint, 1, names))
        yield members
    finally:
        for m in members:
            m.close()


def _steps(
    members: list[MemberProcess], seed: int, fn: str, timeout: float = 60.0
) -> list[dict[str, object]]:
    tickets = [(m, m.send("ep_step", seed + i, TOKENS, fn, EXPERTS)) for i, m in enumerate(members)]
    return [m.result(t, timeout) for m, t in tickets]


@pytest.mark.parametrize("fn", ["identity", "per-expert"])
def test_every_token_comes_back_through_its_expert_in_order(ranks: list[MemberProcess], fn: str) -> None:
    for m in ranks:
        assert m.call("ep_start", HIDDEN, fn, 2048, CALM) == 1
    for seed in (1, 100):
        for got in _steps(ranks, seed, fn):
            assert got["wrong"] == 0 and got["missing"] == 0 and got["masked"] == [], got
    assert all(int(m.call("ep_step", 7, TOKENS, fn, EXPERTS)["served"]) > 0 for m in ranks[:1])


def test_a_rank_killed_mid_dispatch_costs_a_deadline_not_the_step(
    ranks: list[MemberProcess], etcd: EtcdServer
) -> None:
    import asyncio

    deadline = 1.0
    for m in ranks:
        m.call("ep_start", HIDDEN, "per-expert", 2048, deadline)
    normal = max(float(g["seconds"]) for g in _steps(ranks, 1, "per-expert"))
    victim, survivors = ranks[3], [m for i, m in enumerate(ranks) if i != 3]
    tickets = [(m, m.send("ep_step", 50 + i, TOKENS, "per-expert", EXPERTS)) for i, m in enumerate(survivors)]
    time.sleep(normal / 3)
    victim.kill(signal.SIGKILL)  # while the survivors' batches are on the way or being served
    results = [m.result(t, 60.0) for m, t in tickets]
    placement = asyncio.run(_write_plan(etcd.endpoint, 1, [m.name for m in ranks]))  # what epoch 1 was
    only_on_victim = {e for e, hosts in placement.items() if set(hosts) <= {victim.name}}
    for got in results:
        assert got["wrong"] == 0, got  # every token with a live replica: processed once, right
        assert set(got["missing_experts"]) <= only_on_victim, got  # the rest reported
        assert float(got["seconds"]) <= 2 * normal + deadline + 1.0, (got, normal)
    assert any(victim.name in got["masked"] for got in results)
    worst = max(float(got["seconds"]) for got in results)
    print(f"8 ranks, {TOKENS} tokens x {HIDDEN}: step {normal:.3f} s; with a rank SIGKILLed {worst:.3f} s")
    # the next plan leaves the victim out; ranks move to it and the step is whole again
    asyncio.run(_write_plan(etcd.endpoint, 2, [m.name for m in survivors]))
    for m in survivors:
        assert m.call("ep_reload") == 2
    for got in _steps(survivors, 90, "per-expert"):
        assert got["wrong"] == 0 and got["missing"] == 0 and got["masked"] == [], got


def test_stale_epochs_and_malformed_messages_are_refused_and_ranks_keep_serving(
    ranks: list[MemberProcess], etcd: EtcdServer
) -> None:
    import asyncio

    for m in ranks:
        m.call("ep_start", HIDDEN, "identity", 2048, CALM)
    ranks[0].call("ep_junk", ranks[1].name)
    asyncio.run(_write_plan(etcd.endpoint, 2, [m.name for m in ranks]))
    for m in ranks[1:]:
        m.call("ep_reload")
    got = ranks[0].call("ep_step", 3, TOKENS, "identity", EXPERTS)  # still on epoch 1
    assert str(got["error"]).startswith("EpochMismatchError"), got
    ranks[0].call("ep_reload")
    for got in _steps(ranks, 4, "identity"):
        assert got["wrong"] == 0 and got["missing"] == 0, got
    assert int(ranks[1].call("ep_step", 5, 16, "identity", EXPERTS)["refused"]) >= 7


def test_a_frozen_rank_costs_a_deadline_and_no_token(ranks: list[MemberProcess]) -> None:
    """SIGSTOP: no connection breaks, so to the data path the rank is alive but late: past the
    straggler deadline its tokens go to replicas, step after step, and no token is lost (it
    is masked only once the group sees it dead: tests/ep/test_exchange_inproc.py)."""
    deadline = 1.0
    for m in ranks:
        m.call("ep_start", HIDDEN, "identity", 2048, deadline)
    normal = max(float(g["seconds"]) for g in _steps(ranks, 1, "identity"))
    frozen, others = ranks[5], [m for i, m in enumerate(ranks) if i != 5]
    frozen.kill(signal.SIGSTOP)
    try:
        first = _steps(others, 20, "identity")
        results = first + _steps(others, 30, "identity")
    finally:
        frozen.kill(signal.SIGCONT)
    for got in first:  # its tokens went elsewhere (or membership had dropped it: masked)
        assert int(got["redispatched"]) > 0 or frozen.name in got["masked"], got
    for got in results:
        assert got["wrong"] == 0 and got["missing"] == 0, got  # every expert has a replica elsewhere
        assert float(got["seconds"]) <= 2 * normal + deadline + 1.0, (got, normal)
    worst = max(float(got["seconds"]) for got in results)
    print(f"8 ranks: step {normal:.3f} s; with a rank frozen {worst:.3f} s (straggler deadline {deadline} s)")
