"""The chaos suite's traffic generator and observer against real agent processes (no cluster):
KV blocks written into the agents' `kv-pool` regions, read back, and copied again when a
holder is SIGKILLed; nothing lost or corrupt, and the plan invariants hold."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from e2e.observe import Member, Observer, Plan, View, healthy
from e2e.traffic import Traffic
from tests.agent.test_cli import TOKEN, AgentProcess, start_agent, token_file, wait_for
from weft.testing.etcd import EtcdServer

pytestmark = pytest.mark.integration
__all__ = ["start_agent", "token_file"]
POOL = 4 << 20


def test_blocks_survive_a_killed_holder_and_are_copied_again(
    etcd: EtcdServer, start_agent: Callable[..., AgentProcess]
) -> None:
    agents = [start_agent(f"a{i}", "--kv-pool-bytes", str(POOL), "--backends", "tcp") for i in range(3)]
    observer = Observer(etcd.endpoint, "default", "g", TOKEN.encode())
    observer.start()
    traffic: Traffic | None = None
    try:
        wait_for("three members and a plan acked by all", lambda: healthy(observer.snapshot(), 3), 30.0)
        # reads only, once written: every copy a1 held must be made again, none rewritten away
        traffic = Traffic(
            observer,
            TOKEN.encode(),
            pool_bytes=POOL,
            block_bytes=64 << 10,
            blocks=24,
            write_ratio=0.0,
            seed=7,
        )
        traffic.start()
        wait_for("every block written", lambda: traffic is not None and traffic.counters.written >= 24, 30.0)
        before = traffic.counters.verified
        assert any(copy.member == "a1" for b in traffic.blocks for copy in b.copies)
        held = sum(copy.member == "a1" for b in traffic.blocks for copy in b.copies)
        agents[1].proc.send_signal(signal.SIGKILL)
        wait_for("the killed member gone", lambda: "a1" not in observer.snapshot().members, 15.0)
        wait_for(
            "its copies made again", lambda: traffic is not None and traffic.counters.repaired >= held, 30.0
        )
        time.sleep(1.0)
        c = traffic.counters
        assert c.verified > before, "reads went on after the kill"
        assert (c.lost, c.corrupt) == (0, 0), traffic.violations
        assert traffic.violations == []
        survivors = {m.process for m in observer.snapshot().members.values()}
        assert all(len(b.copies) == 2 for b in traffic.blocks if b.digest), "every block back to two copies"
        assert all(copy.process in survivors for b in traffic.blocks for copy in b.copies)
    finally:
        if traffic is not None:
            traffic.stop()
        observer.stop()
    assert observer.plan_checks > 0
    assert observer.violations == []


def test_the_observer_catches_a_plan_epoch_written_twice() -> None:
    o = Observer("http://127.0.0.1:1", "ns", "g", b"t" * 32)
    o._check_plan(3, 1, "plan-a")
    o._check_plan(4, 2, "plan-b")
    o._check_plan(4, 2, "plan-b")  # read again, unchanged: fine
    assert o.violations == []
    o._check_plan(5, 5, "plan-c")  # three writes, the epoch grew by one: one epoch written twice
    o._check_plan(5, 6, "plan-d")  # a second, different plan for epoch 5
    o._check_plan(4, 7, "plan-e")  # and back
    assert o.violations == [
        "3 plan writes but the epoch grew by 1 (4->5): an epoch was written twice",
        "two different plans for epoch 5",
        "1 plan writes but the epoch grew by 0 (5->5): an epoch was written twice",
        "two different plans for epoch 4",
        "plan went back: epoch 5->4, version 6->7",
    ]


def test_members_the_plan_no_longer_names_do_not_count_as_holders() -> None:
    """A scale-down drains two members at once: their copies are made again on members that
    stay while they still answer (otherwise a block held by both would be lost)."""
    observer = Observer("http://127.0.0.1:1", "ns", "g", b"t" * 32)
    members = {n: Member(n, 1, f"p-{n}", b"", None, 0) for n in ("a", "b", "c", "d")}
    traffic = Traffic(observer, b"t" * 32, pool_bytes=1 << 20)
    try:
        observer.view = View(etcd_ok=True, members=members, plan=None)
        assert set(traffic._staying(members)) == {"a", "b", "c", "d"}  # no plan yet: all
        observer.view = View(
            etcd_ok=True, members=members, plan=Plan(2, {"a": "prefill", "b": "decode"}, {}, [])
        )
        assert set(traffic._staying(members)) == {"a", "b"}  # c and d are being drained
        observer.view = View(etcd_ok=True, members=members, plan=Plan(3, {"a": "prefill"}, {}, []))
        assert set(traffic._staying(members)) == {"a", "b", "c", "d"}  # fewer than two: all
    finally:
        traffic.agent.close()
