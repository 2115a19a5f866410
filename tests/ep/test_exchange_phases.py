"""The step's phases without processes or sockets: what happens to a peer that answers, is
lost, is late (a straggler, whether or not it acknowledged), or fails a batch while alive,
decided by `weft.ep.step`."""

from __future__ import annotations

import numpy as np

from weft.ep import EpPlan
from weft.ep import step as step_mod

HIDDEN = 4
DEADLINE = 1.0
# expert e on ranks (e, e+1) mod 4
PLAN = EpPlan.from_placement(1, {e: [f"r{e % 4}", f"r{(e + 1) % 4}"] for e in range(4)})


def _start(ids: list[int]) -> step_mod.Dispatched:
    x = np.arange(len(ids) * HIDDEN, dtype=np.float16).reshape(len(ids), HIDDEN)
    return step_mod.Dispatched.start(PLAN, 1, x, np.asarray(ids, dtype=np.int64))


def _send_all(d: step_mod.Dispatched, routes: dict[str, np.ndarray], now: float) -> None:
    for peer, idx in routes.items():
        step_mod.sent(d, peer, idx, d.next_round, now)
    d.next_round += 1


def test_every_token_is_routed_once_and_done_when_each_peer_answers() -> None:
    d = _start([0, 1, 2, 3, 0, 1, 2, 3])
    routes = step_mod.resend(d, set())
    assert sorted(np.concatenate(list(routes.values())).tolist()) == list(range(8))
    _send_all(d, routes, 0.0)
    for peer in list(d.pending):
        step_mod.take(d, peer, d.x[d.pending[peer]] * 2)
    assert d.finished and not d.missing.any()
    assert np.array_equal(d.out, d.x * 2)


def test_a_straggler_keeps_its_rank_unmasked_and_its_tokens_go_to_a_live_replica() -> None:
    d = _start([1, 1, 1, 1])  # expert 1 on r1 and r2
    _send_all(d, {"r1": np.arange(4)}, now=0.0)
    assert step_mod.overdue(d, 0.5, DEADLINE) == ()
    late = step_mod.overdue(d, 1.5, DEADLINE)
    assert late == ("r1",)  # alive (nothing says otherwise), only slow
    d.stragglers.extend(late)
    routes = step_mod.resend(d, masked=set())
    assert list(routes) == ["r2"] and routes["r2"].tolist() == [0, 1, 2, 3]
    assert d.masked == [] and "r1" in d.pending  # still awaited: its answer counts if first
    _send_all(d, routes, now=1.5)
    step_mod.take(d, "r2", np.full((4, HIDDEN), 7, dtype=np.float16))
    assert d.finished and not d.missing.any() and (d.out == 7).all()
    step_mod.take(d, "r1", np.full((4, HIDDEN), 9, dtype=np.float16))  # late: the first answer stays
    assert (d.out == 7).all()


def test_a_straggler_whose_only_other_replica_is_dead_is_waited_for_not_dropped() -> None:
    d = _start([1, 1])
    _send_all(d, {"r1": np.arange(2)}, now=0.0)
    d.stragglers.extend(step_mod.overdue(d, 2.0, DEADLINE))
    assert step_mod.resend(d, masked={"r2"}) == {}
    assert not d.missing.any() and not d.finished
    step_mod.take(d, "r1", np.ones((2, HIDDEN), dtype=np.float16))
    assert d.finished and not d.missing.any()


def test_a_dead_rank_is_masked_at_once_and_its_tokens_resent_before_any_deadline() -> None:
    d = _start([1, 1, 2, 2])  # 1 on r1, r2; 2 on r2, r3
    _send_all(d, {"r1": np.array([0, 1]), "r2": np.array([2, 3])}, now=0.0)
    step_mod.drop(d, "r1")  # the fabric lost r1, at t = 0.1: no deadline involved
    assert d.masked == ["r1"] and "r1" not in d.pending
    assert step_mod.resend(d, masked={"r1"}) == {}  # r2, the other replica, is busy: wait for it
    step_mod.take(d, "r2", np.ones((2, HIDDEN), dtype=np.float16))
    routes = step_mod.resend(d, masked={"r1"})
    assert {p: t.tolist() for p, t in routes.items()} == {"r2": [0, 1]}
    assert not d.missing.any()


def test_tokens_whose_every_replica_is_dead_are_missing() -> None:
    d = _start([1, 3])  # 1 on r1, r2; 3 on r3, r0
    routes = step_mod.resend(d, masked={"r1", "r2"})
    assert d.missing.tolist() == [True, False]
    assert list(routes) == ["r3"] or list(routes) == ["r0"]


def test_a_rank_past_the_deadline_is_late_whether_or_not_it_acknowledged() -> None:
    d = _start([0, 1])
    _send_all(d, {"r0": np.array([0]), "r1": np.array([1])}, now=0.0)
    d.acked.add("r1")
    assert step_mod.overdue(d, DEADLINE - 0.01, DEADLINE) == ()
    assert step_mod.overdue(d, DEADLINE + 0.2, DEADLINE) == ("r0", "r1")
    d.stragglers.extend(["r0", "r1"])
    assert step_mod.overdue(d, 5.0, DEADLINE) == ()  # a straggler is marked once
    assert step_mod.next_wake(d, DEADLINE) is None  # stragglers set no wake-up
    routes = step_mod.resend(d, masked=set())  # expert 1 has r2 besides r1; expert 0 only stragglers
    assert {p: t.tolist() for p, t in routes.items()} == {"r2": [1]} and not d.missing.any()


def test_a_new_batch_to_a_peer_needs_a_new_acknowledgement() -> None:
    d = _start([1])
    _send_all(d, {"r1": np.array([0])}, now=0.0)
    d.acked.add("r1")
    step_mod.sent(d, "r1", np.array([0]), 1, now=1.0)
    assert "r1" not in d.acked


def test_a_rank_masked_while_the_step_ran_is_reported_even_if_it_held_nothing() -> None:
    d = _start([0])
    d.masked_before = frozenset({"r3"})
    step_mod.drop(d, "r1")
    step_mod.note_masked(d, {"r1", "r2", "r3"})
    assert d.masked == ["r1", "r2"]


def test_tokens_of_a_dead_rank_whose_other_replica_straggles_wait_for_the_straggler() -> None:
    d = _start([1, 1, 2, 2])  # 1 on r1, r2; 2 on r2, r3
    _send_all(d, {"r1": np.array([0, 1]), "r2": np.array([2, 3])}, now=0.0)
    d.stragglers.append("r2")  # r2 late
    step_mod.drop(d, "r1")  # r1 found dead
    routes = step_mod.resend(d, masked={"r1"})  # r2's own tokens to r3; r1's wait: r2 is busy
    assert {p: t.tolist() for p, t in routes.items()} == {"r3": [2, 3]} and not d.missing.any()
    step_mod.take(d, "r2", np.ones((2, HIDDEN), dtype=np.float16))
    routes = step_mod.resend(d, masked={"r1"})
    assert {p: t.tolist() for p, t in routes.items()} == {"r2": [0, 1]} and not d.missing.any()


def test_a_failed_batch_of_a_live_peer_goes_to_another_replica_and_back_to_it_if_none_is_left() -> None:
    d = _start([1, 1, 1, 1])  # expert 1 on r1 and r2
    _send_all(d, {"r1": np.arange(4)}, now=0.0)
    step_mod.fail(d, "r1")  # say, a results slot that did not match its notification
    assert "r1" not in d.pending and d.masked == []
    routes = step_mod.resend(d, masked=set())
    assert {p: t.tolist() for p, t in routes.items()} == {"r2": [0, 1, 2, 3]}
    d2 = _start([1, 1])
    _send_all(d2, {"r1": np.arange(2)}, now=0.0)
    step_mod.fail(d2, "r1")
    routes = step_mod.resend(d2, masked={"r2"})  # r1 is the only live replica left: used again
    assert {p: t.tolist() for p, t in routes.items()} == {"r1": [0, 1]} and not d2.missing.any()


def test_a_live_peer_that_fails_every_batch_is_given_up_for_the_step() -> None:
    d = _start([1, 1])
    for _ in range(step_mod.MAX_FAILURES):
        routes = step_mod.resend(d, masked={"r2"})
        assert list(routes) == ["r1"]
        _send_all(d, routes, now=0.0)
        step_mod.fail(d, "r1")
    assert step_mod.resend(d, masked={"r2"}) == {}
    assert d.missing.all() and d.finished
