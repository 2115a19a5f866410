"""Plans applied by `weft agent` processes: expert weights move over the fabric, verified."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import pytest

from tests.agent.test_cli import AgentProcess, wait_for
from weft.agent.experts import SyntheticExperts

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
    agents = [start_agent(f"a{i}", *flags) for i in range(6)]
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
        for p in doc["pulled"]:
            if (
                str(p["expert"]) in lost
                and p["source"] != "storage"
                and name in plan["experts"][str(p["expert"])]
            ):
                moved += 1
                assert p["source"] != victim.name
    assert moved >= len(lost)  # every lost replica was re-created from a surviving one, over the fabric
