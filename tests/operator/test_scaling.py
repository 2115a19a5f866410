"""`weft.operator.scaling.decide`: HPA's algorithm on the members' load records, by worked
examples and by properties (bounds, step, tolerance, determinism)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.api import autoscaling as api
from weft.api.records import LoadRecord, Percentiles
from weft.api.transfergroup import TransferGroupSpec
from weft.operator import scaling
from weft.operator.scaling import Bounds, Recommendation, decide

ETCD = {"endpoints": ["http://127.0.0.1:2379"], "joinTokenSecretRef": {"name": "join"}}


def auto(**targets: float) -> api.Autoscaling:
    return api.Autoscaling.model_validate(
        {
            "enabled": True,
            "targets": targets,
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 0, "maxStep": 4},
                "scaleDown": {"stabilizationWindowSeconds": 0, "maxStep": 1},
            },
        }
    )


def loads(*queues: int, kv: float = 0.0, ttft: float | None = None) -> list[LoadRecord]:
    return [
        LoadRecord(
            name=f"m{i}",
            generation=1,
            queue_depth=q,
            kv_cache_usage=kv,
            ttft_ms=None if ttft is None else Percentiles(p50=ttft / 2, p90=ttft, p99=ttft * 2),
        )
        for i, q in enumerate(queues)
    ]


WIDE = Bounds(1, 64)


def test_the_section_s_defaults_are_hpa_s() -> None:
    a = api.Autoscaling.model_validate({})
    assert not a.enabled and a.targets.configured() == {}
    assert a.behavior.tolerance == 0.1
    assert (a.behavior.scale_up.stabilization_window_seconds, a.behavior.scale_up.max_step) == (0, 4)
    assert (a.behavior.scale_down.stabilization_window_seconds, a.behavior.scale_down.max_step) == (300, 1)
    assert api.problems(api.Autoscaling.model_validate({"enabled": True})) != []
    assert api.problems(auto(kvCacheUsage=0.8)) == []


@pytest.mark.parametrize(
    "bad",
    [
        {"targets": {"kvCacheUsage": 1.5}},
        {"targets": {"queueDepthPerMember": 0}},
        {"targets": {"ttftP90Ms": -1}},
        {"behavior": {"tolerance": 2}},
        {"behavior": {"scaleUp": {"maxStep": 0}}},
        {"behavior": {"scaleDown": {"stabilizationWindowSeconds": 99999}}},
        {"surprise": True},
    ],
)
def test_nonsense_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        api.Autoscaling.model_validate(bad)


def test_the_floor_is_what_the_spec_needs() -> None:
    def spec(**fields: Any) -> TransferGroupSpec:
        return TransferGroupSpec.model_validate({"etcd": ETCD, **fields})

    assert scaling.bounds(spec()) == Bounds(2, 64)  # minPrefill 1 + minDecode 1
    assert scaling.bounds(spec(roles={"minPrefill": 0, "minDecode": 0})) == Bounds(1, 64)
    assert scaling.bounds(spec(minReplicas=3, maxReplicas=10)) == Bounds(3, 10)
    assert scaling.bounds(spec(experts={"count": 8, "replication": 5})) == Bounds(5, 64)
    assert scaling.bounds(spec(experts={"count": 0, "replication": 5})) == Bounds(2, 64)
    assert scaling.bounds(spec(roles={"policy": "load", "minPrefill": 4})) == Bounds(1, 64)
    assert scaling.bounds(spec(minReplicas=9, maxReplicas=4)) == Bounds(4, 4)


def test_queue_depth_scales_up_by_hpa_s_formula() -> None:
    d = decide(2, auto(queueDepthPerMember=4), WIDE, loads(12, 8), (), 0.0)  # mean 10: ceil(2 * 2.5)
    assert (d.replicas, d.readings[0].value, d.readings[0].replicas) == (5, 10.0, 5)
    assert d.changed and "queueDepthPerMember 10" in d.reason and "2 -> 5" in d.reason


def test_the_step_limits_one_decision() -> None:
    d = decide(2, auto(queueDepthPerMember=1), WIDE, loads(50, 50), (), 0.0)
    assert d.readings[0].replicas == 100 and d.replicas == 6  # +4
    assert "recommended 64" in d.reason  # the ceiling clamps the recommendation first


def test_within_the_tolerance_nothing_changes() -> None:
    assert decide(4, auto(queueDepthPerMember=10), WIDE, loads(11, 9, 10, 10), (), 0.0).replicas == 4
    assert decide(4, auto(queueDepthPerMember=10), WIDE, loads(11, 11, 11, 11), (), 0.0).replicas == 4
    assert decide(4, auto(queueDepthPerMember=10), WIDE, loads(12, 12, 12, 12), (), 0.0).replicas == 5


def test_no_load_no_change_and_zero_replicas_wait() -> None:
    d = decide(3, auto(queueDepthPerMember=1), WIDE, [], (), 0.0)
    assert d.replicas == 3 and "no member reports load" in d.reason
    d = decide(3, auto(ttftP90Ms=100), WIDE, loads(5, 5), (), 0.0)  # nobody reports TTFT
    assert d.replicas == 3 and "ttftP90Ms" in d.reason
    assert decide(0, auto(queueDepthPerMember=1), WIDE, loads(50), (), 0.0).replicas == 0


def test_scale_down_one_step_never_below_the_floor() -> None:
    d = decide(4, auto(queueDepthPerMember=10), Bounds(3, 8), loads(0, 0, 0, 0), (), 0.0)
    assert d.replicas == 3 and "bounds 3..8" in d.reason
    assert decide(3, auto(queueDepthPerMember=10), Bounds(3, 8), loads(0, 0, 0), (), 1.0).replicas == 3


def test_members_not_reporting_yet_do_not_feed_a_scale_up() -> None:
    """4 replicas, 2 report (2 pods just added): the missing two count as idle."""
    d = decide(4, auto(queueDepthPerMember=4), WIDE, loads(8, 8), (), 0.0)
    assert d.replicas == 4  # (8 + 8 + 0 + 0) / 4 = 4: on target
    # and as on target for a scale-down: (0 + 0 + 4 + 4) / 4 = 2 -> ceil(4 * 0.5)
    assert decide(4, auto(queueDepthPerMember=4), WIDE, loads(0, 0), (), 0.0).replicas == 3
    # TTFT (the worst member): no scale-up until every replica reports
    assert decide(4, auto(ttftP90Ms=100), WIDE, loads(0, 0, ttft=400), (), 0.0).replicas == 4
    assert decide(4, auto(ttftP90Ms=100), WIDE, loads(0, 0, 0, 0, ttft=200), (), 0.0).replicas == 8


def test_the_largest_recommendation_wins() -> None:
    d = decide(2, auto(queueDepthPerMember=10, kvCacheUsage=0.5), WIDE, loads(10, 10, kv=1.0), (), 0.0)
    assert [(r.metric, r.replicas) for r in d.readings] == [("queueDepthPerMember", 2), ("kvCacheUsage", 4)]
    assert d.replicas == 4


def test_scale_down_takes_the_highest_recommendation_of_its_window() -> None:
    a = api.Autoscaling.model_validate(
        {
            "enabled": True,
            "targets": {"queueDepthPerMember": 10},
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60, "maxStep": 8}},
        }
    )
    first = decide(8, a, WIDE, loads(*[10] * 8), (), 0.0)
    assert first.replicas == 8
    low = decide(8, a, WIDE, loads(*[1] * 8), first.history, 30.0)  # recommends 1, but 8 was 30 s ago
    assert low.replicas == 8 and "stabilizing" in low.reason
    later = decide(8, a, WIDE, loads(*[1] * 8), low.history, 61.0)  # the 8 left the window
    assert later.replicas == 1


def test_scale_up_takes_the_lowest_recommendation_of_its_window() -> None:
    a = api.Autoscaling.model_validate(
        {
            "enabled": True,
            "targets": {"queueDepthPerMember": 10},
            "behavior": {"scaleUp": {"stabilizationWindowSeconds": 20, "maxStep": 100}},
        }
    )
    calm = decide(2, a, WIDE, loads(10, 10), (), 0.0)
    spike = decide(2, a, WIDE, loads(100, 100), calm.history, 5.0)
    assert spike.replicas == 2  # 20 was recommended, but 2 only 5 s ago
    assert decide(2, a, WIDE, loads(100, 100), spike.history, 21.0).replicas == 20


def test_a_kubectl_scale_is_the_next_starting_point() -> None:
    """The autoscaler keeps no idea of its own about the current value: it starts from what
    /scale says, so a person's 10 stays while the load fits 10."""
    a = auto(queueDepthPerMember=4)
    d = decide(3, a, WIDE, loads(12, 12, 12), (), 0.0)
    assert d.replicas == 7
    assert decide(10, a, WIDE, loads(*[4] * 10), d.history, 1.0).replicas == 10


# -- properties -------------------------------------------------------------------------------
load_st = st.builds(
    LoadRecord,
    name=st.just("m"),
    generation=st.just(1),
    queue_depth=st.integers(0, 500),
    kv_cache_usage=st.floats(0, 1),
    ttft_ms=st.none() | st.builds(Percentiles, p90=st.floats(0, 1e5)),
)
section_st = st.builds(
    lambda q, kv, ttft, up_w, down_w, up_s, down_s, tol: api.Autoscaling.model_validate(
        {
            "enabled": True,
            "targets": {"queueDepthPerMember": q, "kvCacheUsage": kv, "ttftP90Ms": ttft},
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": up_w, "maxStep": up_s},
                "scaleDown": {"stabilizationWindowSeconds": down_w, "maxStep": down_s},
                "tolerance": tol,
            },
        }
    ),
    st.none() | st.floats(0.1, 100),
    st.none() | st.floats(0.05, 1),
    st.none() | st.floats(1, 1e4),
    st.integers(0, 100),
    st.integers(0, 100),
    st.integers(1, 10),
    st.integers(1, 10),
    st.floats(0, 0.5),
)


@st.composite
def situations(
    draw: st.DrawFn,
) -> tuple[int, api.Autoscaling, Bounds, list[LoadRecord], list[Recommendation]]:
    floor = draw(st.integers(1, 20))
    ceiling = draw(st.integers(floor, 40))
    current = draw(st.integers(floor, ceiling))
    history = draw(st.lists(st.builds(Recommendation, st.floats(0, 200), st.integers(floor, ceiling))))
    return current, draw(section_st), Bounds(floor, ceiling), draw(st.lists(load_st, max_size=30)), history


@settings(max_examples=400, deadline=None)
@given(situations())
def test_never_outside_the_bounds_nor_more_than_a_step(
    s: tuple[int, api.Autoscaling, Bounds, Sequence[LoadRecord], Sequence[Recommendation]],
) -> None:
    current, a, limits, got, history = s
    d = decide(current, a, limits, got, history, 200.0)
    assert limits.floor <= d.replicas <= limits.ceiling
    assert -a.behavior.scale_down.max_step <= d.replicas - current <= a.behavior.scale_up.max_step
    assert d == decide(current, a, limits, got, history, 200.0)  # deterministic
    assert all(r.at > 200.0 - 101 for r in d.history)  # history stays within the longest window


@settings(max_examples=300, deadline=None)
@given(situations())
def test_stable_load_settles_and_stays(
    s: tuple[int, api.Autoscaling, Bounds, Sequence[LoadRecord], Sequence[Recommendation]],
) -> None:
    """Fed its own answers under an unchanging load, the autoscaler comes to rest within a
    bounded number of decisions, and then does not move (no flapping).

    The bound: at most ``ceiling - floor`` moves of one pod or more, each waiting out at most
    the longer stabilization window (decisions come every 10 s), then 10 decisions at rest.
    """
    current, a, limits, got, _ = s
    history: tuple[Recommendation, ...] = ()
    now = 0.0
    seen = []
    b = a.behavior
    window = max(b.scale_up.stabilization_window_seconds, b.scale_down.stabilization_window_seconds)
    rounds = (limits.ceiling - limits.floor + 1) * (math.ceil(window / 10.0) + 1) + 10
    for _ in range(rounds):
        d = decide(current, a, limits, got, history, now)
        current, history, now = d.replicas, d.history, now + 10.0
        seen.append(current)
    assert len(set(seen[-10:])) == 1


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 30), st.floats(0.05, 0.9), st.floats(0, 0.5), st.floats(-1, 1))
def test_inside_the_tolerance_band_nothing_moves(current: int, target: float, tol: float, x: float) -> None:
    usage = target * (1 + x * tol * 0.999)
    a = api.Autoscaling.model_validate(
        {"enabled": True, "targets": {"kvCacheUsage": target}, "behavior": {"tolerance": tol}}
    )
    d = decide(current, a, Bounds(1, 64), loads(*[0] * current, kv=min(usage, 1.0)), (), 0.0)
    assert d.replicas == current
