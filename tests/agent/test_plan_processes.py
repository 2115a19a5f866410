"""Plans applied by `weft agent` processes: expert weights move over the fabric, verified."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import signals
from tests.agent.test_cli import AgentProcess, wait_for, wait_ready
from tests.agent.test_coordinator import assert_one_plan_per_epoch, plan_history
from tests.s3_fixtures import S3Server
from weft.api.settings import EtcdSettings
from weft.engine.experts import SyntheticExperts, publish_experts
from weft.kvstore import KVStore
from weft.testing.etcd import EtcdServer

pytestmark = pytest.mark.integration

EXPERTS, REPLICATION, EXPERT_BYTES = 32, 2, 64 << 10


def settled(agents: list[AgentProcess]) -> dict[str, Any] | None:
    """The status of every agent once all applied one plan that lists exactly them."""
    docs = {a.name: a.status() for a in agents}
    epochs = {d["applied_epoch"] for d in docs.values()}
    if len(epochs) != 1 or 0 in epochs:
        return None
    return docs if all(set(d["members_planned"]) == set(docs) for d in docs.values()) else None


def test_a_killed_agent_s_experts_are_pulled_from_survivors_and_verified(
    start_agent: Callable[..., AgentProcess],
) -> None:
    flags = ("--experts", str(EXPERTS), "--replication", str(REPLICATION))
    flags += ("--expert-source", f"synthetic:{EXPERT_BYTES}", "--lease-ttl", "2")
    agents = [start_agent(f"a{i}", *flags, wait=False) for i in range(6)]
    wait_ready(*agents)
    before = wait_for("six agents on one plan", lambda: settled(agents), 30.0)
    truth = SyntheticExperts(EXPERT_BYTES)
    placement = before["a0"]["plan"]["experts"]
    for name, doc in before.items():  # everyone holds what the plan gives it, bytes verified
        mine = {e for e, hosts in placement.items() if name in hosts}
        assert mine <= set(doc["experts"])
        assert all(doc["experts"][e] == truth.digest(int(e)) for e in mine)
    victim = agents[3]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    survivors = [a for a in agents if a is not victim]
    after = wait_for("a new plan applied by every survivor", lambda: settled(survivors), 30.0)
    plan = after["a0"]["plan"]
    assert plan["epoch"] > before["a0"]["plan"]["epoch"] and not plan["under_replicated"]
    lost = {e for e, hosts in placement.items() if victim.name in hosts}
    for hosts in plan["experts"].values():
        assert len(hosts) == REPLICATION and victim.name not in hosts
    moved = 0
    for name, doc in after.items():
        mine = {e for e, hosts in plan["experts"].items() if name in hosts}
        assert all(doc["experts"][e] == truth.digest(int(e)) for e in mine)
        for p in doc["pulled"][len(before[name]["pulled"]) :]:  # the pulls since the kill
            if (
                str(p["expert"]) in lost
                and p["source"] != "storage"
                and name in plan["experts"][str(p["expert"])]
            ):
                moved += 1
                assert p["source"] != victim.name
    assert moved >= len(lost)  # every lost replica was re-created from a surviving one, over the fabric


def roles_of(doc: dict[str, Any]) -> tuple[int, int]:
    roles = list(doc["plan"]["roles"].values())
    return roles.count("prefill"), roles.count("decode")


@pytest.mark.timeout(150)  # its own deadlines: two starts and two plans, 30 s each, and teardown
def test_eight_then_twelve_agents_at_1_to_3_with_no_flips(start_agent: Callable[..., AgentProcess]) -> None:
    agents = [start_agent(f"a{i}", "--ratio", "1:3", wait=False) for i in range(8)]
    wait_ready(*agents)
    eight = wait_for("eight agents on one plan", lambda: settled(agents), 30.0)
    assert roles_of(eight["a0"]) == (2, 6)
    before = eight["a0"]["plan"]["roles"]
    late = [start_agent(f"b{i}", "--ratio", "1:3", wait=False) for i in range(4)]
    wait_ready(*late)
    agents += late
    twelve = wait_for("twelve agents on one plan", lambda: settled(agents), 30.0)
    after = twelve["a0"]["plan"]["roles"]
    assert roles_of(twelve["a0"]) == (3, 9)
    assert all(after[name] == role for name, role in before.items())  # the fewest flips: none
    assert all(doc["role"] == after[name] for name, doc in twelve.items())  # each serves its role


def test_a_stopped_leader_cannot_write_and_each_epoch_has_one_plan(
    etcd: EtcdServer, start_agent: Callable[..., AgentProcess]
) -> None:
    agents = [start_agent(f"a{i}", "--ratio", "1:1", "--lease-ttl", "2", wait=False) for i in range(4)]
    wait_ready(*agents)
    first = wait_for("four agents on one plan", lambda: settled(agents), 30.0)
    leader_name = first["a0"]["leader"]
    leader = next(a for a in agents if a.name == leader_name)
    signals.send(leader.proc.pid, signal.SIGSTOP)  # paused in the middle of its work
    try:
        agents.append(start_agent("late", "--ratio", "1:1", "--lease-ttl", "2"))  # a change to plan
        others = [a for a in agents if a is not leader]
        after = wait_for("a new leader's plan without the paused one", lambda: settled(others), 30.0)
        assert after["late"]["plan"]["epoch"] > first["a0"]["plan"]["epoch"]
    finally:
        leader.proc.send_signal(signal.SIGCONT)
    # it notices it was fenced, rejoins, and the group plans it back in: never two plans an epoch
    wait_for("everyone on one plan again", lambda: settled(agents), 30.0)
    settings = EtcdSettings(endpoints=[etcd.endpoint])
    assert_one_plan_per_epoch(asyncio.run(plan_history(settings, "/weft/v1/default/g/", secret=None)))


def test_experts_with_no_surviving_replica_come_back_from_the_kv_store_on_s3(
    start_agent: Callable[..., AgentProcess], s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """The tier is shared: this process stores the experts in S3, the agents (other processes)
    load them from there, and when the only holder of some experts is killed (replication 1),
    their new hosts restore them from S3, checked against the published digests."""
    config = tmp_path / "lmcache-config.yaml"
    config.write_text(
        "chunk_size: 256\nnixl_buffer_size: 1073741824\nnixl_buffer_device: cpu\n"
        "extra_config:\n  enable_nixl_storage: true\n  nixl_backend: OBJ\n  nixl_pool_size: 8\n"
        f"  nixl_backend_params:\n    bucket: {s3_bucket}\n    access_key: {s3_server.access_key}\n"
        f"    secret_key: {s3_server.secret_key}\n    region: {s3_server.region}\n"
        f"    endpoint_override: {s3_server.endpoint}\n"
    )
    weights = {e: np.random.default_rng(e).integers(0, 256, EXPERT_BYTES, dtype=np.uint8) for e in range(16)}
    with KVStore.from_lmcache_config(config) as kv:
        published = publish_experts(kv, weights)
    flags = ("--experts", "16", "--replication", "1", "--expert-source", f"kv:{config}", "--lease-ttl", "2")
    agents = [start_agent(f"a{i}", *flags, wait=False) for i in range(4)]
    wait_ready(*agents)
    before = wait_for("four agents on one plan", lambda: settled(agents), 30.0)
    placement = before["a0"]["plan"]["experts"]
    for name, doc in before.items():
        mine = {e for e, hosts in placement.items() if name in hosts}
        assert mine and all(doc["experts"][e] == published[int(e)] for e in mine)
    first_loads = [p for doc in before.values() for p in doc["pulled"] if p["source"] == "storage"]
    assert first_loads  # the agents read what this process stored (later joiners pull from peers)
    victim = agents[1]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    survivors = [a for a in agents if a is not victim]
    after = wait_for("a new plan applied by every survivor", lambda: settled(survivors), 30.0)
    plan = after["a0"]["plan"]
    lost = {e for e, hosts in placement.items() if victim.name in hosts}
    assert lost and not plan["under_replicated"]
    restored = set()
    for name, doc in after.items():
        mine = {e for e, hosts in plan["experts"].items() if name in hosts}
        assert all(doc["experts"][e] == published[int(e)] for e in mine)
        restored |= {
            str(p["expert"]) for p in doc["pulled"] if p["source"] == "storage" and str(p["expert"]) in lost
        }
    assert restored == lost  # no replica survived: every one came back from the shared tier
