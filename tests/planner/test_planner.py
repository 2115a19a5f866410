"""The planner's invariants, by property tests (hypothesis) and a few worked examples."""

from __future__ import annotations

import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from weft.planner import (
    ExpertSpec,
    LoadPolicy,
    MemberInfo,
    RatioPolicy,
    next_plan,
    place_experts,
    ratio_counts,
)
from weft.planner.roles import assign, role_counts

ROLE = st.sampled_from(["prefill", "decode", None])


@st.composite
def members(
    draw: st.DrawFn, min_size: int = 0, max_size: int = 40, gpu_less: bool = False
) -> list[MemberInfo]:
    n = draw(st.integers(min_size, max_size))
    return [
        MemberInfo(
            f"m{i:03d}",
            gpus=draw(st.integers(0, 2)) if gpu_less else 1,
            role=draw(ROLE),
            queue_depth=draw(st.integers(0, 20)),
        )
        for i in range(n)
    ]


ratios = st.builds(
    RatioPolicy,
    prefill=st.integers(0, 5),
    decode=st.integers(0, 5),
    min_prefill=st.integers(0, 4),
    min_decode=st.integers(0, 4),
).filter(lambda p: True)


def _ratio(a: int, b: int, mp: int, md: int) -> RatioPolicy:
    assume(a + b > 0)
    return RatioPolicy(a, b, mp, md)


@settings(max_examples=400, deadline=None)
@given(members(), st.integers(0, 5), st.integers(0, 5), st.integers(0, 4), st.integers(0, 4))
def test_role_counts_follow_the_ratio_with_fewest_flips(
    ms: list[MemberInfo], a: int, b: int, mp: int, md: int
) -> None:
    policy = _ratio(a, b, mp, md)
    change = next_plan(None, ms, policy)
    roles = change.plan.roles
    n = len(ms)
    p, d = ratio_counts(n, policy)
    assert set(roles) == {m.name for m in ms}
    assert role_counts(roles) == (p, d)
    if n:
        exact = n * a / (a + b)
        assert abs(p - exact) <= 0.5 or p == min(mp, n) or d == min(md, n) or p >= min(mp, n)
        assert p >= min(mp, n) and (d >= min(md, n) or p == min(mp, n))
    have_p = sum(1 for m in ms if m.role == "prefill")
    have_d = sum(1 for m in ms if m.role == "decode")
    assert change.role_flips == max(0, have_p - p) + max(0, have_d - d)  # the fewest possible


@settings(max_examples=300, deadline=None)
@given(members(gpu_less=True), st.integers(0, 40))
def test_gpu_less_members_only_take_allowed_roles(ms: list[MemberInfo], prefill: int) -> None:
    prefill = min(prefill, len(ms))
    roles, _ = assign(ms, prefill, frozenset({"decode"}))
    gpu = sum(1 for m in ms if m.gpus > 0)
    if gpu >= prefill:
        assert all(roles[m.name] == "decode" for m in ms if m.gpus == 0)
        assert role_counts(roles)[0] == prefill


specs = st.builds(
    ExpertSpec,
    experts=st.integers(0, 64),
    replication=st.integers(1, 4),
    redundant_slots=st.integers(0, 16),
)
loads = st.dictionaries(st.integers(0, 63), st.floats(0.01, 100.0), max_size=64)
names = st.lists(st.sampled_from([f"m{i:02d}" for i in range(30)]), unique=True, max_size=30)


@settings(max_examples=400, deadline=None)
@given(specs, names, loads)
def test_every_expert_has_its_replicas_on_distinct_live_members(
    spec: ExpertSpec, live: list[str], load: dict[int, float]
) -> None:
    placement = place_experts(spec, live, None, load)
    base = min(spec.replication, len(live))
    assert set(placement.experts) == set(range(spec.experts))
    for hosts in placement.experts.values():
        assert len(set(hosts)) == len(hosts) >= base
        assert set(hosts) <= set(live)  # nothing on a dead or draining member
    assert placement.under_replicated == (() if live or not spec.experts else tuple(range(spec.experts)))


@settings(max_examples=300, deadline=None)
@given(specs, names, loads, st.integers(1, 6))
def test_short_capacity_reports_under_replicated(
    spec: ExpertSpec, live: list[str], load: dict[int, float], slots: int
) -> None:
    spec = ExpertSpec(spec.experts, spec.replication, spec.redundant_slots, slots_per_member=slots)
    placement = place_experts(spec, live, None, load)
    base = min(spec.replication, len(live))
    per_member: dict[str, int] = {}
    for e, hosts in placement.experts.items():
        assert len(set(hosts)) == len(hosts)
        for h in hosts:
            per_member[h] = per_member.get(h, 0) + 1
        assert (e in placement.under_replicated) == (len(hosts) < base or not live)
    assert all(c <= slots for c in per_member.values())
    if spec.experts * base <= slots * len(live):
        assert placement.under_replicated == () or not live


@settings(max_examples=300, deadline=None)
@given(specs, names.filter(lambda n: len(n) >= 2), loads, st.data())
def test_a_single_leave_moves_only_what_the_leaver_hosted_plus_a_bounded_rebalance(
    spec: ExpertSpec, live: list[str], load: dict[int, float], data: st.DataObject
) -> None:
    before = place_experts(spec, live, None, load)
    leaver = data.draw(st.sampled_from(live))
    after = place_experts(spec, [m for m in live if m != leaver], before.experts, load)
    hosted = sum(1 for hosts in before.experts.values() if leaver in hosts)
    assert after.repairs <= hosted  # a dead-end repair costs one extra move, at most one per replica
    assert len(after.added) <= hosted + after.repairs + spec.rebalance_moves
    for e, hosts in after.experts.items():
        assert leaver not in hosts
        kept = set(before.experts[e]) - {leaver}
        # what stayed stays, unless a rebalance move took it (bounded) or replicas shrank (r > members)
        assert len(kept - set(hosts)) <= spec.rebalance_moves + after.repairs or len(hosts) < len(
            before.experts[e]
        )


@settings(max_examples=200, deadline=None)
@given(members(min_size=1), specs, loads, st.randoms(use_true_random=False))
def test_same_inputs_same_plan_and_epochs_grow(
    ms: list[MemberInfo], spec: ExpertSpec, load: dict[int, float], rnd: random.Random
) -> None:
    policy = RatioPolicy(1, 3)
    first = next_plan(None, ms, policy, spec, load).plan
    shuffled = list(ms)
    rnd.shuffle(shuffled)
    again = next_plan(None, shuffled, policy, spec, load).plan
    assert again == first
    second = next_plan(first, ms, policy, spec, load).plan
    assert second.epoch == first.epoch + 1 == 2
    assert second.roles == first.roles  # nothing changed: no role moves
    # placement converges: re-planning the same inputs stops moving replicas within a few rounds
    plan = second
    for _ in range(40):
        following = next_plan(plan, ms, policy, spec, load).plan
        if following.experts == plan.experts:
            break
        assert following.epoch == plan.epoch + 1
        plan = following
    else:
        pytest.fail("placement did not converge in 40 re-plans")


def test_eight_then_twelve_members_at_1_to_3() -> None:
    policy = RatioPolicy.parse("1:3")
    eight = next_plan(None, [MemberInfo(f"a{i}") for i in range(8)], policy).plan
    assert role_counts(eight.roles) == (2, 6)
    current = [MemberInfo(n, role=r) for n, r in eight.roles.items()]
    twelve = next_plan(eight, [*current, *(MemberInfo(f"b{i}") for i in range(4))], policy)
    assert role_counts(twelve.plan.roles) == (3, 9)
    assert twelve.role_flips == 0  # the newcomers fill the new prefill seat


def test_load_policy_steps_once_per_signal() -> None:
    policy = LoadPolicy(min_prefill=1, min_decode=1, high_queue=8, low_queue=2, settle_s=10)
    ms = [MemberInfo("p0", role="prefill"), *(MemberInfo(f"d{i}", role="decode") for i in range(5))]
    base = next_plan(None, ms, policy, now=100.0).plan
    assert role_counts(base.roles) == (1, 5) and base.action is None
    hot = [
        MemberInfo("p0", role="prefill", queue_depth=30, load_at=101.0),
        *(MemberInfo(f"d{i}", role="decode", queue_depth=0, load_at=101.0) for i in range(5)),
    ]
    step = next_plan(base, hot, policy, now=102.0).plan
    assert role_counts(step.roles) == (2, 4) and step.action == "prefill+1"
    again = [
        MemberInfo(m.name, role=step.roles[m.name], queue_depth=m.queue_depth, load_at=101.0) for m in hot
    ]
    same_signal = next_plan(step, again, policy, now=103.0).plan
    assert role_counts(same_signal.roles) == (2, 4) and same_signal.action is None  # not twice for one signal
    fresh = [
        MemberInfo(m.name, role=step.roles[m.name], queue_depth=m.queue_depth, load_at=104.0) for m in hot
    ]
    too_soon = next_plan(same_signal, fresh, policy, now=105.0).plan
    assert too_soon.action is None  # no stacked actions before the step settles
    later = next_plan(too_soon, fresh, policy, now=113.0).plan
    assert later.action == "prefill+1" and role_counts(later.roles) == (3, 3)


def test_load_policy_latency_targets_with_hysteresis() -> None:
    """A TTFT target saturates prefill even with short queues; decode can spare a member only
    while its ITL is under half its target (the band between holds still)."""
    policy = LoadPolicy(high_queue=8, low_queue=2, settle_s=0, ttft_p90_ms=500, itl_p90_ms=50)
    roles = {"p0": "prefill", "d0": "decode", "d1": "decode"}
    base = next_plan(None, [MemberInfo(n, role=r) for n, r in roles.items()], policy, now=100.0).plan

    def members(ttft: float, itl: float) -> list[MemberInfo]:
        return [
            MemberInfo("p0", role="prefill", queue_depth=1, ttft_p90_ms=ttft, load_at=101.0),
            *(
                MemberInfo(n, role="decode", queue_depth=0, itl_p90_ms=itl, load_at=101.0)
                for n in ("d0", "d1")
            ),
        ]

    held = next_plan(base, members(ttft=900, itl=30), policy, now=102.0).plan
    assert held.action is None  # decode's ITL is inside the band: not idle enough to give one up
    step = next_plan(base, members(ttft=900, itl=10), policy, now=102.0).plan
    assert step.action == "prefill+1" and role_counts(step.roles) == (2, 1)
    assert "TTFT 900 ms" in step.reason
    calm = next_plan(base, members(ttft=400, itl=10), policy, now=102.0).plan
    assert calm.action is None  # under the target: nothing to do
    with pytest.raises(ValueError, match="latency targets"):
        LoadPolicy(ttft_p90_ms=0)


def test_ratio_parse_errors() -> None:
    with pytest.raises(ValueError, match="PREFILL:DECODE"):
        RatioPolicy.parse("1-3")
    with pytest.raises(ValueError, match="not both 0"):
        RatioPolicy.parse("0:0")
