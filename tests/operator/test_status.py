"""The status the plan mirror writes (`mirror_fields`), from a group's etcd state."""

from __future__ import annotations

import pytest

from weft.api.vocab import MemberState, Role
from weft.membership import GroupStatus, MemberStatus, PlanStatus
from weft.operator import handlers
from weft.operator.handlers import mirror_fields


def member(name: str, verified: bool = True) -> MemberStatus:
    return MemberStatus(name, 1, MemberState.ACTIVE, "node", 3, None, verified, 0, {}, None)


def test_role_ready_counts_only_live_verified_members_that_acked_the_epoch() -> None:
    roles = {
        "p0": Role.PREFILL,
        "p1": Role.PREFILL,
        "d0": Role.DECODE,
        "d1": Role.DECODE,
        "gone": Role.DECODE,
    }
    plan = PlanStatus(7, "p0", roles, {}, (), True, ("p0", "d0", "d1", "gone", "forged"))
    members = (
        member("p0"),
        member("p1"),
        member("d0"),
        member("d1", verified=False),
        member("forged", False),
    )
    doc = GroupStatus("g", "ns", 10, "p0", 7, plan, members, ())
    fields = mirror_fields(doc, None)
    assert (fields["prefill"], fields["decode"]) == (2, 1)
    assert (fields["prefillReady"], fields["decodeReady"]) == (1, 1)


def test_without_a_plan_no_role_is_ready() -> None:
    doc = GroupStatus("g", "ns", 1, None, None, None, (member("a"),), ())
    fields = mirror_fields(doc, None)
    assert (fields["prefillReady"], fields["decodeReady"]) == (0, 0)


def test_a_new_plan_that_moves_members_is_announced_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[tuple[str, str]] = []
    monkeypatch.setattr(handlers.kopf, "info", lambda body, reason, message: said.append((reason, message)))
    first = PlanStatus(3, "a", {"a": Role.PREFILL, "b": Role.DECODE, "c": Role.DECODE}, {}, (), True, ())
    assert handlers._announce_plan({}, None, first) is first and said == []  # remembered, not repeated
    moved = PlanStatus(
        4, "a", {"a": Role.PREFILL, "b": Role.PREFILL, "c": Role.DECODE}, {}, (), True, (),
        reason="prefill queue 30.0; decode queue 0.0: prefill+1", action="prefill+1",
    )  # fmt: skip
    assert handlers._announce_plan({}, first, moved) is moved
    assert said == [
        ("RolesChanged", "plan epoch 4: b decode->prefill (prefill queue 30.0; decode queue 0.0: prefill+1)")
    ]
    joined = PlanStatus(5, "a", {**moved.roles, "d": Role.DECODE}, {}, (), True, ())
    assert handlers._announce_plan({}, moved, joined) is joined and len(said) == 1  # nobody moved
    assert handlers._announce_plan({}, joined, moved) is joined  # an older epoch is not news
    forged = PlanStatus(9, "x", {"a": Role.DECODE}, {}, (), False, ())
    assert handlers._announce_plan({}, joined, forged) is joined and len(said) == 1


def test_the_engines_load_is_summed_by_role() -> None:
    from weft.api.records import LoadRecord, Percentiles

    roles = {"p0": Role.PREFILL, "d0": Role.DECODE, "d1": Role.DECODE}
    plan = PlanStatus(2, "p0", roles, {}, (), True, tuple(roles))
    loads = (
        LoadRecord(name="d0", generation=1, queue_depth=3, running=2, kv_cache_usage=0.5,
                   itl_ms=Percentiles(p50=10, p90=30, p99=40), tokens_per_s=100.4),
        LoadRecord(name="d1", generation=1, queue_depth=1, running=4, kv_cache_usage=0.25, tokens_per_s=50.0),
        LoadRecord(name="p0", generation=1, queue_depth=9, ttft_ms=Percentiles(p50=100, p90=812.6, p99=900)),
    )  # fmt: skip
    doc = GroupStatus("g", "ns", 3, "p0", 2, plan, tuple(member(n) for n in roles), (), loads=loads)
    load = {x["role"]: x for x in mirror_fields(doc, None)["load"]}
    assert load["decode"] == {
        "role": "decode", "members": 2, "queueDepth": 4, "running": 6, "kvCacheUsage": 0.38,
        "tokensPerSecond": 150, "ttftP90Ms": None, "itlP90Ms": 30,
    }  # fmt: skip
    assert (load["prefill"]["queueDepth"], load["prefill"]["ttftP90Ms"]) == (9, 813)
    from weft.api.transfergroup import TransferGroupStatus

    TransferGroupStatus.model_validate({"load": list(load.values())})  # the status schema takes it


def test_load_alone_is_mirrored_at_most_every_few_seconds() -> None:
    before = {"members": 3, "planEpoch": 4, "load": [{"role": "decode", "queueDepth": 1}]}
    load_moved = {**before, "load": [{"role": "decode", "queueDepth": 2}]}
    members_moved = {**load_moved, "members": 4}
    assert handlers._only_load_changed(load_moved, before, since_patch=1.0)  # held back
    assert not handlers._only_load_changed(load_moved, before, handlers.MIRROR_LOAD_INTERVAL)  # due
    assert not handlers._only_load_changed(members_moved, before, since_patch=1.0)  # at once
    assert not handlers._only_load_changed(load_moved, None, since_patch=0.0)  # the first patch
