"""A rank lost at each phase of a step, made to happen at a chosen point (agents of this
process over TCP, a gate in the victim's path): before its batch is taken, while it serves
it, after it computed but before its results are sent. The surviving replica of the lost
rank's experts is the caller itself or another rank. Whatever the phase, a token whose
expert still has a live replica is computed, right, within the step, and no deadline is
waited for."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from weft.ep import EpPlan, Exchange, slots, wire
from weft.fabric.agent import Agent
from weft.fabric.config import AgentConfig

SECRET = b"ep-kill-secret-0123456789abcdef"
HIDDEN = 32
DEADLINE = 5.0  # long: a step that ends well before it did not wait for it
WAIT = 10.0  # bound of every wait on a thread of the test


def scale(e: int, rows: np.ndarray) -> np.ndarray:
    return (rows * np.float16(1 + e % 4)).astype(np.float16)


class Gate:
    """A point in the victim's path: the victim stops there until the test lets it go."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()

    def stop_here(self) -> None:
        self.reached.set()
        assert self.go.wait(WAIT), "the test never let the victim go on"


@pytest.fixture
def ranks() -> Iterator[list[Exchange]]:
    names = [f"r{i}" for i in range(4)]
    agents = [Agent(n, AgentConfig(["tcp"], secret=SECRET)) for n in names]
    for a in agents:
        for b in agents:
            if a is not b:
                a.add_peer(b.metadata())
    plan = EpPlan.from_placement(1, {e: [names[e % 4], names[(e + 1) % 4]] for e in range(8)})
    ex = [Exchange(a, plan, scale, hidden=HIDDEN, max_tokens=256, deadline=DEADLINE) for a in agents]
    yield ex
    for e in ex:
        e.close()
    for a in agents:
        a.close()


def _before_taken(victim: Exchange, gate: Gate) -> None:
    """The victim's batch arrives (the WRITE and its notification) but is never taken."""

    def never_taken(peer: str, note: wire.Note) -> None:
        gate.stop_here()

    victim._box.on_dispatch = never_taken


def _while_serving(victim: Exchange, gate: Gate) -> None:
    """The victim acknowledged its batch and is computing it."""
    fn = victim._server.expert_fn

    def slow(e: int, rows: np.ndarray) -> np.ndarray:
        gate.stop_here()
        return fn(e, rows)

    victim._server.expert_fn = slow


def _before_results(victim: Exchange, gate: Gate) -> None:
    """The victim computed its batch; its results are not sent yet."""
    post = victim._slots.post

    def held(local: Any, region: str, peer: str, at: tuple[int, int], nbytes: int, note: bytes) -> Any:
        if region == slots.RESULTS:
            gate.stop_here()
        return post(local, region, peer, at, nbytes, note)

    victim._slots.post = held  # type: ignore[method-assign,assignment]


PHASES: dict[str, Callable[[Exchange, Gate], None]] = {
    "before-taken": _before_taken,
    "while-serving": _while_serving,
    "before-results": _before_results,
}


@pytest.mark.parametrize("phase", sorted(PHASES))
@pytest.mark.parametrize("survivor", ["local", "remote"])
def test_a_rank_lost_at_any_phase_costs_no_token_with_a_live_replica(
    ranks: list[Exchange], phase: str, survivor: str
) -> None:
    victim = ranks[2]  # expert 1 is on r1 and r2, expert 2 on r2 and r3
    caller = ranks[1] if survivor == "local" else ranks[0]
    gate = Gate()
    PHASES[phase](victim, gate)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((96, HIDDEN)).astype(np.float16)
    ids = np.array([1, 2, 1, 1, 2, 5, 6, 1] * 12)  # 1, 5 on r1+r2; 2, 6 on r2+r3
    got: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        got["result"] = caller.step(x, ids)
        got["seconds"] = time.monotonic() - started

    t = threading.Thread(target=run)
    t.start()
    try:
        assert gate.reached.wait(WAIT), f"the victim never reached {phase}"
        victim.agent.close()  # its connections close: the caller's fabric sees it lost
    finally:
        gate.go.set()
        t.join(WAIT)
    assert not t.is_alive(), "the step did not end"
    res = got["result"]
    assert not res.missing.any(), ids[res.missing]  # every expert has a replica off r2
    want = np.stack([scale(int(e), row[None])[0] for row, e in zip(x, ids, strict=True)])
    assert np.array_equal(res.out, want)
    assert "r2" in res.masked and res.redispatched > 0
    assert got["seconds"] < DEADLINE / 2, got["seconds"]  # no deadline was waited for
